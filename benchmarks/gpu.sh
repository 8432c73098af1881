#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests, `bench codec` (CPU and CUDA), the
# TTFT sweep on CUDA, then the eval grids with several runs sharing the GPU (fp32, so the
# answers compare with CPU runs; relevance is filled in later by `qkvcomm rescore`).
# Results land in results/, logs in logs/. PY: the Python that has qkv_core's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p logs
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
$PY -m qkvcomm_cli bench codec | tee logs/bench-codec.md
$PY -m qkvcomm_cli bench ttft --device cuda --json results/bench-ttft-cuda.json | tee logs/bench-ttft-cuda.md
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} QKVCOMM="$PY -m qkvcomm_cli" JOBS=${JOBS:-8} EVAL_FLAGS="--device cuda --dtype float32 --no-relevance" \
  benchmarks/grid.sh benchmarks/grids/{layers,hops,presets,datasets}.txt
echo "gpu.sh finished"
