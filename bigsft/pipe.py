"""Stock Hugging Face decoders as DeepSpeed `PipelineModule`s, loaded stage by stage.

The model becomes a flat list of layers: embedding, every decoder layer, the final norm, the LM head
(for tied embeddings, the embedding again through `TiedLayerSpec`, so both stages update one weight).
Between stages flow (hidden states, position ids); each decoder layer rebuilds the causal mask from the
position ids exactly as transformers does (block-diagonal for packed rows, whose positions restart per
sample) and its rotary embedding, so a pipelined step computes what the unpipelined model computes.
Padded batches travel in the same form: padding becomes a segment of its own, which no real token
attends to.

Every layer is built by the stage that owns it and reads its own tensors from the checkpoint's
safetensors files (sharded or not): no rank ever builds or loads the whole model. Parameter counts
for partitioning come from layers built on the meta device.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bigsft import dist
from bigsft.config import ConfigError
from bigsft.data.batching import Batch
from bigsft.data.tokenize import IGNORE
from bigsft.model import model_dims
from bigsft.optim import SkippingAdamW

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


@dataclass(frozen=True)
class Layout:
    """Where an HF causal LM keeps each piece, by parameter-name prefix."""

    embed: str
    positions: str | None
    layer: str
    norm: str
    head: str
    decoder_class: str
    norm_class: str | None
    rotary_class: str | None


LAYOUTS = {
    "llama": Layout("model.embed_tokens", None, "model.layers.{i}", "model.norm", "lm_head", "LlamaDecoderLayer",
                    "LlamaRMSNorm", "LlamaRotaryEmbedding"),
    "mistral": Layout("model.embed_tokens", None, "model.layers.{i}", "model.norm", "lm_head", "MistralDecoderLayer",
                      "MistralRMSNorm", "MistralRotaryEmbedding"),
    "qwen2": Layout("model.embed_tokens", None, "model.layers.{i}", "model.norm", "lm_head", "Qwen2DecoderLayer",
                    "Qwen2RMSNorm", "Qwen2RotaryEmbedding"),
    "gpt2": Layout("transformer.wte", "transformer.wpe", "transformer.h.{i}", "transformer.ln_f", "lm_head",
                   "GPT2Block", None, None),
}


def pipeline_problems(hf_config, *, stages: int, task: str, from_config: bool, model_dir: str | None,
                      gradient_checkpointing: bool, partition: str) -> list[str]:
    """Why this model cannot be pipelined into `stages` (empty: it can)."""
    if stages <= 1:
        return []
    problems = []
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED:
        problems.append(f"pipeline.stages > 1: architecture {model_type!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED)}")
    if task != "causal_lm":
        problems.append(f"pipeline.stages > 1 trains causal LMs only; set pipeline.stages=1 for {task}")
    if from_config:
        problems.append("pipeline.stages > 1 loads weights stage by stage from model.name_or_path; save a "
                        "random-init model with save_pretrained and point model.name_or_path at it")
    elif model_dir is not None and not safetensors_files(Path(model_dir)):
        problems.append(f"pipeline.stages > 1 reads safetensors stage by stage; {model_dir} has none (convert "
                        "it with from_pretrained(...).save_pretrained(dir, safe_serialization=True))")
    if gradient_checkpointing:
        problems.append("model.gradient_checkpointing: under pipeline parallelism use "
                        "pipeline.activation_checkpoint_interval instead")
    layers = model_dims(hf_config)[0]
    if layers and stages > layers:
        problems.append(f"pipeline.stages: {stages} stages for {layers} decoder layers; use at most {layers}")
    if not (partition in ("parameters", "uniform") or partition.startswith("type:")):
        problems.append(f"pipeline.partition: {partition!r}; use parameters, uniform or type:<LayerClass> "
                        "(e.g. type:DecoderLayerPipe)")
    return problems


# --------------------------------------------------------------------------------------------------
# Reading one stage's tensors.


def safetensors_files(model_dir: Path) -> dict[str, list[str]]:
    """file -> the tensor names it holds."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, list[str]] = {}
        for key, name in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(name, []).append(key)
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {"model.safetensors": list(f.keys())}
    return {}


