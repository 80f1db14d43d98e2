"""Every way out of a run: an HF model directory that `from_pretrained` loads.

From the live engine at the end of a run (`final/`: ZeRO stages gather on rank 0, pipeline stages each
write their own shard), and from a checkpoint of any kind on CPU (`bigsft export`). LoRA runs export the
merged model or the adapter alone. Every directory is written beside its destination and put in place by
`publish_dir`, so a reader sees the old one or the new one, never half; the tokenizer travels with it, with
the chat template it was trained on and the end-of-turn stop in `generation_config.json`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from bigsft import dist, pipe
from bigsft.checkpoint import (
    _STEP_DIR,
    DS_TAG,
    check_safe_to_unpickle,
    step_dirs,
    verify,
    weights_are_finite,
)
from bigsft.errors import CheckpointError, ConfigError


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on CPU on rank 0 (None elsewhere). Collective under ZeRO-3: call on every rank.

    ZeRO-3 gathers one module at a time, so no rank needs the whole model in accelerator memory."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.rank() != 0:
        return None
    if getattr(engine.module, "is_loaded_in_4bit", False) or getattr(
            getattr(engine.module, "base_model", None), "is_loaded_in_4bit", False):
        from bigsft.model import dequantized_state_dict

        return {k: v.detach().cpu() for k, v in dequantized_state_dict(engine.module).items()}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


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
    stop_at_end_of_turn(module, tokenizer)
    try:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, out)


def stop_at_end_of_turn(module, tokenizer) -> None:
    """A model prompted with its tokenizer's chat template must stop where the template ends a turn: the
    generation config's eos_token_id gets the end-of-turn token(s) (e.g. <|im_end|>) beside the EOS."""
    generation = getattr(module, "generation_config", None)  # None for models that do not generate
    if generation is None or tokenizer is None:
        return
    from bigsft.data.tokenize import end_of_turn_ids

    turn_ends = end_of_turn_ids(tokenizer)
    if not turn_ends:
        return
    eos = generation.eos_token_id
    current = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    ids = list(dict.fromkeys([*current, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
                              *turn_ends]))
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids


def publish_dir(tmp: Path, out: Path) -> Path:
    """Put a finished directory in place of `out`: a reader sees the old one or the new one, never half."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_engine(engine, zero_stage: int, out_dir: str | Path, *, tokenizer=None, lora=None) -> None:
    """Consolidate and write on rank 0; every rank returns once the directory is complete.

    With LoRA (`lora`: the run's LoraConfig) the directory holds the merged model or only the adapter."""
    if not weights_are_finite(engine, zero_stage):
        raise CheckpointError(f"not exporting {out_dir}: the weights are not finite (the run diverged)")
    state_dict = consolidated_state_dict(engine, zero_stage)
    if state_dict is not None and lora is None:
        save_hf_model(engine.module, state_dict, out_dir, tokenizer=tokenizer)
    elif state_dict is not None:
        save_lora(engine.module, state_dict, out_dir, merge=lora.merge_on_export, tokenizer=tokenizer)
    dist.barrier()


def save_lora(peft_model, state_dict: dict[str, torch.Tensor], out_dir: str | Path, *, merge: bool,
              tokenizer=None) -> Path:
    """A LoRA run's weights as a merged HF model or as a peft adapter directory, built on CPU.

    The live module may be partitioned (ZeRO-3): the same peft structure is rebuilt on the meta device
    and given the consolidated tensors, so nothing needs the accelerator."""
    import copy

    import peft
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from bigsft.model import PEFT_TASK_TYPES, auto_class

    unset_hf_deepspeed_config()  # the rebuild below must not be partitioned again
    base_config = copy.deepcopy(peft_model.get_base_model().config)
    if hasattr(base_config, "quantization_config"):  # QLoRA: the rebuild holds the dequantized weights
        del base_config.quantization_config
    peft_task = peft_model.peft_config["default"].task_type
    task = next(t for t, name in PEFT_TASK_TYPES.items() if name == peft_task)
    with torch.device("meta"):
        rebuilt = peft.get_peft_model(auto_class(task).from_config(base_config),
                                      copy.deepcopy(peft_model.peft_config["default"]))
    rebuilt.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k, v in rebuilt.state_dict().items() if v.is_meta]
    if missing:
        raise CheckpointError(f"LoRA export: {len(missing)} tensors missing from the consolidated weights, e.g. {missing[0]}")
    if merge:
        merged = rebuilt.merge_and_unload()
        return save_hf_model(merged, merged.state_dict(), out_dir, tokenizer=tokenizer)
    return save_adapter(rebuilt, out_dir, tokenizer=tokenizer)


def save_adapter(peft_model, out_dir: str | Path, *, tokenizer=None) -> Path:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, out)


def saved_tokenizer(hf_dir: Path):
    """The tokenizer a checkpoint's hf/ holds, or None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir) if (hf_dir / "tokenizer_config.json").exists() else None


def checkpoint_state_dict(path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a checkpoint, on CPU, from any ZeRO stage (no accelerator, no process group)."""
    check_safe_to_unpickle(path / DS_TAG)
    if zero_stage == 0:
        states = torch.load(path / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)


