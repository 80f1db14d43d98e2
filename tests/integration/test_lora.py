"""LoRA under ZeRO 0, 2 with optimizer offload and 3 on 2 ranks: adapter-only training and checkpoints,
merged or adapter-only exports, exact resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from conftest import REPO, causal_config, check, grad_norms, read_metrics, train_losses

pytestmark = pytest.mark.slow
LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0}"


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("lora")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(200, seed=13))
    evaluation = tiny.write_jsonl(d / "eval.jsonl", tiny.alpaca_records(20, seed=14))
    return causal_config(d, llama_dir, train, evaluation, max_steps=8, lr=1e-2, save_every=4)


STAGES = ["zero0", "zero2_offload", "zero3"]  # ZeRO-0 first: the others are compared with it


@pytest.fixture(scope="module")
def runs(pool, lora_config, tmp_path_factory) -> dict[str, Path]:
    """Every launch of this module, started side by side in the background (conftest's LaunchPool); each
    test checks the exit of its own. The resume starts once the run it resumes has finished."""
    d = tmp_path_factory.mktemp("lora_runs")
    out = {key: d / key for key in (*STAGES, "adapter", "resumed")}
    merged = "test_lora_trains_adapters_only_and_exports_the_merged_model"
    for ds in STAGES:
        pool.add(ds, [str(lora_config), f"output_dir={out[ds]}", f"deepspeed={ds}", LORA], nproc=2,
                 tests=(merged,) if ds == "zero0" else (f"{merged}[{ds}]",))
    resume = ("test_lora_resume_adapter_export_and_export_command",)
    pool.add("adapter", [str(lora_config), f"output_dir={out['adapter']}", LORA, "model.lora.merge_on_export=false"],
             nproc=2, tests=resume)
    pool.add("resumed", [str(lora_config), f"output_dir={out['resumed']}", LORA,
                         f"train.resume={out['adapter']}/checkpoints/step_00000004"], nproc=2, after=("adapter",),
             tests=resume)
    return out


@pytest.mark.parametrize("ds", STAGES)
def test_lora_trains_adapters_only_and_exports_the_merged_model(ds, lora_config, pool, runs):
    from test_training import reload_eval_loss

    proc = check(pool.result(ds))
    out = runs[ds]
    assert "(8,192 trainable, LoRA r=4)" in proc.stdout
    losses = train_losses(out)
    assert losses[-1] < losses[0]
    if ds != "zero0":  # frozen base, adapters only: every stage trains the same adapters
        check(pool.result("zero0"))
        assert losses == pytest.approx(train_losses(runs["zero0"]), abs=1e-5)
        assert grad_norms(out) == pytest.approx(grad_norms(runs["zero0"]), rel=1e-4)
    # Checkpoints hold the adapter and its optimizer state, not the frozen base.
    states = {k for f in (out / "checkpoints" / "step_00000008" / "ds").glob("*model_states.pt")
              for k in (torch.load(f, weights_only=False).get("module") or {})}
    assert all("lora_" in k for k in states)
    final_eval = [r["eval/loss"] for r in read_metrics(out) if "eval/loss" in r][-1]
    assert reload_eval_loss(lora_config, out / "final") == pytest.approx(final_eval, abs=1e-5)


def test_lora_resume_adapter_export_and_export_command(pool, runs, tmp_path):
    check(pool.result("adapter"))
    out = runs["adapter"]
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "adapter_model.safetensors").is_file()
    check(pool.result("resumed"))  # from `out`'s step 4
    resumed = runs["resumed"]
    assert train_losses(resumed) == pytest.approx(train_losses(out)[4:], abs=1e-6)
    assert grad_norms(resumed) == pytest.approx(grad_norms(out)[4:], rel=1e-5)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bigsft", "export", str(resumed), str(tmp_path / "merged")], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    final = load_file(resumed / "final" / "model.safetensors")  # merged at the end of the resumed run
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in final.items())
    adapter = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    ids = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
