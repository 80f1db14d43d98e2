"""The planner: DeepSpeed's own estimators agree with it; it prefers what fits; its JSON is usable."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from bigsft.batch_math import BatchMath
from bigsft.config import config_from_dict
from bigsft.ds_config import RunValues, load_ds_config, resolve_ds_config
from bigsft.model import load_hf_config
from bigsft.plan import Hardware, ModelShape, Strategy, activations, model_shape, model_states, plan

import tiny

SHAPE = ModelShape(params=6_738_415_616, trainable=6_738_415_616, largest_layer=131_072_000, layers=32, hidden=4096,
                   intermediate=11008, heads=32, vocab=32000)


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_zero2_matches_deepspeeds_estimator(gpus, nodes):
    hw = Hardware(gpus_per_node=gpus, nodes=nodes, gpu_mem_gib=80, cpu_mem_gib=1000)
    for offload in (False, True):
        s = Strategy(zero=2, offload_optimizer="cpu" if offload else "none")
        gpu, host, _ = model_states(SHAPE, s, dtype="bf16", hw=hw)
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(SHAPE.params, gpus, nodes, cpu_offload=offload)
        assert (int(gpu), int(host)) == (ds_gpu, ds_cpu)


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize(("optimizer", "params"), [("none", "none"), ("cpu", "none"), ("cpu", "cpu")])
def test_zero3_matches_deepspeeds_estimator(gpus, nodes, optimizer, params):
    hw = Hardware(gpus_per_node=gpus, nodes=nodes, gpu_mem_gib=80, cpu_mem_gib=1000)
    gpu, host, _ = model_states(SHAPE, Strategy(zero=3, offload_optimizer=optimizer, offload_param=params),
                                dtype="bf16", hw=hw)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(SHAPE.params, SHAPE.largest_layer, gpus, nodes,
                                                           cpu_offload=optimizer != "none",
                                                           cpu_offload_params=params != "none", zero_init=True)
    assert int(gpu) == ds_gpu and int(host) == int(ds_cpu)


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 4)])
def test_zero3_offload_holds_the_optimizer_states_of_the_trainable_parameters_only(gpus, nodes):
    """Issue 15: with LoRA, ZeRO-3's offloaded host held the whole model's optimizer states (16Ψ); it holds
    the adapters' (16Ψt, as ZeRO-2 offload does on one GPU) and, under parameter offload, the 2-byte copy of Ψ."""
    lora = replace(SHAPE, trainable=40_000_000)
    hw = Hardware(gpus_per_node=gpus, nodes=nodes, gpu_mem_gib=24, cpu_mem_gib=64)
    host = {name: model_states(lora, s, dtype="bf16", hw=hw)[1] for name, s in [
        ("zero2", Strategy(zero=2, offload_optimizer="cpu")), ("zero3", Strategy(zero=3, offload_optimizer="cpu")),
        ("params", Strategy(zero=3, offload_optimizer="cpu", offload_param="cpu"))]}
    assert host["zero3"] == pytest.approx(16 * lora.trainable / nodes * 1.5)
    assert host["params"] == pytest.approx((2 * lora.params + 16 * lora.trainable) / nodes * 1.5)
    if gpus == 1:
        assert host["zero3"] == pytest.approx(host["zero2"])
    fp32 = model_states(lora, Strategy(zero=3, offload_optimizer="cpu", offload_param="cpu"), dtype="fp32", hw=hw)
    assert fp32[1] == pytest.approx((4 * lora.params + 16 * lora.trainable) / nodes * 1.5)


def test_checkpointing_and_sdpa_shrink_activations():
    kw = {"micro_batch": 4, "seq": 2048, "dtype": "bf16", "pipeline": 1, "accumulation": 1}
    full = activations(SHAPE, checkpointing=False, attention="eager", **kw)
    sdpa = activations(SHAPE, checkpointing=False, attention="sdpa", **kw)
    ckpt = activations(SHAPE, checkpointing=True, attention="sdpa", **kw)
    assert full > sdpa > ckpt
    logits = 2048 * 4 * 32000 * 6 * 2
    assert sdpa - logits == pytest.approx(32 * 2048 * 4 * 4096 * (15 + 19 * 11008 / (4 * 4096)))


