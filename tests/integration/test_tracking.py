"""Weights & Biases (offline, read back), the console, errors by rank, secrets, bad launch input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import wandb_log

import tiny
from conftest import REPO, causal_config, check, launch, launch_env, read_metrics

pytestmark = pytest.mark.slow

SENTINELS = {"WANDB_API_KEY": "wandbkey-sentinel-6b1f0c2e9d8a7b6c5d4e3f2a1b0c9d8e",
             "HF_TOKEN": "hf_sentinel_token_0123456789", "MY_SERVICE_SECRET": "svc-secret-sentinel-42"}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("tracking")
    train = tiny.write_jsonl(d / "train.jsonl", tiny.alpaca_records(200, seed=9))
    evaluation = tiny.write_jsonl(d / "eval.jsonl", tiny.alpaca_records(20, seed=10))
    return causal_config(d, llama_dir, train, evaluation, max_steps=6, eval_every=3)


@pytest.fixture(scope="module")
def runs(pool, run_config, tmp_path_factory) -> dict[str, Path]:
    """The module's launches that depend on no timing, started side by side in the background (conftest's
    LaunchPool); each test checks the exit of its own. The wandb resume starts once its first run is done."""
    d = tmp_path_factory.mktemp("tracking_runs")
    out = {key: d / key for key in ("wandb", "plain", "tty", "errors", "online")}
    wandb_test = ("test_wandb_run_holds_what_metrics_jsonl_holds_and_a_resume_continues_it",
                  "test_wandb_run_holds_the_generation_samples_as_tables")
    generate = ["eval.generate.samples=3", "eval.generate.max_new_tokens=8"]
    pool.add("wandb_first", [str(run_config), f"output_dir={out['wandb']}", "wandb.mode=offline", "train.max_steps=4",
                             "train.eval_every=2", *generate], nproc=2, env=SENTINELS, tests=wandb_test)
    pool.add("wandb_second", [str(run_config), f"output_dir={out['wandb']}", "wandb.mode=offline", *generate], nproc=2,
             env=SENTINELS, after=("wandb_first",), tests=wandb_test)
    console = ("test_plain_console_off_a_terminal_and_a_progress_bar_on_one",)
    pool.add("plain", [str(run_config), f"output_dir={out['plain']}"], launcher="plain", tests=console)
    cmd = " ".join([str(Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "python") if os.environ.get("VIRTUAL_ENV")
                    else "python3", "-m", "bigsft.train", str(run_config), f"output_dir={out['tty']}"])
    pool.add("tty", commands=lambda: [(["script", "-qec", cmd, "/dev/null"], launch_env())], timeout=600,
             tests=console)
    pool.add("errors", [str(run_config), f"output_dir={out['errors']}", "train.lr=0"], nproc=2,
             tests=("test_errors_name_their_rank",))
    home = d / "home"
    home.mkdir()
    pool.add("online", [str(run_config), f"output_dir={out['online']}", "wandb.mode=online", "train.max_steps=1"],
             launcher="plain", env={"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / "none")},
             tests=("test_wandb_online_without_a_key_logs_offline_and_says_so",))
    return out


def test_wandb_run_holds_what_metrics_jsonl_holds_and_a_resume_continues_it(pool, runs):
    out = runs["wandb"]
    first = check(pool.result("wandb_first"))
    second = check(pool.result("wandb_second"))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # the same run id
    rows = {}
    for run in runs:
        for row in wandb_log.history(next(run.glob("run-*.wandb"))):
            rows.setdefault(row["_step"], {}).update(row)
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for record in metrics:
        logged = rows[record["step"]]
        for key, value in record.items():
            if key != "step" and value is not None:
                assert logged[key] == pytest.approx(value), (record["step"], key)
    config = wandb_log.config(next(runs[0].glob("run-*.wandb")))
    assert config["train"]["max_steps"] == 4 and config["output_dir"] == str(out)
    step = next(r for r in metrics if "loss" in r)
    assert {"samples_per_s", "tflops_per_device", "mem/host_rss_gb", "data/skipped"} <= set(step)
    assert step["tflops_per_device"] > 0
    for text in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert not any(v in text for v in SENTINELS.values())
    assert_no_secret_under(out)


def test_wandb_run_holds_the_generation_samples_as_tables(pool, runs):
    """eval.generate's answers at each eval (steps 2 and 4, then 6 after the resume): a W&B table per eval in the
    run file's history, its JSON under files/media/table/, the rows of samples/step_N.jsonl."""
    out = runs["wandb"]
    check(pool.result("wandb_first"))
    check(pool.result("wandb_second"))
    first, second = (wandb_log.tables(run, "eval/samples") for run in sorted((out / "wandb").glob("offline-run-*")))
    assert sorted(first) == [2, 4] and sorted(second) == [6]
    for step, table in {**first, **second}.items():
        assert table["columns"] == ["set", "prompt", "reference", "output"]
        written = [json.loads(line) for line in (out / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(written) == 3 and table["data"] == [[r[c] for c in table["columns"]] for r in written]
        assert all(prompt and reference for _, prompt, reference, _ in table["data"])


def assert_no_secret_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, value in SENTINELS.items():
                assert value.encode() not in data, f"{name} leaked into {path}"


def test_plain_console_off_a_terminal_and_a_progress_bar_on_one(pool, runs):
    plain = check(pool.result("plain"))
    assert "\x1b[" not in plain.stdout and "\r" not in plain.stdout  # Slurm logs get lines, not redraws
    assert "step 6/6  loss" in plain.stdout and "strategy" in plain.stdout and "final:" in plain.stdout
    tty = pool.result("tty")  # under `script`: a terminal
    assert tty.returncode == 0, tty.stdout[-3000:]
    assert "eta" in tty.stdout and "6/6" in tty.stdout and "━" in tty.stdout  # the live progress bar


def test_errors_name_their_rank(pool):
    proc = pool.result("errors")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "bigsft [rank 0]: error: train.lr: 0.0; must be > 0" in text
    assert "bigsft [rank 1]: error: train.lr: 0.0; must be > 0" in text


def test_wandb_online_without_a_key_logs_offline_and_says_so(pool, runs):
    proc = check(pool.result("online"))
    assert "mode online but no WANDB_API_KEY or ~/.netrc login: logging offline instead" in proc.stdout
    assert list((runs["online"] / "wandb").glob("offline-run-*"))


def test_port_in_use_is_a_clear_error(run_config, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = launch([str(run_config), f"output_dir={tmp_path / 'run'}"], launcher="plain",
                      env={"MASTER_PORT": str(port)})
    assert proc.returncode == 2
    assert f"MASTER_PORT {port} is already in use on 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


def test_launchers_print_their_command_with_secrets_masked(tmp_path):
    masked = subprocess.run(["bash", "-c", f"source {REPO}/launchers/common.sh; "
                             "bigsft_print_and_exec true model.path=x wandb.api_key=S3CRET hub_token=T0KEN"],
                            capture_output=True, text=True)
    assert masked.returncode == 0
    assert "+ true model.path=x wandb.api_key=<redacted> hub_token=<redacted>" in masked.stderr
    assert "S3CRET" not in masked.stderr and "T0KEN" not in masked.stderr


@pytest.mark.parametrize(("script", "env", "message"), [
    ("deepspeed_hostfile.sh", {}, "set HOSTFILE"),
    ("deepspeed_hostfile.sh", {"HOSTFILE": "/nonexistent/hosts"}, "is not a readable file"),
    ("deepspeed_hostfile.sh", {"HOSTFILE": "BAD"}, "lines must read 'hostname slots=N'; bad line(s): 2:node1 gpus=8"),
    ("deepspeed_nossh.sh", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "x"}, "NODE_RANK=2 must be a number below"),
    ("deepspeed_nossh.sh", {"NNODES": "2", "NODE_RANK": "0"}, "set MASTER_ADDR"),
    ("torchrun.sh", {"NNODES": "2", "MASTER_ADDR": "x"}, "set NODE_RANK"),
])
def test_launchers_refuse_bad_input(script, env, message, tmp_path):
    if env.get("HOSTFILE") == "BAD":
        bad = tmp_path / "hosts"
        bad.write_text("node0 slots=8\nnode1 gpus=8\n")
        env = {"HOSTFILE": str(bad)}
    clean = {k: v for k, v in launch_env().items() if k not in ("HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                                  "SLURM_NNODES", "SLURM_NODEID")}
    proc = subprocess.run([str(REPO / "launchers" / script), "cfg.yaml"], capture_output=True, text=True,
                          env={**clean, **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
