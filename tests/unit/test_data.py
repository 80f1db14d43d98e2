"""Data: readers and bad records, formats, chat templates and loss masks, truncation, padding."""

from __future__ import annotations

import gzip
import json

import pytest
from transformers import AutoTokenizer

from bigsft.config import ConfigError, DataSource
from bigsft.data.batching import collate
from bigsft.data.formats import PARSERS, BadRecordError, Completion, Conversation, Labeled
from bigsft.data.scan import SplitStats, build_samples, read_examples
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
    with pytest.raises(BadRecordError, match="prompt fills data.max_length=16, no trained token left"):
        build(Completion("word " * 40, " answer"))
    assert long_answer.truncated
    with pytest.raises(BadRecordError, match="longer than data.max_length=16"):
        SampleBuilder(tok, max_length=16, truncation="drop")(Completion("Hi", " " + "apple " * 40))


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



def test_build_samples_counts_failures_and_truncation(tok):
    stats = SplitStats()
    pairs = [(Completion("hi", " there"), "f:1"), (Completion("word " * 50, " x"), "f:2"),
             (Completion("hi", " apple" * 30), "f:3")]
    samples = build_samples(pairs, SampleBuilder(tok, max_length=16), stats)
    assert len(samples) == 2 and stats.samples == 2 and stats.truncated == 1
    assert stats.first_bad == ["f:2: prompt fills data.max_length=16, no trained token left"]


# -- resumable readers -----------------------------------------------------------------------------

def _write_lines(path, n, opener=open):
    with opener(path, "wt") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"record {i}"}) + "\n")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".csv", ".json", ".parquet"])
