"""Where records come from: files, directories and globs, read record by record.

Each record comes with its location (`file:line`) so a bad one can be reported where it is. A
malformed line is yielded as a `BadRecord` instead of stopping the read: one broken line must not
silently cost the rest of a file.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigsft.config import ConfigError, DataSource

READABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    location: str


@dataclass(frozen=True)
class BadRecord:
    reason: str
    location: str


def _suffix(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(p)[1].lower()


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
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ConfigError(f"{where}.path: {p!r} does not exist")
    for f in files:
        if _suffix(f) not in READABLE_SUFFIXES:
            raise ConfigError(f"{where}.path: {f!r} has an unknown file type; use {', '.join(READABLE_SUFFIXES)}")
    return files


def _open_text(path: str) -> io.TextIOBase:
    # errors='replace' keeps one undecodable byte from losing a whole file; the record is then
    # rejected by its format check if the damage matters.
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline="")


def read_file(path: str) -> Iterator[Record | BadRecord]:
    suffix = _suffix(path)
    if suffix == ".jsonl":
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield BadRecord(f"malformed JSON ({e.msg})", loc)
                    continue
                yield Record(obj, loc) if isinstance(obj, dict) else BadRecord("not a JSON object", loc)
    elif suffix == ".json":
        with _open_text(path) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                yield BadRecord(f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})", path)
                return
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            yield BadRecord("expected a JSON array of objects", path)
            return
        for i, obj in enumerate(data):
            loc = f"{path}:[{i}]"
            yield Record(obj, loc) if isinstance(obj, dict) else BadRecord("not a JSON object", loc)
    elif suffix in (".csv", ".tsv"):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",",
                                    quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
            for row in reader:
                loc = f"{path}:{reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    yield BadRecord("wrong number of columns", loc)
                    continue
                yield Record(dict(row), loc)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield Record(obj, f"{path}:row {row}")
    else:  # list_files rejects these first
        raise ConfigError(f"{path}: unknown file type")


def read_source(source: DataSource, where: str) -> Iterator[Record | BadRecord]:
    for path in list_files(source, where):
        yield from read_file(path)
