"""`bigsft plan`: what fits where, and which strategy should be fastest, before anything is launched.

All sizes are per rank (GPU) or per node (host), in bytes, from the model's config alone (a meta-device
instance counts the parameters; no weights are read). The formulas, with Ψ parameters (Ψt of them
trainable), N data-parallel ranks, G GPUs per node, L the largest single module's parameters:

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

Activations per micro-batch of b rows of s tokens, hidden h, MLP width i, a heads, vocab V, k bytes
per activation value (2, or 4 in fp32), after Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), per layer:
    s·b·h·(15 + 19·i/(4h))·k/2   with sdpa / flash attention (no s² score matrix kept)
    + 5·a·s²·b·k/2               with eager attention
  with gradient checkpointing only each layer's input is kept, 2·s·b·h·k/2 per layer, plus one layer
  recomputed at a time; the logits add s·b·V·(k + 4)·2 (logits, their fp32 copy for the loss, and their
  gradient). A pipeline stage holds its layers' activations for min(P, micro-batches) micro-batches.

Communication per rank per optimizer step (ring algorithms, m micro-batches, w bytes per weight):
    ZeRO-0/1   2(N-1)/N·Ψt·w                 ZeRO-2   m·(N-1)/N·Ψt·w + (N-1)/N·Ψt·w
    ZeRO-3     m·3(N-1)/N·Ψ·w                pipeline 2·b·s·h·k per micro-batch and stage boundary
  offload adds host<->GPU copies (gradients down, weights up; under parameter offload, weights every
  micro-batch).

The time estimate (used only to rank strategies) is compute at `--mfu` of `--gpu-tflops` (6Ψ FLOPs
per token, 4Ψ+2Ψt with LoRA, +1/3 with checkpointing, the pipeline bubble (P-1)/(m+P-1) added) plus
communication at `--intra-node-gbps` / `--inter-node-gbps`, PCIe copies at `--pcie-gbps`, the host
optimizer step at 10 GB/s of state and NVMe at 3 GB/s. A strategy fits when GPU and host totals stay
under (1 - margin) of what is there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bigsft.batch_math import BatchMath
from bigsft.config import RunConfig
from bigsft.model import config_int, model_dims

GIB = 2**30


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


@dataclass(frozen=True, kw_only=True)
class Strategy:
    zero: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    pipeline: int = 1

    @property
    def name(self) -> str:
        parts = [f"ZeRO-{self.zero}"]
        if self.offload_param != "none":
            parts.append(f"params+optimizer on {self.offload_param}")
        elif self.offload_optimizer != "none":
            parts.append(f"optimizer on {self.offload_optimizer}")
        if self.pipeline > 1:
            parts.append(f"pipeline {self.pipeline}")
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

    @property
    def gpu_total(self) -> float:
        return self.gpu_states + self.gpu_activations


def model_shape(hf_config, task: str, lora=None) -> ModelShape:
    """Parameter counts from a meta-device instance (tied weights once), and the layer dimensions."""
    import torch

    from bigsft.model import apply_lora, auto_class

    with torch.device("meta"):
        model = auto_class(task).from_config(hf_config)
        if lora is not None:
            model = apply_lora(model, lora, task)
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    layers, hidden = model_dims(hf_config)
    return ModelShape(params=params, trainable=trainable, largest_layer=largest, layers=layers, hidden=hidden,
                      intermediate=config_int(hf_config, "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim",
                                              default=4 * hidden) or 4 * hidden,
                      heads=config_int(hf_config, "num_attention_heads", "n_head"),
                      vocab=config_int(hf_config, "vocab_size"))


def model_states(shape: ModelShape, s: Strategy, *, dtype: str, hw: Hardware) -> tuple[float, float, float]:
    """(GPU bytes per rank, host bytes per node, NVMe bytes per node) for weights, gradients, optimizer."""
    psi, pt, big = shape.params / s.pipeline, shape.trainable / s.pipeline, shape.largest_layer
    n = hw.gpus // s.pipeline
    w = 2 if dtype in ("bf16", "fp16") else 4
    g = w
    opt = 12  # fp32 master copy + Adam's two moments
    load = 4 * psi * hw.gpus_per_node * 1.5  # every process reads the checkpoint once
    if s.zero == 0:
        master = 4 if w == 2 else 0  # fp32 training updates the weights themselves
        return w * psi + g * pt + (master + 8) * pt, load, 0.0
    if s.zero == 1:
        return w * psi + g * pt + opt * pt / n, load, 0.0
    if s.zero == 2:
        if s.offload_optimizer != "none":
            return w * psi, pt * max(4 * n, 16) * 1.5, 0.0
        grads = (g + 4) if w == 2 else g  # a 16-bit and an fp32 gradient partition in mixed precision
        return w * psi + (grads + opt) * pt / n, load, 0.0
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


def activations(shape: ModelShape, *, micro_batch: int, seq: int, dtype: str, checkpointing: bool,
                attention: str, pipeline: int, accumulation: int) -> float:
    k = 2 if dtype in ("bf16", "fp16") else 4
    sbh = seq * micro_batch * shape.hidden
    layer = sbh * (15 + 19 * shape.intermediate / (4 * shape.hidden)) * k / 2
    if attention == "eager":
        layer += 5 * shape.heads * seq * seq * micro_batch * k / 2
    layers = math.ceil(shape.layers / pipeline)
    kept = (2 * sbh * k / 2 * layers + layer) if checkpointing else layer * layers
    in_flight = min(pipeline, accumulation) if pipeline > 1 else 1
    logits = seq * micro_batch * shape.vocab * (k + 4) * 2
    return kept * in_flight + logits


def communication(shape: ModelShape, s: Strategy, *, dtype: str, hw: Hardware, accumulation: int, micro_batch: int,
                  seq: int) -> tuple[float, float]:
    """(network bytes per rank per step, PCIe bytes per rank per step)."""
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
    pcie = 0.0
    if s.offload_optimizer != "none":
        pcie += pt * (w + w)  # gradients down, updated weights up
    if s.offload_param != "none":
        pcie += accumulation * 2 * psi * w / n  # each rank's weights come up for forward and backward
    return net, pcie


def step_seconds(shape: ModelShape, s: Strategy, *, hw: Hardware, tokens_per_rank: int, checkpointing: bool,
                 net: float, pcie: float, accumulation: int) -> float:
    flops_per_token = 6 * shape.params if shape.trainable == shape.params else 4 * shape.params + 2 * shape.trainable
    compute = flops_per_token / s.pipeline * tokens_per_rank / (hw.gpu_tflops * 1e12 * hw.mfu)
    if checkpointing:
        compute *= 4 / 3
    if s.pipeline > 1:
        compute *= 1 + (s.pipeline - 1) / (accumulation + s.pipeline - 1)
    bandwidth = hw.inter_node_gbps if hw.nodes > 1 else hw.intra_node_gbps
    seconds = compute + net / (bandwidth * 1e9) + pcie / (hw.pcie_gbps * 1e9)
    if s.offload_optimizer != "none":
        seconds += shape.trainable / s.pipeline / (hw.gpus // s.pipeline) * 16 / 10e9  # host Adam over its states
    if s.offload_param == "nvme":
        seconds += (2 * shape.params + 16 * shape.trainable) / hw.nodes / 3e9
    return seconds


def strategies(shape: ModelShape, hw: Hardware) -> list[Strategy]:
    out = [Strategy(zero=z) for z in (0, 1, 2, 3)]
    out += [Strategy(zero=2, offload_optimizer="cpu"), Strategy(zero=3, offload_optimizer="cpu"),
            Strategy(zero=3, offload_optimizer="cpu", offload_param="cpu")]
    if hw.nvme:
        out.append(Strategy(zero=3, offload_optimizer="nvme", offload_param="nvme"))
    for p in range(2, min(hw.gpus, shape.layers) + 1):
        if shape.layers % p == 0 and hw.gpus % p == 0:
            out.append(Strategy(zero=1, pipeline=p))
    return out


def plan(cfg: RunConfig, hf_config, hw: Hardware, *, micro_batches=(1, 2, 4, 8, 16, 32, 64)) -> list[Estimate]:
    """Every strategy at the largest micro-batch that fits (or the smallest, marked not fitting)."""
    shape = model_shape(hf_config, cfg.model.task, cfg.model.lora)
    t = cfg.train
    seq = cfg.data.max_length
    target = t.global_batch_size or t.micro_batch_size * (t.gradient_accumulation_steps or 1) * hw.gpus
    results = []
    for s in strategies(shape, hw):
        dp = hw.gpus // s.pipeline
        smallest = largest_fitting = None
        for b in micro_batches:
            if target % (b * dp):
                continue
            batch = BatchMath(micro_batch_size=b, gradient_accumulation_steps=target // (b * dp), data_parallel_size=dp,
                              pipeline_stages=s.pipeline)
            est = estimate(shape, s, cfg=cfg, hw=hw, batch=batch, seq=seq)
            smallest = smallest or est
            if est.fits:
                largest_fitting = est
        if smallest is not None:
            results.append(largest_fitting or smallest)
    return sorted(results, key=lambda e: (not e.fits, e.step_seconds / max(e.tokens_per_step, 1)))


def estimate(shape: ModelShape, s: Strategy, *, cfg: RunConfig, hw: Hardware, batch: BatchMath, seq: int) -> Estimate:
    micro_batch, accumulation = batch.micro_batch_size, batch.gradient_accumulation_steps
    dtype = cfg.model.dtype
    gpu_states, host, nvme = model_states(shape, s, dtype=dtype, hw=hw)
    acts = activations(shape, micro_batch=micro_batch, seq=seq, dtype=dtype,
                       checkpointing=cfg.model.gradient_checkpointing,
                       attention=cfg.model.attn_implementation or "sdpa", pipeline=s.pipeline, accumulation=accumulation)
    net, pcie = communication(shape, s, dtype=dtype, hw=hw, accumulation=accumulation, micro_batch=micro_batch, seq=seq)
    tokens = micro_batch * accumulation * seq
    seconds = step_seconds(shape, s, hw=hw, tokens_per_rank=tokens, checkpointing=cfg.model.gradient_checkpointing,
                           net=net, pcie=pcie, accumulation=accumulation)
    why = []
    if gpu_states + acts > hw.gpu_mem_gib * GIB * (1 - hw.margin):
        why.append("GPU memory")
    if host > hw.cpu_mem_gib * GIB * (1 - hw.margin):
        why.append("host memory")
    return Estimate(strategy=s, micro_batch=micro_batch, accumulation=accumulation, gpu_states=gpu_states,
                    gpu_activations=acts, host=host, nvme=nvme, comm=net + pcie, step_seconds=seconds,
                    tokens_per_step=tokens * batch.data_parallel_size, fits=not why, why=why)


def write_ds_config(best: Estimate, path: Path) -> None:
    from bigsft.ds_config import find_ds_config

    raw = json.loads(find_ds_config(best.strategy.ds_config).read_text())
    if best.strategy.zero == 3 and best.strategy.offload_optimizer == "cpu" and best.strategy.offload_param == "none":
        raw["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=2) + "\n")


def overrides(best: Estimate, ds_path: str) -> list[str]:
    out = [f"deepspeed={ds_path}", f"train.micro_batch_size={best.micro_batch}",
           f"train.gradient_accumulation_steps={best.accumulation}"]
    if best.strategy.pipeline > 1:
        out.append(f"pipeline.stages={best.strategy.pipeline}")
    return out


def gib(x: float) -> str:
    return f"{x / GIB:,.1f}" if x >= 0.05 * GIB else f"{x / 2**20:,.1f} MiB"


def report(cfg: RunConfig, hf_config, hw: Hardware, *, write: str | None = None, console=None) -> Estimate | None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    shape = model_shape(hf_config, cfg.model.task, cfg.model.lora)
    results = plan(cfg, hf_config, hw)
    console.print(f"{shape.params / 1e9:.3f}B parameters ({shape.trainable / 1e9:.3f}B trainable), "
                  f"{cfg.model.dtype}, sequence {cfg.data.max_length}, "
                  f"{'gradient checkpointing, ' if cfg.model.gradient_checkpointing else ''}"
                  f"{hw.nodes} node(s) × {hw.gpus_per_node} GPU(s) of {hw.gpu_mem_gib:g} GiB, host {hw.cpu_mem_gib:g} GiB "
                  f"per node; sizes in GiB")
    table = Table(show_lines=False)
    for col in ("strategy", "micro", "accum", "GPU states", "GPU activ.", "GPU total", "host/node", "comm/step",
                "est. s/step", "fits"):
        table.add_column(col, justify="left" if col in ("strategy", "fits") else "right")
    for e in results:
        table.add_row(e.strategy.name, str(e.micro_batch), str(e.accumulation), gib(e.gpu_states),
                      gib(e.gpu_activations), gib(e.gpu_total), gib(e.host), gib(e.comm), f"{e.step_seconds:.2f}",
                      "yes" if e.fits else "no: " + ", ".join(e.why))
    console.print(table)
    best = next((e for e in results if e.fits), None)
    if best is None:
        console.print("[red]nothing fits[/]: more GPUs, LoRA (model.lora), gradient checkpointing, a shorter "
                      "data.max_length or --nvme")
        return None
    path = write or "ds_configs/planned.json"
    if write:
        write_ds_config(best, Path(write))
    console.print(f"recommended: [bold]{best.strategy.name}[/], micro batch {best.micro_batch} × accumulation "
                  f"{best.accumulation} ({best.tokens_per_step:,} tokens per step, est. {best.step_seconds:.2f} s)")
    console.print("run with: " + " ".join(overrides(best, path))
                  + ("" if write else f"   (--write {path} writes the DeepSpeed JSON)"))
    return best
