"""DeepSpeed JSON: shipped files, "auto" filling, conflicts named with both values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bigsft.batch_math import BatchMath
from bigsft.config import ConfigError
from bigsft.ds_config import (
    RunValues,
    find_ds_config,
    load_ds_config,
    offload_device,
    precision_of,
    resolve_ds_config,
    shipped_configs,
    zero_stage,
)

RUN = RunValues(batch=BatchMath(micro_batch_size=4, gradient_accumulation_steps=2, data_parallel_size=2), lr=2e-4,
                adam_betas=(0.9, 0.95), adam_eps=1e-8, weight_decay=0.1, max_grad_norm=1.0, dtype="fp32",
                total_steps=100, warmup_steps=10, hidden_size=64)

EXPECTED = {
    "zero0": (0, "none", "none"), "zero1": (1, "none", "none"), "zero2": (2, "none", "none"),
    "zero2_offload": (2, "cpu", "none"), "zero3": (3, "none", "none"), "zero3_offload": (3, "cpu", "cpu"),
    "zero3_nvme": (3, "nvme", "nvme"),
}


def test_required_configs_ship():
    names = {p.stem for p in shipped_configs()}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.stem)
def test_every_shipped_json_loads_and_resolves(path, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSFT_NVME_PATH", str(tmp_path))
    raw, label = load_ds_config(str(path))
    ds = resolve_ds_config(raw, label, RUN, accelerator="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(ds)
    if path.stem in EXPECTED:
        stage, opt, param = EXPECTED[path.stem]
        assert (zero_stage(ds), offload_device(ds, "offload_optimizer"), offload_device(ds, "offload_param")) == (
            stage, opt, param)


def test_names_resolve_with_or_without_suffix_and_dir():
    assert find_ds_config("zero3") == find_ds_config("zero3.json") == find_ds_config("ds_configs/zero3.json")


def test_nvme_path_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSFT_NVME_PATH", str(tmp_path))
    raw, label = load_ds_config("zero3_nvme")
    ds = resolve_ds_config(raw, label, RUN, accelerator="cpu")
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)
    monkeypatch.setenv("BIGSFT_NVME_PATH", str(tmp_path / "missing"))
    raw, label = load_ds_config("zero3_nvme")
    with pytest.raises(ConfigError, match="nvme_path .* is not a writable directory"):
        resolve_ds_config(raw, label, RUN, accelerator="cpu")


def test_precision_follows_model_dtype():
    raw, label = load_ds_config("zero2")
    for dtype, expected in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
        values = RunValues(**{**RUN.__dict__, "dtype": dtype})
        assert precision_of(resolve_ds_config(raw, label, values, accelerator="cuda")) == expected


def test_zero_buckets_follow_hidden_size():
    raw, label = load_ds_config("zero3")
    zero = resolve_ds_config(raw, label, RUN)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_param_persistence_threshold"] == 640


def test_explicit_values_that_contradict_the_run_config_name_both():
    raw = {"train_micro_batch_size_per_gpu": 16, "train_batch_size": 99, "gradient_clipping": 0.5,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "betas": "auto"}},
           "bf16": {"enabled": True}}
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(raw, "my.json", RUN, accelerator="cpu")
    text = str(info.value)
    assert "train_micro_batch_size_per_gpu is 16 but the run config gives 4 (train.micro_batch_size)" in text
    assert "train_batch_size is 99 but the run config gives 16" in text
    assert "gradient_clipping is 0.5 but the run config gives 1.0 (train.max_grad_norm)" in text
    assert "optimizer.params.lr is 0.1 but the run config gives 0.0002 (train.lr)" in text
    assert "bf16.enabled is true but model.dtype is 'fp32'" in text


def test_agreeing_explicit_values_pass_and_autos_fill_optimizer_and_scheduler():
    raw = {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": "auto",
           "eps": "auto", "weight_decay": "auto"}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                              "cos_min_ratio": "auto"}}}
    ds = resolve_ds_config(raw, "x", RUN, accelerator="cpu")
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {"warmup_num_steps": 10, "total_num_steps": 100, "cos_min_ratio": 0.0}


def test_deepspeed_docs_style_json_is_accepted():
    # The getting-started example from deepspeed.ai, with the legacy boolean zero_optimization.
    docs = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "Adam", "params": {"lr": 0.0002}}, "fp16": {"enabled": True},
            "zero_optimization": True}
    values = RunValues(**{**RUN.__dict__, "dtype": "fp16"})
    ds = resolve_ds_config(docs, "docs.json", values, accelerator="cuda")
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize(("raw", "message"), [
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer needs ZeRO stage 2 or 3, the JSON has stage 1"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer needs ZeRO stage 2 or 3, the JSON has stage 0"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage is 5"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "device is 'gpu'"),
    ({"zero_optimization": {"stage": 2}, "sparse_attention": {"block": "auto"}},
     "sparse_attention.block is \"auto\" but bigsft has no value"),
])
def test_bad_deepspeed_json(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_ds_config(raw, "x.json", RUN, accelerator="cpu")


@pytest.mark.parametrize(("kind", "expected"), [
    ("WarmupDecayLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-4, "warmup_num_steps": 10, "total_num_steps": 100}),
    ("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-4, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"warmup_num_steps": 10, "total_num_steps": 100, "cos_min_ratio": 0.0}),
])
def test_scheduler_fields_left_out_of_the_json_follow_the_run(kind, expected):
    # Left out, DeepSpeed would use its own defaults (peak 1e-3, 1000 warmup steps) whatever train.* says.
    ds = resolve_ds_config({"scheduler": {"type": kind}}, "x.json", RUN)
    assert ds["scheduler"]["params"] == expected
    explicit = resolve_ds_config({"scheduler": {"type": kind, "params": {"warmup_num_steps": 3}}}, "x.json", RUN)
    assert explicit["scheduler"]["params"]["warmup_num_steps"] == 3  # an explicit value is the user's choice
    with pytest.raises(ConfigError, match="scheduler.params.warmup_max_lr is 0.01 but the run config gives"):
        resolve_ds_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}}, "x.json", RUN)


def test_fp16_on_cpu_is_refused():
    values = RunValues(**{**RUN.__dict__, "dtype": "fp16"})
    raw, label = load_ds_config("zero0")
    with pytest.raises(ConfigError, match="fp16 does not train on CPU"):
        resolve_ds_config(raw, label, values, accelerator="cpu")
    # An accelerator that trains in fp16 (as DeepSpeed's is_fp16_supported says) is not refused.
    assert resolve_ds_config(raw, label, values, accelerator="cpu", fp16_kernels=True)["fp16"]["enabled"] is True


@pytest.mark.parametrize("ds", ["zero0", "zero1"])
def test_fp16_with_pipeline_parallelism_is_refused(ds):
    values = RunValues(**{**RUN.__dict__, "dtype": "fp16", "batch": dataclasses.replace(RUN.batch, pipeline_stages=2)})
    raw, label = load_ds_config(ds)
    with pytest.raises(ConfigError, match="fp16 under pipeline parallelism is not supported; use bf16"):
        resolve_ds_config(raw, label, values, accelerator="cuda")


def test_pipeline_at_zero0_leaves_clipping_to_bigsft_in_the_resolved_json():
    # The JSON bigsft dumps to ds_config.json is the one the engine gets: the clipping decision is made here.
    values = RunValues(**{**RUN.__dict__, "batch": dataclasses.replace(RUN.batch, pipeline_stages=2)})
    raw, label = load_ds_config("zero0")
    assert resolve_ds_config(raw, label, values)["gradient_clipping"] == 0.0
    assert resolve_ds_config(raw, label, RUN)["gradient_clipping"] == RUN.max_grad_norm


def test_pipeline_with_zero2_is_refused():
    values = RunValues(**{**RUN.__dict__, "batch": dataclasses.replace(RUN.batch, pipeline_stages=2)})
    raw, label = load_ds_config("zero2")
    with pytest.raises(ConfigError, match="pipeline parallelism works with ZeRO stage 0 or 1 only"):
        resolve_ds_config(raw, label, values)


def test_invalid_json_reports_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:2:\d+: invalid JSON"):
        load_ds_config(str(bad))


def test_missing_json_lists_shipped_ones():
    with pytest.raises(ConfigError, match="not found; give a JSON path or a shipped config .*zero3_offload"):
        load_ds_config("zero9.json")


def test_inline_dict_is_not_mutated():
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    ds, label = load_ds_config(raw)
    resolve_ds_config(ds, label, RUN)
    assert raw["zero_optimization"]["reduce_bucket_size"] == "auto"