def test_reader_resumes_mid_file_at_the_same_record(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    rows = [{"text": f"record {i}", "label": str(i % 2)} for i in range(23)]
    if suffix == ".jsonl":
        _write_lines(path, 23)
    elif suffix == ".jsonl.gz":
        _write_lines(path, 23, gzip.open)
    elif suffix == ".jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif suffix == ".csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    from bigsft.data.sources import EPOCH_END, SourceReader

    def reader():
        return SourceReader(DataSource(path=str(path), format="text"), [str(path)], seed=0, index=0, dp_rank=1,
                            dp_size=3, shuffle_files=False, cycle=True)

    first = reader()
    got = [first.next() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    rest = [first.next() for _ in range(10)]
    resumed = reader()
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(10)] == rest
    texts = [r.fields["text"] for r in got + rest if r is not EPOCH_END]
    assert texts[:4] == ["record 1", "record 4", "record 7", "record 10"]  # every third record, from the second
    assert EPOCH_END in rest


def _blank_lined(kind: str, rows: list[dict]) -> str:
    """A file of `rows` in `kind`, with blank lines between records (and quoted fields spanning lines)."""
    out = []
    for i, r in enumerate(rows):
        if kind == "jsonl":
            out.append(json.dumps(r) + "\n")
        elif kind == "tsv":
            out.append(f"{r['text']}\t{r['label']}\n")
        elif kind == "csv_multiline":
            out.append(f'"{r["text"]}\nsecond line, with a comma",{r["label"]}\n')
        else:
            out.append(f"{r['text']},{r['label']}\n")
        if i % 3 == 0:
            out.append("\n" * (1 + i % 2))
    header = {"jsonl": "", "tsv": "text\tlabel\n"}.get(kind, "text,label\n")
    return header + "\n" + "".join(out)


@pytest.mark.parametrize("kind", ["csv", "tsv", "csv_multiline", "jsonl"])
def test_reader_resumes_past_blank_lines_without_replaying_records(tmp_path, kind):
    from bigsft.data.sources import EPOCH_END, SourceReader

    rows = [{"text": f"record {i}", "label": str(i % 2)} for i in range(23)]
    path = tmp_path / f"d.{kind.split('_')[0]}"
    path.write_text(_blank_lined(kind, rows))

    def reader(dp_rank):
        return SourceReader(DataSource(path=str(path), format="text"), [str(path)], seed=0, index=0,
                            dp_rank=dp_rank, dp_size=2, shuffle_files=False, cycle=False)

    def texts(items):
        return [r.fields["text"].split("\n")[0] for r in items if r is not None and r is not EPOCH_END]

    for dp_rank in (0, 1):
        whole = reader(dp_rank)
        expected = texts(iter(whole.next, None))
        assert expected == [f"record {i}" for i in range(dp_rank, 23, 2)]  # every second record
        for stop in (1, 3, 5, 8):
            first = reader(dp_rank)
            got = [first.next() for _ in range(stop)]
            resumed = reader(dp_rank)
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            assert texts(got) + texts(iter(resumed.next, None)) == expected, (dp_rank, stop)
    bad = list(read_source(DataSource(path=str(path), format="text"), "x"))
    assert all(isinstance(r, Record) for r in bad) and len(bad) == 23


def test_malformed_json_array_file_is_an_error_not_a_silent_loss(tmp_path):
    from bigsft.data.sources import DataError

    (tmp_path / "a.json").write_text('[{"text": "ok"}, {"text": ')
    with pytest.raises(DataError, match=r"a\.json:1:\d+: malformed JSON .* the whole file is unreadable"):
        list(read_source(DataSource(path=str(tmp_path / "a.json"), format="text"), "x"))


def test_undecodable_line_is_one_bad_record(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    items = list(read_source(DataSource(path=str(f), format="text"), "x"))
    assert [type(i).__name__ for i in items] == ["Record", "BadRecord", "Record"]
    assert items[1].reason == "undecodable bytes (not UTF-8)" and items[1].location == f"{f}:2"


def test_hub_dataset_offline_is_a_clear_data_error(monkeypatch):
    from bigsft.data.sources import DataError, is_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_hub_dataset("tatsu-lab/alpaca") and not is_hub_dataset("data/train.jsonl")
    with pytest.raises(DataError, match="tatsu-lab/alpaca: cannot stream this hub dataset"):
        list(read_source(DataSource(path="tatsu-lab/alpaca", format="alpaca"), "x"))


# -- conversations with tools, and what carries the loss -------------------------------------------

def test_glaive_tool_calls_train_calls_and_answers_not_tool_results(tok, shared_data):
    data = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())
    record = next(r for r in data if any(t["from"] == "observation" for t in r["conversations"]))
    conv = PARSERS["sharegpt"](record, {})
    assert conv.tools and conv.tools[0]["type"] == "function"
    call = next(m for m in conv.messages if m.get("tool_calls"))
    sample = SampleBuilder(tok, max_length=4096)(conv)
    text = trained_text(tok, sample)
    full = tok.decode(sample.input_ids)
    observation = next(t["value"] for t in record["conversations"] if t["from"] == "observation")
    human = record["conversations"][0]["value"]
    assert "You may call these tools" in full and call["tool_calls"][0]["function"]["name"] in full
    assert '"name": "' + call["tool_calls"][0]["function"]["name"] in text  # the call is trained
    assert observation[:40] not in text and human[:40] not in text  # tool results and prompts are not
    final = record["conversations"][-1]["value"]
    assert final[:40] in text and text.count(tok.eos_token) == sum(m["role"] == "assistant" for m in conv.messages)


def test_openai_messages_with_tool_calls_and_content_parts():
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "It is 3 degrees."}],
        "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    conv = PARSERS["messages"](rec, {})
    assert conv.messages[0]["content"] == "Weather in Oslo?"
    assert conv.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert conv.messages[2]["tool_call_id"] == "c1"
    assert conv.tools == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(("train_on", "trained", "untrained"), [
    ("assistant", ["first answer", "second answer"], ["question one", "You help"]),
    ("last_assistant", ["second answer"], ["first answer", "question one"]),
    ("all", ["question one", "first answer", "second answer", "You help"], []),
])
def test_train_on_modes(tok, train_on, trained, untrained):
    conv = Conversation([{"role": "system", "content": "You help."}, {"role": "user", "content": "question one"},
                         {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "question two"},
                         {"role": "assistant", "content": "second answer"}])
    text = trained_text(tok, SampleBuilder(tok, max_length=512, train_on=train_on)(conv))
    assert all(t in text for t in trained) and not any(u in text for u in untrained)


# -- LLaMA-Factory v1 records: content parts with `value`, loss_weight, reasoning ------------------

_V1_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool"}


def llamafactory_v1(record: dict) -> dict:
    """A sharegpt record as LLaMA-Factory v1's converter writes it: content parts {"type", "value"},
    tool calls as `tool_call` parts, and a loss_weight on every message (1 for the model's turns)."""
    messages = []
    for turn in record["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(call)}],
                             "loss_weight": 1.0})
        else:
            messages.append({"role": _V1_ROLES[turn["from"]], "content": [{"type": "text", "value": turn["value"]}],
                             "loss_weight": 1.0 if turn["from"] == "gpt" else 0.0})
    return {"messages": messages, **({"tools": record["tools"]} if record.get("tools") else {})}


def test_llamafactory_v1_record_trains_exactly_like_its_sharegpt_original(tok, shared_data):
    data = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())
    record = next(r for r in data if any(t["from"] == "function_call" for t in r["conversations"]))
    build = SampleBuilder(tok, max_length=4096)
    v1 = PARSERS["messages"](llamafactory_v1(record), {})
    original = build(PARSERS["sharegpt"](record, {}))
    sample = build(v1)
    assert sample.input_ids == original.input_ids and sample.targets == original.targets
    gpt = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    text = trained_text(tok, sample)
    assert all(g[:40] in text for g in gpt) and record["conversations"][0]["value"][:40] not in text
    assert '"name": "search_recipes"' in text