def export_checkpoint(checkpoint_or_run: str | Path, out_dir: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """`bigsft export`: a checkpoint (or a run's newest) -> an HF model directory, on CPU."""
    from transformers import AutoConfig

    from bigsft.model import auto_class, torch_dtype

    path = Path(checkpoint_or_run)
    if not _STEP_DIR.match(path.name):
        steps = step_dirs(path)
        if not steps:
            raise ConfigError(f"{path}: neither a checkpoint (step_NNNNNNNN) nor a run directory with checkpoints")
        path = steps[-1]
    trainer = verify(path)
    identity = trainer["identity"]
    dtype = torch_dtype(identity["dtype"])
    if identity.get("pipeline_stages", 1) > 1:  # per-layer files, renamed back to the HF names
        check_safe_to_unpickle(path / DS_TAG)
        return export_pipeline_checkpoint(path / DS_TAG, path / "hf", Path(out_dir), dtype)
    if "lora" in trainer:  # the checkpoint holds the adapter: rebuild around the base it was trained on
        return export_lora_checkpoint(path, trainer["lora"], identity, out_dir, dtype, max_shard_size)
    config = AutoConfig.from_pretrained(path / "hf")
    state_dict = checkpoint_state_dict(path, identity["zero_stage"])
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):  # a skeleton for save_pretrained; the weights come from the checkpoint
        module = auto_class(identity["task"]).from_config(config)
    tokenizer = saved_tokenizer(path / "hf")
    return save_hf_model(module, state_dict, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


def export_lora_checkpoint(path: Path, lora: dict, identity: dict, out_dir, dtype, max_shard_size: str) -> Path:
    import peft

    from bigsft.config import LoraConfig
    from bigsft.model import auto_class, peft_config

    base_dir = lora["base_model"]
    if not Path(base_dir).is_dir():
        raise ConfigError(f"{path}: a LoRA checkpoint needs its base model, {base_dir}, which is not there any more")
    adapter = checkpoint_state_dict(path, identity["zero_stage"])
    settings = LoraConfig(**{k: v for k, v in lora.items() if k != "base_model"})
    base = auto_class(identity["task"]).from_pretrained(base_dir, dtype=dtype, config=str(path / "hf"))
    model = peft.get_peft_model(base, peft_config(settings, identity["task"]))
    result = model.load_state_dict({k: v.to(dtype) for k, v in adapter.items()}, strict=False)
    if result.unexpected_keys or not adapter:
        raise CheckpointError(f"{path}: the adapter does not fit its base model ({len(result.unexpected_keys)} "
                              "unexpected tensors)")
    tokenizer = saved_tokenizer(path / "hf")
    if settings.merge_on_export:
        merged = model.merge_and_unload()
        return save_hf_model(merged, merged.state_dict(), out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    return save_adapter(model, out_dir, tokenizer=tokenizer)


def export_pipeline_engine(engine, hf_config, out_dir: str | Path, *, tokenizer=None) -> None:
    """final/ from a pipeline: each stage writes its own shard; no rank gathers the model."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    grid = engine.grid
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if grid.get_data_parallel_rank() == 0:
        pipe.write_stage_shard(engine.module, hf_config, tmp, grid.get_stage_id(), grid.get_pipe_parallel_world_size())
    dist.barrier()
    if dist.rank() == 0:
        _finish_pipeline_export(tmp, out, hf_config, tokenizer)
    dist.barrier()


def _finish_pipeline_export(tmp: Path, out: Path, hf_config, tokenizer) -> None:
    """Index, config, generation config and tokenizer beside the stages' shards, then publish."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    pipe.write_index(tmp)
    use_cache = getattr(hf_config, "use_cache", None)
    hf_config.use_cache = True
    hf_config.save_pretrained(tmp)
    hf_config.use_cache = use_cache
    generation = GenerationConfig.from_model_config(hf_config)  # what save_pretrained writes for a whole model
    stop_at_end_of_turn(SimpleNamespace(generation_config=generation), tokenizer)
    generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    publish_dir(tmp, out)


def export_pipeline_checkpoint(ds_dir: Path, hf_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """An HF directory from a pipeline checkpoint's per-layer files, one layer in memory at a time."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(hf_dir)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = sorted(ds_dir.glob("layer_*-model_states.pt"))
    for n, path in enumerate(files):
        index = int(re.match(r"layer_(\d+)", path.name).group(1))
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {pipe.hf_name(hf_config, index, k): v.to(dtype) if v.is_floating_point() else v
                   for k, v in state.items() if pipe.hf_name(hf_config, index, k) is not None}
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      tmp / f"model-{n + 1:05d}-of-{len(files):05d}.safetensors", metadata={"format": "pt"})
    tokenizer = saved_tokenizer(hf_dir)
    _finish_pipeline_export(tmp, out, hf_config, tokenizer)
    return out
