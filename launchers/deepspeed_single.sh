#!/usr/bin/env bash
# One node, all its GPUs, with the deepspeed launcher.
#   launchers/deepspeed_single.sh CONFIG [key.path=value ...]
# Reads: NUM_GPUS (default: GPUs nvidia-smi lists, else 1), MASTER_PORT (default 29500).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [key.path=value ...]" >&2; exit 2; }
NUM_GPUS=${NUM_GPUS:-$(bigsft_count_gpus)}
bigsft_print_and_exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module bigsft.train "$@"
