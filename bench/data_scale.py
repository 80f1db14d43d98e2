"""Per-rank data cost against the data-parallel size: one rank's data path at simulated world sizes.

    python bench/data_scale.py [--records 3000] [--steps 4] [--micro 2] [--sizes 1,2,4,8,16,64]
                               [--max-length 512] [--workers N] [--json PATH] [--plot PATH]

For each data-parallel size N it runs rank 0's training stream as a run of N ranks would (read -> parse
-> chat template -> tokenize -> shuffle -> pack into rows -> the rank's share of each global window ->
collate), at the same per-rank micro-batch, and reports the CPU seconds (process time: every thread,
the tokenizer's included) one rank spends on data per optimizer step, after one warm-up step. Flat in N
is the goal; a rank that makes the whole global window itself pays in proportion to N.

Two paths: cold (tokenizing while streaming) and cached (`bigsft data prepare` first, whose build time and
tokens/s are reported against the tokenizer's own batched speed). `--json` writes
{"per_rank_data_s_per_step": {"cold": {"1": s, ...}, "cached": {...}}, "cache_build": {...},
"tokens_per_step_per_rank": ...}.
Data: ../shared/data/alpaca_en_demo.json when present (else synthetic), repeated to --records; tokenizer:
all-MiniLM-L6-v2's WordPiece (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_throughput import config, tokenizer, tokenizer_tokens_per_s, write_corpus


def build_cache(corpus: Path, tok, cache_dir: Path, *, max_length: int, micro: int, workers: int, epochs: int) -> dict:
    """`bigsft data prepare`'s work on the corpus: the tokenized cache (seconds, tokens, tokens/s), then the data
    plan of `epochs` passes."""
    from bigsft.data import setup_data
    from bigsft.data.cache import prepare_source
    from bigsft.data.plan import build_plan

    data, model = config(corpus, max_length=max_length, micro=micro, packing=True)
    plan = setup_data(data, model, tok)
    start = time.perf_counter()
    [done] = prepare_source(data.train[0], "data.train[0]", plan.build, str(cache_dir), workers=workers)
    seconds = time.perf_counter() - start
    cached = setup_data(data, model, tok, cache_dir=str(cache_dir))
    start = time.perf_counter()
    build_plan(data, cached, str(cache_dir), seed=0, epochs=epochs)
    return {"seconds": seconds, "tokens": done.meta["tokens"], "tokens_per_s": done.meta["tokens"] / seconds,
            "workers": workers, "plan_seconds": time.perf_counter() - start, "plan_epochs": epochs}


def per_rank_seconds(corpus: Path, tok, *, size: int, steps: int, micro: int, max_length: int,
                     min_samples: int, cache_dir: Path | None = None, planned: bool = False) -> float:
    """CPU seconds per optimizer step of rank 0's data path in a run of `size` data-parallel ranks, over at
    least `steps` steps and `min_samples` samples drawn (the shuffle buffer refills in chunks: a few steps
    alone would miss or catch a refill by chance)."""
    from bigsft.batch_math import BatchMath
    from bigsft.data import setup_data, train_stream
    from bigsft.data.scan import SplitStats

    data, model = config(corpus, max_length=max_length, micro=micro, packing=True)
    plan = setup_data(data, model, tok, cache_dir=str(cache_dir) if cache_dir else None)
    assert cache_dir is None or plan.caches[0] is not None, plan.cache_notes
    batch = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=1, data_parallel_size=size)
    stream = train_stream(data, plan, SplitStats(), seed=0, batch=batch, dp_rank=0, pad_id=tok.pad_token_id,
                          planned=planned)
    assert planned == hasattr(stream, "plan"), stream.plan_note
    stream.next_window()  # warm-up: files opened, buffers filled
    drawn, done = sum(stream.mixed.drawn), 0
    start = time.process_time()
    while done < steps or sum(stream.mixed.drawn) - drawn < min_samples:
        stream.next_window()
        done += 1
    return (time.process_time() - start) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=4, help="at least this many steps per size")
    parser.add_argument("--min-samples", type=int, default=2000, help="and at least this many samples drawn")
    parser.add_argument("--micro", type=int, default=2, help="packed rows per rank per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--sizes", default="1,2,4,8,16,64")
    parser.add_argument("--workers", type=int, default=None, help="cache build processes (default: every core)")
    parser.add_argument("--plan-epochs", type=int, default=4, help="passes the data plan covers")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tok = tokenizer()
    figures: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", args.records)
        common = {"steps": args.steps, "micro": args.micro, "max_length": args.max_length,
                  "min_samples": args.min_samples}
        figures["cold"] = {n: per_rank_seconds(corpus, tok, size=n, **common) for n in sizes}
        build = build_cache(corpus, tok, Path(tmp) / "cache", max_length=args.max_length, micro=args.micro,
                            workers=args.workers or len(os.sched_getaffinity(0)), epochs=args.plan_epochs)
        for kind, planned in (("cached", True), ("cached_walk", False)):
            figures[kind] = {n: per_rank_seconds(corpus, tok, size=n, cache_dir=Path(tmp) / "cache", planned=planned,
                                                 **common) for n in sizes}
        tokenizer_speed = tokenizer_tokens_per_s(corpus, tok)
    print(f"one rank's data CPU seconds per optimizer step, {args.micro} packed rows of {args.max_length} tokens per "
          f"rank per step, all-MiniLM-L6-v2 WordPiece, mean over >= {args.steps} steps and >= {args.min_samples} samples")
    columns = {"cold": "cold", "cached_walk": "cache, walked", "cached": "cache + plan"}
    print(f"{'data-parallel size':>20}" + "".join(f" {name + ' s/step':>22} {'vs 1':>6}" for name in columns.values())
          + f" {'cold/plan':>10}")
    for n in sizes:
        print(f"{n:>20}" + "".join(f" {figures[k][n]:>22.5f} {figures[k][n] / figures[k][sizes[0]]:>5.2f}x"
                                   for k in columns) + f" {figures['cold'][n] / figures['cached'][n]:>9.1f}x")
    print(f"cache build ({build['workers']} workers): {build['tokens']} tokens in {build['seconds']:.2f} s, "
          f"{build['tokens_per_s']:,.0f} tokens/s; the tokenizer alone, batched, one process: "
          f"{tokenizer_speed:,.0f} tokens/s ({build['tokens_per_s'] / tokenizer_speed:.2f}x); data plan of "
          f"{build['plan_epochs']} epochs: {build['plan_seconds']:.2f} s, once")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "per_rank_data_s_per_step": {kind: {str(n): s for n, s in f.items()} for kind, f in figures.items()},
            "cache_build": {**build, "tokenizer_tokens_per_s": tokenizer_speed},
            "tokens_per_step_per_rank": args.micro * args.max_length}, indent=2) + "\n")
    if args.plot:
        plot(figures, args.plot)


def plot(figures: dict[str, dict[int, float]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = {"cold": "cold (tokenize while streaming)", "cached_walk": "tokenized cache, every rank walks the window",
              "cached": "tokenized cache + data plan"}
    for kind, values in figures.items():
        sizes = list(values)
        ax.plot(sizes, [values[n] for n in sizes], marker="o", label=labels[kind])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("data-parallel size")
    ax.set_ylabel("data CPU s / step / rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
