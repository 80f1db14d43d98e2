"""The command line's grammar: one argparse parser per command, `--help` on each.

Shared by `bigsft` (cli.py) and `python -m bigsft.train`, which the launchers start. Options and
`key.path=value` overrides may come in any order; a usage mistake is a ConfigError (exit code 2).
"""

from __future__ import annotations

import argparse
import re

from bigsft.errors import ConfigError

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

    p = parsers["evaluate"] = commands.add_parser(
        "evaluate", help="the eval metrics of a model on the config's data.eval, into output_dir/eval_report.json",
        description="Evaluate MODEL (a final/ or exported directory, a checkpoint, or a pretrained model: the "
                    "untrained baseline) on the config's data.eval with the metrics training logs; the report "
                    "goes to the config's output_dir as eval_report.json. Several ranks: "
                    "torchrun --nproc_per_node N -m bigsft evaluate ...")
    p.add_argument("model", metavar="MODEL")
    _config_and_overrides(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's

    p = parsers["report"] = commands.add_parser(
        "report", help="a run's curves in one self-contained HTML page (no W&B needed)",
        description="Draw a run directory's metrics.jsonl (training and eval curves, the best checkpoint) and "
                    "its latest eval report into one self-contained HTML page with embedded plots, readable "
                    "offline; print its path.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", metavar="PATH", help="where to write the page (default RUN_DIR/report.html)")

    data = commands.add_parser("data", help="data tools: inspect, prepare", description="Data tools.")
    data_commands = data.add_subparsers(metavar="COMMAND", parser_class=ArgumentParser)
    parsers["data"] = data
    p = parsers["data inspect"] = data_commands.add_parser(
        "inspect", help="show processed samples (trained tokens highlighted) and corpus statistics",
        description="Show processed samples, with the trained tokens highlighted, and corpus statistics.")
    _config_and_overrides(p)
    p.add_argument("-n", type=_at_least(0), default=3, help="samples to show (default 3)")
    p.add_argument("--limit", type=_at_least(1), metavar="RECORDS", help="read at most this many records")
    p = parsers["data prepare"] = data_commands.add_parser(
        "prepare", help="tokenize the training files once, into data.cache_dir",
        description="Parse and tokenize every training file on all cores, into a memory-mapped cache in "
                    "data.cache_dir (default: data_cache beside output_dir) that training then reads. Files "
                    "whose entry is fresh are skipped; a changed file, tokenizer, template or setting gets a new one.")
    _config_and_overrides(p)
    p.add_argument("--workers", type=_at_least(1), default=None,
                   help="tokenizing processes (default: every core of this machine)")
    p.add_argument("--epochs", type=_at_least(1), default=None,
                   help="passes over the data the plan covers (default: train.epochs)")
    p.add_argument("--world-size", type=_at_least(1), metavar="N", default=None,
                   help="with train.max_steps: plan max_steps steps of the global batch N ranks make (default: "
                        "WORLD_SIZE, else 1)")
    return parsers


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, its arguments). Options and `key.path=value` overrides may come in any order."""
    parsers = subcommand_parsers()
    if argv[:1] == ["data"] and argv[1:2] in (["inspect"], ["prepare"]):
        command, rest = f"data {argv[1]}", argv[2:]
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
