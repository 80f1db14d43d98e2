"""Samples -> padded tensors. Each micro-batch is padded to its own longest sample, never to max_length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigsft.data.tokenize import IGNORE, Sample


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    """Model inputs: input_ids, attention_mask (and token_type_ids for encoders that use them)."""
    targets: torch.Tensor
    """[B, T] shifted next-token targets (-100: no loss) for causal LMs, [B] class ids for classifiers."""
    num_targets: int
    """Trained units in this batch: labeled tokens (causal LM) or examples (classification)."""
    num_tokens: int
    """Non-pad input tokens."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.targets.to(device),
                     self.num_targets, self.num_tokens)


def collate(samples: list[Sample], *, pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    longest = max(len(s.input_ids) for s in samples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(samples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    with_types = samples[0].token_type_ids is not None
    token_type_ids = torch.zeros((n, longest), dtype=torch.long) if with_types else None
    per_token = not isinstance(samples[0].targets, int)
    targets = torch.full((n, longest), IGNORE, dtype=torch.long) if per_token else torch.empty(n, dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s.input_ids)
        input_ids[i, :length] = torch.tensor(s.input_ids)
        attention_mask[i, :length] = 1
        if token_type_ids is not None:
            token_type_ids[i, :length] = torch.tensor(s.token_type_ids)
        if per_token:
            targets[i, :length] = torch.tensor(s.targets)
        else:
            targets[i] = s.targets
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    num_targets = int((targets != IGNORE).sum()) if per_token else n
    return Batch(inputs, targets, num_targets, int(attention_mask.sum()))
