"""Where records come from: files, directories, globs (and hub datasets), read as a resumable stream.

A `SourceReader` yields one data-parallel rank's records of one source, epoch after epoch: the
files in a seeded order per epoch, and record k of the epoch (counted over all files) belongs to
rank k % world. That split is disjoint and complete whether there are fewer files than ranks or many
more, and every rank agrees on it without talking to the others. Its position (epoch, file, record,
byte offset) is a small JSON-able dict, so a resumed run continues exactly where it stopped.

Memory stays flat: JSON lines, CSV/TSV, Parquet, CoNLL sentences and line-aligned source/target text
are read record by record or batch by batch (only a `.json` array or SQuAD file is loaded whole). Most
files are read by their suffix; CoNLL files (any suffix), SQuAD's nested JSON and a seq2seq source with a
`target_path` are read by their format. A record that does not parse comes out as a `BadRecord` with its
`file:line`; one broken line never costs the rest of its file, and a file that cannot be read at
all is an error, never silently skipped.
"""

from __future__ import annotations

import csv
import functools
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
LINE_FORMATS = ("conll",)
"""Formats whose files are read by the format, whatever their suffix (.conll, .txt, .bio, .iob...)."""


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


def _as_list(paths: str | list[str]) -> list[str]:
    return paths if isinstance(paths, list) else [paths]


def _any_suffix(source: DataSource) -> bool:
    """The format, not the suffix, decides how its files are read."""
    return source.format in LINE_FORMATS or source.target_path is not None


def list_files(source: DataSource, where: str) -> list[str]:
    """The source's files in a stable order; raises ConfigError if a path matches nothing readable, or if a
    source file and its `target_path` file differ in line count."""
    if source.target_path is not None:
        return _aligned_files(source, where)
    paths = _as_list(source.path)
    files: list[str] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            matched = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matched:
                raise ConfigError(f"{where}.path: glob {p!r} matches no file")
            files.extend(matched)
        elif os.path.isdir(p):
            inside = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and not f.name.startswith(".")
                            and (_any_suffix(source) or _suffix(str(f)) in READABLE_SUFFIXES))
            if not inside:
                kinds = "readable" if _any_suffix(source) else "/".join(READABLE_SUFFIXES)
                raise ConfigError(f"{where}.path: directory {p!r} holds no {kinds} file")
            files.extend(inside)
        elif os.path.isfile(p) or is_hub_dataset(p):
            files.append(p)
        else:
            raise ConfigError(f"{where}.path: {p!r} does not exist")
    for f in files:
        if not is_hub_dataset(f) and not _any_suffix(source) and _suffix(f) not in READABLE_SUFFIXES:
            hint = "; for two line-aligned text files set target_path" if source.format == "seq2seq" else ""
            raise ConfigError(f"{where}.path: {f!r} has an unknown file type; use {', '.join(READABLE_SUFFIXES)}"
                              f" (optionally .gz or .zst){hint}")
    return files


def target_files(source: DataSource) -> dict[str, str]:
    """Each source file's target file (`target_path`, line-aligned plain text); empty without one."""
    if source.target_path is None:
        return {}
    return dict(zip(_as_list(source.path), _as_list(source.target_path), strict=True))


def _aligned_files(source: DataSource, where: str) -> list[str]:
    paths, targets = _as_list(source.path), _as_list(source.target_path)
    if len(paths) != len(targets):
        raise ConfigError(f"{where}.target_path: {len(targets)} target files for {len(paths)} source files; "
                          "list one target per source, in the same order")
    for key, p in [("path", p) for p in paths] + [("target_path", t) for t in targets]:
        if not os.path.isfile(p):
            raise ConfigError(f"{where}.{key}: {p!r} is not a file; with target_path, path and target_path name "
                              "files (or lists of files), not directories or globs")
    for p, t in zip(paths, targets):
        n_source, n_target = _count_lines(p), _count_lines(t)
        if n_source != n_target:
            raise ConfigError(f"{where}.target_path: {t!r} has {n_target} lines but its source {p!r} has {n_source}; "
                              "line i of one must be the target of line i of the other")
    return paths


def _count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with _open_binary(path) as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


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
        _seek(fh, offset)
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


def _seek(fh, offset: int) -> None:
    if offset and fh.seekable():
        fh.seek(offset)
    elif offset:  # a zstd stream only reads forward
        skipped = 0
        while skipped < offset and (chunk := fh.read(min(offset - skipped, 1 << 20))):
            skipped += len(chunk)


