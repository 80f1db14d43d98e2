"""Benchmarks are scripts, not tests: here they only have to run end to end on a tiny setting.

Their numbers are not checked, only that they run and print their tables: the scripts run side by side
(conftest's LaunchPool), each test waiting for its own."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import LaunchPool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benches(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("benches")
    pool = LaunchPool(request)
    env = dict(os.environ)
    pool.add("data_throughput", commands=lambda: [(
        [sys.executable, "bench/data_throughput.py", "--records", "300", "--memory-records", "100",
         "--max-length", "256"], env)], timeout=600, tests=("test_data_throughput_bench_runs",))
    pool.add("data_scale", commands=lambda: [(
        [sys.executable, "bench/data_scale.py", "--records", "200", "--sizes", "1,4", "--steps", "2", "--max-length",
         "128", "--min-samples", "100", "--json", str(d / "scale.json"), "--plot", str(d / "scale.png")], env)],
        timeout=600, tests=("test_data_scale_bench_runs",))
    pool.add("pipeline_bubble", commands=lambda: [(
        [sys.executable, "bench/pipeline_bubble.py", "--micro-batches", "2", "--steps", "4", "--layers", "2",
         "--hidden", "64"], env)], timeout=900, tests=("test_pipeline_bubble_bench_runs",))
    pool.add("throughput", commands=lambda: [(
        [sys.executable, "bench/throughput.py", "--reps", "1", "--steps", "4", "--hidden", "64", "--layers", "2",
         "--records", "120", "--plot", str(d / "t.png")], env)], timeout=900, tests=("test_throughput_bench_runs",))
    pool.add("long_context", commands=lambda: [(
        [sys.executable, "bench/long_context.py", "--lengths", "256", "512", "--layers", "2", "--hidden", "64",
         "--budget-mib", "10"], env)], timeout=600, tests=("test_long_context_bench_runs",))
    pool.add("gpu", commands=lambda: [(["bash", "bench/gpu.sh"], {**env, "SMOKE": "1",
                                                                   "BIGSFT_PYTHON": sys.executable})],
             timeout=900, tests=("test_gpu_bench_script_runs_its_whole_path_in_smoke_mode",))
    yield pool
    pool.close()


def test_data_throughput_bench_runs(benches):
    proc = benches.result("data_throughput")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tokenizer alone" in out and "bigsft pipeline, packed" in out and "peak memory streaming" in out


def test_data_scale_bench_runs(benches, tmp_path_factory):
    proc = benches.result("data_scale")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel size" in proc.stdout and "cache + plan s/step" in proc.stdout
    scale = next(tmp_path_factory.getbasetemp().glob("benches*/scale.json"))
    report = json.loads(scale.read_text())
    for kind in ("cold", "cached", "cached_walk"):
        figures = report["per_rank_data_s_per_step"][kind]
        assert set(figures) == {"1", "4"} and all(s > 0 for s in figures.values())
    assert report["cache_build"]["tokens"] > 0 and "cache build" in proc.stdout
    assert next(scale.parent.glob("scale.png")).stat().st_size > 0


def test_pipeline_bubble_bench_runs(benches):
    proc = benches.result("pipeline_bubble")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "(P-1)/(m+P-1)" in proc.stdout and "33.3%" in proc.stdout  # m=2, P=2: 1/3


def test_throughput_bench_runs(benches):
    proc = benches.result("throughput")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for line in ("bigsft packed", "bigsft packed, no prefetch", "bigsft packed, cached", "bigsft padded", "HF Trainer",
                 "bare PyTorch loop", "bigsft packed / HF Trainer", "prefetch on / off", "with the tokenized cache"):
        assert line in proc.stdout


def test_gpu_bench_script_runs_its_whole_path_in_smoke_mode(benches):
    proc = benches.result("gpu")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    table = proc.stdout.strip().splitlines()[-4:]
    assert "tokens/s" in table[0] and "TFLOP/s" in table[0] and "MFU" in table[0]
    assert table[1].startswith("bigsft (packed)") and table[2].startswith("HF Trainer (padded)")
    assert "bigsft / HF Trainer tokens/s:" in table[3]


def test_long_context_bench_runs(benches):
    proc = benches.result("long_context")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for variant in ("plain", "checkpointing", "ckpt + offload", "ckpt + tiled", "SP 2 + ckpt"):
        row = next(line for line in lines if line.strip().startswith(variant))
        assert len(row.split()) >= 5, row  # two lengths of MiB and tokens/s, and the longest that fits
