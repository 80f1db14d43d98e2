"""Everything that can be checked before a process group or a model exists, reported at once.

The config tree validates itself; here come the checks that need the environment: the world size
(batch math), the DeepSpeed JSON against the run config, the model's config file and the task it
can do, the data paths, the output directory, the accelerator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bigsft.checkpoint import ResumePoint, find_resume_point, run_identity
from bigsft.config import ConfigError, RunConfig, TrainConfig
from bigsft.dist import LaunchEnv
from bigsft.ds_config import RunValues, load_ds_config, offload_device, resolve_ds_config, zero_stage


@dataclass(frozen=True, kw_only=True)
class BatchMath:
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    pipeline_stages: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size

    def describe(self, unit: str = "samples") -> str:
        return (f"micro {self.micro_batch_size} × accumulation {self.gradient_accumulation_steps} × "
                f"data-parallel {self.data_parallel_size} = global {self.global_batch_size} {unit} per step"
                + (f" (world {self.world_size} = {self.pipeline_stages} pipeline stages × "
                   f"{self.data_parallel_size} data-parallel)" if self.pipeline_stages > 1 else ""))


def batch_math(train: TrainConfig, world_size: int, pipeline_stages: int,
               saved_global_batch: int | None = None) -> tuple[BatchMath | None, list[str]]:
    """`saved_global_batch`: the global batch of the checkpoint this run resumes. It is kept on any world
    size, so every step trains on the samples it would have (accumulation is derived again), and a config
    that asks for another global batch is refused rather than silently changing the run."""
    if world_size % pipeline_stages:
        return None, [f"pipeline.stages: {pipeline_stages} does not divide the world size {world_size}"]
    dp = world_size // pipeline_stages
    micro, accum, target = train.micro_batch_size, train.gradient_accumulation_steps, train.global_batch_size
    per_accum_step = micro * dp
    if saved_global_batch is not None:
        problem = _kept_batch_problem(micro, accum, target, dp, saved_global_batch)
        if problem:
            return None, [problem]
        target = saved_global_batch
    if target is not None:
        if accum is None:
            if target % per_accum_step:
                return None, [
                    f"train.global_batch_size: {target} is not a multiple of train.micro_batch_size {micro} × "
                    f"data-parallel world {dp} = {per_accum_step}; change one of them"
                ]
            accum = target // per_accum_step
        elif accum * per_accum_step != target:
            return None, [
                f"batch math does not add up: train.micro_batch_size {micro} × gradient_accumulation_steps {accum} × "
                f"data-parallel world {dp} = {accum * per_accum_step}, but train.global_batch_size is {target}"
            ]
    math = BatchMath(micro_batch_size=micro, gradient_accumulation_steps=accum or 1, data_parallel_size=dp,
                     pipeline_stages=pipeline_stages, world_size=world_size)
    return math, []


def _kept_batch_problem(micro: int, accum: int | None, target: int | None, dp: int, saved: int) -> str | None:
    per_accum_step = micro * dp
    if target is not None and target != saved:
        return (f"train.global_batch_size: {target}, but the checkpoint was trained with global batch {saved}: a "
                f"resumed run keeps its global batch; set train.global_batch_size={saved} or leave it unset, or "
                "start a new run in another output_dir")
    if accum is not None and accum * per_accum_step != saved:
        fix = (f"set train.gradient_accumulation_steps={saved // per_accum_step} or leave it unset"
               if saved % per_accum_step == 0 else "change train.micro_batch_size or the world size")
        return (f"train.gradient_accumulation_steps: {accum} makes micro {micro} × {accum} × data-parallel world "
                f"{dp} = {accum * per_accum_step} per step, but the checkpoint was trained with global batch "
                f"{saved}; {fix} to keep it, or start a new run in another output_dir")
    if saved % per_accum_step:
        return (f"this run resumes a checkpoint trained with global batch {saved} per step, which "
                f"train.micro_batch_size {micro} × data-parallel world {dp} = {per_accum_step} does not divide; "
                "resume on a world size (or with a micro batch) that divides it")
    return None


def run_values(cfg: RunConfig, batch: BatchMath, *, hidden_size: int | None, total_steps: int | None) -> RunValues:
    t = cfg.train
    warmup = t.warmup_for(total_steps) if total_steps is not None else None
    return RunValues(
        micro_batch_size=batch.micro_batch_size, gradient_accumulation_steps=batch.gradient_accumulation_steps,
        data_parallel_size=batch.data_parallel_size, lr=t.lr, adam_betas=t.adam_betas, adam_eps=t.adam_eps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, dtype=cfg.model.dtype, total_steps=total_steps,
        warmup_steps=warmup, min_lr_ratio=t.min_lr_ratio, hidden_size=hidden_size,
        pipeline_stages=cfg.pipeline.stages,
    )


@dataclass(frozen=True, kw_only=True)
class Preflight:
    cfg: RunConfig
    launch: LaunchEnv
    batch: BatchMath
    ds_raw: dict
    ds_label: str
    ds: dict
    hf_config: object
    accelerator: str
    fp16_kernels: bool
    identity: dict
    resume: ResumePoint | None

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds)

    @property
    def offload_optimizer(self) -> str:
        return offload_device(self.ds, "offload_optimizer")

    def resolved_ds(self, total_steps: int) -> dict:
        """The DeepSpeed dict once the total number of steps is known (it fills schedule fields)."""
        values = run_values(self.cfg, self.batch, hidden_size=_hidden_size(self.hf_config), total_steps=total_steps)
        ds = resolve_ds_config(self.ds_raw, self.ds_label, values, accelerator=self.accelerator,
                               fp16_kernels=self.fp16_kernels)
        if self.resume is not None and self.resume.universal:
            ds.setdefault("checkpoint", {})["load_universal"] = True
        return ds


def _hidden_size(hf_config) -> int | None:
    from bigsft.model import model_dims

    return model_dims(hf_config)[1] or None


def _output_dir_problem(output_dir: str) -> str | None:
    p = Path(output_dir).resolve()
    if p.exists() and not p.is_dir():
        return f"output_dir: {output_dir!r} exists and is not a directory"
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        return f"output_dir: {output_dir!r} is not writable ({parent} denies writing)"
    return None


def preflight(cfg: RunConfig, launch: LaunchEnv) -> Preflight:
    """All environment checks; raises one ConfigError listing every problem."""
    from bigsft.data.sources import list_files
    from bigsft.dist import accelerator_name, fp16_supported
    from bigsft.model import load_hf_config, task_problems

    errors: list[str] = []
    accelerator = accelerator_name()
    fp16_kernels = fp16_supported()
    batch, problems = batch_math(cfg.train, launch.world_size, cfg.pipeline.stages)
    errors += problems

    hf_config = None
    try:
        hf_config = load_hf_config(cfg.model)
        errors += task_problems(hf_config, cfg.model.task, cfg.model.trust_remote_code)
        if cfg.pipeline.stages > 1:
            from bigsft.model import resolve_model_path
            from bigsft.pipe import pipeline_problems

            model_dir = resolve_model_path(cfg.model.name_or_path) if cfg.model.name_or_path else None
            if model_dir is not None and not os.path.isdir(model_dir):
                errors.append(f"pipeline.stages > 1 loads a local model directory stage by stage; {model_dir!r} is "
                              "not one (download it first)")
                model_dir = None
            errors += pipeline_problems(
                hf_config, stages=cfg.pipeline.stages, task=cfg.model.task, from_config=cfg.model.config is not None,
                model_dir=model_dir, gradient_checkpointing=cfg.model.gradient_checkpointing,
                partition=cfg.pipeline.partition,
            )
    except ConfigError as e:
        errors += e.problems

    ds_raw, ds_label, ds = {}, "", {}
    try:
        ds_raw, ds_label = load_ds_config(cfg.deepspeed)
        if batch is not None:
            values = run_values(cfg, batch, hidden_size=_hidden_size(hf_config), total_steps=cfg.train.max_steps)
            ds = resolve_ds_config(ds_raw, ds_label, values, accelerator=accelerator, fp16_kernels=fp16_kernels)
    except ConfigError as e:
        errors += e.problems
    if cfg.model.dtype == "bf16" and accelerator == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            errors.append("model.dtype: bf16 is not supported by this GPU; use fp16 or fp32")

    for split in ("train", "eval"):
        for i, source in enumerate(getattr(cfg.data, split)):
            try:
                list_files(source, f"data.{split}[{i}]")
            except ConfigError as e:
                errors += e.problems
    problem = _output_dir_problem(cfg.output_dir)
    if problem:
        errors.append(problem)
    identity, resume = {}, None
    if hf_config is not None and batch is not None and ds:
        m = cfg.model
        identity = run_identity(
            hf_config=hf_config, task=m.task, num_labels=m.num_labels or (len(m.labels) if m.labels else None),
            dtype=m.dtype, zero_stage=zero_stage(ds), pipeline_stages=cfg.pipeline.stages,
            data_parallel_size=batch.data_parallel_size, global_batch_size=batch.global_batch_size,
        )
        try:
            resume = find_resume_point(cfg.output_dir, cfg.train.resume, identity)
        except ConfigError as e:
            errors += e.problems
        if resume is not None and resume.global_batch_size is not None:
            batch, problems = batch_math(cfg.train, launch.world_size, cfg.pipeline.stages, resume.global_batch_size)
            errors += problems
            identity["global_batch_size"] = resume.global_batch_size
    if errors:
        raise ConfigError(errors)
    return Preflight(cfg=cfg, launch=launch, batch=batch, ds_raw=ds_raw, ds_label=ds_label, ds=ds,
                     hf_config=hf_config, accelerator=accelerator, fp16_kernels=fp16_kernels, identity=identity, resume=resume)
