"""Training throughput against the tools a user would pick instead, on one process.

    python bench/throughput.py [--reps 3] [--steps 8] [--hidden 384] [--layers 6] [--plot bench/throughput.png]

The same Llama-style model (small vocabulary), the same instruction data (../shared/data's alpaca when
present), the same samples per optimizer step (16: micro-batches of 8, two accumulation steps), fp32:

  1. bigsft, packed rows (micro-batches of rows hold the same tokens as 16 samples), with the next windows
     prepared in a background thread (data.prefetch: 2, the default) and without (data.prefetch=0), and
     reading a tokenized cache and data plan that `bigsft data prepare` wrote before (not timed)
  2. bigsft, padded per micro-batch
  3. the Hugging Face Trainer, padded per batch (DataCollatorForSeq2Seq), as its users run it
     (TRL's SFTTrainer too, when installed)
  4. a bare PyTorch loop over bigsft's packed batches: no engine, no logging (the overhead-free floor)

Runs are interleaved (1 2 3 4 1 2 3 4 ...), each timed over its steps after the first two; the table
shows the median trained tokens/s (tokens that carry a loss) and the spread (min-max) over repetitions,
and the ratios bigsft-packed / HF Trainer and bigsft-packed / bare loop. The packed and padded bigsft
runs train on the same data: their eval losses are compared as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
sys.path.insert(0, str(REPO / "tests"))


def rows_per_micro_batch(cfg: Path) -> int:
    """Packed rows per micro-batch holding about the tokens of 8 samples (so a step trains on as many)."""
    from transformers import AutoTokenizer

    from bigsft.config import load_config
    from bigsft.data.scan import SplitStats, build_samples, read_examples
    from bigsft.data.tokenize import SampleBuilder

    run = load_config(str(cfg))
    tok = AutoTokenizer.from_pretrained(run.model.name_or_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    samples = build_samples(read_examples(run.data.train, "train", SplitStats(), limit=200),
                            SampleBuilder(tok, max_length=run.data.max_length), SplitStats())
    mean = statistics.mean(len(s.input_ids) for s in samples)
    return max(1, round(8 * mean / run.data.max_length))


def bigsft_run(cfg: Path, out: Path, packed: bool, steps: int, *extra: str) -> dict:
    rows = ["data.packing=true", f"train.micro_batch_size={rows_per_micro_batch(cfg)}"] if packed else []
    proc = subprocess.run([sys.executable, "-m", "bigsft.train", str(cfg), f"output_dir={out}", f"train.max_steps={steps}",
                           *rows, *extra], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"bigsft failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens_per_s"] for r in records if "loss" in r][2:]
    eval_loss = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
    return {"tokens_per_s": statistics.median(per_step), "eval_loss": eval_loss}


def worker_run(mode: str, cfg: Path, steps: int) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("throughput_worker.py")), mode, str(cfg),
                           str(steps), str(rows_per_micro_batch(cfg))], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tok = tiny.build_tokenizer(d / "tok", vocab_size=1000)
        spec = {**tiny.LLAMA, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
                "intermediate_size": max(64, int(args.hidden * 8 / 3) // 64 * 64),
                "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64}
        model = tiny.build_model_dir(d / "model", tok, spec)
        records = json.loads(SHARED.read_text()) if SHARED.is_file() else tiny.alpaca_records(args.records, seed=0)
        train = tiny.write_jsonl(d / "train.jsonl", records[: args.records])
        evaluation = tiny.write_jsonl(d / "eval.jsonl", records[args.records : args.records + 32]
                                      or tiny.alpaca_records(32, seed=1))
        cfg = d / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(model)},
            "data": {"train": [{"path": str(train), "format": "alpaca"}],
                     "eval": [{"path": str(evaluation), "format": "alpaca"}], "max_length": 512,
                     "shuffle_buffer": 1},
            "train": {"micro_batch_size": 8, "gradient_accumulation_steps": 2, "lr": 3e-4, "log_every": 1,
                      "save_every": 10**6, "resume": "never", "seed": 0, "warmup_steps": 0},
        }))
        cache = d / "cache"  # `bigsft data prepare` once, untimed, as a run at scale would have it
        rows = rows_per_micro_batch(cfg)
        subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", str(cfg), "data.packing=true",
                        f"train.micro_batch_size={rows}", f"train.max_steps={args.steps}", f"data.cache_dir={cache}"],
                       check=True, capture_output=True, cwd=REPO)
        systems = {"bigsft packed": lambda i: bigsft_run(cfg, d / f"p{i}", True, args.steps),
                   "bigsft packed, cached": lambda i: bigsft_run(cfg, d / f"c{i}", True, args.steps,
                                                                 f"data.cache_dir={cache}", "data.cache=require"),
                   "bigsft packed, no prefetch": lambda i: bigsft_run(cfg, d / f"n{i}", True, args.steps,
                                                                      "data.prefetch=0"),
                   "bigsft padded": lambda i: bigsft_run(cfg, d / f"u{i}", False, args.steps),
                   "HF Trainer": lambda i: worker_run("hf", cfg, args.steps),
                   "bare PyTorch loop": lambda i: worker_run("bare", cfg, args.steps)}
        try:
            import trl  # noqa: F401

            systems["TRL SFTTrainer"] = lambda i: worker_run("trl", cfg, args.steps)
        except ImportError:
            pass
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for i in range(args.reps):  # interleaved: A B C D A B C D ...
            for name, run in systems.items():
                results[name].append(run(i))
    print(f"trained tokens/s, one process on {os.cpu_count()} CPU cores, fp32, Llama {args.layers} layers × "
          f"{args.hidden}, 16 samples per step, median over {args.reps} interleaved runs (min-max)")
    medians = {}
    for name, runs in results.items():
        rates = [r["tokens_per_s"] for r in runs]
        medians[name] = statistics.median(rates)
        print(f"{name:>20} {medians[name]:>10,.0f}   ({min(rates):,.0f}-{max(rates):,.0f})")
    packed = medians["bigsft packed"]
    print(f"bigsft packed / HF Trainer: {packed / medians['HF Trainer']:.2f}x   "
          f"bigsft packed / bare loop: {packed / medians['bare PyTorch loop']:.2f}x   "
          f"bigsft padded / HF Trainer: {medians['bigsft padded'] / medians['HF Trainer']:.2f}x   "
          f"prefetch on / off: {packed / medians['bigsft packed, no prefetch']:.2f}x")
    cached = medians["bigsft packed, cached"]
    print(f"with the tokenized cache: / HF Trainer {cached / medians['HF Trainer']:.2f}x   "
          f"/ bare loop {cached / medians['bare PyTorch loop']:.2f}x")
    losses = [statistics.median(r["eval_loss"] for r in results[k]) for k in ("bigsft packed", "bigsft padded")]
    print(f"eval loss after {args.steps} steps: packed {losses[0]:.4f}, padded {losses[1]:.4f} "
          f"(difference {abs(losses[0] - losses[1]) / losses[1]:.1%})")
    if args.plot:
        plot(medians, args.plot)


def plot(medians: dict[str, float], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: plot skipped; pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(medians)
    ax.barh(names, [medians[n] for n in names], color=["#2a6f97" if n.startswith("bigsft") else "#999999"
                                                        for n in names])
    for y, n in enumerate(names):
        ax.text(medians[n], y, f" {medians[n]:,.0f}", va="center")
    ax.set_xlim(0, max(medians.values()) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("trained tokens / s (median)")
    ax.set_title("bench/throughput.py: same model, data and samples per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
