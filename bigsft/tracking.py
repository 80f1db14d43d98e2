"""Where metrics go: metrics.jsonl, Weights & Biases and a rich console. Rank 0 only; other ranks get a
tracker that does nothing, so callers never branch on rank.

On a terminal the console shows a progress bar with ETA and live loss / lr / tokens/s; anywhere else
(Slurm log files) it prints one plain, line-buffered line per logged step instead of redraws.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bigsft.config import WandbConfig, redact
from bigsft.files import write_json_atomically, write_jsonl_atomically, write_text_atomically

# Slurm log files are not terminals: plain lines, wide enough not to wrap the start-up table.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)

# Dense bf16/fp16 peak TFLOP/s per device, for MFU when train.peak_tflops is not set (first match wins).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A6000", 155.0), ("A10", 125.0),
               ("L4", 121.0), ("V100", 125.0), ("4090", 165.0), ("3090", 71.0), ("T4", 65.0), ("MI300", 1307.0),
               ("MI250", 362.0))


def peak_tflops(configured: float | None, dtype: str) -> float | None:
    """The device's peak for MFU: the configured value, else the table for a known GPU in bf16/fp16."""
    if configured:
        return configured
    import torch

    if dtype == "fp32" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for key, v in PEAK_TFLOPS if key in name), None)


def model_flops(*, params: int, layers: int, hidden: int, tokens: float, attention_pairs: float) -> float:
    """Training FLOPs: 6 N per processed token (forward 2N, backward 4N) plus causal attention,
    12 L d per pair of (query, key) positions, summed over samples as length squared (PaLM, App. B)."""
    return 6.0 * params * tokens + 12.0 * layers * hidden * attention_pairs


