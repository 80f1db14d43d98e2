"""Batch math: micro-batch × accumulation × data-parallel ranks = the global batch of one optimizer step.

`batch_math` derives the missing number from the run config and the world size, refuses numbers that do
not add up, and keeps a resumed run's global batch on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigsft.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class BatchMath:
    """How many samples (packed rows) each optimizer step trains on, and how they are split. The one home
    of these numbers: the DeepSpeed JSON, the training and eval streams and the memory planner read them
    from here."""

    micro_batch_size: int
    """Samples per rank per forward pass."""
    gradient_accumulation_steps: int
    """Micro-batches per rank per optimizer step: the length of every training window."""
    data_parallel_size: int
    pipeline_stages: int = 1
    sequence_parallel: int = 1
    """Ranks that split each row along the sequence (`bigsft.sequence_parallel`); they read the same rows."""
    eval_micro_batch_size: int | None = None
    """Samples per rank per eval forward pass; None: micro_batch_size."""

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.pipeline_stages * self.sequence_parallel

    @property
    def gradient_ranks(self) -> int:
        """Ranks DeepSpeed averages gradients over (and sizes its batch by): the data-parallel ranks, times the
        sequence-parallel ranks, whose gradients are parts of one row's and add up."""
        return self.data_parallel_size * self.sequence_parallel

    @property
    def eval_micro(self) -> int:
        return self.eval_micro_batch_size or self.micro_batch_size

    def data_parallel_rank(self, rank: int) -> int:
        """DeepSpeed's pipe x data grid puts data-parallel ranks innermost: rank = stage * dp + dp_rank, so
        the pipeline stages of one replica share a dp_rank and see the same data. The ranks of a
        sequence-parallel group are consecutive: rank = dp_rank * sequence_parallel + sp_rank."""
        return rank // self.sequence_parallel % self.data_parallel_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size

    def describe(self, unit: str = "samples") -> str:
        return (f"micro {self.micro_batch_size} × accumulation {self.gradient_accumulation_steps} × "
                f"data-parallel {self.data_parallel_size} = global {self.global_batch_size} {unit} per step"
                + (f" (world {self.world_size} = {self.pipeline_stages} pipeline stages × "
                   f"{self.data_parallel_size} data-parallel)" if self.pipeline_stages > 1 else "")
                + (f" (world {self.world_size} = {self.data_parallel_size} data-parallel × {self.sequence_parallel} "
                   "sequence-parallel)" if self.sequence_parallel > 1 else ""))


def batch_math(train: TrainConfig, world_size: int, pipeline_stages: int,
               saved_global_batch: int | None = None, sequence_parallel: int = 1) -> tuple[BatchMath | None, list[str]]:
    """`saved_global_batch`: the global batch of the checkpoint this run resumes. It is kept on any world
    size, so every step trains on the samples it would have (accumulation is derived again), and a config
    that asks for another global batch is refused rather than silently changing the run."""
    if world_size % pipeline_stages:
        return None, [f"pipeline.stages: {pipeline_stages} does not divide the world size {world_size}"]
    if world_size % sequence_parallel:
        return None, [f"sequence_parallel.size: {sequence_parallel} does not divide the world size {world_size}"]
    dp = world_size // pipeline_stages // sequence_parallel
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
                     pipeline_stages=pipeline_stages, sequence_parallel=sequence_parallel,
                     eval_micro_batch_size=train.eval_micro_batch_size)
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
