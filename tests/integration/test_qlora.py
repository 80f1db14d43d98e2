"""QLoRA on 2 CPU ranks (bitsandbytes' CPU 4-bit path) under ZeRO-2 with optimizer offload: the loss falls,
a resume is exact, the dequantized, merged export reproduces the run's eval loss; ZeRO-3 is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_continues, check, read_metrics, split_alpaca_config, train_losses

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")
QLORA = ["model.lora={r: 4, alpha: 8, dropout: 0.0}", "model.quantization.bits=4", "deepspeed=zero2_offload"]


@pytest.fixture(scope="module")
def qlora_config(tmp_path_factory, llama_dir) -> Path:
    return split_alpaca_config(tmp_path_factory.mktemp("qlora"), llama_dir, seed=21, max_steps=6, save_every=3,
                               eval_every=6, lr=1e-2, lr_schedule="constant", warmup_steps=0)


@pytest.fixture(scope="module")
def runs(pool, qlora_config, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qlora_runs")
    out = {"run": d / "run", "resumed": d / "resumed"}
    tests = ("test_qlora_trains_resumes_and_exports_a_dequantized_merged_model",)
    pool.add("run", [str(qlora_config), f"output_dir={out['run']}", *QLORA], nproc=2, tests=tests)
    pool.add("resumed", [str(qlora_config), f"output_dir={out['resumed']}", *QLORA,
                         f"train.resume={out['run']}/checkpoints/step_00000003"], nproc=2, after=("run",), tests=tests)
    return out


def test_qlora_trains_resumes_and_exports_a_dequantized_merged_model(pool, runs, qlora_config):
    import json

    from test_training import reload_eval_loss

    check(pool.result("run"))
    check(pool.result("resumed"))
    run, resumed = runs["run"], runs["resumed"]
    losses = train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    assert "LoRA r=4" in pool.result("run").stdout
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [4, 5, 6]
    assert_continues(resumed, run, after_step=3, tolerance=1e-6)  # the same world size: the same arithmetic
    config = json.loads((run / "final" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: the 4-bit weights dequantized, the adapters merged
    evaluated = [r for r in read_metrics(run) if "eval/loss" in r][-1]["eval/loss"]
    assert reload_eval_loss(qlora_config, run / "final") == pytest.approx(evaluated, abs=1e-4)


def test_zero3_is_refused_before_launch(qlora_config):
    proc = subprocess.run([sys.executable, "-m", "bigsft", "validate", str(qlora_config), *QLORA, "deepspeed=zero3"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "ZeRO-3 cannot partition quantized weights" in proc.stderr + proc.stdout
