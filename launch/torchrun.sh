#!/usr/bin/env bash
# One process per GPU, started by torchrun (torch.distributed.run): one node, or one
# invocation per node of a multi-node job (what launch/slurm.sbatch runs on every node).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/torchrun.sh CONFIG.yaml [seqpar train args: --set KEY=VALUE ... --resume]

Trains with one process per GPU: torchrun runs `python -m seqpar.cli train CONFIG.yaml
ARGS...` NPROC times on this node. Single node: --standalone. Multi-node (NNODES > 1):
run this script once on every node with the same NNODES, RDZV_ENDPOINT and RDZV_ID;
torchrun's c10d rendezvous (a TCP store on the RDZV_ENDPOINT host) assigns node and
global ranks. Run it from the repository root, at the same path on every node: relative
paths in the config resolve against the working directory.

SIGTERM/SIGINT (Slurm, Ctrl-C) to this script, the workers or all of them: the
workers finish the step, checkpoint, and the script exits 0 (continue with --resume).
If this script dies, torchrun and the workers die with it (launch/supervise.sh).

environment:
  NPROC          processes on this node (default: the number of visible GPUs)
  NNODES         nodes in the job (default: 1)
  RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node (first node;
                 required when NNODES > 1)
  RDZV_ID        job id, the same on every node (default: seqpar)
  MASTER_PORT    single node: rendezvous port (default: a free one, chosen by --standalone)
  PYTHON         interpreter (default: python)

examples:
  bash launch/torchrun.sh configs/llama3_8b_128k.yaml --set train.steps=10
  # on each of 2 nodes:
  NNODES=2 RDZV_ENDPOINT=node1:29500 RDZV_ID=run42 bash launch/torchrun.sh configs/multinode_llama3_8b_256k.yaml
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_config "$@"; shift
if [[ -z ${NPROC:-} ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    if [[ $NPROC -lt 1 ]]; then
        launch_fail "no GPU visible; set NPROC, or use launch/cpu_gloo.sh for CPU ranks"
    fi
fi

NNODES=${NNODES:-1}
if [[ $NNODES -gt 1 ]]; then
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
        launch_fail "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node), the same on every node"
    fi
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-seqpar}")
elif [[ -n ${MASTER_PORT:-} ]]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "localhost:$MASTER_PORT")
else
    rdzv=(--standalone)
fi

set -x
supervise "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    -m seqpar.cli train "$CONFIG" "$@"
