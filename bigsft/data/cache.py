"""The tokenized cache: every training file's samples, tokenized once, memory-mapped by every rank.

`bigsft data prepare CONFIG` reads each training file, parses and tokenizes its records on all cores, and
writes one entry per file under `data.cache_dir`:

    <cache_dir>/<key>/       key: a hash over everything that changes the samples (below)
        meta.json            what the key covers, counts (records, samples, tokens, bad records by reason)
        records.npy          int64 [R+1]: the first sample of each record (a QA record has one per window,
                             a bad record none)
        lines.npy            int64 [R]: the reader's line number of each record, and
        offsets.npy          int64 [R]: its byte offset after it, so that a cached reader's position is the
                             text reader's and checkpoints resume in either mode
        ids.npy, id_starts.npy            int32 tokens of every sample end to end, int64 [S+1] starts
        targets.npy, target_starts.npy    int32 per-token targets (int64 [S] class ids for classifiers)
        token_types.npy, decoder_ids.npy, span_end.npy   where the task has them
        truncated.npy        bool [S]
        bad.json             [record, stage, reason, location] of each unusable record
    <cache_dir>/paths/<hash of the file's path>.json   the key last prepared for that path: what tells a
                             stale entry (the file, tokenizer or template changed) from a missing one

The key covers the file (absolute path, size, modification time; a seq2seq target file too), how records are
read (format, columns, prefix), the tokenizer (its full serialization, special tokens), the chat template and
system prompt, and every tokenizing setting (max_length, truncation, train_on, label ids, stride, target
length, decoder start and end). A changed input gives another key, so a stale entry is never read; training
says which input changed and tokenizes while streaming (or, with `data.cache: require`, stops before launch).

A cached source yields exactly the samples, bad-record counts and reader positions of the same source read as
text: the stream above it (shuffle buffer, mixing, packing, rank shares) is the same code, fed from arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigsft.config import DataSource
from bigsft.data.formats import BadRecordError, parser_for
from bigsft.data.scan import SplitStats
from bigsft.data.sources import BadRecord, is_hub_dataset, iter_file, list_files, target_files
from bigsft.data.tokenize import Sample, SampleBuilder

CACHE_FORMAT = 1
HUB_NOT_CACHED = "a hub dataset (streamed, never cached)"
CHUNK_RECORDS = 256
"""Records per task a worker parses and tokenizes in one go."""


# --------------------------------------------------------------------------------------------------
# Keys


def digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """A hash of what the tokenizer does: a fast tokenizer's full serialization (vocabulary, merges, normalizer,
    pre- and post-processor, added tokens), a slow one's vocabulary and settings; plus the special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps([sorted(tok.get_vocab().items()), getattr(tok, "init_kwargs", {})], default=str)
    specials = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk", "cls", "sep")}
    return digest([type(tok).__name__, body, specials, getattr(tok, "add_bos_token", None),
                    getattr(tok, "add_eos_token", None)])


def _file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _builder_parts(build: SampleBuilder) -> dict:
    """The builder's share of a key, worked out once per builder (a large tokenizer serializes to megabytes)."""
    owner, parts = build.__dict__.get("_cache_key_parts", (None, None))
    if owner != id(build):  # not worked out yet, or for the builder this one was copied from (for_eval, ...)
        parts = {
            "tokenizer": tokenizer_fingerprint(build.tok),
            "template": {"chat_template": build.chat_template, "system_prompt": build.system_prompt},
            "settings": {"max_length": build.max_length, "truncation": build.truncation, "train_on": build.train_on,
                         "label2id": build.label2id, "num_labels": build.num_labels,
                         "subtoken_labels": build.subtoken_labels, "doc_stride": build.doc_stride,
                         "max_target_length": build.max_target_length, "decoder_start": build.decoder_start,
                         "target_end": build.target_end, "with_meta": build.with_meta},
        }
        build.__dict__["_cache_key_parts"] = (id(build), parts)
    return parts


def key_parts(source: DataSource, path: str, build: SampleBuilder) -> dict:
    """Everything that changes a file's samples, grouped by what a message can name."""
    target = target_files(source).get(path)
    return {
        "format": CACHE_FORMAT,
        "file": _file_stamp(path),
        "target file": _file_stamp(target) if target else None,
        "reading": {"format": source.format, "columns": dict(source.columns), "prefix": source.prefix},
        **_builder_parts(build),
    }


