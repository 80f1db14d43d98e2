"""The optimizer, the LR schedule, and what it takes to step them right under DeepSpeed.

bigsft builds AdamW itself (no weight decay on biases and norms), DeepSpeed's CPU Adam when the
optimizer state is offloaded, and the schedule as a LambdaLR over bigsft's step counter. The rest works
around what DeepSpeed's wrappers do at ZeRO-0 and in mixed precision: a non-finite step must leave the
weights alone whoever built the optimizer, the fp16/bf16 wrappers must get a scaled loss and must not
start from their hidden first step, and the logged gradient norm must be the true one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bigsft.config import RunConfig


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


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and state untouched when a gradient is not finite. DeepSpeed's ZeRO
    optimizers do this themselves; under ZeRO-0 the engine reads `overflow` to count the skip."""

    overflow = False

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def check(self) -> bool:
        """Whether this step's gradients are usable (a subclass may also clip them here)."""
        grads = self.gradients()
        return not grads or all(bool(torch.isfinite(g).all()) for g in grads)

    def step(self, closure=None):
        self.overflow = not self.check()
        return None if self.overflow else super().step(closure)


def build_optimizer(groups: list[dict], cfg: RunConfig, *, zero_stage: int, offload: bool,
                    zero0: Callable[..., SkippingAdamW] = SkippingAdamW):
    """AdamW; DeepSpeed's CPU Adam when the optimizer state lives on the host (ZeRO-Offload); at ZeRO-0,
    `zero0`, which skips non-finite steps (pipeline parallelism passes one that also clips)."""
    t = cfg.train
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, adamw_mode=True)
    if zero_stage > 0:  # DeepSpeed's ZeRO optimizers skip non-finite steps themselves
        return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)
    return zero0(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)


def lr_schedule(cfg: RunConfig, total_steps: int):
    """bigsft's LR schedule over its own step counter, for `deepspeed.initialize(lr_scheduler=...)`."""
    t = cfg.train
    warmup = t.warmup_for(total_steps)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, total=total_steps, warmup=warmup, schedule=t.lr_schedule, min_ratio=t.min_lr_ratio))

    return scheduler


def initialize_engine(model, cfg: RunConfig, ds: dict, total_steps: int, *, zero_stage: int, offload: bool,
                      zero0: Callable[..., SkippingAdamW] = SkippingAdamW):
    """`deepspeed.initialize` with bigsft's optimizer and schedule, unless the DeepSpeed JSON names its own."""
    import deepspeed

    groups = param_groups(model, cfg.train.weight_decay)
    optimizer = (build_optimizer(groups, cfg, zero_stage=zero_stage, offload=offload, zero0=zero0)
                 if "optimizer" not in ds else None)
    scheduler = lr_schedule(cfg, total_steps) if "scheduler" not in ds else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                      lr_scheduler=scheduler, config=ds)
    return engine


def grad_norm_of(module) -> float:
    """Global L2 norm of full (unpartitioned) gradients, for ZeRO-0 in fp32 where DeepSpeed keeps none."""

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def skip_non_finite_steps(optimizer) -> None:
    """Make `optimizer.step` leave weights and state alone when a gradient is not finite, and set
    `optimizer.overflow`, which DeepSpeed's engine reads to skip the LR schedule and report the skip. For an
    optimizer built by DeepSpeed from the JSON at ZeRO-0 in fp32, where no DeepSpeed wrapper checks."""
    step = optimizer.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not all(bool(torch.isfinite(g).all()) for g in grads)
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.step = checked_step


def scaled_by_caller(engine) -> bool:
    """Whether the engine's optimizer is one of DeepSpeed's non-ZeRO mixed-precision wrappers (ZeRO-0 in fp16,
    and in bf16 too, which DeepSpeed also runs through `FP16_UnfusedOptimizer` with a scale of 1). Their
    `step` divides the gradients by their loss scale, but `engine.backward` multiplies the loss by it only
    for ZeRO optimizers: without the caller's factor every fp16 update would be 1/scale of what it should
    be, and clipping would never engage."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer))


def undo_init_step(engine) -> None:
    """DeepSpeed's ZeRO-0 fp16/bf16 optimizers create their state by running the wrapped optimizer once on zero
    gradients. For AdamW that is a real step: the fp32 master weights take one weight decay, and Adam's
    step count starts at 1, so every bias correction is off by a step (the first update is 0.74 of what it
    should be). Put the master weights back to the model's and let the optimizer start from no state."""
    opt = engine.optimizer
    pairs = (zip(opt.fp32_groups_flat, opt.fp16_groups_flat) if hasattr(opt, "fp32_groups_flat")
             else ((m, w) for masters, weights in zip(opt.fp32_groups, opt.fp16_groups)
                   for m, w in zip(masters, weights)))
    for master, weight in pairs:
        master.data.copy_(weight.data)
    opt.optimizer.state.clear()


def fp16_loss_scale(engine) -> float | None:
    """The fp16 loss scale in force for the next step; None when not training in fp16."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None
