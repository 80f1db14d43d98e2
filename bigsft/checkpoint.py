"""Checkpoints that survive anything, and HF exports.

A checkpoint is a directory `output_dir/checkpoints/step_NNNNNNNN/`:

    ds/               DeepSpeed's engine checkpoint (model, optimizer, LR schedule, loss scaler)
    rank_NNNNN.pt     each rank's RNG states (python, numpy, torch), tensors and plain types only
    data.json         the training data stream's exact state
    trainer.json      step and token counters, skipped steps, tracking run id, what it was trained as
    hf/               the model's HF config and the tokenizer, for `bigsft export`
    MANIFEST.json     every file with its size, written last

It is written under `step_NNNNNNNN.tmp/`; only when every rank has finished writing (an all-reduce
of their outcomes) does rank 0 write the manifest and rename the directory. A crash at any moment
leaves at worst a `.tmp` directory that resume never looks at, and the previous checkpoints intact; a
failure on any rank (a full disk) is known to all ranks, which remove the temporary directory and stop
with one message. DeepSpeed's own `latest` tag is never written: resume picks the newest directory
whose manifest matches the files on disk, and a checkpoint that does not is an error, never a silent
fresh start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigsft import dist
from bigsft.config import ConfigError

CHECKPOINTS = "checkpoints"
DS_TAG = "ds"
UNIVERSAL_TAG = "universal"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

# Globals a DeepSpeed checkpoint may reference when unpickled: its own plain data classes. Anything else
# in a checkpoint file (a function, an arbitrary class) could run code on load, so it is refused.
SAFE_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants.PARAM_SLICE_MAPPINGS",
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.BFloat16Storage",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.LongStorage",
    "argparse.Namespace",
}


class CheckpointError(Exception):
    """A checkpoint could not be written (disk full, non-finite weights): every rank stops, exit code 1."""


# --------------------------------------------------------------------------------------------------
# Finding and checking checkpoints (no process group needed).


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Published checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def verify(path: Path) -> dict:
    """The checkpoint's trainer state; ConfigError when it is missing, incomplete or damaged."""
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist; give train.resume a checkpoint directory "
                          "(output_dir/checkpoints/step_NNNNNNNN) or a run directory, or use auto / never")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {MANIFEST}: its save never finished); "
                          "resume from an earlier one or start over with train.resume=never and a new output_dir")
    try:
        manifest = json.loads(manifest_path.read_text())
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path} is damaged: {e}") from None
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise ConfigError(f"checkpoint {path} is damaged: {rel} is missing; resume from an earlier checkpoint")
        if f.stat().st_size != size:
            raise ConfigError(f"checkpoint {path} is damaged: {rel} is {f.stat().st_size} bytes, the manifest says "
                              f"{size} (a truncated copy?); resume from an earlier checkpoint")
    return trainer


def resolve_resume(output_dir: str, resume: str) -> Path | None:
    """The checkpoint to resume from under `train.resume` (auto | never | a path), or None."""
    existing = step_dirs(output_dir)
    if resume == "never":
        if existing:
            raise ConfigError(
                f"train.resume: never, but {output_dir} already holds checkpoints (newest {existing[-1].name}); "
                "use train.resume=auto to continue that run, or another output_dir"
            )
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    path = Path(resume).expanduser()
    if path.is_dir() and not _STEP_DIR.match(path.name) and step_dirs(path):
        return step_dirs(path)[-1]  # a run directory: its newest checkpoint
    return path


def identity_problems(saved: dict, current: dict, path: Path) -> tuple[list[str], bool]:
    """(problems, world size changed). What must match for a checkpoint to continue this run."""
    problems = []
    for key, what in (("model", "model"), ("task", "task"), ("num_labels", "number of labels"),
                      ("dtype", "model.dtype"), ("zero_stage", "ZeRO stage"), ("pipeline_stages", "pipeline stages")):
        if saved.get(key) != current.get(key):
            fix = ("point deepspeed= at a JSON with the checkpoint's stage" if key == "zero_stage"
                   else "use the checkpoint's settings, or another output_dir")
            problems.append(f"checkpoint {path} was written with {what} {saved.get(key)!r}, this run has "
                            f"{current.get(key)!r}; {fix}")
    return problems, saved.get("data_parallel_size") != current.get("data_parallel_size")


