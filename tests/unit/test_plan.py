"""The planner: DeepSpeed's own estimators agree with it; it prefers what fits; its JSON is usable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from bigsft import plan as plan_module
from bigsft.batch_math import BatchMath
from bigsft.config import config_from_dict
from bigsft.ds_config import RunValues, load_ds_config, resolve_ds_config
from bigsft.model import load_hf_config
from bigsft.plan import (
    GIB,
    NF4_BYTES,
    NO_LEVERS,
    Hardware,
    Levers,
    ModelShape,
    Strategy,
    activations,
    allowed,
    communication,
    estimate,
    model_shape,
    model_states,
    nothing_fits,
    overrides,
    plan,
    plan_shape,
    report,
    sequence_parallel_sizes,
)

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
    logits = 2048 * 4 * 32000 * (12 + 2) + 32000 * 4096 * 2  # the loss's backward and the head's weight gradient
    assert sdpa - logits == pytest.approx(32 * 2048 * 4 * 4096 * (15 + 19 * 11008 / (4 * 4096)))
    gated = activations(replace(SHAPE, gated=True, kv_heads=8), checkpointing=False, attention="sdpa", **kw)
    # q, k, v (a quarter of the heads each for k and v), norms, residuals, gate/up/SiLU/product: from saved tensors
    assert gated - logits == pytest.approx(32 * 2048 * 4 * 4096 * ((8 + 2 * 8 / 32 + 4 * 11008 / 4096) * 2 + 8))
    masked = activations(replace(SHAPE, gated=True, kv_heads=8), checkpointing=False, attention="sdpa", masked=True,
                         **kw)
    assert masked - gated == pytest.approx(4 * 2048 * 2048 * (1 + 2 * 32))  # the boolean mask, a bf16 copy per layer


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


# --------------------------------------------------------------------------------------------------
# Issue 15: long sequences and the last memory levers, on a Llama-3-8B shape.

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
BLOCK_LINEARS = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v (8 kv heads); gate, up, down


def llama3_8b(*, max_length: int = 4096, **model) -> object:
    return config_from_dict({
        "model": {"config": LLAMA3_8B, "tokenizer": "x", "dtype": "bf16", "gradient_checkpointing": True, **model},
        "data": {"train": [{"path": "x.jsonl", "format": "alpaca"}], "max_length": max_length},
        "train": {"micro_batch_size": 1, "global_batch_size": 8}, "output_dir": "x"})


@pytest.fixture(scope="module")
def shapes_8b():
    """(full, LoRA r16) shapes of Llama-3-8B, counted once on the meta device (seconds each)."""
    cfg = llama3_8b(lora={"r": 16, "alpha": 32})
    hf = load_hf_config(cfg.model)
    return model_shape(hf, "causal_lm"), model_shape(hf, "causal_lm", cfg.model.lora)


def test_8b_shape_has_its_key_value_heads_and_the_base_that_4_bits_pack(shapes_8b):
    full, lora = shapes_8b
    assert full.params == 8_030_261_248 and full.kv_heads == lora.kv_heads == 8
    assert lora.trainable == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)  # r·(in + out) per adapted Linear
    assert lora.quantizable == 32 * BLOCK_LINEARS  # not the embeddings, the norms or the LM head
    assert full.quantizable == 0  # nothing is frozen without LoRA


def test_8b_lora_on_one_24gib_gpu_fits_with_a_lever_and_zero3_offload_holds_the_adapters_states(shapes_8b):
    """The issue's run: nothing fitted, and ZeRO-3 offload claimed 180 GiB of host memory."""
    _, lora = shapes_8b
    cfg, hw = llama3_8b(lora={"r": 16, "alpha": 32}), Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=24, cpu_mem_gib=64)
    today = [e for e in plan_shape(lora, cfg, hw, levers=[NO_LEVERS]) if e.fits]
    # with the host holding only the adapters' states, parameter offload fits, at PCIe speed
    assert [e.strategy.name for e in today] == ["ZeRO-3, params+optimizer on cpu"]
    rows = plan_shape(lora, cfg, hw)
    host = {e.strategy.name: e.host for e in rows}
    adapters = host["ZeRO-2, optimizer on cpu"]
    assert adapters < 2 * GIB and host["ZeRO-3, optimizer on cpu"] == pytest.approx(adapters)
    assert host["ZeRO-3, params+optimizer on cpu"] == pytest.approx(adapters + 2 * lora.params * 1.5)
    best = rows[0]
    assert best.fits and best.gpu_total <= 24 * 0.9 * GIB and best.levers != NO_LEVERS
    assert set(best.levers.overrides) <= set(overrides(best, "x.json"))
    assert best.step_seconds / best.tokens_per_step < today[0].step_seconds / today[0].tokens_per_step
    # QLoRA, asked for alone: ZeRO 0-2 only, a third of the GPU
    qlora = plan_shape(lora, cfg, hw, levers=[Levers(quantized=True)])
    assert {e.strategy.zero for e in qlora if e.strategy.sequence_parallel == 1} == {0, 1, 2}
    assert qlora[0].fits and qlora[0].gpu_states < 7 * GIB and qlora[0].gpu_total < 24 * 0.9 * GIB
    assert "model.quantization.bits=4" in overrides(qlora[0], "x.json")


