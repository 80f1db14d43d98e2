"""Run under `deepspeed --num_gpus 2`: build a 2-stage pipeline as bigsft does and print, per rank,
which checkpoint tensors it read (one JSON line per rank)."""

import json
import os
import sys

import torch

from bigsft.dist import exit_skipping_teardown, init_process_group, read_launch_env
from bigsft.pipe import WeightSource, build_pipeline


def main() -> None:
    model_dir = next(a for a in sys.argv[1:] if not a.startswith("--"))
    launch = read_launch_env()
    init_process_group(launch)
    from transformers import AutoConfig

    read: list[str] = []
    tensors = WeightSource.tensors

    def recorded(source, prefix):  # every checkpoint tensor this rank's stage asks for
        out = tensors(source, prefix)
        read.extend(f"{prefix}.{k}" for k in out)
        return out

    WeightSource.tensors = recorded

    module, _, _ = build_pipeline(AutoConfig.from_pretrained(model_dir), model_dir, stages=2, partition="uniform",
                                       activation_checkpoint_interval=0, attn_implementation=None, dtype=torch.float32)
    # One write (under PIPE_BUF): the ranks share the launcher's stdout, and print()'s two writes interleave.
    os.write(1, (json.dumps({"rank": launch.rank, "read": sorted(read),
                                     "params": sum(p.numel() for p in module.parameters())}) + "\n").encode())


if __name__ == "__main__":
    main()
    exit_skipping_teardown()
