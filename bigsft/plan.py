"""`bigsft plan`: what fits where, and which strategy should be fastest, before anything is launched.

All sizes are per rank (GPU) or per node (host), in bytes, from the model's config alone (a meta-device
instance counts the parameters; no weights are read). The formulas, with Ψ parameters (Ψt of them
trainable), N the ranks ZeRO partitions over (every GPU of a pipeline stage, sequence-parallel ranks
included), G GPUs per node, L the largest single module's parameters:

Model states (weights, gradients, optimizer), mixed precision (bf16/fp16):
    ZeRO-0   2Ψ + 2Ψt + 12Ψt                      ZeRO-1   2Ψ + 2Ψt + 12Ψt/N
    ZeRO-2   2Ψ + 18Ψt/N                           (DeepSpeed's estimate_zero2_model_states_mem_needs)
    ZeRO-2 + optimizer offload   GPU 2Ψ, host Ψt·max(4·N, 16)·1.5 per node
    ZeRO-3   4L + (2Ψ + 16Ψt)/N                    (estimate_zero3_model_states_mem_needs, zero_init)
    ZeRO-3 + optimizer offload   GPU 4L + 2Ψ/N, host 16Ψt/nodes·1.5
    ZeRO-3 + parameter offload   GPU 4L, host (2Ψ + 16Ψt)/nodes·1.5; NVMe: the same bytes on the drive
  DeepSpeed's ZeRO-3 estimator counts every parameter as trained (16Ψ and 18Ψ). A frozen parameter
  (LoRA's base) has no fp32 master, Adam moments or fp32 gradient (16 bytes), so the offloaded host
  holds 16Ψt, and under parameter offload also the 2-byte copy of all Ψ, both partitioned over the
  node's ranks; the ZeRO-2 offload row above already counts only Ψt.
  fp32 training swaps the 2-byte weights and gradients for 4-byte ones; DeepSpeed still keeps an fp32
  master copy of each ZeRO partition (so ZeRO-2 is 4Ψ + 16Ψt/N, ZeRO-3 4L + (4Ψ + 16Ψt)/N, parameter
  offload's host (4Ψ + 16Ψt)/nodes·1.5).
  Without offload the host needs 4Ψ·G·1.5 per node to load the model (4L·G·1.5 under ZeRO-3).
  4-bit base (QLoRA): the frozen Linear weights of the blocks, Ψq of them, take NF4's 4 bits plus
  bitsandbytes' constants (one absmax per block of 64 weights, itself quantized to 8 bits under double
  quantization, with one fp32 scale per 256 absmaxes): 0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes, 4.127
  bits. Embeddings, norms, biases and the LM head stay 16-bit: "2Ψ" becomes 2(Ψ - Ψq) + 0.516Ψq.

Activations per micro-batch of b rows of s tokens, hidden h, MLP width i, a heads (a_kv key/value
heads, g = a_kv/a), vocab V, k bytes per activation value (2, or 4 in fp32), per layer:
  gated-MLP decoders (Llama, Qwen2, Mistral: RMSNorm, SwiGLU, no dropout), from the tensors autograd
  saves (counted op by op on CPU in tests/integration/test_plan_measured.py):
    s·b·h·((8 + 2g + 4i/h)·k + 8·[k < 4])   the residuals, both norms' outputs (in 16-bit also their
                                  fp32 inputs), q, k, v, the attention output, gate, up, SiLU, product
    + a·s²·b·(4 + k·[k < 4])      with eager attention (the fp32 softmax and its cast)
  other models (GPT-2, BERT: dropout masks), after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"):
    s·b·h·(15 + 19·i/(4h))·k/2   with sdpa / flash attention (no s² score matrix kept)
    + 5·a·s²·b·k/2               with eager attention
  With gradient checkpointing only each layer's input is kept, 2·s·b·h·k/2 per layer, plus one layer
  recomputed at a time. The loss's backward adds s·b·V·(12 + k·[k < 4]) + V·h·k: the fp32 log-softmax,
  its gradient and the logits' gradient (in 16-bit also that gradient's cast), and the LM head's weight
  gradient (the training step holds no reference to the logits themselves). A masked attention (packed
  rows, or padded rows of a micro-batch > 1) outside flash-attention builds a [b, 1, s, s] boolean mask
  (b·s² bytes), and sdpa keeps a k-byte float copy of it for each layer's backward (b·s²·k; under
  checkpointing, the recomputed layer's). Flash-attention takes packed rows as variable-length
  sequences, with no mask.
  A gated layer's backward adds its working gradients, s·b·(3i + 2h)·k. The peak: every layer's kept
  activations (all of them, or under checkpointing their inputs) and the masks, plus the larger of the
  logits and the last layer's backward (its working gradients; under checkpointing its recomputed
  activations too): the logits are freed before the last layer's backward. A pipeline stage holds its
  layers' activations for min(P, micro-batches) micro-batches.
  Sequence parallelism over S ranks (DeepSpeed Ulysses) leaves s/S tokens on each rank: every term,
  the logits included, takes s/S for s (attention gathers the whole sequence for a/S heads, which
  sdpa/flash keep linear in s; eager attention is refused), so a rank holds 1/S of the above, except
  the attention mask, which each rank builds over the whole gathered sequence.
  Tiled loss: the t = s·b tokens' logits exist one tile at a time, tiles of u = min(t, model.tile_tokens)
  tokens (default 2^26/V, the run's own: one tile's fp32 logits at most 256 MiB); the logits term becomes
  u·V·(12 + k·[k < 4]) + V·h·k + 2·t·h·k: a tile recomputed in backward holds what the whole loss held,
  for u tokens, and the selected hidden states and their gradient, filled tile by tile, are whole.
  Activation offload (with checkpointing): the checkpointed inputs, 2·s·b·h·k/2 per layer, go to host
  memory, one layer's stays on the GPU; the host holds them for each of the node's G ranks.

Communication per rank per optimizer step (ring algorithms, m micro-batches, w bytes per weight):
    ZeRO-0/1   2(N-1)/N·Ψt·w                 ZeRO-2   m·(N-1)/N·Ψt·w + (N-1)/N·Ψt·w
    ZeRO-3     m·3(N-1)/N·Ψ·w                pipeline 2·b·s·h·k per micro-batch and stage boundary
  offload adds host<->GPU copies (gradients down, weights up; under parameter offload, weights every
  micro-batch); activation offload copies its bytes down in forward and up in backward (2× per
  micro-batch). Sequence parallelism adds, per micro-batch and layer, four all-to-alls in forward (q,
  k, v in, the attention output back), each moving (S-1)/S of the rank's tensor:
    (S-1)/S · s/S·b·k · d·(2a + 2·max(a_kv, S))      d = h/a the head size, a_kv key/value heads
  (k and v are repeated to S heads when a_kv < S); backward moves as much again, checkpointing's
  recompute the forward's once more. It runs at the intra-node bandwidth when S ≤ G.

The time estimate (used only to rank strategies) is compute at `--mfu` of `--gpu-tflops` (6Ψ FLOPs
per token, 4Ψ+2Ψt with LoRA, +1/3 with checkpointing, ×1.25 with a 4-bit base for dequantizing every
weight on every pass (a rough figure), the pipeline bubble (P-1)/(m+P-1) added; a rank computes s/S of
each row; the tiled loss recomputes each tile's head in backward, 2·h·V FLOPs per token more) plus communication at `--intra-node-gbps` / `--inter-node-gbps`, PCIe copies at
`--pcie-gbps`, the host optimizer step at 10 GB/s of state and NVMe at 3 GB/s. A strategy fits when
GPU and host totals stay under (1 - margin) of what is there.

Levers. Strategies are ZeRO stages, offload, pipeline splits, and sequence-parallel sizes S (S
divides a and the GPUs, a_kv divides S or S divides a_kv; never with a pipeline; the data-parallel
ranks are then GPUs/S, each step still b·m·s·GPUs/S tokens). For each strategy
the planner takes the first lever set under which some micro-batch fits, in this order: none, tiled
loss, activation offload, both, then the same four with a 4-bit base (needs model.lora; ZeRO 0-2).
Exact levers come first: quantization changes the weights the adapters train against. A strategy that
fits under none shows the lever set that comes closest, at its smallest micro-batch. The levers apply
without a pipeline only (the pipeline engine has its own loss and checkpointing), and those the run
config turns on stay on in every row. Of the sequence-parallel strategies only the fastest per S is
shown. When nothing fits, the advice names what would (with that row's numbers), among changes the run
has not made: gradient checkpointing, LoRA, a shorter sequence, more nodes, NVMe, more GPU or host memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bigsft.batch_math import BatchMath
from bigsft.config import LoraConfig, RunConfig
from bigsft.model import config_int, model_dims

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 scale per 256 absmaxes
QUANTIZED_SLOWDOWN = 1.25  # rough: bitsandbytes dequantizes each weight before every matmul
LOSS_TILE_BYTES = 2**28  # fp32 logits of one tile of the tiled loss (bigsft.model.loss_tile_tokens' default)


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float
    cpu_mem_gib: float
    nvme: bool = False
    gpu_tflops: float = 312.0
    mfu: float = 0.4
    intra_node_gbps: float = 150.0
    inter_node_gbps: float = 12.5
    pcie_gbps: float = 16.0
    margin: float = 0.1

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    params: int
    trainable: int
    largest_layer: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: as many as `heads`."""
    gated: bool = False
    """A gated MLP (gate_proj: Llama, Qwen2, Mistral), whose layer activations are counted tensor by tensor."""
    quantizable: int = 0
    """Frozen Linear weights outside the embeddings and the LM head: what a 4-bit base packs."""

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads


@dataclass(frozen=True, kw_only=True)
class Strategy:
    zero: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    pipeline: int = 1
    sequence_parallel: int = 1

    @property
    def name(self) -> str:
        parts = [f"ZeRO-{self.zero}"]
        if self.offload_param != "none":
            parts.append(f"params+optimizer on {self.offload_param}")
        elif self.offload_optimizer != "none":
            parts.append(f"optimizer on {self.offload_optimizer}")
        if self.pipeline > 1:
            parts.append(f"pipeline {self.pipeline}")
        if self.sequence_parallel > 1:
            parts.append(f"sequence parallel {self.sequence_parallel}")
        return ", ".join(parts)

    @property
    def ds_config(self) -> str:
        if self.pipeline > 1:
            return "pipeline"
        if self.offload_param == "nvme":
            return "zero3_nvme"
        if self.offload_param == "cpu":
            return "zero3_offload"
        if self.offload_optimizer == "cpu":
            return "zero2_offload" if self.zero == 2 else "zero3"
        return f"zero{self.zero}"


@dataclass(frozen=True, kw_only=True)
class Levers:
    """Memory levers besides the strategy, each a run-config key that the training run reads."""

    tiled_loss: bool = False
    """model.tiled_loss: the loss over tiles of the sequence, so the logits never exist whole."""
    activation_offload: bool = False
    """model.activation_offload: the checkpointed layer inputs wait in host memory (needs checkpointing)."""
    quantized: bool = False
    """model.quantization.bits=4: the frozen base in 4-bit NF4 (QLoRA; needs model.lora, ZeRO 0-2)."""

    def __or__(self, other: Levers) -> Levers:
        return Levers(tiled_loss=self.tiled_loss or other.tiled_loss, quantized=self.quantized or other.quantized,
                      activation_offload=self.activation_offload or other.activation_offload)

    @property
    def names(self) -> list[str]:
        return [name for on, name in ((self.quantized, "4-bit base"), (self.tiled_loss, "tiled loss"),
                                      (self.activation_offload, "activation offload")) if on]

    @property
    def overrides(self) -> list[str]:
        return [key for on, key in ((self.quantized, "model.quantization.bits=4"),
                                    (self.tiled_loss, "model.tiled_loss=true"),
                                    (self.activation_offload, "model.activation_offload=true")) if on]


