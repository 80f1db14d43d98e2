"""Real multi-process DeepSpeed training on CPU (gloo): ZeRO parity, launchers, export, precision."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import REPO, causal_config, check, grad_norms, read_metrics, train_losses

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def parity_config(tmp_path_factory, llama_dir) -> Path:
    """128 train records; 31 eval records: rank 0 gets 16 (4 eval batches of up to 5), rank 1 gets 15 (3),
    so rank 1 runs a dummy forward under ZeRO-3 to keep the collectives in step."""
    d = tmp_path_factory.mktemp("parity")
    records = tiny.alpaca_records(159, seed=1)
    train = tiny.write_jsonl(d / "train.jsonl", records[:128])
    evaluation = tiny.write_jsonl(d / "eval.jsonl", records[128:])
    return causal_config(d, llama_dir, train, evaluation, gradient_accumulation_steps=2, max_steps=STEPS,
                         eval_every=3, eval_micro_batch_size=5, warmup_steps=2)


def ds_args(cfg: Path, out: Path, ds: str, *extra: str) -> list[str]:
    return [str(cfg), f"deepspeed={ds}", f"output_dir={out}", *extra]


ZERO_STAGES = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
PACKED = ["data.packing=true", "train.micro_batch_size=1", "data.max_length=96", "train.eval_every=0"]


def srun_like(cfg: Path, out: Path, nproc: int = 2) -> list[tuple[list[str], dict]]:
    """The ranks started the way plain `srun` does: one process per task with SLURM_* variables only."""
    from bigsft.dist import free_port

    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    port = str(free_port())
    commands = []
    for rank in range(nproc):
        env = {**env_base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
               "SLURM_STEP_NUM_TASKS": str(nproc), "SLURM_STEP_TASKS_PER_NODE": str(nproc),
               "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "77", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        commands.append(([sys.executable, "-m", "bigsft.train", str(cfg), f"output_dir={out}"], env))
    return commands


@pytest.fixture(scope="module")
def runs(pool, parity_config, tmp_path_factory, llama_dir, tokenizer_dir, alpaca_files) -> dict[str, Path]:
    """Every training of this module: independent runs, started side by side in the background (conftest's
    LaunchPool); each test checks the exit of its own and asserts on its output directory."""
    d = tmp_path_factory.mktemp("training")
    out = {}

    def add(key: str, args: list[str], tests: tuple, **how) -> None:
        out[key] = d / key
        pool.add(key, args, tests=tests, **how)

    add("zero0", ds_args(parity_config, d / "zero0", "zero0"), None, nproc=2)  # the reference of most tests
    for ds in ZERO_STAGES:
        add(ds, ds_args(parity_config, d / ds, ds), (f"test_zero_stage_matches_zero0[{ds}]",), nproc=2)
    launchers = "test_launchers_reproduce_the_deepspeed_launcher"
    add("torchrun", ds_args(parity_config, d / "torchrun", "zero0"), (f"{launchers}[torchrun]",), nproc=2,
        launcher="torchrun")
    out["srun"] = d / "srun"
    pool.add("srun", commands=lambda: srun_like(parity_config, d / "srun"), tests=(f"{launchers}[srun]",))
    # one process, twice the accumulation: the same global batch of samples per step
    add("single", [str(parity_config), f"output_dir={d / 'single'}", "train.gradient_accumulation_steps=4"],
        (f"{launchers}[single]",), launcher="plain")
    packed = "test_packed_streaming_on_2_ranks_equals_one_rank"
    for ds in ("zero0", "zero3"):
        add(f"packed_two_{ds}", ds_args(parity_config, d / f"packed_two_{ds}", ds, *PACKED), (f"{packed}[{ds}]",),
            nproc=2)
    # The one-rank side is the same run for both stages: launched once.
    add("packed_one", [str(parity_config), f"output_dir={d / 'packed_one'}", *PACKED,
                       "train.gradient_accumulation_steps=4"], (packed,), launcher="plain")
    # The packed 2-rank run again, reading a tokenized cache and data plan that `bigsft data prepare` wrote
    # (data.cache=require stops the run if it cannot): the same batches, so the one-rank reference's losses.
    prepared = subprocess.run([sys.executable, "-m", "bigsft", "data", "prepare", str(parity_config), *PACKED,
                               f"data.cache_dir={d / 'prepared'}", "--workers", "2"], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    add("packed_two_cached", ds_args(parity_config, d / "packed_two_cached", "zero3", *PACKED, "data.cache=require",
                                     f"data.cache_dir={d / 'prepared'}"),
        ("test_packed_streaming_from_the_tokenized_cache",), nproc=2)
    add("bf16", [str(parity_config), f"output_dir={d / 'bf16'}", "model.dtype=bf16", "deepspeed=zero2"],
        ("test_bf16_trains_on_cpu",), nproc=2)
    docs = d / "ds.json"  # as the DeepSpeed docs write it: see test_deepspeed_docs_style_json_trains
    docs.write_text(json.dumps({
        "train_batch_size": 16, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                     "warmup_num_steps": 2}},
        "zero_optimization": True}))
    add("docs_json", ds_args(parity_config, d / "docs_json", str(docs), "train.adam_betas=[0.8,0.999]",
                             "data.eval=[]"), ("test_deepspeed_docs_style_json_trains",), nproc=2)
    gc_base = ["train.max_steps=3", "data.eval=[]"]
    for key, extra in (("gc_off", []), ("gc_on", ["model.gradient_checkpointing=true"])):
        add(key, [str(parity_config), f"output_dir={d / key}", *gc_base, *extra],
            ("test_gradient_checkpointing_gives_the_same_losses",), launcher="plain")
    add("weighted", [str(weighted_config(d / "weighted", llama_dir))],
        ("test_weighted_sources_mix_as_configured_and_log_it",), launcher="plain")
    add("random_init", [str(random_init_config(d / "random_init", tokenizer_dir, alpaca_files[0]))],
        ("test_random_init_from_model_config_and_tokenizer",), launcher="plain")
    add("classifier", [str(classifier_config(d / "classifier", tokenizer_dir))],
        ("test_decoder_sequence_classifier_from_config",), launcher="plain")
    add("demo", ["demo", f"output_dir={d / 'demo'}", "train.epochs=2"], ("test_demo_recipe_improves_real_minilm",),
        launcher="plain")
    from bigsft.dist import free_port

    script = Path(__file__).with_name("zero3_partition_check.py")
    pool.add("zero3_partition", commands=lambda: [(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script), str(llama_dir)],
        {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})],
        tests=("test_zero3_builds_the_model_already_partitioned",), timeout=600)
    return out


def trained(pool, runs: dict[str, Path], key: str) -> Path:
    """The run directory of launch `key`, once it has exited 0."""
    check(pool.result(key))
    return runs[key]


@pytest.fixture(scope="module")
def zero0_run(pool, runs) -> Path:
    return trained(pool, runs, "zero0")


def eval_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "eval/loss" in r]


def reload_eval_loss(config: Path, final: Path, overrides: tuple[str, ...] = ()) -> float:
    """Eval loss of the exported model, in this process, without DeepSpeed."""
    return reload_eval_metrics(config, final, overrides)["eval/loss"]


def reload_eval_metrics(config: Path, final: Path, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Eval metrics of the exported model, in this process, without DeepSpeed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigsft.batch_math import BatchMath
    from bigsft.config import load_config
    from bigsft.data import eval_sets, setup_data
    from bigsft.data.scan import SplitStats
    from bigsft.data.stream import dummy_batch
    from bigsft.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    cfg = load_config(str(config), overrides)
    plan = setup_data(cfg.data, cfg.model, tok)
    one_rank = BatchMath(micro_batch_size=5, gradient_accumulation_steps=1, data_parallel_size=1)
    sets = eval_sets(cfg.data, plan, SplitStats(), batch=one_rank, dp_rank=0, pad_id=tok.pad_token_id)
    return evaluate(model, sets, task="causal_lm", num_labels=None, device="cpu",
                    dummy=dummy_batch(per_token=True, pad_id=tok.pad_token_id))


def test_run_directory_contract(zero0_run, parity_config):
    metrics = read_metrics(zero0_run)
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    tokens = [r["tokens"] for r in steps]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert steps[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup step 1 of 2
    assert [r["step"] for r in eval_records(zero0_run)] == [3, 6]
    cfg = yaml.safe_load((zero0_run / "config.yaml").read_text())
    assert cfg["deepspeed"] == "zero0" and cfg["train"]["max_steps"] == STEPS
    final = zero0_run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert losses_decrease(train_losses(zero0_run))


def losses_decrease(losses: list[float]) -> bool:
    return losses[-1] < losses[0]


def test_eval_counts_every_token_once_and_export_reproduces_it(zero0_run, parity_config):
    last = eval_records(zero0_run)[-1]
    assert reload_eval_loss(parity_config, zero0_run / "final") == pytest.approx(last["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("ds", ZERO_STAGES)
def test_zero_stage_matches_zero0(ds, zero0_run, parity_config, pool, runs):
    run = trained(pool, runs, ds)
    reference, losses = train_losses(zero0_run), train_losses(run)
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference, abs=1e-5)
    assert grad_norms(run) == pytest.approx(grad_norms(zero0_run), rel=1e-4)
    ref_eval, got_eval = eval_records(zero0_run), eval_records(run)
    assert [r["eval/tokens"] for r in got_eval] == [r["eval/tokens"] for r in ref_eval]
    assert [r["eval/loss"] for r in got_eval] == pytest.approx([r["eval/loss"] for r in ref_eval], abs=1e-5)
    assert reload_eval_loss(parity_config, run / "final") == pytest.approx(got_eval[-1]["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("how", ["torchrun", "srun", "single"])
def test_launchers_reproduce_the_deepspeed_launcher(how, zero0_run, pool, runs):
    if how == "srun":
        for p in pool.result("srun"):
            assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
        out = runs["srun"]
    else:
        out = trained(pool, runs, how)
    assert train_losses(out) == pytest.approx(train_losses(zero0_run), abs=1e-5)
    assert grad_norms(out) == pytest.approx(grad_norms(zero0_run), rel=1e-4)
    assert eval_records(out)[-1]["eval/loss"] == pytest.approx(eval_records(zero0_run)[-1]["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("ds", ["zero0", "zero3"])
def test_packed_streaming_on_2_ranks_equals_one_rank(ds, parity_config, pool, runs):
    two_dir, one_dir = trained(pool, runs, f"packed_two_{ds}"), trained(pool, runs, "packed_one")
    two, one = read_metrics(two_dir), read_metrics(one_dir)
    assert train_losses(two_dir) == pytest.approx(train_losses(one_dir), abs=1e-5)
    assert grad_norms(two_dir) == pytest.approx(grad_norms(one_dir), rel=1e-4)
    assert [r["tokens"] for r in two if "loss" in r] == [r["tokens"] for r in one if "loss" in r]
    assert all(r["data/efficiency"] > 0.9 for r in two if "loss" in r)  # packed rows are nearly full
    final_eval = eval_records(two_dir)[-1]["eval/loss"]
    assert final_eval == pytest.approx(eval_records(one_dir)[-1]["eval/loss"], abs=1e-5)
    assert reload_eval_loss(parity_config, two_dir / "final", tuple(PACKED)) == pytest.approx(final_eval, abs=1e-5)


def test_packed_streaming_from_the_tokenized_cache(pool, runs):
    cached_dir, one_dir = trained(pool, runs, "packed_two_cached"), trained(pool, runs, "packed_one")
    output = pool.result("packed_two_cached").stdout
    assert "read from the tokenized cache (1 files, 128 samples)" in output and "read from the data plan" in output
    assert train_losses(cached_dir) == pytest.approx(train_losses(one_dir), abs=1e-5)
    assert grad_norms(cached_dir) == pytest.approx(grad_norms(one_dir), rel=1e-4)
    tokens = [[r["tokens"] for r in read_metrics(run) if "loss" in r] for run in (cached_dir, one_dir)]
    assert tokens[0] == tokens[1]


def weighted_config(d: Path, llama_dir: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    a = tiny.write_jsonl(d / "a.jsonl", tiny.alpaca_records(60, seed=2))
    b = tiny.write_jsonl(d / "b.jsonl", tiny.alpaca_records(60, seed=3))
    cfg = causal_config(d, llama_dir, a, max_steps=12, log_every=12, micro_batch_size=8,
                        gradient_accumulation_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = [{"path": str(a), "format": "alpaca", "weight": 3, "name": "big"},
                            {"path": str(b), "format": "alpaca", "weight": 1, "name": "small"}]
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_weighted_sources_mix_as_configured_and_log_it(pool, runs):
    proc = check(pool.result("weighted"))
    [last] = [r for r in read_metrics(runs["weighted"] / "run") if "loss" in r]
    assert last["data/mix/big"] + last["data/mix/small"] == pytest.approx(1.0)
    assert last["data/mix/big"] == pytest.approx(0.75, abs=0.08)  # 192 draws
    assert "big 75%, small 25%" in proc.stdout


def test_zero3_builds_the_model_already_partitioned(pool):
    proc = check(pool.result("zero3_partition"))
    reports = [json.loads(line.split("] ", 1)[-1]) for line in proc.stdout.splitlines() if '"shard_elements"' in line]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["all_partitioned"] and r["local_elements"] == 0
        assert r["shard_elements"] <= r["full_elements"] // 2 + 64  # each rank holds about half


def test_gradient_checkpointing_gives_the_same_losses(pool, runs):
    a, b = trained(pool, runs, "gc_off"), trained(pool, runs, "gc_on")
    assert train_losses(b) == pytest.approx(train_losses(a), abs=1e-6)


def test_bf16_trains_on_cpu(zero0_run, pool, runs):
    out = trained(pool, runs, "bf16")
    losses, fp32 = train_losses(out), train_losses(zero0_run)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # The same weights and samples as the fp32 run, with bf16 weights and activations (fp32 master weights
    # and loss): seen 3.4e-4 relative on the losses and 2e-3 on the gradient norms over 6 steps, and never
    # fp32's 1e-5 (which would mean the run never left fp32).
    assert losses == pytest.approx(fp32, rel=3e-3)
    assert max(abs(a - b) for a, b in zip(losses, fp32)) > 1e-4
    norms = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
    assert norms == pytest.approx([r["grad_norm"] for r in read_metrics(zero0_run) if "loss" in r], rel=2e-2)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    import torch
    from safetensors import safe_open

    with safe_open(out / "final" / "model.safetensors", "pt") as f:  # what the engine trained, as it held it
        names = f.keys()
        assert names and {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def random_init_config(d: Path, tokenizer_dir: Path, train: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = causal_config(d, tokenizer_dir, train, max_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"config": {**tiny.QWEN2, "vocab_size": 400}, "tokenizer": str(tokenizer_dir), "task": "causal_lm"}
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_random_init_from_model_config_and_tokenizer(pool, runs):
    check(pool.result("random_init"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["random_init"] / "run" / "final")
    assert model.config.model_type == "qwen2" and model.config.use_cache is True


def classifier_config(d: Path, tokenizer_dir: Path) -> Path:
    # A Llama with a classification head, random init; its tokenizer has no pad token (EOS stands in).
    repo_data = REPO / "bigsft" / "recipes" / "data"
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "cls.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(d / "run"),
        "model": {"config": {**tiny.LLAMA, "vocab_size": 400}, "tokenizer": str(tokenizer_dir),
                  "task": "sequence_classification", "num_labels": 4},
        "data": {"train": [{"path": str(repo_data / "topics_train.jsonl"), "format": "classification"}],
                 "eval": [{"path": str(repo_data / "topics_eval.jsonl"), "format": "classification"}],
                 "max_length": 64},
        "train": {"micro_batch_size": 8, "max_steps": 3, "lr": 1e-3, "log_every": 1}}))
    return cfg


def test_decoder_sequence_classifier_from_config(pool, runs):
    check(pool.result("classifier"))
    run = runs["classifier"] / "run"
    evals = eval_records(run)
    assert evals[-1]["eval/examples"] == 80 and 0 <= evals[-1]["eval/f1"] <= 1
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.id2label[0] == "business" and model.config.pad_token_id == model.config.eos_token_id


def test_deepspeed_docs_style_json_trains(pool, runs):
    # As the DeepSpeed docs write it (the JSON is written in `runs`): explicit batch, optimizer and scheduler
    # (values that agree with the run config), and the legacy boolean zero_optimization.
    out = trained(pool, runs, "docs_json")
    losses = train_losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    assert lrs[-1] == pytest.approx(0.001)  # DeepSpeed's WarmupLR from the JSON, not bigsft's cosine


def test_demo_recipe_improves_real_minilm(pool, runs):
    proc = check(pool.result("demo"))
    out = runs["demo"]
    evals = eval_records(out)
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] > 0
    assert after["eval/accuracy"] > before["eval/accuracy"] + 0.3
    assert after["eval/f1"] > before["eval/f1"] + 0.3
    assert after["eval/loss"] < before["eval/loss"]
    assert "before training" in proc.stdout and "after training" in proc.stdout
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "world", 1: "sports", 2: "business", 3: "science"}
