"""Sequence parallelism (DeepSpeed Ulysses): each row of a micro-batch is split along the sequence over the
N ranks of a sequence-parallel group, and attention trades sequence shards for head shards.

    rank r of a group holds tokens [r·T/N, (r+1)·T/N) of every row: embeddings, MLPs, norms, the LM head
    and the loss run on that shard only (activations / N)
    attention: all-to-all q, k, v -> every rank has the whole sequence for heads/N heads -> the model's own
    attention (sdpa, flash-attention) -> all-to-all back to sequence shards

DeepSpeed's `UlyssesSPAttentionHF` does the all-to-alls around transformers' attention function. It
drops transformers' attention mask (built for the local shard) and hands the attention the whole row's
position ids instead. Flash-attention finds packed samples from those position ids; sdpa does not, so
for sdpa `block_causal_mask` rebuilds the packed rows' block-diagonal causal mask from them. Without it
a packed sample would attend to the samples packed before it.

Gradients: each rank backpropagates the sum of its shard's losses. The all-to-alls carry the gradients
of q, k and v back to the ranks their tokens came from, so the sum of the gradients over a group is the
gradient of the whole rows' loss. DeepSpeed is not told of the groups: it averages the gradients over
every rank (data-parallel × sequence-parallel), and the loss scale accounts for that
(`BatchMath.gradient_ranks`). Checkpoints are those of a plain data-parallel run of the same world size.

Ranks of a group are consecutive (rank = dp_rank · N + sp_rank); every rank of a group reads the same
micro-batches and `shard` keeps its own slice.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch

from bigsft.data.batching import Batch
from bigsft.data.tokenize import IGNORE

SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def head_counts(hf_config) -> tuple[int, int]:
    """(attention heads, key/value heads) of a decoder config; 0 where the config names none."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 0
    kv = getattr(text, "num_key_value_heads", None) or heads
    return int(heads), int(kv)


