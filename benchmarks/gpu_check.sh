#!/usr/bin/env bash
# One-call GPU check for the m2la kernels (H100/H200): GPU tests (bf16/fp16, native compiler),
# then correctness + copy bandwidth + decode/prefill timings vs SDPA -> ${OUT:-/tmp/m2la-out}/kernels.md
# Usage (repo root): bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/m2la-out}"
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== GPU tests (bf16/fp16) =="
M2LA_TRITON_NATIVE=1 timeout 170 python -m pytest tests/kernels/test_kernel_gpu.py -q -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.txt" || echo "GPU TESTS FAILED (see $OUT/gpu_tests.txt); benchmarking anyway"

echo "== benchmark =="
timeout 300 python benchmarks/gpu_kernels.py --seconds "${M2LA_BENCH_SECONDS:-230}" --sweep-seconds 75 2>&1 | tee "$OUT/gpu_kernels.log"
