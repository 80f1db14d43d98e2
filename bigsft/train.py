"""The training recipe: `python -m bigsft.train CONFIG [key.path=value ...]` (and `bigsft train`).

    prepared = prepare(config, launch)   # every check before any process group: config, DeepSpeed JSON,
                                         # model config, tokenizer, data scan, checkpoint; the run length
    with Trainer(prepared) as trainer:
        trainer.setup()                  # process group, run directory, engine, data stream
        trainer.resume()                 # engine, counters, data position; random state last
        trainer.fit(stop)                # window -> step -> count -> log / eval / save
        trainer.finish(stop)             # final eval, last checkpoint, export to final/

How a step runs (a ZeRO engine over the whole model, or a pipeline engine over this rank's stage) is
`bigsft.steps`; what a log line reports is `bigsft.meter`.

Exit codes: 0 finished; 1 failed (a save that could not be written, a diverged run), with one message;
2 bad config, data or checkpoint, found before training starts; 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint: launch the same command again to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bigsft import dist, tracking
from bigsft.arguments import parse
from bigsft.checkpoint import (
    Checkpointer,
    check_ranks_agree,
    clean_leftovers,
    lock_output_dir,
    restore_rank_state,
)
from bigsft.config import ConfigError, RunConfig, dump_yaml, generation_config, load_config, to_dict
from bigsft.data import (
    RunData,
    data_cache_dir,
    eval_set_names,
    eval_sets,
    setup_data,
    train_stream,
    windows_in_first_epoch,
)
from bigsft.data.prefetch import Prefetcher
from bigsft.data.scan import SplitStats, too_many_bad
from bigsft.data.stream import source_names
from bigsft.ds_config import offload_device
from bigsft.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SAVED,
    EXIT_USER,
    CheckpointError,
    DataError,
    Diverged,
    RunFailed,
    StoppedAndSaved,
    UserError,
)
from bigsft.meter import Meter
from bigsft.optim import fp16_loss_scale
from bigsft.preflight import Preflight, preflight

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def split_argv(argv: list[str]) -> tuple[str | None, list[str], int | None]:
    """(config, overrides, --local_rank), by `bigsft train`'s own parser. The deepspeed launcher puts
    `--local_rank=N` first; `--help` prints the usage and exits 0."""
    _, args = parse(["train", *argv])
    return args.config, args.overrides, args.local_rank


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


class StopRequest:
    """SIGTERM / SIGUSR1 (what Slurm sends before a time limit or preemption) only set a flag: the
    current optimizer step finishes, every rank learns of it at the next step, and the run saves and
    stops. A second signal during the save changes nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# Before any process group: everything checked, the run's length, the DeepSpeed dict as it will be used


@dataclass(frozen=True)
class Prepared:
    """Everything known and checked before a process group exists: what `bigsft validate` reports and
    what `train` starts from. Both go through `prepare`, so validate refuses exactly what train refuses."""

    pre: Preflight
    tokenizer: Any
    data: RunData
    total_steps: int
    ds: dict
    """The DeepSpeed dict, resolved once against the run config and the run length: what the engine gets and
    what `ds_config.json` shows."""
    prompts: list = field(default_factory=list)
    """eval.generate's prompts (GenerationPrompt), read before launch."""


def prepare(cfg: RunConfig, launch) -> Prepared:
    """Config, environment, tokenizer, data scan and run length; DataError / ConfigError (exit 2) on any
    problem, before any process group or model exists."""
    from bigsft.model import build_tokenizer

    pre = preflight(cfg, launch)
    tokenizer = build_tokenizer(cfg.model)
    if pre.batch.pipeline_stages > 1 and len(tokenizer) > pre.hf_config.vocab_size:
        raise ConfigError("model.tokenizer: it needed a new <pad> token the checkpoint's embedding lacks; under "
                          "pipeline parallelism give the tokenizer a pad, eos or unk token")
    data = setup_data(cfg.data, cfg.model, tokenizer, cache_dir=data_cache_dir(cfg))
    total_steps = total_optimizer_steps(pre, data, tokenizer)
    prompts = []
    generate = generation_config(cfg)
    if generate is not None:
        from bigsft.generation import generation_prompts

        prompts = generation_prompts(cfg.data, data, generate.samples)
    return Prepared(pre=pre, tokenizer=tokenizer, data=data, total_steps=total_steps, ds=pre.resolved_ds(total_steps),
                    prompts=prompts)


