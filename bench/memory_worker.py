"""One rank's side of bench/memory.py (run under `deepspeed --num_gpus N`): build a model under one ZeRO
configuration, train two steps, and report the bytes of every live tensor (storages counted once) next
to what `bigsft.plan` predicts for the model states. Measured at the peak of the second step (after
backward, before the optimizer step): weights, gradients and optimizer states all live. Each rank
writes REPORT_DIR/rank<R>.json (a file each: ranks printing to one stdout interleave their lines).

    deepspeed --num_gpus 2 bench/memory_worker.py MODEL_DIR zero2 REPORT_DIR
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch


def live_tensor_bytes() -> int:
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            continue
    return sum(seen.values())


def main() -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from bigsft.batch_math import BatchMath
    from bigsft.dist import init_process_group, read_launch_env
    from bigsft.ds_config import RunValues, load_ds_config, offload_device, resolve_ds_config, zero_stage
    from bigsft.plan import Hardware, Strategy, model_shape, model_states

    model_dir, ds_name, report_dir = [a for a in sys.argv[1:] if not a.startswith("--")][:3]
    launch = read_launch_env()
    init_process_group(launch)
    hf_config = AutoConfig.from_pretrained(model_dir)
    raw, label = load_ds_config(ds_name)
    values = RunValues(batch=BatchMath(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=launch.world_size), lr=1e-3,
                       adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, dtype="fp32",
                       hidden_size=hf_config.hidden_size)
    ds = resolve_ds_config(raw, label, values, accelerator="cpu")
    shape = model_shape(hf_config, "causal_lm")  # a meta-device count, before ZeRO-3 takes over construction
    before = live_tensor_bytes()
    keep = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None  # noqa: F841 (alive while building)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    offload = offload_device(ds, "offload_optimizer") != "none"
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ids = torch.randint(0, hf_config.vocab_size, (1, 32))
    for step in range(2):  # measured on the second step, after backward: weights, gradients, optimizer states
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        del loss
        if step == 1:
            measured = live_tensor_bytes() - before
        engine.step()
    strategy = Strategy(zero=zero_stage(ds), offload_optimizer=offload_device(ds, "offload_optimizer"),
                        offload_param=offload_device(ds, "offload_param"))
    hw = Hardware(gpus_per_node=launch.world_size, nodes=1, gpu_mem_gib=1, cpu_mem_gib=1)
    gpu, host, _ = model_states(shape, strategy, dtype="fp32", hw=hw)
    # On CPU "GPU" and host memory are one: offloaded states count too (per rank: the node's share).
    predicted = gpu + (host / launch.world_size if strategy.offload_optimizer != "none" else 0)
    report = {"rank": launch.rank, "config": ds_name, "params": shape.params, "measured": measured,
              "predicted": predicted}
    (Path(report_dir) / f"rank{launch.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from bigsft.dist import exit_skipping_teardown

    main()
    exit_skipping_teardown()
