#!/usr/bin/env bash
# Developer loop: builds the extension in build/dev and drops it into jax_sparsek/, so that
# `PYTHONPATH=. pytest` runs this tree without reinstalling. Pass -DJAX_SPARSEK_CUDA=OFF
# (or ON) to choose the CUDA handlers; extra arguments go to CMake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build/dev
cp build/dev/_jax_sparsek_ext*.so jax_sparsek/