def total_optimizer_steps(pre: Preflight, data: RunData, tokenizer) -> int:
    """train.max_steps; on resume, the original run's length; else epochs × the first epoch's windows."""
    t, d, bm = pre.cfg.train, pre.cfg.data, pre.batch
    if t.max_steps:
        return t.max_steps
    if pre.resume is not None:
        return pre.resume.trainer["total_steps"]  # the sizing pass of the original run
    # A sizing pass over the first epoch of the global stream (the same for every rank), which also counts
    # every unusable record before training starts.
    sizing = SplitStats()
    stream = train_stream(d, data, sizing, seed=t.seed, batch=bm, dp_rank=0, pad_id=tokenizer.pad_token_id)
    steps_per_epoch = windows_in_first_epoch(stream)
    message = too_many_bad("train", sizing.records, sizing.bad, d.max_bad_fraction, sizing)
    if message:
        raise DataError(message)
    if steps_per_epoch < 1:
        raise DataError(f"data.train: an epoch holds less than one global batch ({bm.describe()}); "
                        "add data or shrink the batch")
    return t.epochs * steps_per_epoch


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainState:
    """What the loop counts. Saved in every checkpoint's trainer.json, and restored on resume."""

    total_steps: int
    step: int = 0
    trained_tokens: int = 0
    skipped_steps: int = 0
    tracking_run_id: str | None = None
    last_eval_step: int = -1
    """An eval that a stop signal cut short is not recorded: the relaunch runs it again."""
    best_step: int = -1
    """The step of the best eval by train.best_metric (and of its checkpoint, when best_metric is set)."""
    best_value: float | None = None
    evals_since_best: int = 0
    """Evals in a row without a better value: what early stopping counts."""
    last_save_step: int = field(default=-1, metadata={"saved": False})
    skipped_in_a_row: int = field(default=0, metadata={"saved": False})

    def state_dict(self) -> dict:
        saved = {f for f, meta in self.__dataclass_fields__.items() if meta.metadata.get("saved", True)}
        return {k: v for k, v in asdict(self).items() if k in saved}

    @classmethod
    def resumed(cls, saved: dict, total_steps: int) -> TrainState:
        step = saved["step"]
        return cls(total_steps=total_steps, step=step, trained_tokens=saved["trained_tokens"],
                   skipped_steps=saved["skipped_steps"], tracking_run_id=saved.get("tracking_run_id"),
                   last_eval_step=saved.get("last_eval_step", step), last_save_step=step,
                   best_step=saved.get("best_step", -1), best_value=saved.get("best_value"),
                   evals_since_best=saved.get("evals_since_best", 0))


