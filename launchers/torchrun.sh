#!/usr/bin/env bash
# torchrun, static or elastic (c10d) rendezvous.
#   launchers/torchrun.sh CONFIG [key.path=value ...]                       one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/torchrun.sh CONFIG    static, run on every node
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 launchers/torchrun.sh CONFIG   c10d, every node
# Reads: NPROC_PER_NODE (default: GPUs nvidia-smi lists, else 1), NNODES (default 1), NODE_RANK,
# MASTER_ADDR, MASTER_PORT (default 29500), RDZV_ENDPOINT, RDZV_ID (default bigsft).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [key.path=value ...]" >&2; exit 2; }
NPROC_PER_NODE=${NPROC_PER_NODE:-$(bigsft_count_gpus)}
NNODES=${NNODES:-1}
py=$(bigsft_python)
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    bigsft_print_and_exec "$py" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-bigsft}" -m bigsft.train "$@"
elif (( NNODES > 1 )); then
    bigsft_need NODE_RANK "this node's rank, 0 .. NNODES-1"
    bigsft_need MASTER_ADDR "node 0's address"
    bigsft_print_and_exec "$py" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
        -m bigsft.train "$@"
else
    bigsft_print_and_exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" \
        -m bigsft.train "$@"
fi
