"""The streaming pipeline, and its exact state.

    SourceReader (this rank's records, epoch after epoch)
      -> parse + tokenize (bad records counted, never fatal one by one)
      -> shuffle buffer (bounded; drained at each epoch end so epochs stay whole)
    MixedStream: sources drawn by weight with a seeded generator
    TrainStream: samples -> packed rows or padded samples -> a global window per optimizer step, dealt
                 out to the data-parallel ranks

Everything that decides what comes next (reader positions, buffers, generator states, the open
packing rows) is in `state_dict()`, a JSON-able dict: a stream restored from it yields exactly the
batches the original would have yielded next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from bigsft.batch_math import BatchMath
from bigsft.config import DataSource
from bigsft.data.batching import Batch, Packer, collate, collate_packed
from bigsft.data.cache import cached_samples
from bigsft.data.formats import parser_for
from bigsft.data.scan import SplitStats, parse_records, usable_samples
from bigsft.data.sources import EPOCH_END, DataError, Holdout, SourceReader, list_files
from bigsft.data.tokenize import IGNORE, Sample, SampleBuilder


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


class SourceStream:
    """One source's samples: parsed, tokenized (in chunks), shuffled through a bounded buffer.

    With `shuffle` off the buffer is first-in first-out: records come out in reading order.
    """

    def __init__(self, reader: SourceReader, build: SampleBuilder, stats: SplitStats, *, buffer_size: int, seed: int,
                 shuffle: bool = True):
        self.reader = reader
        self.parse = parser_for(reader.source)
        self.columns = reader.source.columns
        self.build = build
        self.stats = stats
        self.buffer_size = max(1, buffer_size)
        # Refill in chunks (one batched tokenizer call each) once this many samples have left the buffer.
        self.chunk = max(1, min(64, self.buffer_size // 2))
        self.shuffle = shuffle
        self.rng = np.random.default_rng([seed, reader.index, reader.dp_rank, 11])
        self.buffer: list[Sample] = []
        self.draining = False
        self.finished = False
        self.completed_epochs = 0
        self.epoch_samples = 0

    def _add_chunk(self) -> None:
        items = []
        while len(items) < self.chunk:
            item = self.reader.next()
            if item is None or item is EPOCH_END:
                self.draining = True
                self.finished = item is None
                break
            items.append(item)
        self.stats.records += len(items)
        if self.reader.cache:  # records of a tokenized cache: samples read from its arrays
            samples = cached_samples(items, self.stats)
        else:
            examples, where = parse_records(items, self.parse, self.columns, self.stats)
            samples = usable_samples(self.build.build_many(examples), where, self.stats)
        for sample in samples:
            self.buffer.append(sample)
            self.epoch_samples += 1

    def next(self) -> Sample | None:
        """The next sample, or None when there is none left (a finished single pass, an empty shard)."""
        while True:
            while not self.draining and len(self.buffer) <= self.buffer_size - self.chunk:
                self._add_chunk()
            if self.buffer:
                if not self.shuffle:
                    return self.buffer.pop(0)
                j = int(self.rng.integers(len(self.buffer)))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                return self.buffer.pop()
            if self.finished:
                return None
            self.draining = False
            self.completed_epochs += 1
            if self.epoch_samples == 0:  # a whole epoch without one usable sample on this rank
                self.finished = True
                return None
            self.epoch_samples = 0

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "buffer": [s.to_state() for s in self.buffer],
                "rng": _rng_state(self.rng), "draining": self.draining, "finished": self.finished,
                "completed_epochs": self.completed_epochs, "epoch_samples": self.epoch_samples}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.buffer = [Sample.from_state(s) for s in state["buffer"]]
        _set_rng_state(self.rng, state["rng"])
        self.draining, self.finished = state["draining"], state["finished"]
        self.completed_epochs, self.epoch_samples = state["completed_epochs"], state["epoch_samples"]


class MixedStream:
    """Samples drawn from several sources with probabilities proportional to their weights."""

    def __init__(self, streams: Sequence[SourceStream], weights: Sequence[float], *, seed: int):
        self.streams = list(streams)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.rng = np.random.default_rng([seed, 13])
        self.active = [True] * len(self.streams)
        self.drawn = [0] * len(self.streams)

    def next(self) -> Sample | None:
        while any(self.active):
            if len(self.streams) == 1:
                i = 0
            else:
                p = self.weights * np.asarray(self.active)
                i = int(self.rng.choice(len(self.streams), p=p / p.sum()))
            sample = self.streams[i].next()
            if sample is None:
                self.active[i] = False
                continue
            self.drawn[i] += 1
            return sample
        return None

    def epochs_completed(self) -> int:
        """Epochs every source has completed on this rank."""
        return min(s.completed_epochs for s in self.streams)

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams], "rng": _rng_state(self.rng),
                "active": list(self.active), "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        _set_rng_state(self.rng, state["rng"])
        self.active, self.drawn = list(state["active"]), list(state["drawn"])


class TrainStream:
    """This rank's micro-batches, one window of `batch.gradient_accumulation_steps` micro-batches per
    optimizer step: a window is always that long (the loop and the pipeline engine rely on it).

    Every rank runs the same global stream (same records, shuffle, packing) and takes its share of each
    global batch: the samples of an optimizer step do not depend on how many ranks share them, so a run
    on 1 rank with 4 accumulation steps trains on exactly the data of 2 ranks with 2, and a data state
    saved on one world size resumes on another.
    """

    def __init__(self, mixed: MixedStream, *, batch: BatchMath, dp_rank: int, pad_id: int,
                 pad_to_multiple_of: int | None = None, packer: Packer | None = None):
        self.mixed = mixed
        self.micro = batch.micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, batch.data_parallel_size
        self.global_units = batch.global_batch_size
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.packer = packer
        self.ready: list[list[Sample]] = []  # packed rows waiting for a window

    def _next_sample(self) -> Sample:
        sample = self.mixed.next()
        if sample is None:
            raise DataError("data.train: no usable training sample (every record skipped?)")
        return sample

    def next_global_window(self) -> list[Sample] | list[list[Sample]]:
        """All ranks' samples (or packed rows) of the next optimizer step, shortest first."""
        units = self.global_units
        if self.packer is None:
            items = [self._next_sample() for _ in range(units)]
            items.sort(key=lambda s: len(s.input_ids))
            return items
        while len(self.ready) < units:
            self.ready.extend(self.packer.add(self._next_sample()))
        rows, self.ready = self.ready[:units], self.ready[units:]
        rows.sort(key=lambda row: sum(len(s.input_ids) for s in row))
        return rows

    def next_window(self) -> list[Batch]:
        # Dealing the length-sorted window round-robin gives every rank a similar share of long and short
        # samples (ranks wait for the slowest), and each micro-batch similar lengths (less padding). The
        # step's gradient is unchanged: the loss is normalized over the whole global window.
        mine = self.next_global_window()[self.dp_rank :: self.dp_size]
        pack = collate_packed if self.packer is not None else collate
        return [pack(mine[j : j + self.micro], pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
                for j in range(0, len(mine), self.micro)]

    def state_dict(self) -> dict:
        return {"mixed": self.mixed.state_dict(), "packer": self.packer.state_dict() if self.packer else None,
                "ready": [[s.to_state() for s in row] for row in self.ready]}

    def load_state_dict(self, state: dict) -> None:
        if "planned" in state:
            raise DataError(f"the checkpoint's data position is row {state['planned']['row']} of data plan "
                            f"{state['planned']['key']}, which this run does not read (its tokenized cache or plan "
                            "is missing or stale); rerun `bigsft data prepare CONFIG` with the run's config")
        self.mixed.load_state_dict(state["mixed"])
        if self.packer is not None:
            self.packer.load_state_dict(state["packer"])
        self.ready = [[Sample.from_state(s) for s in row] for row in state["ready"]]


def source_names(sources: Sequence[DataSource]) -> list[str]:
    names = []
    for i, s in enumerate(sources):
        first = s.path[0] if isinstance(s.path, list) else s.path
        name = s.name or first.rstrip("/").rsplit("/", 1)[-1].split(".")[0] or f"source{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def source_streams(sources: Sequence[DataSource], split: str, build: SampleBuilder, stats: SplitStats, *, seed: int,
                   dp_rank: int, dp_size: int, train: bool, buffer_size: int,
                   holdouts: Sequence[Holdout | None] = (), caches: Sequence[dict | None] = ()) -> list[SourceStream]:
    """One stream per source: all records for training (every rank runs the global stream), this rank's
    records (k % dp_size == dp_rank) for a single pass of evaluation. `holdouts[i]`: which of source i's
    records its reader passes over (data.validation); `caches[i]`: source i's tokenized cache entries by file."""
    streams = []
    for i, source in enumerate(sources):
        reader = SourceReader(source, list_files(source, f"data.{split}[{i}]"), seed=seed, index=i, dp_rank=dp_rank,
                              dp_size=dp_size, shuffle_files=train, cycle=train,
                              holdout=holdouts[i] if i < len(holdouts) else None,
                              cache=caches[i] if i < len(caches) else None)
        streams.append(SourceStream(reader, build, stats, buffer_size=buffer_size, seed=seed, shuffle=train))
    return streams


