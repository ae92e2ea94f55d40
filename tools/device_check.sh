#!/usr/bin/env bash
# One call on a GPU machine whose jax is preinstalled: build against that jax, check the CUDA
# kernels (correctness against a float64 reference, compute-sanitizer), run the GPU tests,
# then benchmark presets side by side with the peers. Usage:
#   tools/device_check.sh [PRESET ...]        (default: seed000 seed003)
# Logs go to $OUT (or ./device_out); benchmark JSON to benchmarks/results/ and $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
presets=("${@:-seed000 seed003}")

stage() {  # stage NAME SECONDS CMD...: runs CMD under a time limit, logs it, shows its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-12}" "$OUT/$name.log"
  echo "[$name rc=$rc]"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
stage build 300 tools/dev_build.sh -DJAX_SPARSEK_CUDA=ON -DPython_EXECUTABLE="$(command -v python3)"
stage kernels 240 python3 cpp/flash_attention/cuda/check_and_time.py check
stage sanitize 150 python3 cpp/flash_attention/cuda/check_and_time.py sanitize
stage gpu_tests 240 python3 -m pytest -p no:cacheprovider -m gpu tests
TAIL=40 stage bench 900 python3 -m benchmarks --preset ${presets[*]} \
  --impl jax_sparsek "jax.nn[cudnn]" "torch.sdpa[cudnn]" torch.flex pallas.attention_mgpu
cp -r benchmarks/results "$OUT/" 2>/dev/null
