"""The prefetching stream: the same windows as the synchronous one, its state as of the windows handed out
(never the producer's, which runs ahead), errors raised in order, a clean stop."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from bigsft.batch_math import BatchMath
from bigsft.config import DataConfig, DataSource, ModelConfig
from bigsft.data import setup_data, train_stream
from bigsft.data.prefetch import Prefetcher
from bigsft.data.scan import SplitStats
from bigsft.data.sources import DataError

import tiny


def make(tmp_path, tokenizer_dir, *, packing: bool, depth: int, streamed: list[dict] | None = None, dp_size: int = 2):
    """A prefetcher over 60 alpaca records (or, once the pre-launch scan has passed, over `streamed`)."""
    path = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_records(60, seed=5))
    data = DataConfig(train=[DataSource(path=str(path), format="alpaca")], max_length=64, packing=packing,
                      shuffle_buffer=16, max_bad_fraction=1.0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    run_data = setup_data(data, ModelConfig(config={"model_type": "llama"}, tokenizer=str(tokenizer_dir)), tok)
    if streamed is not None:
        tiny.write_jsonl(path, streamed)
    produced = SplitStats()
    batch = BatchMath(micro_batch_size=2, gradient_accumulation_steps=2, data_parallel_size=dp_size)
    stream = train_stream(data, run_data, produced, seed=1, batch=batch, dp_rank=1, pad_id=0)
    return Prefetcher(stream, produced, depth=depth)


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.inputs.keys() == y.inputs.keys() and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
        and torch.equal(x.targets, y.targets) for x, y in zip(a, b))


@pytest.mark.parametrize("packing", [False, True])
def test_prefetched_windows_and_states_are_the_synchronous_ones(tmp_path, tokenizer_dir, packing):
    sync = make(tmp_path, tokenizer_dir, packing=packing, depth=0)
    ahead = make(tmp_path, tokenizer_dir, packing=packing, depth=3)
    states = []
    for _ in range(12):  # 60 records: past an epoch boundary
        assert same(ahead.next_window(), sync.next_window())
        time.sleep(0.01)  # let the producer run ahead
        assert ahead.state_dict() == sync.state_dict()
        assert ahead.stats.state_dict() == sync.stats.state_dict() and ahead.drawn == sync.drawn
        states.append((ahead.state_dict(), ahead.stats.state_dict()))
    assert ahead.produced.records > ahead.stats.records  # the producer is ahead; the view is not
    # A stream resumed from the state of window 5 (taken while prefetching ran) continues with window 6 on.
    resumed = make(tmp_path, tokenizer_dir, packing=packing, depth=2)
    resumed.load_state_dict(*states[4])
    again = make(tmp_path, tokenizer_dir, packing=packing, depth=0)
    for _ in range(5):
        again.next_window()
    for _ in range(7):
        assert same(resumed.next_window(), again.next_window())
    for p in (sync, ahead, resumed, again):
        p.close()


def test_a_producer_error_reaches_the_loop_in_order_with_the_same_message(tmp_path, tokenizer_dir):
    """Records with an empty output are bad records; a file of nothing else (replaced after the pre-launch scan)
    has no usable sample."""
    bad = [{"instruction": "", "input": "", "output": ""}] * 5
    messages = []
    for depth in (0, 2):
        stream = make(tmp_path, tokenizer_dir, packing=False, depth=depth, streamed=bad)
        with pytest.raises(DataError) as info:
            stream.next_window()
        messages.append(str(info.value))
        stream.close()
    assert messages[0] == messages[1] and "no usable training sample" in messages[0]


def test_close_stops_a_producer_blocked_on_a_full_queue(tmp_path, tokenizer_dir):
    stream = make(tmp_path, tokenizer_dir, packing=True, depth=1)
    stream.next_window()
    time.sleep(0.2)  # the producer fills the queue and blocks
    stream.close()
    assert not any(t.name == "bigsft-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="after prefetching began"):
        stream.load_state_dict({}, {})
