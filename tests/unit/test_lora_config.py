"""LoRA through peft: what trains, and that merging changes nothing the model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bigsft.config import LoraConfig
from bigsft.model import apply_lora

import tiny


def tiny_llama():
    raw = dict(tiny.LLAMA)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), vocab_size=400, **raw))


@pytest.mark.parametrize(("targets", "names"), [
    ("all-linear", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (["q_proj", "v_proj"], ("q_proj", "v_proj")),
])
def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out(targets, names):
    base = tiny_llama()
    expected = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets), "causal_lm")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == expected
    assert all("lora_" in n for n, _ in trainable)


def test_merged_weights_give_the_logits_of_base_plus_adapter():
    model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.0), "causal_lm").eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            p.data.normal_(std=0.05)
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter changes the output
    assert torch.allclose(merged, adapted, atol=1e-5)


def test_no_matching_module_is_a_config_error():
    from bigsft.config import ConfigError

    with pytest.raises(ConfigError, match="model.lora"):
        apply_lora(tiny_llama(), LoraConfig(target_modules=["no_such_proj"]), "causal_lm")
