"""The data side of a run, assembled: what the recipe calls.

`setup_data` runs before any process group exists: it fixes the label names, builds the tokenizing
function and scans the first records of every source, so systematically bad data stops the run with
exit code 2 before anything starts. `train_stream` and `eval_sets` then build each rank's
streams once ranks are known.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from bigsft.batch_math import BatchMath
from bigsft.config import ConfigError, DataConfig, DataSource, ModelConfig
from bigsft.data.batching import Batch, Packer
from bigsft.data.cache import HUB_NOT_CACHED, CacheEntry, describe_missing, look_up, require_message
from bigsft.data.formats import CONVERSATION_FORMATS
from bigsft.data.plan import PlannedStream, open_plan
from bigsft.data.scan import SplitStats, label_names, scan, tag_names
from bigsft.data.sources import Holdout, count_records, holdout_threshold, list_files
from bigsft.data.stream import MixedStream, TrainStream, batches_once, source_names, source_streams
from bigsft.data.tokenize import SampleBuilder, keep_chat_template


@dataclass
class RunData:
    build: SampleBuilder
    id2label: dict[int, str] | None
    weights: list[float]
    """Sampling weights of the training sources."""
    scanned: dict[str, SplitStats]
    holdout_thresholds: list[int] | None = None
    """data.validation: per training source, the hash threshold of its held-out records."""
    caches: list[dict[str, CacheEntry] | None] = field(default_factory=list)
    """Per training source, its files' tokenized cache entries (None: the source is tokenized while streaming)."""
    cache_notes: list[str] = field(default_factory=list)
    """What the run says about the cache at start-up (which sources it reads, which it does not and why)."""
    cache_dir: str | None = None

    def holdouts(self, keep: str) -> list[Holdout | None]:
        if self.holdout_thresholds is None:
            return []
        return [Holdout(t, keep=keep) for t in self.holdout_thresholds]


def classification_labels(data: DataConfig, model: ModelConfig) -> dict[int, str]:
    names = label_names(data.train, model.labels)
    n = model.num_labels or len(names or [])
    if names is not None and len(names) != n:
        raise ConfigError(
            f"data.train: the labels are named {names} ({len(names)} classes) but model.num_labels is {n}; "
            "list the names in id order in model.labels"
        )
    return dict(enumerate(names)) if names else {i: f"LABEL_{i}" for i in range(n)}


def tagging_labels(data: DataConfig, model: ModelConfig) -> dict[int, str]:
    names = tag_names(data.train, model.labels)
    n = model.num_labels or len(names or [])
    if names is None and not n:
        raise ConfigError("model.num_labels: required for token_classification when the tags are ids (or list the tag "
                          "names in id order in model.labels)")
    if names is not None and len(names) != n:
        raise ConfigError(f"data.train: the tags are {names} ({len(names)}) but model.num_labels is {n}; list the "
                          "names in id order in model.labels")
    return dict(enumerate(names)) if names else {i: f"LABEL_{i}" for i in range(n)}


def source_weights(sources: list[DataSource]) -> list[float]:
    """Configured weights, or (none configured) each source's number of records."""
    if len(sources) == 1:
        return [1.0]
    if all(s.weight is not None for s in sources):
        return [float(s.weight) for s in sources]
    return [float(count_records(s, f"data.train[{i}]")) or 1.0 for i, s in enumerate(sources)]


def data_cache_dir(cfg) -> str:
    """data.cache_dir, else `data_cache` beside the run's output_dir."""
    return cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "data_cache")


def find_caches(data: DataConfig, build: SampleBuilder, cache_dir: str | None) -> tuple[list, list[str]]:
    """Per training source, its fresh cache entries by file, when every file has one (else None), and the notes
    the run prints; ConfigError under `data.cache: require` when a file has none."""
    if cache_dir is None or data.cache == "off":
        return [], []
    caches, notes = [], []
    for i, source in enumerate(data.train):
        where = f"data.train[{i}]"
        lookup = look_up(source, list_files(source, where), build, cache_dir)
        if lookup.missing and data.cache == "require":
            raise ConfigError(require_message(where, lookup, cache_dir))
        if lookup.missing:
            caches.append(None)
            reasons = set(lookup.missing.values())
            if not lookup.entries and reasons == {HUB_NOT_CACHED}:
                notes.append(f"{where}: a hub dataset, tokenized while streaming")
            elif lookup.entries or reasons != {"not prepared"}:
                notes.append(describe_missing(where, lookup, cache_dir) + "; tokenizing the source while streaming "
                             "(`bigsft data prepare CONFIG` rebuilds)")
            else:
                notes.append(f"{where}: tokenized while streaming (`bigsft data prepare CONFIG` writes a tokenized "
                             f"cache to {cache_dir})")
        else:
            caches.append(lookup.entries)
            n = sum(e.meta["samples"] for e in lookup.entries.values())
            notes.append(f"{where}: read from the tokenized cache ({len(lookup.entries)} files, {n} samples)")
    return caches, notes


