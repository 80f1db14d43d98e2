"""Pipeline parallelism on 2 CPU ranks: P=2 against the unpipelined model, stage-wise loading, export,
packing, resume, ZeRO-0/1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from conftest import REPO, causal_config, check, grad_norms, read_metrics, train_losses

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def pipe_config(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("pipe")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(200, seed=11))
    evaluation = tiny.write_jsonl(d / "eval.jsonl", tiny.alpaca_records(23, seed=12))
    return causal_config(d, llama_dir, train, evaluation, max_steps=STEPS, gradient_accumulation_steps=4,
                         micro_batch_size=2, save_every=3)


def eval_losses(run: Path) -> list[float]:
    return [r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r]


def pipelined(cfg: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [str(cfg), f"output_dir={out}", f"model.name_or_path={model}", "pipeline.stages=2", "deepspeed=pipeline",
            *extra]


def single(cfg: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [str(cfg), f"output_dir={out}", f"model.name_or_path={model}", *extra]


TWO_STAGES = [
    ("llama", ()),                                                      # untied, ZeRO-1 (ds_configs/pipeline.json)
    ("gpt2", ()),                                                       # tied embeddings: TiedLayerSpec
    ("llama", ("deepspeed=zero0", "pipeline.partition=type:DecoderLayerPipe",
               "pipeline.activation_checkpoint_interval=1")),
]
PACKED = ("data.packing=true", "data.max_length=128", "train.micro_batch_size=1")


@pytest.fixture(scope="module")
def runs(pool, pipe_config, llama_dir, gpt2_dir, tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Every launch of this module, started side by side in the background (conftest's LaunchPool); each
    test checks the exit of its own. The unpipelined reference of a model is one run, whichever test
    compares with it, and so is the plain P=2 GPT-2 run that test_export_resume_and_reload exports."""
    d = tmp_path_factory.mktemp("pipeline")
    models = {"llama": llama_dir, "gpt2": gpt2_dir}
    out = {}
    two = "test_two_stages_match_the_unpipelined_model"
    for arch in ("llama", "gpt2"):
        out[f"single_{arch}"] = d / f"single_{arch}"
        pool.add(f"single_{arch}", single(pipe_config, out[f"single_{arch}"], models[arch]), launcher="plain",
                 tests=(two,))
    for i, (arch, extra) in enumerate(TWO_STAGES):
        key = f"pipe_{arch}" if not extra else f"pipe_{arch}_{i}"
        out[key] = d / key
        pool.add(key, pipelined(pipe_config, out[key], models[arch], *extra), nproc=2,
                 tests=(two, "test_export_resume_and_reload") if key == "pipe_gpt2" else (two,))
    packed = "test_packed_rows_through_the_pipeline"
    out["packed_single"], out["packed_pipe"] = d / "packed_single", d / "packed_pipe"
    pool.add("packed_single", single(pipe_config, out["packed_single"], llama_dir, *PACKED), launcher="plain",
             tests=(packed,))
    pool.add("packed_pipe", pipelined(pipe_config, out["packed_pipe"], llama_dir, *PACKED), nproc=2, tests=(packed,))
    out["resumed"] = d / "resumed"
    pool.add("resumed", pipelined(pipe_config, out["resumed"], gpt2_dir,
                                  f"train.resume={out['pipe_gpt2']}/checkpoints/step_00000003"),
             nproc=2, after=("pipe_gpt2",), tests=("test_export_resume_and_reload",))
    out["refused"] = d / "refused"
    pool.add("refused", [str(pipe_config), f"output_dir={out['refused']}", f"model.name_or_path={llama_dir}",
                         "pipeline.stages=2", "deepspeed=zero2"], nproc=2,
             tests=("test_pipeline_with_zero2_is_refused_before_launch",))
    model_dir = tiny.build_model_dir(d / "sharded", tokenizer_dir, {**tiny.LLAMA, "num_hidden_layers": 4})
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(model_dir, max_shard_size="60KB")
    out["sharded"] = model_dir
    from bigsft.dist import free_port

    pool.add("stage_reads", commands=lambda: [(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
         str(Path(__file__).with_name("pipeline_stage_reads.py")), str(model_dir)],
        {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})], timeout=600,
        tests=("test_each_stage_reads_only_its_own_tensors",))
    return out


def trained(pool, runs: dict[str, Path], key: str) -> Path:
    """The run directory of launch `key`, once it has exited 0."""
    check(pool.result(key))
    return runs[key]


@pytest.mark.parametrize(("arch", "extra"), TWO_STAGES)
def test_two_stages_match_the_unpipelined_model(arch, extra, pool, runs):
    reference = trained(pool, runs, f"single_{arch}")
    run = trained(pool, runs, f"pipe_{arch}" if not extra else f"pipe_{arch}_{TWO_STAGES.index((arch, extra))}")
    assert len(train_losses(run)) == STEPS
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-5)
    assert eval_losses(run) == pytest.approx(eval_losses(reference), abs=1e-5)
    norms = [[r["grad_norm"] for r in read_metrics(x) if "loss" in r] for x in (run, reference)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_packed_rows_through_the_pipeline(pool, runs):
    reference = trained(pool, runs, "packed_single")
    run = trained(pool, runs, "packed_pipe")
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-5)
    assert grad_norms(run) == pytest.approx(grad_norms(reference), rel=1e-4)
    assert eval_losses(run) == pytest.approx(eval_losses(reference), abs=1e-5)


def test_export_resume_and_reload(pipe_config, pool, runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run = trained(pool, runs, "pipe_gpt2")
    final = AutoModelForCausalLM.from_pretrained(run / "final")  # original names, tied head restored
    assert (run / "final" / "model.safetensors.index.json").is_file()
    proc = subprocess.run(["bigsft", "export", str(run / "checkpoints" / f"step_{STEPS:08d}"), str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in final.state_dict().items())
    from transformers import GenerationConfig  # the pipeline's final/ stops where `bigsft export`'s does

    stops = [GenerationConfig.from_pretrained(d).eos_token_id for d in (run / "final", tmp_path / "hf")]
    assert stops[0] is not None and stops[0] == stops[1]
    from test_training import reload_eval_loss

    assert reload_eval_loss(pipe_config, run / "final") == pytest.approx(eval_losses(run)[-1], abs=1e-5)
    resumed = trained(pool, runs, "resumed")  # from `run`'s step 3
    assert train_losses(resumed) == pytest.approx(train_losses(run)[3:], abs=1e-6)
    assert grad_norms(resumed) == pytest.approx(grad_norms(run)[3:], rel=1e-5)


def test_each_stage_reads_only_its_own_tensors(pool, runs):
    model_dir = runs["sharded"]  # 4 layers, saved in shards of 60 KB
    proc = check(pool.result("stage_reads"))
    reports = {r["rank"]: r for r in (json.loads(line.split("] ", 1)[-1]) for line in proc.stdout.splitlines()
                                      if '"read"' in line)}
    first, last = set(reports[0]["read"]), set(reports[1]["read"])
    assert not first & last
    assert "model.embed_tokens.weight" in first and not any(k.startswith("model.layers.3.") for k in first)
    assert "lm_head.weight" in last and "model.norm.weight" in last and "model.embed_tokens.weight" not in last
    everything = set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert first | last == everything  # together they read the checkpoint exactly once


def test_pipeline_with_zero2_is_refused_before_launch(pool, runs):
    proc = pool.result("refused")
    assert proc.returncode == 2
    assert "pipeline parallelism works with ZeRO stage 0 or 1 only (a DeepSpeed limitation)" in proc.stderr
    assert not runs["refused"].exists()
