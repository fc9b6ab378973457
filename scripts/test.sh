#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test.
# GPU tests skip with a message where no CUDA device exists.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests run the binary and pass it paths through a shell, unquoted.
case "$PWD${TMPDIR:-}" in
  *[[:space:]]*) echo "test.sh: the tests need a checkout path (and TMPDIR) without spaces: $PWD" >&2; exit 2 ;;
esac
bash scripts/install-deps.sh
bash scripts/build.sh
# Two tests at a time, one thread each: libtorch's OpenMP threads spin, and two
# processes with two threads each on two cores run many times slower.
# --no-tests=error: a build without its tests must not pass as a green run.
OMP_NUM_THREADS=1 ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j2 --timeout 900 --no-tests=error
