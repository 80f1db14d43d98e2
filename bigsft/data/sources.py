"""Where records come from: files, directories, globs (and hub datasets), read as a resumable stream.

A `SourceReader` yields one data-parallel rank's records of one source, epoch after epoch: the
files in a seeded order per epoch, and record k of the epoch (counted over all files) belongs to
rank k % world. That split is disjoint and complete whether there are fewer files than ranks or many
more, and every rank agrees on it without talking to the others. Its position (epoch, file, record,
byte offset) is a small JSON-able dict, so a resumed run continues exactly where it stopped.

Memory stays flat: JSON lines, CSV/TSV and Parquet are read record by record or batch by batch (only
a `.json` array is loaded whole). A record that does not parse comes out as a `BadRecord` with its
`file:line`; one broken line never costs the rest of its file, and a file that cannot be read at
all is an error, never silently skipped.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigsft.config import ConfigError, DataSource
from bigsft.errors import DataError

READABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".zst")




@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    location: str


@dataclass(frozen=True)
class BadRecord:
    reason: str
    location: str


def _suffix(path: str) -> str:
    p = path
    for c in COMPRESSED_SUFFIXES:
        if p.endswith(c):
            p = p[: -len(c)]
    return os.path.splitext(p)[1].lower()


def is_hub_dataset(path: str) -> bool:
    """`org/name` or `name` that is not a local path: a Hugging Face hub dataset."""
    return (not os.path.exists(path) and not any(ch in path for ch in "*?[") and _suffix(path) == ""
            and not path.startswith((".", "/", "~")) and path.count("/") <= 1)


def list_files(source: DataSource, where: str) -> list[str]:
    """The source's files in a stable order; raises ConfigError if a path matches nothing readable."""
    paths = source.path if isinstance(source.path, list) else [source.path]
    files: list[str] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            matched = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matched:
                raise ConfigError(f"{where}.path: glob {p!r} matches no file")
            files.extend(matched)
        elif os.path.isdir(p):
            inside = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and _suffix(str(f)) in READABLE_SUFFIXES)
            if not inside:
                raise ConfigError(f"{where}.path: directory {p!r} holds no {'/'.join(READABLE_SUFFIXES)} file")
            files.extend(inside)
        elif os.path.isfile(p) or is_hub_dataset(p):
            files.append(p)
        else:
            raise ConfigError(f"{where}.path: {p!r} does not exist")
    for f in files:
        if not is_hub_dataset(f) and _suffix(f) not in READABLE_SUFFIXES:
            raise ConfigError(f"{where}.path: {f!r} has an unknown file type; use {', '.join(READABLE_SUFFIXES)}"
                              " (optionally .gz or .zst)")
    return files


# --------------------------------------------------------------------------------------------------
# One file, from a given record on. Each reader yields (line, next_offset, parse) where parse() gives
# a Record or BadRecord: records of other ranks are skipped without being parsed.


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


def _decode(raw: bytes, location: str) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadRecord("undecodable bytes (not UTF-8)", location)