def sequence_parallel_problems(hf_config, size: int) -> list[str]:
    """Why the model's attention cannot be split over `size` ranks (before launch)."""
    if size <= 1:
        return []
    heads, kv = head_counts(hf_config)
    model_type = getattr(hf_config, "model_type", "?")
    if not heads:
        return [f"sequence_parallel.size: {size}, but the {model_type} config names no attention head count"]
    problems = []
    if heads % size:
        problems.append(f"sequence_parallel.size: {size} does not divide the {model_type} model's "
                        f"{heads} attention heads (num_attention_heads); use a size that divides it")
    if kv % size and size % kv:
        problems.append(f"sequence_parallel.size: {size} and the model's {kv} key/value heads "
                        "(num_key_value_heads) must divide one another")
    return problems


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, T, T] boolean mask (True: may attend) for rows whose samples restart their position ids at 0;
    None when no row holds more than one sample (plain causal attention)."""
    starts = position_ids == 0
    starts[:, 0] = True
    if int(starts.sum()) == position_ids.shape[0]:
        return None
    segment = starts.cumsum(dim=1)
    mask = segment[:, :, None] == segment[:, None, :]
    return mask.tril_()[:, None]  # in place: one [B, T, T] boolean at a time, T² bytes a row at 32k tokens is 1 GiB


def _packed_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None and kwargs.get("position_ids") is not None:
        attention_mask = block_causal_mask(kwargs["position_ids"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


class SequenceParallel:
    """This rank's sequence-parallel group, and the attention wrapper installed for the model's attention
    implementation. The wrapper splits attention over the group only inside `active()` (training and eval
    forwards); generation and export run the stock attention on each rank's whole sequence."""

    def __init__(self, size: int, hf_config, attn_implementation: str):
        import deepspeed.comm as ds_comm
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        world, rank = ds_comm.get_world_size(), ds_comm.get_rank()
        self.size, self.rank = size, rank % size
        group = None
        for first in range(0, world, size):  # every rank creates every group, in the same order
            g = ds_comm.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                group = g
        self.group = group
        heads, kv = head_counts(hf_config)
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        original = ALL_ATTENTION_FUNCTIONS[attn_implementation]
        core = _packed_sdpa if attn_implementation == "sdpa" else original
        self.attention = _attention_class()(
            attn=core, batch_size=1, attn_head_count=heads,
            attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads, kv_head_count=kv,
            num_hidden_layers=text.num_hidden_layers, process_group=group, seq_length_is_variable=True)
        self.attention.core_attn_implementation = attn_implementation
        self._active = False

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if not self._active:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            # transformers built this mask for the local shard; the attention sees the whole row
            return self.attention(module, query, key, value, None, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention

    def check_model(self, model) -> None:
        """The model must run the attention function that was wrapped: transformers may have picked another."""
        from bigsft.config import ConfigError

        running = getattr(model.config, "_attn_implementation", None)
        if running != self.attention.core_attn_implementation:
            raise ConfigError(f"sequence_parallel.size: the model runs {running!r} attention, not "
                              f"{self.attention.core_attn_implementation!r}; set model.attn_implementation to sdpa "
                              "or flash_attention_2 (one this model supports)")

    @contextlib.contextmanager
    def active(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def shard(self, batch: Batch) -> Batch:
        return shard(batch, self.rank, self.size)


@functools.cache
def _attention_class():
    """DeepSpeed's `UlyssesSPAttentionHF`, with the micro-batch size taken from each call (eval batches, a
    last short batch and the dummy batch of an idle rank differ from the training micro-batch)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    class UlyssesAttention(UlyssesSPAttentionHF):
        def forward(self, module, query, *args, **kwargs):
            rows = query.shape[0]
            if rows != self.batch_size:
                self.batch_size = rows
                q, kv, ctx = self.required_query_shape, self.required_key_value_shape, self.required_context_shape
                self.required_query_shape = torch.Size([q[0], rows, *q[2:]])
                self.required_key_value_shape = torch.Size([kv[0], rows, *kv[2:]])
                self.required_context_shape = torch.Size([ctx[0], rows, *ctx[2:]])
            return super().forward(module, query, *args, **kwargs)

    return UlyssesAttention


def shard(batch: Batch, rank: int, size: int) -> Batch:
    """Rank `rank`'s slice of every row of a causal-LM batch, the rows padded to a multiple of `size` first.

    Position ids travel with the slice (a padded batch gets 0..T-1, what transformers would use); targets are
    already shifted, so each slice holds its own tokens' targets. The padding carries no target and, being
    last, is never attended to. A slice counts its own targets, so that summing them over the world counts
    each row's once; the slice of rank 0 carries the batch's tokens, samples and attention pairs."""
    ids = batch.inputs["input_ids"]
    rows, length = ids.shape
    padded = -(-length // size) * size
    extra = padded - length
    position_ids = batch.inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, dtype=torch.long).expand(rows, length)
    targets = batch.targets
    if extra:
        tail = position_ids[:, -1:] + 1 + torch.arange(extra, dtype=torch.long)
        position_ids = torch.cat([position_ids, tail], dim=1)
        ids = torch.cat([ids, ids.new_zeros(rows, extra)], dim=1)
        targets = torch.cat([targets, targets.new_full((rows, extra), IGNORE)], dim=1)
    part = slice(rank * padded // size, (rank + 1) * padded // size)
    local_targets = targets[:, part].contiguous()
    inputs = {"input_ids": ids[:, part].contiguous(), "position_ids": position_ids[:, part].contiguous()}
    first = rank == 0
    return replace(batch, inputs=inputs, targets=local_targets, num_targets=int((local_targets != IGNORE).sum()),
                   num_tokens=batch.num_tokens if first else 0, num_samples=batch.num_samples if first else 0,
                   attention_pairs=batch.attention_pairs if first else 0)
