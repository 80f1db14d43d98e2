"""`bigsft` command line: train, validate, evaluate, plan, export, report, data inspect, data prepare."""

from __future__ import annotations

import argparse
import json
import sys

from bigsft.arguments import parse, subcommand_parsers
from bigsft.errors import EXIT_USER, ConfigError, DataError, UserError


def launchers_dir() -> str:
    """launchers/ of this install: beside the package in a checkout, inside it in a wheel."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "launchers", package / "_launchers"):
        if candidate.is_dir():
            return str(candidate)
    raise ConfigError("launchers/ not found beside or inside the bigsft package")


def validate_command(args: argparse.Namespace) -> int:
    from bigsft.config import load_config
    from bigsft.dist import read_launch_env
    from bigsft.train import prepare

    cfg = load_config(args.config, args.overrides)
    env = None
    if args.world_size is not None:
        env = {"RANK": "0", "WORLD_SIZE": str(args.world_size), "LOCAL_RANK": "0"}
    # Every check `bigsft train` makes before it starts a process group: config, environment, tokenizer,
    # the data scan, the run length.
    prepared = prepare(cfg, read_launch_env(env))
    pre = prepared.pre
    print(f"config ok: {args.config}")
    print(f"batch: {pre.batch.describe(f'rows of {cfg.data.max_length}' if cfg.data.packing else 'samples')}")
    for split, stats in prepared.data.scanned.items():
        print(f"data.{split}: the first {stats.records} records scanned, {stats.samples} usable, {stats.bad} skipped"
              + (f", {stats.truncated} truncated" if stats.truncated else ""))
        for line in stats.first_bad:
            print(f"  skipped {line}")
    for line in prepared.data.cache_notes:
        print(line)
    print(f"steps: {prepared.total_steps}" + (f", resuming at {pre.resume.trainer['step']} from {pre.resume.path}"
                                               if pre.resume else ""))
    print(f"deepspeed: {pre.ds_label} (ZeRO-{pre.zero_stage}, optimizer offload {pre.offload_optimizer})")
    print(json.dumps(prepared.ds, indent=2))  # what ds_config.json will hold
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from bigsft.config import load_config
    from bigsft.data import setup_data
    from bigsft.data.inspect import inspect
    from bigsft.model import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = build_tokenizer(cfg.model)
    inspect(cfg, setup_data(cfg.data, cfg.model, tokenizer), tokenizer, show=args.n, limit=args.limit)
    return 0


def prepare_command(args: argparse.Namespace) -> int:
    """bigsft data prepare: the tokenized cache of every training file (bigsft.data.cache)."""
    import os
    import time

    from bigsft.config import load_config
    from bigsft.data import data_cache_dir, setup_data
    from bigsft.data.cache import prepare_source
    from bigsft.data.scan import too_many_bad
    from bigsft.model import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    cache_dir = data_cache_dir(cfg)
    workers = args.workers or len(os.sched_getaffinity(0))
    run_data = setup_data(cfg.data, cfg.model, build_tokenizer(cfg.model))  # the run's own builder and labels
    print(f"tokenized cache: {cache_dir} ({workers} worker{'s' * (workers > 1)})")
    start, tokens, problems = time.perf_counter(), 0, []

    def report(done) -> None:
        m = done.meta
        what = f"tokenized in {done.seconds:.1f} s" if done.built else "fresh, kept"
        bad = f", {m['bad']} bad ({', '.join(f'{n} {r}' for r, n in m['skipped'].items())})" if m["bad"] else ""
        print(f"  {done.path}: {m['records']} records, {m['samples']} samples, {m['tokens']} tokens{bad}; {what}")

    for i, source in enumerate(cfg.data.train):
        where = f"data.train[{i}]"
        done = prepare_source(source, where, run_data.build, cache_dir, workers=workers, on_file=report)
        tokens += sum(d.meta["tokens"] for d in done if d.built)
        records = sum(d.meta["records"] for d in done)
        bad = sum(d.meta["bad"] for d in done)
        message = too_many_bad("train", records, bad, cfg.data.max_bad_fraction)
        if message:
            problems.append(f"{where}: {message}")
    seconds = time.perf_counter() - start
    print(f"tokenized in {seconds:.1f} s" + (f", {tokens / seconds:,.0f} tokens/s" if tokens else ""))
    plan_data(cfg, run_data, cache_dir, epochs=args.epochs or cfg.train.epochs,
              world_size=args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
    if problems:  # the cache is written (and counts them); training would stop on these sources
        raise DataError("; ".join(problems) + " (training would stop on them)")
    return 0


def plan_data(cfg, run_data, cache_dir: str, *, epochs: int, world_size: int) -> None:
    """The data plan of the run (bigsft.data.plan): the global stream's rows, walked once over the cache."""
    import time
    from dataclasses import replace

    from bigsft.batch_math import batch_math
    from bigsft.data import find_caches
    from bigsft.data.plan import build_plan

    caches, notes = find_caches(cfg.data, run_data.build, cache_dir)
    if not caches or None in caches:
        print("no data plan: " + "; ".join(notes))
        return
    run_data = replace(run_data, caches=caches, cache_notes=notes, cache_dir=cache_dir)
    rows = 0
    if cfg.train.max_steps:
        batch, problems = batch_math(cfg.train, world_size, cfg.pipeline.stages)
        if batch is None:
            raise ConfigError(f"--world-size {world_size}: " + "; ".join(problems))
        rows = cfg.train.max_steps * batch.global_batch_size
    start = time.perf_counter()
    directory = build_plan(cfg.data, run_data, cache_dir, seed=cfg.train.seed, rows_needed=rows, epochs=epochs)
    meta = json.loads((directory / "meta.json").read_text())
    print(f"data plan: {directory}: {meta['rows']} {'rows' if cfg.data.packing else 'samples'} "
          f"({meta['samples']} samples, seed {cfg.train.seed}) in {time.perf_counter() - start:.1f} s")


