"""The training loop in one process, with a stub engine and a list-backed stream: accumulation and loss
scaling, skips and divergence, the log / eval / save cadence and a stop request, in well under a second.
The multi-process suites check the same loop against real DeepSpeed engines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bigsft.batch_math import BatchMath
from bigsft.config import DataConfig, DataSource, ModelConfig, RunConfig, TrainConfig
from bigsft.data.batching import Batch
from bigsft.data.scan import SplitStats
from bigsft.errors import Diverged, StoppedAndSaved
from bigsft.meter import Meter
from bigsft.steps import StepResult, WindowCounts, ZeroSteps
from bigsft.train import StopRequest, Trainer, TrainState


def batch(targets: int, rows: int = 2) -> Batch:
    ids = torch.ones((rows, 4), dtype=torch.long)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids), targets,
                 num_tokens=targets + 1, num_samples=rows, attention_pairs=16)


class Scheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


class Engine:
    """What the loop and ZeroSteps touch of a DeepSpeed engine, recording the calls."""

    def __init__(self, *, applied=True, fp16_scale=None):
        self.lr_scheduler = Scheduler()
        self.backward_calls, self.micro_steps, self.modes = [], 0, []
        self.applied, self.fp16_scale = applied, fp16_scale
        self.optimizer = SimpleNamespace(loss_scale=fp16_scale or 1.0)
        self.module = SimpleNamespace(config=None)

    def get_lr(self):
        return [0.1 * (1 + self.lr_scheduler.steps)]

    def fp16_enabled(self):
        return self.fp16_scale is not None

    def train(self):
        self.modes.append("train")

    def eval(self):
        self.modes.append("eval")

    def backward(self, loss, scale_wrt_gas=True):
        self.backward_calls.append((float(loss), scale_wrt_gas))

    def step(self):
        self.micro_steps += 1

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return 1.5


class Stream:
    def __init__(self, windows):
        self.windows, self.drawn = list(windows), 0
        self.mixed = SimpleNamespace(drawn=[0])

    def next_window(self):
        self.drawn += 1
        return self.windows.pop(0)

    def state_dict(self):
        return {"drawn": self.drawn}


class Steps:
    """A scripted step strategy: step i returns results[i] (default: applied, loss 2 per target)."""

    def __init__(self, engine, results=None, on_step=None):
        self.engine, self.results, self.on_step = engine, results or {}, on_step
        self.calls, self.evals, self.eval_values = [], 0, []

    def shard(self, window):
        return window

    def train_step(self, window, counts):
        self.calls.append((len(window), counts.targets))
        i = len(self.calls)
        if self.on_step:
            self.on_step(i)
        default = StepResult(2.0 * counts.targets, 0.5, applied=True, scheduled=True)
        return self.results.get(i, default)

    def evaluate(self, batches, stop_requested, report=None):
        self.evals += 1
        if stop_requested():
            from bigsft.evaluate import EvalInterrupted

            raise EvalInterrupted
        if self.eval_values:
            return {"eval/loss": 1.0, "eval/f1": 0.5, **self.eval_values.pop(0)}
        return {"eval/loss": 1.0 / self.evals}


class Tracker:
    def __init__(self):
        self.records, self.closed = [], 0

    def log(self, record):
        self.records.append(record)

    def summary(self, *args):
        pass

    def close(self):
        self.closed += 1


class Checkpointer:
    def __init__(self):
        self.saved, self.marked, self.best = [], [], []

    def save(self, engine, step, *, trainer, best=None, **_):
        self.saved.append((step, trainer))
        self.best.append(best)
        return f"step_{step}"

    def mark_best(self, step, metric, value):
        self.marked.append((step, metric, value))

    def step_dir(self, step):
        return f"step_{step}"


def trainer_for(tmp_path, monkeypatch, *, steps=6, targets=None, results=None, on_step=None, engine=None,
                eval_data=False, **train):
    cfg = RunConfig(output_dir=str(tmp_path), model=ModelConfig(name_or_path="m", task="causal_lm"),
                    data=DataConfig(train=[DataSource(path="t.jsonl", format="text")],
                                    eval=[DataSource(path="e.jsonl", format="text")] if eval_data else []),
                    train=TrainConfig(**{"log_every": 2, **train}))
    bm = BatchMath(micro_batch_size=2, gradient_accumulation_steps=3, data_parallel_size=1)
    pre = SimpleNamespace(cfg=cfg, batch=bm, launch=SimpleNamespace(is_main=True, rank=0, world_size=1),
                          zero_stage=0, identity={"model": "m"}, resume=None)
    prepared = SimpleNamespace(pre=pre, total_steps=steps, data=None, tokenizer=SimpleNamespace(pad_token_id=0), ds={},
                               prompts=[])
    trainer = Trainer(prepared)
    engine = engine or Engine()
    targets = targets or [10] * steps
    trainer.engine, trainer.steps = engine, Steps(engine, results, on_step)
    trainer.stream = Stream([[batch(t // 3), batch(t // 3), batch(t - 2 * (t // 3))] for t in targets])
    trainer.stats, trainer.tracker, trainer.checkpointer = SplitStats(), Tracker(), Checkpointer()
    trainer.meter = Meter(parameters=100, layers=1, hidden=4, world_size=1, causal=True, peak_tflops=None)
    trainer.min_loss_scale, trainer.dp_rank = 1.0, 0
    monkeypatch.setattr("bigsft.train.eval_sets", lambda *a, **k: [("dev", [batch(4)])])
    monkeypatch.setattr("bigsft.export.export_engine", lambda *a, **k: None)
    trainer.steps.export = lambda *a: None
    return trainer


def train_logs(trainer):
    return [r for r in trainer.tracker.records if "loss" in r]


def test_zero_steps_scale_each_micro_batch_by_the_global_batch(monkeypatch):
    """loss_sum × dp / trained units of the global batch, times an fp16 wrapper's scale when bigsft
    applies it; one engine.step per micro-batch; the window's loss sum comes back unscaled."""
    # Under sequence parallelism DeepSpeed averages over data- × sequence-parallel ranks: the factor is theirs.
    for caller_scales, scale, sp in ((False, 1.0, 1), (True, 1024.0, 1), (False, 1.0, 2)):
        steps = ZeroSteps.__new__(ZeroSteps)
        steps.engine = Engine(fp16_scale=scale if caller_scales else None)
        steps.batch = BatchMath(micro_batch_size=2, gradient_accumulation_steps=3, data_parallel_size=4,
                                sequence_parallel=sp)
        steps.caller_scales, steps.own_grad_norm, steps.sp = caller_scales, False, None
        losses = iter([3.0, 5.0, 7.0])
        steps.forward = lambda micro, losses=losses: (torch.tensor(next(losses)), None)
        window = [batch(4), batch(4), batch(4)]
        result = steps.train_step(window, WindowCounts(targets=48, tokens=60, positions=96, samples=24,
                                                       attention_pairs=0))
        expected = [loss * 4 * sp / 48 * scale for loss in (3.0, 5.0, 7.0)]
        assert [c[0] for c in steps.engine.backward_calls] == pytest.approx(expected)
        assert all(c[1] is False for c in steps.engine.backward_calls)  # bigsft normalizes, not DeepSpeed
        assert steps.engine.micro_steps == 3
        assert result.loss_sum == pytest.approx(15.0) and result.grad_norm == 1.5 and result.applied


