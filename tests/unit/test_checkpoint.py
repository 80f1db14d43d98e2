"""Checkpoint bookkeeping without a process group: verification, resume policy, identity, safety."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from bigsft.checkpoint import (
    MANIFEST,
    check_safe_to_unpickle,
    identity_problems,
    rank_state,
    resolve_resume,
    restore_rank_state,
    verify,
)
from bigsft.config import ConfigError
from bigsft.tracking import keep_metrics_through


def fake_checkpoint(run, step: int, *, files=None) -> object:
    path = run / "checkpoints" / f"step_{step:08d}"
    (path / "ds").mkdir(parents=True)
    files = files or {"ds/a.pt": b"x" * 10}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    (path / "trainer.json").write_text(json.dumps({"step": step}))
    listed = {rel: len(data) for rel, data in files.items()} | {"trainer.json": (path / "trainer.json").stat().st_size}
    (path / MANIFEST).write_text(json.dumps({"files": listed}))
    return path


def test_verify_accepts_complete_and_names_what_is_wrong(tmp_path):
    path = fake_checkpoint(tmp_path, 5)
    assert verify(path) == {"step": 5}
    (path / "ds" / "a.pt").write_bytes(b"x" * 4)
    with pytest.raises(ConfigError, match="ds/a.pt is 4 bytes, the manifest says 10"):
        verify(path)
    (path / "ds" / "a.pt").unlink()
    with pytest.raises(ConfigError, match="ds/a.pt is missing"):
        verify(path)
    (path / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="is incomplete"):
        verify(path)


def test_resume_policy(tmp_path):
    assert resolve_resume(str(tmp_path), "auto") is None
    assert resolve_resume(str(tmp_path), "never") is None
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 12)
    (tmp_path / "checkpoints" / "step_00000020.tmp").mkdir()  # an interrupted save is never a candidate
    assert resolve_resume(str(tmp_path), "auto") == newest
    assert resolve_resume(str(tmp_path / "elsewhere"), str(tmp_path)) == newest  # a run directory
    assert resolve_resume(str(tmp_path), str(newest.with_name("step_00000003"))).name == "step_00000003"
    with pytest.raises(ConfigError, match="train.resume: never, but .* already holds checkpoints"):
        resolve_resume(str(tmp_path), "never")


def test_identity_mismatches_and_world_size_changes():
    saved = {"model": "llama/vocab400", "task": "causal_lm", "num_labels": None, "dtype": "fp32", "zero_stage": 2,
             "pipeline_stages": 1, "data_parallel_size": 2}
    assert identity_problems(saved, dict(saved), "ck") == ([], False)
    assert identity_problems(saved, {**saved, "data_parallel_size": 1}, "ck") == ([], True)
    problems, _ = identity_problems(saved, {**saved, "model": "gpt2/vocab400", "task": "sequence_classification",
                                            "zero_stage": 3}, "ck")
    assert len(problems) == 3
    assert "written with ZeRO stage 2, this run has 3" in problems[2]


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.ones(2), "scaler": {"scale": 1.0}}, tmp_path / "ok.pt")
    check_safe_to_unpickle(tmp_path)
    torch.save({"evil": os.system}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"evil\.pt references posix\.system: refusing to unpickle"):
        check_safe_to_unpickle(tmp_path)


def test_rank_state_round_trip_restores_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rank_state(), tmp_path / "rank.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rank_state(torch.load(tmp_path / "rank.pt", weights_only=True))  # plain types and tensors only
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 4, "eval/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')  # cut by the kill
    keep_metrics_through(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4]


def test_rank_state_keeps_only_the_current_cuda_devices_generator(monkeypatch):
    # No GPU here: torch.cuda's RNG functions stand in for a machine with 4 devices, then one with 1.
    devices = {"count": 4, "current": 2}
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    restored = []

    def set_all(_):
        raise RuntimeError("set_rng_state_all: more states than devices")

    def get_state(device="cuda"):
        return states[devices["current"]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: devices["current"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((s, devices["current"])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    saved = rank_state()
    assert torch.equal(saved["cuda"], states[2])  # this rank's device, not all four
    devices.update(count=1, current=0)  # the resumed rank sees one device
    restore_rank_state(saved)
    assert len(restored) == 1 and torch.equal(restored[0][0], states[2])
    restored.clear()  # a checkpoint written before: one state per device; this rank's device is the one
    restore_rank_state({**saved, "cuda": list(states[:1])})
    assert torch.equal(restored[0][0], states[0])


def test_rank_0_must_see_every_file_each_rank_wrote(tmp_path):
    from bigsft.checkpoint import unseen_files

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 7)
    (tmp_path / "rank_00000.pt").write_bytes(b"x" * 3)
    reports = [{"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": 7, "rank_00000.pt": 3},
               {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 9, "rank_00001.pt": 3}]
    problem = unseen_files(tmp_path, reports)
    assert "rank 1 wrote ds/zero_pp_rank_1_mp_rank_00_optim_states.pt (9 bytes), which rank 0 does not see" in problem
    assert "checkpoints need a filesystem that every rank shares" in problem
    (tmp_path / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 5)
    (tmp_path / "rank_00001.pt").write_bytes(b"x" * 3)
    assert "which rank 0 sees as 5 bytes" in unseen_files(tmp_path, reports)
    (tmp_path / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 9)
    assert unseen_files(tmp_path, reports) == ""


def test_output_dir_lock_names_its_holder_and_frees_when_it_ends(tmp_path, monkeypatch):
    import socket

    from bigsft.checkpoint import take_output_dir_lock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held = take_output_dir_lock(tmp_path / "run")  # creates output_dir
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["slurm_job_id"] == "77"
    with pytest.raises(ConfigError, match=rf"output_dir {tmp_path}/run is in use by pid {os.getpid()} on "
                                          rf"{socket.gethostname()} \(Slurm job 77\)"):
        take_output_dir_lock(tmp_path / "run")
    held.close()  # the holder ends (flock is released with its last descriptor, however it exits)
    take_output_dir_lock(tmp_path / "run").close()


def test_output_dir_lock_without_flock_trusts_a_live_holder_only(tmp_path, monkeypatch):
    # Some network filesystems refuse flock: the lock file's holder is then checked by its pid.
    import errno
    import fcntl
    import socket
    import subprocess

    from bigsft.checkpoint import take_output_dir_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = tmp_path / ".lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job_id": None}))
    take_output_dir_lock(tmp_path).close()  # its holder is gone from this host: stale, taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None}))
    with pytest.raises(ConfigError, match=f"is in use by pid {os.getppid()} on {socket.gethostname()}"):
        take_output_dir_lock(tmp_path)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "5"}))
    with pytest.raises(ConfigError, match=r"in use by pid 1 on elsewhere \(Slurm job 5\).*delete .*\.lock"):
        take_output_dir_lock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "5")  # the same job, requeued: its earlier run is over
    take_output_dir_lock(tmp_path).close()


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    from bigsft.checkpoint import ResumePoint, step_dirs

    older = fake_checkpoint(tmp_path, 2)
    newer = [fake_checkpoint(tmp_path, 4), fake_checkpoint(tmp_path, 6)]
    other_run = fake_checkpoint(tmp_path / "elsewhere", 4)
    assert ResumePoint(newer[-1], {"step": 6}, universal=False).set_aside_newer(tmp_path, is_main=True) is None
    # From another run's step 4: this run's own step 4 and 6 are another trajectory.
    aside = ResumePoint(other_run, {"step": 4}, universal=False).set_aside_newer(tmp_path, is_main=True)
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]
    assert step_dirs(tmp_path) == [older] and aside.parent == tmp_path / "checkpoints" / "abandoned"
    assert verify(aside / "step_00000006") == {"step": 6}  # moved whole, still usable


def test_zero3_universal_load_repair_unshares_the_step_and_restores_weight_decay():
    from bigsft.checkpoint import repair_zero3_universal_load

    weights, norms = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [weights], "weight_decay": 0.1}, {"params": [norms], "weight_decay": 0.0}])
    decays = [g["weight_decay"] for g in opt.param_groups]
    for p in (weights, norms):
        p.grad = torch.ones_like(p)
    opt.step()
    shared = torch.tensor(1.0)  # what DeepSpeed's ZeRO-3 universal load leaves: one step tensor, group 0's settings
    for state in opt.state.values():
        state["step"] = shared
    for group in opt.param_groups:
        group["weight_decay"] = 0.1
    repair_zero3_universal_load(opt, decays)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in (weights, norms)] == [2.0, 2.0]  # shared, it would read 3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