def llama7b(**model) -> object:
    return config_from_dict({
        "model": {"config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000},
                  "tokenizer": "x", "dtype": "bf16", **model},
        "data": {"train": [{"path": "x.jsonl", "format": "alpaca"}], "max_length": 2048},
        "train": {"micro_batch_size": 4, "global_batch_size": 64}, "output_dir": "x"})


def test_meta_device_counts_7b_without_allocating_it():
    cfg = llama7b()
    shape = model_shape(load_hf_config(cfg.model), "causal_lm")
    assert shape.params == SHAPE.params and shape.largest_layer == SHAPE.largest_layer
    lora = model_shape(load_hf_config(cfg.model), "causal_lm", config_from_dict({
        **{"model": {"config": {"model_type": "llama"}, "tokenizer": "x", "lora": {"r": 8}}},
        "data": {"train": [{"path": "x", "format": "alpaca"}]}, "output_dir": "x"}).model.lora)
    assert 0 < lora.trainable < lora.params / 50


def test_plan_prefers_the_fastest_that_fits_and_lora_fits_where_full_does_not():
    hw = Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=24, cpu_mem_gib=64)
    cfg = llama7b(gradient_checkpointing=True)
    results = plan(cfg, load_hf_config(cfg.model), hw)
    assert not any(e.fits for e in results if e.strategy.offload_optimizer == "none")  # 7B on one 24 GiB GPU
    lora_cfg = llama7b(gradient_checkpointing=True, lora={"r": 16})
    best = next(e for e in plan(lora_cfg, load_hf_config(lora_cfg.model), hw) if e.fits)
    assert best.strategy.offload_optimizer == "none"
    big = Hardware(gpus_per_node=8, nodes=1, gpu_mem_gib=80, cpu_mem_gib=1000)
    ranked = plan(cfg, load_hf_config(cfg.model), big)
    fitting = [e for e in ranked if e.fits]
    assert fitting[0].step_seconds / fitting[0].tokens_per_step <= min(e.step_seconds / e.tokens_per_step
                                                                        for e in fitting)


def test_plan_command_writes_a_usable_deepspeed_json(tmp_path, tokenizer_dir):
    import yaml

    cfg = tmp_path / "run.yaml"
    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    cfg.write_text(yaml.safe_dump({"model": {"config": {"model_type": "llama", "hidden_size": 512,
                                                        "num_hidden_layers": 4, "num_attention_heads": 8,
                                                        "intermediate_size": 1024, "vocab_size": 400},
                                             "tokenizer": str(tokenizer_dir)},
                                   "data": {"train": [{"path": str(train), "format": "alpaca"}], "max_length": 512},
                                   "train": {"micro_batch_size": 2, "global_batch_size": 16}}))
    out = tmp_path / "planned.json"
    proc = subprocess.run([sys.executable, "-m", "bigsft", "plan", str(cfg), "--gpus-per-node", "2", "--nodes", "1",
                           "--gpu-mem", "8", "--cpu-mem", "16", "--write", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "recommended: ZeRO-" in proc.stdout and f"deepspeed={out}" in proc.stdout
    raw, label = load_ds_config(str(out))
    values = RunValues(batch=BatchMath(micro_batch_size=2, gradient_accumulation_steps=4, data_parallel_size=2), lr=1e-4,
                       adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, dtype="fp32")
    assert json.dumps(resolve_ds_config(raw, label, values, accelerator="cpu"))
    bad = subprocess.run([sys.executable, "-m", "bigsft", "plan", str(cfg), "--nodes", "1"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "required: --gpus-per-node, --gpu-mem" in bad.stderr


def test_encoder_decoders_count_both_stacks():
    """seq2seq_lm: T5 and a warm-started EncoderDecoderModel are sized from their own classes, and their layers
    (what activations scale with) are the encoder's plus the decoder's."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, BertConfig, EncoderDecoderConfig

    raw = dict(tiny.T5)
    t5 = AutoConfig.for_model(raw.pop("model_type"), vocab_size=500, **raw)
    shape = model_shape(t5, "seq2seq_lm")
    assert shape.params == AutoModelForSeq2SeqLM.from_config(t5).num_parameters()
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads) == (4, 64, 128, 4)
    bert = BertConfig(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    pair = model_shape(EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert), "seq2seq_lm")
    assert (pair.layers, pair.hidden) == (6, 48)
