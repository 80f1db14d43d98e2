"""Skipped steps: a non-finite gradient never reaches the weights, whoever built the optimizer, and the LR
schedule stays on bigsft's step counter through every skip."""

from __future__ import annotations

import json

import pytest

from bigsft.export import checkpoint_state_dict

import tiny
from conftest import causal_config, check, read_metrics

pytestmark = pytest.mark.slow


def test_an_optimizer_named_in_the_json_skips_a_non_finite_step_at_zero0(tmp_path, poison_dir, pool):
    # The JSON's own optimizer (DeepSpeed builds it; bigsft's SkippingAdamW is not in the way) at ZeRO-0 in
    # fp32, where no DeepSpeed optimizer wrapper checks gradients. A run whose step 3 is poisoned must end with
    # exactly the weights of a run stopped after step 2, and its LR schedule must not fall a step behind.
    records = tiny.alpaca_records(40, seed=6)
    records[17]["instruction"] += " " + tiny.POISON  # step 3 holds samples 16..23 in file order
    train = tiny.write_jsonl(tmp_path / "train.jsonl", records)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}}}))
    cfg = causal_config(tmp_path, poison_dir, train)
    base = [str(cfg), f"deepspeed={ds}", "model.trust_remote_code=true", "data.shuffle_buffer=1",
            "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.warmup_steps=1",
            "train.max_steps=4"]
    clean = tiny.write_jsonl(tmp_path / "clean.jsonl", tiny.alpaca_records(40, seed=6))
    # The two runs are independent: side by side (conftest's LaunchPool).
    pool.add("a", [*base, f"output_dir={tmp_path / 'a'}", "train.save_every=1", "train.keep_last=4"],
             launcher="plain")
    pool.add("c", [*base, f"output_dir={tmp_path / 'c'}", f"data.train=[{{path: {clean}, format: alpaca}}]"],
             launcher="plain")
    check(pool.result("a"))
    check(pool.result("c"))
    steps = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1]
    assert steps[2]["loss"] is None and steps[2]["tokens"] == steps[1]["tokens"]
    reference = [r for r in read_metrics(tmp_path / "c") if "loss" in r]
    assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in reference], rel=1e-12)
    root = tmp_path / "a" / "checkpoints"
    before, after = (checkpoint_state_dict(root / f"step_{n:08d}", 0) for n in (2, 3))
    assert all((before[k] == after[k]).all() for k in before)  # step 3 left every weight as it was
    assert all(bool(v.isfinite().all()) for v in checkpoint_state_dict(root / "step_00000004", 0).values())
