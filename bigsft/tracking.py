"""Where metrics go: metrics.jsonl, Weights & Biases and a rich console. Rank 0 only; other ranks
get a tracker that does nothing, so callers never branch on rank."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bigsft.config import WandbConfig, redact

console = Console(highlight=False, soft_wrap=True)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",) or (value != 0 and abs(value) < 1e-3):
            return f"{value:.2e}"
        if key.endswith("tokens_per_s"):
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class Tracker:
    def __init__(self, output_dir: str | Path, *, enabled: bool, wandb_cfg: WandbConfig | None = None,
                 run_config: dict | None = None, total_steps: int | None = None, resume_step: int | None = None,
                 run_id: str | None = None):
        """`resume_step`: continue a run from its checkpoint at that step (metrics.jsonl and the W&B run
        `run_id` go on from there); None starts them afresh."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._wandb = None
        self._file = None
        self.run_id = run_id
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        metrics = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None:
            keep_metrics_through(metrics, resume_step)
        # Open for the whole run, line-buffered: a killed run keeps every line logged so far.
        self._file = open(metrics, "a" if resume_step is not None else "w", buffering=1)  # noqa: SIM115
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                name=wandb_cfg.name or Path(output_dir).resolve().name, tags=list(wandb_cfg.tags) or None,
                mode=wandb_cfg.mode, dir=str(output_dir), config=redact(run_config or {}),
                id=run_id, resume="allow" if run_id else None,
            )
            self.run_id = self._wandb.id

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record (must carry `step`)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self._print(record)

    def _print(self, record: dict[str, Any]) -> None:
        step = record["step"]
        of = f"/{self.total_steps}" if self.total_steps else ""
        if any(k.startswith("eval/") for k in record):
            items = "  ".join(f"{k[5:]} [bold]{_fmt(k, v)}[/]" for k, v in record.items() if k.startswith("eval/"))
            console.print(f"[cyan]eval[/] step {step}{of}  {items}")
            return
        keys = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s")
        items = "  ".join(f"{k} {_fmt(k, record[k])}" for k in keys if record.get(k) is not None)
        console.print(f"step {step}{of}  {items}")

    def summary(self, title: str, rows: dict[str, dict[str, float]]) -> None:
        """A table of metric -> value per column (e.g. before / after training)."""
        if not self.enabled or not rows:
            return
        columns = list(rows)
        keys = [k for k in rows[columns[-1]] if isinstance(rows[columns[-1]][k], float)]
        table = Table(title=title)
        table.add_column("metric")
        for c in columns:
            table.add_column(c, justify="right")
        for k in keys:
            table.add_row(k.removeprefix("eval/"), *(_fmt(k, rows[c].get(k, float("nan"))) for c in columns))
        console.print(table)
        if self._wandb is not None:
            for k in keys:
                self._wandb.summary[k] = rows[columns[-1]][k]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def info(message: str, *, enabled: bool = True) -> None:
    if enabled:
        console.print(message)


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
