"""Memory per rank under each ZeRO stage and offload, measured, next to bigsft's planner.

    python bench/memory.py [--configs zero0 zero1 ...] [--layers 4] [--hidden 256]

For each DeepSpeed config, 2 ranks train the same Llama-style model (fp32, on CPU) and report the bytes
of every live tensor at the peak of a step (bench/memory_worker.py), next to `bigsft.plan`'s
model-state prediction for the same configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def measure(model_dir: Path, configs, nproc: int = 2) -> list[dict]:
    from bigsft.dist import free_port

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    rows = []
    for name in configs:
        with tempfile.TemporaryDirectory() as report_dir:
            cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()),
                   str(REPO / "bench" / "memory_worker.py"), str(model_dir), name, report_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("rank*.json"))]
        if proc.returncode != 0 or len(reports) != nproc:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}{proc.stdout[-3000:]}")
        rows.append(max(reports, key=lambda r: r["measured"]))
    return rows


def main() -> None:
    import tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny.build_tokenizer(Path(tmp) / "tok")
        spec = {**tiny.LLAMA, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
                "intermediate_size": 2 * args.hidden, "num_attention_heads": 8, "num_key_value_heads": 8}
        rows = measure(tiny.build_model_dir(Path(tmp) / "model", tok, spec), args.configs)
    print(f"model states per rank, 2 ranks, fp32, {rows[0]['params']:,} parameters (MiB)")
    print(f"{'config':>14} {'measured':>10} {'planner':>10} {'planner/measured':>17}")
    for r in rows:
        print(f"{r['config']:>14} {r['measured'] / 2**20:>10.2f} {r['predicted'] / 2**20:>10.2f} "
              f"{r['predicted'] / r['measured']:>17.2f}")


if __name__ == "__main__":
    main()