_WHAT_CHANGED = {
    "format": "bigsft's cache format changed",
    "file": "the file changed (size or modification time)",
    "target file": "its target file changed",
    "reading": "the source's format, columns or prefix changed",
    "tokenizer": "the tokenizer changed",
    "template": "the chat template or system prompt changed",
    "settings": "the tokenizing settings changed (max_length, truncation, train_on, labels, stride, ...)",
}


def _path_pointer(cache_dir: str, path: str) -> Path:
    return Path(cache_dir) / "paths" / f"{digest(os.path.abspath(path))}.json"


# --------------------------------------------------------------------------------------------------
# Reading an entry


def mapped(path: Path) -> np.ndarray:
    """A memory-mapped array (the ranks of a node share its pages), as a plain ndarray: slicing a np.memmap runs
    Python code per slice."""
    return np.asarray(np.load(path, mmap_mode="r"))


@dataclass(frozen=True, slots=True)
class CachedRecord:
    """Record `record` of a cached file, as the cached reader yields it (in place of a text record)."""

    entry: CacheEntry
    record: int

    def __call__(self) -> CachedRecord:  # the reader calls what a file iterator yields to parse it
        return self


class CacheEntry:
    """One file's cached samples, memory-mapped."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {self.meta.get('format')}, this bigsft reads {CACHE_FORMAT}")

        def load(name: str):
            f = self.dir / f"{name}.npy"
            return mapped(f) if f.exists() else None

        self.records = load("records")
        self.lines, self.offsets = load("lines"), load("offsets")
        self.ids, self.id_starts = load("ids"), load("id_starts")
        self.targets, self.target_starts = load("targets"), load("target_starts")
        self.token_types, self.decoder_ids = load("token_types"), load("decoder_ids")
        self.span_end, self.truncated = load("span_end"), load("truncated")
        self.scalar_targets = bool(self.meta["scalar_targets"])
        self.bad = {r: (stage, reason, location) for r, stage, reason, location in
                    json.loads((self.dir / "bad.json").read_text())}
        n_records, n_samples = self.meta["records"], self.meta["samples"]
        if (len(self.records) != n_records + 1 or len(self.id_starts) != n_samples + 1
                or len(self.lines) != n_records or int(self.id_starts[-1]) != len(self.ids)):
            raise ValueError("its arrays disagree with meta.json (an interrupted write?)")

    @property
    def num_records(self) -> int:
        return self.meta["records"]

    def iter_records(self, start: int):
        """(line, offset, record) from record `start` on, as `iter_file` yields them."""
        for a in range(start, self.num_records, 4096):
            b = min(a + 4096, self.num_records)
            for r, line, offset in zip(range(a, b), self.lines[a:b].tolist(), self.offsets[a:b].tolist()):
                yield line, offset, CachedRecord(self, r)

    def sample(self, k: int) -> Sample:
        a, b = self.id_starts[k], self.id_starts[k + 1]
        if self.scalar_targets:
            targets, decoder = int(self.targets[k]), None
        else:
            c, d = self.target_starts[k], self.target_starts[k + 1]
            targets = self.targets[c:d].tolist()
            decoder = self.decoder_ids[c:d].tolist() if self.decoder_ids is not None else None
        return Sample(self.ids[a:b].tolist(), targets,
                      token_type_ids=self.token_types[a:b].tolist() if self.token_types is not None else None,
                      truncated=bool(self.truncated[k]),
                      span_end=int(self.span_end[k]) if self.span_end is not None else None,
                      decoder_input_ids=decoder)


def cached_samples(items: list[CachedRecord], stats: SplitStats) -> list[Sample]:
    """The samples of a chunk of cached records, counted in `stats` as `parse_records` and `usable_samples`
    count the same records read as text (records failing to read or parse first, then those failing to
    tokenize, each in reading order: the order the first reported bad records come in)."""
    samples, late = [], []
    for item in items:
        entry, r = item.entry, item.record
        a, b = int(entry.records[r]), int(entry.records[r + 1])
        if a == b:
            bad = entry.bad.get(r)
            if bad is not None:
                stage, reason, location = bad
                if stage == 0:
                    stats.skip(reason, location)
                else:
                    late.append((reason, location))
            continue
        for k in range(a, b):
            sample = entry.sample(k)
            stats.samples += 1
            stats.truncated += sample.truncated
            samples.append(sample)
    for reason, location in late:
        stats.skip(reason, location)
    return samples


# --------------------------------------------------------------------------------------------------
# Finding a source's entries


@dataclass
class Lookup:
    entries: dict[str, CacheEntry] = field(default_factory=dict)
    """File -> its fresh entry."""
    missing: dict[str, str] = field(default_factory=dict)
    """File -> why it has none (never prepared, stale: what changed, damaged)."""


def look_up(source: DataSource, files: list[str], build: SampleBuilder, cache_dir: str) -> Lookup:
    found = Lookup()
    for path in files:
        if is_hub_dataset(path):
            found.missing[path] = HUB_NOT_CACHED
            continue
        parts = key_parts(source, path, build)
        directory = Path(cache_dir) / digest(parts)
        if directory.is_dir():
            try:
                found.entries[path] = CacheEntry(directory)
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                found.missing[path] = f"its entry {directory} is damaged ({e}); rerun `bigsft data prepare`"
                continue
        found.missing[path] = _why_missing(cache_dir, path, parts)
    return found


def _why_missing(cache_dir: str, path: str, parts: dict) -> str:
    try:
        prepared = json.loads(_path_pointer(cache_dir, path).read_text())["parts"]
    except (OSError, ValueError, KeyError):
        return "not prepared"
    changed = [what for key, what in _WHAT_CHANGED.items() if prepared.get(key) != parts.get(key)]
    return "stale: " + "; ".join(changed or ["its inputs changed"])


# --------------------------------------------------------------------------------------------------
# Writing entries (bigsft data prepare)

_WORKER: tuple | None = None


def _init_worker(build: SampleBuilder, source: DataSource) -> None:
    global _WORKER
    _WORKER = (build, parser_for(source), source.columns)


def _tokenize_chunk(items: list) -> list:
    """Per record: its samples, or (stage, reason, location) when it cannot be used (stage 0: reading or
    parsing, 1: tokenizing)."""
    build, parse, columns = _WORKER
    out: list = [None] * len(items)
    examples, index = [], []
    for i, item in enumerate(items):
        if isinstance(item, BadRecord):
            out[i] = (0, item.reason, item.location)
            continue
        try:
            examples.append(parse(item.fields, columns))
            index.append(i)
        except BadRecordError as e:
            out[i] = (0, str(e), item.location)
    for i, built in zip(index, build.build_many(examples), strict=True):
        if isinstance(built, BadRecordError):
            out[i] = (1, str(built), items[i].location)
        else:
            out[i] = built if isinstance(built, list) else [built]
    return out


class _Arrays:
    """A file's samples, gathered as they come back from the workers."""

    def __init__(self):
        self.records = [0]
        self.lines: list[int] = []
        self.offsets: list[int] = []
        self.ids: list[int] = []
        self.id_starts = [0]
        self.targets: list[int] = []
        self.target_starts = [0]
        self.token_types: list[int] = []
        self.decoder_ids: list[int] = []
        self.span_end: list[int] = []
        self.truncated: list[bool] = []
        self.bad: list[list] = []
        self.skipped: Counter = Counter()
        self.kinds: set = set()

    def add(self, record: int, result) -> None:
        if isinstance(result, tuple):
            stage, reason, location = result
            self.bad.append([record, stage, reason, location])
            self.skipped[reason.split(" (")[0]] += 1
        else:
            for s in result:
                self.ids += s.input_ids
                self.id_starts.append(len(self.ids))
                if isinstance(s.targets, int):
                    self.targets.append(s.targets)
                else:
                    self.targets += s.targets
                    self.target_starts.append(len(self.targets))
                if s.token_type_ids is not None:
                    self.token_types += s.token_type_ids
                if s.decoder_input_ids is not None:
                    self.decoder_ids += s.decoder_input_ids
                if s.span_end is not None:
                    self.span_end.append(s.span_end)
                self.truncated.append(s.truncated)
                self.kinds.add((isinstance(s.targets, int), s.token_type_ids is not None,
                                s.decoder_input_ids is not None, s.span_end is not None))
        self.records.append(len(self.truncated))

    def write(self, directory: Path, meta: dict) -> None:
        if len(self.kinds) > 1:
            raise RuntimeError(f"samples of different shapes in one file: {self.kinds}")
        scalar, types, decoder, span = next(iter(self.kinds)) if self.kinds else (False, False, False, False)
        arrays = {"records": (self.records, np.int64), "lines": (self.lines, np.int64),
                  "offsets": (self.offsets, np.int64), "ids": (self.ids, np.int32),
                  "id_starts": (self.id_starts, np.int64), "truncated": (self.truncated, np.bool_),
                  "targets": (self.targets, np.int64 if scalar else np.int32)}
        if not scalar:
            arrays["target_starts"] = (self.target_starts, np.int64)
        if types:
            arrays["token_types"] = (self.token_types, np.int8)
        if decoder:
            arrays["decoder_ids"] = (self.decoder_ids, np.int32)
        if span:
            arrays["span_end"] = (self.span_end, np.int32)
        for name, (values, dtype) in arrays.items():
            np.save(directory / f"{name}.npy", np.asarray(values, dtype=dtype))
        (directory / "bad.json").write_text(json.dumps(self.bad, ensure_ascii=False))
        meta = {**meta, "format": CACHE_FORMAT, "scalar_targets": scalar, "records": len(self.lines),
                "samples": len(self.truncated), "tokens": len(self.ids), "truncated": int(sum(self.truncated)),
                "bad": len(self.bad), "skipped": dict(self.skipped)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def _chunks(source: DataSource, path: str, arrays: _Arrays):
    batch = []
    for line, offset, parse in iter_file(path, format=source.format, target=target_files(source).get(path)):
        arrays.lines.append(line)
        arrays.offsets.append(offset)
        batch.append(parse())
        if len(batch) == CHUNK_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Prepared:
    path: str
    entry: str
    built: bool
    """False: a fresh entry was already there."""
    meta: dict
    seconds: float = 0.0


def prepare_source(source: DataSource, where: str, build: SampleBuilder, cache_dir: str, *, workers: int,
                   on_file=None) -> list[Prepared]:
    """Write the missing or stale entries of one source's files (one pool of `workers` processes)."""
    import multiprocessing

    files = [f for f in list_files(source, where) if not is_hub_dataset(f)]
    done, pool = [], None
    try:
        for path in files:
            parts = key_parts(source, path, build)
            directory = Path(cache_dir) / digest(parts)
            if directory.is_dir():
                try:
                    done.append(Prepared(path, str(directory), False, CacheEntry(directory).meta))
                    _write_pointer(cache_dir, path, parts)
                    if on_file:
                        on_file(done[-1])
                    continue
                except (OSError, ValueError, KeyError, TypeError):
                    shutil.rmtree(directory, ignore_errors=True)  # damaged: rebuilt below
            start = time.perf_counter()
            arrays = _Arrays()
            if workers > 1 and pool is None:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
                pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (build, source))
            if pool is None:
                _init_worker(build, source)
                results = map(_tokenize_chunk, _chunks(source, path, arrays))
            else:
                results = pool.imap(_tokenize_chunk, _chunks(source, path, arrays))
            record = 0
            for chunk in results:
                for result in chunk:
                    arrays.add(record, result)
                    record += 1
            tmp = Path(cache_dir) / f".{directory.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            arrays.write(tmp, {"key": parts, "source": where})
            try:
                os.rename(tmp, directory)
            except OSError:  # another process wrote the same entry meanwhile: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            _write_pointer(cache_dir, path, parts)
            done.append(Prepared(path, str(directory), True, CacheEntry(directory).meta, time.perf_counter() - start))
            if on_file:
                on_file(done[-1])
    finally:
        if pool is not None:
            pool.terminate()
    return done


def _write_pointer(cache_dir: str, path: str, parts: dict) -> None:
    pointer = _path_pointer(cache_dir, path)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"path": os.path.abspath(path), "parts": parts}, default=str) + "\n")
    os.replace(tmp, pointer)


def describe_missing(where: str, lookup: Lookup, cache_dir: str) -> str:
    first = next(iter(lookup.missing.items()))
    more = f" (and {len(lookup.missing) - 1} more files)" if len(lookup.missing) > 1 else ""
    return f"{where}: no fresh tokenized cache in {cache_dir} for {first[0]}: {first[1]}{more}"


def require_message(where: str, lookup: Lookup, cache_dir: str) -> str:
    return (describe_missing(where, lookup, cache_dir) + "; run `bigsft data prepare CONFIG` first, or set "
            "data.cache=auto to tokenize while streaming")

