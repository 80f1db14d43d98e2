# Sourced by the launchers: print the command (secrets masked), then run it in place of the shell.
# shellcheck shell=bash

bigsft_python() { echo "${BIGSFT_PYTHON:-python3}"; }

# Arguments that look like secrets (key=value with token/secret/password/api_key in the key) are masked
# in the printed line only; the command runs with the real values.
bigsft_print_and_exec() {
    local shown=() arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[^=]*(token|secret|password|passwd|api_key|apikey|credential)[^=]*= ]]; then
            shown+=("${arg%%=*}=<redacted>")
        else
            shown+=("$arg")
        fi
    done
    echo "+ ${shown[*]}" >&2
    exec "$@"
}

bigsft_need() {  # bigsft_need VAR "what it is"
    if [[ -z "${!1:-}" ]]; then
        echo "$(basename "$0"): set $1 ($2)" >&2
        exit 2
    fi
}

bigsft_count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}
