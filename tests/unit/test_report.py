"""`bigsft report`: one HTML page from a run directory, readable offline."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml

from bigsft.cli import main
from bigsft.report import BEST_JSON, eval_groups, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def train(step: int, loss: float | None, **extra) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0 + step, **extra}


def write_run(run: Path) -> Path:
    """A resumed, then killed classifier run: step 4 logged twice, a null loss, a line cut short."""
    run.mkdir()
    evals = {"step": 2, "eval/loss": 0.7, "eval/accuracy": 0.8, "eval/f1": 0.75, "eval/f1/pos": 0.8,
             "eval/f1/neg<x>": 0.7, "eval/chat/loss": 0.9, "eval/generate/exact_match": 0.25}
    records = [train(1, 1.0), train(2, 0.9), evals, train(3, None), train(4, 5.0), train(4, 0.6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "loss": 0.')
    (run / BEST_JSON).parent.mkdir()
    (run / BEST_JSON).write_text(json.dumps({"step": 2, "path": "step_00000002", "metric": "eval/f1",
                                             "value": 0.75}))
    (run / "eval_report.json").write_text(json.dumps({
        "step": 2, "eval/f1": 0.75, "labels": ["pos", "neg<x>"], "confusion": [[4, 1], [3, 17]],
        "classes": {"pos": {"precision": 0.5714, "recall": 0.8, "f1": 0.6667, "support": 5},
                    "neg<x>": {"precision": 0.9444, "recall": 0.85, "f1": 0.8947, "support": 20}}}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "output_dir": str(run), "model": {"name_or_path": "tiny-bert", "task": "classification"},
        "wandb": {"api_key": "SECRET-KEY"}}))
    return run


def test_later_records_win_and_broken_lines_are_skipped(tmp_path):
    metrics = read_metrics(write_run(tmp_path / "run") / "metrics.jsonl")
    assert metrics.unreadable == 1 and metrics.records == 6
    assert metrics.points("loss") == ([1, 2, 4], [1.0, 0.9, 0.6])  # step 3 was null, step 4's later value wins
    assert metrics.points("eval/f1") == ([2], [0.75])


def test_eval_keys_are_grouped_by_metric():
    keys = ["eval/loss", "eval/f1", "eval/f1/pos", "eval/f1/neg", "eval/chat/loss", "eval/code/loss",
            "eval/generate/exact_match", "eval/tokens"]
    assert eval_groups(keys) == {
        "loss": ["eval/chat/loss", "eval/code/loss", "eval/loss"],  # one eval set per line
        "exact_match": ["eval/generate/exact_match"],
        "f1": ["eval/f1", "eval/f1/neg", "eval/f1/pos"],  # the macro F1 beside each class's
        "tokens": ["eval/tokens"],
    }


def test_report_of_a_classifier_run(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    plots = IMG.findall(page)
    # loss, lr, grad_norm, tokens_per_s; eval: accuracy, loss (2 sets), f1 (macro and per class), exact_match
    assert len(plots) == 8
    assert all(base64.b64decode(p).startswith(PNG) for p in plots)
    for title in ("loss", "lr", "grad_norm", "tokens_per_s", "eval/accuracy", "eval/loss", "eval/f1",
                  "eval/exact_match"):
        assert f'alt="{title}"' in page
    assert "step 2 by eval/f1 = 0.75" in page
    assert "unreadable lines skipped: 1" in page and "last step 4" in page
    assert "tiny-bert" in page and "classification" in page and "SECRET-KEY" not in page
    # per class and confusion tables, names escaped
    assert "<td>pos</td><td>0.5714</td><td>0.8</td><td>0.6667</td><td>5</td>" in page
    assert "<td>neg&lt;x&gt;</td><td>3</td><td>17</td>" in page
    assert "neg<x>" not in page


def test_report_to_another_path_and_of_an_empty_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    out = tmp_path / "pages" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "Nothing to plot" in page and not IMG.search(page)
    assert not (run / "report.html").exists()


def test_no_run_directory_or_no_metrics_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert f"run directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds no metrics.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "report.html").exists()


def test_best_json_path_matches_the_checkpointer():
    from bigsft.checkpoint import BEST, CHECKPOINTS

    assert Path(CHECKPOINTS) / BEST == BEST_JSON
