#!/usr/bin/env bash
# The GPU path, checked on a CUDA machine in one go (issue: speed / GPU path):
#   1. every test marked `gpu` (pipelines and methods on device cuda; skipped where there is no CUDA);
#   2. scripts/gpu_check.py: GPTQ / AWQ / learned rounding on one Llama-2-7B-shaped layer with
#      128 x 2048 tokens, and GPTQ on a whole random 7B-shaped model streamed from disk, with peak memory.
# Record the printed table in eval/results/gpu.md.
#   scripts/gpu_check.sh              # on the GPU machine
#   scripts/gpu_check.sh --dry-run    # tiny model on the CPU: checks the script itself (runs in the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ "${1:-}" == "--dry-run" ]]; then
    exec "$PY" scripts/gpu_check.py --device cpu --dry-run
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --dry-run off a GPU machine")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -m gpu tests
"$PY" scripts/gpu_check.py --device cuda "$@"
