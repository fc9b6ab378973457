#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test.
# GPU tests skip with a message where no CUDA device exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
# Two tests at a time, one thread each: libtorch's OpenMP threads spin, and two
# processes with two threads each on two cores run many times slower.
OMP_NUM_THREADS=1 ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j2 --timeout 900
