"""The training recipe: `python -m bigsft.train CONFIG [key.path=value ...]` (and `bigsft train`).

Reads top to bottom in data-flow order: config -> preflight -> data -> process group -> model ->
engine -> loop (forward, backward, step, log, eval) -> final eval -> export. Everything that can
be wrong with the config or the data is found before the process group starts (exit code 2).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from bigsft import dist, tracking
from bigsft.config import ConfigError, RunConfig, dump_yaml, load_config, to_dict
from bigsft.data.batching import Batch
from bigsft.data.loader import SplitStats, too_many_bad
from bigsft.data.pipeline import DataPlan, eval_batches, plan_data, train_stream, windows_in_first_epoch
from bigsft.data.sources import DataError
from bigsft.data.stream import dummy_batch, source_names
from bigsft.preflight import Preflight, preflight

EXIT_OK, EXIT_CONFIG = 0, 2
USAGE = "usage: bigsft train [CONFIG_OR_RECIPE] [key.path=value ...]   (no config: the built-in demo)"


class UsageRequested(Exception):
    """--help was given."""


# --------------------------------------------------------------------------------------------------
# Arguments


def split_argv(argv: list[str]) -> tuple[str | None, list[str], int | None]:
    """(config, overrides, --local_rank). The deepspeed launcher puts `--local_rank=N` first."""
    config, overrides, local_rank = None, [], None
    it = iter(argv)
    for arg in it:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "0")
            local_rank = int(value)
        elif arg in ("-h", "--help"):
            raise UsageRequested
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; {USAGE}")
        elif "=" in arg or config is not None:
            overrides.append(arg)
        else:
            config = arg
    return config, overrides, local_rank


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (anything with fewer than 2 dimensions)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(groups: list[dict], cfg: RunConfig, offload: bool):
    """AdamW; DeepSpeed's CPU Adam when the optimizer state lives on the host (ZeRO-Offload)."""
    t = cfg.train
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, adamw_mode=True)
    import torch

    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)


# --------------------------------------------------------------------------------------------------
# The run


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def grad_norm_of(module) -> float:
    """Global L2 norm of full (unpartitioned) gradients, for ZeRO-0 fp32 where DeepSpeed keeps none."""
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def data_parallel_rank(rank: int, data_parallel_size: int) -> int:
    """DeepSpeed's pipe x data grid puts data-parallel ranks innermost: rank = stage * dp + dp_rank, so
    the pipeline stages of one replica share a dp_rank and see the same data."""
    return rank % data_parallel_size


