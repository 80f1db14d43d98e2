"""Checkpoints that survive anything: real 2-rank runs on CPU, killed, signalled, starved of disk, resumed.

The model has dropout on, the data is packed and streamed: a resumed run can only log the losses of
the uninterrupted one if every rank's random generators and the data stream's state come back exactly.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import tiny
from conftest import (
    REPO,
    LaunchPool,
    causal_config,
    check,
    launch,
    launch_command,
    launch_env,
    read_metrics,
)

pytestmark = pytest.mark.slow

STEPS = 10
EXIT_FAILED, EXIT_CONFIG, EXIT_SAVED = 1, 2, 75


@pytest.fixture(scope="module")
def ckpt_config(tmp_path_factory, llama_dropout_dir) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(300, seed=4))
    return causal_config(d, llama_dropout_dir, train, max_steps=STEPS, save_every=3, micro_batch_size=1,
                         gradient_accumulation_steps=2, warmup_steps=2)


PACKED = ["data.packing=true", "data.max_length=96"]


def args(cfg: Path, out: Path, ds: str, *extra: str) -> list[str]:
    return [str(cfg), f"output_dir={out}", f"deepspeed={ds}", *PACKED, *extra]


class Running:
    """A launch in the background, in its own session so the whole tree can be killed at once."""

    def __init__(self, argv: list[str], *, nproc: int = 2):
        self.proc = subprocess.Popen(launch_command(argv, nproc=nproc), env=launch_env(), cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def ranks(self) -> list[psutil.Process]:
        """The training processes (not the launcher), ordered by rank."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "bigsft.train" in cmd and "deepspeed.launcher.launch" not in " ".join(cmd):
                rank = next((int(a.split("=")[1]) for a in cmd if a.startswith("--local_rank=")), 0)
                found.append((rank, p))
        return [p for _, p in sorted(found, key=lambda x: x[0])]

    def wait_until(self, predicate, timeout: float = 300, poll: float = 0.02) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before the condition:\n"
                                     + self.proc.stdout.read()[-4000:])
            if time.time() > deadline:
                raise AssertionError("timed out")
            time.sleep(poll)

    def kill_all(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def references(pool, ckpt_config, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, one per ZeRO stage: side by side (conftest's LaunchPool), and all finished before
    the tests that kill and signal runs begin (nothing else runs in the background then)."""
    runs = {}
    for ds in ("zero0", "zero2", "zero3"):
        runs[ds] = tmp_path_factory.mktemp(f"ref_{ds}") / "run"
        pool.add(f"ref_{ds}", args(ckpt_config, runs[ds], ds), nproc=2)
    for ds in runs:
        check(pool.result(f"ref_{ds}"))
    return runs


@pytest.fixture(scope="module")
def background(request, ckpt_config, world_config, poison_dir, tmp_path_factory) -> dict[str, Path]:
    """The first runs of the tests from test_world_size_change_two_to_one_and_back on: fixed-seed trainings
    whose outcome no timing changes, started side by side in the background (a LaunchPool of their own,
    first asked for after the kill and signal tests) while the tests before them assert. Each test checks
    the exit of its own; a test timed against the clock drains the pool first."""
    bg = LaunchPool(request)
    d = tmp_path_factory.mktemp("background")
    out = {}

    def add(key: str, argv: list[str], test: str, **how) -> None:
        bg.add(key, argv, tests=(test,), **how)

    # test_world_size_change_two_to_one_and_back: the uninterrupted reference, and the run it interrupts,
    # 2 ranks to step 6, 1 rank to step 8, 2 ranks to the end.
    two_one_two = "test_world_size_change_two_to_one_and_back"
    constant = ["train.lr_schedule=constant", "train.warmup_steps=0"]
    out["ws_reference"], out["ws_run"] = d / "ws_reference", d / "ws_run"
    add("ws_reference", args(ckpt_config, out["ws_reference"], "zero2", *constant), two_one_two, nproc=2)
    add("ws_two", args(ckpt_config, out["ws_run"], "zero2", "train.max_steps=6", *constant), two_one_two, nproc=2)
    add("ws_one", args(ckpt_config, out["ws_run"], "zero2", "train.max_steps=8", "train.gradient_accumulation_steps=4",
                       *constant), two_one_two, launcher="plain", after=("ws_two",))
    add("ws_two_again", args(ckpt_config, out["ws_run"], "zero2", *constant), two_one_two, nproc=2,
        after=("ws_one",))
    out["truncated"] = d / "truncated"
    add("truncated", args(ckpt_config, out["truncated"], "zero2", "train.max_steps=6"),
        "test_truncated_shard_is_detected_never_a_fresh_start", nproc=2)
    out["bad"] = d / "bad"
    add("bad", args(ckpt_config, out["bad"], "zero0", "train.max_steps=3"), "test_bad_checkpoints_exit_2_with_the_fix",
        launcher="plain")
    # test_nan_on_one_rank_skips_the_same_step_everywhere: constant LR, a run whose step 3 is skipped and a
    # run stopped after step 2.
    records = tiny.alpaca_records(40, seed=6)
    records[17]["instruction"] += " " + tiny.POISON  # step 3 holds samples 16..23 in file order
    (d / "nan").mkdir()
    train = tiny.write_jsonl(d / "nan" / "train.jsonl", records)
    base = ["model.trust_remote_code=true", "data.shuffle_buffer=1", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.log_every=1", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2"]
    cfg = causal_config(d / "nan", poison_dir, train)
    out["nan_a"], out["nan_b"] = d / "nan" / "a", d / "nan" / "b"
    nan_test = "test_nan_on_one_rank_skips_the_same_step_everywhere"
    add("nan_a", [str(cfg), f"output_dir={out['nan_a']}", "train.max_steps=3", *base], nan_test, nproc=2)
    add("nan_b", [str(cfg), f"output_dir={out['nan_b']}", "train.max_steps=2", *base], nan_test, nproc=2)
    # test_diverged_run_stops_after_max_skipped_steps
    records = tiny.alpaca_records(40, seed=6)
    for r in records[8:]:
        r["output"] += " " + tiny.POISON
    (d / "diverged").mkdir()
    cfg = causal_config(d / "diverged", poison_dir, tiny.write_jsonl(d / "diverged" / "train.jsonl", records))
    add("diverged", [str(cfg), "model.trust_remote_code=true", "data.shuffle_buffer=1", "train.max_steps=9",
                     "train.max_skipped_steps=3", "train.save_every=1"], "test_diverged_run_stops_after_max_skipped_steps",
        nproc=2)
    # test_world_size_change_keeps_the_global_batch: 2 ranks to step 4, then 1 rank from step 2.
    for variant, (ds, *extra) in WORLD_VARIANTS.items():
        ref, run = d / f"world_{variant}_reference", d / f"world_{variant}_run"
        out[f"world_{variant}_reference"], out[f"world_{variant}_run"] = ref, run
        test = f"test_world_size_change_keeps_the_global_batch[{variant}]"
        add(f"world_{variant}_reference", [str(world_config), f"output_dir={ref}", f"deepspeed={ds}", *extra], test,
            nproc=2)
        add(f"world_{variant}_one", [str(world_config), f"output_dir={run}", f"deepspeed={ds}", *extra,
                                     f"train.resume={ref}/checkpoints/step_00000002"], test, launcher="plain",
            after=(f"world_{variant}_reference",))
    out["node0"] = d / "node0"
    add("node0", [str(world_config), f"output_dir={out['node0']}", "train.gradient_accumulation_steps=2"],
        "test_ranks_that_see_different_checkpoints_all_exit_2", launcher="plain")
    out["conversion"] = d / "conversion"
    add("conversion", [str(world_config), f"output_dir={out['conversion']}", "deepspeed=zero2",
                       "train.gradient_accumulation_steps=2", "train.max_steps=2"],
        "test_failed_universal_conversion_exits_2_on_every_rank", launcher="plain")
    out["older"] = d / "older"
    add("older", [str(world_config), f"output_dir={out['older']}", "train.max_steps=6", "train.keep_last=3"],
        "test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside", launcher="plain")
    out["pool"] = bg
    yield out
    bg.close()


def assert_same_run(run: Path, reference: Path) -> None:
    """Every step logged once, with the reference's loss and token count (fp32 on CPU: 1e-6)."""
    got = [r for r in read_metrics(run) if "loss" in r]
    want = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]


@pytest.mark.parametrize(("ds", "victim", "seed"), [("zero0", "all", 1), ("zero2", "one", 2), ("zero3", "all", 3)])
def test_sigkill_then_relaunch_continues_exactly(ds, victim, seed, ckpt_config, references, tmp_path):
    out = tmp_path / "run"
    kill_after = random.Random(seed).randint(4, STEPS - 1)  # after the first checkpoint (step 3)
    run = Running(args(ckpt_config, out, ds))
    run.wait_until(lambda: logged_steps(out) >= kill_after)
    if victim == "all":
        run.kill_all()
    else:  # one rank dies; the launcher takes the others down
        run.ranks()[1].send_signal(signal.SIGKILL)
        code, _ = run.finish()
        assert code != 0
    check(launch(args(ckpt_config, out, ds), nproc=2))
    assert_same_run(out, references[ds])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000009", "step_00000010"]  # keep_last 2, nothing half-written left


def test_kills_during_saves_never_leave_an_unusable_run(ckpt_config, references, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    interrupted_saves = 0
    for delay in (0.0, 0.005, 0.02, 0.05):
        run = Running(args(ckpt_config, out, "zero2", "train.save_every=1", "train.keep_last=3"))
        run.wait_until(lambda: root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())
                       and logged_steps(out) >= 2, poll=0.001)
        time.sleep(delay)
        run.kill_all()
        interrupted_saves += any(p.name.endswith(".tmp") for p in root.iterdir())
    assert interrupted_saves >= 1  # at least one kill landed in the middle of a save
    check(launch(args(ckpt_config, out, "zero2", "train.save_every=1", "train.keep_last=3"), nproc=2))
    assert_same_run(out, references["zero2"])
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize(("sig", "target"), [(signal.SIGUSR1, "one rank"), (signal.SIGTERM, "node launcher")])
def test_stop_signal_saves_and_exits_75_then_resumes_exactly(sig, target, ckpt_config, references, tmp_path):
    out = tmp_path / "run"
    run = Running(args(ckpt_config, out, "zero3"))
    run.wait_until(lambda: logged_steps(out) >= 4)
    if target == "one rank":  # as srun and Slurm's --signal deliver it; twice: the second must change nothing
        victim = run.ranks()[1]
        victim.send_signal(sig)
        time.sleep(0.05)
        victim.send_signal(sig)
    else:  # deepspeed's per-node launcher (launch.py) passes SIGTERM on to its ranks
        launcher = next(p for p in psutil.Process(run.proc.pid).children(recursive=True)
                        if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        launcher.send_signal(sig)
    code, output = run.finish()
    # The ranks exit 75; deepspeed's node launcher, itself signalled, reports 1 instead.
    assert code == (EXIT_SAVED if target == "one rank" else 1), output[-3000:]
    assert "checkpoint saved, relaunch to resume" in output
    stopped_at = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert 4 <= stopped_at < STEPS and logged_steps(out) == stopped_at
    check(launch(args(ckpt_config, out, "zero3"), nproc=2))
    assert_same_run(out, references["zero3"])


def test_world_size_change_two_to_one_and_back(background):
    # 2 ranks to step 6, 1 rank to step 8 (universal conversion), 2 ranks again to the end. A constant LR
    # keeps the schedule independent of max_steps, so the reference is one uninterrupted 2-rank run.
    bg, reference, out = background["pool"], background["ws_reference"], background["ws_run"]
    check(bg.result("ws_reference"))
    check(bg.result("ws_two"))
    one = check(bg.result("ws_one"))
    assert "converted from 2 data-parallel ranks" in one.stdout
    two = check(bg.result("ws_two_again"))
    assert "converted from 1 data-parallel ranks" in two.stdout
    # The data stream does not depend on the world size: the same samples every step. Dropout draws differ
    # once the ranks change, so after step 6 the losses agree closely, not exactly.
    got = [r for r in read_metrics(out) if "loss" in r]
    want = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["loss"] for r in got[:6]] == pytest.approx([r["loss"] for r in want[:6]], abs=1e-6)
    assert [r["loss"] for r in got[6:]] == pytest.approx([r["loss"] for r in want[6:]], abs=2e-2)


@pytest.mark.parametrize("ds", ["zero0", "zero2", "zero3"])
def test_export_from_every_stage_equals_the_engines_weights(ds, references, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    proc = subprocess.run(["bigsft", "export", str(references[ds]), str(tmp_path / "hf"), "--max-shard-size", "200KB"],
                          capture_output=True, text=True, env=launch_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1  # sharded above --max-shard-size
    exported = {k: v for f in shards for k, v in load_file(f).items()}
    final = load_file(references[ds] / "final" / "model.safetensors")  # written from the live engine
    assert sorted(exported) == sorted(final)
    assert all((exported[k] == final[k]).all() for k in final)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.use_cache is True and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_truncated_shard_is_detected_never_a_fresh_start(ckpt_config, references, background):
    out = background["truncated"]
    check(background["pool"].result("truncated"))  # zero2, to step 6
    newest = out / "checkpoints" / "step_00000006"
    shard = newest / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = (out / "metrics.jsonl").read_text()
    proc = launch(args(ckpt_config, out, "zero2"), nproc=2)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "is damaged: ds/zero_pp_rank_1_mp_rank_00_optim_states.pt is 1000 bytes" in text
    assert (out / "metrics.jsonl").read_text() == before  # nothing overwritten


def test_bad_checkpoints_exit_2_with_the_fix(ckpt_config, references, background, tmp_path, gpt2_dir):
    out = background["bad"]
    check(background["pool"].result("bad"))  # zero0, to step 3, one process
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def refused(*extra: str) -> str:
        proc = launch(args(ckpt_config, out, "zero0", *extra), launcher="plain")
        assert proc.returncode == EXIT_CONFIG, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr

    assert "does not exist; give train.resume a checkpoint directory" in refused(f"train.resume={tmp_path}/nope")
    assert "model 'llama/" in refused(f"model.name_or_path={gpt2_dir}")
    assert "ZeRO stage 0, this run has 2; point deepspeed= at a JSON with the checkpoint's stage" in refused(
        "deepspeed=zero2")
    assert "train.resume: never, but" in refused("train.resume=never")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot  # nothing touched
    (out / "checkpoints" / "step_00000003" / "MANIFEST.json").unlink()
    assert "is incomplete (no MANIFEST.json" in refused()


def test_nan_on_one_rank_skips_the_same_step_everywhere(background):
    # Constant LR: a run whose step 3 is skipped ends with exactly the weights of a run stopped after step 2
    # (both set up in `background`).
    bg, a, b = background["pool"], background["nan_a"], background["nan_b"]
    check(bg.result("nan_a"))
    check(bg.result("nan_b"))
    steps = [r for r in read_metrics(a) if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1]
    assert steps[2]["loss"] is None and steps[2]["tokens"] == steps[1]["tokens"]
    from safetensors.torch import load_file

    a, b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # parameters (and so the optimizer) untouched by step 3


def test_diverged_run_stops_after_max_skipped_steps(background):
    proc = background["pool"].result("diverged")  # every sample from the 9th on poisoned (see `background`)
    assert proc.returncode == EXIT_FAILED
    assert "3 optimizer steps in a row had a non-finite loss or gradient (train.max_skipped_steps=3)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_full_disk_stops_every_rank_with_the_previous_checkpoint_intact(ckpt_config, tmp_path):
    from bigsft.checkpoint import verify

    out = tmp_path / "run"
    run = Running(args(ckpt_config, out, "zero2", "train.max_steps=400", "train.save_every=40"))
    first = out / "checkpoints" / "step_00000040"
    run.wait_until(lambda: first.is_dir())
    ranks = run.ranks()
    for p in ranks:  # from now on no file may grow past 64 KiB: the next save cannot be written
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    code, output = run.finish()
    assert code == EXIT_FAILED, output[-3000:]
    assert output.count("saving checkpoint") >= 1 and "failed" in output and "previous checkpoints are intact" in output
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ranks)
    assert verify(first)["step"] == 40
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000040"]  # no .tmp left


@pytest.fixture(scope="module")
def world_config(tmp_path_factory, llama_dir) -> Path:
    """No dropout, and no accumulation or global batch in the config: the world size alone sets the batch."""
    d = tmp_path_factory.mktemp("world")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(200, seed=9))
    return causal_config(d, llama_dir, train, max_steps=4, save_every=2, micro_batch_size=2,
                         lr_schedule="constant", warmup_steps=0)


# With dropout off, 2 ranks × 1 micro-batch and 1 rank × 2 micro-batches compute the same global batch
# gradient; only the order of the float32 reductions differs (an all-reduce of two halves against one
# running sum), about 1e-7 relative per step. Adam divides by sqrt(v) and so amplifies that noise on
# near-zero gradient elements; over two steps it stays below 2e-6 in loss and grad norm (seen: at most
# 5e-7 under ZeRO-1, ZeRO-3 and LoRA). A batch that changed with the world size (half the samples per
# step) moved the loss by 2e-2 and the grad norm by 0.4; ZeRO-3's shared Adam step counter, 2.5e-5 and 1e-4.
WORLD_TOLERANCE = 2e-6


# ZeRO-3 with weight decay: DeepSpeed's universal load gives every group the first one's (see
# checkpoint.repair_zero3_universal_load).
WORLD_VARIANTS = {"zero1": ["zero1"], "zero3": ["zero3", "train.weight_decay=0.1"],
                  "zero2_lora": ["zero2", "model.lora={r: 4, alpha: 8, dropout: 0.0}", "train.lr=1e-2"]}


@pytest.mark.parametrize("variant", list(WORLD_VARIANTS))
def test_world_size_change_keeps_the_global_batch(variant, background):
    # 2 ranks (accumulation unset: global batch 2 × 2 = 4) to step 4, saving at 2; 1 rank resumes step 2
    # (universal conversion) and must re-derive accumulation 2 to keep the batch of 4 (runs in `background`).
    bg = background["pool"]
    reference, out = background[f"world_{variant}_reference"], background[f"world_{variant}_run"]
    check(bg.result(f"world_{variant}_reference"))
    one = check(bg.result(f"world_{variant}_one"))
    assert "converted from 2 data-parallel ranks" in one.stdout
    assert "micro 2 × accumulation 2 × data-parallel 1 = global 4" in one.stdout
    got = [r for r in read_metrics(out) if "loss" in r]
    want = [r for r in read_metrics(reference) if "loss" in r][2:]
    assert [r["step"] for r in got] == [3, 4]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], abs=WORLD_TOLERANCE), key


