"""Data: sources and bad records, formats, loss masks, padding, rank sharding of train and eval."""

from __future__ import annotations

import gzip
import json

import pytest
from transformers import AutoTokenizer

from bigsft.config import ConfigError, DataSource
from bigsft.data.batching import collate
from bigsft.data.formats import PARSERS, BadRecordError, Completion, Conversation, Labeled
from bigsft.data.loader import (
    SplitStats,
    TrainBatches,
    build_samples,
    check_bad_fraction,
    eval_shard,
    read_examples,
)
from bigsft.data.sources import BadRecord, Record, list_files, read_source
from bigsft.data.tokenize import DEFAULT_CHAT_TEMPLATE, IGNORE, Sample, SampleBuilder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.pad_token = t.eos_token
    return t


def trained_text(tok, sample: Sample) -> str:
    """The tokens that carry a loss, decoded (targets are shifted: position t predicts t+1)."""
    return tok.decode([t for t in sample.targets if t != IGNORE])


# -- sources ---------------------------------------------------------------------------------------

def test_jsonl_malformed_lines_are_reported_not_fatal(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n\n[1, 2]\n{"prompt": "c", "completion": "d"}\n')
    items = list(read_source(DataSource(path=str(f), format="prompt_completion"), "data.train[0]"))
    assert [type(i) for i in items] == [Record, BadRecord, BadRecord, Record]
    assert items[1].location == f"{f}:2" and "malformed JSON" in items[1].reason
    assert items[2].location == f"{f}:4" and items[2].reason == "not a JSON object"


def test_json_csv_tsv_gz_parquet_dirs_and_globs(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows))
    (tmp_path / "d" / "b.csv").write_text('text,label\n"good, really",pos\n')
    (tmp_path / "d" / "c.tsv").write_text("text\tlabel\nmeh\tneg\n")
    with gzip.open(tmp_path / "d" / "e.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "f.parquet")
    source = DataSource(path=str(tmp_path / "d"), format="classification")
    records = [r for r in read_source(source, "x") if isinstance(r, Record)]
    assert len(records) == 2 + 1 + 1 + 1 + 2
    assert records[2].fields == {"text": "good, really", "label": "pos"}
    globbed = list_files(DataSource(path=str(tmp_path / "d" / "*.json"), format="classification"), "x")
    assert globbed == [str(tmp_path / "d" / "a.json")]


@pytest.mark.parametrize(("path", "message"), [
    ("nope.jsonl", "does not exist"), ("*.nomatch", "matches no file"), ("emptydir", "holds no"),
    ("x.txt", "unknown file type"),
])
def test_bad_paths(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match=message):
        list_files(DataSource(path=path, format="text"), "data.train[0]")


def test_real_sst2_tsv_reads_with_column_remap(shared_data):
    source = DataSource(path=str(shared_data / "sst2_dev.tsv"), format="classification",
                        columns={"text": "content"})
    stats = SplitStats()
    examples = read_examples([source], "eval", stats)
    assert stats.records == 872 and not stats.skipped
    assert {ex.label for ex, _ in examples} == {0, 1}


# -- formats ---------------------------------------------------------------------------------------

def test_alpaca_builds_user_and_assistant_turns_with_system_and_history():
    rec = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
           "history": [["hi", "hello"]]}
    conv = PARSERS["alpaca"](rec, {})
    assert conv == Conversation([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"}])


def test_field_remapping():
    rec = {"question": "2+2?", "answer": "4"}
    assert PARSERS["prompt_completion"](rec, {"prompt": "question", "completion": "answer"}) == Completion("2+2?", "4")


def test_sharegpt_maps_tool_turns(shared_data):
    data = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())
    conv = PARSERS["sharegpt"](data[0], {})
    roles = [m["role"] for m in conv.messages]
    assert "tool" in roles and roles.count("assistant") >= 2


@pytest.mark.parametrize(("fmt", "record", "reason"), [
    ("alpaca", {"instruction": "x"}, "missing field 'output'"),
    ("alpaca", {"instruction": "x", "output": "  "}, "empty output"),
    ("alpaca", {"instruction": 3, "output": "y"}, "field 'instruction' should be text"),
    ("messages", {"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "unknown role 'alien'"),
    ("classification", {"text": "x", "label": True}, "field 'label' should be"),
    ("classification", {"text": "bad \ufffd bytes", "label": 1}, "undecodable bytes"),
    ("text", {"text": ""}, "empty text"),
])
def test_bad_records(fmt, record, reason):
    with pytest.raises(BadRecordError, match=reason):
        PARSERS[fmt](record, {})


def test_classification_labels_from_csv_strings_become_ids():
    assert PARSERS["classification"]({"text": "x", "label": "1"}, {}) == Labeled("x", None, 1)
    assert PARSERS["classification"]({"text": "x", "label": " pos "}, {}) == Labeled("x", None, "pos")


# -- tokenization and loss masks -------------------------------------------------------------------

def test_conversation_trains_only_assistant_turns_and_eos(tok):
    build = SampleBuilder(tok, max_length=512, system_prompt="You help.")
    conv = Conversation([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 plus 3 is 5."},
                         {"role": "user", "content": "Spell stone backwards."},
                         {"role": "assistant", "content": "enots"}])
    sample = build(conv)
    assert len(sample.targets) == len(sample.input_ids)
    text = trained_text(tok, sample)
    assert "2 plus 3 is 5." in text and "enots" in text
    assert "Add 2" not in text and "You help" not in text and "user" not in text
    assert text.count(tok.eos_token) == 2  # EOS ends every assistant turn and is trained
    full = tok.decode(sample.input_ids)
    assert full.startswith("<|im_start|>system\nYou help.")


def test_targets_are_shifted_by_one(tok):
    sample = SampleBuilder(tok, max_length=512)(Completion("Q: capital of Peru?", " Lima"))
    for t, target in enumerate(sample.targets):
        if target != IGNORE:
            assert target == sample.input_ids[t + 1]
    assert sample.targets[-1] == IGNORE
    assert trained_text(tok, sample) == " Lima" + tok.eos_token


def test_eos_is_trained_even_when_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    sample = SampleBuilder(tok, max_length=512)(Completion("Hi", " there"))
    batch = collate([sample, SampleBuilder(tok, max_length=512)(Completion("A longer prompt here", " yes"))],
                    pad_id=tok.pad_token_id)
    assert tok.eos_token_id in batch.targets[0].tolist()  # masked by position, not by token id
    assert batch.targets[0, len(sample.input_ids):].eq(IGNORE).all()


def test_own_chat_template_is_used(tok):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    sample = SampleBuilder(tok, max_length=512, chat_template=template)(
        Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    assert tok.decode(sample.input_ids).startswith("[user] hi")
    assert trained_text(tok, sample).strip() == "hello"


def test_truncation_keeps_prompt_and_drops_samples_without_trained_tokens(tok):
    build = SampleBuilder(tok, max_length=16)
    long_answer = build(Completion("Hi", " " + "apple " * 40))
    assert len(long_answer.input_ids) == 16 and long_answer.num_targets > 0
    with pytest.raises(BadRecordError, match="no trained token within data.max_length=16"):
        build(Completion("word " * 40, " answer"))


def test_classification_maps_names_and_checks_ids(tok):
    build = SampleBuilder(tok, max_length=32, label2id={"neg": 0, "pos": 1}, num_labels=2)
    assert build(Labeled("fine", None, "pos")).targets == 1
    with pytest.raises(BadRecordError, match="unknown label 'meh'"):
        build(Labeled("x", None, "meh"))
    with pytest.raises(BadRecordError, match="label 7 outside 0..1"):
        build(Labeled("x", None, 7))


def test_default_template_is_chatml_with_eos():
    assert "<|im_start|>" in DEFAULT_CHAT_TEMPLATE and "eos_token" in DEFAULT_CHAT_TEMPLATE


# -- padding ---------------------------------------------------------------------------------------

def test_collate_pads_to_longest_in_batch_not_max_length():
    samples = [Sample([1, 2, 3], [2, 3, IGNORE]), Sample([4, 5, 6, 7, 8], [5, IGNORE, 7, 8, IGNORE])]
    batch = collate(samples, pad_id=0)
    assert batch.inputs["input_ids"].shape == (2, 5)
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.targets[0].tolist() == [2, 3, IGNORE, IGNORE, IGNORE]
    assert batch.num_targets == 5 and batch.num_tokens == 8
    assert collate(samples, pad_id=0, pad_to_multiple_of=8).inputs["input_ids"].shape == (2, 8)


# -- rank sharding ---------------------------------------------------------------------------------

def _numbered(n: int) -> list[Sample]:
    return [Sample([i + 1] * (1 + i % 5), [IGNORE] * (i % 5) + [i + 1]) for i in range(n)]


def _ids(batches) -> list[int]:
    return [int(row[0]) - 1 for b in batches for row in b.inputs["input_ids"]]


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_train_windows_are_disjoint_complete_and_world_size_independent(dp):
    samples = _numbered(50)
    per_step = 12  # global batch: micro 2 × accumulation (6 // dp) × dp
    ranks = [TrainBatches(samples, micro_batch_size=2, gradient_accumulation_steps=6 // dp, dp_rank=r, dp_size=dp,
                          seed=7, pad_id=0) for r in range(dp)]
    assert ranks[0].steps_per_epoch == 50 // per_step
    for step in range(2 * ranks[0].steps_per_epoch):
        seen = [_ids(b.window(step)) for b in ranks]
        flat = sorted(i for s in seen for i in s)
        assert len(flat) == len(set(flat)) == per_step
        reference = sorted(_ids(TrainBatches(samples, micro_batch_size=2, gradient_accumulation_steps=6,
                                             dp_rank=0, dp_size=1, seed=7, pad_id=0).window(step)))
        assert flat == reference  # the same global batch whatever the world size
    epoch0 = {i for s in range(4) for b in ranks for i in _ids(b.window(s))}
    assert len(epoch0) == 48  # one epoch covers all but the incomplete last global batch
    assert _ids(ranks[0].window(0)) != _ids(ranks[0].window(4))  # reshuffled next epoch


def test_too_little_data_for_one_global_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        TrainBatches(_numbered(10), micro_batch_size=4, gradient_accumulation_steps=2, dp_rank=0, dp_size=2,
                     seed=0, pad_id=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_count_every_sample_once(world):
    samples = _numbered(11)
    seen = [i for r in range(world) for i in _ids(eval_shard(samples, micro_batch_size=2, rank=r, world_size=world,
                                                               pad_id=0))]
    assert sorted(seen) == list(range(11))


def test_bad_fraction_aborts_with_counts_and_first_locations(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(['{"prompt": "p", "completion": "c"}\n'] * 8 + ['{"prompt": "p"}\n', "oops\n"]))
    stats = SplitStats()
    examples = read_examples([DataSource(path=str(f), format="prompt_completion")], "train", stats)
    assert len(examples) == 8 and stats.records == 10
    check_bad_fraction(stats, "train", 0.5)
    with pytest.raises(ConfigError) as info:
        check_bad_fraction(stats, "train", 0.1)
    text = str(info.value)
    assert "2 of 10 records are unusable" in text and "1 missing field 'completion'" in text
    assert f"{f}:9: missing field 'completion'" in text and f"{f}:10: malformed JSON" in text


def test_build_samples_counts_failures(tok):
    stats = SplitStats()
    pairs = [(Completion("hi", " there"), "f:1"), (Completion("word " * 50, " x"), "f:2")]
    samples = build_samples(pairs, SampleBuilder(tok, max_length=16), stats)
    assert len(samples) == 1 and stats.first_bad == ["f:2: no trained token within data.max_length=16"]