def test_windows_counts_and_log_cadence(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, monkeypatch, steps=5, targets=[10, 20, 30, 40, 50])
    with StopRequest() as stop:
        trainer.fit(stop)
    assert trainer.steps.calls == [(3, 10), (3, 20), (3, 30), (3, 40), (3, 50)]  # one window per step
    logs = train_logs(trainer)
    assert [r["step"] for r in logs] == [2, 4, 5]  # every log_every, and the last step
    assert all(r["loss"] == pytest.approx(2.0) for r in logs)  # token-weighted over the interval
    assert logs[-1]["tokens"] == 150 and trainer.state.trained_tokens == 150
    assert trainer.engine.lr_scheduler.steps == 0  # DeepSpeed stepped it with every update


def test_eval_and_save_cadence_and_the_finish(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, eval_data=True, eval_every=3, save_every=2,
                          eval_at_start=True)
    with StopRequest() as stop:
        trainer.fit(stop)
        results = trainer.finish(stop)
    evals = [r["step"] for r in trainer.tracker.records if "eval/loss" in r]
    assert evals == [0, 3, 6]  # at start, every eval_every; the last step's eval is the final one
    assert [s for s, _ in trainer.checkpointer.saved] == [2, 4, 6]  # the last one by finish, once
    assert results == {"eval/loss": 1 / 3} and trainer.results["before training"] == {"eval/loss": 1.0}
    saved = trainer.checkpointer.saved[-1][1]
    assert saved["step"] == 6 and saved["last_eval_step"] == 6 and saved["identity"] == {"model": "m"}
    assert "skipped_in_a_row" not in saved and "last_save_step" not in saved
    assert trainer.engine.modes[-1] == "train"
    # The last step's checkpoint comes after the final eval, so it records that eval as done.
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, eval_data=True, eval_every=4, save_every=2)
    with StopRequest() as stop:
        trainer.fit(stop)
        trainer.finish(stop)
    assert [(s, t["last_eval_step"]) for s, t in trainer.checkpointer.saved] == [(2, -1), (4, 4), (6, 6)]


