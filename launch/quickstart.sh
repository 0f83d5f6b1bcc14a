#!/usr/bin/env bash
# The whole product in one command, offline, on a 2-core CPU in a few minutes:
#   1. set up .venv (CPU torch unless a GPU is present), the package and its compiled ops;
#   2. pretrain a small random-init Llama briefly at 128 tokens on Python's own sources;
#   3. continue pretraining it at 8x the length (1024 tokens) with YaRN, one sequence
#      split over 4 ranks by zigzag ring attention, DeepSpeed ZeRO-2;
#   4. evaluate perplexity by length before and after (table + PNG plot).
#
#   bash launch/quickstart.sh            # full demo
#   SEQPAR_QUICKSTART_FAST=1 bash launch/quickstart.sh   # a reduced run (what CI does)
#
# environment: SEQPAR_QUICKSTART_DIR (default runs/quickstart), PYTHON (for the venv).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${SEQPAR_QUICKSTART_DIR:-runs/quickstart}
FAST=${SEQPAR_QUICKSTART_FAST:-0}
START=$(date +%s)
say() { printf '\n\033[1m[quickstart %4ss] %s\033[0m\n' "$(( $(date +%s) - START ))" "$*"; }

# --- 1. environment ------------------------------------------------------------------
say "setting up .venv"
if [[ ! -x .venv/bin/python ]]; then "${PYTHON:-python3}" -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install -q torch            # CUDA build for this GPU machine
    else
        python -m pip install -q "torch==2.13.0"  # CPU build (no multi-GB CUDA download)
    fi
fi
if ! python -c "import seqpar, deepspeed, transformers, datasets, matplotlib" 2>/dev/null; then
    python -m pip install -q -e .
fi
if seqpar build-ext --help >/dev/null 2>&1; then
    say "building the compiled seqpar ops (first time only; falls back to PyTorch if no compiler works)"
    seqpar build-ext || echo "[quickstart] compiled ops unavailable: using the pure-PyTorch kernels"
fi

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ $NGPU -ge 4 ]]; then
    LAUNCH=(env NPROC=4 bash launch/torchrun.sh); DEVICE="4 GPUs (nccl)"
else
    LAUNCH=(bash launch/cpu_gloo.sh); DEVICE="CPU ranks (gloo)"
fi

# A rerun redoes the demo: earlier checkpoints in $OUT are moved aside, not resumed.
STAGE1=(--set checkpoint.overwrite=true --set "checkpoint.dir=$OUT/stage1/checkpoints" --set "checkpoint.export_hf=$OUT/stage1/hf"
        --set "log.dir=$OUT/stage1/logs" --set "data.cache_dir=$OUT/cache")
STAGE2=(--set checkpoint.overwrite=true --set "model.name_or_path=$OUT/stage1/hf" --set "model.tokenizer=$OUT/stage1/hf"
        --set "checkpoint.dir=$OUT/stage2/checkpoints" --set "checkpoint.export_hf=$OUT/stage2/hf"
        --set "log.dir=$OUT/stage2/logs" --set "data.cache_dir=$OUT/cache")
LENGTHS=128,256,512,1024
EVAL=(--num-sequences 8)
if [[ $FAST == 1 ]]; then
    STAGE1+=(--set train.steps=20 --set train.warmup_steps=2 --set log.every=5)
    STAGE2+=(--set train.steps=4 --set train.warmup_steps=1 --set checkpoint.every=2 --set log.every=1)
    EVAL=(--num-sequences 2)
fi
# Held-out evaluation text: a standard-library package the training documents don't reach.
EVAL_DATA=$(python -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['stdlib'], 'xml'))")

# --- 2. short-context pretraining --------------------------------------------------------
say "stage 1: pretraining at 128 tokens on $DEVICE"
"${LAUNCH[@]}" configs/quickstart/stage1_short.yaml "${STAGE1[@]}"

# --- 3. long-context continued pretraining ---------------------------------------------
say "stage 2: continued pretraining at 1024 tokens (8x) with YaRN, SP=4 ring zigzag, ZeRO-2, on $DEVICE"
"${LAUNCH[@]}" configs/quickstart/stage2_long.yaml "${STAGE2[@]}"

# --- 4. perplexity by length, before and after ------------------------------------------
say "evaluating perplexity by length (before: stage 1, after: stage 2)"
seqpar eval ppl --model "$OUT/stage1/hf" --lengths "$LENGTHS" --data "$EVAL_DATA" "${EVAL[@]}" \
    --label "before: 128-token model" --out "$OUT/eval/before"
seqpar eval ppl --model "$OUT/stage2/hf" --lengths "$LENGTHS" --data "$EVAL_DATA" "${EVAL[@]}" \
    --label "after: YaRN x8, 1024 tokens" --out "$OUT/eval/after" --compare "$OUT/eval/before/ppl.json"

say "done in $(( $(date +%s) - START )) s"
cat <<EOF
  checkpoint (DeepSpeed): $OUT/stage2/checkpoints
  Hugging Face export:    $OUT/stage2/hf      (AutoModelForCausalLM.from_pretrained)
  training logs:          $OUT/stage1/logs/metrics.jsonl, $OUT/stage2/logs/metrics.jsonl
  perplexity by length:   $OUT/eval/after/ppl.json and the plot $OUT/eval/after/ppl.png
EOF