def export_command(args: argparse.Namespace) -> int:
    from bigsft.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, max_shard_size=args.max_shard_size)
    print(f"exported {out}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from bigsft.assess import evaluate_model
    from bigsft.config import load_config
    from bigsft.dist import read_launch_env

    evaluate_model(args.model, load_config(args.config, args.overrides), read_launch_env(local_rank_arg=args.local_rank))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from bigsft.config import load_config
    from bigsft.model import load_hf_config
    from bigsft.plan import Hardware, report

    cfg = load_config(args.config, args.overrides)
    hardware = Hardware(gpus_per_node=int(args.gpus_per_node), nodes=int(args.nodes), gpu_mem_gib=args.gpu_mem,
                        cpu_mem_gib=args.cpu_mem or _host_memory_gib(), nvme=args.nvme,
                        gpu_tflops=args.gpu_tflops or 312.0)
    best = report(cfg, load_hf_config(cfg.model), hardware, write=args.write)
    return 0 if best is not None else 1


def _host_memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def report_command(args: argparse.Namespace) -> int:
    from bigsft.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


COMMANDS = {"validate": validate_command, "data inspect": inspect_command, "data prepare": prepare_command, "export": export_command,
            "plan": plan_command, "evaluate": evaluate_command, "report": report_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            print(subcommand_parsers()[""].format_help())
            return 2
        if argv[0] == "train":  # the training entry point parses its own arguments (the launchers call it)
            from bigsft.train import main as train_main

            return train_main(argv[1:])
        command, args = parse(argv)
        return COMMANDS[command](args)
    except SystemExit as e:  # argparse after --help (0)
        return e.code if isinstance(e.code, int) else 0
    except UserError as e:  # a bad config, bad data, a bad checkpoint, a usage mistake
        print(f"bigsft: error: {e}", file=sys.stderr)
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
