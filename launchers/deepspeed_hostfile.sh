#!/usr/bin/env bash
# Several nodes from one command: the deepspeed launcher reaches the other nodes over ssh (pdsh).
#   HOSTFILE=hosts launchers/deepspeed_hostfile.sh CONFIG [key.path=value ...]
# Reads: HOSTFILE (lines "hostname slots=N"), MASTER_ADDR (default: the hostfile's first host),
# MASTER_PORT (default 29500), DS_LAUNCHER (pdsh, the default, or openmpi, mvapich, ...).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || { echo "usage: HOSTFILE=hosts $0 CONFIG [key.path=value ...]" >&2; exit 2; }
bigsft_need HOSTFILE "a hostfile of lines 'hostname slots=N'"
[[ -r "$HOSTFILE" ]] || { echo "$(basename "$0"): HOSTFILE $HOSTFILE is not a readable file" >&2; exit 2; }
bad=$(grep -vnE '^\s*(#.*)?$|^\s*[A-Za-z0-9._-]+\s+slots=[0-9]+\s*$' "$HOSTFILE" || true)
if [[ -n "$bad" ]]; then
    echo "$(basename "$0"): $HOSTFILE: lines must read 'hostname slots=N'; bad line(s): ${bad//$'\n'/; }" >&2
    exit 2
fi
first=$(grep -vE '^\s*(#.*)?$' "$HOSTFILE" | head -n 1 | awk '{print $1}')
[[ -n "$first" ]] || { echo "$(basename "$0"): $HOSTFILE lists no host" >&2; exit 2; }
bigsft_print_and_exec deepspeed --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" \
    --master_addr "${MASTER_ADDR:-$first}" --master_port "${MASTER_PORT:-29500}" --module bigsft.train "$@"