def launch_ranks(per_rank_args: list[list[str]], logs: Path, timeout: float = 240) -> list[tuple[int, str]]:
    """Each rank a plain process with arguments of its own, as ranks on different nodes are started: the
    world meets through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Every process is killed on a timeout."""
    from bigsft.dist import free_port

    port, world = str(free_port()), len(per_rank_args)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank, argv in enumerate(per_rank_args):
        env = launch_env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                          "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(launch_command(argv, launcher="plain"), env=env, cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        raise AssertionError(f"ranks still running after {timeout:.0f} s (a hang); killed. Exit codes: "
                             f"{[p.returncode for p in procs]}\n"
                             + "\n".join((logs / f"rank{r}.log").read_text()[-2000:] for r in range(world))) from None
    return [(p.returncode, (logs / f"rank{r}.log").read_text()) for r, p in enumerate(procs)]


def test_ranks_that_see_different_checkpoints_all_exit_2(world_config, background, tmp_path):
    # One rank per "node", each with its own output_dir (node-local disks): rank 0 sees steps 2 and 4,
    # rank 1 an older copy with step 2 only, or nothing at all. Written on 1 rank with accumulation 2, so
    # the global batch of 4 fits 2 ranks.
    node0, node1, fresh = background["node0"], tmp_path / "node1", tmp_path / "fresh"
    check(background["pool"].result("node0"))
    node1.mkdir()
    shutil.copytree(node0 / "checkpoints", node1 / "checkpoints")
    shutil.rmtree(node1 / "checkpoints" / "step_00000004")
    fresh.mkdir()
    for other, seen in ((node1, f"{node1}/checkpoints/step_00000002 (step 2"), (fresh, "nothing (no checkpoint")):
        results = launch_ranks([[str(world_config), f"output_dir={node0}", "train.max_steps=6"],
                                [str(world_config), f"output_dir={other}", "train.max_steps=6"]],
                               tmp_path / other.name / "logs")
        for code, output in results:
            assert code == EXIT_CONFIG, output[-3000:]
            assert "the ranks do not agree on the checkpoint to resume from" in output, output[-3000:]
            assert f"rank 0 resumes from {node0}/checkpoints/step_00000004 (step 4" in output
            assert f"rank 1 resumes from {seen}" in output and "Traceback" not in output
        assert not (node0 / "checkpoints" / "step_00000006").exists()


