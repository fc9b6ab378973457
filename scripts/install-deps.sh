#!/usr/bin/env bash
# Installs what longlora-train needs on Debian 12 or Ubuntu 24.04 (idempotent;
# as root or with sudo): the distribution's packages, and LibTorch through
# PyPI's torch wheel in .venv/ inside the project -- unless LIBTORCH_DIR points
# at a LibTorch of your own (an unzipped LibTorch, or torch's share/cmake dir).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  echo "install-deps: warning: run through sudo, so .venv/, build/ and runs/ will belong to root;" \
       "run the scripts as $SUDO_USER (they use sudo for the packages alone)" >&2
fi

PKGS=(build-essential cmake pkg-config python3 python3-venv
      libsentencepiece-dev nlohmann-json3-dev libcli11-dev
      libspdlog-dev libfmt-dev libgtest-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing packages, and neither root nor sudo to install them; as root run:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # env: sudo resets the environment, which would drop the variable.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ -n "${LIBTORCH_DIR:-}" ]; then
  echo "install-deps: using LibTorch at $LIBTORCH_DIR"
  exit 0
fi

TORCH_SPEC="${TORCH_SPEC:-torch==2.11.*}"
# A venv without pip (made before python3-venv was there, or cut short) is made again.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  python3 -m venv --clear .venv
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # --no-cache-dir: the CUDA wheels are ~3 GB; pip's cache would hold a second copy
  # of them beside the 4.6 GB install (a CI run once ran out of disk doing that).
  NVCC="$(command -v nvcc || true)"
  if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
  CUDA_MAJOR="$([ -n "$NVCC" ] && "$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p' || true)"
  if [ "$CUDA_MAJOR" = 13 ]; then
    # PyPI's Linux wheel is the CUDA 13 build: the kernels compile against it.
    .venv/bin/python -m pip install --no-cache-dir --progress-bar off "$TORCH_SPEC"
  else
    # No CUDA 13 toolkit: a CUDA LibTorch cannot be configured without one (nor built
    # against another major); take the CPU wheel. TORCH_INDEX_URL: a mirror of it.
    if [ -n "$NVCC" ]; then echo "install-deps: $NVCC is CUDA ${CUDA_MAJOR:-?}, not 13: installing the CPU LibTorch"; fi
    .venv/bin/python -m pip install --no-cache-dir --progress-bar off "$TORCH_SPEC" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
fi
# -W: the wheel warns that NumPy is missing; we use LibTorch, not NumPy.
.venv/bin/python -W ignore -c 'import torch; print("install-deps: torch", torch.__version__, "cuda", torch.version.cuda)'
# A torch installed earlier is kept: say so when it is not the one asked for.
if [ "$TORCH_SPEC" = "torch==2.11.*" ] && ! .venv/bin/python -W ignore -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.11."))'; then
  echo "install-deps: warning: .venv holds another torch than 2.11 (remove .venv to install 2.11)" >&2
fi
