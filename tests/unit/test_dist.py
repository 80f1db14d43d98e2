"""Launcher environments: deepspeed/torchrun variables, plain srun, a lone process."""

from __future__ import annotations

import pytest

from bigsft.dist import expand_hostlist, read_launch_env


@pytest.mark.parametrize(("hostlist", "hosts"), [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[07-09,12],cpu5", ["gpu07", "gpu08", "gpu09", "gpu12", "cpu5"]),
    ("a[1,3]b,c", ["a1b", "a3b", "c"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_torchrun_and_deepspeed_variables():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 1234, "env")


def test_deepspeed_local_rank_argument_is_a_fallback():
    env = read_launch_env({"RANK": "1", "WORLD_SIZE": "2"}, local_rank_arg=1)
    assert env.local_rank == 1


def test_plain_srun_step():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "4242",
                           "SLURM_STEP_NODELIST": "zz-node[3-4]"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "zz-node3" and env.launcher == "slurm"
    assert env.master_port == 20000 + 4242 % 20000


def test_batch_script_without_srun_is_a_single_process():
    # Inside an sbatch script (no srun step) SLURM_PROCID exists but there is no step of several tasks.
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert (env.world_size, env.launcher) == (1, "single")
