"""Formats of the tagging, extractive-QA and seq2seq tasks: CoNLL and token records, SQuAD files and
flat records, source/target records and line-aligned text files, their readers' resume, tag names and
the config rules that tie each format to its task."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter

import pytest

from bigsft.config import ConfigError, DataSource, config_from_dict
from bigsft.data.formats import PARSERS, BadRecordError, Extractive, Pair, TaggedTokens, parser_for
from bigsft.data.scan import tag_names
from bigsft.data.sources import (
    EPOCH_END,
    BadRecord,
    Record,
    SourceReader,
    count_records,
    list_files,
    read_source,
)

CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O"""
"""Four columns (word POS chunk NER), DOCSTART lines, and a last sentence without a final blank line."""


def parsed(source: DataSource) -> tuple[list, Counter, list[str]]:
    """Every example of a source, the bad records by reason, and their locations."""
    examples, bad, where = [], Counter(), []
    parse = parser_for(source)
    for item in read_source(source, "data.train[0]"):
        if isinstance(item, BadRecord):
            bad[item.reason] += 1
            where.append(item.location)
            continue
        try:
            examples.append(parse(item.fields, source.columns))
        except BadRecordError as e:
            bad[str(e)] += 1
            where.append(item.location)
    return examples, bad, where


def refused(fmt: str, record: dict, columns: dict | None = None) -> str:
    with pytest.raises(BadRecordError) as info:
        PARSERS[fmt](record, columns or {})
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Token classification


def test_wikiann_conll_one_record_per_sentence(shared_data):
    source = DataSource(path=str(shared_data / "wikiann_en_dev.conll"), format="conll")
    examples, bad, _ = parsed(source)
    assert len(examples) == 1000 and not bad  # the README's sentence count
    assert examples[0] == TaggedTokens(
        ["Sioux", "Falls", "Arena", "(", "Sioux", "Falls", ",", "South", "Dakota", ")"],
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "I-LOC", "I-LOC", "O"])
    assert examples[1].tokens == ["George", "Randolph", "Hearst", ",", "Jr", "."]
    assert examples[-1].tokens[-3:] == ["Regional", "County", "Municipality"]
    assert count_records(source, "data.train[0]") == 1000
    first = next(iter(read_source(source, "x")))
    assert first.location == f"{shared_data / 'wikiann_en_dev.conll'}:1"


def test_msra_chinese_conll_one_character_per_line(shared_data):
    source = DataSource(path=str(shared_data / "zh_ner_msra_sample.conll"), format="conll")
    examples, bad, _ = parsed(source)
    assert len(examples) == 1500 and not bad
    assert "".join(examples[0].tokens).startswith("在这里恕弟不恭之罪")
    assert all(len(t) == 1 for e in examples for t in e.tokens)
    assert {tag for e in examples for tag in e.tags} >= {"O", "B-PER", "I-PER", "B-LOC", "B-ORG"}
    assert count_records(source, "x") == 1500


