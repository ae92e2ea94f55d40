#!/usr/bin/env bash
# One call on a GPU machine for the CUDA SparseK kernels: build, the GPU tests, memcheck and
# racecheck on small shapes, timings next to cuDNN. The benchmark harness runs separately
# (tools/device_bench.sh), on this build when called while the machine is still warm.
# Logs go to $OUT (or ./device_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name --format=csv,noheader
tools/dev_build.sh -DJAX_SPARSEK_CUDA=ON -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 \
  || { grep -m5 error "$OUT/build.log"; exit 1; }
echo "[$SECONDS s] built"
# A few value-and-gradient cases first under a short timeout: a kernel that hangs (a barrier or
# register split that never completes) then costs ~1 minute of the call, not all of it.
SMOKE="values and (many or noncausal)"
timeout 100 python3 -m pytest -p no:cacheprovider -q -x -m gpu tests/sparsek/test_sparsek_cuda.py \
  -k "$SMOKE" > "$OUT/smoke.log" 2>&1
rc=$?; echo "[$SECONDS s] smoke rc=$rc"; tail -n 2 "$OUT/smoke.log"
[ "$rc" = 124 ] && { echo "smoke test timed out: a kernel hangs"; exit 3; }
timeout 260 python3 -m pytest -p no:cacheprovider -q -m gpu tests/sparsek/test_sparsek_cuda.py \
  -k "not ($SMOKE)" > "$OUT/tests.log" 2>&1
echo "[$SECONDS s] tests rc=$?"; tail -n 3 "$OUT/tests.log"
timeout 200 python3 cpp/sparsek/cuda/check_and_time.py time > "$OUT/time.log" 2>&1
echo "[$SECONDS s] time rc=$?"; grep -v "^W\|^E\|^I" "$OUT/time.log" | tail -n 20
# The sanitizers take what is left of a 10-minute call.
timeout $(( ${CALL_SECONDS:-580} - SECONDS )) python3 cpp/sparsek/cuda/check_and_time.py sanitize 2>&1 \
  | tee "$OUT/sanitize.log"
echo "[$SECONDS s] done"
