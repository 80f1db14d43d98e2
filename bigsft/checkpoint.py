"""Checkpoints that survive anything, and HF exports.

A checkpoint is a directory `output_dir/checkpoints/step_NNNNNNNN/`:

    ds/               DeepSpeed's engine checkpoint (model, optimizer, LR schedule, loss scaler)
    rank_NNNNN.pt     each rank's RNG states (python, numpy, torch), tensors and plain types only
    data.json         the training data stream's exact state
    trainer.json      step and token counters, skipped steps, tracking run id, what it was trained as
    hf/               the model's HF config and the tokenizer, for `bigsft export`
    MANIFEST.json     every file with its size, written last

It is written under `step_NNNNNNNN.tmp/`; only when every rank has finished writing (a gather of their
outcomes and of the files each wrote, which rank 0 must all see: the filesystem has to be shared) does
rank 0 write the manifest and rename the directory. A crash at any moment
leaves at worst a `.tmp` directory that resume never looks at, and the previous checkpoints intact; a
failure on any rank (a full disk) is known to all ranks, which remove the temporary directory and stop
with one message. DeepSpeed's own `latest` tag is never written: resume picks the newest directory
whose manifest matches the files on disk, and a checkpoint that does not is an error, never a silent
fresh start.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigsft import dist
from bigsft.config import ConfigError
from bigsft.errors import CheckpointError
from bigsft.files import write_text_atomically

CHECKPOINTS = "checkpoints"
DS_TAG = "ds"
UNIVERSAL_TAG = "universal"
MANIFEST = "MANIFEST.json"
BEST = "best.json"
"""checkpoints/best.json: the best checkpoint by train.best_metric (its trainer.json says so too)."""
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
    # DeepSpeed partitions over data-parallel × sequence-parallel ranks (it is not told of the groups).
    partitions = [d.get("data_parallel_size", 1) * d.get("sequence_parallel", 1) for d in (saved, current)]
    return problems, partitions[0] != partitions[1]


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

    @property
    def global_batch_size(self) -> int | None:
        """Samples (or packed rows) per optimizer step of the run that wrote it; None for older checkpoints."""
        return self.trainer["identity"].get("global_batch_size")

    def rank_state(self, rank: int) -> dict | None:
        f = self.path / f"rank_{rank:05d}.pt"
        return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

    def load_into(self, engine, *, zero_stage: int, strict: bool, is_main: bool) -> None:
        """The engine's state (weights, optimizer, LR schedule) from this checkpoint; through the universal
        format when the data-parallel world size changed. `strict` False: the checkpoint holds only some
        weights (a LoRA adapter over a base the run loads anew)."""
        tag = DS_TAG
        if self.universal:  # another data-parallel world size: DeepSpeed's universal format reshards
            tag = UNIVERSAL_TAG
            self.prepare_universal(is_main=is_main)
        inner_optimizer = getattr(engine.optimizer, "optimizer", None)
        weight_decays = [g["weight_decay"] for g in inner_optimizer.param_groups] if inner_optimizer else []
        loaded, _ = engine.load_checkpoint(str(self.path), tag=tag, load_module_strict=strict,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:  # DeepSpeed returns None instead of failing: never a silent fresh start
            raise CheckpointError(f"DeepSpeed could not load {self.path / tag}")
        if self.universal and zero_stage == 3:
            repair_zero3_universal_load(inner_optimizer, weight_decays)

    def data_state(self) -> dict:
        """The stream's position and the data counters (data.json)."""
        return json.loads((self.path / "data.json").read_text())

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

    def view(self) -> str:
        """What this rank resumes from, comparable across ranks: the step directory's absolute path and
        the manifest's save time (which tells two copies of one step apart)."""
        try:
            saved = json.loads((self.path / MANIFEST).read_text())["time"]
            when = datetime.fromtimestamp(saved, timezone.utc).isoformat(timespec="milliseconds")
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            when = "unknown"
        return f"{self.path.resolve()} (step {self.trainer['step']}, saved {when})"

    def prepare_universal(self, *, is_main: bool, poll_seconds: float = 1.0) -> None:
        """Collective: rank 0 converts the checkpoint (once) and every rank gets the outcome; a failure is a
        ConfigError on every rank.

        The conversion of a large model can outlast the process group's collective timeout, so the other
        ranks do not wait in a collective: they poll the (shared) checkpoint directory for the published
        `universal/` or for the error rank 0 wrote, and only then meet rank 0 again."""
        failed = self.path / f"{UNIVERSAL_TAG}.failed"
        if is_main:
            failed.unlink(missing_ok=True)  # an earlier attempt's outcome
        dist.barrier()  # from here on, a failure file is this attempt's
        if is_main:
            try:
                self.convert_to_universal()
            except (CheckpointError, OSError) as e:
                message = str(e) if isinstance(e, CheckpointError) else (
                    f"converting {self.path} to DeepSpeed's universal format failed: {e}")
                write_text_atomically(failed, message, durable=True)
        else:
            while not (self.path / UNIVERSAL_TAG).is_dir() and not failed.is_file():
                time.sleep(poll_seconds)
        message = failed.read_text() if failed.is_file() else ""
        if dist.all_reduce_max(int(bool(message))):
            written_by = self.trainer["identity"]["data_parallel_size"]
            raise ConfigError(f"{message or 'rank 0 could not convert the checkpoint'}; resume on "
                              f"{written_by} data-parallel ranks as it was written, or fix the cause and relaunch")

    def set_aside_newer(self, output_dir: str | Path, *, is_main: bool) -> Path | None:
        """Collective: move the run's checkpoints newer than this one (an abandoned trajectory: the run goes
        on from an older checkpoint) to checkpoints/abandoned/<time>/; the directory, or None.

        Left in place, rotation (by step number) would delete the new run's checkpoints in their favour,
        and `resume: auto` would jump back to them. They are kept, never deleted: they may be wanted."""
        failure, dest = "", None
        if is_main:
            step, here = self.trainer["step"], self.path.resolve()
            newer = [p for p in step_dirs(output_dir) if p.resolve() != here
                     and int(_STEP_DIR.match(p.name).group(1)) >= step]
            if newer:
                dest = Path(output_dir) / CHECKPOINTS / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
                try:
                    dest.mkdir(parents=True, exist_ok=True)
                    for p in newer:
                        os.rename(p, dest / p.name)
                except OSError as e:
                    failure = f"{e.strerror or e}"
        if dist.all_reduce_max(int(bool(failure))):
            raise ConfigError(f"resuming from {self.path}: could not move the newer checkpoints of the abandoned "
                              f"run aside to {dest or 'checkpoints/abandoned'} ({failure or 'on rank 0'}); move "
                              "them out of output_dir/checkpoints yourself and relaunch")
        return dest


