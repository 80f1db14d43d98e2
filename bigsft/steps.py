"""How an optimizer step, an eval and the export run, for the two kinds of DeepSpeed engine.

`ZeroSteps`: an engine over the whole Hugging Face model (ZeRO 0-3, offload, LoRA). Each micro-batch of
a window is forwarded and backpropagated on its own; the engine updates after the last one.
`PipelineSteps`: a PipelineEngine over this rank's stage of the layers. One `train_batch` runs the
whole window through the stages.

Both take the same window (this rank's `gradient_accumulation_steps` micro-batches) and the window's
global counts, and normalize the loss by the trained tokens (or samples) of the whole global batch: a
step's gradient does not depend on how the batch fell into micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bigsft import dist
from bigsft.data.batching import Batch
from bigsft.data.stream import dummy_batch
from bigsft.evaluate import dummy_for_task
from bigsft.optim import (
    grad_norm_of,
    initialize_engine,
    scaled_by_caller,
    skip_non_finite_steps,
    undo_init_step,
)


@dataclass(frozen=True)
class WindowCounts:
    """A window's totals over the world, each data-parallel replica counted once."""

    targets: float
    """Trained units: target tokens (causal LM) or samples (classification)."""
    tokens: float
    positions: float
    """Tokens plus padding."""
    samples: float
    attention_pairs: float

    @classmethod
    def of(cls, window: list[Batch], pipeline_stages: int) -> WindowCounts:
        local = [sum(b.num_targets for b in window), sum(b.num_tokens for b in window),
                 sum(b.num_positions for b in window), sum(b.num_samples for b in window),
                 sum(b.attention_pairs for b in window)]
        # Every pipeline stage of a replica holds the same window: count it once.
        return cls(*(x / pipeline_stages for x in dist.all_reduce_sum(local)))


@dataclass(frozen=True)
class StepResult:
    loss_sum: float
    """This rank's share of the global batch's summed loss: the sum over ranks is the whole."""
    grad_norm: float | None
    applied: bool
    """The optimizer updated the weights (False: a non-finite gradient or an fp16 overflow, skipped)."""
    scheduled: bool
    """DeepSpeed stepped the LR schedule, which it does only with an update."""


def _norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


class ZeroSteps:
    """A DeepSpeed engine over the whole model: ZeRO 0-3, with or without offload and LoRA."""

    def __init__(self, prepared, ds: dict):
        from deepspeed.accelerator import get_accelerator
        from transformers.integrations import HfDeepSpeedConfig

        from bigsft.model import (
            build_model,
            count_parameters,
            loss_tile_tokens,
            tile_mlps,
            trained_positions_head,
        )

        pre, cfg = prepared.pre, prepared.pre.cfg
        self.batch, self.zero_stage, self.lora = pre.batch, pre.zero_stage, cfg.model.lora
        self.task = cfg.model.task
        model_cfg, self.sp = cfg.model, None
        if pre.batch.sequence_parallel > 1:
            from bigsft.sequence_parallel import SequenceParallel

            model_cfg = replace(cfg.model, attn_implementation=cfg.model.attn_implementation or "sdpa")
            self.sp = SequenceParallel(pre.batch.sequence_parallel, pre.hf_config, model_cfg.attn_implementation)
        self.max_answer_length = cfg.eval.max_answer_length
        id2label = prepared.data.id2label
        self.num_labels = len(id2label) if id2label else None
        self.label_names = list(id2label.values()) if id2label else None
        # Under ZeRO-3 transformers sees this object and builds the model already partitioned; it must
        # live as long as the engine.
        self._hf_ds_config = HfDeepSpeedConfig(ds) if pre.zero_stage == 3 else None
        model = build_model(model_cfg, pre.hf_config, tokenizer=prepared.tokenizer, id2label=id2label, seed=cfg.train.seed)
        if self.sp is not None:
            self.sp.check_model(model)
        if cfg.model.tiled_mlp:
            tile_mlps(model, pre.hf_config, cfg.model.tile_tokens)
        self.head = (trained_positions_head(model, pre.hf_config, loss_tile_tokens(cfg.model, pre.hf_config))
                     if self.task == "causal_lm" else None)
        self.parameters = count_parameters(model)
        self.engine = initialize_engine(model, cfg, ds, prepared.total_steps, zero_stage=pre.zero_stage,
                                        offload=pre.offload_optimizer != "none")
        self.device = get_accelerator().current_device_name()
        self.dummy = dummy_for_task(self.task, prepared.tokenizer.pad_token_id)
        # ZeRO-0 keeps no usable norm in fp32 (none) or fp16 (a loss-scaled one): measure it here.
        self.own_grad_norm = pre.zero_stage == 0 and cfg.model.dtype in ("fp32", "fp16")
        self.caller_scales = scaled_by_caller(self.engine)
        if "optimizer" in ds and pre.zero_stage == 0 and cfg.model.dtype == "fp32":
            skip_non_finite_steps(self.engine.optimizer)  # the JSON's optimizer, which nothing else checks at ZeRO-0
        if self.caller_scales:
            undo_init_step(self.engine)

    def train_step(self, window: list[Batch], counts: WindowCounts) -> StepResult:
        engine = self.engine
        # Each micro-batch contributes sum-of-losses / trained units of the whole global batch;
        # DeepSpeed averages gradients over data-parallel (× sequence-parallel) ranks, hence that factor.
        scale = self.batch.gradient_ranks / counts.targets
        caller_scale = float(engine.optimizer.loss_scale) if self.caller_scales else 1.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        grad_norm = None
        for i, micro in enumerate(window):
            # backward too: gradient checkpointing recomputes layers, their attention split as in forward
            with self._split_attention():
                loss = self.forward(micro)[0]  # the logits not held: backward frees them after the loss's step
                engine.backward(loss * (scale * caller_scale), scale_wrt_gas=False)
            loss_sum += loss.detach().double().cpu()
            if self.own_grad_norm and i == len(window) - 1:
                grad_norm = grad_norm_of(engine.module) / caller_scale
            engine.step()
        # A non-finite loss or gradient on any rank makes every rank's reduced gradient non-finite, and
        # DeepSpeed (or SkippingAdamW under ZeRO-0) then skips the update on every rank alike.
        applied = engine.was_step_applied()
        return StepResult(float(loss_sum), grad_norm if self.own_grad_norm else _norm(engine), applied, applied)

    def shard(self, window: list[Batch]) -> list[Batch]:
        """This rank's part of its data-parallel replica's micro-batches: under sequence parallelism its slice
        of every row; else all of them."""
        return window if self.sp is None else [self.sp.shard(b) for b in window]

    def forward(self, micro: Batch):
        from bigsft.evaluate import summed_loss

        return summed_loss(self.engine, micro.to(self.device), task=self.task, head=self.head)

    def _split_attention(self):
        return self.sp.active() if self.sp is not None else contextlib.nullcontext()

    def evaluate(self, sets: list[tuple[str, Iterable[Batch]]], stop_requested: Callable[[], bool],
                 report: dict | None = None) -> dict[str, float]:
        from bigsft.evaluate import evaluate

        dummy = self.dummy
        if self.sp is not None:
            sets = [(name, map(self.sp.shard, batches)) for name, batches in sets]
            dummy = self.sp.shard(dummy)
        with self._split_attention():
            return evaluate(self.engine, sets, task=self.task, num_labels=self.num_labels, device=self.device,
                            dummy=dummy, head=self.head, stop_requested=stop_requested,
                            label_names=self.label_names, report=report, max_answer_length=self.max_answer_length)

    def generate(self, prompts: list, cfg, tokenizer) -> tuple[dict[str, float], list[dict]]:
        """eval.generate's scores and samples; under ZeRO-3 on several ranks, every rank steps in lockstep."""
        from bigsft.generation import generation_eval

        return generation_eval(self.engine.module, prompts, cfg, tokenizer=tokenizer, device=self.device,
                               synced=self.zero_stage == 3 and dist.world_size() > 1)

    def export(self, out_dir: Path, tokenizer) -> None:
        from bigsft.export import export_engine

        export_engine(self.engine, self.zero_stage, out_dir, tokenizer=tokenizer, lora=self.lora)


