"""The save side of checkpoints under conditions a single-host test never meets: a full disk on one
rank under ZeRO-3, a node whose checkpoint directory is its own, and two jobs on one output_dir.

Every run here is real (2 ranks of DeepSpeed on CPU); each is bounded by a timeout, so a hang fails the
test instead of blocking CI, and each checks that no rank is left alive.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import tiny
from conftest import REPO, causal_config, check, launch, launch_command, launch_env

pytestmark = pytest.mark.slow

EXIT_FAILED, EXIT_CONFIG = 1, 2


@pytest.fixture(scope="module")
def save_config(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("saves")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(300, seed=5))
    return causal_config(d, llama_dir, train, max_steps=400, save_every=10, micro_batch_size=1)


def run_args(cfg: Path, out: Path, ds: str, *extra: str) -> list[str]:
    return [str(cfg), f"output_dir={out}", f"deepspeed={ds}", "train.log_every=1", *extra]


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")),
               default=0)


def wait_until(procs: list[subprocess.Popen], predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        ended = [p.returncode for p in procs if p.poll() is not None]
        if ended:
            raise AssertionError(f"a process ended (exit {ended}) before the condition:\n" + output_of(procs)[-4000:])
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def output_of(procs: list[subprocess.Popen]) -> str:
    texts = []
    for p in procs:
        if p.poll() is not None and p.stdout is not None and not p.stdout.closed:
            texts.append(p.stdout.read())
            p.stdout.close()
    return "\n".join(texts)


def kill_tree(proc: subprocess.Popen) -> None:
    """The whole session of a background launch (launcher and ranks), then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def training_ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes under a deepspeed launch, by rank."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "bigsft.train" in cmd and "deepspeed.launcher.launch" not in " ".join(cmd):
            found.append((next((int(a.split("=")[1]) for a in cmd if a.startswith("--local_rank=")), 0), p))
    return [p for _, p in sorted(found, key=lambda x: x[0])]


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(("victim", "max_file_size"), [(1, 64 * 1024), (0, 16 * 1024)])
def test_zero3_full_disk_on_one_rank_stops_every_rank_without_hanging(victim, max_file_size, save_config, tmp_path):
    # Only one rank's writes fail. Before the fix it skipped the all-gather of persistent parameters that
    # DeepSpeed's ZeRO-3 save ends with, while the other rank waited in it for good. Rank 1's shards go
    # through DeepSpeed's checkpoint engine; rank 0 also copies DeepSpeed's recovery scripts (38 KB) with a
    # plain file copy, as DeepSpeed copies NVMe swap files in: at 16 KiB that copy fails too.
    from bigsft.checkpoint import verify

    out = tmp_path / "run"
    proc = subprocess.Popen(launch_command(run_args(save_config, out, "zero3"), nproc=2), env=launch_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = out / "checkpoints" / "step_00000010"
        wait_until([proc], first.is_dir)
        ranks = training_ranks(proc)
        assert len(ranks) == 2
        resource.prlimit(ranks[victim].pid, resource.RLIMIT_FSIZE, (max_file_size, resource.RLIM_INFINITY))
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks hang after a failed write (still at step {logged_steps(out)})")
    finally:
        kill_tree(proc)
    assert proc.returncode == EXIT_FAILED, output[-3000:]
    assert f"failed (rank {victim}: cannot write " in output, output[-3000:]
    assert output.count("error: saving checkpoint") == 2 and "previous checkpoints are intact" in output
    assert all(gone(p) for p in ranks)
    assert verify(first)["step"] == 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010"]  # no .tmp left


def test_a_node_local_checkpoint_dir_fails_the_save_and_says_a_shared_filesystem_is_needed(save_config, tmp_path):
    # Rank 1 runs in a mount namespace of its own. After the first checkpoint, a node-local directory is
    # bind-mounted over output_dir/checkpoints in that namespace only: from then on rank 1 writes its
    # shards where rank 0 cannot see them, as on nodes without a shared filesystem.
    from bigsft.checkpoint import verify
    from bigsft.dist import free_port

    out, node_local = tmp_path / "run", tmp_path / "node1_local"
    node_local.mkdir()
    port = str(free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = launch_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            argv = [sys.executable, "-m", "bigsft.train", *run_args(save_config, out, "zero2", "train.max_steps=30")]
            if rank == 1:
                argv = ["unshare", "--mount", "--propagation", "private", *argv]
            procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        first = out / "checkpoints" / "step_00000010"
        wait_until(procs, first.is_dir)
        subprocess.run(["nsenter", "-t", str(procs[1].pid), "-m", "mount", "--bind", str(node_local),
                        str(out / "checkpoints")], check=True)
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=240)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"the ranks hang (step {logged_steps(out)})")
    finally:
        for p in procs:
            kill_tree(p)
    output = "\n".join(outputs)
    assert [p.returncode for p in procs] == [EXIT_FAILED, EXIT_FAILED], output[-4000:]
    assert "checkpoints need a filesystem that every rank shares" in outputs[0], outputs[0][-3000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in outputs[0]
    assert "previous checkpoints are intact" in outputs[1]
    assert verify(first)["step"] == 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010"]
    assert list(node_local.iterdir()) == []  # rank 1 removed what it wrote on its own disk


def test_a_second_job_on_a_busy_output_dir_exits_2_naming_the_holder(save_config, tmp_path):
    out = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")  # not a pipe: nobody reads it while the job runs on
    first = subprocess.Popen(launch_command(run_args(save_config, out, "zero0", "train.max_steps=100000",
                                                     "train.save_every=100000"), nproc=2),
                             env=launch_env({"SLURM_JOB_ID": "4242"}), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until([first], lambda: logged_steps(out) >= 2)
        holder = training_ranks(first)[0].pid
        second = launch(run_args(save_config, out, "zero0", "train.max_steps=3"), nproc=2, timeout=300)
        assert second.returncode == EXIT_CONFIG, second.stdout[-2000:] + second.stderr[-2000:]
        text = second.stdout + second.stderr
        assert f"is in use by pid {holder} on {socket.gethostname()} (Slurm job 4242)" in text, text[-2000:]
        assert "Traceback" not in text
        steps = logged_steps(out)
        wait_until([first], lambda: logged_steps(out) > steps)  # the first job trains on, untouched
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
        assert [r["step"] for r in lines if "loss" in r] == list(range(1, max(r["step"] for r in lines) + 1))
    finally:
        kill_tree(first)
        log.close()
    # Its holder was killed: the lock is free again, though the lock file still names it.
    assert json.loads((out / ".lock").read_text())["pid"] == holder
    check(launch(run_args(save_config, out, "zero0", "train.max_steps=2"), launcher="plain", timeout=300))
