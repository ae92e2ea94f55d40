#!/usr/bin/env bash
# One call on a GPU machine for the flash kernels (forward, backward, decode): build against
# the machine's jax, check every kernel variant against a float64 reference, compute-sanitizer
# memcheck and racecheck on small shapes, then the flash and decode GPU tests with what is
# left of a 10-minute call. The benchmarks run separately (tools/device_bench.sh, on this
# build while the machine is warm); the SparseK kernels have tools/device_sparsek.sh.
#   tools/device_check.sh [STAGE,...]   (check_and_time.py's check stages; default: all)
# Logs go to $OUT (or ./device_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

stage() {  # stage NAME SECONDS CMD...: runs CMD under a time limit, logs it, shows its tail
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$SECONDS s] $name rc=$rc"
  tail -n "${TAIL:-8}" "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
stage build 300 tools/dev_build.sh -DJAX_SPARSEK_CUDA=ON -DPython_EXECUTABLE="$(command -v python3)" \
  || exit 1
# The checks share one limit: a kernel that hangs costs this stage, not the call.
stage kernels 200 python3 cpp/flash_attention/cuda/check_and_time.py check ${1:-}
stage sanitize 150 python3 cpp/flash_attention/cuda/check_and_time.py sanitize
# ~50 tests, each compiling its own jitted value-and-gradient pair: a few seconds apiece.
stage gpu_tests $(( ${CALL_SECONDS:-580} - SECONDS )) python3 -m pytest -p no:cacheprovider -q \
  -m gpu tests/flash_attention/test_flash_attention_cuda.py tests/decode/test_decode.py
