#!/usr/bin/env bash
# One deepspeed launcher per node, no ssh (clusters and containers that forbid it): run this on every
# node with its NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/deepspeed_nossh.sh CONFIG [key.path=value ...]
# Reads: NNODES, NODE_RANK, MASTER_ADDR (node 0's address), MASTER_PORT (default 29500),
# NUM_GPUS (per node; default: GPUs nvidia-smi lists, else 1). Under Slurm they default to
# SLURM_NNODES and SLURM_NODEID.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || { echo "usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. $0 CONFIG [key.path=value ...]" >&2; exit 2; }
NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
bigsft_need NNODES "number of nodes"
bigsft_need NODE_RANK "this node's rank, 0 .. NNODES-1"
bigsft_need MASTER_ADDR "node 0's address"
if ! [[ "$NNODES" =~ ^[0-9]+$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "$(basename "$0"): NODE_RANK=$NODE_RANK must be a number below NNODES=$NNODES" >&2
    exit 2
fi
NUM_GPUS=${NUM_GPUS:-$(bigsft_count_gpus)}
# deepspeed takes the world's shape from a hostfile even without ssh: one line per node (the names
# are placeholders; only their count and slots matter).
hostfile="${TMPDIR:-/tmp}/bigsft-hosts-${NNODES}x${NUM_GPUS}"
for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NUM_GPUS"; done >"$hostfile.$$"
mv -f "$hostfile.$$" "$hostfile"
bigsft_print_and_exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --module bigsft.train "$@"
