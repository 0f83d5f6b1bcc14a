#!/usr/bin/env bash
# GPU checks, for a machine with one CUDA GPU (CI has none: this is run by hand).
#   bash .ci/gpu_check.sh OUT_DIR verify   # build the CUDA ops, their tests, doctor (self-tests)
#   bash .ci/gpu_check.sh OUT_DIR bench    # seqpar bench kernels + bench memory (1B shape)
#   bash .ci/gpu_check.sh OUT_DIR limits   # longest length per variant (bench memory --until-oom),
#                                          # with the verify steps in the background meanwhile
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
if [ "$PHASE" = limits ]; then
    step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
        python3 -c "import torch, transformers, deepspeed; print(torch.__version__, torch.version.cuda,
        transformers.__version__, deepspeed.__version__)"'
    # The CUDA ops build (CPU-bound) and their tests run beside the memory searches (GPU-bound).
    (SEQPAR_REQUIRE_EXT=1 MAX_JOBS=12 step build 300 $SP build-ext &&
        TAIL=25 step test_cuda_ops 150 python3 -m pytest -q -rf -p no:cacheprovider --timeout 120 \
            tests/test_cuda_ops.py) >"$OUT/verify.txt" 2>&1 &
    # The memory runs leave the extension out (torch rope): the build must not run inside them.
    export SEQPAR_DISABLE_EXT=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    M1B=configs/models/llama3.2_1b_shape.json
    # A 32 GiB cap puts each variant's limit at lengths whose steps take seconds.
    TAIL=30 step limits_32gib 480 $SP bench memory --device cuda --world-size 1 --zero 2 --model "$M1B" \
        --until-oom --gpu-mem 32GiB --steps 1 --timeout 200 --variants transformers,+tiled-mlp,+tiled-layer \
        --seq-len 4096,8192,16384,24576,32768,49152,65536,73728,81920,90112,98304,106496,114688,122880,131072,139264,147456,155648,163840,180224,196608 \
        --json "$OUT/limits_32gib.json"
    # The tiled layer in 8 head groups (one per K/V head), from where the tiled layer stopped.
    TAIL=20 step limits_head_groups 300 $SP bench memory --device cuda --world-size 1 --zero 2 --model "$M1B" \
        --until-oom --gpu-mem 32GiB --steps 1 --timeout 280 --variants +head-groups --head-groups 8 \
        --seq-len 122880,139264,155648,172032,196608 --json "$OUT/limits_head_groups.json"
    TAIL=20 step limits_whole_gpu 90 $SP bench memory --device cuda --world-size 1 --zero 2 --model "$M1B" \
        --until-oom --steps 1 --timeout 80 --variants transformers \
        --seq-len 24576,32768,36864,40960,45056,49152,57344,65536 --json "$OUT/limits_whole_gpu.json"
    wait
    cat "$OUT/verify.txt"
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