def run_identity(*, hf_config, task: str, num_labels: int | None, dtype: str, zero_stage: int,
                 pipeline_stages: int, data_parallel_size: int, global_batch_size: int | None = None,
                 sequence_parallel: int = 1) -> dict:
    """What a checkpoint records about the run that wrote it, to refuse resuming a different one, and the
    global batch a resume keeps on any world size."""
    size = "/".join(f"{k}{getattr(hf_config, k)}" for k in ("vocab_size", "hidden_size", "num_hidden_layers", "n_embd",
                                                          "n_layer") if isinstance(getattr(hf_config, k, None), int))
    return {"model": f"{hf_config.model_type}/{size}", "task": task, "num_labels": num_labels, "dtype": dtype,
            "zero_stage": zero_stage, "pipeline_stages": pipeline_stages, "data_parallel_size": data_parallel_size,
            "global_batch_size": global_batch_size, "sequence_parallel": sequence_parallel}


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
# Resuming together (collectives: every rank calls these, in this order).


def check_ranks_agree(resume: ResumePoint | None) -> None:
    """Every rank resumes from the same checkpoint, or all stop with ConfigError naming what each saw.

    Each rank picked its checkpoint from its own directory listing in preflight. Node-local output dirs,
    a relative output_dir under another working directory, or NFS attribute caching after a requeue can
    show ranks different steps: they would load different steps (a model stitched from two checkpoints)
    or one would start fresh while the others load (a hang)."""
    views = dist.all_gather_object(resume.view() if resume is not None else "nothing (no checkpoint found: a fresh start)")
    if len(set(views)) == 1:
        return
    ranks_by_view: dict[str, list[int]] = {}
    for r, view in enumerate(views):
        ranks_by_view.setdefault(view, []).append(r)
    seen = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs[:8]))}{', ...' if len(rs) > 8 else ''} "
                     f"resume{'' if len(rs) > 1 else 's'} from {view}" for view, rs in ranks_by_view.items())
    raise ConfigError(f"the ranks do not agree on the checkpoint to resume from: {seen}. Every rank must see the "
                      "same output_dir: give it as an absolute path on a filesystem shared by all nodes (or "
                      "train.resume the same checkpoint path everywhere)")


