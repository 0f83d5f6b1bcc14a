#!/usr/bin/env bash
# The one test command (README, CI). Sets up .venv itself, then runs the CPU suite.
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build on a CPU machine.
# Default: the main suite (tests not marked `extended`). `bash tests/run.sh -m extended`
# runs the slow suites (cluster launches, studies); a later -m wins over the default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[tests/run.sh] creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${SEQPAR_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e '.[test,mpi]'
echo "[tests/run.sh] torch $(python -c 'import torch; print(torch.__version__)'), running pytest"
exec python -m pytest -q -m "not extended" "$@"
