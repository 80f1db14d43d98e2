"""DeepSpeed JSON: find it, read it, fill its "auto" fields from the run config, reject conflicts.

The JSON owns ZeRO, offload and precision details; the run config owns batch sizes, learning rate,
clipping and the schedule. A field that both could set is "auto" in the JSON and filled here; an
explicit JSON value that disagrees with the run config is an error naming both values. Pure
dict -> dict: no torch, no DeepSpeed import.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigsft.batch_math import BatchMath
from bigsft.config import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel carries the JSONs inside the package; an editable install reads them from the repo.
DS_CONFIG_DIRS = (PACKAGE_DIR / "_ds_configs", PACKAGE_DIR.parent / "ds_configs")
AUTO = "auto"


@dataclass(frozen=True, kw_only=True)
class RunValues:
    """What the run config decides and the DeepSpeed JSON must agree with."""

    batch: BatchMath
    lr: float
    adam_betas: tuple[float, float]
    adam_eps: float
    weight_decay: float
    max_grad_norm: float
    dtype: str  # fp32 | bf16 | fp16
    total_steps: int | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    hidden_size: int | None = None


def shipped_configs() -> list[Path]:
    for d in DS_CONFIG_DIRS:
        if d.is_dir():
            return sorted(d.glob("*.json"))
    return []


def find_ds_config(spec: str) -> Path:
    """A path, or the name of a shipped config (`zero3.json`, `zero3`, `ds_configs/zero3.json`)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.resolve()
    name = p.name if p.suffix == ".json" else f"{p.name}.json"
    for d in DS_CONFIG_DIRS:
        if (d / name).is_file():
            return d / name
    names = ", ".join(x.stem for x in shipped_configs())
    raise ConfigError(f"deepspeed: {spec!r} not found; give a JSON path or a shipped config ({names})")


_ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in string values (e.g. the NVMe path)."""
    if isinstance(value, str):
        return _ENV_VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def load_ds_config(spec: str | dict) -> tuple[dict, str]:
    """The raw JSON dict and a label for messages (the file path, or 'inline deepspeed dict')."""
    if isinstance(spec, dict):
        return _expand_env(copy.deepcopy(spec)), "inline deepspeed dict"
    path = find_ds_config(spec)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"deepspeed: cannot read {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed: {path}: expected a JSON object at the top")
    return _expand_env(raw), str(path)


def zero_stage(ds: dict) -> int:
    zero = ds.get("zero_optimization")
    if isinstance(zero, bool):
        return 1 if zero else 0
    if isinstance(zero, dict):
        stage = zero.get("stage", 0)
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else -1
    return 0


def offload_device(ds: dict, what: str) -> str:
    """'none', 'cpu' or 'nvme' for what = 'offload_optimizer' | 'offload_param'."""
    zero = ds.get("zero_optimization")
    section = zero.get(what) if isinstance(zero, dict) else None
    if isinstance(section, dict):
        return str(section.get("device", "none"))
    return "none"


def precision_of(ds: dict) -> str:
    """fp32 | bf16 | fp16, as a resolved JSON asks for."""
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") is True:
            return name
    return "fp32"


class _Filler:
    """Walks the JSON filling "auto" and checking explicit values, collecting every conflict."""

    def __init__(self, ds: dict, label: str):
        self.ds = ds
        self.label = label
        self.errors: list[str] = []

    def fill(self, section: dict, key: str, value: Any, *, run_key: str, where: str) -> None:
        """Set section[key] to value when absent or "auto"; an explicit different value is a conflict."""
        if key not in section or section[key] == AUTO:
            section[key] = value
            return
        current = section[key]
        if not _same(current, value):
            self.errors.append(
                f"deepspeed: {self.label}: {where}{key} is {json.dumps(current)} but the run config gives "
                f"{json.dumps(value)} ({run_key}); set it to \"auto\" or make them agree"
            )

    def fill_if_auto(self, section: dict, key: str, value: Any) -> None:
        if section.get(key) == AUTO:
            if value is None:
                del section[key]  # DeepSpeed's own default
            else:
                section[key] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# The fields of DeepSpeed's LR schedulers that bigsft's train.* settings decide.
SCHEDULER_RUN_FIELDS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps", "cos_min_ratio"),
}


def resolve_ds_config(raw: dict, label: str, run: RunValues, *, accelerator: str = "cuda",
                      fp16_kernels: bool | None = None) -> dict:
    """A copy of `raw` with every "auto" filled from `run`; raises ConfigError listing all conflicts.

    `fp16_kernels`: whether the accelerator trains in fp16 (DeepSpeed's `is_fp16_supported`); by default
    every accelerator but the CPU."""
    ds = copy.deepcopy(raw)
    f = _Filler(ds, label)
    batch_math = (
        f"train.micro_batch_size {run.batch.micro_batch_size} × gradient_accumulation_steps "
        f"{run.batch.gradient_accumulation_steps} × data-parallel world {run.batch.data_parallel_size}"
    )
    f.fill(ds, "train_micro_batch_size_per_gpu", run.batch.micro_batch_size, run_key="train.micro_batch_size", where="")
    f.fill(ds, "gradient_accumulation_steps", run.batch.gradient_accumulation_steps,
           run_key="train.gradient_accumulation_steps", where="")
    # Under sequence parallelism DeepSpeed counts each rank of a group as a data-parallel one.
    f.fill(ds, "train_batch_size", run.batch.global_batch_size * run.batch.sequence_parallel, run_key=batch_math,
           where="")
    f.fill(ds, "gradient_clipping", run.max_grad_norm, run_key="train.max_grad_norm", where="")

    optimizer = ds.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        f.fill(params, "lr", run.lr, run_key="train.lr", where="optimizer.params.")
        f.fill(params, "betas", list(run.adam_betas), run_key="train.adam_betas", where="optimizer.params.")
        f.fill(params, "eps", run.adam_eps, run_key="train.adam_eps", where="optimizer.params.")
        f.fill(params, "weight_decay", run.weight_decay, run_key="train.weight_decay", where="optimizer.params.")

    scheduler = ds.get("scheduler")
    if isinstance(scheduler, dict):
        params = scheduler.setdefault("params", {})
        # A field the JSON leaves out would take DeepSpeed's default (a peak LR of 1e-3, 1000 warmup steps),
        # not the run's: bigsft fills it as if it were "auto".
        for key in SCHEDULER_RUN_FIELDS.get(scheduler.get("type"), ()):
            params.setdefault(key, AUTO)
        if "warmup_max_lr" in params:
            f.fill(params, "warmup_max_lr", run.lr, run_key="train.lr", where="scheduler.params.")
        f.fill_if_auto(params, "warmup_min_lr", 0.0)
        f.fill_if_auto(params, "warmup_num_steps", run.warmup_steps)
        f.fill_if_auto(params, "total_num_steps", run.total_steps)
        f.fill_if_auto(params, "cos_min_ratio", run.min_lr_ratio)

    _fill_precision(ds, f, run.dtype)
    _fill_zero(ds, f, run)
    if run.batch.pipeline_stages > 1 and zero_stage(ds) == 0:
        # DeepSpeed's ZeRO-0 clipping would see one stage's gradients only: bigsft's optimizer clips by the
        # norm over all stages (train.max_grad_norm) instead.
        ds["gradient_clipping"] = 0.0

    ds.setdefault("steps_per_print", 10**9)  # bigsft logs; keep DeepSpeed's own step prints quiet
    ds.setdefault("wall_clock_breakdown", False)

    leftover = _find_auto(ds)
    for path in leftover:
        f.errors.append(f"deepspeed: {label}: {path} is \"auto\" but bigsft has no value for it; set it explicitly")
    if run.dtype == "fp16" and not (accelerator != "cpu" if fp16_kernels is None else fp16_kernels):
        f.errors.append(f"model.dtype: fp16 does not train on {accelerator.upper()} (no fp16 kernels); "
                        "use fp32 or bf16")
    if f.errors:
        raise ConfigError(f.errors)
    return ds


def _fill_precision(ds: dict, f: _Filler, dtype: str) -> None:
    if "bfloat16" in ds and "bf16" not in ds:
        ds["bf16"] = ds.pop("bfloat16")
    for key, wanted in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        section = ds.get(key)
        if section is None:
            if wanted:
                ds[key] = {"enabled": True}
            continue
        if not isinstance(section, dict):
            f.errors.append(f"deepspeed: {f.label}: {key} must be an object like {{\"enabled\": \"auto\"}}")
            continue
        enabled = section.get("enabled", AUTO if wanted else False)
        if enabled == AUTO:
            section["enabled"] = wanted
        elif bool(enabled) != wanted:
            f.errors.append(
                f"deepspeed: {f.label}: {key}.enabled is {json.dumps(enabled)} but model.dtype is {dtype!r}; "
                f"set it to \"auto\" or make them agree"
            )
    if "fp16" in ds and ds["fp16"].get("enabled"):
        fp16 = ds["fp16"]
        for key, default in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                             ("hysteresis", 2), ("min_loss_scale", 1)):
            f.fill_if_auto(fp16, key, default)


def _fill_zero(ds: dict, f: _Filler, run: RunValues) -> None:
    zero = ds.get("zero_optimization")
    if isinstance(zero, bool):  # DeepSpeed's deprecated boolean form
        ds["zero_optimization"] = zero = {"stage": 1 if zero else 0}
    if zero is None:
        ds["zero_optimization"] = zero = {"stage": 0}
    if not isinstance(zero, dict):
        f.errors.append(f"deepspeed: {f.label}: zero_optimization must be an object with a \"stage\"")
        return
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        f.errors.append(f"deepspeed: {f.label}: zero_optimization.stage is {zero.get('stage')!r}; use 0, 1, 2 or 3")
        return
    h = run.hidden_size
    f.fill_if_auto(zero, "reduce_bucket_size", h * h if h else None)
    f.fill_if_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h) if h else None)
    f.fill_if_auto(zero, "stage3_param_persistence_threshold", 10 * h if h else None)

    opt_dev, param_dev = offload_device(ds, "offload_optimizer"), offload_device(ds, "offload_param")
    for what, dev in (("offload_optimizer", opt_dev), ("offload_param", param_dev)):
        if dev not in ("none", "cpu", "nvme"):
            f.errors.append(f"deepspeed: {f.label}: zero_optimization.{what}.device is {dev!r}; use cpu, nvme or none")
        elif dev == "nvme":
            _check_nvme_path(zero[what], f, what)
    if opt_dev != "none" and stage < 2:
        f.errors.append(
            f"deepspeed: {f.label}: offload_optimizer needs ZeRO stage 2 or 3, the JSON has stage {stage}; "
            "use ds_configs/zero2_offload.json or zero3_offload.json"
        )
    if param_dev != "none" and stage < 3:
        f.errors.append(
            f"deepspeed: {f.label}: offload_param needs ZeRO stage 3, the JSON has stage {stage}; "
            "use ds_configs/zero3_offload.json"
        )
    if run.batch.pipeline_stages > 1 and run.dtype == "fp16":
        f.errors.append(
            "model.dtype: fp16 under pipeline parallelism is not supported; use bf16, or pipeline.stages=1 "
            "with ZeRO (at ZeRO-0 DeepSpeed's pipeline engine never hands its fp16 optimizer a scaled loss)"
        )
    if run.batch.pipeline_stages > 1 and stage > 1:
        f.errors.append(
            f"deepspeed: {f.label}: pipeline parallelism works with ZeRO stage 0 or 1 only (a DeepSpeed "
            f"limitation), the JSON has stage {stage}"
        )


def _check_nvme_path(section: dict, f: _Filler, what: str) -> None:
    path = section.get("nvme_path")
    if not path:
        f.errors.append(
            f"deepspeed: {f.label}: zero_optimization.{what}.nvme_path is empty; set BIGSFT_NVME_PATH "
            "or the JSON's nvme_path to a directory on a local NVMe drive"
        )
    elif not os.path.isdir(path) or not os.access(path, os.W_OK):
        f.errors.append(
            f"deepspeed: {f.label}: zero_optimization.{what}.nvme_path {path!r} is not a writable directory; "
            "create it or set BIGSFT_NVME_PATH"
        )


def _find_auto(value: Any, prefix: str = "") -> list[str]:
    if value == AUTO:
        return [prefix or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _find_auto(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _find_auto(v, f"{prefix}[{i}]")]
    return []