def repair_zero3_universal_load(optimizer, weight_decays: list[float]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) on the torch optimizer it wraps:
    - every parameter group gets one shared `step` tensor, which AdamW then advances once per group at
      each step: from the first step on, the bias correction is that of a later step (seen: the weights
      off by 6e-5 after two steps at lr 1e-3);
    - every group gets the first group's hyperparameters: biases and norms would get the weight decay.
    `weight_decays`: each group's, read before the load."""
    for group, decay in zip(optimizer.param_groups, weight_decays, strict=True):
        group["weight_decay"] = decay
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


# --------------------------------------------------------------------------------------------------
# Per-rank state.


def rank_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's device only: a resume may see fewer devices per node
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rank_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # written before: one state per device the rank saw
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


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


class _RecordingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during one save. DeepSpeed's save_checkpoint runs
    collectives between and after its writes (ZeRO-3 all-gathers its persistent parameters at the end):
    a rank whose write raised would skip them while the others wait in them for good. A failed write is
    recorded instead, the sequence runs to its end on every rank, and the outcome is agreed afterwards."""

    def __init__(self, inner):
        self.inner = inner
        self.written: list[str] = []
        self.failure = ""

    def save(self, state_dict, path: str) -> None:
        if self.failure:
            return  # the save has failed already: don't fill the disk further
        try:
            self.inner.save(state_dict, path)
            self.written.append(str(path))
        except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
            reason = f"{e.strerror or e}" if isinstance(e, OSError) else str(e).splitlines()[0]
            self.failure = f"cannot write {Path(path).name} ({reason}); is the disk full?"

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _written_files(tmp: Path, paths: list[str]) -> dict[str, int]:
    """What this rank wrote (paths under `tmp`, with the sizes this rank sees)."""
    files = {}
    for p in paths:
        f = Path(p)
        for one in sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]:
            files[str(one.relative_to(tmp))] = one.stat().st_size
    return files


def unseen_files(tmp: Path, reports: list[dict[str, int]]) -> str:
    """Rank 0's check that it sees every file each rank wrote ('' when it does). On nodes without a shared
    filesystem the other nodes' ranks write into a `.tmp` of their own, and a manifest built from rank
    0's view would publish a checkpoint without their shards."""
    for rank, files in enumerate(reports):
        for rel, size in files.items():
            f = tmp / rel
            seen = f.stat().st_size if f.is_file() else None
            if seen != size:
                what = "which rank 0 does not see" if seen is None else f"which rank 0 sees as {seen} bytes"
                return (f"rank {rank} wrote {rel} ({size} bytes), {what}: checkpoints need a filesystem that every "
                        f"rank shares; point output_dir at one (it is {tmp.parent.parent})")
    return ""