def check_safe_to_unpickle(path: Path) -> None:
    """Refuse checkpoint files that reference anything beyond plain data and DeepSpeed's own data classes."""
    for f in sorted(path.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as e:  # not a torch zip file at all
            raise ConfigError(f"checkpoint file {f} is not a readable torch file: {e}") from None
        bad = sorted(unsafe - SAFE_DEEPSPEED_GLOBALS)
        if bad:
            raise ConfigError(f"checkpoint file {f} references {', '.join(bad)}: refusing to unpickle it "
                              "(it could run code); only load checkpoints written by bigsft")


@dataclass
class ResumePoint:
    """A verified checkpoint this run continues from."""

    path: Path
    trainer: dict
    universal: bool
    """The data-parallel world size changed: load through DeepSpeed's universal checkpoint format."""

    def rank_state(self, rank: int) -> dict | None:
        f = self.path / f"rank_{rank:05d}.pt"
        return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

    def convert_to_universal(self) -> None:
        """`ds_to_universal` into the checkpoint's `universal/` (once; rank 0 only)."""
        import subprocess
        import sys

        out = self.path / UNIVERSAL_TAG
        if out.is_dir():
            return
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(self.path / DS_TAG), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(f"converting {self.path} to DeepSpeed's universal format failed: {tail[0]}; "
                                  f"the command was: {' '.join(cmd)}")
        os.rename(tmp, out)


def run_identity(*, hf_config, task: str, num_labels: int | None, dtype: str, zero_stage: int,
                 pipeline_stages: int, data_parallel_size: int) -> dict:
    """What a checkpoint records about the run that wrote it, to refuse resuming a different one."""
    size = "/".join(f"{k}{getattr(hf_config, k)}" for k in ("vocab_size", "hidden_size", "num_hidden_layers", "n_embd",
                                                          "n_layer") if isinstance(getattr(hf_config, k, None), int))
    return {"model": f"{hf_config.model_type}/{size}", "task": task, "num_labels": num_labels, "dtype": dtype,
            "zero_stage": zero_stage, "pipeline_stages": pipeline_stages, "data_parallel_size": data_parallel_size}


def find_resume_point(output_dir: str, resume: str, identity: dict) -> ResumePoint | None:
    """The verified checkpoint to continue from; ConfigError listing every reason it cannot be used."""
    path = resolve_resume(output_dir, resume)
    if path is None:
        return None
    trainer = verify(path)
    problems, world_changed = identity_problems(trainer["identity"], identity, path)
    check_safe_to_unpickle(path / DS_TAG)
    if world_changed and identity.get("pipeline_stages", 1) > 1:
        problems.append(f"checkpoint {path} was written by {trainer['identity']['data_parallel_size']} data-parallel "
                        f"pipeline replicas, this run has {identity['data_parallel_size']}: resume a pipeline run on "
                        "the same world size")
    if problems:
        raise ConfigError(problems)
    return ResumePoint(path, trainer, universal=world_changed and identity["zero_stage"] > 0)


# --------------------------------------------------------------------------------------------------
# Per-rank state.


def rank_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_are_finite(engine, zero_stage: int) -> bool:
    """All ranks agree whether every weight is finite (each checks what it holds)."""
    finite = True
    for p in engine.module.parameters():
        t = p.ds_tensor if zero_stage == 3 and hasattr(p, "ds_tensor") else p.data
        if t.numel() and not torch.isfinite(t).all():
            finite = False
            break
    return dist.all_reduce_max(int(not finite)) == 0


# --------------------------------------------------------------------------------------------------
# Writing.


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            _fsync_dir(f)
    _fsync_dir(path)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class Checkpointer:
    output_dir: Path
    keep_last: int
    rank: int

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / CHECKPOINTS

    def save(self, engine, step: int, *, zero_stage: int, trainer: dict, data: dict, model_config=None,
             tokenizer=None, trainable_only: bool = False) -> Path:
        """`trainable_only`: leave out frozen weights (LoRA: the base model, which the run reloads)."""
        """Collective: write a complete checkpoint or none at all; raises CheckpointError on every rank."""
        if not weights_are_finite(engine, zero_stage):
            raise CheckpointError(f"not saving step {step}: the weights are not finite (the run diverged)")
        main = self.rank == 0
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        failure = ""
        if main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / DS_TAG).mkdir(parents=True)
            except OSError as e:
                failure = f"{tmp}: {e.strerror or e}"
        if dist.all_reduce_max(int(bool(failure))):
            raise CheckpointError(f"cannot save checkpoint {final}: {failure or 'directory not writable'}")
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=trainable_only)
        except (OSError, RuntimeError) as e:
            failure = f"{e.strerror or e}" if isinstance(e, OSError) else str(e).splitlines()[0]
            dist.barrier()  # the barrier DeepSpeed's save ends with, which this rank did not reach
        if not failure:
            try:
                torch.save(rank_state(), tmp / f"rank_{self.rank:05d}.pt")
                if main:
                    _write_json(tmp / "data.json", data)
                    _write_json(tmp / "trainer.json", trainer)
                    if model_config is not None:
                        model_config.save_pretrained(tmp / "hf")
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp / "hf")
            except OSError as e:
                failure = f"{e.strerror or e}"
        failed_ranks = dist.all_reduce_sum([1.0 if failure else 0.0])[0]
        if failed_ranks:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            where = f"rank {self.rank}: {failure}" if failure else f"{int(failed_ranks)} other rank(s)"
            raise CheckpointError(f"saving checkpoint {final} failed ({where}); the previous checkpoints are intact")
        if main:
            self._publish(tmp, final)
        dist.barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            _fsync_tree(tmp)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            _write_json(tmp / MANIFEST, {"files": files, "time": time.time()})
            if final.exists():  # a leftover of an earlier run at the same step (resume=auto replays it)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"publishing checkpoint {final} failed: {e.strerror or e}") from None
        for old in step_dirs(self.output_dir)[: -self.keep_last] if self.keep_last > 0 else []:
            doomed = old.with_name(old.name + ".deleting")  # never looks like a checkpoint while half-deleted
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(output_dir: str | Path) -> None:
    """Remove temporary directories of interrupted saves and rotations (rank 0, before training)."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Exports.


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on CPU on rank 0 (None elsewhere). Collective under ZeRO-3: call on every rank.

    ZeRO-3 gathers one module at a time, so no rank needs the whole model in accelerator memory."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.rank() != 0:
        return None
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
    try:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, out)


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

    from bigsft.model import auto_class

    unset_hf_deepspeed_config()  # the rebuild below must not be partitioned again
    base_config = copy.deepcopy(peft_model.get_base_model().config)
    task = "sequence_classification" if peft_model.peft_config["default"].task_type == "SEQ_CLS" else "causal_lm"
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
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rebuilt.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, out)


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
    from transformers import AutoConfig, AutoTokenizer

    from bigsft.model import auto_class

    path = Path(checkpoint_or_run)
    if not _STEP_DIR.match(path.name):
        steps = step_dirs(path)
        if not steps:
            raise ConfigError(f"{path}: neither a checkpoint (step_NNNNNNNN) nor a run directory with checkpoints")
        path = steps[-1]
    trainer = verify(path)
    identity = trainer["identity"]
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[identity["dtype"]])
    if identity.get("pipeline_stages", 1) > 1:  # per-layer files, renamed back to the HF names
        from bigsft.pipeline import export_checkpoint as export_pipeline_checkpoint

        check_safe_to_unpickle(path / DS_TAG)
        return export_pipeline_checkpoint(path / DS_TAG, path / "hf", Path(out_dir), dtype)
    if "lora" in trainer:  # the checkpoint holds the adapter: rebuild around the base it was trained on
        return export_lora_checkpoint(path, trainer["lora"], identity, out_dir, dtype, max_shard_size)
    config = AutoConfig.from_pretrained(path / "hf")
    state_dict = checkpoint_state_dict(path, identity["zero_stage"])
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):  # a skeleton for save_pretrained; the weights come from the checkpoint
        module = auto_class(identity["task"]).from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(path / "hf") if (path / "hf" / "tokenizer_config.json").exists() else None
    return save_hf_model(module, state_dict, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


def export_lora_checkpoint(path: Path, lora: dict, identity: dict, out_dir, dtype, max_shard_size: str) -> Path:
    import peft
    from transformers import AutoTokenizer

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
    tokenizer = AutoTokenizer.from_pretrained(path / "hf") if (path / "hf" / "tokenizer_config.json").exists() else None
    if settings.merge_on_export:
        merged = model.merge_and_unload()
        return save_hf_model(merged, merged.state_dict(), out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
