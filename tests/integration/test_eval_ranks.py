"""Classification evaluation on 2 ranks counts every example exactly once: an eval set that does not divide
by the ranks (41 examples, micro-batch 4: rank 0 runs 6 batches, rank 1 runs 5 and then a dummy forward)
gives the same accuracy, precision, recall and F1 as one rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import wandb_log
import yaml

import tiny
from conftest import REPO, check, launch_env, read_metrics

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
    # The 2-rank run logs to W&B (offline): its per-class report is a table in the run file.
    pool.add("two", [str(cfg), "deepspeed=zero3", f"output_dir={tmp_path / 'two'}", "wandb.mode=offline"], nproc=2)
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
    # The per-class report of each eval (before and after training) as a W&B table: a row per class, the
    # supports summing to the 41 examples, the last one as eval_report.json has it.
    tables = wandb_log.tables(next((tmp_path / "two" / "wandb").glob("offline-run-*")), "eval/classes")
    assert sorted(tables) == [0, 2]
    for table in tables.values():
        assert table["columns"] == ["class", "precision", "recall", "f1", "support"]
        assert len(table["data"]) == 4 and sum(row[-1] for row in table["data"]) == 41
    report = json.loads((tmp_path / "two" / "eval_report.json").read_text())
    assert tables[2]["data"] == [[name, r["precision"], r["recall"], r["f1"], r["support"]]
                                 for name, r in report["classes"].items()]
    # Not a degenerate model that predicts one class for everything (metrics would then agree trivially).
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "two" / "final")
    texts = [json.loads(line)["text"] for line in evaluation.read_text().splitlines()]
    with torch.no_grad():
        predicted = {int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts}
    assert len(predicted) >= 2


def test_generation_and_per_set_metrics_on_two_zero3_ranks_equal_one_rank(tmp_path, llama_dir, pool):
    """A causal LM with two eval sets (15 records, and 5 held out of training) and a generation eval of 5
    prompts: ZeRO-3 on 2 ranks (rank 1 answers a stand-in prompt in the last round, in lockstep) writes the
    same samples and per-set counts as 1 rank, and each set's metrics are those of the set alone."""
    records = tiny.alpaca_records(55, seed=4)
    train, evaluation = tiny.write_jsonl(tmp_path / "train.jsonl", records[:40]), tiny.write_jsonl(
        tmp_path / "dev.jsonl", records[40:])
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "unused"),
        "model": {"name_or_path": str(llama_dir), "task": "causal_lm"},
        "data": {"train": [{"path": str(train), "format": "alpaca"}], "eval": [{"path": str(evaluation), "format": "alpaca"}],
                 "validation": 5, "max_length": 128},
        "train": {"seed": 0, "micro_batch_size": 4, "eval_micro_batch_size": 4, "max_steps": 1, "lr": 1e-3,
                  "eval_at_start": True},
        "eval": {"generate": {"samples": 5, "max_new_tokens": 6}}}))
    pool.add("gen_two", [str(cfg), "deepspeed=zero3", f"output_dir={tmp_path / 'two'}"], nproc=2)
    pool.add("gen_one", [str(cfg), "deepspeed=zero3", f"output_dir={tmp_path / 'one'}",
                         "train.gradient_accumulation_steps=2"], launcher="plain")
    # bigsft evaluate of the last checkpoint on 2 ranks: each rank exports it for itself (transformers writes
    # on rank 0 only once a process group exists), then scores it as the run's last eval did.
    from bigsft.dist import free_port

    pool.add("gen_evaluate", commands=lambda: [(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "bigsft", "evaluate", str(tmp_path / "two" / "checkpoints" / "step_00000001"), str(cfg),
         f"output_dir={tmp_path / 'evaluate'}"], launch_env())], after=("gen_two",))
    check(pool.result("gen_two"))
    check(pool.result("gen_one"))

    def evals(run: Path) -> list[dict]:
        return [r for r in read_metrics(run) if "eval/loss" in r]

    two, one = evals(tmp_path / "two"), evals(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1]
    for a, b in zip(two, one):
        assert (a["eval/dev/tokens"], a["eval/validation/tokens"]) == (b["eval/dev/tokens"], b["eval/validation/tokens"])
        assert a["eval/tokens"] == a["eval/dev/tokens"] + a["eval/validation/tokens"]
        for key in ("eval/loss", "eval/dev/loss", "eval/validation/loss", "eval/token_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert {"eval/generate/exact_match", "eval/generate/rouge_l", "eval/generate/bleu"} <= set(a)

    def samples(run: Path, step: int) -> list[dict]:
        return [json.loads(line) for line in (run / "samples" / f"step_{step}.jsonl").read_text().splitlines()]

    # The same weights at step 0 on both: greedy answers equal, in prompt order, the last one from rank 0.
    assert samples(tmp_path / "two", 0) == samples(tmp_path / "one", 0)
    rows = samples(tmp_path / "two", 1)
    assert [r["reference"] for r in rows] == [r["output"] for r in records[40:45]]
    assert all(r["prompt"].endswith("assistant\n") and r["set"] == "dev" for r in rows)

    check(pool.result("gen_evaluate"))
    report = json.loads((tmp_path / "evaluate" / "eval_report.json").read_text())
    assert {k for k in report} == {k for k in two[-1] if k != "step"}
    for key, value in report.items():
        assert value == pytest.approx(two[-1][key], rel=1e-6, abs=1e-6), key
    answers = (tmp_path / "evaluate" / "samples" / "evaluate.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in answers] == samples(tmp_path / "two", 1)

    # Each set's metrics in the run are those of that set evaluated alone (the exported model, in this process).
    from test_training import reload_eval_metrics

    final = tmp_path / "two" / "final"
    alone_dev = reload_eval_metrics(cfg, final, ("data.validation=null",))
    alone_validation = reload_eval_metrics(cfg, final, ("data.eval=[]",))
    last = two[-1]
    assert alone_dev["eval/tokens"] == last["eval/dev/tokens"]
    assert alone_validation["eval/tokens"] == last["eval/validation/tokens"]
    assert alone_dev["eval/loss"] == pytest.approx(last["eval/dev/loss"], abs=1e-5)
    assert alone_validation["eval/loss"] == pytest.approx(last["eval/validation/loss"], abs=1e-5)
    assert alone_dev["eval/token_accuracy"] == pytest.approx(last["eval/dev/token_accuracy"], abs=1e-9)
