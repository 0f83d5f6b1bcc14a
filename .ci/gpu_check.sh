#!/usr/bin/env bash
# GPU checks, for a machine with one CUDA GPU (CI has none: this is run by hand).
#   bash .ci/gpu_check.sh OUT_DIR verify   # build the CUDA ops, their tests, doctor (self-tests)
#   bash .ci/gpu_check.sh OUT_DIR bench    # seqpar bench kernels + bench memory (1B shape)
# Each step has its own time limit, writes OUT_DIR/<step>.log, and a failed step does not
# stop the next. Wheels in .whl/ (deepspeed and what it needs, if the machine lacks them)
# are installed to /tmp/site first.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR verify|bench|all}
PHASE=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SEQPAR_EXT_DIR=$PWD/.seqpar_cache/ext MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
SP="python3 -m seqpar.cli"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name rc=$rc in $((SECONDS - start))s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

if [ "$PHASE" = verify ] || [ "$PHASE" = all ]; then
    step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
        python3 -c "import torch, transformers, deepspeed; print(torch.__version__, torch.version.cuda,
        transformers.__version__, deepspeed.__version__)"; nvcc --version | tail -2'
    SEQPAR_REQUIRE_EXT=1 step build 300 $SP build-ext
    TAIL=25 step test_cuda_ops 240 python3 -m pytest -q -rf -p no:cacheprovider --timeout 120 tests/test_cuda_ops.py
    step doctor_bf16_d128 90 $SP doctor --device cuda
    step doctor_bf16_d64 90 $SP doctor --device cuda --head-dim 64
fi
if [ "$PHASE" = bench ] || [ "$PHASE" = all ]; then
    TAIL=60 step bench_kernels 200 $SP bench kernels --device cuda --seq-len 4k,16k,32k --no-compile \
        --json "$OUT/bench_kernels.json"
    for s in 32768 131072; do
        TAIL=20 step "bench_memory_$s" 150 $SP bench memory --device cuda --world-size 1 --zero 2 \
            --model configs/models/llama3.2_1b_shape.json --seq-len "$s" --steps 2 --timeout 140 \
            --variants transformers,+tiled-mlp,+tiled-layer --json "$OUT/bench_memory_$s.json"
    done
fi