def test_8b_lora_on_one_16gib_gpu_is_recommended_qlora(shapes_8b):
    """2Ψ of bf16 weights alone (15 GiB) exceed 16 GiB less the margin: only the 4-bit base fits without
    offloading the parameters, and it is faster than parameter offload."""
    _, lora = shapes_8b
    cfg, hw = llama3_8b(lora={"r": 16, "alpha": 32}), Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=16, cpu_mem_gib=64)
    best = plan_shape(lora, cfg, hw)[0]
    assert best.fits and best.levers.quantized and best.strategy.zero <= 2
    assert best.gpu_total <= 16 * 0.9 * GIB and "model.quantization.bits=4" in overrides(best, "x.json")
    weights = 2 * (lora.params - lora.quantizable) + NF4_BYTES * lora.quantizable
    assert pytest.approx(4.127, abs=1e-3) == NF4_BYTES * 8 and best.gpu_states >= weights


def test_8b_full_finetuning_at_32k_tokens_on_8_gpus_needs_a_lever(shapes_8b):
    full, _ = shapes_8b
    cfg, hw = llama3_8b(max_length=32768), Hardware(gpus_per_node=8, nodes=1, gpu_mem_gib=80, cpu_mem_gib=1024)
    today = [e for e in plan_shape(full, cfg, hw, levers=[NO_LEVERS]) if e.strategy.sequence_parallel == 1]
    # without levers only ZeRO-3 with the optimizer (or everything) on the CPU fits, the slowest rows
    assert {e.strategy.name for e in today if e.fits} == {"ZeRO-3, optimizer on cpu", "ZeRO-3, params+optimizer on cpu"}
    best = plan_shape(full, cfg, hw)[0]
    assert best.fits and best.strategy.offload_optimizer == "none"
    assert best.levers.tiled_loss or best.strategy.sequence_parallel > 1
    assert {"model.tiled_loss=true", f"sequence_parallel.size={best.strategy.sequence_parallel}"} & set(
        overrides(best, "x.json"))
    assert best.step_seconds / best.tokens_per_step < min(e.step_seconds / e.tokens_per_step for e in today if e.fits)


