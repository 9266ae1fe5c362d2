#!/usr/bin/env bash
# Every check that needs a GPU, in one short call (the device machine is lent for minutes):
#   bash benchmarks/gpu_check.sh        (after `make setup`; writes logs to $OUT or ./gpu-check)
# 1. CUDA unit checks (evaluation with model, classifier and metric states on the GPU);
# 2. the end-to-end story on the tiny data, every stage on the GPU (GENPIPE_DEVICE=cuda);
# 3. the modern generators' steps/s and samples/s under profiles/gpu.yaml (bench_modern.py), ≤ 2 minutes;
# 4. the GPU benchmark (bench_gpu.py: DCGAN-64 img/s and MFU, batch 256/512/1024, eager and compiled),
#    given ≤ 3 minutes (it skips and lists the runs it has no time for) and killed at 4.5.
# About 9.5 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
.venv/bin/pytest -q -rs tests/gpu 2>&1 | tee "$out/cuda-tests.log" || status=1
GENPIPE_DEVICE=cuda .venv/bin/pytest -q -x tests/test_pipeline_e2e.py 2>&1 | tee "$out/e2e-cuda.log" || status=1
PYTHONUNBUFFERED=1 timeout 120 .venv/bin/python benchmarks/bench_modern.py \
  --markdown-out "$out/modern-bench.md" 2>&1 | tee "$out/modern-bench.log" || status=1
PYTHONUNBUFFERED=1 timeout 270 .venv/bin/python benchmarks/bench_gpu.py --budget-s 180 \
  --markdown-out "$out/gpu-bench.md" 2>&1 | tee "$out/gpu-bench.log" || status=1
exit $status