NO_LEVERS = Levers()
# The order in which the planner tries levers on a strategy: exact ones first, quantization last.
LEVER_ORDER = tuple(Levers(quantized=q, tiled_loss=t, activation_offload=a)
                    for q in (False, True) for t, a in ((False, False), (True, False), (False, True), (True, True)))


def configured_levers(cfg: RunConfig) -> tuple[Levers, int]:
    """(levers, sequence-parallel size) that the run config itself turns on."""
    model = cfg.model
    return (Levers(tiled_loss=model.tiled_loss, quantized=model.quantization is not None,
                   activation_offload=model.activation_offload), cfg.sequence_parallel.size)


@dataclass
class Estimate:
    strategy: Strategy
    micro_batch: int
    accumulation: int
    gpu_states: float
    gpu_activations: float
    host: float
    nvme: float
    comm: float
    step_seconds: float
    tokens_per_step: int
    fits: bool
    why: list[str] = field(default_factory=list)
    levers: Levers = field(default_factory=Levers)

    @property
    def gpu_total(self) -> float:
        return self.gpu_states + self.gpu_activations


def model_shape(hf_config, task: str, lora=None) -> ModelShape:
    """Parameter counts from a meta-device instance (tied weights once), and the layer dimensions."""
    import torch

    from bigsft.model import apply_lora, auto_class

    with torch.device("meta"):
        model = auto_class(task).from_config(hf_config)
        lm_head = model.get_output_embeddings()
        if lora is not None:
            model = apply_lora(model, lora, task)
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = {id(p) for p in lm_head.parameters()} if lm_head is not None else set()
    frozen_linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                     and not m.weight.requires_grad and id(m.weight) not in head}

    layers, hidden = model_dims(hf_config)
    heads = config_int(hf_config, "num_attention_heads", "n_head")
    return ModelShape(params=params, trainable=trainable, largest_layer=largest, layers=layers, hidden=hidden,
                      intermediate=config_int(hf_config, "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim",
                                              default=4 * hidden) or 4 * hidden,
                      heads=heads, kv_heads=config_int(hf_config, "num_key_value_heads", default=heads) or None,
                      vocab=config_int(hf_config, "vocab_size"), quantizable=sum(frozen_linear.values()),
                      gated=any(name.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj")
                                for name, _ in model.named_modules()))


def model_states(shape: ModelShape, s: Strategy, *, dtype: str, hw: Hardware,
                 quantized: bool = False) -> tuple[float, float, float]:
    """(GPU bytes per rank, host bytes per node, NVMe bytes per node) for weights, gradients, optimizer."""
    psi, pt, big = shape.params / s.pipeline, shape.trainable / s.pipeline, shape.largest_layer
    n = hw.gpus // s.pipeline
    w = 2 if dtype in ("bf16", "fp16") else 4
    g = w
    opt = 12  # fp32 master copy + Adam's two moments
    weights = w * (psi - shape.quantizable) + NF4_BYTES * shape.quantizable if quantized else w * psi
    load = 4 * psi * hw.gpus_per_node * 1.5  # every process reads the checkpoint once
    if s.zero == 0:
        master = 4 if w == 2 else 0  # fp32 training updates the weights themselves
        return weights + g * pt + (master + 8) * pt, load, 0.0
    if s.zero == 1:
        return weights + g * pt + opt * pt / n, load, 0.0
    if s.zero == 2:
        if s.offload_optimizer != "none":
            return weights, pt * max(4 * n, 16) * 1.5, 0.0
        grads = (g + 4) if w == 2 else g  # a 16-bit and an fp32 gradient partition in mixed precision
        return weights + (grads + opt) * pt / n, load, 0.0
    gather = 4 * big  # one layer gathered at a time
    shard = 1 / hw.nodes
    optimizer = 16 * pt  # fp32 master, Adam's moments and the fp32 gradient, of the trainable parameters only
    if s.offload_param != "none":
        states = (w * psi + optimizer) * shard * 1.5
        if s.offload_param == "nvme":
            return gather, gather * hw.gpus_per_node * 1.5, states
        return gather, states, 0.0
    if s.offload_optimizer != "none":
        return gather + w * psi / n, optimizer * shard * 1.5, 0.0
    return gather + (w * psi + optimizer) / n, big * 4 * hw.gpus_per_node * 1.5, 0.0