class WeightSource:
    """Tensors of one checkpoint by prefix, read only when asked for."""

    _skip_loading = False

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.files = safetensors_files(self.dir)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for name, keys in self.files.items():
            wanted = [k for k in keys if k.startswith(prefix + ".")]
            if not wanted:
                continue
            with safe_open(self.dir / name, "pt") as f:
                for k in wanted:
                    out[k[len(prefix) + 1 :]] = f.get_tensor(k)
        return out


@contextlib.contextmanager
def counting_only():
    """Layers built inside are on the meta device and read nothing: for parameter counts."""
    WeightSource._skip_loading = True
    try:
        with torch.device("meta"):
            yield
    finally:
        WeightSource._skip_loading = False


def _load(module: nn.Module, source: WeightSource, prefix: str, names: dict[str, str] | None = None) -> None:
    """Fill `module`'s parameters from the checkpoint tensors under `prefix` (`names`: local -> checkpoint)."""
    if WeightSource._skip_loading:
        return
    tensors = source.tensors(prefix)
    state = module.state_dict()
    for local in state:
        key = (names or {}).get(local, local)
        if key not in tensors:
            raise ConfigError(f"{source.dir}: tensor {prefix}.{key} is missing from the checkpoint")
    module.load_state_dict({local: tensors[(names or {}).get(local, local)] for local in state}, strict=True)


# --------------------------------------------------------------------------------------------------
# The layers.


def _modeling(hf_config):
    """transformers' modeling module of this architecture (where its layer classes live)."""
    return importlib.import_module(f"transformers.models.{hf_config.model_type}.modeling_{hf_config.model_type}")


class EmbeddingPipe(nn.Module):
    """Token (and, for GPT-2, learned position) embeddings: (input_ids, position_ids) -> (hidden, position_ids)."""

    def __init__(self, hf_config, source: WeightSource):
        super().__init__()
        layout = LAYOUTS[hf_config.model_type]
        hidden = model_dims(hf_config)[1]
        self.embed = nn.Embedding(hf_config.vocab_size, hidden, getattr(hf_config, "pad_token_id", None)
                                  if layout.positions is None else None)
        self.positions = nn.Embedding(hf_config.n_positions, hidden) if layout.positions else None
        self.drop = nn.Dropout(getattr(hf_config, "embd_pdrop", 0.0))
        _load(self.embed, source, layout.embed)
        if self.positions is not None:
            _load(self.positions, source, layout.positions)

    def forward(self, inputs):
        input_ids, position_ids = inputs
        hidden = self.embed(input_ids)
        if self.positions is not None:
            hidden = self.drop(hidden + self.positions(position_ids))
        return hidden, position_ids


def tied_head(module: EmbeddingPipe, inputs):
    """The LM head of tied models: the embedding matrix, shared with the first stage."""
    hidden, _ = inputs
    return F.linear(hidden, module.embed.weight)


class DecoderLayerPipe(nn.Module):
    """One HF decoder layer, rebuilding its attention mask (and rotary embedding) from the position ids."""

    def __init__(self, hf_config, source: WeightSource, index: int):
        super().__init__()
        modeling = _modeling(hf_config)
        layout = LAYOUTS[hf_config.model_type]
        self.config = hf_config
        self.index = index
        self.layer = getattr(modeling, layout.decoder_class)(hf_config, layer_idx=index)
        # Non-persistent buffers only: nothing of it is saved or loaded.
        self.rotary = getattr(modeling, layout.rotary_class)(config=hf_config) if layout.rotary_class else None
        _load(self.layer, source, layout.layer.format(i=index))
        layer_types = getattr(hf_config, "layer_types", None)
        sliding = (layer_types[index] == "sliding_attention" if layer_types
                   else hf_config.model_type == "mistral" and getattr(hf_config, "sliding_window", None) is not None)
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        self.make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask

    def forward(self, inputs):
        hidden, position_ids = inputs
        mask = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
        if self.rotary is not None:
            out = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                             position_embeddings=self.rotary(hidden, position_ids))
        else:
            out = self.layer(hidden, None, mask, position_ids=position_ids)
        return (out[0] if isinstance(out, tuple) else out), position_ids


