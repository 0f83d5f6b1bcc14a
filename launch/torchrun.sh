#!/usr/bin/env bash
# One node, one process per GPU, started by torchrun (torch.distributed.run).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/torchrun.sh CONFIG.yaml [seqpar train args: --set KEY=VALUE ... --resume]

Trains on this node with one process per GPU: torchrun --standalone runs
`python -m seqpar.cli train CONFIG.yaml ARGS...` NPROC times.
Run it from the repository root: relative paths in the config resolve against the
working directory.

SIGTERM/SIGINT (Slurm, Ctrl-C) to this script, the workers or all of them: the
workers finish the step, checkpoint, and the script exits 0 (continue with --resume).
If this script dies, torchrun and the workers die with it (launch/supervise.sh).

environment:
  NPROC        processes (default: the number of visible GPUs)
  MASTER_PORT  rendezvous port (default: a free one, chosen by --standalone)
  PYTHON       interpreter (default: python)

example:
  bash launch/torchrun.sh configs/llama3_8b_128k.yaml --set train.steps=10
USAGE
}

if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
CONFIG=$1; shift
if [[ ! -f $CONFIG ]]; then echo "torchrun.sh: config $CONFIG not found" >&2; exit 2; fi

PYTHON=${PYTHON:-python}
if [[ -z ${NPROC:-} ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    if [[ $NPROC -lt 1 ]]; then
        echo "torchrun.sh: no GPU visible; set NPROC, or use launch/cpu_gloo.sh for CPU ranks" >&2
        exit 2
    fi
fi

rdzv=(--standalone)
if [[ -n ${MASTER_PORT:-} ]]; then rdzv=(--rdzv-backend c10d --rdzv-endpoint "localhost:$MASTER_PORT"); fi

# SIGTERM/SIGINT: checkpoint, then exit 0; the workers die with this script (supervise.sh).
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
set -x
supervise "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nnodes 1 --nproc-per-node "$NPROC" \
    -m seqpar.cli train "$CONFIG" "$@"
