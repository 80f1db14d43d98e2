"""Pipeline bubble: measured against the textbook (P-1)/(m+P-1), for a few micro-batch counts m.

    python bench/pipeline_bubble.py [--micro-batches 1 2 4 8] [--steps 8] [--layers 4] [--hidden 256]

For each m, the same Llama-style model, data and global batch train unpipelined on one process and as
2 pipeline stages on 2 processes (one thread each, so both use the same cores). With perfect overlap
and no communication a P-stage step would take T1 / P; the measured bubble is 1 - (T1 / P) / T_P,
which also holds the activations' send/receive time. Steps after the first two are timed (medians).
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
sys.path.insert(0, str(REPO / "tests"))


def step_seconds(run: Path, skip: int = 2) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    times, previous = [], 0
    for r in steps:
        times.append((r["tokens"] - previous) / r["tokens_per_s"])
        previous = r["tokens"]
    return statistics.median(times[skip:])


def main() -> None:
    from bigsft.dist import free_port

    import tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    stages = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tok = tiny.build_tokenizer(d / "tok")
        spec = {**tiny.LLAMA, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
                "intermediate_size": 4 * args.hidden, "num_attention_heads": 8, "num_key_value_heads": 8}
        model = tiny.build_model_dir(d / "model", tok, spec)
        train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(4000, seed=0))
        for m in args.micro_batches:
            cfg = {"model": {"name_or_path": str(model)}, "data": {"train": [{"path": str(train), "format": "alpaca"}],
                                                                   "packing": True, "max_length": 256},
                   "train": {"micro_batch_size": 1, "gradient_accumulation_steps": m, "max_steps": args.steps,
                             "log_every": 1, "save_every": 10**6, "resume": "never"}}
            times = {}
            for p in (1, stages):
                out = d / f"run_m{m}_p{p}"
                (d / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
                if p == 1:
                    cmd = [sys.executable, "-m", "bigsft.train", str(d / "cfg.yaml")]
                else:
                    cmd = ["deepspeed", "--num_gpus", str(p), "--master_port", str(free_port()), "--module",
                           "bigsft.train", str(d / "cfg.yaml"), f"pipeline.stages={p}", "deepspeed=pipeline"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if proc.returncode != 0:
                    sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
                times[p] = step_seconds(out)
            measured = 1 - (times[1] / stages) / times[stages]
            rows.append((m, times[1], times[stages], measured, (stages - 1) / (m + stages - 1)))
    print(f"pipeline bubble, P={stages}, Llama {args.layers} layers × {args.hidden} hidden, packed rows of 256, "
          "1 thread per process")
    print(f"{'m':>3} {'T1 s/step':>10} {'T2 s/step':>10} {'measured':>9} {'(P-1)/(m+P-1)':>14}")
    for m, t1, t2, measured, theory in rows:
        print(f"{m:>3} {t1:>10.3f} {t2:>10.3f} {measured:>9.1%} {theory:>14.1%}")


if __name__ == "__main__":
    main()
