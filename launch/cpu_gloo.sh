#!/usr/bin/env bash
# N simulated ranks on the CPU (gloo backend): for development, tests and the tiny demo.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/cpu_gloo.sh CONFIG.yaml [seqpar train args: --set KEY=VALUE ... --resume]

Runs N CPU processes with the gloo backend through torchrun on this machine, one
thread each, GPUs hidden. Run it from the repository root: relative paths in the
config resolve against the working directory.

SIGTERM/SIGINT (Slurm, Ctrl-C) to this script, the workers or all of them: the
workers finish the step, checkpoint, and the script exits 0 (continue with --resume).
If this script dies, torchrun and the workers die with it (launch/supervise.sh).

environment:
  NPROC        processes (default: the config's parallel.sp_size, after --set overrides)
  MASTER_PORT  rendezvous port (default: a free one, chosen by --standalone)
  PYTHON       interpreter (default: python)

example:
  bash launch/cpu_gloo.sh configs/tiny_cpu_demo.yaml --set train.steps=5
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_config "$@"; shift
NPROC=${NPROC:-$(config_sp_size "$@")}   # default: the config's parallel.sp_size

export OMP_NUM_THREADS=1          # N processes share the cores: no oversubscription
export GLOO_SOCKET_IFNAME=lo      # all ranks on this machine: loopback only
export CUDA_VISIBLE_DEVICES=""    # CPU ranks even on a GPU machine (gloo, fp32)

rdzv=(--standalone)
if [[ -n ${MASTER_PORT:-} ]]; then rdzv=(--rdzv-backend c10d --rdzv-endpoint "localhost:$MASTER_PORT"); fi

set -x
supervise "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nnodes 1 --nproc-per-node "$NPROC" \
    -m seqpar.cli train "$CONFIG" "$@"