def test_sequence_parallel_sizes_and_rows(shapes_8b):
    gqa = replace(SHAPE, heads=12, kv_heads=4, hidden=768)
    twelve = Hardware(gpus_per_node=12, nodes=1, gpu_mem_gib=80, cpu_mem_gib=1000)
    assert sequence_parallel_sizes(gqa, twelve, task="causal_lm", attention="sdpa") == [2, 4, 12]  # not 3, 6
    assert sequence_parallel_sizes(gqa, twelve, task="causal_lm", attention="eager") == []
    assert sequence_parallel_sizes(gqa, twelve, task="sequence_classification", attention="sdpa") == []
    full, _ = shapes_8b
    cfg, hw = llama3_8b(max_length=32768), Hardware(gpus_per_node=8, nodes=1, gpu_mem_gib=80, cpu_mem_gib=1024)
    rows = plan_shape(full, cfg, hw)
    assert sorted(e.strategy.sequence_parallel for e in rows if e.strategy.sequence_parallel > 1) == [2, 4, 8]
    assert not any(e.strategy.pipeline > 1 and e.strategy.sequence_parallel > 1 for e in rows)
    for e in rows:  # a row is split over S ranks: a step still trains the global batch of 8 rows of 32768 tokens
        dp = hw.gpus // (e.strategy.sequence_parallel * e.strategy.pipeline)
        assert e.tokens_per_step == e.micro_batch * e.accumulation * 32768 * dp == 8 * 32768


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_sequence_parallel_divides_activations_and_adds_all_to_alls(shapes_8b, checkpointing, offload):
    full, _ = shapes_8b
    kw = {"micro_batch": 2, "dtype": "bf16", "checkpointing": checkpointing, "attention": "sdpa", "pipeline": 1,
          "accumulation": 1, "levers": Levers(activation_offload=offload and checkpointing)}
    one = activations(full, seq=32768, **kw)
    head_gradient = 128256 * 4096 * 2  # whole on every rank
    for sp in (2, 4, 8):
        split = activations(full, seq=32768, sequence_parallel=sp, **kw)
        assert split - head_gradient == pytest.approx((one - head_gradient) / sp)
    tiled = {**kw, "levers": Levers(tiled_loss=True)}  # one tile's worth: the formula on the rank's s/S tokens
    assert activations(full, seq=32768, sequence_parallel=8, **tiled) == activations(full, seq=4096, **tiled)
    hw = Hardware(gpus_per_node=8, nodes=1, gpu_mem_gib=80, cpu_mem_gib=1024)
    net1, a2a1, _ = communication(full, Strategy(zero=1), dtype="bf16", hw=hw, accumulation=3, micro_batch=1,
                                  seq=32768, checkpointing=checkpointing)
    net8, a2a8, _ = communication(full, Strategy(zero=1, sequence_parallel=8), dtype="bf16", hw=hw, accumulation=3,
                                  micro_batch=1, seq=32768, checkpointing=checkpointing)
    assert a2a1 == 0 and net8 == net1  # ZeRO still partitions over all 8 ranks
    per_layer = 7 / 8 * 4096 * 1 * 2 * 128 * (2 * 32 + 2 * 8)  # q, k, v, out; k and v with 8 kv heads
    assert a2a8 == pytest.approx(3 * 32 * (3 if checkpointing else 2) * per_layer)


def test_tiled_loss_lowers_activations_by_the_logits_and_activation_offload_moves_them_to_the_host(shapes_8b):
    _, lora = shapes_8b
    kw = {"micro_batch": 1, "seq": 4096, "dtype": "bf16", "checkpointing": True, "attention": "sdpa", "pipeline": 1,
          "accumulation": 1}
    whole = activations(lora, **kw)
    tiled = activations(lora, levers=Levers(tiled_loss=True), **kw)
    logits = 4096 * 128256 * (12 + 2) + 128256 * 4096 * 2  # fp32 log-softmax and gradients, bf16 cast; head gradient
    # tiles of 2^26 / V tokens (256 MiB of fp32 logits): a recomputed tile's fp32 log-softmax, gradients and bf16
    # cast, the head's weight gradient, the hidden states and their gradient
    tile = 523 * 128256 * (12 + 2) + 128256 * 4096 * 2 + 2 * 4096 * 4096 * 2
    assert tiled < whole and whole - tiled == pytest.approx(logits - tile)
    cfg, hw = llama3_8b(lora={"r": 16}), Hardware(gpus_per_node=2, nodes=1, gpu_mem_gib=24, cpu_mem_gib=64)
    batch = BatchMath(micro_batch_size=1, gradient_accumulation_steps=4, data_parallel_size=2)
    kept = estimate(lora, Strategy(zero=2), cfg=cfg, hw=hw, batch=batch, seq=4096)
    moved = estimate(lora, Strategy(zero=2), cfg=cfg, hw=hw, batch=batch, seq=4096,
                     levers=Levers(activation_offload=True))
    inputs = 2 * 4096 * 4096 * 32  # 2·s·b·h·k/2 per layer
    assert kept.gpu_activations - moved.gpu_activations == pytest.approx(inputs * 31 / 32)
    assert moved.host - kept.host == pytest.approx(inputs * 2)  # for both GPUs of the node
    assert moved.comm - kept.comm == pytest.approx(4 * 2 * inputs) and moved.step_seconds > kept.step_seconds
    no_checkpointing = llama3_8b(lora={"r": 16}, gradient_checkpointing=False)
    assert not allowed(Strategy(zero=2), Levers(activation_offload=True), cfg=no_checkpointing, shape=lora)
    assert not allowed(Strategy(zero=3), Levers(quantized=True), cfg=cfg, shape=lora)
    assert not allowed(Strategy(zero=1, pipeline=2), Levers(quantized=True), cfg=cfg, shape=lora)
    assert not allowed(Strategy(zero=2), Levers(quantized=True), cfg=llama3_8b(), shape=lora)  # needs model.lora


