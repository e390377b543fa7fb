#!/usr/bin/env bash
# One-call GPU check for the m2la kernels (H100/H200), sized for a ~9.5 minute device window (call it with timeout_s 600):
#  1. GPU tests (bf16/fp16, native compiler) in the background while 12 processes compile every
#     decode-sweep case into triton's cache (compiles are CPU work; the GPU stays idle for timing),
#     and ptxas's registers/spills for every sweep tile -> $OUT/register_facts.md;
#  2. correctness + copy bandwidth + decode config sweep + decode/prefill timings vs SDPA, the decode
#     table run with the sweep's best tile per layout, fp8-cache decode, and vLLM's Triton MLA decode
#     on the same caches, and short extends (1-128 new tokens after 32K) through every prefill mode
#     (and a 16-head layer's decode route with packed query blocks beside one decode a token)
#     -> ${OUT:-/tmp/m2la-out}/kernels.md
# Usage (repo root): bash benchmarks/gpu_check.sh
# Environment: M2LA_SWEEP_SET=fp8 times the fp8-tile sweep (gpu_kernels.SWEEP_FP8) instead of the
# full one, M2LA_SWEEP_SET=overlap the two-programs-per-SM tiles (gpu_kernels.SWEEP_OVERLAP);
# M2LA_SECTIONS picks benchmark sections (default: all of gpu_kernels.py's; add "compiled" for
# benchmarks/compiled_decode.py: eager against torch.compile, and a static cache under CUDA graphs;
# "tma_probe" for benchmarks/tma_decode_probe.py --run: the library's TMA decode tile and a stripped
# TMA + wgmma loop for 896 + 128, timed beside the library default);
# "lossless" for gpu_kernels.py's decode of a lossless conversion (32 heads, 1024 + 1024) beside SDPA over
# the GQA cache it came from, and a grouped decode tile sweep; "lossless_prefill" for its chunked
# prefill (plain, grouped, SDPA with GQA) and short extends through the grouped prefill's two modes
# and the one-decode-a-token route they replaced;
# "bench" (run before gpu_kernels.py) for the packaged `m2la bench decode | prefill | write` at their
# GPU defaults (the issue's shapes; the tables users get from a pip install; vLLM's Triton MLA decode
# beside ours when benchmarks/_third_party holds it; the lossless layout's grouped kernels and, fine-tuned
# out of them, its plain decode of RoPE-only queries; 8 x 4-token
# extends after 32K) -> $OUT/bench_*.md;
# "flashmla" for benchmarks/flashmla_baseline.py run: FlashMLA's compiled decode (from vLLM's wheel)
# against ours on DeepSeek's 512 + 64 layout, in a process of its own);
# M2LA_REGISTER_FACTS=0 skips the ptxas table; M2LA_GPU_TESTS=0 skips the GPU tests and
# M2LA_GPU_TESTS_K="<pytest -k expression>" runs a subset of them (say, leaving out the
# model-level tests that compile with inductor: "not converted and not static and not inductor"). The sweep
# precompile runs only when the sections hold "sweep" or "decode".
# vLLM's kernel is timed only when benchmarks/_third_party/ holds it (git-ignored): run
# `python benchmarks/vllm_triton_mla.py <vllm wheel>` here first and pass
# carry=["benchmarks/_third_party"] to the device call. FlashMLA likewise: `python
# benchmarks/flashmla_baseline.py extract <vllm wheel>` puts it in the same folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/m2la-out}"
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
SECONDS=0

echo "== GPU tests (background) + parallel compile of the sweep + register facts (background) =="
facts_pid=""
if [ "${M2LA_REGISTER_FACTS:-1}" != 0 ]; then
    timeout 300 python benchmarks/decode_register_facts.py > "$OUT/register_facts.md" 2> "$OUT/register_facts.err" &
    facts_pid=$!
fi
tests_pid=""
if [ "${M2LA_GPU_TESTS:-1}" != 0 ]; then
    M2LA_TRITON_NATIVE=1 timeout 240 python -m pytest tests/kernels/test_kernel_gpu.py -q -p no:cacheprovider \
        ${M2LA_GPU_TESTS_K:+-k "$M2LA_GPU_TESTS_K"} \
        > "$OUT/gpu_tests.txt" 2>&1 &
    tests_pid=$!
