"""The training recipe: `python -m bigsft.train CONFIG [key.path=value ...]` (and `bigsft train`).

Reads top to bottom in data-flow order: config -> preflight -> data -> process group -> model ->
engine -> loop (forward, backward, step, log, eval) -> final eval -> export. Everything that can
be wrong with the config or the data is found before the process group starts (exit code 2).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bigsft import dist, tracking
from bigsft.config import ConfigError, RunConfig, dump_yaml, load_config, to_dict
from bigsft.data.batching import Batch, collate
from bigsft.data.formats import Labeled
from bigsft.data.loader import (
    SplitStats,
    TrainBatches,
    build_samples,
    check_bad_fraction,
    eval_shard,
    label_names,
    read_examples,
)
from bigsft.data.tokenize import Sample, SampleBuilder
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
# Data: read, parse, tokenize, check; before any process group exists.


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    id2label: dict[int, str] | None
    stats: dict[str, SplitStats]


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    stats = {"train": SplitStats(), "eval": SplitStats()}
    train_examples = read_examples(cfg.data.train, "train", stats["train"])
    eval_examples = read_examples(cfg.data.eval, "eval", stats["eval"])

    id2label = None
    if cfg.model.task == "sequence_classification":
        names = label_names(train_examples, cfg.model.labels)
        n = cfg.model.num_labels or len(names or [])
        if names is not None and len(names) != n:
            raise ConfigError(
                f"data.train: the labels are named {names} ({len(names)} classes) but model.num_labels is {n}; "
                "list the names in id order in model.labels"
            )
        id2label = dict(enumerate(names)) if names else {i: f"LABEL_{i}" for i in range(n)}
        if not names and any(isinstance(ex.label, str) for ex, _ in eval_examples if isinstance(ex, Labeled)):
            raise ConfigError("data.eval: labels are names but data.train uses class ids; list model.labels")

    build = SampleBuilder(
        tokenizer, max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt,
        chat_template=cfg.data.chat_template,
        label2id={v: k for k, v in id2label.items()} if id2label else None,
        num_labels=len(id2label) if id2label else None,
    )
    train = build_samples(train_examples, build, stats["train"])
    evaluation = build_samples(eval_examples, build, stats["eval"])
    check_bad_fraction(stats["train"], "train", cfg.data.max_bad_fraction)
    if cfg.data.eval:
        check_bad_fraction(stats["eval"], "eval", cfg.data.max_bad_fraction)
        if not evaluation:
            raise ConfigError("data.eval: no usable sample")
    return PreparedData(train, evaluation, id2label, stats)


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


def train(pre: Preflight, tokenizer, data: PreparedData) -> dict[str, float]:
    """Run training; returns the final eval metrics (empty without eval data)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from bigsft.checkpoint import export_engine
    from bigsft.evaluate import evaluate, summed_loss
    from bigsft.model import build_model, count_parameters

    cfg, launch, bm = pre.cfg, pre.launch, pre.batch
    t = cfg.train
    causal = cfg.model.task == "causal_lm"
    is_main = launch.is_main
    out_dir = Path(cfg.output_dir)

    batches = TrainBatches(
        data.train, micro_batch_size=bm.micro_batch_size, gradient_accumulation_steps=bm.gradient_accumulation_steps,
        dp_rank=launch.rank // bm.pipeline_stages, dp_size=bm.data_parallel_size, seed=t.seed,
        pad_id=tokenizer.pad_token_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )
    total_steps = t.max_steps or t.epochs * batches.steps_per_epoch
    ds = pre.resolved_ds(total_steps)

    dist.init_process_group(launch)
    tracking.quiet_libraries(is_main)
    seed_everything(t.seed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        import json

        (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    # Under ZeRO-3 transformers sees this object and builds the model already partitioned.
    hf_ds_config = HfDeepSpeedConfig(ds) if pre.zero_stage == 3 else None
    model = build_model(cfg.model, pre.hf_config, tokenizer=tokenizer, id2label=data.id2label)
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
    tracking.info(
        f"[bold]bigsft[/] {cfg.model.name_or_path or cfg.model.config.get('model_type')} · {cfg.model.task} · "
        f"{total_params / 1e6:.1f}M params ({trainable_params / 1e6:.1f}M trainable) · {cfg.model.dtype} · "
        f"ZeRO-{pre.zero_stage}{' + optimizer offload (' + offload + ')' if offload != 'none' else ''} · "
        f"{launch.world_size} rank(s) · {pre.accelerator}\n"
        f"data: {len(data.train):,} train / {len(data.eval):,} eval samples, "
        f"{sum(data.stats['train'].skipped.values())} skipped · {bm.describe()} · {total_steps} steps",
        enabled=is_main,
    )
    for reason_line in data.stats["train"].first_bad + data.stats["eval"].first_bad:
        tracking.info(f"[yellow]skipped[/] {reason_line}", enabled=is_main)

    eval_sets = eval_shard(data.eval, micro_batch_size=t.eval_micro_batch_size or t.micro_batch_size,
                           rank=launch.rank // bm.pipeline_stages, world_size=bm.data_parallel_size,
                           pad_id=tokenizer.pad_token_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    dummy = collate(data.eval[:1], pad_id=tokenizer.pad_token_id) if data.eval else None
    num_labels = len(data.id2label) if data.id2label else None

    def run_eval(step: int) -> dict[str, float]:
        engine.eval()
        metrics = evaluate(engine, eval_sets, causal=causal, num_labels=num_labels, device=device, dummy=dummy)
        engine.train()
        tracker.log({"step": step, **metrics})
        return metrics

    results: dict[str, dict[str, float]] = {}
    if data.eval and t.eval_at_start:
        results["before training"] = run_eval(0)

    engine.train()
    trained_tokens = 0
    pending_loss = torch.zeros((), dtype=torch.float64)
    pending_targets = pending_tokens = 0
    last_eval_step = -1
    grad_norm = None
    clock = time.perf_counter()
    for step in range(total_steps):
        window: list[Batch] = batches.window(step)
        local_targets = sum(b.num_targets for b in window)
        local_tokens = sum(b.num_tokens for b in window) if not causal else local_targets
        global_targets, global_tokens = dist.all_reduce_sum([local_targets, local_tokens])
        lr = engine.get_lr()[0]
        # Each micro-batch contributes sum-of-losses / trained units of the whole global batch; DeepSpeed
        # averages gradients over data-parallel ranks, hence the factor dp.
        scale = bm.data_parallel_size / max(global_targets, 1.0)
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
        pending_targets += global_targets
        pending_tokens += global_tokens
        trained_tokens += int(global_tokens)
        done = step + 1

        if done % t.log_every == 0 or done == total_steps:
            (loss_total,) = dist.all_reduce_sum([float(pending_loss)])
            now = time.perf_counter()
            tracker.log({
                "step": done, "loss": loss_total / max(pending_targets, 1.0), "lr": lr, "grad_norm": grad_norm,
                "tokens": trained_tokens, "tokens_per_s": pending_tokens / max(now - clock, 1e-9),
                "epoch": step // batches.steps_per_epoch,
            })
            pending_loss.zero_()
            pending_targets = pending_tokens = 0
            clock = time.perf_counter()
        if data.eval and t.eval_every and done % t.eval_every == 0:
            results["after training"] = run_eval(done)
            last_eval_step = done
            clock = time.perf_counter()

    if data.eval and last_eval_step != total_steps:
        results["after training"] = run_eval(total_steps)
    export_engine(engine, pre.zero_stage, out_dir / "final", tokenizer=tokenizer)
    tracking.info(f"saved {out_dir / 'final'}", enabled=is_main)
    if data.eval:
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
    data = prepare_data(cfg, tokenizer)
    try:
        return train(pre, tokenizer, data)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        config, overrides, local_rank = split_argv(sys.argv[1:] if argv is None else argv)
        run(config, overrides, local_rank)
    except UsageRequested:
        print(USAGE)
    except ConfigError as e:
        print(f"bigsft: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
