"""The data plan: the global stream's order of packed rows (or samples), worked out once by `bigsft data prepare`,
so that a rank's data work per step no longer grows with the number of ranks.

Every rank runs the same global stream and keeps its share of each window (bigsft.data.stream): with text,
or even with the tokenized cache, each rank walks every record of the global window (read, shuffle buffer,
mixing, packing) to find its own rows, so its cost per step grows with the world size. The order of rows does
not depend on the world size or the batch size: windows are consecutive runs of rows, sorted by length and
dealt round-robin. So `bigsft data prepare` walks the stream once, over the cached samples' lengths only, with
the run's seed, shuffle buffer, weights and packing, and stores each row's samples. A rank then takes window w's
rows from the plan, sorts their lengths (numpy) and reads only its own rows' tokens: per step it touches the
global window's row lengths (a few bytes each, in C) and its own samples, nothing else.

The walk that makes the plan is the stream's own code (SourceStream, MixedStream, Packer) over the cache, so a
planned stream yields exactly the batches of the walked one: the same rows, in the same windows, on the same
ranks. The plan also keeps, after each row, the data counters (records, samples, bad records by reason) and
the draws per source, so logs and checkpoints say what the walked stream would. A checkpoint's data position
is then a row number; it resumes on any world size with the same plan. A run whose plan is missing or too
short walks the stream as before (the same batches, at the old cost) and says so.

    <cache_dir>/plans/<key>/   key: the cache entries of every training file, seed, weights, shuffle buffer,
                                packing and max_length, data.validation's hold-out
        meta.json               rows, samples, the entries (by key) that refs index
        row_starts.npy          int64 [R+1]: each row's first ref
        refs.npy                int64 [S]: entry << 40 | sample number in the entry
        lengths.npy             int64 [R]: tokens per row (what windows sort by)
        counters.npy            int64 [R, 4 + sources]: records, samples, truncated, completed epochs, draws per
                                source, after each row
        bad.json                [[row, skipped, first_bad]]: the bad-record counters where they change
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bigsft.batch_math import BatchMath
from bigsft.data.batching import Batch, collate, collate_packed
from bigsft.data.cache import CacheEntry, digest, mapped
from bigsft.data.scan import SplitStats
from bigsft.data.tokenize import Sample
from bigsft.errors import DataError

PLAN_FORMAT = 1
SAMPLE_BITS = 40


@dataclass(frozen=True, slots=True)
class RefSample(Sample):
    """A cached sample's length and where it is, for planning: `input_ids` is a range of its length."""

    ref: int = -1


def plan_key(data, run_data, seed: int) -> str | None:
    """The key of the plan of this run's training stream, None when a source is not read from the cache."""
    if not run_data.caches or any(c is None for c in run_data.caches):
        return None
    return digest({"format": PLAN_FORMAT, "seed": seed, "weights": run_data.weights,
                    "entries": [[e.dir.name for e in c.values()] for c in run_data.caches],
                    "shuffle_buffer": data.shuffle_buffer, "packing": data.packing, "max_length": data.max_length,
                    "holdout": run_data.holdout_thresholds})


class _LightEntry:
    """A cache entry whose samples are lengths and refs (no tokens): what the planning walk reads."""

    def __init__(self, entry: CacheEntry, index: int):
        self.entry, self.base = entry, index << SAMPLE_BITS
        self.meta, self.records, self.bad = entry.meta, entry.records, entry.bad
        self.lengths = np.diff(entry.id_starts).tolist()
        self.truncated = entry.truncated.tolist()

    def iter_records(self, start: int):
        for line, offset, record in self.entry.iter_records(start):
            yield line, offset, type(record)(self, record.record)

    def sample(self, k: int) -> RefSample:
        return RefSample(range(self.lengths[k]), 0, truncated=self.truncated[k], ref=self.base | k)