def test_loss_weight_zero_leaves_an_assistant_turn_untrained_in_messages_and_sharegpt(tok):
    v1 = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "You are terse."}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "value": "Add 2 and 3."}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "first answer"}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "value": "Again?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "second answer"}], "loss_weight": 1.0}]}
    sharegpt = {"system": "You are terse.", "conversations": [
        {"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "first answer", "loss_weight": 0},
        {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "second answer"}]}
    for fmt, record in (("messages", v1), ("sharegpt", sharegpt)):
        sample = SampleBuilder(tok, max_length=512)(PARSERS[fmt](record, {}))
        text = trained_text(tok, sample)
        assert "second answer" in text and "first answer" not in text, fmt
        assert "first answer" in tok.decode(sample.input_ids) and text.count(tok.eos_token) == 1
        last = SampleBuilder(tok, max_length=512, train_on="last_assistant")(PARSERS[fmt](record, {}))
        assert last.targets == sample.targets


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0.5}]},
     r"assistant message with loss_weight 0\.5: only 0 \(not trained\) or 1 \(trained\) is supported"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": "1"}]},
     "assistant message with loss_weight '1'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
     "a text part of a user message has no text"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "hm"}, {"role": "assistant", "content": "a"}]},
     "reasoning_content belongs in assistant messages"),
])
def test_bad_loss_weights_and_parts_are_refused_with_the_reason(record, reason):
    with pytest.raises(BadRecordError, match=reason):
        PARSERS["messages"](record, {})


def test_loss_weights_that_leave_nothing_or_ask_for_a_user_turn_are_refused(tok):
    build = SampleBuilder(tok, max_length=512)
    none = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0}]}
    with pytest.raises(BadRecordError, match="no trained turn .every assistant message has loss_weight 0"):
        build(PARSERS["messages"](none, {}))
    user = {"messages": [{"role": "user", "content": "q", "loss_weight": 1}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(BadRecordError, match="user message with loss_weight 1: only assistant turns are trained"):
        build(PARSERS["messages"](user, {}))
    assert SampleBuilder(tok, max_length=512, train_on="all")(PARSERS["messages"](user, {})).num_targets > 0


def test_reasoning_is_kept_and_rendered_by_the_default_and_by_a_qwen3_style_template(tok):
    parts = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Capital of Peru?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Peru is in South America."},
                                          {"type": "text", "value": "Lima."}], "loss_weight": 1.0}]}
    openai = {"messages": [{"role": "user", "content": "Capital of Peru?"},
                           {"role": "assistant", "content": "Lima.", "reasoning_content": "Peru is in South America."}]}
    convs = [PARSERS["messages"](r, {}) for r in (parts, openai)]
    assert convs[0].messages == convs[1].messages
    assert convs[0].messages[1]["reasoning_content"] == "Peru is in South America."
    sample = SampleBuilder(tok, max_length=512)(convs[0])
    assert "<|im_start|>assistant\n<think>\nPeru is in South America.\n</think>\n\nLima.<|im_end|>" \
        in tok.decode(sample.input_ids)
    assert trained_text(tok, sample).startswith("<think>\nPeru is in South America.\n</think>\n\nLima.")
    qwen3_style = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                   "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
                   "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    own = SampleBuilder(tok, max_length=512, chat_template=qwen3_style)(convs[1])
    assert trained_text(tok, own).startswith("<think>Peru is in South America.</think>Lima.<|im_end|>")


def test_data_inspect_reads_llamafactory_v1_records_as_train_does(tmp_path, tok, llama_dir):
    from rich.console import Console

    from bigsft.config import load_config
    from bigsft.data import setup_data
    from bigsft.data.inspect import inspect

    from conftest import causal_config

    records = [{"messages": [
        {"role": "user", "content": [{"type": "text", "value": f"Add {i} and 1."}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": f"{i} plus 1 is {i + 1}."}], "loss_weight": 1.0}]}
        for i in range(6)]
    train = tmp_path / "v1.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(str(causal_config(tmp_path, llama_dir, train)), ["data.train.0.format=messages"])
    console = Console(record=True, width=200)
    summary = inspect(cfg, setup_data(cfg.data, cfg.model, tok), tok, show=1, console=console)
    assert summary["records"] == 6 and summary["samples"] == 6 and summary["skipped"] == {}
    build = SampleBuilder(tok, max_length=128)
    assert summary["trained_tokens"] == sum(build(PARSERS["messages"](r, {})).num_targets for r in records)
    assert "0 plus 1 is 1." in console.export_text()
