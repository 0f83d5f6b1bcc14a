#!/usr/bin/env bash
# One or more nodes through the `deepspeed` launcher (pdsh/ssh from a hostfile).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/deepspeed.sh CONFIG.yaml [seqpar train args: --set KEY=VALUE ... --resume]

Runs `python -m seqpar.cli train CONFIG.yaml ARGS...` on every GPU of every host in
HOSTFILE through the DeepSpeed launcher. Without a hostfile, runs on this node only.
Multi-node: passwordless ssh from the first host to the others, pdsh installed (or
LAUNCHER=openmpi/mvapich/slurm/...), and the repository at the SAME path on every node
(shared file system): the launcher cds every rank into this working directory, and
relative paths in the config resolve against it. Environment variables listed in
./.deepspeed_env (NAME=VALUE lines) are exported to all nodes.

environment:
  HOSTFILE      MPI-style hostfile, lines "host slots=8" (default: /job/hostfile if
                present, else this node only)
  NUM_NODES     use the first N hosts of the hostfile (default: all)
  NUM_GPUS      GPUs per node (default: all)
  MASTER_ADDR   address of the first node (default: inferred by deepspeed)
  MASTER_PORT   port (default: 29500)
  LAUNCHER      deepspeed multi-node backend (default: pdsh)
  DEEPSPEED     the launcher command (default: deepspeed, else python -m deepspeed.launcher.runner)

example (2 nodes x 8 GPUs):
  printf 'node1 slots=8\nnode2 slots=8\n' > hostfile
  HOSTFILE=hostfile bash launch/deepspeed.sh configs/multinode_llama3_8b_256k.yaml
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_config "$@"; shift
if [[ -n ${DEEPSPEED:-} ]]; then
    read -r -a launcher <<<"$DEEPSPEED"
elif command -v deepspeed >/dev/null; then
    launcher=(deepspeed)
else
    launcher=("$PYTHON" -m deepspeed.launcher.runner)
fi

args=(--master_port "${MASTER_PORT:-29500}" --launcher "${LAUNCHER:-pdsh}")
if [[ -n ${HOSTFILE:-} ]]; then
    if [[ ! -f $HOSTFILE ]]; then launch_fail "HOSTFILE $HOSTFILE not found"; fi
    args+=(--hostfile "$HOSTFILE")
fi
if [[ -n ${NUM_NODES:-} ]]; then args+=(--num_nodes "$NUM_NODES"); fi
if [[ -n ${NUM_GPUS:-} ]]; then args+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n ${MASTER_ADDR:-} ]]; then args+=(--master_addr "$MASTER_ADDR"); fi

# --no_local_rank: seqpar reads LOCAL_RANK from the environment, not from --local_rank.
set -x
exec "${launcher[@]}" "${args[@]}" --no_local_rank --module seqpar.cli train "$CONFIG" "$@"
