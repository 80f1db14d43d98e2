"""Process group and launcher environment: the one reader of RANK / WORLD_SIZE / SLURM_*.

`read_launch_env` understands the deepspeed launcher, torchrun, plain `srun` and a lone process,
without touching torch, so config validation can use the world size before any process group
exists. `init_process_group` then starts DeepSpeed's communication backend (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """'env' (deepspeed / torchrun set RANK etc.), 'slurm' (plain srun) or 'single'."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. 'n[1-3,07],gpu5' -> ['n1', 'n2', 'n3', 'n07', 'gpu5']."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _slurm_first_host(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    try:  # scontrol knows every hostlist syntax; the parser above is the fallback
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = expand_hostlist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like '2(x3),1': counts per node in node order.
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m:
            counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher, torchrun, or a user's own
        world = int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or min(world, os.cpu_count() or 1))
        return LaunchEnv(
            rank=int(env["RANK"]), world_size=world, local_rank=local_rank, local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="env",
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside `srun`, one process per task
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")), local_world_size=_tasks_on_this_node(env),
            master_addr=env.get("MASTER_ADDR") or _slurm_first_host(env),
            # Same on every task of the job, different between concurrent jobs.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=int(env.get("MASTER_PORT") or 0), launcher="single")


def init_process_group(launch: LaunchEnv, timeout_minutes: float = 30.0) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); pins threads/devices."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    port = launch.master_port or free_port()
    os.environ.update({
        "RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size), "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size), "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(port),
    })
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; oversubscribing them costs more than it brings.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    else:
        accel.set_device(launch.local_rank)
    try:
        deepspeed.init_distributed(
            dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False, verbose=False,
            timeout=timedelta(minutes=timeout_minutes),
        )
    except RuntimeError as e:  # torch's DistNetworkError / DistStoreError: the rendezvous itself failed
        from bigsft.config import ConfigError

        text = str(e).lower()
        where = f"{launch.master_addr}:{port}"
        if "address already in use" in text or "eaddrinuse" in text:
            raise ConfigError(f"MASTER_PORT {port} is already in use on {launch.master_addr}: set MASTER_PORT to a "
                              "free port (every rank the same)") from None
        if "timed out" in text or "timeout" in text:
            raise ConfigError(f"rank {launch.rank} could not meet the others at {where} within {timeout_minutes:g} "
                              "min: check that rank 0 runs and MASTER_ADDR is reachable from this node") from None
        raise
    if accel.device_name() == "cpu":
        _unlink_shm_workspace(launch.rank)


def _unlink_shm_workspace(rank: int) -> None:
    """DeepSpeed's CPU backend maps a ~67 MB shared-memory workspace per rank into /dev/shm and never
    removes it: every run would leak RAM until the machine runs out. Once every rank has mapped every
    other's (they do so inside init_distributed), the names can go; the memory is freed when the last
    process exits, however it exits."""
    import torch.distributed as dist

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    with contextlib.suppress(OSError):  # no shared-memory op built, or not on Linux
        os.unlink(os.path.join("/dev/shm", name))


def accelerator_name() -> str:
    """'cpu' or 'cuda' (or another DeepSpeed accelerator), without starting a process group."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def fp16_supported() -> bool:
    """Whether the accelerator trains in fp16: DeepSpeed's own test, which its engine applies at start."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float] | list[int]) -> list[float]:
    """Sum a short list of numbers over all ranks (one collective, float64 keeps counts exact)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(value) -> list:
    """Every rank's `value` (small and picklable: a message, a file listing), in rank order."""
    import torch.distributed as dist

    if world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rank0_verdict(action: Callable[[], object], errors: tuple[type[BaseException], ...]) -> str:
    """Collective: rank 0 runs `action` (a write to shared storage that one rank does for all); every rank
    returns its failure, one of `errors` as a message, or '' when it succeeded."""
    problem = ""
    if rank() == 0:
        try:
            action()
        except errors as e:
            problem = str(e)
    return all_gather_object(problem)[0]


def all_reduce_tensor(t):
    """Sum a tensor over all ranks in place (moved to the backend's device and back)."""
    import torch.distributed as dist

    if world_size() == 1:
        return t
    dev = _comm_device()
    moved = t.to(dev)
    dist.all_reduce(moved)
    if moved is not t:
        t.copy_(moved)
    return t


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_skipping_teardown(code: int = 0) -> None:
    """End a rank process once its work is written: close the process group, run the atexit handlers
    (bigsft's lock release, W&B's), flush, and leave without the interpreter's C++ teardown, where now and
    then a destructor finds a live gloo thread and aborts ("terminate called without an active
    exception", exit -6): a finished or saved run would then report a crash to its launcher."""
    import atexit

    destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
