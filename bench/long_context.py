"""Long rows: activation bytes per rank and tokens/s of bigsft's memory levers, as the sequence grows.

    python bench/long_context.py [--lengths 2048 4096 8192 16384] [--budget-mib 256] [--layers 4] [--hidden 128]

One packed row of T tokens through a Llama-style model (random weights, vocabulary 8192, fp32, on CPU),
forward and backward, under each variant:

    plain            every activation kept
    checkpointing    each layer recomputed in backward (model.gradient_checkpointing)
    ckpt + offload   the checkpointed layer inputs in host memory (model.activation_offload)
    ckpt + tiled     the LM loss over tiles of 1024 tokens (model.tiled_loss)
    SP 2 + ckpt      the row split over 2 ranks (sequence_parallel.size=2, Ulysses all-to-all over gloo)

"activation MiB" is what a forward leaves for the backward on one rank: the bytes of every live tensor
once the forward returns, the weights and the host copies of the offload left out (the same count as
bench/memory.py's). A variant "fits" a length when that stays under --budget-mib; the last line gives the
longest length that fits each. tokens/s is the row's tokens over the forward + backward time (on 2
shared CPU cores: the sequence-parallel ranks share them, so its tokens/s is not a GPU's).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCAB = 8192
TILE = 1024
VARIANTS = ("plain", "checkpointing", "ckpt + offload", "ckpt + tiled", "SP 2 + ckpt")


def build(layers: int, hidden: int, variant: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigsft.model import choose_checkpointed_layers, trained_positions_head

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB,
                                  max_position_embeddings=1 << 17, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).train()
    model.config.use_cache = False
    if variant != "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        choose_checkpointed_layers(model, 1, offload=variant == "ckpt + offload")
    head = trained_positions_head(model, config, TILE if variant == "ckpt + tiled" else None)
    return model, head


def row(length: int):
    from bigsft.data.batching import collate_packed
    from bigsft.data.tokenize import Sample

    gen = torch.Generator().manual_seed(length)
    samples, left = [], length
    while left > 0:  # samples of 512-2048 tokens, packed into one row
        n = min(left, int(torch.randint(512, 2049, (1,), generator=gen)))
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        samples.append(Sample(input_ids=ids, targets=[*ids[1:], 2]))
        left -= n
    return collate_packed([samples], pad_id=0)


def live_bytes(skip: set[int]) -> int:
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in skip and storage.nbytes():
                    seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            continue
    return sum(seen.values())


def measure(model, head, batch, sp=None) -> tuple[int, float]:
    """(bytes a forward leaves for the backward, seconds of forward + backward)."""
    import bigsft.model as bigsft_model
    from bigsft.evaluate import summed_loss

    parked = []
    park = bigsft_model.park

    def counted_park(tensor):
        copy = park(tensor)
        parked.append(copy)
        return copy

    bigsft_model.park = counted_park
    try:
        baseline = live_bytes(set())
        start = time.perf_counter()
        if sp is not None:
            with sp.active():
                loss, _ = summed_loss(model, sp.shard(batch), task="causal_lm", head=head)
                held = live_bytes({p.untyped_storage().data_ptr() for p in parked}) - baseline
                loss.backward()
        else:
            loss, _ = summed_loss(model, batch, task="causal_lm", head=head)
            held = live_bytes({p.untyped_storage().data_ptr() for p in parked}) - baseline
            loss.backward()
        seconds = time.perf_counter() - start
    finally:
        bigsft_model.park = park
    model.zero_grad(set_to_none=True)
    return held, seconds


def sequence_parallel_rank(rank: int, port: int, lengths: list[int], layers: int, hidden: int, out: str) -> None:
    import json

    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo", verbose=False)
    from bigsft.sequence_parallel import SequenceParallel

    model, head = build(layers, hidden, "SP 2 + ckpt")
    sp = SequenceParallel(2, model.config, "sdpa")
    results = {}
    for length in lengths:
        held, seconds = measure(model, head, row(length), sp)
        results[length] = (held, seconds)
    torch.distributed.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def sequence_parallel(lengths, layers, hidden) -> dict[int, tuple[int, float]]:
    import json
    import tempfile

    import torch.multiprocessing as mp

    from bigsft.dist import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(sequence_parallel_rank, args=(free_port(), lengths, layers, hidden, out), nprocs=2)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return {n: (max(r[str(n)][0] for r in ranks), max(r[str(n)][1] for r in ranks)) for n in lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--budget-mib", type=float, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    results: dict[str, dict[int, tuple[int, float]]] = {}
    for variant in VARIANTS[:-1]:
        model, head = build(args.layers, args.hidden, variant)
        results[variant] = {n: measure(model, head, row(n)) for n in args.lengths}
    results[VARIANTS[-1]] = sequence_parallel(args.lengths, args.layers, args.hidden)

    budget = args.budget_mib * 2**20
    print(f"Llama {args.layers} layers × {args.hidden} hidden, vocabulary {VOCAB}, fp32, one packed row per step; "
          f"activation MiB per rank (held for backward) and tokens/s; budget {args.budget_mib:g} MiB")
    print(f"{'variant':>16} " + " ".join(f"{n:>16,}" for n in args.lengths) + f" {'longest fitting':>16}")
    for variant, by_length in results.items():
        cells = [f"{held / 2**20:8.1f} {n / s:7,.0f}" for n, (held, s) in by_length.items()]
        fitting = [n for n, (held, _) in by_length.items() if held <= budget]
        print(f"{variant:>16} " + " ".join(f"{c:>16}" for c in cells) + f" {max(fitting) if fitting else '-':>16}")


if __name__ == "__main__":
    main()