class Trainer:
    """One run, in phases: `setup`, `resume`, `fit`, `finish`. As a context manager it closes the tracker
    and the process group however the run ends."""

    def __init__(self, prepared: Prepared):
        self.prepared, self.pre, self.cfg = prepared, prepared.pre, prepared.pre.cfg
        self.batch, self.launch = prepared.pre.batch, prepared.pre.launch
        self.is_main = self.launch.is_main
        self.out_dir = Path(self.cfg.output_dir)
        self.causal = self.cfg.model.task == "causal_lm"
        # LoRA on pretrained weights: checkpoints hold only the adapter; every start reloads the frozen base.
        self.lora_reloads_base = self.cfg.model.lora is not None and self.cfg.model.name_or_path is not None
        self.state = TrainState(total_steps=prepared.total_steps)
        self.results: dict[str, dict[str, float]] = {}
        self.tracker: tracking.Tracker | None = None
        self.stream: Prefetcher | None = None
        self.plan_note = ""
        self.grad_norm: float | None = None
        self.class_report: dict | None = None
        self.best_metrics: dict[str, float] | None = None
        """The best eval's metrics and class report, when this process ran it (not before a resume)."""
        self.best_class_report: dict | None = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.tracker is not None:
            self.tracker.close()
        dist.destroy_process_group()

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Process group, run directory (config.yaml and ds_config.json as used), engine, data stream."""
        from bigsft.steps import PipelineSteps, ZeroSteps

        cfg, ds = self.cfg, self.prepared.ds
        dist.init_process_group(self.launch)
        check_ranks_agree(self.pre.resume)  # each rank chose it from its own view of the filesystem
        lock_output_dir(self.out_dir)  # before anything reads or writes output_dir for this run
        tracking.quiet_libraries(self.is_main)
        seed_everything(cfg.train.seed)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.out_dir)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        self.steps = (PipelineSteps if self.batch.pipeline_stages > 1 else ZeroSteps)(self.prepared, ds)
        self.engine = self.steps.engine
        fp16 = ds.get("fp16", {})
        # A skip at the scaler's floor (or with a static scale) cannot be an fp16 warm-up: it counts as divergence.
        self.min_loss_scale = float(fp16.get("min_loss_scale", 1) if not fp16.get("loss_scale") else fp16["loss_scale"])
        self.dp_rank = self.batch.data_parallel_rank(self.launch.rank)
        data, produced = self.prepared.data, SplitStats()
        if cfg.data.prefetch:  # the producer thread tokenizes with a tokenizer of its own (evals use the run's)
            data = replace(data, build=data.build.with_own_tokenizer())
        stream = train_stream(cfg.data, data, produced, seed=cfg.train.seed, batch=self.batch, dp_rank=self.dp_rank,
                              pad_id=self.prepared.tokenizer.pad_token_id, steps=self.prepared.total_steps)
        self.plan_note = stream.plan_note
        self.stream = Prefetcher(stream, produced, depth=cfg.data.prefetch)
        self.stats = self.stream.stats  # the counters as of the windows trained on
        self.checkpointer = Checkpointer(self.out_dir, cfg.train.keep_last, self.launch.rank)

    # --------------------------------------------------------------------------------------------- resume

    def resume(self) -> None:
        """From the checkpoint preflight chose (if any): engine state, then counters and data position; then
        the tracker (which continues the run's W&B run) and the start-up table; each rank's random
        generators last, so nothing consumes randomness between them and the first step."""
        from bigsft.model import model_dims

        resume = self.pre.resume
        if resume is not None:
            resume.load_into(self.engine, zero_stage=self.pre.zero_stage, strict=not self.lora_reloads_base,
                             is_main=self.is_main)
            abandoned = resume.set_aside_newer(self.out_dir, is_main=self.is_main)
            if abandoned is not None:
                tracking.info(f"resuming from an older checkpoint: moved the abandoned run's newer checkpoints "
                              f"({', '.join(sorted(p.name for p in abandoned.iterdir()))}) to {abandoned}",
                              enabled=self.is_main)
            data_state = resume.data_state()
            self.stream.load_state_dict(data_state["stream"], data_state["stats"])
            self.state = TrainState.resumed(resume.trainer, self.prepared.total_steps)
        self.tracker = tracking.Tracker(self.out_dir, enabled=self.is_main, wandb_cfg=self.cfg.wandb,
                                        run_config=to_dict(self.cfg), total_steps=self.state.total_steps,
                                        resume_step=self.state.step if resume else None,
                                        run_id=self.state.tracking_run_id, console_hides=self.repeated_keys())
        self.state.tracking_run_id = self.tracker.run_id
        layers, hidden = model_dims(self.pre.hf_config)
        self.meter = Meter(parameters=self.steps.parameters[0], layers=layers, hidden=hidden,
                           world_size=self.launch.world_size, causal=self.causal,
                           peak_tflops=tracking.peak_tflops(self.cfg.train.peak_tflops, self.cfg.model.dtype))
        self.report_start()
        if resume is not None and resume.rank_state(self.launch.rank) is not None:
            restore_rank_state(resume.rank_state(self.launch.rank))

    def repeated_keys(self) -> tuple[str, ...]:
        """Keys that repeat others, logged but not shown: with one eval set its own (eval/<set>/...) repeat the
        aggregate; the generation eval's eval/generate/... repeat eval/<metric>."""
        names = eval_set_names(self.cfg.data)
        return ((f"eval/{names[0]}/",) if len(names) == 1 else ()) + ("eval/generate/",)

    def report_start(self) -> None:
        cfg, pre, bm, d, ds = self.cfg, self.pre, self.batch, self.cfg.data, self.prepared.ds
        total, trainable = self.steps.parameters
        offload, param_offload = pre.offload_optimizer, offload_device(ds, "offload_param")
        names, weights = source_names(d.train), self.prepared.data.weights
        resume = pre.resume
        self.tracker.table("bigsft", [
            ("model", f"{cfg.model.name_or_path or cfg.model.config.get('model_type')} ({cfg.model.task})"),
            ("parameters", f"{_count(total)} ({_count(trainable)} trainable"
                           + (f", LoRA r={cfg.model.lora.r}" if cfg.model.lora else "") + ")"),
            ("precision", cfg.model.dtype + (", gradient checkpointing" if cfg.model.gradient_checkpointing else "")),
            ("strategy", f"ZeRO-{pre.zero_stage}" + (f", optimizer offload to {offload}" if offload != "none" else "")
             + (f", parameter offload to {param_offload}" if param_offload != "none" else "")),
            ("world", f"{bm.world_size} rank(s): {bm.data_parallel_size} data-parallel × "
                      + (f"{bm.sequence_parallel} sequence-parallel" if bm.sequence_parallel > 1
                         else f"{bm.pipeline_stages} pipeline stage(s)") + f", {pre.accelerator}"),
            ("batch", bm.describe(f"rows of {d.max_length}" if d.packing else "samples")),
            ("data", ", ".join(f"{n} {w / sum(weights):.0%}" for n, w in zip(names, weights))
             + (", packed" if d.packing else "")),
            ("steps", f"{self.state.total_steps}" + (f", resuming at {self.state.step}" if resume else "")),
            ("output", str(self.out_dir)),
        ])
        if resume:
            written = resume.trainer["identity"]
            sp = written.get("sequence_parallel", 1)
            converted = f"{written['data_parallel_size']} data-parallel" + (f" × {sp} sequence-parallel" if sp > 1 else "")
            tracking.info(f"resumed from {resume.path} at step {self.state.step}"
                          + (f" (converted from {converted} ranks)" if resume.universal else ""),
                          enabled=self.is_main)
        for line in self.prepared.data.scanned["train"].first_bad:
            tracking.info(f"[yellow]skipped[/] {line}", enabled=self.is_main)
        for line in [*self.prepared.data.cache_notes, self.plan_note]:
            if line:
                tracking.info(line, enabled=self.is_main)

    # ------------------------------------------------------------------------------------------------ fit

    def fit(self, stop: StopRequest) -> None:
        """Optimizer steps to the end of the run. A stop signal on any rank ends it at the next step boundary,
        with a checkpoint (StoppedAndSaved)."""
        from bigsft.steps import StepResult, WindowCounts

        t, state, engine = self.cfg.train, self.state, self.engine
        if self.cfg.data.has_eval and t.eval_at_start and self.pre.resume is None:
            self.results["before training"] = self.evaluate(0, stop) or {}
        engine.train()
        self.meter.restart()
        while state.step < state.total_steps:
            # A rank got a stop signal during the previous step: all save it, before any data is drawn for this one.
            # Early stopping takes the same agreement (every rank decided it from the same all-reduced metrics).
            flags = dist.all_reduce_max(int(stop.requested) | 2 * int(self.early_stop_due))
            if flags & 1:
                self.save_and_stop(f"stopped by a signal at step {state.step}; checkpoint saved, relaunch to resume")
            if flags & 2:
                tracking.info(f"[yellow]stopping early at step {state.step}[/]: {self.early_stop_reason()}",
                              enabled=self.is_main)
                break
            window = self.steps.shard(self.stream.next_window())
            counts = WindowCounts.of(window, self.batch.pipeline_stages)
            lr, loss_scale = engine.get_lr()[0], fp16_loss_scale(engine)
            if counts.targets > 0:
                result = self.steps.train_step(window, counts)
            else:  # never (a sample without a trained token is a bad record): a guard, not NaN; the step counts
                result = StepResult(0.0, self.grad_norm, applied=True, scheduled=False)
            if not result.scheduled and engine.lr_scheduler is not None:
                # DeepSpeed steps the LR schedule only with an update; keep it on bigsft's step counter.
                engine.lr_scheduler.step()
            state.step += 1
            self.grad_norm = result.grad_norm
            self.count(result, counts, loss_scale)
            if state.step % t.log_every == 0 or state.step == state.total_steps:
                self.log(lr, loss_scale)
            if self.cfg.data.has_eval and t.eval_every and state.step % t.eval_every == 0:
                self.evaluate_after_training(stop)
            if (t.save_every and state.step % t.save_every == 0 and state.step != state.total_steps
                    and state.last_save_step != state.step):  # a new best may have saved it already
                self.save()

    def count(self, result, counts, loss_scale: float | None) -> None:
        """Tokens, skipped steps and the divergence rule, then the meter."""
        state = self.state
        if result.applied:
            state.skipped_in_a_row = 0
            state.trained_tokens += int(counts.targets if self.causal else counts.tokens)
        else:
            state.skipped_steps += 1
            self.judge_skip(result, loss_scale)
        self.meter.add(counts, result.loss_sum if result.applied else None)

    def judge_skip(self, result, loss_scale: float | None) -> None:
        """An fp16 overflow above the scaler's floor is a warm-up; any other skip counts toward
        train.max_skipped_steps in a row, and reaching it is divergence (exit 1)."""
        state, limit = self.state, self.cfg.train.max_skipped_steps
        loss_finite = not dist.all_reduce_max(int(not math.isfinite(result.loss_sum)))
        if loss_scale is not None and loss_finite and loss_scale > self.min_loss_scale:
            tracking.info(f"[yellow]step {state.step} skipped[/]: fp16 gradient overflow at loss scale "
                          f"{loss_scale:g}, now {fp16_loss_scale(self.engine):g}", enabled=self.is_main)
        else:
            state.skipped_in_a_row += 1
            tracking.info(f"[red]step {state.step} skipped[/]: non-finite loss or gradient", enabled=self.is_main)
        if state.skipped_in_a_row >= limit:
            floor = f" or fp16 overflows at the minimum loss scale {self.min_loss_scale:g}" if loss_scale else ""
            raise Diverged(f"{state.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient"
                           f"{floor} (train.max_skipped_steps={limit}), the last at step {state.step}; lower "
                           "train.lr, check the data, or resume from an earlier checkpoint")

    def log(self, lr: float, loss_scale: float | None) -> None:
        """Collective. Data counters are the same on every rank (one global stream); the meter sums the loss."""
        d, stats = self.cfg.data, self.stats
        message = too_many_bad("train", stats.records, stats.bad, d.max_bad_fraction, stats)
        if message:
            raise DataError(message)
        figures = self.meter.flush()
        record = {"step": self.state.step, "loss": figures.pop("loss"), "lr": lr, "grad_norm": self.grad_norm,
                  "tokens": self.state.trained_tokens, **figures, "data/skipped": stats.bad,
                  "data/truncated": stats.truncated, "skipped_steps": self.state.skipped_steps,
                  **({"loss_scale": fp16_loss_scale(self.engine)} if loss_scale is not None else {}),
                  **tracking.memory_gb()}
        names, drawn = source_names(d.train), self.stream.drawn
        if len(names) > 1:
            record.update({f"data/mix/{n}": c / max(sum(drawn), 1) for n, c in zip(names, drawn)})
        self.tracker.log(record)

    # ------------------------------------------------------------------------------------- eval and save

    def evaluate(self, step: int, stop: StopRequest) -> dict[str, float] | None:
        """The eval's metrics, logged; None when a stop signal cut it short (the caller saves and stops)."""
        from bigsft.evaluate import EvalInterrupted

        self.engine.eval()
        sets = eval_sets(self.cfg.data, self.prepared.data, SplitStats(), batch=self.batch, dp_rank=self.dp_rank,
                         pad_id=self.prepared.tokenizer.pad_token_id)
        report: dict = {}
        try:
            metrics = self.steps.evaluate(sets, stop_requested=lambda: stop.requested, report=report)
            if self.prepared.prompts:
                scores, rows = self.steps.generate(self.prepared.prompts, generation_config(self.cfg),
                                                   self.prepared.tokenizer)
                metrics.update(scores)
                self.tracker.samples(rows, step, self.out_dir / "samples" / f"step_{step}.jsonl")
        except EvalInterrupted:
            tracking.info(f"[yellow]eval at step {step} cut short by a stop signal[/]", enabled=self.is_main)
            return None
        finally:
            self.engine.train()
        self.tracker.log({"step": step, **metrics})
        if report:  # a classifier's: the latest in output_dir/eval_report.json
            self.tracker.class_report({**metrics, **report}, step, self.out_dir / tracking.EVAL_REPORT)
            self.class_report = {**report, "step": step}
        self.meter.restart()
        return metrics

    def evaluate_after_training(self, stop: StopRequest) -> bool:
        """Eval at the current step, kept as the run's result; False when a stop signal cut it short."""
        metrics = self.evaluate(self.state.step, stop)
        if metrics is None:
            return False
        self.results["after training"] = metrics
        self.state.last_eval_step = self.state.step
        self.select(metrics)
        return True

    def select(self, metrics: dict[str, float]) -> None:
        """Best checkpoint and early stopping by train.best_metric: a new best is saved and marked (rotation
        keeps it); an eval without one counts toward train.early_stopping_patience."""
        t, state = self.cfg.train, self.state
        metric = t.selection_metric
        if metric is None:
            return
        value, delta = metrics[metric], t.early_stopping_min_delta
        if state.best_value is not None and not (
                value > state.best_value + delta if t.higher_is_better else value < state.best_value - delta):
            state.evals_since_best += 1
            return
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        self.best_metrics, self.best_class_report = metrics, self.class_report
        if t.best_metric is not None:
            if state.last_save_step != state.step:
                self.save()
            else:  # saved at this step already, before the eval: mark it
                self.checkpointer.mark_best(state.step, metric, value)
            tracking.info(f"new best {metric} {value:.6g} at step {state.step}", enabled=self.is_main)

    @property
    def early_stop_due(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return bool(patience) and self.state.evals_since_best >= patience

    def early_stop_reason(self) -> str:
        state, t = self.state, self.cfg.train
        return (f"{t.selection_metric} has not improved on {state.best_value:.6g} (step {state.best_step}) for "
                f"{state.evals_since_best} evals (train.early_stopping_patience={t.early_stopping_patience})")

    def save(self) -> None:
        """Collective: a checkpoint of the current step (CheckpointError on every rank if it fails)."""
        state, cfg = self.state, self.cfg
        trainer = {**state.state_dict(), "identity": self.pre.identity}
        if self.lora_reloads_base:  # what `bigsft export` needs to rebuild the model around the saved adapter
            from bigsft.model import resolve_model_path

            trainer["lora"] = {"base_model": resolve_model_path(cfg.model.name_or_path), **to_dict(cfg.model.lora)}
        best = (state.best_step, cfg.train.best_metric, state.best_value) if cfg.train.best_metric else None
        path = self.checkpointer.save(self.engine, state.step, zero_stage=self.pre.zero_stage, trainer=trainer, best=best,
                                      data={"stream": self.stream.state_dict(), "stats": self.stats.state_dict()},
                                      model_config=self.engine.module.config, tokenizer=self.prepared.tokenizer,
                                      trainable_only=self.lora_reloads_base)
        state.last_save_step = state.step
        tracking.info(f"saved {path}", enabled=self.is_main)
        self.meter.restart()

    def save_and_stop(self, message: str) -> None:
        if self.state.last_save_step != self.state.step:
            self.save()
        raise StoppedAndSaved(message)

    # --------------------------------------------------------------------------------------------- finish

    def finish(self, stop: StopRequest) -> dict[str, float]:
        """The final eval (unless the last step had one), the last checkpoint, the export to final/ and the
        summary; returns the final eval metrics (empty without eval data)."""
        state = self.state
        if self.cfg.data.has_eval and state.last_eval_step != state.step and not self.evaluate_after_training(stop):
            # A stop signal during the final eval: save, and the relaunch evaluates.
            self.save_and_stop(f"stopped by a signal at step {state.step} during the final eval; checkpoint "
                               "saved, relaunch to evaluate and export")
        if state.last_save_step != state.step:
            self.save()
        final = self.export_final()
        class_report = self.class_report
        if self.best_metrics is not None and state.best_step != state.step and self.cfg.train.final == "best":
            self.results[f"best: step {state.best_step}, in final/"] = self.best_metrics
            class_report = self.best_class_report
        extra = {"final": f"{self.out_dir / 'final'} ({final})", "steps": str(state.step),
                 "trained tokens": f"{state.trained_tokens:,}"}
        if state.step < state.total_steps:
            extra["stopped early"] = self.early_stop_reason()
        if self.is_main:
            extra["report"] = self.write_report()
        self.tracker.summary("evaluation", self.results, extra)
        if class_report and self.is_main:
            tracking.print_class_report(class_report, class_report["step"])
        return self.results.get("after training", {})

    def write_report(self) -> str:
        """output_dir/report.html, the run's curves without W&B (`bigsft report`); a plot that fails costs
        the page, never the run."""
        from bigsft.report import write_report

        try:
            return str(write_report(self.out_dir))
        except Exception as e:  # the model is saved and exported by now
            return f"not written ({type(e).__name__}: {e}); `bigsft report {self.out_dir}` draws it"

    def export_final(self) -> str:
        """final/: the last step's model from the engine, or (train.final=best) the best checkpoint's,
        exported by rank 0 from disk. Says which step it holds."""
        state, t = self.state, self.cfg.train
        if t.final != "best" or state.best_step in (-1, state.step):
            self.steps.export(self.out_dir / "final", self.prepared.tokenizer)
            best = f", the best by {t.best_metric}" if t.best_metric and state.best_step == state.step else ""
            return f"step {state.step}{best}"
        from bigsft.export import export_checkpoint

        problem = dist.rank0_verdict(
            lambda: export_checkpoint(self.checkpointer.step_dir(state.best_step), self.out_dir / "final"),
            (UserError, RunFailed, OSError))
        if problem:
            raise CheckpointError(f"exporting the best checkpoint (step {state.best_step}) to final/ failed: {problem}")
        return f"step {state.best_step}, the best by {t.best_metric} ({state.best_value:.6g})"


def run(config: str | None, overrides: list[str], local_rank: int | None = None) -> dict[str, float]:
    """Check everything, then train; returns the final eval metrics. Raises a UserError (exit 2) before
    anything starts."""
    prepared = prepare(load_config(config, overrides), dist.read_launch_env(local_rank_arg=local_rank))
    with StopRequest() as stop, Trainer(prepared) as trainer:
        trainer.setup()
        trainer.resume()
        trainer.fit(stop)
        return trainer.finish(stop)


def main(argv: list[str] | None = None) -> int:
    code = EXIT_OK
    try:
        config, overrides, local_rank = split_argv(sys.argv[1:] if argv is None else argv)
        run(config, overrides, local_rank)
    except UserError as e:
        code = _report(f"error: {e}", EXIT_USER)
    except StoppedAndSaved as e:
        code = _report(str(e), EXIT_SAVED)
    except RunFailed as e:
        code = _report(f"error: {e}", EXIT_FAILED)
    report_exit_status(code)
    return code


def _report(message: str, code: int) -> int:
    launch = dist.read_launch_env()
    tracking.error(message, rank=launch.rank, world_size=launch.world_size)
    return code


def report_exit_status(code: int) -> None:
    """Rank 0 writes its exit code to $BIGSFT_STATUS_FILE when set: launchers (deepspeed's runner among
    them) do not always pass a rank's exit code on, and a batch script must tell saved from failed."""
    path = os.environ.get("BIGSFT_STATUS_FILE")
    if path and dist.read_launch_env().is_main:
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{code}\n")


if __name__ == "__main__":  # a rank process, as the launchers start it
    dist.exit_skipping_teardown(main())
