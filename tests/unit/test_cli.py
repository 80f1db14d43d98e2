"""The command line: exit codes, one clear message, nothing started on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from bigsft.config import ConfigError
from bigsft.train import split_argv


def bigsft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigsft", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_deepspeed_local_rank_argument_is_accepted_anywhere():
    assert split_argv(["--local_rank=1", "cfg.yaml", "train.lr=1"]) == ("cfg.yaml", ["train.lr=1"], 1)
    assert split_argv(["cfg.yaml", "--local_rank", "0"]) == ("cfg.yaml", [], 0)
    assert split_argv(["train.lr=1"]) == (None, ["train.lr=1"], None)
    with pytest.raises(ConfigError, match="unrecognized arguments: --lr"):
        split_argv(["cfg.yaml", "--lr", "1"])


def test_bad_config_exits_2_with_one_message_and_starts_nothing(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(out), "model": {"name_or_path": str(tmp_path / "none")},
                                   "data": {"train": [{"path": "x.jsonl", "format": "alpaca"}]},
                                   "train": {"lrate": 1}}))
    proc = bigsft("train", str(cfg), "model.dtype=fp8")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown key 'train.lrate'" in proc.stderr and "model.dtype: 'fp8'" in proc.stderr
    assert not out.exists()


def test_unknown_command_and_help():
    assert bigsft("frobnicate").returncode == 2
    proc = bigsft("--help")
    assert proc.returncode == 0 and "deepspeed --num_gpus N --module bigsft.train" in proc.stdout


@pytest.mark.parametrize("command", [[], ["train"], ["validate"], ["plan"], ["export"], ["report"], ["data"],
                                     ["data", "inspect"]])
def test_every_command_answers_help_with_exit_0(command):
    proc = bigsft(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: bigsft {' '.join(command)}".rstrip()) and "Traceback" not in proc.stderr


def test_usage_errors_exit_2_naming_the_problem():
    for argv, message in ((["frobnicate"], "invalid choice: 'frobnicate'"), (["data"], "data needs a command"),
                          (["export", "ckpt"], "required: OUT_DIR"), (["train", "--lr", "1"], "unrecognized arguments"),
                          (["validate", "c.yaml", "--world-size", "0"], "expected an integer >= 1, got '0'"),
                          (["export", "a", "b", "--max-shard-size", "big"], "expected a size like 5GB")):
        proc = bigsft(*argv)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)


def test_validate_prints_batch_math_for_a_world_size(tmp_path, llama_dir, alpaca_files):
    from conftest import causal_config

    cfg = causal_config(tmp_path, llama_dir, alpaca_files[0], gradient_accumulation_steps=3)
    proc = bigsft("validate", str(cfg), "deepspeed=zero3", "--world-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert "micro 4 × accumulation 3 × data-parallel 4 = global 48 samples per step" in proc.stdout
    assert '"stage": 3' in proc.stdout and '"train_batch_size": 48' in proc.stdout


def test_validate_reports_contradicting_json(tmp_path, llama_dir, alpaca_files):
    from conftest import causal_config

    cfg = causal_config(tmp_path, llama_dir, alpaca_files[0])
    ds = tmp_path / "mine.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 2}}')
    proc = bigsft("validate", str(cfg), f"deepspeed={ds}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train_micro_batch_size_per_gpu is 32 but the run config gives 4" in proc.stderr


def test_bad_data_exits_2_before_training(tmp_path, llama_dir):
    from conftest import causal_config

    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n' + "{broken\n" * 3)
    cfg = causal_config(tmp_path, llama_dir, train)
    proc = bigsft("train", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "3 of 4 records are unusable" in proc.stderr and "t.jsonl:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("records", "extra", "message"), [
    # LLaMA-Factory-style records whose assistant turns are all empty: the data scan refuses them.
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 6,
     ["data.train=[{path: TRAIN, format: messages}]"], "none of the first 6 records is usable"),
    # Epoch-sized runs: the sizing pass finds less than one global batch.
    ([{"instruction": "a", "output": "b"}] * 3, ["train.max_steps=null", "train.epochs=1"],
     "an epoch holds less than one global batch"),
])
def test_validate_refuses_what_train_refuses(records, extra, message, tmp_path, llama_dir):
    import tiny
    from conftest import causal_config

    train = tiny.write_jsonl(tmp_path / "t.jsonl", records)
    cfg = causal_config(tmp_path, llama_dir, train)
    extra = [e.replace("TRAIN", str(train)) for e in extra]
    for command in ("validate", "train"):
        proc = bigsft(command, str(cfg), *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        assert message in proc.stderr, (command, proc.stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_validate_reports_the_data_scan_and_run_length(tmp_path, llama_dir, alpaca_files):
    from conftest import causal_config

    cfg = causal_config(tmp_path, llama_dir, alpaca_files[0])
    proc = bigsft("validate", str(cfg), "train.max_steps=null", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "data.train: the first 128 records scanned, 128 usable, 0 skipped" in proc.stdout
    assert "steps: 64" in proc.stdout  # 2 epochs of 128 records in global batches of 4


def test_data_inspect_shows_samples_and_corpus_stats(tmp_path, llama_dir, alpaca_files):
    from conftest import causal_config

    train = tmp_path / "t.jsonl"
    train.write_text(alpaca_files[0].read_text() + "{broken\n")
    cfg = causal_config(tmp_path, llama_dir, train)
    proc = bigsft("data", "inspect", str(cfg), "-n", "2", "data.max_length=256")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sample 1 (t)" in out and "sample 2 (t)" in out and "sample 3" not in out
    assert "trained" in out and "<|im_start|>assistant" in out
    for line in ("records", "samples", "trained tokens", "skipped: malformed JSON", "packed into rows of 256",
                 "sample lengths (tokens)"):
        assert line in out, line
    assert "t.jsonl:129: malformed JSON" in out
