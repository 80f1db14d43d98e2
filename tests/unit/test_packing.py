"""Packing isolates samples: a packed row's loss equals the samples run one by one, and padding, packing
and accumulation give the same gradient for the same data (the loss is normalized over the window)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bigsft.data.batching import Packer, collate, collate_packed
from bigsft.data.formats import PARSERS
from bigsft.data.tokenize import SampleBuilder
from bigsft.evaluate import summed_loss

import tiny


@pytest.fixture(scope="module")
def samples(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.eos_token
    build = SampleBuilder(tok, max_length=96)
    return [build(PARSERS["alpaca"](r, {})) for r in tiny.alpaca_records(12, seed=5)], tok


def tiny_model(config: dict, vocab: int):
    raw = dict(config)
    cfg = AutoConfig.for_model(raw.pop("model_type"), vocab_size=vocab, **raw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["LLAMA", "QWEN2", "GPT2"])
def test_packed_loss_equals_samples_one_by_one(samples, arch):
    items, tok = samples
    model = tiny_model(getattr(tiny, arch), len(tok))
    packer = Packer(256, open_rows=4)
    rows = [r for s in items for r in packer.add(s)] + packer.flush()
    assert any(len(r) >= 3 for r in rows)  # rows really hold several samples
    with torch.no_grad():
        packed = sum(summed_loss(model, collate_packed(rows, pad_id=tok.pad_token_id), task="causal_lm")[0].item()
                     for _ in [0])
        alone = sum(summed_loss(model, collate([s], pad_id=tok.pad_token_id), task="causal_lm")[0].item() for s in items)
    tokens = sum(s.num_targets for s in items)
    assert packed / tokens == pytest.approx(alone / tokens, abs=1e-5)


def _grads(model, batches, total_targets):
    model.zero_grad()
    for b in batches:
        (summed_loss(model, b, task="causal_lm")[0] / total_targets).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_padding_packing_and_accumulation_give_the_same_gradient(samples):
    items, tok = samples
    model = tiny_model(tiny.LLAMA, len(tok))
    total = sum(s.num_targets for s in items)
    padded = _grads(model, [collate(items, pad_id=tok.pad_token_id)], total)
    accumulated = _grads(model, [collate(items[i : i + 5], pad_id=tok.pad_token_id) for i in range(0, 12, 5)], total)
    packer = Packer(200, open_rows=3)
    rows = [r for s in items for r in packer.add(s)] + packer.flush()
    packed = _grads(model, [collate_packed(rows[:2], pad_id=0), collate_packed(rows[2:], pad_id=0)], total)
    assert torch.allclose(accumulated, padded, atol=1e-6, rtol=1e-4)
    assert torch.allclose(packed, padded, atol=1e-6, rtol=1e-4)