def test_failed_universal_conversion_exits_2_on_every_rank(world_config, background, tmp_path):
    # Written on 1 rank (ZeRO-2), resumed on 2: rank 0 converts, and its output folder is blocked by a file.
    out = background["conversion"]
    check(background["pool"].result("conversion"))
    background["pool"].drain()  # the time limit below is for these ranks alone
    (out / "checkpoints" / "step_00000002" / "universal.tmp").write_text("in the way")
    argv = [str(world_config), f"output_dir={out}", "deepspeed=zero2"]
    started = time.time()
    results = launch_ranks([argv, argv], tmp_path / "logs", timeout=180)
    for code, output in results:
        assert code == EXIT_CONFIG, output[-3000:]
        assert "to DeepSpeed's universal format failed" in output and "resume on 1 data-parallel ranks" in output
        assert "Traceback" not in output
    assert time.time() - started < 120  # no collective timeout waited out


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(world_config, background):
    # A run to step 6; then, as the divergence message advises, a resume from step 2 with a lower LR (a new
    # trajectory), saving every step with keep_last 2; then resume: auto.
    out = background["older"]
    root = out / "checkpoints"
    check(background["pool"].result("older"))  # to step 6, keep_last 3
    old = {p.name: json.loads((p / "MANIFEST.json").read_text())["time"] for p in root.iterdir()}
    again = ["train.lr=5e-4", "train.save_every=1", "train.keep_last=2"]
    second = check(launch([str(world_config), f"output_dir={out}", "train.max_steps=5", *again,
                           f"train.resume={root}/step_00000002"], launcher="plain"))
    # The new run's checkpoints survive rotation; the abandoned ones are kept aside, untouched.
    assert sorted(p.name for p in root.iterdir()) == ["abandoned", "step_00000004", "step_00000005"]
    assert "moved the abandoned run's newer checkpoints (step_00000004, step_00000006)" in second.stdout
    new_4 = json.loads((root / "step_00000004" / "MANIFEST.json").read_text())["time"]
    assert new_4 > old["step_00000006"]
    (aside,) = (root / "abandoned").iterdir()
    assert {p.name: json.loads((p / "MANIFEST.json").read_text())["time"] for p in aside.iterdir()} == {
        k: v for k, v in old.items() if k != "step_00000002"}
    third = check(launch([str(world_config), f"output_dir={out}", "train.max_steps=7", *again], launcher="plain"))
    assert f"resumed from {root}/step_00000005 at step 5" in third.stdout
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 8))