class PipelineSteps:
    """DeepSpeed's PipelineEngine over this rank's stage, built and loaded layer by layer."""

    def __init__(self, prepared, ds: dict):
        from bigsft import pipe
        from bigsft.model import (
            allow_universal_checkpoints,
            count_parameters,
            resolve_model_path,
            torch_dtype,
        )

        pre, cfg = prepared.pre, prepared.pre.cfg
        self.batch, self.hf_config = pre.batch, pre.hf_config
        model, self.loss, _ = pipe.build_pipeline(
            pre.hf_config, resolve_model_path(cfg.model.name_or_path), stages=self.batch.pipeline_stages,
            partition=cfg.pipeline.partition, activation_checkpoint_interval=cfg.pipeline.activation_checkpoint_interval,
            attn_implementation=cfg.model.attn_implementation, dtype=torch_dtype(cfg.model.dtype))
        allow_universal_checkpoints(model)
        # Each stage counted its own layers; every replica holds them all.
        total, trainable = dist.all_reduce_sum(list(count_parameters(model)))
        self.parameters = (int(total / self.batch.data_parallel_size), int(trainable / self.batch.data_parallel_size))
        zero0 = functools.partial(pipe.PipelineAdamW, max_grad_norm=cfg.train.max_grad_norm,
                                  data_parallel_size=self.batch.data_parallel_size)
        self.engine = initialize_engine(model, cfg, ds, prepared.total_steps, zero_stage=pre.zero_stage,
                                        offload=pre.offload_optimizer != "none", zero0=zero0)
        self.dummy = dummy_batch(per_token=True, pad_id=prepared.tokenizer.pad_token_id)

    def shard(self, window: list[Batch]) -> list[Batch]:
        return window

    def train_step(self, window: list[Batch], counts: WindowCounts) -> StepResult:
        from bigsft import pipe

        bm = self.batch
        # The last stage's loss is sum-of-losses × dp × micro-batches / trained tokens of the global batch:
        # DeepSpeed divides by both, leaving the token-weighted loss. Every rank gets that loss back; the
        # log's all-reduce adds one copy per rank, hence the division by the world size.
        loss = pipe.train_step(self.engine, self.loss, window,
                               scale=bm.data_parallel_size * bm.gradient_accumulation_steps / counts.targets)
        applied = self.engine.was_step_applied()
        return StepResult(loss * counts.targets / bm.world_size, _norm(self.engine), applied, applied)

    def evaluate(self, sets: list[tuple[str, Iterable[Batch]]], stop_requested: Callable[[], bool],
                 report: dict | None = None) -> dict[str, float]:
        """The pipeline's eval runs whole windows in lockstep over stages: a stop signal waits for its end.
        Causal LMs only: no class report."""
        from bigsft import pipe

        return pipe.evaluate_pipeline(self.engine, self.loss, [(n, list(b)) for n, b in sets], self.dummy, self.batch)

    def export(self, out_dir: Path, tokenizer) -> None:
        from bigsft.export import export_pipeline_engine

        export_pipeline_engine(self.engine, self.hf_config, out_dir, tokenizer=tokenizer)
