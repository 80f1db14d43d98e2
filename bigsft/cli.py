"""`bigsft` command line: train, validate."""

from __future__ import annotations

import json
import sys

from bigsft.config import ConfigError

USAGE = """usage: bigsft COMMAND ...

commands:
  train [CONFIG_OR_RECIPE] [key.path=value ...]   train (no argument: the built-in demo)
  validate CONFIG [key.path=value ...] [--world-size N]
                                                  check a config and its DeepSpeed JSON, print the batch math

Multi-process launches use the same entry point:
  deepspeed --num_gpus N --module bigsft.train CONFIG [key.path=value ...]
  torchrun --nproc_per_node N -m bigsft.train CONFIG [key.path=value ...]
  srun python -m bigsft.train CONFIG [key.path=value ...]
"""


def validate_command(argv: list[str]) -> int:
    from bigsft.config import load_config
    from bigsft.dist import read_launch_env
    from bigsft.preflight import preflight

    world_size = None
    args = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--world-size"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size: expected a positive integer, got {value!r}")
            world_size = int(value)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}\n{USAGE}")
        else:
            args.append(arg)
    if not args:
        raise ConfigError(f"validate needs a config\n{USAGE}")
    cfg = load_config(args[0], args[1:])
    env = None
    if world_size is not None:
        env = {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}
    pre = preflight(cfg, read_launch_env(env))
    print(f"config ok: {args[0]}")
    print(f"batch: {pre.batch.describe()}")
    print(f"deepspeed: {pre.ds_label} (ZeRO-{pre.zero_stage}, optimizer offload {pre.offload_optimizer})")
    print(json.dumps(pre.ds, indent=2))
    return 0


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
        raise ConfigError(f"unknown command {command!r}\n{USAGE}")
    except ConfigError as e:
        print(f"bigsft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
