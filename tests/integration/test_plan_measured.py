"""The planner against measurement: 2 ranks train under each ZeRO stage on CPU and count the bytes of
every live tensor at a step's peak (bench/memory.py); the prediction must not fall short of it by more
than 2 % nor exceed it by more than 25 %."""

from __future__ import annotations

import sys

import pytest

import tiny
from conftest import REPO

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "bench"))


def test_planner_model_states_match_measured_memory(tmp_path, tokenizer_dir):
    import memory

    spec = {**tiny.LLAMA, "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 8, "num_key_value_heads": 8}
    model_dir = tiny.build_model_dir(tmp_path / "model", tokenizer_dir, spec)
    for row in memory.measure(model_dir, ("zero0", "zero1", "zero2", "zero3")):
        assert 0.98 <= row["predicted"] / row["measured"] <= 1.25, row
