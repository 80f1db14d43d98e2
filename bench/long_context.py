"""Long rows: activation bytes per rank and tokens/s of bigsft's memory levers, as the sequence grows.

    python bench/long_context.py [--lengths 2048 4096 8192 16384] [--budget-mib 512] [--layers 4] [--hidden 128]
                                 [--vocab 8192] [--family llama|qwen2] [--variants ...] [--json PATH]

One packed row of T tokens through a Llama-style model (random weights, fp32, on CPU),
forward and backward, under each variant:

    plain            every activation kept
    checkpointing    each layer recomputed in backward (model.gradient_checkpointing)
    ckpt + offload   the checkpointed layer inputs in host memory (model.activation_offload)
    ckpt + tiled     the LM loss over tiles of 1024 tokens (model.tiled_loss)
    SP 2 + ckpt      the row split over 2 ranks (sequence_parallel.size=2, Ulysses all-to-all over gloo)

The row packs samples of T/8 to T/2 tokens, so attention is masked, as a packed run's is. "peak
activation MiB" is the most bytes that the tensors created by the forward and backward held at once on
one rank, counted op by op (bench/live_memory.py); the gradients are allocated before the step and the
offload's host copies are left out, so it is what a GPU holds for activations. In parentheses: what
`bigsft plan` predicts for the same run (bigsft.plan.activations). A variant "fits" a length when the
measured peak stays under --budget-mib; the last column gives the longest length that fits each.
`--json PATH` writes the figures. tokens/s is the row's tokens over the forward + backward time (on 2
shared CPU cores: the sequence-parallel ranks share them, so its tokens/s is not a GPU's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
TILE = 1024
VARIANTS = ("plain", "checkpointing", "ckpt + offload", "ckpt + tiled", "SP 2 + ckpt")


def build(spec: dict, variant: str):
    """The model of `spec` ({family: llama or qwen2, layers, hidden, vocab}) set up for `variant`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigsft.model import choose_checkpointed_layers, trained_positions_head

    torch.manual_seed(0)
    hidden = spec["hidden"]
    config = AutoConfig.for_model(spec["family"], hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=spec["layers"], num_attention_heads=8, num_key_value_heads=4,
                                  vocab_size=spec["vocab"],
                                  max_position_embeddings=1 << 17, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).train()
    model.config.use_cache = False
    if variant != "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        choose_checkpointed_layers(model, 1, offload=variant == "ckpt + offload")
    head = trained_positions_head(model, config, TILE if variant == "ckpt + tiled" else None)
    return model, head


def row(length: int, vocab: int):
    """One packed row of `length` tokens: samples of length/8 to length/2 tokens, so the attention is masked."""
    from bigsft.data.batching import collate_packed
    from bigsft.data.tokenize import Sample

    gen = torch.Generator().manual_seed(length)
    samples, left = [], length
    while left > 0:
        n = min(left, int(torch.randint(max(1, length // 8), length // 2 + 1, (1,), generator=gen)))
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        samples.append(Sample(input_ids=ids, targets=[*ids[1:], 2]))
        left -= n
    return collate_packed([samples], pad_id=0)


def predicted(model, variant: str, length: int) -> float:
    """bigsft plan's activation bytes for this variant's run (fp32, one packed row, sdpa)."""
    from bigsft import plan

    shape = plan.model_shape(model.config, "causal_lm")
    levers = plan.Levers(tiled_loss=variant == "ckpt + tiled", activation_offload=variant == "ckpt + offload")
    return plan.activations(shape, micro_batch=1, seq=length, dtype="fp32", checkpointing=variant != "plain",
                            attention="sdpa", pipeline=1, accumulation=1, levers=levers, masked=True,
                            sequence_parallel=2 if variant.startswith("SP") else 1,
                            tile_tokens=TILE if variant == "ckpt + tiled" else None)


def measure(model, head, batch, sp=None) -> tuple[int, float]:
    """(peak bytes of the tensors a forward and backward create, seconds of forward + backward). The
    gradients are allocated before and the offloaded activations' host copies are left out: what is
    counted is what a GPU would hold for activations."""
    from live_memory import PeakLiveBytes

    import bigsft.model as bigsft_model
    from bigsft.evaluate import summed_loss

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    park = bigsft_model.park
    counter = PeakLiveBytes()

    def uncounted_park(tensor):
        copy = park(tensor)
        counter.forget(copy)
        return copy

    bigsft_model.park = uncounted_park
    try:
        start = time.perf_counter()
        with counter, sp.active() if sp is not None else contextlib.nullcontext():
            loss = summed_loss(model, sp.shard(batch) if sp is not None else batch, task="causal_lm", head=head)[0]
            loss.backward()
        seconds = time.perf_counter() - start
    finally:
        bigsft_model.park = park
    model.zero_grad(set_to_none=True)
    return counter.peak, seconds


def sequence_parallel_rank(rank: int, port: int, lengths: list[int], spec: dict, out: str) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo", verbose=False)
    from bigsft.sequence_parallel import SequenceParallel

    model, head = build(spec, "SP 2 + ckpt")
    sp = SequenceParallel(2, model.config, "sdpa")
    results = {}
    for length in lengths:
        results[length] = measure(model, head, row(length, spec["vocab"]), sp)
    torch.distributed.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def sequence_parallel(lengths, spec: dict) -> dict[int, tuple[int, float]]:
    import tempfile

    import torch.multiprocessing as mp

    from bigsft.dist import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(sequence_parallel_rank, args=(free_port(), lengths, spec, out), nprocs=2)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return {n: (max(r[str(n)][0] for r in ranks), max(r[str(n)][1] for r in ranks)) for n in lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--budget-mib", type=float, default=512)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--family", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--json", help="also write the figures here (bytes, seconds, the planner's bytes)")
    args = parser.parse_args()
    spec = {"family": args.family, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}
    results: dict[str, dict[int, tuple[int, float]]] = {}
    for variant in args.variants:
        if variant == "SP 2 + ckpt":
            results[variant] = sequence_parallel(args.lengths, spec)
            continue
        model, head = build(spec, variant)
        results[variant] = {n: measure(model, head, row(n, args.vocab)) for n in args.lengths}
    config = build(spec, "plain")[0]
    planner = {variant: {n: predicted(config, variant, n) for n in args.lengths} for variant in results}

    budget = args.budget_mib * 2**20
    print(f"{args.family} {args.layers} layers × {args.hidden} hidden, vocabulary {args.vocab}, fp32, one packed row per step; "
          f"peak activation MiB per rank, measured (planner) and tokens/s; budget {args.budget_mib:g} MiB")
    print(f"{'variant':>16} " + " ".join(f"{n:>24,}" for n in args.lengths) + f" {'longest fitting':>16}")
    for variant, by_length in results.items():
        cells = [f"{peak / 2**20:7.1f} ({planner[variant][n] / 2**20:6.1f}) {n / s:6,.0f}"
                 for n, (peak, s) in by_length.items()]
        fitting = [n for n, (peak, _) in by_length.items() if peak <= budget]
        print(f"{variant:>16} " + " ".join(f"{c:>24}" for c in cells) + f" {max(fitting) if fitting else '-':>16}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            variant: {n: {"measured": peak, "seconds": s, "planner": planner[variant][n]}
                      for n, (peak, s) in by_length.items()} for variant, by_length in results.items()}, indent=1))


if __name__ == "__main__":
    main()
