"""`bigsft` command line: train, validate, plan, export, data inspect."""

from __future__ import annotations

import json
import re
import sys

from bigsft.config import ConfigError

USAGE = """usage: bigsft COMMAND ...

commands:
  train [CONFIG_OR_RECIPE] [key.path=value ...]   train (no argument: the built-in demo)
  validate CONFIG [key.path=value ...] [--world-size N]
                                                  check a config and its DeepSpeed JSON, print the batch math
  plan CONFIG --gpus-per-node G --nodes N --gpu-mem GIB [--cpu-mem GIB] [--nvme] [--gpu-tflops T]
       [--write ds_configs/planned.json] [key.path=value ...]
                                                  memory and speed of every strategy; the fastest that fits
  export CHECKPOINT_OR_RUN_DIR OUT_DIR [--max-shard-size 5GB]
                                                  write an HF model directory from a checkpoint of any ZeRO
                                                  stage (a run directory: its newest checkpoint), on CPU
  data inspect CONFIG [-n N] [--limit RECORDS] [key.path=value ...]
                                                  show processed samples (trained tokens highlighted) and
                                                  corpus statistics

Multi-process launches use the same entry point:
  deepspeed --num_gpus N --module bigsft.train CONFIG [key.path=value ...]
  torchrun --nproc_per_node N -m bigsft.train CONFIG [key.path=value ...]
  srun python -m bigsft.train CONFIG [key.path=value ...]
"""


def launchers_dir() -> str:
    """launchers/ of this install: beside the package in a checkout, inside it in a wheel."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "launchers", package / "_launchers"):
        if candidate.is_dir():
            return str(candidate)
    raise ConfigError("launchers/ not found beside or inside the bigsft package")


def validate_command(argv: list[str]) -> int:
    from bigsft.config import load_config
    from bigsft.dist import read_launch_env
    from bigsft.train import prepare

    args, opts = _options(argv, {"--world-size": None})
    world_size = opts["--world-size"]
    if world_size == 0:
        raise ConfigError("--world-size: must be at least 1")
    if not args:
        raise ConfigError(f"validate needs a config\n{USAGE}")
    cfg = load_config(args[0], args[1:])
    env = None
    if world_size is not None:
        env = {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}
    # Every check `bigsft train` makes before it starts a process group: config, environment, tokenizer,
    # the data scan, the run length.
    prepared = prepare(cfg, read_launch_env(env))
    pre = prepared.pre
    print(f"config ok: {args[0]}")
    print(f"batch: {pre.batch.describe(f'rows of {cfg.data.max_length}' if cfg.data.packing else 'samples')}")
    for split, stats in prepared.plan.scanned.items():
        print(f"data.{split}: the first {stats.records} records scanned, {stats.samples} usable, {stats.bad} skipped"
              + (f", {stats.truncated} truncated" if stats.truncated else ""))
        for line in stats.first_bad:
            print(f"  skipped {line}")
    print(f"steps: {prepared.total_steps}" + (f", resuming at {pre.resume.trainer['step']} from {pre.resume.path}"
                                               if pre.resume else ""))
    print(f"deepspeed: {pre.ds_label} (ZeRO-{pre.zero_stage}, optimizer offload {pre.offload_optimizer})")
    print(json.dumps(pre.resolved_ds(prepared.total_steps), indent=2))
    return 0


def _options(argv: list[str], names: dict[str, int | None]) -> tuple[list[str], dict[str, int | None]]:
    """Split `--name N` / `--name=N` integer options from positional arguments."""
    values = dict(names)
    args = []
    it = iter(argv)
    for arg in it:
        key = arg.split("=", 1)[0]
        if key in values:
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit():
                raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
            values[key] = int(value)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}\n{USAGE}")
        else:
            args.append(arg)
    return args, values


def data_command(argv: list[str]) -> int:
    from bigsft.config import load_config
    from bigsft.data.inspect import inspect
    from bigsft.data.pipeline import plan_data
    from bigsft.model import build_tokenizer

    if not argv or argv[0] != "inspect":
        raise ConfigError(f"usage: bigsft data inspect CONFIG [-n N] [--limit RECORDS]\n{USAGE}")
    args, opts = _options(argv[1:], {"-n": 3, "--limit": None})
    if not args:
        raise ConfigError("data inspect needs a config")
    cfg = load_config(args[0], args[1:])
    tokenizer = build_tokenizer(cfg.model)
    inspect(cfg, plan_data(cfg.data, cfg.model, tokenizer), tokenizer, show=opts["-n"], limit=opts["--limit"])
    return 0


def export_command(argv: list[str]) -> int:
    from bigsft.checkpoint import export_checkpoint

    max_shard_size = "5GB"
    args = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--max-shard-size"):
            max_shard_size = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?i?B", max_shard_size, re.IGNORECASE):
                raise ConfigError(f"--max-shard-size: expected a size like 5GB or 500MB, got {max_shard_size!r}")
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}\n{USAGE}")
        else:
            args.append(arg)
    if len(args) != 2:
        raise ConfigError(f"usage: bigsft export CHECKPOINT_OR_RUN_DIR OUT_DIR [--max-shard-size 5GB]\n{USAGE}")
    out = export_checkpoint(args[0], args[1], max_shard_size=max_shard_size)
    print(f"exported {out}")
    return 0


def plan_command(argv: list[str]) -> int:
    from bigsft.config import load_config
    from bigsft.model import load_hf_config
    from bigsft.plan import hardware_from_args, report

    values: dict[str, str | bool | None] = {"--gpus-per-node": None, "--nodes": None, "--gpu-mem": None,
                                            "--cpu-mem": None, "--gpu-tflops": None, "--write": None, "--nvme": False}
    args = []
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if key == "--nvme":
            values["--nvme"] = True
        elif key in values:
            value = value if eq else next(it, "")
            if key != "--write" and not re.fullmatch(r"\d+(\.\d+)?", value):
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            values[key] = value
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}\n{USAGE}")
        else:
            args.append(arg)
    if not args:
        raise ConfigError("plan needs a config")
    cfg = load_config(args[0], args[1:])
    best = report(cfg, load_hf_config(cfg.model), hardware_from_args(values), write=values["--write"])
    return 0 if best is not None else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from bigsft.train import main as train_main

            return train_main(rest)
        if command == "validate":
            return validate_command(rest)
        if command == "data":
            return data_command(rest)
        if command == "export":
            return export_command(rest)
        if command == "plan":
            return plan_command(rest)
        raise ConfigError(f"unknown command {command!r}\n{USAGE}")
    except ConfigError as e:
        print(f"bigsft: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # bad data found by a scan (DataError) is a user error too, never a traceback
        from bigsft.data.sources import DataError

        if not isinstance(e, DataError):
            raise
        print(f"bigsft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