@dataclass
class Checkpointer:
    output_dir: Path
    keep_last: int
    rank: int

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / CHECKPOINTS

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """checkpoints/best.json names the best checkpoint (rank 0; written atomically)."""
        if self.rank == 0:
            try:
                write_text_atomically(self.root / BEST, json.dumps({"step": step, "path": self.step_dir(step).name,
                                                                     "metric": metric, "value": value}) + "\n",
                                      durable=True)
            except OSError as e:  # the checkpoints' trainer.json still say which is best
                warnings.warn(f"could not write {self.root / BEST}: {e.strerror or e}", stacklevel=2)

    def save(self, engine, step: int, *, zero_stage: int, trainer: dict, data: dict, model_config=None,
             tokenizer=None, trainable_only: bool = False, best: tuple[int, str, float] | None = None) -> Path:
        """Collective: write a complete checkpoint or none at all; raises CheckpointError on every rank.

        `trainable_only`: leave out frozen weights (LoRA: the base model, which the run reloads).
        `best`: (step, metric, value) of the best checkpoint so far, which rotation keeps; this one when
        its step is this step."""
        if not weights_are_finite(engine, zero_stage):
            raise CheckpointError(f"not saving step {step}: the weights are not finite (the run diverged)")
        main = self.rank == 0
        final = self.step_dir(step)
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
        recorder = _RecordingCheckpointEngine(engine.checkpoint_engine)
        engine.checkpoint_engine = recorder
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=trainable_only)
        except OSError as e:  # a write outside the checkpoint engine: NVMe swap files, rank 0's recovery script
            failure = f"cannot write {Path(e.filename).name if e.filename else 'a file'} ({e.strerror or e})"
            # Every such write comes after the last collective but these two, which this rank skipped.
            if getattr(engine.optimizer, "checkpoint_event_epilogue", None) is not None:
                engine.optimizer.checkpoint_event_epilogue()  # ZeRO-3: all-gathers the persistent parameters
            dist.barrier()
        finally:
            engine.checkpoint_engine = recorder.inner
        failure = recorder.failure or failure  # the first to fail
        written = recorder.written
        if engine.zero_nvme_offload_optimizer():  # DeepSpeed copies its swap files in with copytree
            swap_rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
            written = [*written, str(tmp / DS_TAG / "offloaded_tensors" / f"rank{swap_rank:0>2d}")]
        files: dict[str, int] = {}
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
                files = _written_files(tmp, [*written, str(tmp / f"rank_{self.rank:05d}.pt")])
            except (OSError, RuntimeError) as e:
                failure = f"{e.strerror or e}" if isinstance(e, OSError) else str(e).splitlines()[0]
        reports = dist.all_gather_object((failure, files))  # each rank's outcome and what it wrote
        problem = "; ".join(f"rank {r}: {f}" for r, (f, _) in enumerate(reports) if f)
        if main and not problem:
            problem = unseen_files(tmp, [f for _, f in reports])
            if not problem:
                try:
                    self._publish(tmp, final, keep=best[0] if best else None)
                    if best is not None and best[0] == step:
                        self.mark_best(*best)
                except CheckpointError as e:
                    problem = f"rank 0: {e}"
        problem = dist.all_gather_object(problem)[0]  # rank 0's verdict reaches every rank
        if problem:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            if not main:  # without a shared filesystem this rank's files are in a .tmp of its own
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint {final} failed ({problem}); the previous checkpoints are intact")
        return final

    def _publish(self, tmp: Path, final: Path, keep: int | None = None) -> None:
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
            raise CheckpointError(f"publishing it failed: {e.strerror or e}") from None
        kept = self.step_dir(keep) if keep is not None else None
        for old in step_dirs(self.output_dir)[: -self.keep_last] if self.keep_last > 0 else []:
            if old == kept:  # the best checkpoint stays whatever keep_last says
                continue
            doomed = old.with_name(old.name + ".deleting")  # never looks like a checkpoint while half-deleted
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


LOCK = ".lock"
_held_locks: dict[Path, Any] = {}  # output_dir -> its open lock file, held for the life of the process


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_is_gone(holder: dict) -> bool:
    """Without flock: whether the job a lock file names has ended, as far as this host can tell."""
    if not holder.get("pid"):
        return True  # empty: released at exit
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID"):
        return True  # this same job, requeued: its earlier run is over
    if holder.get("host") != socket.gethostname():
        return False  # another host's process cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


def take_output_dir_lock(output_dir: str | Path):
    """Lock `output_dir/.lock` for this process (flock, released however the process ends) and write who
    holds it; ConfigError naming the holder when another job has it. Returns the open lock file."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fh = open(path, "a+")  # noqa: SIM115 - held open for the whole run: closing it releases the lock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = False
    except BlockingIOError:
        busy = True
    except OSError:  # flock unsupported here (some network filesystems): judge by the holder it names
        busy = not _holder_is_gone(_lock_holder(path))
    if busy:
        holder = _lock_holder(path)
        fh.close()
        job = f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""
        raise ConfigError(f"output_dir {out} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                          f"{job}, which holds {path}: wait for that run to end or stop it, or use another "
                          f"output_dir (if it is gone and the lock file stays, delete {path})")
    fh.seek(0)
    fh.truncate()
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
               "time": time.time()}, fh)
    fh.flush()
    os.fsync(fh.fileno())
    return fh


def lock_output_dir(output_dir: str | Path) -> None:
    """Collective: rank 0 holds output_dir's lock for the rest of the run, so a second job on the same
    directory cannot delete this one's saves in progress or cut its metrics back. On a conflict every rank
    raises the same ConfigError."""
    key = Path(output_dir).resolve()

    def take() -> None:
        if key not in _held_locks:  # a second run in this process already holds it
            _held_locks[key] = take_output_dir_lock(output_dir)

    problem = dist.rank0_verdict(take, (ConfigError,))
    if problem:
        raise ConfigError(problem)


@atexit.register
def _release_locks() -> None:
    """An empty lock file reads as free where flock is unsupported; a killed run is judged by its pid."""
    for fh in _held_locks.values():
        try:
            fh.truncate(0)
            fh.close()
        except OSError:
            pass


def clean_leftovers(output_dir: str | Path) -> None:
    """Remove temporary directories of interrupted saves and rotations (rank 0, before training)."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
                shutil.rmtree(p, ignore_errors=True)
