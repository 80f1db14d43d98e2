"""QLoRA (model.quantization) in one process, on bitsandbytes' CPU 4-bit path: the base loads in 4 bits and
stays frozen, only the adapters train, and the dequantized export computes what the 4-bit model computes."""

from __future__ import annotations

import pytest
import torch

from bigsft.config import ConfigError, LoraConfig, ModelConfig, QuantizationConfig, config_from_dict
from bigsft.data.batching import collate
from bigsft.data.tokenize import IGNORE, Sample
from bigsft.evaluate import summed_loss
from bigsft.model import build_model, build_tokenizer, dequantized_state_dict, load_hf_config
from bigsft.preflight import quantization_problems

bnb = pytest.importorskip("bitsandbytes")
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def qlora_model(llama_dir):
    cfg = ModelConfig(name_or_path=str(llama_dir), lora=LORA, quantization=QuantizationConfig())
    return build_model(cfg, load_hf_config(cfg), tokenizer=build_tokenizer(cfg))


def a_batch():
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (12, 9):
        ids = torch.randint(3, 400, (n,), generator=gen).tolist()
        samples.append(Sample(input_ids=ids, targets=[IGNORE] * 3 + ids[4:] + [2]))
    return collate(samples, pad_id=0)


def test_the_base_is_4_bit_and_frozen_and_only_the_adapters_train(llama_dir):
    model = qlora_model(llama_dir)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down of both layers; the LM head stays whole
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in quantized)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss, _ = summed_loss(model, a_batch(), task="causal_lm")
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert all(m.weight.dtype == torch.uint8 for m in quantized)


def test_dequantized_weights_compute_what_the_4_bit_model_computes(llama_dir):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    model = qlora_model(llama_dir)
    for n, p in model.named_parameters():  # adapters that change the output (B starts at zero)
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    state = dequantized_state_dict(model)
    assert not any(".absmax" in k or "quant_" in k for k in state)
    config = AutoConfig.from_pretrained(llama_dir)
    plain = peft.get_peft_model(AutoModelForCausalLM.from_config(config), model.peft_config["default"])
    plain.load_state_dict(state, strict=True)
    merged = plain.merge_and_unload()
    b = a_batch()
    with torch.no_grad():
        want = model(**b.inputs).logits
        got = merged(**b.inputs).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_quantization_checks_before_launch(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')

    def problems(**model):
        raw = {"output_dir": str(tmp_path / "o"), "model": {"quantization": {"bits": 4}, **model},
               "data": {"train": [{"path": str(train), "format": "alpaca"}]}}
        with pytest.raises(ConfigError) as info:
            config_from_dict(raw)
        return str(info.value)

    assert "set model.lora (QLoRA trains adapters" in problems(name_or_path="x")
    assert "set model.name_or_path (not model.config" in problems(config={"model_type": "llama"}, tokenizer="t",
                                                                  lora={"r": 4})
    assert "bits: 8 is not one of 4" in problems(name_or_path="x", lora={"r": 4}, quantization={"bits": 8})
    assert quantization_problems({"zero_optimization": {"stage": 2}}) == []
    [zero3] = quantization_problems({"zero_optimization": {"stage": 3}})
    assert "ZeRO-3 cannot partition quantized weights" in zero3