def train(pre: Preflight, tokenizer, plan: DataPlan) -> dict[str, float]:
    """Run training; returns the final eval metrics (empty without eval data)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from bigsft.checkpoint import export_engine
    from bigsft.evaluate import evaluate, summed_loss
    from bigsft.model import build_model, count_parameters

    cfg, launch, bm = pre.cfg, pre.launch, pre.batch
    t, d = cfg.train, cfg.data
    causal = cfg.model.task == "causal_lm"
    is_main = launch.is_main
    out_dir = Path(cfg.output_dir)
    dp_rank = data_parallel_rank(launch.rank, bm.data_parallel_size)

    dist.init_process_group(launch)
    tracking.quiet_libraries(is_main)
    seed_everything(t.seed)

    def new_stream(stats: SplitStats):
        return train_stream(d, plan, stats, seed=t.seed, dp_rank=dp_rank, dp_size=bm.data_parallel_size,
                            micro_batch_size=bm.micro_batch_size, accumulation=bm.gradient_accumulation_steps,
                            pad_id=tokenizer.pad_token_id)

    if t.max_steps:
        total_steps = t.max_steps
    else:
        # Epochs need the epoch's length in optimizer steps: a sizing pass over the first epoch (the same
        # on every rank), which also counts every unusable record before training starts.
        sizing = SplitStats()
        steps_per_epoch = windows_in_first_epoch(new_stream(sizing))
        message = too_many_bad("train", sizing.records, sizing.bad, d.max_bad_fraction, sizing)
        if message:
            raise DataError(message)
        if steps_per_epoch < 1:
            raise DataError(f"data.train: an epoch holds less than one global batch ({bm.describe()}); "
                            "add data or shrink the batch")
        total_steps = t.epochs * steps_per_epoch
    ds = pre.resolved_ds(total_steps)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    # Under ZeRO-3 transformers sees this object and builds the model already partitioned.
    hf_ds_config = HfDeepSpeedConfig(ds) if pre.zero_stage == 3 else None
    model = build_model(cfg.model, pre.hf_config, tokenizer=tokenizer, id2label=plan.id2label)
    total_params, trainable_params = count_parameters(model)

    groups = param_groups(model, t.weight_decay)
    optimizer = scheduler = None
    if "optimizer" not in ds:
        optimizer = build_optimizer(groups, cfg, offload=pre.offload_optimizer != "none")
    if "scheduler" not in ds:
        warmup = t.warmup_for(total_steps)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, total=total_steps, warmup=warmup, schedule=t.lr_schedule, min_ratio=t.min_lr_ratio))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                      lr_scheduler=scheduler, config=ds)
    device = get_accelerator().current_device_name()
    zero0_fp32 = pre.zero_stage == 0 and cfg.model.dtype == "fp32"

    tracker = tracking.Tracker(out_dir, enabled=is_main, wandb_cfg=cfg.wandb, run_config=to_dict(cfg),
                               total_steps=total_steps)
    offload = pre.offload_optimizer
    names = source_names(d.train)
    mixture = ", ".join(f"{n} {w / sum(plan.weights):.0%}" for n, w in zip(names, plan.weights))
    tracking.info(
        f"[bold]bigsft[/] {cfg.model.name_or_path or cfg.model.config.get('model_type')} · {cfg.model.task} · "
        f"{total_params / 1e6:.1f}M params ({trainable_params / 1e6:.1f}M trainable) · {cfg.model.dtype} · "
        f"ZeRO-{pre.zero_stage}{' + optimizer offload (' + offload + ')' if offload != 'none' else ''} · "
        f"{launch.world_size} rank(s) · {pre.accelerator}\n"
        f"data: {mixture} · {bm.describe(f'rows of {d.max_length}' if d.packing else 'samples')} · "
        f"{total_steps} steps",
        enabled=is_main,
    )
    for line in plan.scanned["train"].first_bad:
        tracking.info(f"[yellow]skipped[/] {line}", enabled=is_main)

    eval_stats = SplitStats()
    eval_micro = t.eval_micro_batch_size or t.micro_batch_size
    dummy = dummy_batch(causal=causal, pad_id=tokenizer.pad_token_id)
    num_labels = len(plan.id2label) if plan.id2label else None

    def run_eval(step: int) -> dict[str, float]:
        engine.eval()
        batches = eval_batches(d, plan, eval_stats, dp_rank=dp_rank, dp_size=bm.data_parallel_size,
                               micro_batch_size=eval_micro, pad_id=tokenizer.pad_token_id)
        metrics = evaluate(engine, batches, causal=causal, num_labels=num_labels, device=device, dummy=dummy)
        engine.train()
        tracker.log({"step": step, **metrics})
        return metrics

    results: dict[str, dict[str, float]] = {}
    if d.eval and t.eval_at_start:
        results["before training"] = run_eval(0)

    stats = SplitStats()
    stream = new_stream(stats)
    engine.train()
    trained_tokens = 0
    pending_loss = torch.zeros((), dtype=torch.float64)
    pending = {"targets": 0.0, "tokens": 0.0, "positions": 0.0}
    last_eval_step = -1
    grad_norm = None
    clock = time.perf_counter()
    for step in range(total_steps):
        window: list[Batch] = stream.next_window()
        local = [sum(b.num_targets for b in window), sum(b.num_tokens for b in window),
                 sum(b.num_positions for b in window)]
        global_targets, global_tokens, global_positions = dist.all_reduce_sum(local)
        lr = engine.get_lr()[0]
        if global_targets > 0:  # a window without one trained token (all masked) is skipped, never NaN
            # Each micro-batch contributes sum-of-losses / trained units of the whole global batch;
            # DeepSpeed averages gradients over data-parallel ranks, hence the factor dp.
            scale = bm.data_parallel_size / global_targets
            for i, micro in enumerate(window):
                loss_sum, _ = summed_loss(engine, micro.to(device), causal=causal)
                engine.backward(loss_sum * scale, scale_wrt_gas=False)
                pending_loss += loss_sum.detach().double().cpu()
                if zero0_fp32 and i == len(window) - 1:
                    grad_norm = grad_norm_of(engine.module)
                engine.step()
            if not zero0_fp32:
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
        pending["targets"] += global_targets
        pending["tokens"] += global_tokens
        pending["positions"] += global_positions
        trained_tokens += int(global_targets if causal else global_tokens)
        done = step + 1

        if done % t.log_every == 0 or done == total_steps:
            # Data counters are the same on every rank (one global stream); only the loss is summed.
            (loss_total,) = dist.all_reduce_sum([float(pending_loss)])
            message = too_many_bad("train", stats.records, stats.bad, d.max_bad_fraction, stats)
            if message:
                raise DataError(message)
            drawn = stream.mixed.drawn
            now = time.perf_counter()
            record = {
                "step": done, "loss": loss_total / max(pending["targets"], 1.0), "lr": lr, "grad_norm": grad_norm,
                "tokens": trained_tokens,
                "tokens_per_s": (pending["targets"] if causal else pending["tokens"]) / max(now - clock, 1e-9),
                "data/efficiency": pending["tokens"] / max(pending["positions"], 1.0),
                "data/skipped": stats.bad, "data/truncated": stats.truncated,
            }
            if len(names) > 1:
                record.update({f"data/mix/{n}": c / max(sum(drawn), 1) for n, c in zip(names, drawn)})
            tracker.log(record)
            pending_loss.zero_()
            pending = dict.fromkeys(pending, 0.0)
            clock = time.perf_counter()
        if d.eval and t.eval_every and done % t.eval_every == 0:
            results["after training"] = run_eval(done)
            last_eval_step = done
            clock = time.perf_counter()

    if d.eval and last_eval_step != total_steps:
        results["after training"] = run_eval(total_steps)
    export_engine(engine, pre.zero_stage, out_dir / "final", tokenizer=tokenizer)
    tracking.info(f"saved {out_dir / 'final'}", enabled=is_main)
    if d.eval:
        tracker.summary("evaluation", results)
    tracker.close()
    del hf_ds_config
    return results.get("after training", {})


def run(config: str | None, overrides: list[str], local_rank: int | None = None) -> dict[str, float]:
    """Load and check everything, then train. Raises ConfigError before anything starts."""
    from bigsft.model import build_tokenizer

    cfg = load_config(config, overrides)
    pre = preflight(cfg, dist.read_launch_env(local_rank_arg=local_rank))
    tokenizer = build_tokenizer(cfg.model)
    plan = plan_data(cfg.data, cfg.model, tokenizer)
    try:
        return train(pre, tokenizer, plan)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        config, overrides, local_rank = split_argv(sys.argv[1:] if argv is None else argv)
        run(config, overrides, local_rank)
    except UsageRequested:
        print(USAGE)
    except (ConfigError, DataError) as e:
        print(f"bigsft: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