def test_conll_2003_columns_docstart_and_a_trailing_sentence(tmp_path):
    path = tmp_path / "eng.testa.txt"  # the format picks the reader, whatever the suffix
    path.write_text(CONLL_2003)
    source = DataSource(path=str(path), format="conll")
    items = list(read_source(source, "x"))
    assert [r.location for r in items] == [f"{path}:3", f"{path}:9", f"{path}:14"]
    assert [PARSERS["conll"](r.fields, {}) for r in items] == [
        TaggedTokens(["EU", "rejects", "German", "call", "."], ["B-ORG", "O", "B-MISC", "O", "O"]),
        TaggedTokens(["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        TaggedTokens(["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
    ]
    assert count_records(source, "x") == 3


def test_conll_line_without_a_tag_spoils_its_sentence_only(tmp_path):
    path = tmp_path / "d.bio"
    path.write_text("a\tO\nb\tB-PER\n\nc\tO\nd\ne\tO\n\nf  B-LOC\n")
    items = list(read_source(DataSource(path=str(path), format="conll"), "x"))
    assert isinstance(items[1], BadRecord)
    assert (items[1].reason, items[1].location) == ("line 5: no tag", f"{path}:4")
    assert [r.fields["tokens"] for r in (items[0], items[2])] == [["a", "b"], ["f"]]


def test_conll_reader_resumes_at_the_next_sentence_in_plain_and_gzipped_files(tmp_path, shared_data):
    plain = tmp_path / "dev.iob"
    shutil.copy(shared_data / "wikiann_en_dev.conll", plain)
    zipped = tmp_path / "dev.conll.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, zipped):
        def reader(path=path):
            return SourceReader(DataSource(path=str(path), format="conll"), [str(path)], seed=0, index=0,
                                dp_rank=1, dp_size=2, shuffle_files=False, cycle=False)

        whole = [r.fields for r in iter(reader().next, None) if r is not EPOCH_END]
        assert len(whole) == 500  # every second of the 1000 sentences
        first = reader()
        got = [first.next().fields for _ in range(217)]
        state = json.loads(json.dumps(first.state_dict()))
        assert state["offset"] > 0 and state["line"] > 0
        resumed = reader()
        resumed.load_state_dict(state)
        rest = [r.fields for r in iter(resumed.next, None) if r is not EPOCH_END]
        assert got + rest == whole, path


def test_token_records_with_ids_names_and_remapped_columns(tmp_path):
    rows = [{"tokens": ["EU", "rejects", "German"], "ner_tags": [3, 0, 7]},
            {"tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2, 2]}]
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = DataSource(path=str(path), format="tokens", columns={"tags": "ner_tags"})
    examples, bad, where = parsed(source)
    assert examples == [TaggedTokens(["EU", "rejects", "German"], [3, 0, 7])]
    assert bad == Counter({"3 tags for 2 tokens": 1}) and where == [f"{path}:2"]
    assert count_records(source, "x") == 2
    assert PARSERS["tokens"]({"tokens": ["a", "b"], "tags": ["B-PER", "O"]}, {}).tags == ["B-PER", "O"]


@pytest.mark.parametrize(("record", "reason"), [
    ({"tokens": ["a", "b", "c", "d"], "tags": ["O", "O", "O"]}, "3 tags for 4 tokens"),
    ({"tokens": [], "tags": []}, "no tokens"),
    ({"tokens": ["a", 5], "tags": ["O", "O"]}, "token 1 is int, not text"),
    ({"tokens": ["a", "b"], "tags": ["O", 1]}, "mixed tag kinds"),
    ({"tokens": ["a", "b"], "tags": [0, True]}, "mixed tag kinds"),
    ({"tokens": "a b", "tags": ["O", "O"]}, "field 'tokens' should be a list"),
])
def test_bad_token_records(record, reason):
    assert reason in refused("tokens", record)


def test_tag_names_o_first_then_by_entity_b_before_i(tmp_path, shared_data):
    source = DataSource(path=str(shared_data / "wikiann_en_dev.conll"), format="conll")
    assert tag_names([source], None) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert tag_names([source], ["O", "B-X"]) == ["O", "B-X"]
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"tokens": ["a"], "tags": [2]}) + "\n")
    assert tag_names([DataSource(path=str(ids), format="tokens")], None) is None


# --------------------------------------------------------------------------------------------------
# Extractive question answering


def test_squad_v2_file_answerable_and_impossible_questions(shared_data):
    path = shared_data / "squad_v2_dev_sample.json"
    source = DataSource(path=str(path), format="squad")
    examples, bad, _ = parsed(source)
    assert len(examples) == 626 and not bad
    impossible = [e for e in examples if not e.answers]
    assert len(impossible) == 333 and len(examples) - len(impossible) == 293
    first = examples[0]
    assert first.question == "In what country is Normandy located?" and first.id == "56ddde6b9a695914005b9628"
    assert first.answers == (("France", 159),)  # four identical answers, deduplicated
    assert all(e.context[s:s + len(t)] == t for e in examples for t, s in e.answers)
    assert count_records(source, "x") == 626
    assert next(iter(read_source(source, "x"))).location == f"{path}:data[0].paragraphs[0].qas[0]"


def test_cmrc_trial_reads_with_off_by_one_starts_repaired(shared_data):
    source = DataSource(path=str(shared_data / "cmrc2018_trial.json"), format="squad")
    examples, bad, where = parsed(source)
    assert len(examples) == 1000 and bad == Counter({"empty question": 2})
    assert where[0].endswith("cmrc2018_trial.json:data[188].paragraphs[0].qas[4]")
    assert all(e.answers and e.context[s:s + len(t)] == t for e in examples for t, s in e.answers)
    assert examples[0].answers == (("踢爆", 127),) and examples[0].id == "TRIAL_800_QUERY_0"


def test_flat_hf_squad_records_in_jsonl_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    context = "Normandy is a region in France."
    rows = [{"id": "q1", "context": context, "question": "Where is Normandy?",
             "answers": {"text": ["France", "France", "in France"], "answer_start": [24, 24, 21]}},
            {"id": "q2", "context": context, "question": "Who ate the cake?", "answers": {"text": [], "answer_start": []}}]
    expected = [Extractive(context, "Where is Normandy?", (("France", 24), ("in France", 21)), "q1"),
                Extractive(context, "Who ate the cake?", (), "q2")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        source = DataSource(path=str(tmp_path / name), format="squad")
        assert parsed(source)[0] == expected, name
        assert count_records(source, "x") == 2
    as_list = {**rows[0], "answers": [{"text": "France", "answer_start": 24}]}
    assert PARSERS["squad"](as_list, {}).answers == (("France", 24),)


def test_answers_must_be_where_they_say(tmp_path):
    context = "Normandy is a region in France."
    record = {"context": context, "question": "Where?"}
    assert PARSERS["squad"]({**record, "answers": [{"text": "France", "answer_start": 22}]}, {}).answers \
        == (("France", 24),)  # two characters off: repaired
    assert "answer 'France' is not at character 12 of the context" in refused(
        "squad", {**record, "answers": [{"text": "France", "answer_start": 12}]})
    assert "no answers for an answerable question" in refused("squad", {**record, "answers": [], "is_impossible": False})
    assert PARSERS["squad"]({**record, "answers": [], "is_impossible": True}, {}).answers == ()
    assert "empty context" in refused("squad", {**record, "context": " ", "answers": []})
    assert "empty question" in refused("squad", {**record, "question": "", "answers": []})


# --------------------------------------------------------------------------------------------------
# Sequence to sequence


def test_seq2seq_records_with_remapped_columns_and_a_prefix(tmp_path):
    path = tmp_path / "wmt.jsonl"
    path.write_text(json.dumps({"en": "A dog runs.", "de": "Ein Hund rennt."}) + "\n"
                    + json.dumps({"en": "A cat.", "de": " "}) + "\n")
    source = DataSource(path=str(path), format="seq2seq", columns={"source": "en", "target": "de"},
                        prefix="translate English to German: ")
    examples, bad, where = parsed(source)
    assert examples == [Pair("translate English to German: A dog runs.", "Ein Hund rennt.")]
    assert bad == Counter({"empty target": 1}) and where == [f"{path}:2"]
    assert PARSERS["seq2seq"]({"source": "x", "target": "y"}, {}) == Pair("x", "y")  # no prefix: none added
    assert "empty source" in refused("seq2seq", {"source": "", "target": "y"})


def test_multi30k_two_line_aligned_files(shared_data):
    en, de = shared_data / "multi30k_val.en", shared_data / "multi30k_val.de"
    source = DataSource(path=str(en), target_path=str(de), format="seq2seq", prefix="translate: ")
    examples, bad, _ = parsed(source)
    assert len(examples) == 1014 and not bad
    assert examples[0] == Pair("translate: A group of men are loading cotton onto a truck",
                               "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen")
    assert examples[2].target == "Ein Junge mit Kopfhörern sitzt auf den Schultern einer Frau."
    assert count_records(source, "x") == 1014
    assert [r.location for r in list(read_source(source, "x"))[:2]] == [f"{en}:1", f"{en}:2"]


def test_aligned_files_resume_exactly_and_lists_pair_file_by_file(tmp_path, shared_data):
    en, de = tmp_path / "a.en", tmp_path / "a.de"
    en.write_text("".join(f"source {i}\n" for i in range(40)))
    de.write_text("".join(f"target {i}\n" for i in range(40)))
    source = DataSource(path=[str(en), str(shared_data / "multi30k_val.en")], format="seq2seq",
                        target_path=[str(de), str(shared_data / "multi30k_val.de")])

    def reader():
        return SourceReader(source, list_files(source, "x"), seed=0, index=0, dp_rank=0, dp_size=3,
                            shuffle_files=False, cycle=False)

    whole = [r.fields for r in iter(reader().next, None) if r is not EPOCH_END]
    assert len(whole) == len(range(0, 1054, 3)) and whole[1] == {"source": "source 3", "target": "target 3"}
    for stop in (5, 20):  # within the first file, and within the second
        first = reader()
        got = [first.next().fields for _ in range(stop)]
        resumed = reader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert got + [r.fields for r in iter(resumed.next, None) if r is not EPOCH_END] == whole, stop
    assert count_records(source, "x") == 1054


def test_target_file_with_another_line_count_is_a_config_error(tmp_path, shared_data):
    short = tmp_path / "short.de"
    short.write_text("".join((shared_data / "multi30k_val.de").read_text().splitlines(keepends=True)[:1000]))
    source = DataSource(path=str(shared_data / "multi30k_val.en"), target_path=str(short), format="seq2seq")
    with pytest.raises(ConfigError) as info:
        list_files(source, "data.train[0]")
    assert f"data.train[0].target_path: '{short}' has 1000 lines but its source" in str(info.value)
    assert "multi30k_val.en' has 1014" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Config: which task reads which format


def config(task: str, **source) -> dict:
    return {"output_dir": "runs/x", "model": {"name_or_path": "m", "task": task},
            "data": {"train": [{"path": "train.jsonl", "format": "alpaca", **source}]}, "train": {"lr": 1e-4}}


@pytest.mark.parametrize(("task", "source"), [
    ("token_classification", {"format": "conll", "path": "train.conll"}),
    ("token_classification", {"format": "tokens", "columns": {"tags": "ner_tags"}}),
    ("question_answering", {"format": "squad", "path": "train-v2.0.json"}),
    ("seq2seq_lm", {"format": "seq2seq", "path": "train.en", "target_path": "train.de", "prefix": "translate: "}),
    ("seq2seq_lm", {"format": "seq2seq", "path": ["a.en", "b.en"], "target_path": ["a.de", "b.de"]}),
    ("seq2seq_lm", {"format": "seq2seq", "columns": {"source": "document", "target": "summary"}}),
])
def test_each_task_accepts_its_formats(task, source):
    cfg = config_from_dict(config(task, **source))
    assert cfg.data.train[0].format == source["format"]


@pytest.mark.parametrize(("task", "source", "message"), [
    ("token_classification", {}, "data.train[0].format: 'alpaca' cannot train task token_classification; "
                                 "use format: conll or tokens"),
    ("question_answering", {"format": "conll"}, "cannot train task question_answering; use format: squad"),
    ("seq2seq_lm", {"format": "text"}, "use format: seq2seq"),
    ("causal_lm", {"format": "squad"}, "data.train[0].format: 'squad' needs model.task: question_answering"),
    ("causal_lm", {"format": "tokens"}, "'tokens' needs model.task: token_classification"),
    ("sequence_classification", {"format": "seq2seq"}, "cannot train task sequence_classification"),
    ("causal_lm", {"prefix": "summarize: "}, "data.train[0].prefix: only for format seq2seq"),
    ("causal_lm", {"target_path": "t.txt"}, "data.train[0].target_path: only for format seq2seq"),
    ("seq2seq_lm", {"format": "seq2seq", "target_path": "t.de"}, "'train.jsonl' is a file of records"),
    ("seq2seq_lm", {"format": "seq2seq", "path": ["a.en", "b.en"], "target_path": "a.de"},
     "1 target file(s) for 2 source file(s)"),
])
def test_format_and_task_mismatches_name_the_fix(task, source, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(config(task, **source))
    assert message in str(info.value)


def test_conll_and_aligned_text_are_listed_whatever_their_suffix(tmp_path):
    (tmp_path / "ner").mkdir()
    for name in ("a.bio", "b.txt", ".hidden"):
        (tmp_path / "ner" / name).write_text("x O\n")
    assert list_files(DataSource(path=str(tmp_path / "ner"), format="conll"), "x") == [
        str(tmp_path / "ner" / "a.bio"), str(tmp_path / "ner" / "b.txt")]
    with pytest.raises(ConfigError, match="unknown file type.*set target_path"):
        list_files(DataSource(path=str(tmp_path / "ner" / "a.bio"), format="seq2seq"), "x")
    with pytest.raises(ConfigError, match="is not a file"):
        list_files(DataSource(path=str(tmp_path / "ner"), target_path=str(tmp_path / "ner"), format="seq2seq"), "x")
    assert isinstance(next(iter(read_source(DataSource(path=str(tmp_path / "ner" / "a.bio"), format="conll"), "x"))),
                      Record)
