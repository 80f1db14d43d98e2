"""Everything that can be checked before a process group or a model exists, reported at once.

The config tree validates itself; here come the checks that need the environment: the world size
(batch math), the DeepSpeed JSON against the run config, the model's config file and the task it
can do, the data paths, the output directory, the accelerator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bigsft.batch_math import BatchMath, batch_math
from bigsft.checkpoint import ResumePoint, find_resume_point, run_identity
from bigsft.config import LABELED_TASKS, ConfigError, RunConfig, generation_config
from bigsft.dist import LaunchEnv
from bigsft.ds_config import RunValues, load_ds_config, offload_device, resolve_ds_config, zero_stage


def run_values(cfg: RunConfig, batch: BatchMath, *, hidden_size: int | None, total_steps: int | None) -> RunValues:
    t = cfg.train
    warmup = t.warmup_for(total_steps) if total_steps is not None else None
    return RunValues(
        batch=batch, lr=t.lr, adam_betas=t.adam_betas, adam_eps=t.adam_eps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, dtype=cfg.model.dtype, total_steps=total_steps,
        warmup_steps=warmup, min_lr_ratio=t.min_lr_ratio, hidden_size=hidden_size,
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


def _selection_problems(cfg: RunConfig) -> list[str]:
    from bigsft.data import eval_set_names
    from bigsft.evaluate import metric_names

    metric = cfg.train.selection_metric
    if metric is None:
        return []
    key = "train.best_metric" if cfg.train.best_metric else "train.early_stopping_patience"
    if not cfg.data.has_eval:
        return [f"{key}: picking the best checkpoint and stopping early follow an eval metric; set data.eval "
                "or data.validation"]
    names = metric_names(cfg.model.task, eval_set_names(cfg.data), pipeline=cfg.pipeline.stages > 1)
    generate = generation_config(cfg)
    names += [f"eval/{p}{m}" for m in generate.metrics for p in ("", "generate/")] if generate else []
    per_class = cfg.model.task in LABELED_TASKS and metric.startswith("eval/f1/")
    if metric not in names and not per_class:
        return [f"train.best_metric: {metric!r} is not a metric this run logs; task {cfg.model.task} logs "
                f"{', '.join(names)}"]
    return []


def _wandb_problems(cfg: RunConfig) -> list[str]:
    from bigsft.tracking import WANDB_MODES, wandb_mode

    mode = wandb_mode(cfg.wandb)
    if mode not in WANDB_MODES:
        return [f"WANDB_MODE={os.environ.get('WANDB_MODE')!r} in the environment: W&B knows "
                f"{', '.join(WANDB_MODES)} (or set wandb.mode in the config, which wins)"]
    return []


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


def quantization_problems(ds: dict) -> list[str]:
    """QLoRA's 4-bit base needs bitsandbytes, and a ZeRO stage that leaves the frozen weights whole."""
    import importlib.util

    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("model.quantization: needs bitsandbytes; pip install 'bigsft[qlora]' (or bitsandbytes)")
    if ds and zero_stage(ds) == 3:
        problems.append("model.quantization: ZeRO-3 cannot partition quantized weights (bitsandbytes' packed 4-bit "
                        "tensors and their quantization state); use ZeRO 0, 1 or 2, with optimizer offload if needed")
    return problems


def preflight(cfg: RunConfig, launch: LaunchEnv) -> Preflight:
    """All environment checks; raises one ConfigError listing every problem."""
    from bigsft.data.sources import list_files
    from bigsft.dist import accelerator_name, fp16_supported
    from bigsft.model import lever_problems, load_hf_config, task_problems
    from bigsft.sequence_parallel import sequence_parallel_problems

    errors: list[str] = []
    accelerator = accelerator_name()
    fp16_kernels = fp16_supported()
    sp = cfg.sequence_parallel.size
    batch, problems = batch_math(cfg.train, launch.world_size, cfg.pipeline.stages, sequence_parallel=sp)
    errors += problems

    hf_config = None
    try:
        hf_config = load_hf_config(cfg.model)
        errors += task_problems(hf_config, cfg.model.task, cfg.model.trust_remote_code)
        errors += sequence_parallel_problems(hf_config, sp)
        errors += lever_problems(cfg.model, hf_config)
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
    if cfg.model.quantization is not None:
        errors += quantization_problems(ds)
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
    errors += _selection_problems(cfg)
    errors += _wandb_problems(cfg)
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
            sequence_parallel=sp)
        try:
            resume = find_resume_point(cfg.output_dir, cfg.train.resume, identity)
        except ConfigError as e:
            errors += e.problems
        if resume is not None and resume.global_batch_size is not None:
            batch, problems = batch_math(cfg.train, launch.world_size, cfg.pipeline.stages, resume.global_batch_size,
                                         sequence_parallel=sp)
            errors += problems
            identity["global_batch_size"] = resume.global_batch_size
    if errors:
        raise ConfigError(errors)
    return Preflight(cfg=cfg, launch=launch, batch=batch, ds_raw=ds_raw, ds_label=ds_label, ds=ds,
                     hf_config=hf_config, accelerator=accelerator, fp16_kernels=fp16_kernels, identity=identity, resume=resume)