def test_nothing_fits_names_only_levers_not_in_use_with_numbers(shapes_8b, monkeypatch):
    _, lora = shapes_8b
    cfg, hw = llama3_8b(lora={"r": 16}), Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=6, cpu_mem_gib=16)
    rows = plan_shape(lora, cfg, hw)
    assert not any(e.fits for e in rows)
    advice = nothing_fits(lora, cfg, None, hw, rows)
    assert "lora" not in advice.lower() and "checkpointing" not in advice
    assert re.search(r"--gpu-mem \d+ gives", advice) and "--nodes 2 gives" in advice and "GiB per GPU" in advice
    every = Levers(tiled_loss=True, activation_offload=True, quantized=True)
    monkeypatch.setattr(plan_module, "configured_levers", lambda cfg: (every, 1))
    rows = plan_shape(lora, cfg, hw)
    assert all(e.levers == every for e in rows) and not any(e.fits for e in rows)
    advice = nothing_fits(lora, cfg, None, hw, rows)
    assert not any(key in advice for key in ("model.tiled_loss", "model.activation_offload", "model.quantization",
                                             "lora", "checkpointing"))
    monkeypatch.undo()
    without = llama3_8b(lora={"r": 16}, gradient_checkpointing=False)
    sixteen = Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=16, cpu_mem_gib=64)
    rows = plan_shape(lora, without, sixteen)
    assert not any(e.fits for e in rows)
    assert "model.gradient_checkpointing=true gives ZeRO-" in nothing_fits(lora, without, None, sixteen, rows)


def test_plan_header_names_the_levers_and_the_run_line_their_keys(monkeypatch):
    import io

    from rich.console import Console

    cfg = config_from_dict({
        "model": {"config": {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 512, "vocab_size": 400},
                  "tokenizer": "x", "gradient_checkpointing": True, "lora": {"r": 4}},
        "data": {"train": [{"path": "x.jsonl", "format": "alpaca"}], "max_length": 256},
        "train": {"micro_batch_size": 1, "global_batch_size": 8}, "output_dir": "x"})
    hw = Hardware(gpus_per_node=4, nodes=1, gpu_mem_gib=8, cpu_mem_gib=16)
    out = io.StringIO()
    report(cfg, load_hf_config(cfg.model), hw, console=Console(file=out, width=200))
    assert "levers in use: gradient checkpointing, LoRA r4;" in out.getvalue()
    monkeypatch.setattr(plan_module, "configured_levers", lambda cfg: (Levers(tiled_loss=True), 2))
    out = io.StringIO()
    best = report(cfg, load_hf_config(cfg.model), hw, console=Console(file=out, width=200))
    assert "levers in use: gradient checkpointing, LoRA r4, tiled loss, sequence parallel 2;" in out.getvalue()
    assert best.levers.tiled_loss and "model.tiled_loss=true" in out.getvalue()
    sp = replace(best, strategy=replace(best.strategy, sequence_parallel=4))
    assert "sequence_parallel.size=4" in overrides(sp, "x.json", configured_sequence_parallel=2)
    assert not any(o.startswith("sequence_parallel") for o in overrides(sp, "x.json", configured_sequence_parallel=4))


def test_8b_lora_on_one_24gib_gpu_names_qlora_with_its_numbers(shapes_8b):
    """The issue's case: bf16 LoRA r16 with checkpointing at 4096 tokens on one 24 GiB GPU. The recommendation is
    the fastest row that fits (a 16-bit base with the tiled loss); QLoRA follows with its memory, time and keys."""
    import io
    import re

    from rich.console import Console

    cfg = llama3_8b(lora={"r": 16, "alpha": 32}, **{"tiled_loss": False})
    hw = Hardware(gpus_per_node=1, nodes=1, gpu_mem_gib=24, cpu_mem_gib=64)
    out = io.StringIO()
    best = report(cfg, load_hf_config(cfg.model), hw, console=Console(file=out, width=250))
    text = out.getvalue()
    line = next(x for x in text.splitlines() if x.startswith("with less GPU memory: QLoRA"))
    qlora, against = (float(v) for v in re.search(r"\(([\d.]+) GiB per GPU against ([\d.]+),", line).groups())
    assert qlora < against == pytest.approx(best.gpu_total / GIB, abs=0.05) and against < 24 * 0.9
    assert "model.quantization.bits=4" in line and "deepspeed=zero" in line
    assert not best.levers.quantized