def memory_gb() -> dict[str, float]:
    """Accelerator memory (allocated / reserved, this rank's peak since the last call) and host RSS."""
    import psutil
    import torch

    out = {"mem/host_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["mem/allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem/reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr" or (value != 0 and abs(value) < 1e-3):
            return f"{value:.2e}"
        if key.endswith("_per_s"):
            return f"{value:,.0f}"
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop records after `step` (logged by a run that died before its next checkpoint), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_text_atomically(path, "".join(line + "\n" for line in kept))


# W&B's older WANDB_MODE values, as its own docs still show them
_LEGACY_MODES = {"dryrun": "offline", "run": "online"}


WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(cfg: WandbConfig) -> str:
    """wandb.mode, else WANDB_MODE (blank counts as unset), else disabled."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return cfg.mode or _LEGACY_MODES.get(env, env) or "disabled"


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


class Tracker:
    def __init__(self, output_dir: str | Path, *, enabled: bool, wandb_cfg: WandbConfig | None = None,
                 run_config: dict | None = None, total_steps: int | None = None, resume_step: int | None = None,
                 run_id: str | None = None, console_hides: tuple[str, ...] = ()):
        """`resume_step`: continue a run from its checkpoint at that step (metrics.jsonl and the W&B run
        `run_id` go on from there); None starts them afresh. `console_hides`: key prefixes logged but not
        shown on the console (a single eval set's own keys, which repeat the aggregate)."""
        self.enabled = enabled
        self.console_hides = console_hides
        self.total_steps = total_steps
        self._wandb = None
        self._file = None
        self._progress: Progress | None = None
        self._task = None
        self.run_id = run_id
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        metrics = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None:
            keep_metrics_through(metrics, resume_step)
        # Open for the whole run, line-buffered: a killed run keeps every line logged so far.
        self._file = open(metrics, "a" if resume_step is not None else "w", buffering=1)  # noqa: SIM115
        if wandb_cfg is not None and wandb_mode(wandb_cfg) != "disabled":
            self._wandb = self._start_wandb(output_dir, wandb_cfg, run_config or {}, run_id)
        if console.is_terminal and total_steps:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"),
                console=console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=resume_step or 0, live="")
            self._progress.start()

    def _start_wandb(self, output_dir, cfg: WandbConfig, run_config: dict, run_id: str | None):
        import wandb

        mode = wandb_mode(cfg)
        if mode == "online" and not _wandb_has_credentials():
            info("[yellow]wandb[/]: mode online but no WANDB_API_KEY or ~/.netrc login: logging offline instead "
                 "(`wandb sync` uploads it later)")
            mode = "offline"
        # entity and group left None: wandb.init reads WANDB_ENTITY and WANDB_RUN_GROUP itself.
        kwargs = {"project": cfg.project or os.environ.get("WANDB_PROJECT") or "bigsft", "entity": cfg.entity,
                  "group": cfg.group, "name": cfg.name or Path(output_dir).resolve().name,
                  "tags": list(cfg.tags) or None, "dir": cfg.dir or os.environ.get("WANDB_DIR") or str(output_dir),
                  "config": redact(run_config), "id": run_id,
                  "resume": "allow" if run_id else None}
        # wandb reads WANDB_MODE itself, and refuses a blank or older spelling that bigsft has resolved already.
        os.environ["WANDB_MODE"] = mode
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, console="off"), **kwargs)
        except Exception as e:  # no network, a refused key: training goes on with the run kept locally
            if mode != "online":
                raise
            info(f"[yellow]wandb[/]: online start failed ({str(e).splitlines()[0][:200]}); logging offline instead")
            run = wandb.init(mode="offline", settings=wandb.Settings(console="off"), **kwargs)
        self.run_id = run.id
        return run

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """The start-up table: one line per setting."""
        if not self.enabled:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record (must carry `step`)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step" and v is not None}, step=record["step"])
        self._show(record)

    def class_report(self, report: dict, step: int, path: Path) -> None:
        """A classifier's per-class report: to `path` (eval_report.json, with the eval's metrics) and to W&B
        as a table."""
        if not self.enabled:
            return
        write_json_atomically(path, {"step": step, **report})
        if self._wandb is not None:
            import wandb

            rows = [[name, r["precision"], r["recall"], r["f1"], r["support"]] for name, r in report["classes"].items()]
            self._wandb.log({"eval/classes": wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                                                         data=rows)}, step=step)

    def samples(self, rows: list[dict], step: int, path: Path) -> None:
        """Generation eval's answers: to `path` (output_dir/samples/step_N.jsonl, one JSON row per prompt) and
        to W&B as a table."""
        if not self.enabled:
            return
        write_jsonl_atomically(path, rows)
        if self._wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self._wandb.log({"eval/samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                            step=step)

    def _show(self, record: dict[str, Any]) -> None:
        step = record["step"]
        of = f"/{self.total_steps}" if self.total_steps else ""
        if any(k.startswith("eval/") for k in record):
            items = "  ".join(f"{k[5:]} [bold]{_fmt(k, v)}[/]" for k, v in record.items()
                              if k.startswith("eval/") and not k.startswith(self.console_hides))
            console.print(f"[cyan]eval[/] step {step}{of}  {items}")
            return
        keys = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")
        items = "  ".join(f"{k} {_fmt(k, record[k])}" for k in keys if record.get(k) is not None)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, live=items)
        else:
            console.print(f"step {step}{of}  {items}")

    def summary(self, title: str, rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> None:
        """A table of metric -> value per column (e.g. before / after training), and the run's outputs."""
        if not self.enabled:
            return
        self._stop_progress()
        keys = print_metrics(title, rows, hide=self.console_hides)
        if rows and self._wandb is not None:
            for k in keys:
                self._wandb.summary[k] = rows[list(rows)[-1]][k]
        for key, value in (extra or {}).items():
            console.print(f"{key}: {value}")
            if self._wandb is not None:
                self._wandb.summary[key] = value

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop_progress()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


EVAL_REPORT = "eval_report.json"
"""output_dir/eval_report.json: the latest eval's metrics and a classifier's per-class report."""


def print_class_report(report: dict, step: int | None = None) -> None:
    """Precision, recall, F1 and support per class, and the confusion matrix (rows: true, columns: predicted)."""
    table = Table(title="per class" + (f" (eval at step {step})" if step is not None else ""))
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, r in report["classes"].items():
        table.add_row(name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(r["support"]))
    console.print(table)
    matrix = Table(title="confusion (rows: true, columns: predicted)")
    matrix.add_column("")
    for name in report["labels"]:
        matrix.add_column(name, justify="right")
    for name, row in zip(report["labels"], report["confusion"], strict=True):
        matrix.add_row(name, *(str(n) for n in row))
    console.print(matrix)


def print_metrics(title: str, rows: dict[str, dict[str, float]], hide: tuple[str, ...] = ()) -> list[str]:
    """A console table of metric -> value per column (e.g. before / after training), without the keys that
    start with a `hide` prefix; returns its keys."""
    if not rows:
        return []
    columns = list(rows)
    keys = [k for k in rows[columns[-1]] if isinstance(rows[columns[-1]][k], float) and not k.startswith(hide)]
    table = Table(title=title)
    table.add_column("metric")
    for c in columns:
        table.add_column(c, justify="right")
    for k in keys:
        table.add_row(k.removeprefix("eval/"), *(_fmt(k, rows[c].get(k, float("nan"))) for c in columns))
    console.print(table)
    return keys


def info(message: str, *, enabled: bool = True) -> None:
    if enabled:
        console.print(message)


def error(message: str, *, rank: int = 0, world_size: int = 1) -> None:
    """Errors print on every rank that has them, naming the rank when there are several."""
    prefix = f"bigsft [rank {rank}]" if world_size > 1 else "bigsft"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def quiet_libraries(is_main: bool) -> None:
    """Keep DeepSpeed and transformers to warnings (and other ranks to errors)."""
    import logging

    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if is_main else logging.ERROR)
    if is_main:
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