def build_plan(data, run_data, cache_dir: str, *, seed: int, rows_needed: int = 0, epochs: int = 1) -> Path | None:
    """Walk the training stream over the cache and write its plan (kept when a complete one is there): rows until
    every source has been through `epochs` times (and a tenth more, at least 64 rows, so that the window in which
    the last epoch ends is in it) and at least `rows_needed` rows exist. None without a cache."""
    from bigsft.data import train_stream

    key = plan_key(data, run_data, seed)
    if key is None:
        return None
    directory = Path(cache_dir) / "plans" / key
    if (directory / "meta.json").is_file():
        return directory
    entries = [e for c in run_data.caches for e in c.values()]
    light, index = [], 0
    for c in run_data.caches:
        light.append({path: _LightEntry(e, index + i) for i, (path, e) in enumerate(c.items())})
        index += len(c)
    walk_data = replace(run_data, caches=light)
    stats = SplitStats()
    one = BatchMath(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=1)
    stream = train_stream(data, walk_data, stats, seed=seed, batch=one, dp_rank=0, pad_id=0, planned=False)
    row_starts, refs, lengths, counters, bad = [0], [], [], [], []
    last_bad = None
    n_sources = len(data.train)
    end = None  # rows past the last epoch's end: the window that ends the epoch is whole in the plan (if not huge)
    while end is None or len(lengths) < max(rows_needed, end):
        if end is None and stream.mixed.epochs_completed() >= epochs:
            end = len(lengths) + max(64, len(lengths) // 10)
            continue
        [unit] = stream.next_global_window()
        row = unit if isinstance(unit, list) else [unit]
        refs += [s.ref for s in row]
        row_starts.append(len(refs))
        lengths.append(sum(len(s.input_ids) for s in row))
        counters.append([stats.records, stats.samples, stats.truncated, stream.mixed.epochs_completed(),
                         *stream.mixed.drawn[:n_sources]])
        if stats.bad != last_bad:
            last_bad = stats.bad
            bad.append([len(lengths) - 1, dict(stats.skipped), list(stats.first_bad)])
    tmp = directory.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "row_starts.npy", np.asarray(row_starts, dtype=np.int64))
    np.save(tmp / "refs.npy", np.asarray(refs, dtype=np.int64))
    np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    np.save(tmp / "counters.npy", np.asarray(counters, dtype=np.int64).reshape(len(lengths), 4 + n_sources))
    (tmp / "bad.json").write_text(json.dumps(bad, ensure_ascii=False))
    (tmp / "meta.json").write_text(json.dumps({
        "format": PLAN_FORMAT, "key": key, "rows": len(lengths), "samples": len(refs), "epochs": epochs,
        "packing": data.packing, "entries": [e.dir.name for e in entries]}, indent=1) + "\n")
    try:
        os.rename(tmp, directory)
    except OSError:  # written meanwhile by another process: the same plan
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


class Plan:
    def __init__(self, directory: Path, entries: list[CacheEntry]):
        self.dir = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        if self.meta.get("format") != PLAN_FORMAT or self.meta["entries"] != [e.dir.name for e in entries]:
            raise ValueError("written for other cache entries")
        self.entries = entries
        self.row_starts = mapped(directory / "row_starts.npy")
        self.refs = mapped(directory / "refs.npy")
        self.lengths = mapped(directory / "lengths.npy")
        self.counters = mapped(directory / "counters.npy")
        bad = json.loads((directory / "bad.json").read_text())
        self.bad_rows = [b[0] for b in bad]
        self.bad = bad
        if len(self.row_starts) != self.rows + 1 or len(self.counters) != self.rows:
            raise ValueError("its arrays disagree with meta.json")

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def samples(self, row: int) -> list[Sample]:
        mask = (1 << SAMPLE_BITS) - 1
        return [self.entries[ref >> SAMPLE_BITS].sample(ref & mask)
                for ref in self.refs[self.row_starts[row] : self.row_starts[row + 1]].tolist()]

    def stats(self, rows_done: int) -> dict:
        """The data counters once `rows_done` rows have been produced."""
        if rows_done == 0:
            return SplitStats().state_dict()
        records, samples, truncated = (int(x) for x in self.counters[rows_done - 1, :3])
        i = bisect.bisect_right(self.bad_rows, rows_done - 1) - 1
        skipped, first_bad = (self.bad[i][1], self.bad[i][2]) if i >= 0 else ({}, [])
        return {"records": records, "samples": samples, "truncated": truncated, "skipped": dict(skipped),
                "first_bad": list(first_bad)}


