"""Classification evaluation on 2 ranks counts every example exactly once: an eval set that does not divide
by the ranks (41 examples, micro-batch 4: rank 0 runs 6 batches, rank 1 runs 5 and then a dummy forward)
gives the same accuracy, precision, recall and F1 as one rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import REPO, check, read_metrics

pytestmark = pytest.mark.slow


def test_classification_metrics_on_two_ranks_equal_one_rank(tmp_path, tokenizer_dir, pool):
    topics = REPO / "bigsft" / "recipes" / "data"
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join((topics / "topics_eval.jsonl").read_text().splitlines(keepends=True)[:41]))
    cfg = tmp_path / "cls.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "unused"),
        # No dropout: ranks draw their masks from their own generators, so training (not evaluation) would
        # differ between 1 and 2 ranks, and so would the model the last evaluation sees.
        "model": {"config": {**tiny.BERT, "vocab_size": 400, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0}, "tokenizer": str(tokenizer_dir),
                  "task": "sequence_classification", "num_labels": 4},
        "data": {"train": [{"path": str(topics / "topics_train.jsonl"), "format": "classification"}],
                 "eval": [{"path": str(evaluation), "format": "classification"}], "max_length": 64},
        "train": {"seed": 3, "micro_batch_size": 4, "eval_micro_batch_size": 4, "max_steps": 2, "lr": 1e-3,
                  "log_every": 1, "eval_at_start": True, "eval_every": 0}}))
    # ZeRO-3: rank 1's dummy forward must keep the parameter gathers in step, and must count for nothing.
    # The two runs are independent: side by side (conftest's LaunchPool).
    pool.add("two", [str(cfg), "deepspeed=zero3", f"output_dir={tmp_path / 'two'}"], nproc=2)
    pool.add("one", [str(cfg), "deepspeed=zero3", f"output_dir={tmp_path / 'one'}",
                     "train.gradient_accumulation_steps=2"], launcher="plain")
    check(pool.result("two"))
    check(pool.result("one"))

    def evals(run: Path) -> list[dict]:
        return [r for r in read_metrics(run) if "eval/loss" in r]

    two, one = evals(tmp_path / "two"), evals(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2]
    for a, b in zip(two, one):
        assert a["eval/examples"] == b["eval/examples"] == 41
        # Counts of a confusion matrix: equal, not close (an example counted twice or lost would show).
        for key in ("eval/accuracy", "eval/precision", "eval/recall", "eval/f1"):
            assert a[key] == b[key], (key, json.dumps(a), json.dumps(b))
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], abs=1e-5)
    # Not a degenerate model that predicts one class for everything (metrics would then agree trivially).
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "two" / "final")
    texts = [json.loads(line)["text"] for line in evaluation.read_text().splitlines()]
    with torch.no_grad():
        predicted = {int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts}
    assert len(predicted) >= 2
