"""`bigsft` command line: train, validate, plan, export, data inspect."""

from __future__ import annotations

import argparse
import json
import re
import sys

from bigsft.errors import EXIT_USER, ConfigError, UserError

LAUNCHES = """Multi-process launches use the same entry point:
  deepspeed --num_gpus N --module bigsft.train CONFIG [key.path=value ...]
  torchrun --nproc_per_node N -m bigsft.train CONFIG [key.path=value ...]
  srun python -m bigsft.train CONFIG [key.path=value ...]
"""
OVERRIDES = "key.path=value settings over the config's (e.g. train.lr=1e-4 deepspeed=zero3)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as a ConfigError: one message and exit code 2, through `main`."""

    def error(self, message: str):
        raise ConfigError(f"{message}\n{self.format_usage().rstrip()}")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    return parse


def _number(text: str) -> float:
    if not re.fullmatch(r"\d+(\.\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return float(text)


def _size(text: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?i?B", text, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {text!r}")
    return text


def _config_and_overrides(parser: ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None, metavar="CONFIG",
                        help="a YAML run config, or a built-in recipe name" + (" (none: the demo)" if optional else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help=OVERRIDES)


def subcommand_parsers() -> dict[str, ArgumentParser]:
    """One parser per command ('data inspect' under its two words); `bigsft --help` lists them."""
    top = ArgumentParser(prog="bigsft", description="Supervised fine-tuning of Hugging Face models under DeepSpeed.",
                         epilog=LAUNCHES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(metavar="COMMAND", parser_class=ArgumentParser)
    parsers = {"": top}

    p = parsers["train"] = commands.add_parser(
        "train", help="train (no config: the built-in demo)", epilog=LAUNCHES,
        formatter_class=argparse.RawDescriptionHelpFormatter, description="Train a model as the config says.")
    _config_and_overrides(p, optional=True)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's

    p = parsers["validate"] = commands.add_parser(
        "validate", help="run every check train runs before it starts, print the batch math and DeepSpeed JSON",
        description="Run every check `bigsft train` runs before it starts (config, DeepSpeed JSON, model, "
                    "tokenizer, data scan, run length, checkpoint to resume) and print the batch math.")
    _config_and_overrides(p)
    p.add_argument("--world-size", type=_at_least(1), metavar="N", help="check for N ranks (default: this launch)")

    p = parsers["plan"] = commands.add_parser(
        "plan", help="memory and speed of every strategy; the fastest that fits",
        description="Estimate memory, communication and step time of every DeepSpeed strategy on the hardware "
                    "given, and name the fastest that fits.")
    _config_and_overrides(p)
    p.add_argument("--gpus-per-node", type=_number, required=True, metavar="G")
    p.add_argument("--nodes", type=_number, required=True, metavar="N")
    p.add_argument("--gpu-mem", type=_number, required=True, metavar="GIB", help="memory of one GPU")
    p.add_argument("--cpu-mem", type=_number, metavar="GIB", help="host memory of one node (default: this one's)")
    p.add_argument("--gpu-tflops", type=_number, metavar="T", help="dense bf16 TFLOP/s of one GPU (default 312)")
    p.add_argument("--nvme", action="store_true", help="the nodes have local NVMe for ZeRO-Infinity")
    p.add_argument("--write", metavar="PATH", help="write the chosen strategy's DeepSpeed JSON there")

    p = parsers["export"] = commands.add_parser(
        "export", help="an HF model directory from a checkpoint of any ZeRO stage, on CPU",
        description="Write an HF model directory (safetensors) from a checkpoint of any ZeRO stage, or from a "
                    "run directory's newest checkpoint, on CPU.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="shard above this size (default 5GB)")

    data = commands.add_parser("data", help="data tools: inspect", description="Data tools.")
    data_commands = data.add_subparsers(metavar="COMMAND", parser_class=ArgumentParser)
    parsers["data"] = data
    p = parsers["data inspect"] = data_commands.add_parser(
        "inspect", help="show processed samples (trained tokens highlighted) and corpus statistics",
        description="Show processed samples, with the trained tokens highlighted, and corpus statistics.")
    _config_and_overrides(p)
    p.add_argument("-n", type=_at_least(0), default=3, help="samples to show (default 3)")
    p.add_argument("--limit", type=_at_least(1), metavar="RECORDS", help="read at most this many records")
    return parsers


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, its arguments). Options and `key.path=value` overrides may come in any order."""
    parsers = subcommand_parsers()
    if argv[:1] == ["data"] and argv[1:2] == ["inspect"]:
        command, rest = "data inspect", argv[2:]
    elif argv[:1] and argv[0] in parsers and argv[0] not in ("", "data"):
        command, rest = argv[0], argv[1:]
    else:  # --help, an unknown command (argparse names the choices), or `data` without its command
        parent = "data" if argv[:1] == ["data"] else ""
        parsers[parent].parse_args(argv[1:] if parent else argv)
        raise ConfigError(f"{parent or 'bigsft'} needs a command\n{parsers[parent].format_usage().rstrip()}")
    args = parsers[command].parse_intermixed_args(rest)
    if command == "train" and args.config and "=" in args.config:  # only overrides: of the demo
        args.overrides, args.config = [args.config, *args.overrides], None
    return command, args


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


def inspect_command(args: argparse.Namespace) -> int:
    from bigsft.config import load_config
    from bigsft.data.inspect import inspect
    from bigsft.data.pipeline import plan_data
    from bigsft.model import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = build_tokenizer(cfg.model)
    inspect(cfg, plan_data(cfg.data, cfg.model, tokenizer), tokenizer, show=args.n, limit=args.limit)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from bigsft.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, max_shard_size=args.max_shard_size)
    print(f"exported {out}")
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


COMMANDS = {"validate": validate_command, "data inspect": inspect_command, "export": export_command,
            "plan": plan_command}


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
