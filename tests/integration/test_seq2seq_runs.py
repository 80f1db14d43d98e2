"""seq2seq_lm trained for real on CPU: English -> German (Multi30k) with a tiny T5 from a config.

The simple path (1 rank, ZeRO-0, accumulating 2 micro-batches) is the reference: ZeRO-3 and ZeRO-2 with the
optimizer offloaded, on 2 ranks, reproduce its losses, gradient norms, eval metrics and generated samples
(BLEU included); a ZeRO-3 run killed mid-way resumes to the uninterrupted run's losses; LoRA on T5 trains;
the export generates in transformers what bigsft's eval generated. The `seq2seq` recipe warm-starts an
encoder-decoder from the real MiniLM encoder (twice) and learns to write questions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

import tiny
from conftest import REPO, check, grad_norms, launch_command, launch_env, read_metrics, train_losses

pytestmark = pytest.mark.slow

STEPS = 6


def _lines(path: Path, n: int) -> str:
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n])


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory, shared_data) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seq2seq")
    for split, source, n in (("train", "multi30k_train3k", 200), ("dev", "multi30k_val", 21)):
        for lang in ("en", "de"):
            (d / f"{split}.{lang}").write_text(_lines(shared_data / f"{source}.{lang}", n), encoding="utf-8")
    texts = [line for lang in ("en", "de") for line in (shared_data / f"multi30k_train3k.{lang}").read_text(
        encoding="utf-8").splitlines()]
    tok = tiny.build_seq2seq_tokenizer(d / "tokenizer", texts)
    cfg = d / "t5.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(d / "unused"),
        "model": {"config": {**tiny.T5, "vocab_size": 1000}, "tokenizer": str(tok), "task": "seq2seq_lm"},
        "data": {"train": [{"path": str(d / "train.en"), "target_path": str(d / "train.de"), "format": "seq2seq",
                            "prefix": "translate English to German: "}],
                 "eval": [{"path": str(d / "dev.en"), "target_path": str(d / "dev.de"), "format": "seq2seq",
                           "prefix": "translate English to German: "}],
                 "max_length": 48, "max_target_length": 40},
        "train": {"seed": 3, "micro_batch_size": 4, "eval_micro_batch_size": 4, "lr": 3e-3, "log_every": 1,
                  "max_steps": STEPS, "eval_every": 3, "save_every": 3, "max_grad_norm": 1.0},
        "eval": {"generate": {"samples": 5, "max_new_tokens": 8}},
    }))
    out = {key: d / key for key in ("one", "zero3", "offload", "lora", "killed")}
    parity = ("test_zero3_and_offload_on_two_ranks_reproduce_one_rank_and_the_export_generates_the_same",)
    pool.add("one", [str(cfg), "deepspeed=zero0", f"output_dir={out['one']}", "train.gradient_accumulation_steps=2"],
             launcher="plain", tests=parity)
    pool.add("zero3", [str(cfg), "deepspeed=zero3", f"output_dir={out['zero3']}"], nproc=2,
             tests=(*parity, "test_seq2seq_resumes_exactly_after_a_kill"))
    pool.add("offload", [str(cfg), "deepspeed=zero2_offload", f"output_dir={out['offload']}"], nproc=2, tests=parity)
    pool.add("lora", [str(cfg), "deepspeed=zero2", f"output_dir={out['lora']}", "train.max_steps=8", "train.lr=1e-2",
                      "model.lora={r: 8, alpha: 16, target_modules: [q, v]}"], launcher="plain",
             tests=("test_lora_on_t5_trains_and_exports",))
    out["cfg"] = cfg
    # The recipe as a user runs it, shortened (and fewer generated questions).
    out["recipe"] = d / "recipe"
    pool.add("recipe", ["seq2seq", f"output_dir={out['recipe']}", "train.epochs=0", "train.max_steps=10",
                        "eval.generate.samples=10", "train.log_every=5"], launcher="plain",
             tests=("test_recipe_warm_starts_minilm_twice_and_learns_to_write_questions",))
    return out


def evals(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "eval/loss" in r]


def samples(run: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run / "samples" / f"step_{step}.jsonl").read_text().splitlines()]


def test_zero3_and_offload_on_two_ranks_reproduce_one_rank_and_the_export_generates_the_same(pool, runs):
    for key in ("one", "zero3", "offload"):
        check(pool.result(key))
    one = runs["one"]
    losses = train_losses(one)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for key in ("zero3", "offload"):
        run = runs[key]
        assert train_losses(run) == pytest.approx(losses, abs=1e-5), key
        assert grad_norms(run) == pytest.approx(grad_norms(one), rel=1e-4), key
        a, b = evals(run), evals(one)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
        for x, y in zip(a, b):
            assert x["eval/tokens"] == y["eval/tokens"] > 200  # every target token of the 21 pairs, once
            for metric in ("eval/loss", "eval/token_accuracy", "eval/bleu", "eval/rouge_l"):
                assert x[metric] == pytest.approx(y[metric], abs=1e-5), (key, metric)
            assert x["eval/bleu"] == x["eval/generate/bleu"]
        assert [r["output"] for r in samples(run, STEPS)] == [r["output"] for r in samples(one, STEPS)], key

    # final/ is a plain transformers seq2seq model: greedy generation from the eval sources writes what the
    # run's last eval wrote.
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    final = runs["zero3"] / "final"
    model = AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    rows = samples(runs["zero3"], STEPS)
    assert len(rows) == 5 and all(r["reference"] for r in rows)
    sources = (runs["cfg"].parent / "dev.en").read_text(encoding="utf-8").splitlines()[:5]
    for source, row in zip(sources, rows):
        ids = tok("translate English to German: " + source, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert tok.decode(out[0], skip_special_tokens=True).strip() == row["output"]

    # `bigsft evaluate` of the export scores what the last eval did, generation included.
    again = runs["cfg"].parent / "evaluate"
    check(subprocess.run([sys.executable, "-m", "bigsft", "evaluate", str(final), str(runs["zero3"] / "config.yaml"),
                          f"output_dir={again}"], env=launch_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=600))
    report = json.loads((again / "eval_report.json").read_text())
    last = evals(runs["zero3"])[-1]
    for key in ("eval/loss", "eval/token_accuracy", "eval/bleu", "eval/rouge_l", "eval/tokens"):
        assert report[key] == pytest.approx(last[key], abs=1e-5), key


def test_seq2seq_resumes_exactly_after_a_kill(pool, runs):
    """A 2-rank ZeRO-3 run killed (SIGKILL, every process) after its step-3 checkpoint resumes from it and
    logs the uninterrupted run's losses and eval to the end."""
    reference = runs["zero3"]
    check(pool.result("zero3"))
    out = runs["killed"]
    argv = [str(runs["cfg"]), "deepspeed=zero3", f"output_dir={out}"]
    proc = subprocess.Popen(launch_command(argv, nproc=2), env=launch_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def past_step_3() -> bool:
        try:
            return any(r.get("step", 0) >= 4 and "loss" in r for r in read_metrics(out))
        except (OSError, ValueError):  # not written yet, or a line being written
            return False

    deadline = time.time() + 600
    while not past_step_3():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 3  # the launcher and its two ranks
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the killed run left processes alive"
    assert (out / "checkpoints" / "step_00000003").is_dir() and not (out / "final").exists()
    resumed = subprocess.run(launch_command(argv, nproc=2), env=launch_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    check(resumed)
    assert "resum" in resumed.stdout.lower()
    after = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    ref = {r["step"]: r for r in read_metrics(reference) if "loss" in r}
    for step in range(4, STEPS + 1):
        assert after[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6), step
        assert after[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-5), step
    assert evals(out)[-1]["eval/bleu"] == pytest.approx(evals(reference)[-1]["eval/bleu"], abs=1e-6)


def test_lora_on_t5_trains_and_exports(pool, runs):
    proc = check(pool.result("lora"))
    run = runs["lora"]
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.3, losses
    assert "trainable" in proc.stdout
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(run / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged into the base weights
    assert {"eval/bleu", "eval/rouge_l", "eval/loss"} <= set(evals(run)[-1])


def test_recipe_warm_starts_minilm_twice_and_learns_to_write_questions(pool, runs):
    proc = check(pool.result("recipe"))
    run = runs["recipe"]
    before, after = evals(run)[0], evals(run)[-1]
    assert before["step"] == 0 and after["step"] == 10
    assert after["eval/loss"] < before["eval/loss"] - 3, (before, after)
    assert after["eval/rouge_l"] > before["eval/rouge_l"] + 0.1, (before, after)
    assert "MISSING" not in proc.stdout + proc.stderr  # transformers' list of the new cross-attention weights
    from transformers import AutoModelForSeq2SeqLM, EncoderDecoderModel

    model = AutoModelForSeq2SeqLM.from_pretrained(run / "final")
    assert isinstance(model, EncoderDecoderModel)
    assert model.generation_config.decoder_start_token_id == 101 and model.generation_config.eos_token_id == 102