def setup_data(data: DataConfig, model: ModelConfig, tokenizer, *, cache_dir: str | None = None) -> RunData:
    id2label = None
    if model.task == "sequence_classification":
        id2label = classification_labels(data, model)
    elif model.task == "token_classification":
        id2label = tagging_labels(data, model)
    decoder_start = target_end = None
    if model.task == "seq2seq_lm":
        from bigsft.model import load_hf_config, seq2seq_token_ids

        decoder_start, target_end = seq2seq_token_ids(model, load_hf_config(model), tokenizer)
    build = SampleBuilder(
        tokenizer, max_length=data.max_length, system_prompt=data.system_prompt, chat_template=data.chat_template,
        train_on=data.train_on, truncation=data.truncation,
        label2id={v: k for k, v in id2label.items()} if id2label else None,
        num_labels=len(id2label) if id2label else None, subtoken_labels=data.subtoken_labels,
        doc_stride=data.doc_stride, max_target_length=data.max_target_length, decoder_start=decoder_start,
        target_end=target_end,
    )
    if model.task == "causal_lm" and any(s.format in CONVERSATION_FORMATS for s in data.train):
        keep_chat_template(tokenizer, build)
    scanned = {"train": scan(data.train, "train", build, data.max_bad_fraction)}
    if data.eval:
        scanned["eval"] = scan(data.eval, "eval", build.for_eval(), data.max_bad_fraction)
    thresholds = None
    if data.validation is not None:
        thresholds = [holdout_threshold(s, f"data.train[{i}]", data.validation) for i, s in enumerate(data.train)]
    caches, notes = find_caches(data, build, cache_dir)
    return RunData(build, id2label, source_weights(data.train), scanned, thresholds, caches, notes,
                   cache_dir if caches else None)


def train_stream(data: DataConfig, run_data: RunData, stats: SplitStats, *, seed: int, batch: BatchMath, dp_rank: int,
                 pad_id: int, steps: int | None = None, planned: bool = True) -> TrainStream | PlannedStream:
    """This rank's training windows: read from the data plan when the tokenized cache has one for this run (and it
    covers `steps` optimizer steps), else walked. Both give the same batches; `plan_note` says which and why."""
    def walk() -> TrainStream:
        streams = source_streams(data.train, "train", run_data.build, stats, seed=seed, dp_rank=0, dp_size=1,
                                 train=True, buffer_size=data.shuffle_buffer, holdouts=run_data.holdouts("train"),
                                 caches=run_data.caches)
        mixed = MixedStream(streams, run_data.weights, seed=seed)
        return TrainStream(mixed, batch=batch, dp_rank=dp_rank, pad_id=pad_id,
                           pad_to_multiple_of=data.pad_to_multiple_of,
                           packer=Packer(data.max_length) if data.packing else None)

    note = ""
    if planned and run_data.cache_dir is not None:
        plan, note = open_plan(data, run_data, run_data.cache_dir, seed=seed)
        if plan is not None and steps is not None and plan.rows < steps * batch.global_batch_size:
            note = (f"the data plan covers {plan.rows} rows, {steps} steps of {batch.global_batch_size} need "
                    f"{steps * batch.global_batch_size} (`bigsft data prepare CONFIG --epochs N` plans more)")
        elif plan is not None:
            stream = PlannedStream(plan, stats, batch=batch, dp_rank=dp_rank, pad_id=pad_id,
                                   pad_to_multiple_of=data.pad_to_multiple_of, packing=data.packing,
                                   n_sources=len(data.train), walk=walk)
            stream.plan_note = f"data: windows read from the data plan {plan.dir} ({plan.rows} rows)"
            return stream
    stream = walk()
    stream.plan_note = f"data: every rank walks the global stream ({note})" if note else ""
    return stream


def windows_in_first_epoch(stream: TrainStream | PlannedStream) -> int:
    """Complete global windows (optimizer steps) before every source has been through once."""
    if isinstance(stream, PlannedStream) and stream.walked is None:
        return stream.first_epoch_windows()
    windows = 0
    while True:
        stream.next_global_window()
        if stream.mixed.epochs_completed() >= 1:
            return windows
        windows += 1


VALIDATION = "validation"
"""The name of the eval set data.validation holds out of the training sources."""


def eval_set_names(data: DataConfig) -> list[str]:
    """Each eval source's name (its `name`, else its file's), then `validation` for data.validation's records.
    A name that is a metric's (`loss`, `f1`, ...) or already taken gets a suffix."""
    from bigsft.evaluate import RESERVED_SET_NAMES

    names: list[str] = []
    for name in source_names(data.eval) + ([VALIDATION] if data.validation is not None else []):
        base = name if name not in RESERVED_SET_NAMES else f"{name}_set"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def eval_sets(data: DataConfig, run_data: RunData, stats: SplitStats, *, batch: BatchMath, dp_rank: int,
              pad_id: int) -> list[tuple[str, Iterator[Batch]]]:
    """(name, this rank's batches) of each eval set: every eval source, then the training sources'
    held-out records (data.validation) as one set. One pass each, in order; every sample on exactly one
    rank."""
    def once(streams):
        return batches_once(streams, micro_batch_size=batch.eval_micro, pad_id=pad_id,
                            pad_to_multiple_of=data.pad_to_multiple_of,
                            packer=Packer(data.max_length) if data.packing else None)

    share = {"dp_rank": dp_rank, "dp_size": batch.data_parallel_size, "train": False, "buffer_size": 128, "seed": 0}
    build = run_data.build.for_eval()
    sets = [[stream] for stream in source_streams(data.eval, "eval", build, stats, **share)]
    if data.validation is not None:
        sets.append(source_streams(data.train, "train", build, stats, holdouts=run_data.holdouts("validation"), **share))
    return [(name, once(streams)) for name, streams in zip(eval_set_names(data), sets, strict=True)]


def eval_batches(data: DataConfig, run_data: RunData, stats: SplitStats, *, batch: BatchMath, dp_rank: int,
                 pad_id: int) -> Iterator[Batch]:
    """This rank's batches of every eval set, one set after the other."""
    for _, batches in eval_sets(data, run_data, stats, batch=batch, dp_rank=dp_rank, pad_id=pad_id):
        yield from batches
