"""Shared fixtures: tiny tokenizer and models built from configs, synthetic data, launch helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"  # runs that test W&B say wandb.mode=offline; none goes online
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def tokenizer_dir(assets) -> Path:
    return tiny.build_tokenizer(assets / "tokenizer")


@pytest.fixture(scope="session")
def llama_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_model_dir(assets / "llama", tokenizer_dir, tiny.LLAMA)


@pytest.fixture(scope="session")
def gpt2_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_model_dir(assets / "gpt2", tokenizer_dir, tiny.GPT2)


@pytest.fixture(scope="session")
def poison_dir(assets, tokenizer_dir) -> Path:
    return tiny.build_poison_model_dir(assets / "poison", tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dropout_dir(assets, tokenizer_dir) -> Path:
    """Dropout on: resume must restore every rank's random generators to be exact."""
    return tiny.build_model_dir(assets / "llama_dropout", tokenizer_dir, {**tiny.LLAMA, "attention_dropout": 0.1})


@pytest.fixture(scope="session")
def alpaca_files(assets) -> tuple[Path, Path]:
    records = tiny.alpaca_records(160, seed=1)
    return (tiny.write_jsonl(assets / "alpaca" / "train.jsonl", records[:128]),
            tiny.write_jsonl(assets / "alpaca" / "eval.jsonl", records[128:]))


@pytest.fixture(scope="session")
def cache_corpus(tmp_path_factory, tokenizer_dir):
    """Two alpaca sources (one split over two files) with unusable records of every stage: unreadable JSON, a
    missing field, a sample that tokenizes to nothing trainable."""
    d = tmp_path_factory.mktemp("cache_corpus")
    a = tiny.alpaca_records(70, seed=3)
    a[5] = {"instruction": "no output field"}
    first = tiny.write_jsonl(d / "a" / "part0.jsonl", a[:40])
    with first.open("a") as fh:
        fh.write("{not json\n")
    tiny.write_jsonl(d / "a" / "part1.jsonl", a[40:])
    b = tiny.alpaca_records(30, seed=4)
    b[3] = {"instruction": "x " * 200, "output": "y"}  # the prompt fills max_length: nothing left to train
    second = tiny.write_jsonl(d / "b.jsonl", b)
    from transformers import AutoTokenizer

    from bigsft.config import ModelConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = ModelConfig(config={"model_type": "llama"}, tokenizer=str(tokenizer_dir))
    return d, [str(d / "a"), str(second)], tok, model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they sit beside the repo in CI)")
    return SHARED_DATA


def causal_config(tmp_path: Path, model_dir: Path, train: Path, evaluation: Path | None = None, **train_keys) -> Path:
    """A small causal-LM run config written as YAML."""
    import yaml

    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "data": {"train": [{"path": str(train), "format": "alpaca"}], "max_length": 128},
        "train": {"seed": 0, "micro_batch_size": 4, "max_steps": 4, "lr": 1e-3, "log_every": 1,
                  "max_grad_norm": 1.0, **train_keys},
    }
    if evaluation is not None:
        cfg["data"]["eval"] = [{"path": str(evaluation), "format": "alpaca"}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def split_alpaca_config(d: Path, model_dir: Path, *, seed: int, **train_keys) -> Path:
    """A causal-LM run config over 100 synthetic alpaca records for training and 20 more for eval."""
    records = tiny.alpaca_records(120, seed=seed)
    train = tiny.write_jsonl(d / "train.jsonl", records[:100])
    evaluation = tiny.write_jsonl(d / "eval.jsonl", records[100:])
    return causal_config(d, model_dir, train, evaluation, **train_keys)


def assert_continues(resumed: Path, reference: Path, *, after_step: int, tolerance: float) -> None:
    """The run resumed from `after_step` logs the reference run's later steps: same steps, tokens, losses and
    gradient norms."""
    got = [r for r in read_metrics(resumed) if "loss" in r]
    want = [r for r in read_metrics(reference) if "loss" in r][after_step:]
    assert [r["step"] for r in got] == [r["step"] for r in want] and got
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], abs=tolerance), key


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def grad_norms(run_dir: Path) -> list[float]:
    """Per-step gradient norms: parity checks compare them with the losses, since a constant gradient-scale
    error (a division by accumulation or world size too many or too few) leaves AdamW's losses unchanged."""
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


