#!/usr/bin/env bash
# Installs the pinned nvcc (CUDA 13.0) from PyPI wheels into a local folder, no system toolkit
# needed. All five pins matter: newer nvcc writes PTX the GPU machines' driver (580, CUDA 13.0)
# cannot load. Prints the nvcc path; build with: NVCC=$(tools/install-nvcc.sh) cargo build --features cuda
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${TOFFEE_NVCC_DIR:-$here/.nvcc}"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
"$nvcc" --version >&2
echo "$nvcc"
