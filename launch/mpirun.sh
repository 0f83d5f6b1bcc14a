#!/usr/bin/env bash
# N ranks started by MPI (mpirun/mpiexec); the trainer discovers rank and world size via mpi4py.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/mpirun.sh CONFIG.yaml [seqpar train args: --set KEY=VALUE ... --resume]

Runs `mpirun -np N python -m seqpar.cli train CONFIG.yaml ARGS...`. Ranks learn their
rank, world size and rendezvous address from MPI through mpi4py (the trainer calls
deepspeed.init_distributed(auto_mpi_discovery=True)); torch.distributed then uses
nccl on GPUs, gloo on CPU. Needs the `mpi` extra, which brings mpi4py and MPICH
(including mpirun):
    pip install -e '.[mpi]'
Run it from the repository root: relative paths in the config resolve against the
working directory.

environment:
  NP           ranks (default: visible GPUs; with none, the config's parallel.sp_size)
  MPIRUN       MPI launcher command (default: mpirun)
  MPIRUN_ARGS  extra launcher arguments, e.g. "-hosts node1,node2 -ppn 8" (MPICH) or
               "--host node1:8,node2:8 -x PATH -x MASTER_PORT" (Open MPI)
  MASTER_PORT  torch.distributed port (default: 29500)
  PYTHON       interpreter (default: python)

example (4 CPU ranks):
  pip install -e '.[mpi]'
  bash launch/mpirun.sh configs/tiny_cpu_demo.yaml --set train.steps=5
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_config "$@"; shift
MPIRUN=${MPIRUN:-mpirun}
if ! command -v "${MPIRUN%% *}" >/dev/null; then
    launch_fail "$MPIRUN not found; install the mpi extra: pip install -e '.[mpi]'"
fi
if ! "$PYTHON" -c 'import mpi4py' 2>/dev/null; then
    launch_fail "mpi4py is not installed; pip install -e '.[mpi]'"
fi

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [[ -z ${NP:-} ]]; then
    if [[ $gpus -gt 0 ]]; then
        NP=$gpus
    else
        NP=$(config_sp_size "$@")
    fi
fi
if [[ $gpus -eq 0 ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}    # CPU ranks share the cores
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
export MASTER_PORT=${MASTER_PORT:-29500}

read -r -a mpirun <<<"$MPIRUN"
read -r -a extra <<<"${MPIRUN_ARGS:-}"
set -x
exec "${mpirun[@]}" -np "$NP" "${extra[@]}" "$PYTHON" -m seqpar.cli train "$CONFIG" "$@"