def test_non_finite_steps_are_skipped_then_the_run_diverges(tmp_path, monkeypatch):
    bad = StepResult(math.nan, None, applied=False, scheduled=False)
    trainer = trainer_for(tmp_path, monkeypatch, steps=8, results={2: bad, 3: bad, 5: bad, 6: bad, 7: bad},
                          max_skipped_steps=3)
    with StopRequest() as stop, pytest.raises(Diverged, match=r"3 optimizer steps in a row.*the last at step 7"):
        trainer.fit(stop)
    assert trainer.state.skipped_steps == 5 and trainer.state.step == 7
    assert trainer.engine.lr_scheduler.steps == 5  # the schedule follows bigsft's steps, skipped or not
    logs = train_logs(trainer)
    assert logs[0]["step"] == 2 and logs[0]["loss"] == pytest.approx(2.0)  # a skipped step's loss is left out
    assert logs[0]["skipped_steps"] == 1


def test_fp16_overflows_above_the_floor_are_warm_up_not_divergence(tmp_path, monkeypatch):
    overflow = StepResult(3.0, None, applied=False, scheduled=False)  # finite loss, gradient overflowed
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, results={i: overflow for i in (1, 2, 3, 4)},
                          engine=Engine(fp16_scale=2.0**16), max_skipped_steps=2)
    with StopRequest() as stop:
        trainer.fit(stop)
    assert trainer.state.skipped_steps == 4 and trainer.state.step == 6
    assert all("loss_scale" in r for r in train_logs(trainer))
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, results={i: overflow for i in (1, 2, 3, 4)},
                          engine=Engine(fp16_scale=1.0), max_skipped_steps=2)  # at the scaler's floor
    with StopRequest() as stop, pytest.raises(Diverged, match="minimum loss scale"):
        trainer.fit(stop)


def test_a_window_without_targets_counts_as_a_step_without_an_update(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, monkeypatch, steps=2, targets=[10, 0])
    with StopRequest() as stop:
        trainer.fit(stop)
    assert len(trainer.steps.calls) == 1 and trainer.state.step == 2 and trainer.state.skipped_steps == 0
    assert trainer.engine.lr_scheduler.steps == 1


def test_a_stop_request_saves_the_finished_step_and_stops(tmp_path, monkeypatch):
    holder = {}
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, save_every=2,
                          on_step=lambda i: i == 3 and setattr(holder["stop"], "requested", True))
    with StopRequest() as stop, pytest.raises(StoppedAndSaved, match="at step 3"):
        holder["stop"] = stop
        trainer.fit(stop)
    assert [s for s, _ in trainer.checkpointer.saved] == [2, 3] and len(trainer.steps.calls) == 3
    # a stop right after a save does not save twice
    trainer = trainer_for(tmp_path, monkeypatch, steps=6, save_every=2,
                          on_step=lambda i: i == 2 and setattr(holder["stop"], "requested", True))
    with StopRequest() as stop, pytest.raises(StoppedAndSaved, match="at step 2"):
        holder["stop"] = stop
        trainer.fit(stop)
    assert [s for s, _ in trainer.checkpointer.saved] == [2]


def test_a_stop_during_the_final_eval_saves_and_the_relaunch_evaluates(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, monkeypatch, steps=2, eval_data=True)
    with StopRequest() as stop:
        trainer.fit(stop)
        stop.requested = True
        with pytest.raises(StoppedAndSaved, match="during the final eval"):
            trainer.finish(stop)
    saved = trainer.checkpointer.saved[-1][1]
    assert saved["step"] == 2 and saved["last_eval_step"] == -1  # not evaluated: the relaunch will


