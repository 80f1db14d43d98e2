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