class NormPipe(nn.Module):
    def __init__(self, hf_config, source: WeightSource):
        super().__init__()
        modeling = _modeling(hf_config)
        layout = LAYOUTS[hf_config.model_type]
        if layout.norm_class:
            self.norm = getattr(modeling, layout.norm_class)(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        else:
            self.norm = nn.LayerNorm(hf_config.n_embd, eps=hf_config.layer_norm_epsilon)
        _load(self.norm, source, layout.norm)

    def forward(self, inputs):
        hidden, position_ids = inputs
        return self.norm(hidden), position_ids


class HeadPipe(nn.Module):
    def __init__(self, hf_config, source: WeightSource):
        super().__init__()
        hidden = model_dims(hf_config)[1]
        self.head = nn.Linear(hidden, hf_config.vocab_size, bias=False)
        _load(self.head, source, LAYOUTS[hf_config.model_type].head)

    def forward(self, inputs):
        hidden, _ = inputs
        return self.head(hidden)


def is_tied(hf_config) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def hf_name(hf_config, layer_index: int, local_key: str) -> str | None:
    """The HF checkpoint name of a pipeline layer's tensor (None: not saved, e.g. the tied head's copy)."""
    layout = LAYOUTS[hf_config.model_type]
    layers = model_dims(hf_config)[0]
    top, _, rest = local_key.partition(".")
    if layer_index == 0:
        return f"{layout.embed}.{rest}" if top == "embed" else f"{layout.positions}.{rest}"
    if layer_index <= layers:
        return f"{layout.layer.format(i=layer_index - 1)}.{rest}" if top == "layer" else None
    if layer_index == layers + 1:
        return f"{layout.norm}.{rest}"
    if is_tied(hf_config):
        return None
    return f"{layout.head}.{rest}"


class TokenLoss:
    """Sum of cross-entropies on the last stage, times `scale` (set per step: data-parallel size × micro-
    batches / trained tokens of the global batch), so DeepSpeed's averaging yields the token-weighted loss."""

    def __init__(self):
        self.scale = 1.0

    def __call__(self, logits, targets):
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss * self.scale


def build_pipeline(hf_config, model_dir: str, *, stages: int, partition: str, activation_checkpoint_interval: int,
                   attn_implementation: str | None, dtype: torch.dtype):
    """(PipelineModule with this rank's stage built and loaded, its loss function, the weight source)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    hf_config._attn_implementation = attn_implementation or "sdpa"
    source = WeightSource(model_dir)
    layers = model_dims(hf_config)[0]
    tied = is_tied(hf_config)
    specs = [TiedLayerSpec("embed", EmbeddingPipe, hf_config, source, tied_weight_attr=["embed.weight"])
             if tied else LayerSpec(EmbeddingPipe, hf_config, source)]
    specs += [LayerSpec(DecoderLayerPipe, hf_config, source, i) for i in range(layers)]
    specs.append(LayerSpec(NormPipe, hf_config, source))
    specs.append(TiedLayerSpec("embed", EmbeddingPipe, hf_config, source, forward_fn=tied_head,
                               tied_weight_attr=["embed.weight"]) if tied else LayerSpec(HeadPipe, hf_config, source))

    class HFPipelineModule(PipelineModule):
        def _is_checkpointable(self, funcs):
            # Only decoder layers: a chunk starting at the embedding has no input that requires grad.
            return all(isinstance(f, DecoderLayerPipe) for f in funcs)

        def _count_layer_params(self):
            counts = []
            for spec in self._layer_specs:
                with counting_only():
                    built = spec.build()
                counts.append(sum(p.numel() for p in built.parameters() if p.requires_grad))
            return counts

    loss = TokenLoss()
    module = HFPipelineModule(layers=specs, loss_fn=loss, num_stages=stages, partition_method=partition,
                              activation_checkpoint_interval=activation_checkpoint_interval, dynamic_shape=True)
    module.to(dtype)
    module.config = hf_config  # what save paths and the start-up table read
    return module, loss, source


def pipeline_inputs(batch: Batch) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A micro-batch as the pipeline carries it: (input_ids, position_ids), targets. Padding becomes a
    segment of its own (positions restart at 0), which real tokens never attend to."""
    inputs = batch.inputs
    if "position_ids" in inputs:
        return (inputs["input_ids"], inputs["position_ids"]), batch.targets
    mask = inputs["attention_mask"].bool()
    real = mask.long().cumsum(-1) - 1
    pads = (~mask).long().cumsum(-1) - 1
    position_ids = torch.where(mask, real, pads)
    return (inputs["input_ids"], position_ids), batch.targets


class PipelineAdamW(SkippingAdamW):
    """The ZeRO-0 optimizer under pipeline parallelism. DeepSpeed's ZeRO-0 clipping sees one stage's
    gradients only: this one takes the norm over all stages (tied copies once) and clips by it itself."""

    _global_grad_norm = None  # what the engine's get_global_grad_norm() reports

    def __init__(self, params, *, max_grad_norm: float, data_parallel_size: int, **adamw):
        super().__init__(params, **adamw)
        self.max_grad_norm, self.data_parallel_size = max_grad_norm, data_parallel_size

    def check(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
        local = sum(float(p.grad.detach().float().pow(2).sum()) for p in params)
        (total,) = dist.all_reduce_sum([local])  # every replica's stages: each layer dp times
        self._global_grad_norm = math.sqrt(total / self.data_parallel_size)
        if not math.isfinite(self._global_grad_norm):
            return False
        if self.max_grad_norm and self._global_grad_norm > self.max_grad_norm:
            for grad in self.gradients():
                grad.mul_(self.max_grad_norm / (self._global_grad_norm + 1e-6))
        return True


# --------------------------------------------------------------------------------------------------
# Steps, evaluation and export with a PipelineEngine.


def train_step(engine, loss: TokenLoss, window: list[Batch], *, scale: float) -> float:
    """One optimizer step over the window's micro-batches; returns the global token-weighted loss."""
    loss.scale = scale
    return float(engine.train_batch(iter([pipeline_inputs(b) for b in window])))


def eval_sum(engine, loss: TokenLoss, batches: list[Batch], dummy: Batch) -> float:
    """Sum of token losses of this replica's batches, on every stage; `dummy` fills the last window."""
    loss.scale = 1.0
    per_window = engine.micro_batches
    padded = batches + [dummy] * (-len(batches) % per_window)
    total = 0.0
    for i in range(0, len(padded), per_window):
        window = [pipeline_inputs(b) for b in padded[i : i + per_window]]
        # eval_batch averages the loss over the window's micro-batches and broadcasts it to every stage.
        total += float(engine.eval_batch(iter(window), reduce_output="avg")) * per_window
    return total


def local_layers(module):
    """(global layer index, layer module) of this stage; tied heads (a function over the embedding) skipped."""
    for i, layer in enumerate(module.forward_funcs):
        if hasattr(layer, "state_dict"):
            yield module._local_start + i, layer


def write_stage_shard(module, hf_config, out_dir: Path, stage: int, stages: int) -> Path:
    """This stage's tensors under their HF names, as one safetensors shard."""
    from safetensors.torch import save_file

    tensors = {}
    for index, layer in local_layers(module):
        for key, value in layer.state_dict().items():
            name = hf_name(hf_config, index, key)
            if name is not None:
                tensors[name] = value.detach().cpu().contiguous()
    path = out_dir / f"model-{stage + 1:05d}-of-{stages:05d}.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def write_index(out_dir: Path) -> None:
    """model.safetensors.index.json over the shards a directory holds."""
    from safetensors import safe_open

    weight_map = {}
    for shard in sorted(out_dir.glob("model-*-of-*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                weight_map[key] = shard.name
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))


def evaluate_pipeline(engine, loss, sets: list[tuple[str, list[Batch]]], dummy: Batch, bm) -> dict[str, float]:
    """Token-weighted eval loss of each set and of all, through the pipeline; replicas run as many windows
    of a set as the longest."""
    from bigsft.evaluate import Tally, set_metrics

    tallies = []
    for _, batches in sets:
        windows = -(-len(batches) // bm.gradient_accumulation_steps)
        most = dist.all_reduce_max(windows)
        padded = batches + [dummy] * ((most - windows) * bm.gradient_accumulation_steps)
        local_sum = eval_sum(engine, loss, padded, dummy)
        count = sum(b.num_targets for b in batches)
        # Every stage holds its replica's sum: the world sum counts each replica once per stage.
        total, tokens = dist.all_reduce_sum([local_sum / bm.pipeline_stages, count / bm.pipeline_stages])
        tallies.append(Tally(total, round(tokens)))
    metrics = set_metrics([name for name, _ in sets], tallies)
    # The pipeline's last stage computes the loss, not the predictions: no token accuracy.
    return {k: v for k, v in metrics.items() if not k.endswith("token_accuracy")}
