"""Random initialization of a model built from `model.config`: a function of the seed and the parameter
names only, so that every ZeRO stage and world size starts from the same weights (the multi-process check
is tests/integration/test_init_parity.py)."""

from __future__ import annotations

import pytest
import torch

from bigsft.config import LoraConfig, ModelConfig

import tiny


def build(raw: dict, tokenizer, *, seed: int = 7, task: str = "causal_lm", **model_keys):
    from bigsft.model import build_model, load_hf_config

    cfg = ModelConfig(config={**raw, "vocab_size": 400}, tokenizer="unused", task=task, **model_keys)
    return build_model(cfg, load_hf_config(cfg), tokenizer=tokenizer, seed=seed)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer_with_new_pad(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})  # 401 tokens: the embedding is resized
    return tok


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    "llama": (tiny.LLAMA, "causal_lm", {}),
    "qwen2_tied": (tiny.QWEN2, "causal_lm", {}),
    "gpt2": (tiny.GPT2, "causal_lm", {}),
    "llama_classifier": (tiny.LLAMA, "sequence_classification", {"num_labels": 3}),
    "bert_classifier": (tiny.BERT, "sequence_classification", {"num_labels": 3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("new_pad", [False, True])
def test_weights_depend_on_the_seed_only(case, new_pad, tokenizer, tokenizer_with_new_pad):
    # Whatever the global generator holds when construction starts (under ZeRO-3 transformers skips the
    # construction draws and initializes again on rank 0), the weights are the same.
    raw, task, keys = CASES[case]
    tok = tokenizer_with_new_pad if new_pad else tokenizer
    torch.manual_seed(1)
    a = state(build(raw, tok, task=task, **keys))
    torch.manual_seed(2)
    torch.randn(1000)
    b = state(build(raw, tok, task=task, **keys))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    c = state(build(raw, tok, task=task, seed=8, **keys))
    assert any(not torch.equal(a[n], c[n]) for n in a if a[n].is_floating_point() and a[n].numel() > 1)


def test_init_keeps_the_model_family_scheme_ties_and_heads(tokenizer_with_new_pad):
    model = build(tiny.QWEN2, tokenizer_with_new_pad)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied weights stay one tensor
    assert embed.shape[0] == 401  # the new <pad> row exists and was drawn like the rest
    std = model.config.initializer_range
    assert embed.std().item() == pytest.approx(std, rel=0.1)
    layer = model.model.layers[0]
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros_like(layer.self_attn.q_proj.bias))
    # Different modules draw from different streams: no two weight matrices repeat each other.
    q, k = layer.self_attn.q_proj.weight.flatten()[:64], layer.self_attn.k_proj.weight.flatten()[:64]
    assert not torch.equal(q, k)

    classifier = build(tiny.LLAMA, tokenizer_with_new_pad, task="sequence_classification", num_labels=3)
    assert classifier.score.weight.std().item() == pytest.approx(std, rel=0.2)


def test_building_leaves_the_global_generator_as_it_found_it(tokenizer_with_new_pad):
    # LoRA's adapters and dropout draw from the global generator after the build: it must not depend on
    # what construction (strategy-dependent) consumed.
    torch.manual_seed(3)
    expected = torch.get_rng_state()
    build(tiny.LLAMA, tokenizer_with_new_pad)
    assert torch.equal(torch.get_rng_state(), expected)

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    a = state(build(tiny.LLAMA, tokenizer_with_new_pad, lora=lora))
    torch.manual_seed(5)
    b = state(build(tiny.LLAMA, tokenizer_with_new_pad, lora=lora))
    lora_keys = [k for k in a if "lora_A" in k]
    assert lora_keys and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_weights_are_not_touched(llama_dir, tokenizer):
    from safetensors.torch import load_file

    from bigsft.model import build_model, load_hf_config

    cfg = ModelConfig(name_or_path=str(llama_dir))
    model = build_model(cfg, load_hf_config(cfg), tokenizer=tokenizer, seed=7)
    saved = load_file(llama_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
