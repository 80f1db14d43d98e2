"""The data plan (bigsft.data.plan): windows read from it are the walked stream's (rows, rank shares, counters,
draws), on any world size, across epochs, through checkpoints; a missing or short plan falls back to walking, and
a plan's position never resumes a stream that cannot read it."""

from __future__ import annotations

import json

import pytest
from test_cache import alpaca_data, prepare, same_window

from bigsft.batch_math import BatchMath
from bigsft.data import train_stream, windows_in_first_epoch
from bigsft.data.plan import PlannedStream, build_plan
from bigsft.data.scan import SplitStats
from bigsft.data.sources import DataError

SEED = 7


def planned(tmp_path, cache_corpus, *, packing: bool, epochs: int = 3, **kw):
    _, paths, tok, model = cache_corpus
    data = alpaca_data(paths, packing=packing, **kw)
    run_data, cached = prepare(data, model, tok, tmp_path / "cache")
    assert build_plan(data, cached, str(tmp_path / "cache"), seed=SEED, epochs=epochs) is not None
    return data, run_data, cached


def pair(data, run_data, cached, *, dp_size, dp_rank, micro=2, accum=2, steps=None):
    batch = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=accum, data_parallel_size=dp_size)
    out = []
    for rd in (run_data, cached):
        stats = SplitStats()
        out.append((train_stream(data, rd, stats, seed=SEED, batch=batch, dp_rank=dp_rank, pad_id=0, steps=steps),
                    stats))
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_planned_windows_are_the_walked_ones_on_every_rank(tmp_path, cache_corpus, packing):
    data, run_data, cached = planned(tmp_path, cache_corpus, packing=packing)
    for dp_size in (1, 2, 4):
        for dp_rank in range(dp_size):
            (walked, walked_stats), (plan, plan_stats) = pair(data, run_data, cached, dp_size=dp_size,
                                                              dp_rank=dp_rank, accum=4 // dp_size)
            assert isinstance(plan, PlannedStream) and not isinstance(walked, PlannedStream)
            for w in range(28):
                assert same_window(walked.next_window(), plan.next_window()), (dp_size, dp_rank, w)
                assert plan_stats.state_dict() == walked_stats.state_dict()
                assert plan.mixed.drawn == walked.mixed.drawn
                assert plan.mixed.epochs_completed() == walked.mixed.epochs_completed()
            assert walked.mixed.epochs_completed() >= 1 and walked_stats.bad >= 3


def test_first_epoch_sizing_is_the_walked_one(tmp_path, cache_corpus):
    data, run_data, cached = planned(tmp_path, cache_corpus, packing=True, epochs=1)
    for accum in (1, 3, 8):
        (walked, walked_stats), (plan, plan_stats) = pair(data, run_data, cached, dp_size=2, dp_rank=0, accum=accum)
        assert windows_in_first_epoch(plan) == windows_in_first_epoch(walked)
        assert plan_stats.state_dict() == walked_stats.state_dict()


def test_resume_from_a_plan_position_and_from_a_walked_one(tmp_path, cache_corpus):
    data, run_data, cached = planned(tmp_path, cache_corpus, packing=True)
    (walked, _), (plan, _) = pair(data, run_data, cached, dp_size=2, dp_rank=1)
    for _ in range(6):
        walked.next_window()
        plan.next_window()
    plan_state = json.loads(json.dumps(plan.state_dict()))
    walked_state = json.loads(json.dumps(walked.state_dict()))
    assert plan_state == {"planned": {"key": plan.plan.meta["key"], "row": 6 * 8}}
    (_, _), (again, again_stats) = pair(data, run_data, cached, dp_size=2, dp_rank=1)
    (_, _), (from_walk, _) = pair(data, run_data, cached, dp_size=2, dp_rank=1)
    again.load_state_dict(plan_state)
    from_walk.load_state_dict(walked_state)  # a checkpoint from before the plan existed: it walks on
    assert from_walk.walked is not None
    # The same global batch on 4 ranks (a run resumed on another world size): rank 1's share of the same rows.
    (wider_walk, _), (wider, _) = pair(data, run_data, cached, dp_size=4, dp_rank=1, accum=1)
    for _ in range(6):
        wider_walk.next_window()
    wider.load_state_dict(plan_state)
    for _ in range(8):
        reference = walked.next_window()
        assert same_window(again.next_window(), reference)
        assert same_window(from_walk.next_window(), reference)
        assert same_window(wider.next_window(), wider_walk.next_window())
    assert again_stats.state_dict() == walked.mixed.streams[0].stats.state_dict()
    # A stream without the plan cannot resume from a row of it: a clear message, exit code 2.
    with pytest.raises(DataError, match="row 48 of data plan .*bigsft data prepare"):
        walked.load_state_dict(plan_state)


def test_missing_or_short_plans_walk(tmp_path, cache_corpus):
    data, run_data, cached = planned(tmp_path, cache_corpus, packing=True, epochs=1)
    (_, _), (short, _) = pair(data, run_data, cached, dp_size=2, dp_rank=0, steps=10_000)
    assert not isinstance(short, PlannedStream) and "the data plan covers" in short.plan_note
    other = pair(data, run_data, cached, dp_size=2, dp_rank=0, steps=2)[1][0]
    assert isinstance(other, PlannedStream) and "read from the data plan" in other.plan_note
    reseeded = train_stream(data, cached, SplitStats(), seed=SEED + 1, pad_id=0, dp_rank=0,
                            batch=BatchMath(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=1))
    assert not isinstance(reseeded, PlannedStream) and "no data plan for this seed" in reseeded.plan_note
    # A plan past its end says so instead of repeating or inventing rows.
    (_, _), (plan, _) = pair(data, run_data, cached, dp_size=1, dp_rank=0, accum=64)
    with pytest.raises(DataError, match="ends at row"):
        for _ in range(100):
            plan.next_window()