def _conll(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    """One record per sentence: `token ... tag` lines (the first column is the token, the last the tag), a
    blank line between sentences; `-DOCSTART-` lines end a sentence like a blank line. Yields the number of
    the sentence's last line and the offset after it, so a resumed read starts at the next sentence."""
    with _open_binary(path) as fh:
        _seek(fh, offset)
        rows: list[tuple[int, bytes]] = []
        while True:
            raw = fh.readline()
            if raw:
                line += 1
            columns = raw.split()
            if columns and columns[0] != b"-DOCSTART-":
                rows.append((line, raw))
                continue
            if rows:
                yield line, fh.tell(), functools.partial(_conll_sentence, rows, f"{path}:{rows[0][0]}")
                rows = []
            if not raw:
                return


def _conll_sentence(rows: list[tuple[int, bytes]], location: str) -> Record | BadRecord:
    tokens, tags = [], []
    for number, raw in rows:
        text = _decode(raw, location)
        if isinstance(text, BadRecord):
            return BadRecord(f"line {number}: undecodable bytes (not UTF-8)", location)
        columns = text.split()
        if len(columns) < 2:
            return BadRecord(f"line {number}: no tag", location)
        tokens.append(columns[0])
        tags.append(columns[-1])
    return Record({"tokens": tokens, "tags": tags}, location)


def _aligned_lines(path: str, record: int, line: int, offset: int, *, target: str) -> Iterator[tuple[int, int, Any]]:
    """Line i of `path` and line i of `target` as one {source, target} record (blank lines included: they
    are records with an empty side). Resumes at `offset` in the source and `line` lines into the target."""
    with _open_binary(path) as src, _open_binary(target) as tgt:
        _seek(src, offset)
        for _ in range(line):
            tgt.readline()
        while True:
            raw_source, raw_target = src.readline(), tgt.readline()
            if not raw_source and not raw_target:
                return
            if not raw_source or not raw_target:
                raise DataError(f"{target} has {_count_lines(target)} lines but its source {path} has "
                                f"{_count_lines(path)}; line i of one must be the target of line i of the other")
            line += 1
            yield line, src.tell(), functools.partial(_aligned_pair, raw_source, raw_target, f"{path}:{line}")


def _aligned_pair(raw_source: bytes, raw_target: bytes, location: str) -> Record | BadRecord:
    source, target = _decode(raw_source, location), _decode(raw_target, location)
    if isinstance(source, BadRecord):
        return source
    if isinstance(target, BadRecord):
        return BadRecord("undecodable bytes in the target (not UTF-8)", location)
    return Record({"source": source.rstrip("\r\n"), "target": target.rstrip("\r\n")}, location)


def _load_json(path: str) -> Any:
    with _open_binary(path) as fh:
        text = _decode(fh.read(), path)
    if isinstance(text, BadRecord):
        raise DataError(f"{path}: not UTF-8 text")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); the whole file is unreadable") from None
    return data


def _json_array(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    return _json_records(path, _load_json(path), record)


def _json_records(path: str, data: Any, record: int) -> Iterator[tuple[int, int, Any]]:
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


def _squad(path: str, record: int, line: int, offset: int) -> Iterator[tuple[int, int, Any]]:
    """A SQuAD file as published ({version, data: [{title, paragraphs: [{context, qas}]}]}): one record per
    question, with its paragraph's context. Any other JSON (an array of flat records) reads as `.json` does."""
    data = _load_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        yield from _json_records(path, data, record)
        return
    k = 0
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            qas = paragraph.get("qas", []) if isinstance(paragraph, dict) else []
            for q, qa in enumerate(qas):
                k += 1
                if k > record:
                    location = f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"
                    yield k, 0, functools.partial(_squad_question, paragraph, qa, location)


def _squad_question(paragraph: dict, qa: Any, location: str) -> Record | BadRecord:
    if not isinstance(qa, dict):
        return BadRecord("a question should be an object", location)
    return Record({"id": qa.get("id"), "context": paragraph.get("context"), "question": qa.get("question"),
                   "answers": qa.get("answers") or [], "is_impossible": bool(qa.get("is_impossible", False))},
                  location)


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


def iter_file(path: str, *, split: str | None = None, record: int = 0, line: int = 0, offset: int = 0,
              format: str | None = None, target: str | None = None):
    """(line, next_offset, parse) for each record of `path` from record number `record` on. The `format`
    picks the reader where the suffix cannot (CoNLL files, SQuAD's nested JSON); a `target` file pairs
    line-aligned plain text."""
    if is_hub_dataset(path):
        return _hub(path, split, record)
    if format == "conll":
        return _conll(path, record, line, offset)
    if target is not None:
        return _aligned_lines(path, record, line, offset, target=target)
    if format == "squad" and _suffix(path) == ".json":
        return _squad(path, record, line, offset)
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
    """Byte offset of the next record (JSON lines, CoNLL, the source file of aligned text); 0 for other formats."""
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
    targets = target_files(source)
    keys = [Holdout.key(path, k) for path in list_files(source, where)
            for k, _ in enumerate(iter_file(path, format=source.format, target=targets.get(path)))]
    if validation >= len(keys):
        raise ConfigError(f"data.validation: {validation} records held out of {where}, which has {len(keys)}: no "
                          "training data would be left")
    return sorted(keys)[validation - 1] + 1


class SourceReader:
    """This rank's records of one source. `next()` returns a Record, a BadRecord, EPOCH_END after the
    last record of an epoch, or None when `cycle` is off and the single epoch is over. With a `holdout`,
    the records it skips are passed over before the ranks share the rest."""

    def __init__(self, source: DataSource, files: list[str], *, seed: int, index: int, dp_rank: int, dp_size: int,
                 shuffle_files: bool, cycle: bool, holdout: Holdout | None = None, cache: dict | None = None):
        self.holdout = holdout
        self.cache = cache or {}
        """File -> its tokenized cache entry (bigsft.data.cache): read in place of the text, same positions."""
        self.source, self.files = source, files
        self.seed, self.index = seed, index
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle_files, self.cycle = shuffle_files, cycle
        self.targets = target_files(source)
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
                path = order[p.file_cursor]
                if path in self.cache:
                    self._it = self.cache[path].iter_records(p.record)
                else:
                        self._it = iter_file(path, split=self.source.split, record=p.record, line=p.line,
                                         offset=p.offset, format=self.source.format, target=self.targets.get(path))
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
    total, targets = 0, target_files(source)
    for path in list_files(source, where):
        if is_hub_dataset(path):
            raise ConfigError(f"{where}: a hub dataset has no known size; give every source a weight")
        if path in targets:
            total += _count_lines(path)  # list_files checked that the target file has as many
        elif _suffix(path) == ".parquet" and not _any_suffix(source):
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += sum(1 for _ in iter_file(path, format=source.format))
    return total