def launch_command(args: list[str], *, nproc: int = 1, launcher: str = "deepspeed") -> list[str]:
    from bigsft.dist import free_port

    port = str(free_port())
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, "--module", "bigsft.train", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, "-m", "bigsft.train", *args]
    else:
        cmd = [sys.executable, "-m", "bigsft.train", *args]
    return cmd


def launch_env(env: dict | None = None) -> dict:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    return full_env


def launch(args: list[str], *, nproc: int = 1, launcher: str = "deepspeed", timeout: int = 900,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run bigsft.train as `nproc` processes under a real launcher (or one plain process)."""
    return subprocess.run(launch_command(args, nproc=nproc, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, env=launch_env(env), cwd=REPO)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


# --- Launches in the background ---------------------------------------------------------------------------
# A launch spends most of its 10-20 s starting up (imports, the launcher, process groups, DeepSpeed's ops)
# and tearing down (the launcher polls its ranks once a second), much of it waiting, not computing: two or
# three independent launches side by side take far less than their sum. A module's deterministic runs
# (parity references, fixed-seed trainings) go into a LaunchPool; each test still gets, and checks, the
# result of its own launch. Runs whose outcome depends on timing (signals, kills) stay in the foreground.

POOL_WIDTH = int(os.environ.get("BIGSFT_TEST_LAUNCHES", "3"))
"""Launches run side by side at most (1: one at a time, as before)."""


class Background:
    """One launch (or a group of processes started together, as `srun` starts ranks) in the background, its
    output in files (a pipe nobody reads would block it), in a session of its own so a timeout kills it all."""

    def __init__(self, commands: list[tuple[list[str], dict]], timeout: float):
        import tempfile

        self.deadline = time.time() + timeout
        self.timeout = timeout
        self.timed_out = False
        self.procs = []
        for cmd, env in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in results)
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO,
                                    start_new_session=True)
            self.procs.append((proc, out, err))

    def done(self) -> bool:
        return all(p.poll() is not None for p, _, _ in self.procs)

    def kill(self, timed_out: bool = False) -> None:
        self.timed_out |= timed_out
        for p, _, _ in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def results(self) -> list[subprocess.CompletedProcess]:
        """Wait for every process; a timeout kills them all and raises (a hang fails, never blocks)."""
        for p, _, _ in self.procs:
            try:
                p.wait(timeout=max(1.0, self.deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(timed_out=True)
        if self.timed_out:
            raise subprocess.TimeoutExpired(self.procs[0][0].args, self.timeout)
        completed = []
        for p, out, err in self.procs:
            out.seek(0)
            err.seek(0)
            completed.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return completed


class LaunchPool:
    """Named launches that a module's tests assert on, run up to POOL_WIDTH at a time, each at most once.

    `add` registers a launch (it starts nothing); `result(key)` starts what it can (the requested launch
    first, then the others in the order added), waits for that one, and returns its CompletedProcess (a
    list of them for a group of processes). Launches keep running in the background between tests.
    `after` names launches that must have succeeded first (a resume after its first run); `tests` names the
    tests (by name, with or without parameters) that use the launch: when none of them is selected, it is
    only started if asked for. A failed or hung launch fails only the tests that ask for it."""

    def __init__(self, request: pytest.FixtureRequest | None = None, width: int = POOL_WIDTH):
        self.width = max(1, width)
        self.specs: dict[str, dict] = {}
        self.running: dict[str, Background] = {}
        self.finished: dict[str, list[subprocess.CompletedProcess] | BaseException] = {}
        self.selected: set[str] | None = None
        if request is not None:
            module = request.node.nodeid.split("::")[0]
            self.selected = set()
            for item in request.session.items:
                if item.nodeid.split("::")[0] == module:
                    self.selected |= {item.name, getattr(item, "originalname", item.name)}

    def add(self, key: str, args: list[str] | None = None, *, nproc: int = 1, launcher: str = "deepspeed",
            env: dict | None = None, commands=None, after: tuple = (), tests: tuple | None = None,
            timeout: float = 900) -> None:
        """A bigsft launch (`args` as for `launch`), or `commands`: a function giving the (command, environment)
        pairs to start together, called at start (so that a port it picks is free then)."""
        assert key not in self.specs, key
        if commands is None:
            def commands():
                return [(launch_command(args, nproc=nproc, launcher=launcher), launch_env(env))]
        self.specs[key] = {"commands": commands, "after": tuple(after), "tests": tests, "timeout": timeout}

    def _wanted(self, key: str) -> bool:
        tests = self.specs[key]["tests"]
        return self.selected is None or tests is None or bool(self.selected & set(tests))

    def _blocked(self, key: str) -> str | None:
        """Why the launch cannot run at all (a launch it needs failed), or None."""
        for dep in self.specs[key]["after"]:
            got = self.finished.get(dep)
            if isinstance(got, BaseException) or (got is not None and any(p.returncode for p in got)):
                return dep
            if dep in self.finished:
                reason = self._blocked(dep)
                if reason:
                    return reason
        return None

    def _ready(self, key: str) -> bool:
        return all(dep in self.finished for dep in self.specs[key]["after"])

    def _reap(self) -> None:
        for key, bg in list(self.running.items()):
            if bg.done():
                try:
                    self.finished[key] = bg.results()
                except Exception as e:  # kept for the test that asks
                    self.finished[key] = e
                del self.running[key]

    def _fill(self, first: str | None = None) -> None:
        candidates = ([first] if first else []) + [k for k in self.specs if k != first and self._wanted(k)]
        for key in candidates:
            if len(self.running) >= self.width:
                return
            if key in self.running or key in self.finished or not self._ready(key):
                continue
            if self._blocked(key):
                self.finished[key] = AssertionError(f"launch {key!r} not run: {self._blocked(key)!r}, "
                                                    "which it resumes from, failed")
                continue
            spec = self.specs[key]
            self.running[key] = Background(spec["commands"](), spec["timeout"])

    def _start_chain(self, key: str) -> None:
        """Start `key`'s unfinished dependencies before anything else."""
        for dep in self.specs[key]["after"]:
            if dep not in self.finished:
                self._start_chain(dep)
                return
        self._fill(first=key)

    def result(self, key: str):
        assert key in self.specs, f"no launch {key!r} in this pool"
        while key not in self.finished:
            self._reap()
            if key in self.finished:
                break
            self._start_chain(key)
            self._fill()
            bg = self.running.get(key)
            if bg is not None and time.time() > bg.deadline:
                bg.kill(timed_out=True)
            time.sleep(0.05)
        self._fill()  # keep the pool busy while the test asserts
        got = self.finished[key]
        if isinstance(got, BaseException):
            raise AssertionError(f"launch {key!r}: {got}")
        return got if len(got) > 1 else got[0]

    def drain(self) -> None:
        """Wait for the launches running now (before a test whose timing a busy machine would disturb)."""
        for key in list(self.running):
            while key in self.running:
                if time.time() > self.running[key].deadline:
                    self.running[key].kill(timed_out=True)
                self._reap()
                time.sleep(0.05)

    def close(self) -> None:
        for bg in self.running.values():
            bg.kill()
        self.running.clear()


@pytest.fixture(scope="module")
def pool(request):
    """A LaunchPool for the module; launches still running when the module ends are killed."""
    p = LaunchPool(request)
    yield p
    p.close()
