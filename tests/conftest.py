"""Shared fixtures: tiny tokenizer and models built from configs, synthetic data, launch helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"  # runs that test W&B say wandb.mode=offline; none goes online
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def tokenizer_dir(assets) -> Path:
    return tiny.build_tokenizer(assets / "tokenizer")


@pytest.fixture(scope="session")
def llama_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_model_dir(assets / "llama", tokenizer_dir, tiny.LLAMA)


@pytest.fixture(scope="session")
def gpt2_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_model_dir(assets / "gpt2", tokenizer_dir, tiny.GPT2)


@pytest.fixture(scope="session")
def poison_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_poison_model_dir(assets / "poison", tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dropout_dir(assets, tokenizer_dir) -> Path:
    """Dropout on: resume must restore every rank's random generators to be exact."""
    return tiny.build_model_dir(assets / "llama_dropout", tokenizer_dir, {**tiny.LLAMA, "attention_dropout": 0.1})


@pytest.fixture(scope="session")
def alpaca_files(assets) -> tuple[Path, Path]:
    records = tiny.alpaca_records(160, seed=1)
    return (tiny.write_jsonl(assets / "alpaca" / "train.jsonl", records[:128]),
            tiny.write_jsonl(assets / "alpaca" / "eval.jsonl", records[128:]))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they sit beside the repo in CI)")
    return SHARED_DATA


def causal_config(tmp_path: Path, model_dir: Path, train: Path, evaluation: Path | None = None, **train_keys) -> Path:
    """A small causal-LM run config written as YAML."""
    import yaml

    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "data": {"train": [{"path": str(train), "format": "alpaca"}], "max_length": 128},
        "train": {"seed": 0, "micro_batch_size": 4, "max_steps": 4, "lr": 1e-3, "log_every": 1,
                  "max_grad_norm": 1.0, **train_keys},
    }
    if evaluation is not None:
        cfg["data"]["eval"] = [{"path": str(evaluation), "format": "alpaca"}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def grad_norms(run_dir: Path) -> list[float]:
    """Per-step gradient norms: parity checks compare them with the losses, since a constant gradient-scale
    error (a division by accumulation or world size too many or too few) leaves AdamW's losses unchanged."""
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


def launch_command(args: list[str], *, nproc: int = 1, launcher: str = "deepspeed") -> list[str]:
    from bigsft.dist import free_port

    port = str(free_port())
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, "--module", "bigsft.train", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, "-m", "bigsft.train", *args]
    else:
        cmd = [sys.executable, "-m", "bigsft.train", *args]
    return cmd


def launch_env(env: dict | None = None) -> dict:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    return full_env


def launch(args: list[str], *, nproc: int = 1, launcher: str = "deepspeed", timeout: int = 900,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run bigsft.train as `nproc` processes under a real launcher (or one plain process)."""
    return subprocess.run(launch_command(args, nproc=nproc, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, env=launch_env(env), cwd=REPO)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc
