"""Splits: read sources, parse, tokenize, count what was skipped; then serve rank-local batches.

Training order is a pure function of (seed, epoch, step): the global batch of optimizer step s is
the same set of samples whatever the data-parallel world size, each rank takes a disjoint slice of
it, and a resumed run can jump to any step without replaying the ones before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bigsft.config import ConfigError, DataSource
from bigsft.data.batching import Batch, collate
from bigsft.data.formats import PARSERS, BadRecordError, Example, Labeled
from bigsft.data.sources import BadRecord, read_source
from bigsft.data.tokenize import Sample

REPORTED_BAD_RECORDS = 5


@dataclass
class SplitStats:
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_bad: list[str] = field(default_factory=list)

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason.split(" (")[0]] += 1
        if len(self.first_bad) < REPORTED_BAD_RECORDS:
            self.first_bad.append(f"{location}: {reason}")

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(1, self.records)


def read_examples(sources: Sequence[DataSource], split: str, stats: SplitStats) -> list[tuple[Example, str]]:
    """Parsed examples with their `file:line`; unusable records counted in `stats`."""
    examples: list[tuple[Example, str]] = []
    for i, source in enumerate(sources):
        parse = PARSERS[source.format]
        for item in read_source(source, f"data.{split}[{i}]"):
            stats.records += 1
            if isinstance(item, BadRecord):
                stats.skip(item.reason, item.location)
                continue
            try:
                examples.append((parse(item.fields, source.columns), item.location))
            except BadRecordError as e:
                stats.skip(str(e), item.location)
    return examples


def label_names(examples: Sequence[tuple[Example, str]], configured: Sequence[str] | None) -> list[str] | None:
    """Class names in id order: the configured ones, else the sorted names seen in the data."""
    if configured:
        return list(configured)
    names = {ex.label for ex, _ in examples if isinstance(ex, Labeled) and isinstance(ex.label, str)}
    return sorted(names) if names else None


def build_samples(examples: Sequence[tuple[Example, str]], build: Callable[[Example], Sample],
                  stats: SplitStats) -> list[Sample]:
    samples = []
    for ex, location in examples:
        try:
            samples.append(build(ex))
        except BadRecordError as e:
            stats.skip(str(e), location)
    return samples


def check_bad_fraction(stats: SplitStats, split: str, max_bad_fraction: float) -> None:
    if stats.records == 0:
        raise ConfigError(f"data.{split}: the sources hold no records")
    if stats.bad_fraction > max_bad_fraction:
        counts = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.most_common())
        first = "; ".join(stats.first_bad)
        raise ConfigError(
            f"data.{split}: {sum(stats.skipped.values())} of {stats.records} records are unusable "
            f"({stats.bad_fraction:.1%} > data.max_bad_fraction={max_bad_fraction}): {counts}. First: {first}"
        )


class TrainBatches:
    """This rank's micro-batches for each optimizer step, by step index, epoch after epoch."""

    def __init__(self, samples: Sequence[Sample], *, micro_batch_size: int, gradient_accumulation_steps: int,
                 dp_rank: int, dp_size: int, seed: int, pad_id: int, pad_to_multiple_of: int | None = None):
        self.samples = samples
        self.micro = micro_batch_size
        self.accum = gradient_accumulation_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * dp_size
        if len(samples) < self.global_batch_size:
            raise ConfigError(
                f"data.train: {len(samples)} usable samples, fewer than one global batch of {self.global_batch_size} "
                "(train.micro_batch_size × gradient_accumulation_steps × data-parallel world); add data or shrink it"
            )
        # Incomplete last global batch of an epoch is dropped: every step sees a full batch.
        self.steps_per_epoch = len(samples) // self.global_batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.samples)))
        return self._order[1]

    def window(self, step: int) -> list[Batch]:
        """The micro-batches this rank runs for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        per_rank = self.micro * self.accum
        start = k * self.global_batch_size + self.dp_rank * per_rank
        chosen = [self.samples[i] for i in self._epoch_order(epoch)[start : start + per_rank]]
        # Micro-batches of similar length waste less padding; the step's gradient is unchanged because
        # the loss is normalized over the whole window.
        chosen.sort(key=lambda s: len(s.input_ids))
        return [
            collate(chosen[j : j + self.micro], pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
            for j in range(0, per_rank, self.micro)
        ]


def eval_shard(samples: Sequence[Sample], *, micro_batch_size: int, rank: int, world_size: int,
               pad_id: int, pad_to_multiple_of: int | None = None) -> list[Batch]:
    """This rank's eval batches: every sample on exactly one rank (strided), world size need not divide."""
    mine = list(samples[rank::world_size])
    return [
        collate(mine[j : j + micro_batch_size], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
        for j in range(0, len(mine), micro_batch_size)
    ]
