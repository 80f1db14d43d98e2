"""Streaming: rank shares, epochs and reshuffling, mixing by weight, packing, exact resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from bigsft.batch_math import BatchMath
from bigsft.config import ConfigError, DataConfig, DataSource, ModelConfig
from bigsft.data import eval_batches, setup_data, train_stream, windows_in_first_epoch
from bigsft.data.batching import Packer
from bigsft.data.scan import SplitStats
from bigsft.data.sources import DataError
from bigsft.data.stream import MixedStream, source_streams
from bigsft.data.tokenize import SampleBuilder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.pad_token = t.eos_token
    return t


def write_texts(path, start, n, *, long_every=0):
    rows = []
    for i in range(start, start + n):
        words = " ".join(["word"] * (i % 7 + (30 if long_every and i % long_every == 0 else 0)))
        rows.append(json.dumps({"text": f"sample {i} {words}"}))
    path.write_text("\n".join(rows) + "\n")
    return path


def sample_id(tok, ids) -> int:
    return int(tok.decode(ids).split()[1])


def ids_of(tok, window) -> list[int]:
    out = []
    for b in window:
        ids, pos = b.inputs["input_ids"], b.inputs.get("position_ids")
        for r in range(ids.shape[0]):
            if pos is None:
                out.append(sample_id(tok, ids[r][b.inputs["attention_mask"][r].bool()].tolist()))
                continue
            starts = [*(pos[r] == 0).nonzero().flatten().tolist(), ids.shape[1]]
            for a, z in itertools.pairwise(starts):
                text = tok.decode(ids[r, a:z].tolist())
                if text.startswith("sample"):
                    out.append(sample_id(tok, ids[r, a:z].tolist()))
    return out


def data_config(paths, **kw) -> DataConfig:
    return DataConfig(train=[DataSource(path=str(p), format="text", **kw.pop("source", {})) for p in paths],
                      max_length=64, **kw)


def stream_for(tok, data, *, dp_rank=0, dp_size=1, micro=2, accum=2, seed=3):
    plan = setup_data(data, ModelConfig(name_or_path="x", task="causal_lm"), tok)
    stats = SplitStats()
    batch = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=accum, data_parallel_size=dp_size)
    return train_stream(data, plan, stats, seed=seed, batch=batch, dp_rank=dp_rank, pad_id=tok.pad_token_id), stats


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("files", [1, 5])
def test_ranks_share_each_global_window_disjointly_and_an_epoch_covers_everything(tok, tmp_path, files, packing):
    per_file = 400 if packing else 72  # the packer holds up to 16 open rows: far fewer than an epoch
    paths = [str(write_texts(tmp_path / f"f{i}.jsonl", per_file * i, per_file)) for i in range(files)]
    total = per_file * files
    # One source of 1 file (fewer files than ranks) or 5 files (more).
    data = DataConfig(train=[DataSource(path=paths, format="text")], max_length=64, packing=packing, shuffle_buffer=8)
    micro = 1 if packing else 2  # a packed row holds several samples
    single, _ = stream_for(tok, data, dp_size=1, micro=micro, accum=4)
    ranks = [stream_for(tok, data, dp_rank=r, dp_size=2, micro=micro, accum=2)[0] for r in range(2)]
    seen: list[int] = []
    for _ in range(3 if packing else total // 8):
        per_rank = [ids_of(tok, s.next_window()) for s in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(ids_of(tok, single.next_window()))
        seen += per_rank[0] + per_rank[1]
    if not packing:  # whole epoch drawn: every sample exactly once
        assert sorted(seen) == list(range(total))


def test_epochs_are_whole_and_reshuffled(tok, tmp_path):
    data = data_config([write_texts(tmp_path / "a.jsonl", 0, 24)], shuffle_buffer=5)
    stream, _ = stream_for(tok, data, micro=4, accum=1)
    epoch0 = [i for _ in range(6) for i in ids_of(tok, stream.next_window())]
    epoch1 = [i for _ in range(6) for i in ids_of(tok, stream.next_window())]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1 and epoch0 != list(range(24))


def test_shuffle_buffer_stays_bounded(tok, tmp_path):
    data = data_config([write_texts(tmp_path / "a.jsonl", 0, 200)], shuffle_buffer=7)
    stream, _ = stream_for(tok, data)
    for _ in range(40):
        stream.next_window()
        assert len(stream.mixed.streams[0].buffer) <= 7


def test_sizing_counts_steps_of_one_epoch(tok, tmp_path):
    data = data_config([write_texts(tmp_path / "a.jsonl", 0, 50)])
    stream, _ = stream_for(tok, data, micro=2, accum=3)  # 6 samples per step
    assert windows_in_first_epoch(stream) == 50 // 6


def test_mixing_follows_weights_and_logs_what_it_drew(tok, tmp_path):
    a = write_texts(tmp_path / "a.jsonl", 0, 30)
    b = write_texts(tmp_path / "b.jsonl", 1000, 30)
    data = DataConfig(train=[DataSource(path=str(a), format="text", weight=3.0),
                             DataSource(path=str(b), format="text", weight=1.0)], max_length=64)
    stream, _ = stream_for(tok, data, micro=8, accum=1)
    drawn = Counter(i >= 1000 for _ in range(150) for i in ids_of(tok, stream.next_window()))
    assert drawn[False] / sum(drawn.values()) == pytest.approx(0.75, abs=0.04)
    assert stream.mixed.drawn == [drawn[False], drawn[True]]


def test_unweighted_sources_mix_by_size(tok, tmp_path):
    a = write_texts(tmp_path / "a.jsonl", 0, 90)
    b = write_texts(tmp_path / "b.jsonl", 1000, 30)
    plan = setup_data(data_config([a, b]), ModelConfig(name_or_path="x", task="causal_lm"), tok)
    assert plan.weights == [90.0, 30.0]


def with_blank_lines(path, suffix: str):
    """The JSON-lines file `path` rewritten as `suffix` (header for CSV/TSV), with blank lines between records."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    cell = (lambda t: json.dumps({"text": t})) if suffix == ".jsonl" else (lambda t: f'"{t}"' if suffix == ".csv" else t)
    head = "" if suffix == ".jsonl" else "text\n\n"
    out = path.with_suffix(suffix)
    path.unlink()
    out.write_text(head + "".join(cell(t) + "\n" + "\n" * (i % 3 == 0) for i, t in enumerate(texts)))
    return out


