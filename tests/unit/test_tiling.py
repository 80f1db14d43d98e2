"""Tiled LM loss and tiled MLPs (model.tiled_loss, model.tiled_mlp): the same loss, gradients and eval
predictions as the whole computation, with no more than one tile of logits or MLP activations at a time."""

from __future__ import annotations

import pytest
import torch
from test_trained_head import FAMILIES, SMALL, sample

from bigsft.config import ConfigError, ModelConfig, config_from_dict
from bigsft.data.batching import collate_packed
from bigsft.evaluate import summed_loss
from bigsft.model import lever_problems, loss_tile_tokens, tile_mlps, trained_positions_head

TILE = 7  # does not divide the trained tokens: a short last tile


def model_for(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **FAMILIES.get(family, SMALL)))
    model.config.use_cache = False
    return model.eval()


def batch():
    gen = torch.Generator().manual_seed(1)
    return collate_packed([[sample(gen, 20, 5), sample(gen, 13, 3)], [sample(gen, 30, 10)]], pad_id=0)


def loss_and_grads(model, b, head):
    model.zero_grad()
    loss, _ = summed_loss(model, b, task="causal_lm", head=head)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: the head shares the embedding's weight
def test_tiled_loss_equals_the_whole_logits_loss(family):
    model, b = model_for(family), batch()
    whole = trained_positions_head(model, model.config)
    want_loss, want_grads = loss_and_grads(model, b, whole)
    whole.handle.remove()
    tiled = trained_positions_head(model, model.config, tile_tokens=TILE)
    rows = []
    tiled.module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    got_loss, got_grads = loss_and_grads(model, b, tiled)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)  # float32 sums in another order
    # the head saw the trained tokens tile by tile (forward, then each tile again in backward), never whole
    assert max(rows) == TILE and sum(r for r in rows if r) == 2 * b.num_targets

    with torch.no_grad():  # eval: the predictions are the whole logits' argmax
        loss, predicted = summed_loss(model, b, task="causal_lm", head=tiled)
        tiled.handle.remove()
        full = trained_positions_head(model, model.config)
        want, logits = summed_loss(model, b, task="causal_lm", head=full)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(predicted, logits.argmax(-1))


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs its forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_tiled_loss_keeps_no_logits_for_backward():
    model, b = model_for("llama"), batch()
    whole = trained_positions_head(model, model.config)
    kept_whole = saved_bytes(lambda: summed_loss(model, b, task="causal_lm", head=whole))
    whole.handle.remove()
    tiled = trained_positions_head(model, model.config, tile_tokens=TILE)
    kept_tiled = saved_bytes(lambda: summed_loss(model, b, task="causal_lm", head=tiled))
    logits = b.num_targets * SMALL["vocab_size"] * 4
    assert kept_whole - kept_tiled >= logits  # at least the fp32 logits (the softmax keeps its own copy too)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiled_mlp_equals_the_whole_mlp(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=400) if family == "gpt2" else None
    model = model_for(family) if config is None else AutoModelForCausalLM.from_config(config).eval()
    b = batch()
    want_loss, want_grads = loss_and_grads(model, b, None)
    assert tile_mlps(model, model.config, tile_tokens=TILE) == 2
    assert tile_mlps(model, model.config, tile_tokens=TILE) == 0  # once only
    widths = []
    for name, module in model.named_modules():
        if name.endswith(("mlp.up_proj", "mlp.c_fc")):
            module.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[-2]))
    got_loss, got_grads = loss_and_grads(model, b, None)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)  # float32 sums in another order
    assert max(widths) == TILE  # the MLP never ran on the whole sequence


def test_tile_size_and_the_checks_before_launch(tmp_path):
    from transformers import AutoConfig

    llama = AutoConfig.for_model("llama", vocab_size=128256)
    assert loss_tile_tokens(ModelConfig(tiled_loss=True), llama) == 523  # 256 MiB of fp32 logits
    assert loss_tile_tokens(ModelConfig(tiled_loss=True, tile_tokens=64), llama) == 64
    assert loss_tile_tokens(ModelConfig(), llama) is None
    gemma = AutoConfig.for_model("gemma2")
    problems = lever_problems(ModelConfig(tiled_loss=True, tiled_mlp=True), gemma)
    assert len(problems) == 2 and "gemma2 head is not a plain projection" in problems[0]
    assert "not gemma2" in problems[1]

    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "a b"}\n')
    raw = {"output_dir": str(tmp_path / "o"), "model": {"name_or_path": "x", "task": "sequence_classification",
                                                         "num_labels": 2, "tiled_loss": True, "tile_tokens": 0},
           "data": {"train": [{"path": str(train), "format": "classification"}]}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    text = str(info.value)
    assert "model.tiled_loss: tiles a causal LM's logits" in text and "model.tile_tokens: 0; must be >= 1" in text