def test_train_state_round_trips_through_a_checkpoint():
    state = TrainState(total_steps=10, step=4, trained_tokens=99, skipped_steps=1, tracking_run_id="abc",
                       last_eval_step=3, last_save_step=4, skipped_in_a_row=1, best_step=2, best_value=0.5,
                       evals_since_best=1)
    back = TrainState.resumed(state.state_dict(), total_steps=10)
    assert back == TrainState(total_steps=10, step=4, trained_tokens=99, skipped_steps=1, tracking_run_id="abc",
                              last_eval_step=3, last_save_step=4, best_step=2, best_value=0.5, evals_since_best=1)
    older = {k: v for k, v in state.state_dict().items() if k != "last_eval_step"}  # before the field existed
    assert TrainState.resumed(older, total_steps=10).last_eval_step == 4


def run_with_evals(tmp_path, monkeypatch, values, *, steps=10, **train):
    trainer = trainer_for(tmp_path, monkeypatch, steps=steps, eval_data=True, eval_every=1, **train)
    trainer.steps.eval_values = list(values)
    exported = []
    monkeypatch.setattr("bigsft.export.export_checkpoint", lambda path, out, **k: exported.append(path))
    trainer.steps.export = lambda *a: exported.append("engine")
    with StopRequest() as stop:
        trainer.fit(stop)
        trainer.finish(stop)
    return trainer, exported


def test_a_new_best_eval_saves_a_checkpoint_that_rotation_keeps(tmp_path, monkeypatch):
    losses = [{"eval/loss": v} for v in (3.0, 2.0, 2.5, 1.0, 1.5, 1.2)]
    trainer, exported = run_with_evals(tmp_path, monkeypatch, losses, steps=6, best_metric="eval/loss")
    saves = [s for s, _ in trainer.checkpointer.saved]
    assert saves == [1, 2, 4, 6]  # each new best, and the last step
    assert trainer.checkpointer.best == [(1, "eval/loss", 3.0), (2, "eval/loss", 2.0), (4, "eval/loss", 1.0),
                                         (4, "eval/loss", 1.0)]  # what rotation keeps at every save
    assert trainer.state.best_step == 4 and trainer.state.best_value == 1.0
    assert trainer.checkpointer.saved[-1][1]["best_step"] == 4  # a resumed run knows the best so far
    assert exported == ["engine"]  # train.final=last


def test_final_best_exports_the_best_checkpoint(tmp_path, monkeypatch):
    f1 = [{"eval/f1": v} for v in (0.5, 0.7, 0.6, 0.65)]  # f1: higher is better (best_mode auto)
    trainer, exported = run_with_evals(tmp_path, monkeypatch, f1, steps=4, best_metric="eval/f1", final="best")
    assert trainer.state.best_step == 2 and exported == ["step_2"]
    trainer, exported = run_with_evals(tmp_path, monkeypatch, [{"eval/f1": v} for v in (0.5, 0.7)], steps=2,
                                       best_metric="eval/f1", final="best")
    assert exported == ["engine"]  # the last step is the best: straight from the engine


def test_early_stopping_ends_the_run_as_finished(tmp_path, monkeypatch):
    losses = [{"eval/loss": v} for v in (3.0, 2.0, 1.95, 2.5, 1.0)]
    trainer, exported = run_with_evals(tmp_path, monkeypatch, losses, steps=10, early_stopping_patience=2,
                                       early_stopping_min_delta=0.1)
    # 1.95 is not better than 2.0 by more than 0.1: evals 3 and 4 count, and the run stops after step 4
    assert trainer.state.step == 4 and len(trainer.steps.calls) == 4 and trainer.steps.evals == 4
    assert [s for s, _ in trainer.checkpointer.saved] == [4] and exported == ["engine"]
    assert trainer.state.evals_since_best == 2 and trainer.state.best_step == 2
    assert "has not improved on 2 (step 2) for 2 evals" in trainer.early_stop_reason()


def test_best_mode_and_the_metric_early_stopping_follows():
    assert TrainConfig(best_metric="eval/f1").higher_is_better
    assert not TrainConfig(best_metric="eval/perplexity").higher_is_better
    assert not TrainConfig(best_metric="eval/f1", best_mode="min").higher_is_better
    assert TrainConfig(early_stopping_patience=3).selection_metric == "eval/loss"
    assert TrainConfig().selection_metric is None