@pytest.mark.parametrize("suffix", ["", ".jsonl", ".csv", ".tsv"])
@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_state_yields_exactly_the_same_batches(tok, tmp_path, packing, suffix):
    a = write_texts(tmp_path / "a.jsonl", 0, 37, long_every=5)
    b = write_texts(tmp_path / "b.jsonl", 1000, 23)
    if suffix:  # blank lines between records: they are no records, before or after a resume
        a, b = with_blank_lines(a, suffix), with_blank_lines(b, suffix)
    data = DataConfig(train=[DataSource(path=str(a), format="text", weight=2.0),
                             DataSource(path=str(b), format="text", weight=1.0)],
                      max_length=64, packing=packing, shuffle_buffer=6)
    original, stats = stream_for(tok, data, dp_rank=1, dp_size=2)
    for _ in range(7):
        original.next_window()
    state = json.loads(json.dumps({"stream": original.state_dict(), "stats": stats.state_dict()}))
    expected = [original.next_window() for _ in range(25)]  # crosses several epoch ends
    resumed, stats2 = stream_for(tok, data, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state["stream"])
    stats2.load_state_dict(state["stats"])
    for want in expected:
        got = resumed.next_window()
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert all((g.inputs[k] == w.inputs[k]).all() for k in w.inputs) and (g.targets == w.targets).all()
    assert stats2.state_dict() == stats.state_dict()


def test_eval_share_counts_every_sample_once(tok, tmp_path):
    paths = [write_texts(tmp_path / f"e{i}.jsonl", 10 * i, 7) for i in range(3)]
    data = DataConfig(train=[DataSource(path=str(paths[0]), format="text")],
                      eval=[DataSource(path=str(p), format="text") for p in paths], max_length=64)
    plan = setup_data(data, ModelConfig(name_or_path="x", task="causal_lm"), tok)
    for world in (1, 2, 4, 5):
        seen = [i for r in range(world) for b in eval_batches(data, plan, SplitStats(), dp_rank=r, pad_id=tok.pad_token_id,
                                                                batch=BatchMath(micro_batch_size=3, gradient_accumulation_steps=1,
                                                                                data_parallel_size=world))
                for i in ids_of(tok, [b])]
        assert sorted(seen) == sorted(i for p in range(3) for i in range(10 * p, 10 * p + 7))