def batches_once(streams: Sequence[SourceStream], *, micro_batch_size: int, pad_id: int,
                 pad_to_multiple_of: int | None = None, packer: Packer | None = None) -> Iterator[Batch]:
    """One pass over this rank's share of the eval sources, in order."""

    def samples() -> Iterator[Sample]:
        for s in streams:
            while (sample := s.next()) is not None:
                yield sample

    if packer is None:
        chunk: list[Sample] = []
        for sample in samples():
            chunk.append(sample)
            if len(chunk) == micro_batch_size:
                yield collate(chunk, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
                chunk = []
        if chunk:
            yield collate(chunk, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
        return
    rows: list[list[Sample]] = []
    for sample in samples():
        rows.extend(packer.add(sample))
        while len(rows) >= micro_batch_size:
            yield collate_packed(rows[:micro_batch_size], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
            rows = rows[micro_batch_size:]
    rows.extend(packer.flush())
    for j in range(0, len(rows), micro_batch_size):
        yield collate_packed(rows[j : j + micro_batch_size], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def dummy_batch(*, per_token: bool, pad_id: int, span: bool = False, decoder: bool = False) -> Batch:
    """A two-token batch that carries no loss: for ranks that ran out of eval data while others have not.
    `per_token`: [1, 2] targets, all ignored; `span` (extractive QA): a [1, 2] start / end pair; `decoder`
    (seq2seq): two decoder input tokens too."""
    import torch

    if per_token:
        targets = torch.full((1, 2), IGNORE, dtype=torch.long)
    else:
        targets = torch.zeros((1, 2) if span else (1,), dtype=torch.long)
    inputs = {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    if decoder:
        inputs["decoder_input_ids"] = torch.full((1, 2), pad_id, dtype=torch.long)
    return Batch(inputs, targets, 0, 0, 0)
