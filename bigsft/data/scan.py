"""Counting what the data holds: skipped records by reason, a scan before launch, label names."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from bigsft.config import ConfigError, DataSource
from bigsft.data.formats import BadRecordError, Example, Labeled, TaggedTokens, parser_for
from bigsft.data.sources import BadRecord, read_source
from bigsft.data.tokenize import Sample

REPORTED_BAD_RECORDS = 5
SCAN_RECORDS = 256
"""Records per source parsed and tokenized before launch, to fail fast on systematically bad data."""


@dataclass
class SplitStats:
    records: int = 0
    samples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_bad: list[str] = field(default_factory=list)

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason.split(" (")[0]] += 1
        if len(self.first_bad) < REPORTED_BAD_RECORDS:
            self.first_bad.append(f"{location}: {reason}")

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad / max(1, self.records)

    def state_dict(self) -> dict:
        return {"records": self.records, "samples": self.samples, "truncated": self.truncated,
                "skipped": dict(self.skipped), "first_bad": list(self.first_bad)}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.samples, self.truncated = state["records"], state["samples"], state["truncated"]
        self.skipped, self.first_bad = Counter(state["skipped"]), list(state["first_bad"])


def too_many_bad(split: str, records: int, bad: int, max_bad_fraction: float, stats: SplitStats | None = None) -> str:
    """The message when more than `max_bad_fraction` of the records are unusable, else ''."""
    if records == 0 or bad / records <= max_bad_fraction:
        return ""
    detail = ""
    if stats is not None:
        counts = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.most_common())
        detail = f": {counts}. First: {'; '.join(stats.first_bad)}"
    return (f"data.{split}: {bad} of {records} records are unusable "
            f"({bad / records:.1%} > data.max_bad_fraction={max_bad_fraction}){detail}")


def parse_records(items: Iterable, parse: Callable, columns, stats: SplitStats) -> tuple[list[Example], list[str]]:
    """Each record parsed, with its `file:line`; unreadable and unparsable ones counted in `stats`."""
    examples, where = [], []
    for item in items:
        if isinstance(item, BadRecord):
            stats.skip(item.reason, item.location)
            continue
        try:
            examples.append(parse(item.fields, columns))
            where.append(item.location)
        except BadRecordError as e:
            stats.skip(str(e), item.location)
    return examples, where


def usable_samples(built: Iterable[Sample | BadRecordError], where: Sequence[str], stats: SplitStats) -> list[Sample]:
    """The samples that tokenized (`built`: a Sample or the BadRecordError of each example); the rest counted."""
    samples = []
    for sample, location in zip(built, where, strict=True):
        if isinstance(sample, BadRecordError):
            stats.skip(str(sample), location)
            continue
        for window in sample if isinstance(sample, list) else [sample]:  # QA: one sample per context window
            stats.samples += 1
            stats.truncated += window.truncated
            samples.append(window)
    return samples


def read_examples(sources: Sequence[DataSource], split: str, stats: SplitStats,
                  limit: int | None = None) -> list[tuple[Example, str]]:
    """Parsed examples with their `file:line` (the first `limit` records per source); bad ones counted."""
    examples: list[tuple[Example, str]] = []
    for i, source in enumerate(sources):
        items = list(itertools.islice(read_source(source, f"data.{split}[{i}]"), limit))
        stats.records += len(items)
        examples += zip(*parse_records(items, parser_for(source), source.columns, stats), strict=True)
    return examples


def build_samples(examples: Sequence[tuple[Example, str]], build: Callable[[Example], Sample],
                  stats: SplitStats) -> list[Sample]:
    built: list[Sample | BadRecordError] = []
    for example, _ in examples:
        try:
            built.append(build(example))
        except BadRecordError as e:
            built.append(e)
    return usable_samples(built, [location for _, location in examples], stats)


def scan(sources: Sequence[DataSource], split: str, build: Callable[[Example], Sample], max_bad_fraction: float,
         limit: int = SCAN_RECORDS) -> SplitStats:
    """Parse and tokenize the first records of every source; ConfigError when they are mostly unusable."""
    stats = SplitStats()
    build_samples(read_examples(sources, split, stats, limit=limit), build, stats)
    if stats.records == 0:
        raise ConfigError(f"data.{split}: the sources hold no records")
    if stats.samples == 0:
        raise ConfigError(f"data.{split}: none of the first {stats.records} records is usable: "
                          + "; ".join(stats.first_bad))
    message = too_many_bad(split, stats.records, stats.bad, max_bad_fraction, stats)
    if message:
        raise ConfigError(message + f" (in the first {limit} records of each source)")
    return stats


def _parsed(sources: Sequence[DataSource]) -> Iterable[Example]:
    """Every training example that parses (bad records are the scan's and the stream's to report)."""
    for i, source in enumerate(sources):
        parse = parser_for(source)
        for item in read_source(source, f"data.train[{i}]"):
            if isinstance(item, BadRecord):
                continue
            try:
                yield parse(item.fields, source.columns)
            except BadRecordError:
                continue


def label_names(sources: Sequence[DataSource], configured: Sequence[str] | None) -> list[str] | None:
    """Class names in id order: the configured ones, else the sorted names found in the data."""
    if configured:
        return list(configured)
    names = {e.label for e in _parsed(sources) if isinstance(e, Labeled) and isinstance(e.label, str)}
    return sorted(names) if names else None


_TAG_PREFIXES = {"B": 0, "I": 1, "E": 2, "L": 2, "S": 3, "U": 3}
"""BIO / BIOES / BILOU position markers, in the order a tag set lists them."""


def _tag_order(tag: str) -> tuple:
    prefix, sep, entity = tag.partition("-")
    if tag == "O":
        return (0, "", 0)
    if sep and prefix in _TAG_PREFIXES:
        return (1, entity, _TAG_PREFIXES[prefix])
    return (1, tag, -1)  # a tag without a position marker (IO scheme): before its B-/I- relatives, if any


def tag_names(sources: Sequence[DataSource], configured: Sequence[str] | None) -> list[str] | None:
    """Tag names in id order for token classification: the configured ones, else every tag name in the
    training sources, "O" first, then by entity type with B- before I- (O, B-LOC, I-LOC, B-ORG, ...).
    None when the data gives tags as integer ids."""
    if configured:
        return list(configured)
    names: set[str] = set()
    ids = False
    for example in _parsed(sources):
        if isinstance(example, TaggedTokens):
            for tag in example.tags:
                if isinstance(tag, str):
                    names.add(tag)
                else:
                    ids = True
    if names and ids:
        raise ConfigError("data.train: some sources give tags as names and others as integer ids; use one kind, "
                          "or list the names in id order in model.labels")
    return sorted(names, key=_tag_order) if names else None
