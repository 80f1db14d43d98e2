"""Activation checkpointing's choices: which layers recompute (model.checkpoint_layers) and whether their inputs
wait in host memory (model.activation_offload). Losses and gradients stay those of the plain model; the bytes
a forward leaves on the device for the backward fall."""

from __future__ import annotations

import gc

import pytest
import torch
from test_tiling import batch

import bigsft.model as model_module
from bigsft.config import ConfigError, ModelConfig, config_from_dict
from bigsft.evaluate import summed_loss
from bigsft.model import checkpointing_layers, choose_checkpointed_layers, lever_problems

LAYERS = 4


def llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=400)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.train()  # checkpointing runs in training only; this config has no dropout


def checkpointed(which, offload: bool):
    model = llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, choose_checkpointed_layers(model, which, offload=offload)


def loss_and_grads(model):
    model.zero_grad()
    loss, _ = summed_loss(model, batch(), task="causal_lm")
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("which", "chosen"), [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), ([1, 2], [1, 2])])
@pytest.mark.parametrize("offload", [False, True])
def test_chosen_layers_recompute_and_train_as_the_plain_model(which, chosen, offload):
    want_loss, want_grads = loss_and_grads(llama())
    model, got = checkpointed(which, offload)
    assert got == chosen
    assert [layer.gradient_checkpointing for layer in checkpointing_layers(model)] == [
        i in chosen for i in range(LAYERS)]
    forwards = []
    for layer in checkpointing_layers(model):  # the layer's own hooks stay outside the checkpoint; its MLP's run again
        layer.mlp.register_forward_pre_hook(lambda m, args: forwards.append(m))
    got_loss, got_grads = loss_and_grads(model)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
    assert len(forwards) == LAYERS + len(chosen)  # the chosen layers ran again in backward


def device_bytes(run, parked: list) -> int:
    """Bytes of live tensors, parameters and their gradients aside, while `run()`'s result is held: what a
    forward keeps for the backward. Tensors that `park` copied to the host are left out: on a GPU they are
    host memory (on this CPU-only machine, host and device are one memory)."""
    held = run()
    gc.collect()
    skip = {p.untyped_storage().data_ptr() for p in parked}
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in skip:
                    seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            continue
    del held
    return sum(seen.values())


def test_activation_offload_moves_the_checkpointed_inputs_off_the_device(monkeypatch):
    parked = []

    def park(tensor):
        copy = tensor.to("cpu", copy=True)
        parked.append(copy)
        return copy

    monkeypatch.setattr(model_module, "park", park)
    b = batch()
    kept = {}
    for offload in (False, True):
        model, _ = checkpointed(1, offload)
        kept[offload] = device_bytes(lambda model=model: summed_loss(model, b, task="causal_lm"), parked)
    hidden = b.inputs["input_ids"].numel() * 64 * 4  # one layer's fp32 input
    assert len(parked) == LAYERS and all(p.device.type == "cpu" for p in parked)
    assert kept[False] - kept[True] == pytest.approx(LAYERS * hidden, rel=0.05)


def test_checks_before_launch(tmp_path):
    from transformers import AutoConfig

    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "a b"}\n')
    raw = {"output_dir": str(tmp_path / "o"), "model": {"name_or_path": "x", "activation_offload": True,
                                                         "checkpoint_layers": 0},
           "data": {"train": [{"path": str(train), "format": "text"}]}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    text = str(info.value)
    assert "set model.gradient_checkpointing=true" in text and "model.checkpoint_layers: 0;" in text
    problems = lever_problems(ModelConfig(gradient_checkpointing=True, checkpoint_layers=[0, 5, 9]),
                              AutoConfig.for_model("llama", num_hidden_layers=6))
    assert problems == ["model.checkpoint_layers: [9] beyond the model's 6 layers (0-5)"]
