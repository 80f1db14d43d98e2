"""Sequence parallelism without a process group: how a row is split, the packed mask, the checks before launch."""

from __future__ import annotations

import pytest
import torch

from bigsft.batch_math import batch_math
from bigsft.checkpoint import identity_problems
from bigsft.config import ConfigError, TrainConfig, config_from_dict
from bigsft.data.batching import collate, collate_packed
from bigsft.data.tokenize import IGNORE, Sample
from bigsft.dist import read_launch_env
from bigsft.preflight import preflight
from bigsft.sequence_parallel import block_causal_mask, sequence_parallel_problems, shard


def _sample(n: int, start: int) -> Sample:
    ids = list(range(start, start + n))
    return Sample(input_ids=ids, targets=[IGNORE] * (n // 2) + ids[n // 2 + 1:] + [IGNORE])


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_shards_put_back_together_are_the_padded_rows(size, packed):
    samples = [_sample(5, 10), _sample(3, 20), _sample(6, 30)]
    batch = collate_packed([samples[:2], samples[2:]], pad_id=0) if packed else collate(samples, pad_id=0)
    parts = [shard(batch, r, size) for r in range(size)]
    length = batch.inputs["input_ids"].shape[1]
    padded = -(-length // size) * size
    assert {p.inputs["input_ids"].shape[1] for p in parts} == {padded // size}
    ids = torch.cat([p.inputs["input_ids"] for p in parts], dim=1)
    targets = torch.cat([p.targets for p in parts], dim=1)
    positions = torch.cat([p.inputs["position_ids"] for p in parts], dim=1)
    assert torch.equal(ids[:, :length], batch.inputs["input_ids"])
    assert torch.equal(targets[:, :length], batch.targets)
    assert (targets[:, length:] == IGNORE).all()  # the added padding trains nothing
    if packed:
        assert torch.equal(positions[:, :length], batch.inputs["position_ids"])
    else:  # what transformers gives a right-padded row
        assert torch.equal(positions, torch.arange(padded).expand(3, padded))
    assert "attention_mask" not in parts[0].inputs
    # summed over a group, every count is the batch's once
    assert sum(p.num_targets for p in parts) == batch.num_targets
    for field in ("num_tokens", "num_samples", "attention_pairs"):
        assert [getattr(p, field) for p in parts] == [getattr(batch, field)] + [0] * (size - 1)


def test_block_causal_mask_keeps_packed_samples_apart():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]))
    assert mask.shape == (2, 1, 6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert block_causal_mask(torch.arange(6).expand(2, 6)) is None  # one sample per row: plain causal


def test_sdpa_with_the_mask_is_attention_of_each_sample_alone():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    packed, _ = sdpa_attention_forward(module, q, k, v, block_causal_mask(position_ids))
    alone = [sdpa_attention_forward(module, q[:, :, s], k[:, :, s], v[:, :, s], None)[0]
             for s in (slice(0, 4), slice(4, 7))]
    assert torch.allclose(packed, torch.cat(alone, dim=1), atol=1e-6)


class _Config:
    model_type = "llama"

    def __init__(self, heads, kv):
        self.num_attention_heads, self.num_key_value_heads = heads, kv


@pytest.mark.parametrize(("heads", "kv", "size", "fragment"), [
    (4, 2, 2, None), (8, 2, 4, None), (32, 8, 16, None),
    (4, 4, 3, "3 does not divide the llama model's 4 attention heads"),
    (12, 3, 2, "the model's 3 key/value heads (num_key_value_heads) must divide"),
])
def test_head_counts_must_split_over_the_group(heads, kv, size, fragment):
    problems = sequence_parallel_problems(_Config(heads, kv), size)
    assert (problems == []) if fragment is None else any(fragment in p for p in problems), problems


def _raw(tmp_path, **extra) -> dict:
    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    raw = {"output_dir": str(tmp_path / "out"),
           "model": {"task": "causal_lm", "tokenizer": "unused",
                     "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 64}},
           "data": {"train": [{"path": str(train), "format": "alpaca"}]}, "sequence_parallel": {"size": 2}}
    for key, value in extra.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"pipeline__stages": 2}, "does not combine with pipeline.stages"),
    ({"model__attn_implementation": "eager"}, "'eager' cannot run sequence-parallel"),
    ({"sequence_parallel__size": 0}, "sequence_parallel.size: 0; must be >= 1"),
])
def test_configs_that_cannot_run_sequence_parallel(tmp_path, extra, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(_raw(tmp_path, **extra))


def test_only_causal_lms_split_their_rows(tmp_path):
    raw = _raw(tmp_path)
    raw["model"].update(task="sequence_classification", num_labels=2)
    raw["data"]["train"][0]["format"] = "classification"
    with pytest.raises(ConfigError, match="model.task is sequence_classification"):
        config_from_dict(raw)


def test_preflight_sizes_the_batch_and_deepspeed_counts_every_rank(tmp_path):
    world4 = read_launch_env({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "29500"})
    raw = _raw(tmp_path, train__micro_batch_size=2, train__global_batch_size=8)
    pre = preflight(config_from_dict(raw), world4)
    bm = pre.batch
    assert (bm.data_parallel_size, bm.sequence_parallel, bm.gradient_accumulation_steps) == (2, 2, 2)
    assert bm.world_size == 4 and bm.gradient_ranks == 4
    assert [bm.data_parallel_rank(r) for r in range(4)] == [0, 0, 1, 1]  # a group's ranks are consecutive
    assert "4 = 2 data-parallel × 2 sequence-parallel" in bm.describe()
    # DeepSpeed, not told of the groups, sees 4 data-parallel ranks of micro 2 × accumulation 2
    assert pre.ds["train_batch_size"] == 16
    assert pre.identity["sequence_parallel"] == 2 and pre.identity["data_parallel_size"] == 2

    heads3 = _raw(tmp_path, sequence_parallel__size=3)
    with pytest.raises(ConfigError) as info:
        preflight(config_from_dict(heads3), read_launch_env({**{"WORLD_SIZE": "3"}, "RANK": "0", "LOCAL_RANK": "0",
                                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}))
    assert "3 does not divide the llama model's 4 attention heads (num_attention_heads)" in str(info.value)


def test_world_size_must_be_a_multiple_of_the_group():
    _, errors = batch_math(TrainConfig(micro_batch_size=1), world_size=3, pipeline_stages=1, sequence_parallel=2)
    assert errors == ["sequence_parallel.size: 2 does not divide the world size 3"]


@pytest.mark.parametrize(("saved", "current", "changed"), [
    ((2, 1), (1, 2), False),  # the same 2 ranks, regrouped: DeepSpeed's partitions are the same
    ((2, 2), (2, 1), True),
    ((2, None), (2, 1), False),  # a checkpoint from before sequence parallelism
])
def test_resume_converts_when_deepspeeds_rank_count_changes(tmp_path, saved, current, changed):
    def identity(dp, sp):
        return {"data_parallel_size": dp, **({"sequence_parallel": sp} if sp else {})}

    problems, world_changed = identity_problems(identity(*saved), identity(*current), tmp_path)
    assert problems == [] and world_changed is changed
