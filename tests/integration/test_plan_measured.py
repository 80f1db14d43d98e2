"""The planner against measurement: 2 ranks train under each ZeRO stage on CPU and count the bytes of
every live tensor at a step's peak (bench/memory.py); the prediction must not fall short of it by more
than 2 % nor exceed it by more than 25 %."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import tiny
from conftest import POOL_WIDTH, REPO

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "bench"))


def test_planner_model_states_match_measured_memory(tmp_path, tokenizer_dir):
    import memory

    spec = {**tiny.LLAMA, "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 8, "num_key_value_heads": 8}
    model_dir = tiny.build_model_dir(tmp_path / "model", tokenizer_dir, spec)

    def measure(ds: str) -> dict:
        """One stage's launch (bench/memory.py's own), side by side with the others: each rank counts its own
        live tensors, so a busy machine changes no byte of it."""
        try:
            [row] = memory.measure(model_dir, (ds,))
        except SystemExit as e:  # memory.measure exits with the failed launch's output
            raise AssertionError(str(e)) from None
        return row

    with ThreadPoolExecutor(max_workers=POOL_WIDTH) as threads:
        rows = list(threads.map(measure, ("zero0", "zero1", "zero2", "zero3")))
    for row in rows:
        assert 0.98 <= row["predicted"] / row["measured"] <= 1.25, row
