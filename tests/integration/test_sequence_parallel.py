"""Sequence parallelism (DeepSpeed Ulysses) on CPU ranks: each row split over 2 ranks gives the losses and
gradient norms of the whole rows on one, for Llama and Qwen2, packed and padded, under ZeRO-3, ZeRO-2 with
offload and LoRA, ZeRO-1 with data parallelism beside it; and its checkpoints resume without it. The split
runs also tile the loss (and Qwen2's MLPs) in tiles of 16 tokens and checkpoint layers with their inputs in
host memory, against references without any of it."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiny
from conftest import assert_continues, check, grad_norms, read_metrics, split_alpaca_config, train_losses

pytestmark = pytest.mark.slow

STEPS = 4
# Rows of 256 tokens hold 3-6 samples each: attention inside a packed row must stop at sample boundaries.
PACKED = ["data.packing=true", "data.max_length=256", "train.micro_batch_size=1"]
LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0}"
SP2 = "sequence_parallel.size=2"
TILED = ["model.tiled_loss=true", "model.tile_tokens=16"]
# Parity is float32 noise: the all-to-alls reorder no sums, but sdpa over a whole row and the mask path differ
# in summation order. Seen: at most 4e-7 in loss, 1e-6 relative in grad norm.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sp_config(tmp_path_factory, llama_dir) -> Path:
    return split_alpaca_config(tmp_path_factory.mktemp("sp"), llama_dir, seed=5, max_steps=STEPS,
                               gradient_accumulation_steps=2, eval_micro_batch_size=3, save_every=2,
                               lr_schedule="constant", warmup_steps=0)


@pytest.fixture(scope="module")
def qwen_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_model_dir(assets / "qwen2", tokenizer_dir, tiny.QWEN2)


@pytest.fixture(scope="module")
def runs(pool, sp_config, qwen_dir, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sp_runs")
    out = {}

    def add(key: str, extra: list[str], tests: tuple, **how) -> None:
        out[key] = d / key
        pool.add(key, [str(sp_config), f"output_dir={out[key]}", *extra], tests=tests, **how)

    llama = ("test_llama_packed_rows_split_over_2_ranks_under_zero3_with_tiled_loss",)
    add("llama_one", PACKED, (*llama, "test_a_sequence_parallel_checkpoint_resumes_on_one_rank"), launcher="plain")
    # ZeRO-3, with the tiled loss, and the first of the 2 layers checkpointed with its input in host memory
    offload = ["model.gradient_checkpointing=true", "model.activation_offload=true"]
    add("llama_sp2", [*PACKED, SP2, *TILED, *offload, "model.checkpoint_layers=2", "deepspeed=zero3"], llama, nproc=2)
    qwen = ("test_qwen2_packed_lora_under_zero2_offload_with_tiled_loss_and_mlp",)
    model = f"model.name_or_path={qwen_dir}"
    add("qwen_one", [*PACKED, model, LORA], qwen, launcher="plain")
    add("qwen_sp2", [*PACKED, model, LORA, SP2, *TILED, "model.tiled_mlp=true", *offload, "deepspeed=zero2_offload"],
        qwen, nproc=2)
    grid = ("test_2_data_parallel_x_2_sequence_parallel_equals_2_data_parallel",)
    padded = ["train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "deepspeed=zero1"]
    add("dp2", padded, grid, nproc=2)
    add("dp2_sp2", [*padded, SP2], grid, nproc=4)
    # The 2-rank sequence-parallel run's step-2 checkpoint, resumed by one rank without sequence parallelism:
    # DeepSpeed's partitions change from 2 to 1 (universal conversion), the rows stay the same.
    add("sp2_to_one", [*PACKED, "deepspeed=zero3", f"train.resume={d / 'llama_sp2'}/checkpoints/step_00000002"],
        ("test_a_sequence_parallel_checkpoint_resumes_on_one_rank",), launcher="plain", after=("llama_sp2",))
    return out


def trained(pool, runs, key: str) -> Path:
    check(pool.result(key))
    return runs[key]


def assert_same_steps(got: Path, want: Path) -> None:
    assert train_losses(got) == pytest.approx(train_losses(want), abs=TOLERANCE)
    assert grad_norms(got) == pytest.approx(grad_norms(want), rel=TOLERANCE)
    tokens = [[r["tokens"] for r in read_metrics(run) if "loss" in r] for run in (got, want)]
    assert tokens[0] == tokens[1]


def final_eval(run: Path) -> dict:
    return [r for r in read_metrics(run) if "eval/loss" in r][-1]


def test_llama_packed_rows_split_over_2_ranks_under_zero3_with_tiled_loss(pool, runs, sp_config):
    from test_training import reload_eval_loss

    sp2, one = trained(pool, runs, "llama_sp2"), trained(pool, runs, "llama_one")
    assert "2 rank(s): 1 data-parallel × 2 sequence-parallel" in pool.result("llama_sp2").stdout
    assert len(train_losses(sp2)) == STEPS
    assert_same_steps(sp2, one)
    evaluated = final_eval(sp2)
    assert evaluated["eval/loss"] == pytest.approx(final_eval(one)["eval/loss"], abs=TOLERANCE)
    assert evaluated["eval/tokens"] == final_eval(one)["eval/tokens"]  # every eval token counted once
    # the export is a stock model: reloaded without DeepSpeed, it gives the run's eval loss
    assert reload_eval_loss(sp_config, sp2 / "final", tuple(PACKED)) == pytest.approx(evaluated["eval/loss"], abs=1e-5)


def test_qwen2_packed_lora_under_zero2_offload_with_tiled_loss_and_mlp(pool, runs):
    sp2, one = trained(pool, runs, "qwen_sp2"), trained(pool, runs, "qwen_one")
    assert "LoRA r=4" in pool.result("qwen_sp2").stdout
    assert_same_steps(sp2, one)
    assert final_eval(sp2)["eval/loss"] == pytest.approx(final_eval(one)["eval/loss"], abs=TOLERANCE)


def test_2_data_parallel_x_2_sequence_parallel_equals_2_data_parallel(pool, runs):
    grid, dp = trained(pool, runs, "dp2_sp2"), trained(pool, runs, "dp2")
    assert "4 rank(s): 2 data-parallel × 2 sequence-parallel" in pool.result("dp2_sp2").stdout
    assert_same_steps(grid, dp)
    assert final_eval(grid)["eval/loss"] == pytest.approx(final_eval(dp)["eval/loss"], abs=TOLERANCE)


def test_a_sequence_parallel_checkpoint_resumes_on_one_rank(pool, runs):
    resumed, one = trained(pool, runs, "sp2_to_one"), trained(pool, runs, "llama_one")
    assert "converted from 1 data-parallel × 2 sequence-parallel ranks" in pool.result("sp2_to_one").stdout
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [3, 4]
    assert_continues(resumed, one, after_step=2, tolerance=TOLERANCE)
