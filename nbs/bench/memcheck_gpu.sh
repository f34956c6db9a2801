#!/usr/bin/env bash
# compute-sanitizer memcheck of test files on one CUDA machine, only moe-lit's own (Triton) kernels instrumented:
# their names are plain identifiers (`_fused_moe_kernel`), torch's are mangled (`_ZN2at6native...`), so the regex below
# leaves torch's kernels (random inputs, float64 references) running uninstrumented, an order of magnitude faster.
#   LIMIT=500 bash nbs/bench/memcheck_gpu.sh NAME tests/test_a.py tests/test_b.py ...   (pytest args after NAME)
# Writes $OUT/memcheck_NAME_${CARD:-gpu}_$C.log: every test's outcome as it finishes (-v) and the sanitizer's summary.
# torch's caching allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1; set it to 0 to keep it): every tensor is its own
# cudaMalloc, so a read past one tensor into a neighbour of the same cached block is reported too, and a worker holds
# only its live tensors (with the cache on, two workers of the quant tests ran an H100 out of memory under the sanitizer).
# CUDA-graph captures need the cache (a capture allocates from its private pool: cudaMalloc inside a capture fails), so
# run the capture tests with PYTORCH_NO_CUDA_MEMORY_CACHING=0 (test_layer.py -k "cuda_graphs or fast_launch or
# programmatic"); a test that starts Python subprocesses runs them under the sanitizer too (slow: leave it out).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export PYTORCH_NO_CUDA_MEMORY_CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-1}
name=$1; shift
log="$OUT/memcheck_${name}_${CARD:-gpu}_$C.log"
timeout "${LIMIT:-500}" compute-sanitizer --tool memcheck --error-exitcode 1 --kernel-regex 'kns=^_[a-z]' \
  python -m pytest -v -p no:cacheprovider -n "${WORKERS:-4}" -m "gpu or not gpu" "$@" > "$log" 2>&1
echo "memcheck exit $?" >> "$log"
grep -oE "(PASSED|FAILED|ERROR) |[0-9]+ (passed|failed)|ERROR SUMMARY.*|Invalid.*|memcheck exit.*" "$log" | sort | uniq -c | sort -rn | head -20
