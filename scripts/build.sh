#!/usr/bin/env bash
# Configures and builds into build/ (BUILD_DIR to change): every target, or the ones
# given as arguments (scripts/build.sh longlora-train). CUDA kernels are built when
# nvcc is found and the LibTorch has CUDA; LONGLORA_CUDA=OFF forces CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
if [ -n "${LIBTORCH_DIR:-}" ]; then
  PREFIX="$LIBTORCH_DIR"
else
  PREFIX="$(.venv/bin/python -W ignore -c 'import torch; print(torch.utils.cmake_prefix_path)')"
fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" \
  -DLONGLORA_CUDA="${LONGLORA_CUDA:-ON}" ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j"$(nproc)" ${1:+--target "$@"}
