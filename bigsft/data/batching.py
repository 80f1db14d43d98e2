"""Samples -> tensors: padded micro-batches, or packed rows with position ids restarting per sample.

Padded batches are padded to their own longest sample, never to max_length. Packed rows carry
`position_ids` and no attention mask: transformers then builds a block-diagonal causal mask from the
position ids (flash-attention uses varlen kernels), so no token attends across a sample boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigsft.data.tokenize import IGNORE, Sample


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    """Model inputs: input_ids with attention_mask (padded) or position_ids (packed); seq2seq adds
    decoder_input_ids."""
    targets: torch.Tensor
    """[B, T] shifted next-token targets (-100: no loss) for causal LMs, [B, T] tags for taggers, [B] class
    ids for classifiers, [B, 2] answer start and end tokens for extractive QA, [B, T_target] the decoder's
    targets for seq2seq."""
    num_targets: int
    """Trained units in this batch: labeled tokens (causal LM) or examples (classification)."""
    num_tokens: int
    """Non-pad input tokens."""
    num_samples: int = 0
    """Samples in the batch (several per row when packed)."""
    attention_pairs: int = 0
    """Sum over samples of length squared: what causal attention costs, for FLOP counts."""
    meta: list[dict] | None = None
    """Extractive QA eval: each window's `Sample.meta`."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.targets.to(device),
                     self.num_targets, self.num_tokens, self.num_samples, self.attention_pairs, self.meta)

    @property
    def num_positions(self) -> int:
        return int(self.inputs["input_ids"].numel())


def _round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


def collate(samples: list[Sample], *, pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    longest = _round_up(max(len(s.input_ids) for s in samples), pad_to_multiple_of)
    n = len(samples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    with_types = samples[0].token_type_ids is not None
    token_type_ids = torch.zeros((n, longest), dtype=torch.long) if with_types else None
    per_token = not isinstance(samples[0].targets, int)
    encoder_targets = per_token and samples[0].decoder_input_ids is None
    targets = torch.full((n, longest), IGNORE, dtype=torch.long) if per_token else torch.empty(n, dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s.input_ids)
        input_ids[i, :length] = torch.tensor(s.input_ids)
        attention_mask[i, :length] = 1
        if token_type_ids is not None:
            token_type_ids[i, :length] = torch.tensor(s.token_type_ids)
        if encoder_targets:
            targets[i, :length] = torch.tensor(s.targets)
        elif not per_token:
            targets[i] = s.targets
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    pairs = sum(len(s.input_ids) ** 2 for s in samples)
    num_tokens = int(attention_mask.sum())
    if samples[0].decoder_input_ids is not None:  # seq2seq: the decoder's inputs and targets, padded on their own
        inputs["decoder_input_ids"], targets = _decoder_side(samples, pad_id, pad_to_multiple_of)
        num_tokens += sum(len(s.targets) for s in samples)
        pairs += sum(len(s.targets) ** 2 + 2 * len(s.targets) * len(s.input_ids) for s in samples)
    num_targets = int((targets != IGNORE).sum()) if per_token else n
    meta = None
    if samples[0].span_end is not None:  # extractive QA: [start, end] per window
        targets = torch.stack([targets, torch.tensor([s.span_end for s in samples])], dim=1)
        meta = [s.meta for s in samples] if samples[0].meta is not None else None
    return Batch(inputs, targets, num_targets, num_tokens, n, pairs, meta)


def _decoder_side(samples: list[Sample], pad_id: int, pad_to_multiple_of: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T_target] decoder inputs (pad after the end) and targets (-100 after the end). The decoder is causal,
    so the padding after a target never reaches its positions: no decoder mask is needed."""
    longest = _round_up(max(len(s.targets) for s in samples), pad_to_multiple_of)
    decoder_input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        decoder_input_ids[i, : len(s.targets)] = torch.tensor(s.decoder_input_ids)
        targets[i, : len(s.targets)] = torch.tensor(s.targets)
    return decoder_input_ids, targets


def collate_packed(rows: list[list[Sample]], *, pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """Rows of several samples each; position ids restart at 0 for every sample (and for the padding)."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    longest = _round_up(max(lengths), pad_to_multiple_of)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    targets = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[i, at : at + n] = torch.tensor(s.input_ids)
            targets[i, at : at + n] = torch.tensor(s.targets)
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        position_ids[i, at:] = torch.arange(longest - at)  # padding is its own segment, never attended to
    return Batch({"input_ids": input_ids, "position_ids": position_ids}, targets,
                 int((targets != IGNORE).sum()), sum(lengths), sum(len(row) for row in rows),
                 sum(len(s.input_ids) ** 2 for row in rows for s in row))


class Packer:
    """First-fit packing of samples into rows of at most `max_length` tokens, over a few open rows.

    A sample goes into the first open row with room; when none has room and `open_rows` rows are open,
    the fullest is closed. Rows come out in a deterministic order, and the open rows are part of the
    data state saved with checkpoints.
    """

    def __init__(self, max_length: int, open_rows: int = 16):
        self.max_length = max_length
        self.open_rows = open_rows
        self.rows: list[list[Sample]] = []
        self.lengths: list[int] = []

    def add(self, sample: Sample) -> list[list[Sample]]:
        n = len(sample.input_ids)
        for i, used in enumerate(self.lengths):
            if used + n <= self.max_length:
                self.rows[i].append(sample)
                self.lengths[i] += n
                return [self._close(i)] if self.lengths[i] == self.max_length else []
        closed = []
        if len(self.rows) >= self.open_rows:
            closed.append(self._close(max(range(len(self.rows)), key=self.lengths.__getitem__)))
        self.rows.append([sample])
        self.lengths.append(n)
        return closed

    def _close(self, i: int) -> list[Sample]:
        self.lengths.pop(i)
        return self.rows.pop(i)

    def flush(self) -> list[list[Sample]]:
        rows, self.rows, self.lengths = self.rows, [], []
        return rows

    def state_dict(self) -> dict:
        return {"rows": [[s.to_state() for s in row] for row in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [[Sample.from_state(s) for s in row] for row in state["rows"]]
        self.lengths = [sum(len(s.input_ids) for s in row) for row in self.rows]
