"""Pipeline pieces without a process group: what can be pipelined, names, inputs, stage-wise reads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bigsft.data.batching import Batch
from bigsft.pipe import SUPPORTED, WeightSource, hf_name, pipeline_inputs, pipeline_problems

import tiny


def config(spec: dict):
    raw = dict(spec)
    return AutoConfig.for_model(raw.pop("model_type"), vocab_size=400, **raw)


def problems(hf_config, **kw):
    args = {"stages": 2, "task": "causal_lm", "from_config": False, "model_dir": None, "gradient_checkpointing": False,
            "partition": "parameters", **kw}
    return pipeline_problems(hf_config, **args)


def test_supported_families_pass():
    for spec in (tiny.LLAMA, tiny.QWEN2, tiny.GPT2, {**tiny.LLAMA, "model_type": "mistral"}):
        assert problems(config(spec)) == []
    assert problems(config(tiny.LLAMA), stages=1, task="sequence_classification") == []  # no pipeline, no rules


@pytest.mark.parametrize(("spec", "kw", "message"), [
    ({"model_type": "bert"}, {}, "architecture 'bert' is not supported; supported: " + ", ".join(SUPPORTED)),
    (tiny.LLAMA, {"task": "sequence_classification"}, "trains causal LMs only"),
    (tiny.LLAMA, {"from_config": True}, "loads weights stage by stage from model.name_or_path"),
    (tiny.LLAMA, {"gradient_checkpointing": True}, "use pipeline.activation_checkpoint_interval instead"),
    (tiny.LLAMA, {"stages": 3}, "3 stages for 2 decoder layers"),
    (tiny.LLAMA, {"partition": "balanced"}, "pipeline.partition: 'balanced'"),
])
def test_bad_pipeline_configs(spec, kw, message):
    assert any(message in p for p in problems(config(spec), **kw))


def test_non_safetensors_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert any("reads safetensors stage by stage" in p for p in problems(config(tiny.LLAMA), model_dir=str(tmp_path)))


def test_hf_names_of_pipeline_layers():
    llama, gpt2 = config(tiny.LLAMA), config(tiny.GPT2)
    assert hf_name(llama, 0, "embed.weight") == "model.embed_tokens.weight"
    assert hf_name(llama, 2, "layer.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert hf_name(llama, 3, "norm.weight") == "model.norm.weight"
    assert hf_name(llama, 4, "head.weight") == "lm_head.weight"
    assert hf_name(gpt2, 0, "positions.weight") == "transformer.wpe.weight"
    assert hf_name(gpt2, 1, "layer.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert hf_name(gpt2, 4, "embed.weight") is None  # the tied head: the first stage's embedding


def test_padded_batches_travel_as_segments():
    batch = Batch({"input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]),
                   "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}, torch.zeros(2, 5), 0, 0)
    (_, positions), _ = pipeline_inputs(batch)
    assert positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_weight_source_reads_only_the_prefix_asked_for(tmp_path, shard, monkeypatch):
    import safetensors

    read = []
    real_open = safetensors.safe_open

    class RecordingOpen:  # every tensor taken from a checkpoint file
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", RecordingOpen)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(tiny.LLAMA))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    source = WeightSource(tmp_path)
    if shard:
        assert len(source.files) > 1
    layer = source.tensors("model.layers.1")
    assert set(layer) == {k.removeprefix("model.layers.1.") for k in model.state_dict() if k.startswith("model.layers.1.")}
    assert read and all(k.startswith("model.layers.1.") for k in read)
    assert torch.equal(layer["mlp.up_proj.weight"], model.state_dict()["model.layers.1.mlp.up_proj.weight"])
