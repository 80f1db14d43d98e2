"""`bigsft report RUN_DIR`: a run's curves in one self-contained HTML page.

An offline W&B run is invisible until someone syncs it, and many clusters have no internet. The page reads
only the run directory (metrics.jsonl, checkpoints/best.json, eval_report.json, config.yaml) and embeds its
PNG plots as data URIs, so it can be copied off the cluster and opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigsft.errors import ConfigError
from bigsft.tracking import EVAL_REPORT

# checkpoint.CHECKPOINTS / checkpoint.BEST, spelled out: importing bigsft.checkpoint imports torch.
BEST_JSON = Path("checkpoints") / "best.json"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
# The config keys the header shows; never the whole file (it may hold secrets).
CONFIG_KEYS = (("model", "name_or_path"), ("model", "task"), ("output_dir",))

Series = dict[int, float | None]  # step -> value; None where the logged value was not finite


@dataclass(kw_only=True)
class Metrics:
    """metrics.jsonl as one series per key. A resumed run may log a step again: the later record wins."""

    series: dict[str, Series] = field(default_factory=dict)
    records: int = 0
    unreadable: int = 0  # lines cut short by a killed run, or not a record with a step

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) in step order, the non-finite ones left out."""
        kept = sorted((s, v) for s, v in self.series.get(key, {}).items() if v is not None)
        return [s for s, _ in kept], [v for _, v in kept]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: Path) -> Metrics:
    metrics = Metrics()
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            metrics.unreadable += 1
            continue
        if isinstance(step, bool) or not isinstance(step, int):
            metrics.unreadable += 1
            continue
        metrics.records += 1
        for key, value in record.items():
            # None stays: a later non-finite value replaces an earlier one for the same step.
            if key != "step" and (value is None or _number(value) is not None):
                metrics.series.setdefault(key, {})[step] = _number(value)
    return metrics


def eval_groups(keys: list[str]) -> dict[str, list[str]]:
    """Eval keys by plot. `eval/<metric>` is its own plot, which its breakdown `eval/<metric>/<x>` (e.g. F1
    per class) joins; `eval/<set>/<metric>` of every eval set share the plot of `<metric>`. The generation
    eval's `eval/generate/<metric>` is left out where its equal `eval/<metric>` is logged."""
    metrics = {k.removeprefix("eval/") for k in keys if k.count("/") == 1}
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key.startswith("eval/generate/") and key.removeprefix("eval/generate/") in metrics:
            continue
        first, _, rest = key.removeprefix("eval/").partition("/")
        groups.setdefault(first if not rest or first in metrics else rest, []).append(key)
    return groups


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(title: str, lines: dict[str, tuple[list[int], list[float]]], *, markers: bool,
          best_step: int | None = None) -> str:
    """One PNG (base64) of the lines (label -> steps, values) over optimizer steps."""
    # A Figure on an Agg canvas, not pyplot: no process-wide backend switch, no figure registry to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (steps, values) in lines.items():
        ax.plot(steps, values, marker="o" if markers else None, markersize=3, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1, label=f"best (step {best_step})")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(lines) > 1 or best_step is not None:
        ax.legend(fontsize="small")
    return _png(fig)


def _img(title: str, png: str) -> str:
    return f'<figure><img src="data:image/png;base64,{png}" alt="{html.escape(title)}"></figure>'


def training_plots(metrics: Metrics) -> list[str]:
    plots = []
    for key in TRAIN_KEYS:
        steps, values = metrics.points(key)
        if steps:
            plots.append(_img(key, _plot(key, {key: (steps, values)}, markers=False)))
    return plots


def eval_plots(metrics: Metrics, best_step: int | None) -> list[str]:
    plots = []
    # The eval set's size (examples, tokens) is not a curve.
    eval_keys = [k for k in metrics.series if k.startswith("eval/") and metrics.points(k)[0]
                 and k.rsplit("/", 1)[-1] not in ("examples", "tokens")]
    for title, keys in eval_groups(eval_keys).items():
        lines = {key: metrics.points(key) for key in keys}
        plots.append(_img(f"eval/{title}", _plot(f"eval/{title}", lines, markers=True, best_step=best_step)))
    return plots


def _read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing or unreadable (a report is best effort past metrics)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _config_rows(run_dir: Path) -> list[tuple[str, str]]:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    rows = []
    for path in CONFIG_KEYS:
        value: Any = cfg
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            rows.append((".".join(path), str(value)))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def eval_report_html(report: dict) -> str:
    """The latest eval: its metrics, and a classifier's per-class table and confusion matrix."""
    at = f" (step {report['step']})" if "step" in report else ""
    parts = [f"<h2>Latest eval{html.escape(at)}</h2>"]
    scalars = [[k, v] for k, v in report.items() if k.startswith("eval/") and _number(v) is not None]
    if scalars:
        parts.append(_table(["metric", "value"], scalars))
    if isinstance(report.get("classes"), dict):
        columns = ["precision", "recall", "f1", "support"]
        rows = [[name, *(r.get(c, "") for c in columns)] for name, r in report["classes"].items()
                if isinstance(r, dict)]
        parts += ["<h3>Per class</h3>", _table(["class", *columns], rows)]
    if isinstance(report.get("confusion"), list) and isinstance(report.get("labels"), list):
        rows = [[name, *row] for name, row in zip(report["labels"], report["confusion"]) if isinstance(row, list)]
        parts += ["<h3>Confusion (rows: true, columns: predicted)</h3>", _table(["", *report["labels"]], rows)]
    return "\n".join(parts)


STYLE = """body { font-family: sans-serif; margin: 2em; color: #222; }
figure { display: inline-block; margin: 0.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }"""


def _header(run_dir: Path, metrics: Metrics, best: dict | None) -> str:
    rows = [("run directory", str(run_dir.resolve())), *_config_rows(run_dir)]
    steps = [s for series in metrics.series.values() for s in series]
    rows.append(("metrics", f"{metrics.records} records" + (f", last step {max(steps)}" if steps else "")
                 + (f", unreadable lines skipped: {metrics.unreadable}" if metrics.unreadable else "")))
    if best is not None:
        rows.append(("best", f"step {best.get('step')} by {best.get('metric')} = {_fmt(best.get('value'))}"))
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h1>{html.escape(run_dir.resolve().name)}</h1>\n<table>{items}</table>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's HTML report (default RUN_DIR/report.html) and return its path.

    Raises ConfigError when `run_dir` is not a directory or holds no metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"report: run directory {run_dir} does not exist; give a run's output_dir")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"report: {run_dir} holds no metrics.jsonl; give a run's output_dir "
                          "(where training writes config.yaml and metrics.jsonl)")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    best = _read_json(run_dir / BEST_JSON)
    best_step = best.get("step") if best is not None else None
    train, evals = training_plots(metrics), eval_plots(metrics, best_step if isinstance(best_step, int) else None)
    sections = [_header(run_dir, metrics, best)]
    if not train and not evals:
        sections.append("<p>Nothing to plot: metrics.jsonl holds no numeric metrics yet.</p>")
    if train:
        sections += ["<h2>Training</h2>", *train]
    if evals:
        sections += ["<h2>Evaluation</h2>", *evals]
    report = _read_json(run_dir / EVAL_REPORT)
    if report is not None:
        sections.append(eval_report_html(report))
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(run_dir.resolve().name)}"
            f"</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