def test_bad_records_of_every_kind_are_counted_by_reason(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [json.dumps({"instruction": "q", "output": "fine"})] * 10 + [
        "{oops", json.dumps({"instruction": "q"}), json.dumps({"instruction": 5, "output": "x"}),
        json.dumps({"instruction": "q", "output": " "}), json.dumps([1]),
    ]
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff", "output": "x"}\n')
    stats = SplitStats()
    build = SampleBuilder(tok, max_length=64)
    [stream] = source_streams([DataSource(path=str(f), format="alpaca")], "train", build, stats, seed=0, dp_rank=0,
                              dp_size=1, train=False, buffer_size=1)
    samples = []
    while (s := stream.next()) is not None:
        samples.append(s)
    assert len(samples) == 10 and stats.records == 16 and stats.samples == 10
    assert dict(stats.skipped) == {"malformed JSON": 1, "missing field 'output'": 1,
                                   "field 'instruction' should be text, got int": 1, "empty output": 1,
                                   "not a JSON object": 1, "undecodable bytes": 1}
    assert stats.first_bad[0] == f"{f}:11: malformed JSON (Expecting property name enclosed in double quotes)"


def test_a_source_with_no_usable_record_ends_instead_of_looping(tok, tmp_path):
    f = tmp_path / "all_bad.jsonl"
    f.write_text('{"nope": 1}\n' * 5)
    streams = source_streams([DataSource(path=str(f), format="text")], "train", SampleBuilder(tok, max_length=64),
                             SplitStats(), seed=0, dp_rank=0, dp_size=1, train=True, buffer_size=4)
    mixed = MixedStream(streams, [1.0], seed=0)
    assert mixed.next() is None  # a whole epoch without a sample: no endless loop
    from bigsft.data.stream import TrainStream

    with pytest.raises(DataError, match="no usable training sample"):
        TrainStream(mixed, batch=BatchMath(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=1),
                    dp_rank=0, pad_id=0).next_window()


def test_packer_first_fit_and_state():
    from bigsft.data.tokenize import Sample

    def s(n):
        return Sample(list(range(n)), [0] * n)

    p = Packer(10, open_rows=2)
    assert p.add(s(6)) == [] and p.add(s(5)) == []  # two open rows: 6, 5
    closed = p.add(s(4))  # fits the first row exactly -> closed full
    assert [len(r) for r in closed] == [2] and p.lengths == [5]
    assert p.add(s(8)) == [] and p.lengths == [5, 8]
    closed = p.add(s(7))  # fits nowhere, 2 rows open: the fullest (8) is closed
    assert [sum(len(x.input_ids) for x in r) for r in closed] == [8] and p.lengths == [5, 7]
    q = Packer(10, open_rows=2)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q.lengths == p.lengths


def test_datasource_errors_before_training(tok, tmp_path):
    f = tmp_path / "mostly_bad.jsonl"
    f.write_text('{"text": "ok"}\n' + '{"x": 1}\n' * 9)
    from bigsft.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.train: 9 of 10 records are unusable \(90.0% > data.max_bad_fraction"):
        setup_data(data_config([f]), ModelConfig(name_or_path="x", task="causal_lm"), tok)


def _validation_ids(tok, data, plan, world):
    return sorted(i for r in range(world) for b in eval_batches(
        data, plan, SplitStats(), dp_rank=r, pad_id=tok.pad_token_id,
        batch=BatchMath(micro_batch_size=3, gradient_accumulation_steps=1, data_parallel_size=world))
        for i in ids_of(tok, [b]))


@pytest.mark.parametrize("validation", [0.25, 9])
def test_validation_holds_out_the_same_records_on_any_world_size_and_never_trains_on_them(tok, tmp_path, validation):
    paths = [write_texts(tmp_path / "a.jsonl", 0, 30), write_texts(tmp_path / "b.jsonl", 100, 20)]
    data = data_config(paths, validation=validation)
    plan = setup_data(data, ModelConfig(name_or_path="x", task="causal_lm"), tok)
    held = _validation_ids(tok, data, plan, 1)
    assert all(_validation_ids(tok, data, plan, world) == held for world in (2, 3))
    per_source = [sum(i < 100 for i in held), sum(i >= 100 for i in held)]
    if validation == 9:
        assert per_source == [9, 9]  # exactly that many records of each source
    else:
        assert 0 < per_source[0] < 15 and 0 < per_source[1] < 10  # about a quarter of 30 and of 20
    # Two epochs of training on 2 ranks: every other record, and none of the held-out ones.
    trained = set()
    for rank in range(2):
        stream, _ = stream_for(tok, data, dp_rank=rank, dp_size=2, micro=2, accum=1)
        for _ in range(2 * (50 - len(held)) // 4):
            trained.update(ids_of(tok, stream.next_window()))
    assert trained.isdisjoint(held) and trained | set(held) == set(range(30)) | set(range(100, 120))


def test_validation_that_leaves_no_training_data_is_refused(tok, tmp_path):
    data = data_config([write_texts(tmp_path / "a.jsonl", 0, 5)], validation=5)
    with pytest.raises(ConfigError, match=r"data.validation: 5 records held out of data.train\[0\], which has 5"):
        setup_data(data, ModelConfig(name_or_path="x", task="causal_lm"), tok)