def _jsonl(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    with _open_binary(path) as fh:
        if offset and fh.seekable():
            fh.seek(offset)
        elif offset:  # a zstd stream only reads forward
            skipped = 0
            while skipped < offset and (chunk := fh.read(min(offset - skipped, 1 << 20))):
                skipped += len(chunk)
        while True:
            raw = fh.readline()
            if not raw:
                return
            line += 1
            if not raw.strip():
                continue
            location = f"{path}:{line}"

            def parse(raw=raw, location=location) -> Record | BadRecord:
                text = _decode(raw, location)
                if isinstance(text, BadRecord):
                    return text
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    return BadRecord(f"malformed JSON ({e.msg})", location)
                return Record(obj, location) if isinstance(obj, dict) else BadRecord("not a JSON object", location)

            yield line, fh.tell(), parse


def _json_array(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    with _open_binary(path) as fh:
        text = _decode(fh.read(), path)
    if isinstance(text, BadRecord):
        raise DataError(f"{path}: not UTF-8 text")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); the whole file is unreadable") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i in range(record, len(data)):
        location = f"{path}:[{i}]"
        obj = data[i]
        yield i + 1, 0, (lambda obj=obj, location=location:
                         Record(obj, location) if isinstance(obj, dict) else BadRecord("not a JSON object", location))


def _delimited(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    tsv = _suffix(path) == ".tsv"
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            return
        # `record` counts records, as the saved position does: a blank row is none, so it is not counted.
        seen = 0
        for row in reader:
            if not row:
                continue
            seen += 1
            if seen <= record:
                continue
            location = f"{path}:{reader.line_num}"

            def parse(row=row, location=location) -> Record | BadRecord:
                if len(row) != len(header):
                    return BadRecord(f"wrong number of columns ({len(row)} for {len(header)})", location)
                if any("\ufffd" in cell for cell in row):
                    return BadRecord("undecodable bytes (not UTF-8)", location)
                return Record(dict(zip(header, row)), location)

            yield reader.line_num, 0, parse


def _parquet(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for g in range(pf.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if row + size <= record:  # whole row group before the resume point: not read
            row += size
            continue
        for obj in pf.read_row_group(g).to_pylist():
            row += 1
            if row <= record:
                continue
            yield row, 0, (lambda obj=obj, loc=f"{path}:row {row}": Record(obj, loc))


def _hub(path: str, split: str | None, record: int) -> Iterator[tuple[int, int, Any]]:
    try:
        from datasets import load_dataset

        ds = load_dataset(path, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown name, gated...
        raise DataError(f"{path}: cannot stream this hub dataset ({str(e).splitlines()[0][:200]})") from None
    if record:
        ds = ds.skip(record)
    for i, obj in enumerate(ds, start=record):
        yield i + 1, 0, (lambda obj=obj, loc=f"{path}[{split or 'train'}]#{i}": Record(dict(obj), loc))


_READERS = {".jsonl": _jsonl, ".json": _json_array, ".csv": _delimited, ".tsv": _delimited, ".parquet": _parquet}


def iter_file(path: str, *, split: str | None = None, record: int = 0, line: int = 0, offset: int = 0):
    """(line, next_offset, parse) for each record of `path` from record number `record` on."""
    if is_hub_dataset(path):
        return _hub(path, split, record)
    return _READERS[_suffix(path)](path, record, line, offset)


# --------------------------------------------------------------------------------------------------
# A rank's endless stream of one source.


@dataclass
class ReaderPosition:
    epoch: int = 0
    file_cursor: int = 0
    """Index into this epoch's file order."""
    record: int = 0
    """Records (of all ranks) already read from the current file."""
    line: int = 0
    """Line number of the last record read (for `file:line` in messages)."""
    offset: int = 0
    """Byte offset of the next record (JSON lines); 0 for other formats."""
    seen: int = 0
    """Records (of all ranks) of this epoch before the current file position."""


EPOCH_END = object()


@dataclass(frozen=True)
class Holdout:
    """A source's held-out share (`data.validation`): the records whose hash of file name and position in
    the file falls below `threshold` (of 2**64). The same records on every rank, world size and epoch."""

    threshold: int
    keep: str = "train"
    """`train`: every record but the held-out ones; `validation`: only those."""

    @staticmethod
    def key(path: str, record: int) -> int:
        digest = hashlib.blake2b(f"{os.path.basename(path)}:{record}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def skips(self, path: str, record: int) -> bool:
        held = self.key(path, record) < self.threshold
        return held if self.keep == "train" else not held


def holdout_threshold(source: DataSource, where: str, validation: float | int) -> int:
    """The hash threshold that holds out `validation` of a source: a fraction, or exactly that many records
    (the ones with the smallest hashes); ConfigError when no training record would be left."""
    if isinstance(validation, float):
        return int(validation * 2**64)
    keys = [Holdout.key(path, k) for path in list_files(source, where) for k, _ in enumerate(iter_file(path))]
    if validation >= len(keys):
        raise ConfigError(f"data.validation: {validation} records held out of {where}, which has {len(keys)}: no "
                          "training data would be left")
    return sorted(keys)[validation - 1] + 1


class SourceReader:
    """This rank's records of one source. `next()` returns a Record, a BadRecord, EPOCH_END after the
    last record of an epoch, or None when `cycle` is off and the single epoch is over. With a `holdout`,
    the records it skips are passed over before the ranks share the rest."""

    def __init__(self, source: DataSource, files: list[str], *, seed: int, index: int, dp_rank: int, dp_size: int,
                 shuffle_files: bool, cycle: bool, holdout: Holdout | None = None):
        self.holdout = holdout
        self.source, self.files = source, files
        self.seed, self.index = seed, index
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle_files, self.cycle = shuffle_files, cycle
        self.pos = ReaderPosition()
        self._it: Iterator | None = None
        self._finished = False

    def _order(self, epoch: int) -> list[str]:
        if not self.shuffle_files or len(self.files) == 1:
            return self.files
        perm = np.random.default_rng([self.seed, self.index, epoch, 7]).permutation(len(self.files))
        return [self.files[i] for i in perm]

    def next(self):
        if self._finished:
            return None
        while True:
            order = self._order(self.pos.epoch)
            if self.pos.file_cursor >= len(order):
                self.pos = ReaderPosition(epoch=self.pos.epoch + 1)
                self._it = None
                if not self.cycle:
                    self._finished = True
                return EPOCH_END
            if self._it is None:
                p = self.pos
                self._it = iter_file(order[p.file_cursor], split=self.source.split, record=p.record, line=p.line,
                                     offset=p.offset)
            try:
                line, offset, parse = next(self._it)
            except StopIteration:
                self._it = None
                self.pos.file_cursor += 1
                self.pos.record = self.pos.line = self.pos.offset = 0
                continue
            except (OSError, EOFError) as e:
                raise DataError(f"{order[self.pos.file_cursor]}: cannot read past line {self.pos.line}: {e}") from None
            record = self.pos.record
            self.pos.record += 1
            self.pos.line, self.pos.offset = line, offset
            if self.holdout is not None and self.holdout.skips(order[self.pos.file_cursor], record):
                continue
            k = self.pos.seen
            self.pos.seen += 1
            if k % self.dp_size == self.dp_rank:
                return parse()

    def state_dict(self) -> dict:
        return {**asdict(self.pos), "finished": self._finished}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self._finished = state.pop("finished", False)
        self.pos = ReaderPosition(**state)
        self._it = None


def read_source(source: DataSource, where: str) -> Iterator[Record | BadRecord]:
    """Every record of a source once, in file order (one reader, no sharding): for scans and tools."""
    reader = SourceReader(source, list_files(source, where), seed=0, index=0, dp_rank=0, dp_size=1,
                          shuffle_files=False, cycle=False)
    while (item := reader.next()) is not None:
        if item is not EPOCH_END:
            yield item


def count_records(source: DataSource, where: str) -> int:
    """Records in a source (all ranks), without parsing them where the format allows."""
    total = 0
    for path in list_files(source, where):
        if is_hub_dataset(path):
            raise ConfigError(f"{where}: a hub dataset has no known size; give every source a weight")
        if _suffix(path) == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += sum(1 for _ in iter_file(path))
    return total
