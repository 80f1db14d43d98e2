"""A stop signal during an eval: the eval is cut short on every rank at the same batch, the run saves and
exits 75 within the signal's lead time, and the relaunch runs the eval it lost, then exports."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

import tiny
from conftest import REPO, causal_config, check, launch, launch_command, launch_env, read_metrics

pytestmark = pytest.mark.slow
EXIT_SAVED = 75


def test_signal_during_the_final_eval_saves_and_the_relaunch_evaluates(tmp_path, llama_dir):
    records = tiny.alpaca_records(664, seed=8)
    train = tiny.write_jsonl(tmp_path / "train.jsonl", records[:64])
    evaluation = tiny.write_jsonl(tmp_path / "eval.jsonl", records[64:])  # 600 records, one per forward: a long eval
    cfg = causal_config(tmp_path, llama_dir, train, evaluation, max_steps=3, eval_micro_batch_size=1)
    out = tmp_path / "run"
    argv = [str(cfg), f"output_dir={out}", "deepspeed=zero3"]
    status = tmp_path / "status"  # rank 0's own exit code, which the Slurm script trusts over a launcher's
    proc = subprocess.Popen(launch_command(argv, nproc=2), env=launch_env({"BIGSFT_STATUS_FILE": str(status)}),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and any(json.loads(line).get("step") == 3 for line in metrics.read_text().splitlines()
                                         if line.endswith("}"))):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() else ""
        time.sleep(0.02)
    # The last step is logged: the final eval (300 forward passes per rank) has begun. Signal one rank, as
    # srun and Slurm's --signal do.
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank=1" in " ".join(p.cmdline())]
    ranks[0].send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=600)
    # The ranks exit 75. The launcher's own code can differ: a rank that has saved and reported may still
    # abort in interpreter teardown ("terminate called without an active exception", a known torch/gloo
    # teardown race), and deepspeed's launcher then reports that instead.
    assert status.read_text().strip() == str(EXIT_SAVED), output[-3000:]
    assert "eval at step 3 cut short by a stop signal" in output, output[-3000:]
    assert "checkpoint saved, relaunch to evaluate and export" in output
    assert not any("eval/loss" in r for r in read_metrics(out)) and not (out / "final").exists()
    assert (out / "checkpoints" / "step_00000003").is_dir()
    # The relaunch has nothing left to train: it runs the eval it lost, and exports.
    check(launch(argv, nproc=2))
    evals = [r for r in read_metrics(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval/tokens"] > 0
    assert (out / "final" / "model.safetensors").is_file()
