"""Saving models: the consolidated weights of an engine at any ZeRO stage, written as an HF directory.

The directory appears only when complete: it is written under a temporary name and renamed last,
so a crash mid-write never leaves a half-written `final/` that `from_pretrained` would load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bigsft import dist


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on CPU on rank 0 (None elsewhere). Collective under ZeRO-3: call on every rank.

    ZeRO-3 gathers one module at a time, so no rank needs the whole model in accelerator memory."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if not dist_is_main():
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def dist_is_main() -> bool:
    import torch.distributed as td

    return not td.is_initialized() or td.get_rank() == 0


def save_hf_model(module, state_dict: dict[str, torch.Tensor], out_dir: str | Path, *, tokenizer=None,
                  max_shard_size: str = "5GB") -> Path:
    """Write `state_dict` as a `from_pretrained`-loadable directory (safetensors), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = module.config
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = True  # off for training only; generation wants it
    try:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_engine(engine, zero_stage: int, out_dir: str | Path, *, tokenizer=None) -> None:
    """Consolidate and write on rank 0; every rank returns once the directory is complete."""
    state_dict = consolidated_state_dict(engine, zero_stage)
    if state_dict is not None:
        save_hf_model(engine.module, state_dict, out_dir, tokenizer=tokenizer)
    dist.barrier()
