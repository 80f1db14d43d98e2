"""The training recipe: `python -m bigsft.train CONFIG [key.path=value ...]` (and `bigsft train`).

Reads top to bottom in data-flow order: config -> preflight (config, DeepSpeed JSON, model config,
data, checkpoint to resume) -> process group -> model -> engine -> resume -> loop (forward, backward,
step, log, eval, save) -> final eval -> export. Everything that can be wrong with the config, the data
or the checkpoint is found before training starts (exit code 2).

Exit codes: 0 finished; 1 failed (a save that could not be written, a diverged run), with one message;
2 bad config, data or checkpoint; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint: launch the
same command again to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigsft import dist, tracking
from bigsft.arguments import parse
from bigsft.checkpoint import (
    DS_TAG,
    UNIVERSAL_TAG,
    Checkpointer,
    check_ranks_agree,
    clean_leftovers,
    lock_output_dir,
    repair_zero3_universal_load,
    restore_rank_state,
)
from bigsft.config import ConfigError, RunConfig, dump_yaml, load_config, to_dict
from bigsft.data.batching import Batch
from bigsft.data.scan import SplitStats, too_many_bad
from bigsft.data import RunData, eval_batches, setup_data, train_stream, windows_in_first_epoch
from bigsft.data.stream import dummy_batch, source_names
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
from bigsft.export import export_engine, export_pipeline_engine
from bigsft.optim import (
    build_optimizer,
    fp16_loss_scale,
    grad_norm_of,
    lr_factor,
    param_groups,
    scaled_by_caller,
    skip_non_finite_steps,
    undo_init_step,
)
from bigsft.preflight import Preflight, preflight

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# --------------------------------------------------------------------------------------------------
# Arguments


def split_argv(argv: list[str]) -> tuple[str | None, list[str], int | None]:
    """(config, overrides, --local_rank), by `bigsft train`'s own parser. The deepspeed launcher puts
    `--local_rank=N` first; `--help` prints the usage and exits 0."""
    _, args = parse(["train", *argv])
    return args.config, args.overrides, args.local_rank


# --------------------------------------------------------------------------------------------------
# The run


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def _norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def data_parallel_rank(rank: int, data_parallel_size: int) -> int:
    """DeepSpeed's pipe x data grid puts data-parallel ranks innermost: rank = stage * dp + dp_rank, so
    the pipeline stages of one replica share a dp_rank and see the same data."""
    return rank % data_parallel_size


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


@dataclass(frozen=True)
class Prepared:
    """Everything known and checked before a process group exists: what `bigsft validate` reports and
    what `train` starts from. Both go through `prepare`, so validate refuses exactly what train refuses."""

    pre: Preflight
    tokenizer: Any
    data: RunData
    total_steps: int


def prepare(cfg: RunConfig, launch) -> Prepared:
    """Config, environment, tokenizer, data scan and run length; DataError / ConfigError (exit 2) on any
    problem, before any process group or model exists."""
    from bigsft.model import build_tokenizer

    pre = preflight(cfg, launch)
    tokenizer = build_tokenizer(cfg.model)
    if pre.batch.pipeline_stages > 1 and len(tokenizer) > pre.hf_config.vocab_size:
        raise ConfigError("model.tokenizer: it needed a new <pad> token the checkpoint's embedding lacks; under "
                          "pipeline parallelism give the tokenizer a pad, eos or unk token")
    data = setup_data(cfg.data, cfg.model, tokenizer)
    return Prepared(pre=pre, tokenizer=tokenizer, data=data, total_steps=total_optimizer_steps(pre, data, tokenizer))


def total_optimizer_steps(pre: Preflight, plan: RunData, tokenizer) -> int:
    """train.max_steps; on resume, the original run's length; else epochs × the first epoch's windows."""
    t, d, bm = pre.cfg.train, pre.cfg.data, pre.batch
    if t.max_steps:
        return t.max_steps
    if pre.resume is not None:
        return pre.resume.trainer["total_steps"]  # the sizing pass of the original run
    # A sizing pass over the first epoch of the global stream (the same for every rank), which also counts
    # every unusable record before training starts.
    sizing = SplitStats()
    stream = train_stream(d, plan, sizing, seed=t.seed, dp_rank=0, dp_size=bm.data_parallel_size,
                          micro_batch_size=bm.micro_batch_size, accumulation=bm.gradient_accumulation_steps,
                          pad_id=tokenizer.pad_token_id)
    steps_per_epoch = windows_in_first_epoch(stream)
    message = too_many_bad("train", sizing.records, sizing.bad, d.max_bad_fraction, sizing)
    if message:
        raise DataError(message)
    if steps_per_epoch < 1:
        raise DataError(f"data.train: an epoch holds less than one global batch ({bm.describe()}); "
                        "add data or shrink the batch")
    return t.epochs * steps_per_epoch


def train(prepared: Prepared, stop: StopRequest) -> dict[str, float]:
    """Run training; returns the final eval metrics (empty without eval data)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from bigsft.evaluate import EvalInterrupted, evaluate, summed_loss
    from bigsft.model import build_model, count_parameters, model_dims, trained_positions_head

    pre, tokenizer, plan, total_steps = prepared.pre, prepared.tokenizer, prepared.data, prepared.total_steps
    cfg, launch, bm = pre.cfg, pre.launch, pre.batch
    t, d = cfg.train, cfg.data
    causal = cfg.model.task == "causal_lm"
    is_main = launch.is_main
    out_dir = Path(cfg.output_dir)
    dp_rank = data_parallel_rank(launch.rank, bm.data_parallel_size)
    resume = pre.resume

    dist.init_process_group(launch)
    check_ranks_agree(resume)  # each rank chose it from its own view of the filesystem
    lock_output_dir(out_dir)  # before anything reads or writes output_dir for this run
    tracking.quiet_libraries(is_main)
    seed_everything(t.seed)

    def new_stream(stats: SplitStats):
        return train_stream(d, plan, stats, seed=t.seed, dp_rank=dp_rank, dp_size=bm.data_parallel_size,
                            micro_batch_size=bm.micro_batch_size, accumulation=bm.gradient_accumulation_steps,
                            pad_id=tokenizer.pad_token_id)

    ds = pre.resolved_ds(total_steps)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out_dir)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    # Under ZeRO-3 transformers sees this object and builds the model already partitioned.
    hf_ds_config = HfDeepSpeedConfig(ds) if pre.zero_stage == 3 else None
    pipe = bm.pipeline_stages > 1
    if pipe:  # this rank builds and loads only its own stage's layers
        from bigsft import pipe
        from bigsft.model import allow_universal_checkpoints, resolve_model_path, torch_dtype

        model, pipe_loss, _ = pipeline.build_pipeline(
            pre.hf_config, resolve_model_path(cfg.model.name_or_path), stages=bm.pipeline_stages,
            partition=cfg.pipeline.partition, activation_checkpoint_interval=cfg.pipeline.activation_checkpoint_interval,
            attn_implementation=cfg.model.attn_implementation, dtype=torch_dtype(cfg.model.dtype))
        allow_universal_checkpoints(model)
    else:
        model = build_model(cfg.model, pre.hf_config, tokenizer=tokenizer, id2label=plan.id2label, seed=t.seed)
    head = trained_positions_head(model, pre.hf_config) if causal and not pipe else None
    total_params, trainable_params = count_parameters(model)
    if pipe:  # each stage counted its own layers
        total_params, trainable_params = (int(x / bm.data_parallel_size)
                                          for x in dist.all_reduce_sum([total_params, trainable_params]))

    groups = param_groups(model, t.weight_decay)
    optimizer = scheduler = None
    if "optimizer" not in ds:
        optimizer = build_optimizer(groups, cfg, zero_stage=pre.zero_stage, offload=pre.offload_optimizer != "none",
                                    pipeline_dp=bm.data_parallel_size if pipe else 0)
    if "scheduler" not in ds:
        warmup = t.warmup_for(total_steps)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, total=total_steps, warmup=warmup, schedule=t.lr_schedule, min_ratio=t.min_lr_ratio))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                      lr_scheduler=scheduler, config=ds)
    # LoRA on pretrained weights: checkpoints hold only the adapter; every start reloads the frozen base.
    lora_reloads_base = cfg.model.lora is not None and cfg.model.name_or_path is not None
    device = get_accelerator().current_device_name()
    # ZeRO-0 keeps no usable norm in fp32 (none) or fp16 (a loss-scaled one): the loop measures it itself.
    own_grad_norm = pre.zero_stage == 0 and cfg.model.dtype in ("fp32", "fp16")
    caller_scales = scaled_by_caller(engine)
    if "optimizer" in ds and pre.zero_stage == 0 and cfg.model.dtype == "fp32" and not pipe:
        skip_non_finite_steps(engine.optimizer)  # the JSON's optimizer, which nothing else checks at ZeRO-0
    if caller_scales:
        undo_init_step(engine)
    fp16 = ds.get("fp16", {})
    # A skip at the scaler's floor (or with a static scale) cannot be an fp16 warm-up: it counts as divergence.
    min_loss_scale = float(fp16.get("min_loss_scale", 1) if not fp16.get("loss_scale") else fp16["loss_scale"])

    # Resume: engine state, then counters, data position, and each rank's random generators last, so
    # nothing consumes randomness between them and the first step.
    stats = SplitStats()
    stream = new_stream(stats)
    start_step, trained_tokens, skipped_steps, run_id = 0, 0, 0, None
    if resume is not None:
        load_dir, tag = resume.path, DS_TAG
        if resume.universal:  # another data-parallel world size: DeepSpeed's universal format reshards
            tag = UNIVERSAL_TAG
            resume.prepare_universal(is_main=is_main)
        inner_optimizer = getattr(engine.optimizer, "optimizer", None)
        weight_decays = [g["weight_decay"] for g in inner_optimizer.param_groups] if inner_optimizer else []
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=not lora_reloads_base,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:  # DeepSpeed returns None instead of failing: never a silent fresh start
            raise CheckpointError(f"DeepSpeed could not load {load_dir / tag}")
        if resume.universal and pre.zero_stage == 3:
            repair_zero3_universal_load(inner_optimizer, weight_decays)
        abandoned = resume.set_aside_newer(out_dir, is_main=is_main)
        if abandoned is not None:
            tracking.info(f"resuming from an older checkpoint: moved the abandoned run's newer checkpoints "
                          f"({', '.join(sorted(p.name for p in abandoned.iterdir()))}) to {abandoned}", enabled=is_main)
        data_state = json.loads((resume.path / "data.json").read_text())
        stream.load_state_dict(data_state["stream"])
        stats.load_state_dict(data_state["stats"])
        start_step = resume.trainer["step"]
        trained_tokens = resume.trainer["trained_tokens"]
        skipped_steps = resume.trainer["skipped_steps"]
        run_id = resume.trainer.get("tracking_run_id")
        if resume.rank_state(launch.rank) is not None:
            restore_rank_state(resume.rank_state(launch.rank))

    tracker = tracking.Tracker(out_dir, enabled=is_main, wandb_cfg=cfg.wandb, run_config=to_dict(cfg),
                               total_steps=total_steps, resume_step=start_step if resume else None, run_id=run_id)
    checkpointer = Checkpointer(out_dir, t.keep_last, launch.rank)
    offload = pre.offload_optimizer
    names = source_names(d.train)
    tracker.table("bigsft", [
        ("model", f"{cfg.model.name_or_path or cfg.model.config.get('model_type')} ({cfg.model.task})"),
        ("parameters", f"{_count(total_params)} ({_count(trainable_params)} trainable"
                       + (f", LoRA r={cfg.model.lora.r}" if cfg.model.lora else "") + ")"),
        ("precision", cfg.model.dtype + (", gradient checkpointing" if cfg.model.gradient_checkpointing else "")),
        ("strategy", f"ZeRO-{pre.zero_stage}" + (f", optimizer offload to {offload}" if offload != "none" else "")
         + (f", parameter offload to {offload_device(ds, 'offload_param')}"
            if offload_device(ds, "offload_param") != "none" else "")),
        ("world", f"{launch.world_size} rank(s): {bm.data_parallel_size} data-parallel × {bm.pipeline_stages} "
                  f"pipeline stage(s), {pre.accelerator}"),
        ("batch", bm.describe(f"rows of {d.max_length}" if d.packing else "samples")),
        ("data", ", ".join(f"{n} {w / sum(plan.weights):.0%}" for n, w in zip(names, plan.weights))
         + (", packed" if d.packing else "")),
        ("steps", f"{total_steps}" + (f", resuming at {start_step}" if resume else "")),
        ("output", str(out_dir)),
    ])
    if resume:
        converted = resume.trainer["identity"]["data_parallel_size"]
        tracking.info(f"resumed from {resume.path} at step {start_step}"
                      + (f" (converted from {converted} data-parallel ranks)" if resume.universal else ""),
                      enabled=is_main)
    layers, hidden = model_dims(pre.hf_config)
    peak = tracking.peak_tflops(t.peak_tflops, cfg.model.dtype)
    for line in plan.scanned["train"].first_bad:
        tracking.info(f"[yellow]skipped[/] {line}", enabled=is_main)

    eval_stats = SplitStats()
    eval_micro = t.eval_micro_batch_size or t.micro_batch_size
    dummy = dummy_batch(causal=causal, pad_id=tokenizer.pad_token_id)
    num_labels = len(plan.id2label) if plan.id2label else None

    def run_eval(step: int) -> dict[str, float] | None:
        """The eval's metrics, logged; None when a stop signal cut it short (the caller saves and stops)."""
        engine.eval()
        batches = eval_batches(d, plan, eval_stats, dp_rank=dp_rank, dp_size=bm.data_parallel_size,
                               micro_batch_size=eval_micro, pad_id=tokenizer.pad_token_id)
        try:
            if pipe:
                metrics = pipeline.evaluate(engine, pipe_loss, list(batches), dummy, bm)
            else:
                metrics = evaluate(engine, batches, causal=causal, num_labels=num_labels, device=device,
                                   dummy=dummy, head=head, stop_requested=lambda: stop.requested)
        except EvalInterrupted:
            tracking.info(f"[yellow]eval at step {step} cut short by a stop signal[/]", enabled=is_main)
            return None
        finally:
            engine.train()
        tracker.log({"step": step, **metrics})
        return metrics

    def save(step: int) -> None:
        trainer_state = {"step": step, "total_steps": total_steps, "trained_tokens": trained_tokens,
                         "skipped_steps": skipped_steps, "tracking_run_id": tracker.run_id, "identity": pre.identity,
                         "last_eval_step": last_eval_step}
        if lora_reloads_base:  # what `bigsft export` needs to rebuild the model around the saved adapter
            from bigsft.model import resolve_model_path

            trainer_state["lora"] = {"base_model": resolve_model_path(cfg.model.name_or_path),
                                     **to_dict(cfg.model.lora)}
        path = checkpointer.save(engine, step, zero_stage=pre.zero_stage, trainer=trainer_state,
                                 data={"stream": stream.state_dict(), "stats": stats.state_dict()},
                                 model_config=engine.module.config, tokenizer=tokenizer,
                                 trainable_only=lora_reloads_base)
        tracking.info(f"saved {path}", enabled=is_main)

    results: dict[str, dict[str, float]] = {}
    last_eval_step = last_save_step = start_step if resume else -1
    if resume:  # an eval that a stop signal cut short is run again at the end
        last_eval_step = resume.trainer.get("last_eval_step", start_step)
    if d.eval and t.eval_at_start and resume is None:
        results["before training"] = run_eval(0) or {}

    engine.train()
    pending_loss = torch.zeros((), dtype=torch.float64)
    pending = {"targets": 0.0, "tokens": 0.0, "positions": 0.0, "samples": 0.0, "flops": 0.0}
    skipped_in_a_row = 0
    grad_norm = None
    clock = time.perf_counter()
    for step in range(start_step, total_steps):
        # A rank got a stop signal during the previous step: all save it, before any data is drawn for this one.
        if dist.all_reduce_max(int(stop.requested)):
            if last_save_step != step:
                save(step)
            tracker.close()
            raise StoppedAndSaved(f"stopped by a signal at step {step}; checkpoint saved, relaunch to resume")
        window: list[Batch] = stream.next_window()
        local = [sum(b.num_targets for b in window), sum(b.num_tokens for b in window),
                 sum(b.num_positions for b in window), sum(b.num_samples for b in window),
                 sum(b.attention_pairs for b in window)]
        # Every pipeline stage of a replica holds the same window: count it once.
        global_targets, global_tokens, global_positions, global_samples, global_pairs = (
            x / bm.pipeline_stages for x in dist.all_reduce_sum(local))
        lr = engine.get_lr()[0]
        loss_scale = fp16_loss_scale(engine)
        window_loss = torch.zeros((), dtype=torch.float64)
        applied = stepped = True
        if global_targets > 0 and pipe:
            # The last stage's loss is sum-of-losses × dp × micro-batches / trained tokens of the global batch:
            # DeepSpeed divides by both, leaving the token-weighted loss. Every rank gets that loss back; the
            # log's all-reduce adds one copy per rank, hence the division by the world size.
            step_loss = pipeline.train_step(engine, pipe_loss, window, scale=bm.data_parallel_size
                                            * bm.gradient_accumulation_steps / global_targets)
            window_loss += step_loss * global_targets / launch.world_size
            grad_norm = _norm(engine)
            applied = stepped = engine.was_step_applied()
        elif global_targets > 0:  # never 0 (a sample without a trained token is a bad record): a guard, not NaN
            # Each micro-batch contributes sum-of-losses / trained units of the whole global batch;
            # DeepSpeed averages gradients over data-parallel ranks, hence the factor dp.
            scale = bm.data_parallel_size / global_targets
            caller_scale = float(engine.optimizer.loss_scale) if caller_scales else 1.0
            for i, micro in enumerate(window):
                loss_sum, _ = summed_loss(engine, micro.to(device), causal=causal, head=head)
                engine.backward(loss_sum * (scale * caller_scale), scale_wrt_gas=False)
                window_loss += loss_sum.detach().double().cpu()
                if own_grad_norm and i == len(window) - 1:
                    grad_norm = grad_norm_of(engine.module) / caller_scale
                engine.step()
            if not own_grad_norm:
                grad_norm = _norm(engine)
            # A non-finite loss or gradient on any rank makes every rank's reduced gradient non-finite,
            # and DeepSpeed (or SkippingAdamW under ZeRO-0) then skips the update on every rank alike.
            applied = stepped = engine.was_step_applied()
        else:  # a window without one trained token: no update, but the step counts
            stepped = False
        if not stepped and engine.lr_scheduler is not None:
            # DeepSpeed steps the LR schedule only with an update; keep it on bigsft's step counter.
            engine.lr_scheduler.step()
        done = step + 1
        if applied:
            skipped_in_a_row = 0
            pending_loss += window_loss
            pending["targets"] += global_targets
            trained_tokens += int(global_targets if causal else global_tokens)
        else:
            skipped_steps += 1
            loss_finite = not dist.all_reduce_max(int(not math.isfinite(float(window_loss))))
            if loss_scale is not None and loss_finite and loss_scale > min_loss_scale:
                # An fp16 overflow: the scaler lowers its scale and the run goes on (a normal warm-up).
                tracking.info(f"[yellow]step {done} skipped[/]: fp16 gradient overflow at loss scale "
                              f"{loss_scale:g}, now {fp16_loss_scale(engine):g}", enabled=is_main)
            else:
                skipped_in_a_row += 1
                tracking.info(f"[red]step {done} skipped[/]: non-finite loss or gradient", enabled=is_main)
            if skipped_in_a_row >= t.max_skipped_steps:
                tracker.close()
                floor = f" or fp16 overflows at the minimum loss scale {min_loss_scale:g}" if loss_scale else ""
                raise Diverged(f"{skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient"
                               f"{floor} (train.max_skipped_steps={t.max_skipped_steps}), the last at step "
                               f"{done}; lower train.lr, check the data, or resume from an earlier checkpoint")
        pending["tokens"] += global_tokens
        pending["positions"] += global_positions
        pending["samples"] += global_samples
        pending["flops"] += tracking.model_flops(params=total_params, layers=layers, hidden=hidden,
                                                 tokens=global_tokens, attention_pairs=global_pairs)

        if done % t.log_every == 0 or done == total_steps:
            # Data counters are the same on every rank (one global stream); only the loss is summed.
            (loss_total,) = dist.all_reduce_sum([float(pending_loss)])
            message = too_many_bad("train", stats.records, stats.bad, d.max_bad_fraction, stats)
            if message:
                raise DataError(message)
            elapsed = max(time.perf_counter() - clock, 1e-9)
            tflops = pending["flops"] / elapsed / launch.world_size / 1e12
            record = {
                "step": done, "loss": loss_total / pending["targets"] if pending["targets"] else None,
                "lr": lr, "grad_norm": grad_norm, "tokens": trained_tokens,
                "tokens_per_s": (pending["targets"] if causal else pending["tokens"]) / elapsed,
                "samples_per_s": pending["samples"] / elapsed, "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
                "data/efficiency": pending["tokens"] / max(pending["positions"], 1.0),
                "data/skipped": stats.bad, "data/truncated": stats.truncated, "skipped_steps": skipped_steps,
                **({"loss_scale": fp16_loss_scale(engine)} if loss_scale is not None else {}),
                **tracking.memory_gb(),
            }
            drawn = stream.mixed.drawn
            if len(names) > 1:
                record.update({f"data/mix/{n}": c / max(sum(drawn), 1) for n, c in zip(names, drawn)})
            tracker.log(record)
            pending_loss.zero_()
            pending = dict.fromkeys(pending, 0.0)
            clock = time.perf_counter()
        if d.eval and t.eval_every and done % t.eval_every == 0 and (metrics := run_eval(done)) is not None:
            results["after training"] = metrics
            last_eval_step = done
            clock = time.perf_counter()
        if t.save_every and done % t.save_every == 0 and done != total_steps:
            save(done)
            last_save_step = done
            clock = time.perf_counter()

    if d.eval and last_eval_step != total_steps:
        metrics = run_eval(total_steps)
        if metrics is None:  # a stop signal during the final eval: save, and the relaunch evaluates
            if last_save_step != total_steps:
                save(total_steps)
            tracker.close()
            raise StoppedAndSaved(f"stopped by a signal at step {total_steps} during the final eval; checkpoint "
                                  "saved, relaunch to evaluate and export")
        results["after training"] = metrics
        last_eval_step = total_steps
    if last_save_step != total_steps:
        save(total_steps)
    if pipe:
        export_pipeline_engine(engine, pre.hf_config, out_dir / "final", tokenizer=tokenizer)
    else:
        export_engine(engine, pre.zero_stage, out_dir / "final", tokenizer=tokenizer, lora=cfg.model.lora)
    tracker.summary("evaluation", results, {"final": str(out_dir / "final"), "steps": str(total_steps),
                                            "trained tokens": f"{trained_tokens:,}"})
    tracker.close()
    del hf_ds_config
    return results.get("after training", {})


def run(config: str | None, overrides: list[str], local_rank: int | None = None) -> dict[str, float]:
    """Load and check everything, then train. Raises ConfigError before anything starts."""
    prepared = prepare(load_config(config, overrides), dist.read_launch_env(local_rank_arg=local_rank))
    with StopRequest() as stop:
        try:
            return train(prepared, stop)
        finally:
            dist.destroy_process_group()


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


if __name__ == "__main__":
    sys.exit(main())
