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
  if [ ! -x .venv/bin/python ]; then
    echo "build.sh: no .venv with torch: run scripts/install-deps.sh first (or set LIBTORCH_DIR)" >&2
    exit 2
  fi
  PREFIX="$(.venv/bin/python -W ignore -c 'import torch; print(torch.utils.cmake_prefix_path)')"
fi
# CMake keeps the LibTorch it found in its cache: another one (LIBTORCH_DIR set or
# changed) starts the configuration afresh instead of building against the old one.
mkdir -p "$BUILD_DIR"
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && [ -f "$BUILD_DIR/.libtorch-prefix" ] &&
   [ "$(cat "$BUILD_DIR/.libtorch-prefix")" != "$PREFIX" ]; then
  echo "build.sh: LibTorch changed to $PREFIX: configuring $BUILD_DIR afresh"
  rm -f "$BUILD_DIR/CMakeCache.txt"
fi
printf '%s' "$PREFIX" > "$BUILD_DIR/.libtorch-prefix"
# LONGLORA_CUDA only when given: a build configured with OFF stays so for test.sh and demo.sh.
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" \
  ${LONGLORA_CUDA:+-DLONGLORA_CUDA="$LONGLORA_CUDA"} ${CMAKE_ARGS:-}
# A compiler with the precompiled LibTorch header (0.7 GB) takes up to about 2 GB: no
# more jobs than the available memory holds, however many cores there are.
JOBS=$(nproc)
MEM_GB=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 0)
if [ "$MEM_GB" -gt 0 ] && [ $((MEM_GB / 2)) -lt "$JOBS" ]; then JOBS=$((MEM_GB / 2 > 0 ? MEM_GB / 2 : 1)); fi
cmake --build "$BUILD_DIR" -j"$JOBS" ${1:+--target "$@"}
