"""Run under `deepspeed --num_gpus 2`: build a model the way bigsft does under ZeRO-3 and report, per
rank, how many parameter elements it holds locally. Prints one JSON line per rank."""

import json
import os
import sys

from bigsft.batch_math import BatchMath
from bigsft.config import ModelConfig
from bigsft.dist import exit_skipping_teardown, init_process_group, read_launch_env
from bigsft.ds_config import RunValues, load_ds_config, resolve_ds_config
from bigsft.model import build_model, build_tokenizer, load_hf_config


def main() -> None:
    model_dir = next(a for a in sys.argv[1:] if not a.startswith("--"))
    launch = read_launch_env()
    init_process_group(launch)
    from transformers.integrations import HfDeepSpeedConfig

    raw, label = load_ds_config("zero3")
    values = RunValues(batch=BatchMath(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=launch.world_size),
                       lr=1e-3, adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                       dtype="fp32", hidden_size=64)
    ds = resolve_ds_config(raw, label, values, accelerator="cpu")
    cfg = ModelConfig(name_or_path=model_dir)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive while the model is built)
    model = build_model(cfg, load_hf_config(cfg), tokenizer=build_tokenizer(cfg))
    params = list(model.parameters())
    # One write (under PIPE_BUF): the ranks share the launcher's stdout, and print()'s two writes interleave.
    os.write(1, (json.dumps({
        "rank": launch.rank,
        "local_elements": sum(p.numel() for p in params),
        "shard_elements": sum(p.ds_tensor.numel() for p in params),
        "full_elements": sum(p.ds_numel for p in params),
        "all_partitioned": all(hasattr(p, "ds_id") for p in params),
    }) + "\n").encode())


if __name__ == "__main__":
    main()
    exit_skipping_teardown()
