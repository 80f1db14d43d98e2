"""Benchmarks are scripts, not tests: here they only have to run end to end on a tiny setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_data_throughput_bench_runs():
    proc = subprocess.run([sys.executable, "bench/data_throughput.py", "--records", "300", "--memory-records", "100",
                           "--max-length", "256"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tokenizer alone" in out and "bigsft pipeline, packed" in out and "peak memory streaming" in out


def test_pipeline_bubble_bench_runs():
    proc = subprocess.run([sys.executable, "bench/pipeline_bubble.py", "--micro-batches", "2", "--steps", "4",
                           "--layers", "2", "--hidden", "64"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "(P-1)/(m+P-1)" in proc.stdout and "33.3%" in proc.stdout  # m=2, P=2: 1/3


def test_throughput_bench_runs(tmp_path):
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--reps", "1", "--steps", "4", "--hidden", "64",
                           "--layers", "2", "--records", "120", "--plot", str(tmp_path / "t.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for line in ("bigsft packed", "bigsft padded", "HF Trainer", "bare PyTorch loop", "bigsft packed / HF Trainer"):
        assert line in proc.stdout


def test_gpu_bench_script_runs_its_whole_path_in_smoke_mode():
    env = {**os.environ, "SMOKE": "1", "BIGSFT_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu.sh"], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    table = proc.stdout.strip().splitlines()[-4:]
    assert "tokens/s" in table[0] and "TFLOP/s" in table[0] and "MFU" in table[0]
    assert table[1].startswith("bigsft (packed)") and table[2].startswith("HF Trainer (padded)")
    assert "bigsft / HF Trainer tokens/s:" in table[3]