fi
sweep_set="${M2LA_SWEEP_SET:-all}"
sections="${M2LA_SECTIONS:-sweep,decode,fp8,vllm,splits,prefill,prefill_sweep,extend}"
if [[ ",$sections," == *",sweep,"* || ",$sections," == *",decode,"* ]]; then
    timeout 240 python benchmarks/gpu_kernels.py --warm-only --sweep-set "$sweep_set" --warm-workers "${M2LA_WARM_WORKERS:-12}" 2>&1 \
        | tail -3 | tee "$OUT/warm.log" || echo "warm compile failed or timed out; the sweep compiles as it goes"
fi
if [ -n "$tests_pid" ]; then
    wait "$tests_pid" || echo "GPU TESTS FAILED (see $OUT/gpu_tests.txt); benchmarking anyway"
    tail -25 "$OUT/gpu_tests.txt"
fi
echo "== tests + compile took ${SECONDS} s =="

if [[ ",$sections," == *",bench,"* ]]; then  # not a default section; first, the headline tables (~2-3 min)
    echo "== m2la bench decode / prefill / write (the packaged microbenchmark, GPU defaults) =="
    vllm_args=()
    vllm_copy=benchmarks/_third_party/vllm_triton_decode_attention.py
    if [ -f "$vllm_copy" ]; then vllm_args=(--vllm-kernel "$vllm_copy"); fi
    timeout 100 python -m m2la.cli bench decode --repeats 10 --json "$OUT/bench_decode.json" "${vllm_args[@]}" 2>&1 \
        | tee "$OUT/bench_decode.md"
    timeout 60 python -m m2la.cli bench decode --lossless --repeats 10 --json "$OUT/bench_decode_lossless.json" 2>&1 \
        | tee "$OUT/bench_decode_lossless.md"
    # the same layer fine-tuned out of its grouped form: the plain decode, RoPE-only queries (n = 0)
    timeout 60 python -m m2la.cli bench decode --kv-rank 1024 --rope-dim 1024 --nope-dim 0 --repeats 10 \
        --json "$OUT/bench_decode_rope_only.json" 2>&1 | tee "$OUT/bench_decode_rope_only.md"
    timeout 90 python -m m2la.cli bench prefill --repeats 10 --json "$OUT/bench_prefill.json" 2>&1 \
        | tee "$OUT/bench_prefill.md"
    timeout 60 python -m m2la.cli bench prefill --lossless --repeats 10 --json "$OUT/bench_prefill_lossless.json" \
        2>&1 | tee "$OUT/bench_prefill_lossless.md"
    timeout 45 python -m m2la.cli bench write --repeats 10 --json "$OUT/bench_write.json" 2>&1 | tee "$OUT/bench_write.md"
    for layout in "" --lossless; do  # a speculative step: 4 tokens for each of 8 sequences after 32K
        timeout 45 python -m m2la.cli bench prefill $layout --chunk 4 --prefix 32768 --batch 8 --repeats 10 2>&1 \
            | tee -a "$OUT/bench_extend.md"
    done
fi
echo "== benchmark =="
timeout 330 python benchmarks/gpu_kernels.py --seconds "${M2LA_BENCH_SECONDS:-290}" --sweep-seconds 130 \
    --sweep-set "$sweep_set" --sections "$sections" --warm-workers 0 --use-best --contexts 4096 32768 131072 2>&1 \
    | tee "$OUT/gpu_kernels.log"
if [[ ",$sections," == *",tma_probe,"* ]]; then  # not in the default sections: ~1-2 minutes
    echo "== TMA decode tile and probe for 896 + 128 against the library default (benchmarks/tma_decode_probe.py) =="
    timeout 180 python benchmarks/tma_decode_probe.py --run 2>&1 | tee "$OUT/tma_probe.md"
fi
if [[ ",$sections," == *",flashmla,"* ]]; then  # not in the default sections: ~1-2 minutes
    echo "== FlashMLA's dense decode beside m2la's on DeepSeek's 512 + 64 layout (benchmarks/flashmla_baseline.py) =="
    timeout 180 python benchmarks/flashmla_baseline.py run 2>&1 | tee "$OUT/flashmla.md"
fi
if [[ ",$sections," == *",compiled,"* ]]; then  # not in the default sections: ~3-4 minutes of compiles
    echo "== compiled decode (eager vs torch.compile of a converted Llama, growing and static caches) =="
    timeout 300 python benchmarks/compiled_decode.py --batches 1 8 --seconds 170 2>&1 | tail -8
fi
if [ -n "$facts_pid" ]; then wait "$facts_pid" || echo "register facts failed (see $OUT/register_facts.err)"; fi
echo "== total ${SECONDS} s =="