def open_plan(data, run_data, cache_dir: str, *, seed: int) -> tuple[Plan | None, str]:
    """The run's plan, or None and why not."""
    key = plan_key(data, run_data, seed)
    if key is None:
        return None, ""
    directory = Path(cache_dir) / "plans" / key
    if not directory.is_dir():
        return None, "no data plan for this seed and these settings (`bigsft data prepare CONFIG` writes it)"
    try:
        return Plan(directory, [e for c in run_data.caches for e in c.values()]), ""
    except (OSError, ValueError, KeyError, IndexError) as e:
        return None, f"the data plan {directory} is damaged ({e}); `bigsft data prepare CONFIG` rewrites it"


class _Draws:
    """What the trainer reads of a mixed stream: draws per source, completed epochs."""

    def __init__(self, n_sources: int):
        self.drawn = [0] * n_sources
        self.epochs = 0

    def epochs_completed(self) -> int:
        return self.epochs


class PlannedStream:
    """A TrainStream's windows read from the plan: the same batches, counters and draws, at a cost per step that
    does not grow with the number of ranks. A walked stream's state (a checkpoint from before the plan) is
    resumed by walking, through `walk()`."""

    def __init__(self, plan: Plan, stats: SplitStats, *, batch: BatchMath, dp_rank: int, pad_id: int,
                 pad_to_multiple_of: int | None, packing: bool, n_sources: int, walk):
        self.plan, self.stats = plan, stats
        self.micro = batch.micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, batch.data_parallel_size
        self.units = batch.global_batch_size
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.packing = packing
        self.mixed = _Draws(n_sources)
        self.row = 0
        self._walk = walk
        self.walked = None
        """The walking TrainStream that took over (resuming a walked stream's state)."""

    def _at(self, row: int) -> None:
        """Stand after `row` rows: counters and draws as the walked stream has them there."""
        self.row = row
        self.stats.load_state_dict(self.plan.stats(row))
        if row:
            counters = self.plan.counters[row - 1]
            self.mixed.epochs = int(counters[3])
            self.mixed.drawn = [int(x) for x in counters[4:]]

    def _advance(self) -> int:
        a, b = self.row, self.row + self.units
        if b > self.plan.rows:
            raise DataError(f"the data plan {self.plan.dir} ends at row {self.plan.rows}, before this run's step "
                            f"needs rows {a}-{b - 1}; rerun `bigsft data prepare CONFIG` with more --epochs")
        self._at(b)
        return a

    def first_epoch_windows(self) -> int:
        """Complete windows before every source has been through once (what the walked stream counts)."""
        done = np.flatnonzero(self.plan.counters[:, 3] >= 1)
        if not len(done):
            raise DataError(f"the data plan {self.plan.dir} ends before the first epoch does")
        windows = -(-(int(done[0]) + 1) // self.units) - 1
        self._at(min((windows + 1) * self.units, self.plan.rows))
        return windows

    def next_window(self) -> list[Batch]:
        if self.walked is not None:
            return self.walked.next_window()
        a = self._advance()
        order = np.argsort(self.plan.lengths[a : self.row], kind="stable")  # as the walked window sorts
        mine = [self.plan.samples(a + int(i)) for i in order[self.dp_rank :: self.dp_size]]
        if self.packing:
            return [collate_packed(mine[j : j + self.micro], pad_id=self.pad_id,
                                   pad_to_multiple_of=self.pad_to_multiple_of) for j in range(0, len(mine), self.micro)]
        samples = [row[0] for row in mine]
        return [collate(samples[j : j + self.micro], pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
                for j in range(0, len(samples), self.micro)]

    def state_dict(self) -> dict:
        if self.walked is not None:
            return self.walked.state_dict()
        return {"planned": {"key": self.plan.meta["key"], "row": self.row}}

    def load_state_dict(self, state: dict) -> None:
        if "planned" not in state:  # a walked stream's position: go on walking
            self.walked = self._walk()
            self.walked.load_state_dict(state)
            self.mixed = self.walked.mixed
            return
        planned = state["planned"]
        if planned["key"] != self.plan.meta["key"]:
            raise DataError(f"the checkpoint's data position is in data plan {planned['key']}, but this run's plan "
                            f"is {self.plan.meta['key']}: the training data, seed or data settings changed")
        self._at(planned["row"])
