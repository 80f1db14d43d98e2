"""Slurm for real: a private cluster of two slurmd nodes on this host runs slurm/sft.sbatch across both
nodes, is preempted and requeued; and the no-ssh launcher runs two "nodes" without Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, missing_binaries

import tiny
from conftest import REPO, causal_config, check, launch, launch_env, read_metrics, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
STEPS = 40  # long enough that a signal sent at step 2 lands mid-run however loaded the machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing {', '.join(missing)}); .ci/run installs it")
    if os.geteuid() != 0:
        pytest.skip("the private Slurm cluster runs its daemons as root")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except RuntimeError as e:
        c.stop()
        pytest.skip(f"the Slurm daemons could not start here: {str(e)[:2000]}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def slurm_config(tmp_path_factory, llama_dropout_dir) -> Path:
    d = tmp_path_factory.mktemp("slurm_run")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(300, seed=8))
    return causal_config(d, llama_dropout_dir, train, max_steps=STEPS, save_every=100, micro_batch_size=1,
                         gradient_accumulation_steps=2)


ARGS = ["deepspeed=zero2", "data.packing=true", "data.max_length=96"]


@pytest.fixture(scope="module")
def reference(slurm_config, tmp_path_factory) -> Path:
    """The same config on 2 local ranks under the deepspeed launcher."""
    out = tmp_path_factory.mktemp("slurm_ref") / "run"
    check(launch([str(slurm_config), f"output_dir={out}", *ARGS], nproc=2))
    return out


def submit(cluster: SlurmCluster, workdir: Path, *args: str, env: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=30", str(REPO / "slurm" / "sft.sbatch"), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=60,
                          env={**launch_env(env), "SLURM_CONF": str(cluster.conf), "BIGSFT_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_log(workdir: Path, job_id: str) -> str:
    path = workdir / f"slurm-bigsft-{job_id}.out"
    return path.read_text() if path.is_file() else ""


def test_sbatch_trains_across_two_nodes_like_two_local_ranks(cluster, slurm_config, reference, tmp_path):
    from test_tracking import SENTINELS, assert_no_secret_under

    out = tmp_path / "run"
    job = submit(cluster, tmp_path, str(slurm_config), f"output_dir={out}", *ARGS, "wandb.mode=offline",
                 env=SENTINELS)
    info = cluster.wait_job(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] == "n[1-2]" and "rendezvous 127.0.0.1:" in log and "sft.sbatch: finished" in log
    assert train_losses(out) == pytest.approx(train_losses(reference), abs=1e-6)
    assert_no_secret_under(tmp_path)  # the Slurm log, the run directory, its W&B run and checkpoints


def test_preempted_job_saves_requeues_and_finishes_with_the_same_losses(cluster, slurm_config, reference, tmp_path):
    """With BIGSFT_PREPARE=1: the job tokenizes and plans the data first, trains from the plan, and resumes
    from the checkpoint's row of it."""
    out = tmp_path / "run"
    job = submit(cluster, tmp_path, str(slurm_config), f"output_dir={out}", *ARGS, env={"BIGSFT_PREPARE": "1"})
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline, job_log(tmp_path, job)[-3000:]
        time.sleep(0.2)
    # What the time limit's --signal=B:USR1 does: signal the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.skip_requeue_delay(job)
    info = cluster.wait_job(job, timeout=900)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) == 1
    assert "USR1 received; asking the training to save and stop" in log
    assert "checkpoint saved; requeuing job" in log and "restart 1" in log and "resumed from" in log
    assert "data plan:" in log and "fresh, kept" in log  # prepared once; the requeued job only checked it
    assert log.count("windows read from the data plan") == 2
    got = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx(train_losses(reference), abs=1e-6)


def test_failed_job_is_not_requeued(cluster, slurm_config, tmp_path):
    job = submit(cluster, tmp_path, str(slurm_config), f"output_dir={tmp_path / 'run'}", "train.lr=-1")
    info = cluster.wait_job(job)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0
    assert info["ExitCode"].startswith("2:")
    assert "training failed with exit code 2; not requeuing" in job_log(tmp_path, job)


def test_launcher_mode_one_deepspeed_launcher_per_node(cluster, slurm_config, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, tmp_path, str(slurm_config), f"output_dir={out}", *ARGS,
                 env={"BIGSFT_SLURM_MODE": "launcher", "NUM_GPUS": "1"})
    info = cluster.wait_job(job)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job)[-4000:]
    assert train_losses(out) == pytest.approx(train_losses(reference), abs=1e-6)


def test_two_no_ssh_launchers_on_localhost_are_two_nodes(slurm_config, reference, tmp_path):
    from bigsft.dist import free_port

    out = tmp_path / "run"
    port = str(free_port())
    procs = [subprocess.Popen([str(REPO / "launchers" / "deepspeed_nossh.sh"), str(slurm_config), f"output_dir={out}",
                               *ARGS], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=launch_env({"NNODES": "2", "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port, "NUM_GPUS": "1"}))
             for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "+ deepspeed --hostfile" in outputs[0] and "--no_ssh --node_rank 1" in outputs[1]
    assert train_losses(out) == pytest.approx(train_losses(reference), abs=1e-6)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == STEPS
