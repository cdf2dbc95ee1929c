#!/usr/bin/env bash
# GPU checks in one go (fits in ten minutes on one H100): the CUDA tests, then the acceleration benchmark.
# Run on a machine with CUDA from the repository root:  bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 "$PY" -m pytest -q -m gpu tests
timeout 280 "$PY" benchmarks/accelerate.py --out results/accelerate.json