def checkpointed_inputs(shape: ModelShape, *, micro_batch: int, seq: int, dtype: str, sequence_parallel: int = 1,
                        pipeline: int = 1) -> float:
    """What gradient checkpointing keeps: each layer's input, 2·s·b·h·k/2 per layer (s/S tokens per rank)."""
    k = 2 if dtype in ("bf16", "fp16") else 4
    return 2 * math.ceil(seq / sequence_parallel) * micro_batch * shape.hidden * k / 2 * math.ceil(
        shape.layers / pipeline)


def logits(shape: ModelShape, *, tokens: int, k: int, tiled: bool, tile_tokens: int | None = None) -> float:
    """The loss's backward: the fp32 log-softmax, its gradient and the logits' (in 16-bit also their cast) and
    the head's weight gradient; tiled, one recomputed tile's worth and the selected hidden states with their
    gradient."""
    per_logit = 12 + (k if k < 4 else 0)  # the fp32 log-softmax, its gradient and the logits' (+ its 16-bit cast)
    if not tiled:
        return tokens * shape.vocab * per_logit + shape.vocab * shape.hidden * k
    tile = min(tokens, tile_tokens or max(1, LOSS_TILE_BYTES // (4 * shape.vocab)))
    return tile * shape.vocab * per_logit + shape.vocab * shape.hidden * k + 2 * tokens * shape.hidden * k


def layer_activations(shape: ModelShape, *, tokens: int, micro_batch: int, k: int, attention: str) -> float:
    """What one layer keeps for its backward, `tokens` per row (the module docstring's formulas)."""
    sbh = tokens * micro_batch * shape.hidden
    scores = shape.heads * tokens * tokens * micro_batch
    if shape.gated:
        g, r = shape.key_value_heads / shape.heads, shape.intermediate / shape.hidden
        layer = sbh * ((8 + 2 * g + 4 * r) * k + (8 if k < 4 else 0))
        return layer + (scores * (4 + (k if k < 4 else 0)) if attention == "eager" else 0)
    layer = sbh * (15 + 19 * shape.intermediate / (4 * shape.hidden)) * k / 2
    return layer + (5 * scores * k / 2 if attention == "eager" else 0)


def mask_bytes(*, micro_batch: int, seq: int, k: int, attention: str) -> tuple[float, float]:
    """A masked attention's (boolean [b, 1, s, s] mask, one float copy of it that sdpa keeps for a layer's
    backward); none with flash-attention."""
    if attention == "flash_attention_2":
        return 0.0, 0.0
    return micro_batch * seq * seq, micro_batch * seq * seq * k


def activations(shape: ModelShape, *, micro_batch: int, seq: int, dtype: str, checkpointing: bool,
                attention: str, pipeline: int, accumulation: int, sequence_parallel: int = 1,
                levers: Levers = NO_LEVERS, masked: bool = False, tile_tokens: int | None = None) -> float:
    """Activation bytes at a rank's peak. `masked`: rows carry an attention mask (packing, or padding of a
    micro-batch > 1); `tile_tokens`: model.tile_tokens of a tiled loss (None: its default).

    The peak: what every layer keeps (all its activations, or under checkpointing its input) and the masks,
    plus the larger of the loss's backward and the last layer's (its working gradients; under checkpointing
    its recomputed activations too), since the logits are freed before the last layer's backward."""
    k = 2 if dtype in ("bf16", "fp16") else 4
    local = math.ceil(seq / sequence_parallel)
    layer = layer_activations(shape, tokens=local, micro_batch=micro_batch, k=k, attention=attention)
    layers = math.ceil(shape.layers / pipeline)
    mask, float_mask = mask_bytes(micro_batch=micro_batch, seq=seq, k=k, attention=attention) if masked else (0, 0)
    loss = logits(shape, tokens=local * micro_batch, k=k, tiled=levers.tiled_loss, tile_tokens=tile_tokens)
    in_flight = min(pipeline, accumulation) if pipeline > 1 else 1
    # a gated layer's backward holds the gradients of its MLP's three i-wide tensors and two of the hidden states
    working = local * micro_batch * (3 * shape.intermediate + 2 * shape.hidden) * k if shape.gated else 0
    if not checkpointing:
        return (layer + float_mask) * layers * in_flight + mask + max(loss, working)
    inputs = checkpointed_inputs(shape, micro_batch=micro_batch, seq=seq, dtype=dtype,
                                 sequence_parallel=sequence_parallel, pipeline=pipeline)
    kept = inputs / layers if levers.activation_offload else inputs
    return kept * in_flight + mask + max(loss, layer + float_mask + working)


def communication(shape: ModelShape, s: Strategy, *, dtype: str, hw: Hardware, accumulation: int, micro_batch: int,
                  seq: int, checkpointing: bool = False) -> tuple[float, float, float]:
    """(network bytes per rank per step for ZeRO and the pipeline, sequence parallelism's all-to-all bytes,
    PCIe bytes per rank per step)."""
    w = 2 if dtype in ("bf16", "fp16") else 4
    n = hw.gpus // s.pipeline
    psi, pt = shape.params / s.pipeline, shape.trainable / s.pipeline
    ring = (n - 1) / n if n > 1 else 0.0
    if s.zero <= 1:
        net = 2 * ring * pt * w
    elif s.zero == 2:
        net = accumulation * ring * pt * w + ring * pt * w
    else:
        net = accumulation * 3 * ring * psi * w
    if s.pipeline > 1:
        net += 2 * micro_batch * seq * shape.hidden * w * accumulation
    all_to_all = 0.0
    if (sp := s.sequence_parallel) > 1:
        head = shape.hidden / shape.heads
        per_layer = (sp - 1) / sp * math.ceil(seq / sp) * micro_batch * w * head * (
            2 * shape.heads + 2 * max(shape.key_value_heads, sp))
        all_to_all = accumulation * shape.layers * (3 if checkpointing else 2) * per_layer
    pcie = 0.0
    if s.offload_optimizer != "none":
        pcie += pt * (w + w)  # gradients down, updated weights up
    if s.offload_param != "none":
        pcie += accumulation * 2 * psi * w / n  # each rank's weights come up for forward and backward
    return net, all_to_all, pcie


def step_seconds(shape: ModelShape, s: Strategy, *, hw: Hardware, tokens_per_rank: int, checkpointing: bool,
                 net: float, pcie: float, accumulation: int, all_to_all: float = 0.0, dtype: str = "bf16",
                 quantized: bool = False, tiled_loss: bool = False) -> float:
    flops_per_token = 6 * shape.params if shape.trainable == shape.params else 4 * shape.params + 2 * shape.trainable
    if tiled_loss:  # each tile's head again in backward
        flops_per_token += 2 * shape.hidden * shape.vocab
    compute = flops_per_token / s.pipeline * tokens_per_rank / (hw.gpu_tflops * 1e12 * hw.mfu)
    if checkpointing:
        compute *= 4 / 3
    if quantized:
        compute *= QUANTIZED_SLOWDOWN
    if s.pipeline > 1:
        compute *= 1 + (s.pipeline - 1) / (accumulation + s.pipeline - 1)
    bandwidth = hw.inter_node_gbps if hw.nodes > 1 else hw.intra_node_gbps
    sp_bandwidth = hw.intra_node_gbps if s.sequence_parallel <= hw.gpus_per_node else hw.inter_node_gbps
    seconds = (compute + net / (bandwidth * 1e9) + all_to_all / (sp_bandwidth * 1e9)
               + pcie / (hw.pcie_gbps * 1e9))
    if s.offload_optimizer != "none":
        seconds += shape.trainable / s.pipeline / (hw.gpus // s.pipeline) * 16 / 10e9  # host Adam over its states
    if s.offload_param == "nvme":
        w = 2 if dtype in ("bf16", "fp16") else 4
        seconds += (w * shape.params + 16 * shape.trainable) / hw.nodes / 3e9
    return seconds


def sequence_parallel_sizes(shape: ModelShape, hw: Hardware, *, task: str, attention: str) -> list[int]:
    """Ulysses sizes S: S divides the heads and the GPUs, the key/value heads divide S or S divides them;
    causal LMs without eager attention (its s² scores would not shard)."""
    if task != "causal_lm" or attention == "eager" or not shape.heads:
        return []
    kv = shape.key_value_heads
    return [sp for sp in range(2, min(hw.gpus, shape.heads) + 1)
            if not shape.heads % sp and not hw.gpus % sp and (not kv % sp or not sp % kv)]


def strategies(shape: ModelShape, hw: Hardware, *, task: str = "causal_lm",
               attention: str = "sdpa") -> list[Strategy]:
    base = [Strategy(zero=z) for z in (0, 1, 2, 3)]
    base += [Strategy(zero=2, offload_optimizer="cpu"), Strategy(zero=3, offload_optimizer="cpu"),
             Strategy(zero=3, offload_optimizer="cpu", offload_param="cpu")]
    if hw.nvme:
        base.append(Strategy(zero=3, offload_optimizer="nvme", offload_param="nvme"))
    out = list(base)
    for p in range(2, min(hw.gpus, shape.layers) + 1):
        if shape.layers % p == 0 and hw.gpus % p == 0:
            out.append(Strategy(zero=1, pipeline=p))
    for sp in sequence_parallel_sizes(shape, hw, task=task, attention=attention):
        out += [replace(s, sequence_parallel=sp) for s in base]
    return out


def allowed(s: Strategy, levers: Levers, *, cfg: RunConfig, shape: ModelShape) -> bool:
    """Whether the run can use these levers under this strategy."""
    if s.pipeline > 1:
        return levers == NO_LEVERS  # the pipeline engine has its own loss and activation checkpointing
    if levers.tiled_loss and cfg.model.task != "causal_lm":
        return False
    if levers.activation_offload and not cfg.model.gradient_checkpointing:
        return False
    return not levers.quantized or (cfg.model.lora is not None and s.zero <= 2 and shape.quantizable > 0)


def overshoot(e: Estimate, hw: Hardware) -> float:
    """How far over the larger of GPU and host memory an estimate is (at most 1: it fits)."""
    usable = GIB * (1 - hw.margin)
    return max(e.gpu_total / (hw.gpu_mem_gib * usable), e.host / (hw.cpu_mem_gib * usable))


def ranking(e: Estimate) -> tuple[bool, float]:
    return not e.fits, e.step_seconds / max(e.tokens_per_step, 1)


def plan(cfg: RunConfig, hf_config, hw: Hardware, *, levers: Sequence[Levers] = LEVER_ORDER,
         micro_batches=MICRO_BATCHES) -> list[Estimate]:
    """`plan_shape` for the model of `hf_config` (counted on the meta device)."""
    shape = model_shape(hf_config, cfg.model.task, cfg.model.lora)
    return plan_shape(shape, cfg, hw, levers=levers, micro_batches=micro_batches)


def plan_shape(shape: ModelShape, cfg: RunConfig, hw: Hardware, *, levers: Sequence[Levers] = LEVER_ORDER,
               micro_batches=MICRO_BATCHES) -> list[Estimate]:
    """One row per strategy, fastest first (of the sequence-parallel ones, the fastest per size): the first of
    `levers` under which it fits, at the largest micro-batch that fits; else the lever set that comes closest,
    at the smallest micro-batch, marked not fitting. The run config's own levers are on in every row;
    `levers=[NO_LEVERS]` plans with those alone."""
    in_use, _ = configured_levers(cfg)
    choices = list(dict.fromkeys(lv | in_use for lv in levers))
    t = cfg.train
    target = t.global_batch_size or t.micro_batch_size * (t.gradient_accumulation_steps or 1) * hw.gpus
    rows = []
    for s in strategies(shape, hw, task=cfg.model.task, attention=cfg.model.attn_implementation or "sdpa"):
        usable = [lv for lv in choices if allowed(s, lv, cfg=cfg, shape=shape)]
        row = strategy_row(shape, s, cfg=cfg, hw=hw, target=target, levers=usable, micro_batches=micro_batches)
        if row is not None:
            rows.append(row)
    shown = [e for e in rows if e.strategy.sequence_parallel == 1]
    for sp in sorted({e.strategy.sequence_parallel for e in rows} - {1}):
        shown.append(min((e for e in rows if e.strategy.sequence_parallel == sp), key=ranking))
    return sorted(shown, key=ranking)


def strategy_row(shape: ModelShape, s: Strategy, *, cfg: RunConfig, hw: Hardware, target: int,
                 levers: Sequence[Levers], micro_batches: Sequence[int]) -> Estimate | None:
    """One strategy's row; None when no micro-batch divides the global batch or no lever set is allowed."""
    dp = hw.gpus // (s.pipeline * s.sequence_parallel)
    batches = [BatchMath(micro_batch_size=b, gradient_accumulation_steps=target // (b * dp), data_parallel_size=dp,
                         pipeline_stages=s.pipeline) for b in micro_batches if not target % (b * dp)]
    closest = None
    for lv in levers if batches else ():
        rows = [estimate(shape, s, cfg=cfg, hw=hw, batch=batch, seq=cfg.data.max_length, levers=lv)
                for batch in batches]
        fitting = [e for e in rows if e.fits]
        if fitting:
            return fitting[-1]
        if closest is None or overshoot(rows[0], hw) < overshoot(closest, hw):
            closest = rows[0]
    return closest


def estimate(shape: ModelShape, s: Strategy, *, cfg: RunConfig, hw: Hardware, batch: BatchMath, seq: int,
             levers: Levers = NO_LEVERS) -> Estimate:
    micro_batch, accumulation = batch.micro_batch_size, batch.gradient_accumulation_steps
    dtype, checkpointing, sp = cfg.model.dtype, cfg.model.gradient_checkpointing, s.sequence_parallel
    gpu_states, host, nvme = model_states(shape, s, dtype=dtype, hw=hw, quantized=levers.quantized)
    acts = activations(shape, micro_batch=micro_batch, seq=seq, dtype=dtype, checkpointing=checkpointing,
                       attention=cfg.model.attn_implementation or "sdpa", pipeline=s.pipeline,
                       accumulation=accumulation, sequence_parallel=sp, levers=levers,
                       masked=cfg.data.packing or micro_batch > 1, tile_tokens=cfg.model.tile_tokens)
    net, all_to_all, pcie = communication(shape, s, dtype=dtype, hw=hw, accumulation=accumulation,
                                          micro_batch=micro_batch, seq=seq, checkpointing=checkpointing)
    if levers.activation_offload:
        offloaded = checkpointed_inputs(shape, micro_batch=micro_batch, seq=seq, dtype=dtype, sequence_parallel=sp)
        host += offloaded * hw.gpus_per_node
        pcie += accumulation * 2 * offloaded  # down in forward, up in backward
    tokens = micro_batch * accumulation * seq
    seconds = step_seconds(shape, s, hw=hw, tokens_per_rank=micro_batch * accumulation * math.ceil(seq / sp),
                           checkpointing=checkpointing, net=net, pcie=pcie, accumulation=accumulation,
                           all_to_all=all_to_all, dtype=dtype, quantized=levers.quantized,
                           tiled_loss=levers.tiled_loss)
    why = []
    if gpu_states + acts > hw.gpu_mem_gib * GIB * (1 - hw.margin):
        why.append("GPU memory")
    if host > hw.cpu_mem_gib * GIB * (1 - hw.margin):
        why.append("host memory")
    return Estimate(strategy=s, micro_batch=micro_batch, accumulation=accumulation, gpu_states=gpu_states,
                    gpu_activations=acts, host=host, nvme=nvme, comm=net + all_to_all + pcie, step_seconds=seconds,
                    tokens_per_step=tokens * batch.data_parallel_size, fits=not why, why=why, levers=levers)


def write_ds_config(best: Estimate, path: Path) -> None:
    from bigsft.ds_config import find_ds_config

    raw = json.loads(find_ds_config(best.strategy.ds_config).read_text())
    if best.strategy.zero == 3 and best.strategy.offload_optimizer == "cpu" and best.strategy.offload_param == "none":
        raw["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=2) + "\n")


def overrides(best: Estimate, ds_path: str, *, configured_sequence_parallel: int = 1) -> list[str]:
    out = [f"deepspeed={ds_path}", f"train.micro_batch_size={best.micro_batch}",
           f"train.gradient_accumulation_steps={best.accumulation}"]
    if best.strategy.pipeline > 1:
        out.append(f"pipeline.stages={best.strategy.pipeline}")
    if best.strategy.sequence_parallel != configured_sequence_parallel:
        out.append(f"sequence_parallel.size={best.strategy.sequence_parallel}")
    return out + best.levers.overrides


def gib(x: float) -> str:
    return f"{x / GIB:,.1f}" if x >= 0.05 * GIB else f"{x / 2**20:,.1f} MiB"


def describe(e: Estimate, in_use: Levers) -> str:
    """A row in words, naming only the levers the run does not use yet, as the keys that turn them on."""
    extra = [key for key in e.levers.overrides if key not in in_use.overrides]
    return (f"{e.strategy.name}, micro batch {e.micro_batch}{' with ' + ' '.join(extra) if extra else ''}: "
            f"{gib(e.gpu_total)} GiB per GPU, {gib(e.host)} GiB host per node")


def nothing_fits(shape: ModelShape, cfg: RunConfig, hf_config, hw: Hardware, results: list[Estimate]) -> str:
    """The closest row, and what would make a row fit with that row's numbers. Names only what the run does
    not use yet; the planner's own levers were tried in every row, so the advice is about the model, the
    data and the hardware."""
    if not results:
        return (f"no micro-batch size in {MICRO_BATCHES} divides train.global_batch_size over the data-parallel "
                "ranks; set train.global_batch_size to a multiple of the GPU count")
    in_use, _ = configured_levers(cfg)
    closest = min(results, key=lambda e: overshoot(e, hw))
    usable = 1 - hw.margin
    message = (f"the closest is {describe(closest, in_use)} ({hw.gpu_mem_gib * usable:.1f} and "
               f"{hw.cpu_mem_gib * usable:.1f} usable)")
    changes = fitting_changes(shape, cfg, hf_config, hw, results)
    fixes = [f"{change} gives {describe(row, in_use)}" for change, row in changes]
    if not fixes:
        return message + "; no change of the model, the sequence length or up to 16× the nodes fits either"
    return message + ". What fits: " + "; ".join(fixes)


def fitting_changes(shape: ModelShape, cfg: RunConfig, hf_config, hw: Hardware,
                    results: list[Estimate]) -> list[tuple[str, Estimate]]:
    """(change, the fastest row that fits with it), for changes the run has not made yet. Each group is tried
    in order and gives its first change that fits: the mildest shorter sequence, the fewest nodes."""
    model, usable = cfg.model, GIB * (1 - hw.margin)
    groups: list[list[tuple[str, ModelShape, RunConfig, Hardware]]] = []
    if not model.gradient_checkpointing:
        groups.append([("model.gradient_checkpointing=true", shape,
                        replace(cfg, model=replace(model, gradient_checkpointing=True)), hw)])
    if model.lora is None:
        lora = LoraConfig(r=16)
        groups.append([(f"model.lora.r={lora.r}", model_shape(hf_config, model.task, lora),
                        replace(cfg, model=replace(model, lora=lora)), hw)])
    lengths = [cfg.data.max_length >> i for i in range(1, 12) if cfg.data.max_length >> i >= 128]
    groups.append([(f"data.max_length={n}", shape, replace(cfg, data=replace(cfg.data, max_length=n)), hw)
                   for n in lengths])
    groups.append([(f"--nodes {k * hw.nodes}", shape, cfg, replace(hw, nodes=k * hw.nodes)) for k in (2, 4, 8, 16)])
    if not hw.nvme:
        groups.append([("--nvme", shape, cfg, replace(hw, nvme=True))])
    if needed := [e.gpu_total for e in results if e.host <= hw.cpu_mem_gib * usable]:
        gpu_mem = math.ceil(min(needed) / usable)
        groups.append([(f"--gpu-mem {gpu_mem}", shape, cfg, replace(hw, gpu_mem_gib=gpu_mem))])
    if needed := [e.host for e in results if e.gpu_total <= hw.gpu_mem_gib * usable]:
        cpu_mem = math.ceil(min(needed) / usable)
        groups.append([(f"--cpu-mem {cpu_mem}", shape, cfg, replace(hw, cpu_mem_gib=cpu_mem))])
    found = []
    for group in groups:
        for change, *variant in group:
            if row := next((e for e in plan_shape(*variant) if e.fits), None):
                found.append((change, row))
                break
    return found


def levers_in_use(cfg: RunConfig) -> list[str]:
    in_use, sequence_parallel = configured_levers(cfg)
    return ((["gradient checkpointing"] if cfg.model.gradient_checkpointing else [])
            + ([f"LoRA r{cfg.model.lora.r}"] if cfg.model.lora is not None else []) + in_use.names
            + ([f"sequence parallel {sequence_parallel}"] if sequence_parallel > 1 else []))


def report(cfg: RunConfig, hf_config, hw: Hardware, *, write: str | None = None, console=None) -> Estimate | None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    shape = model_shape(hf_config, cfg.model.task, cfg.model.lora)
    results = plan_shape(shape, cfg, hw)
    console.print(f"{shape.params / 1e9:.3f}B parameters ({shape.trainable / 1e9:.3f}B trainable), "
                  f"{cfg.model.dtype}, sequence {cfg.data.max_length}, levers in use: "
                  f"{', '.join(levers_in_use(cfg)) or 'none'}; {hw.nodes} node(s) × {hw.gpus_per_node} GPU(s) of "
                  f"{hw.gpu_mem_gib:g} GiB, host {hw.cpu_mem_gib:g} GiB per node; sizes in GiB")
    table = Table(show_lines=False)
    for col in ("strategy", "levers", "micro", "accum", "GPU states", "GPU activ.", "GPU total", "host/node",
                "comm/step", "est. s/step", "fits"):
        table.add_column(col, justify="left" if col in ("strategy", "levers", "fits") else "right")
    for e in results:
        table.add_row(e.strategy.name, ", ".join(e.levers.names) or "-", str(e.micro_batch), str(e.accumulation),
                      gib(e.gpu_states), gib(e.gpu_activations), gib(e.gpu_total), gib(e.host), gib(e.comm),
                      f"{e.step_seconds:.2f}", "yes" if e.fits else "no: " + ", ".join(e.why))
    console.print(table)
    best = next((e for e in results if e.fits), None)
    if best is None:
        console.print("[red]nothing fits[/]: " + nothing_fits(shape, cfg, hf_config, hw, results))
        return None
    path = write or "ds_configs/planned.json"
    if write:
        write_ds_config(best, Path(write))
    levers = f" with {', '.join(best.levers.names)}" if best.levers.names else ""
    console.print(f"recommended: [bold]{best.strategy.name}{levers}[/], micro batch {best.micro_batch} × "
                  f"accumulation {best.accumulation} ({best.tokens_per_step:,} tokens per step, est. "
                  f"{best.step_seconds:.2f} s; {gib(best.gpu_total)} GiB per GPU, {gib(best.host)} GiB host per node)")
    keys = overrides(best, path, configured_sequence_parallel=configured_levers(cfg)[1])
    console.print("run with: " + " ".join(keys) + ("" if write else f"   (--write {path} writes the DeepSpeed JSON)"))
    qlora = qlora_alternative(shape, cfg, hw, best)
    if qlora is not None:
        console.print(f"with less GPU memory: [bold]QLoRA[/], {qlora.strategy.name} with "
                      f"{', '.join(qlora.levers.names)}, micro batch {qlora.micro_batch} × accumulation "
                      f"{qlora.accumulation} ({gib(qlora.gpu_total)} GiB per GPU against {gib(best.gpu_total)}, est. "
                      f"{qlora.step_seconds:.2f} s): "
                      + " ".join(overrides(qlora, qlora.strategy.ds_config,
                                           configured_sequence_parallel=configured_levers(cfg)[1])))
    return best


def qlora_alternative(shape: ModelShape, cfg: RunConfig, hw: Hardware, best: Estimate) -> Estimate | None:
    """For a LoRA run whose recommendation keeps a 16-bit base: the same run (batch, levers, strategy, or
    ZeRO-2 where the recommendation is ZeRO-3) with a 4-bit base, QLoRA, when it fits. The recommendation
    stays the faster, exact one; this is the margin a tight GPU (fragmentation, other processes) may need."""
    if cfg.model.lora is None or best.levers.quantized:
        return None
    strategy = best.strategy if best.strategy.zero <= 2 else Strategy(zero=2, offload_optimizer=best.strategy.offload_optimizer)
    levers = best.levers | Levers(quantized=True)
    if not allowed(strategy, levers, cfg=cfg, shape=shape):
        return None
    batch = BatchMath(micro_batch_size=best.micro_batch, gradient_accumulation_steps=best.accumulation,
                      data_parallel_size=hw.gpus // (strategy.pipeline * strategy.sequence_parallel))
    qlora = estimate(shape, strategy, cfg=cfg, hw=hw, batch=batch, seq=cfg.data.max_length, levers=levers)
    return qlora if qlora.fits and qlora.gpu_total < best.gpu_total else None
