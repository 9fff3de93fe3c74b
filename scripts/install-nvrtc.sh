#!/usr/bin/env bash
# Installs NVRTC (the CUDA runtime compiler) and the CUDA headers it needs from PyPI into
# <repo>/.nvrtc/ (ignored by git), so that build.rs compiles kernels/*.cu to CUBIN/PTX on a
# machine without a GPU or a CUDA toolkit. Needs python3 with pip.
#
#   scripts/install-nvrtc.sh            # -> <repo>/.nvrtc
#   scripts/install-nvrtc.sh DIR        # -> DIR
#
# Result: DIR/nvidia/cu13/lib/libnvrtc.so.13 and DIR/nvidia/cu13/include/cuda_fp16.h (...).
# build.rs finds <repo>/.nvrtc by itself; for another DIR export
#   MCDM_NVRTC_LIB=DIR/nvidia/cu13/lib/libnvrtc.so.13 MCDM_CUDA_INCLUDE=DIR/nvidia/cu13/include
# The last line printed to stdout is those two assignments (for `eval "$(...)"`).
#
# NVRTC 13.0 is pinned to match the CUDA 13.0 driver of the GPU machine: PTX from a newer NVRTC
# does not load on an older driver. Re-running is cheap: a complete install of the pinned
# versions is kept.
set -euo pipefail

NVRTC_VERSION=13.0.88
RUNTIME_VERSION=13.0.96

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/.nvrtc}"
lib="$dest/nvidia/cu13/lib/libnvrtc.so.13"
inc="$dest/nvidia/cu13/include"
stamp="$dest/.mcdm-nvrtc-$NVRTC_VERSION-$RUNTIME_VERSION"

complete() {
    [[ -f "$stamp" && -f "$lib" && -f "$inc/cuda_fp16.h" && -f "$inc/cuda_bf16.h" ]]
}

if complete; then
    echo "install-nvrtc: $dest already holds NVRTC $NVRTC_VERSION" >&2
else
    command -v python3 >/dev/null || { echo "install-nvrtc: needs python3 with pip" >&2; exit 1; }
    # A fresh target: pip --target does not replace files of an older install cleanly.
    rm -rf "$dest"
    mkdir -p "$dest"
    python3 -m pip install --quiet --no-deps --no-compile --disable-pip-version-check \
        --target "$dest" \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-runtime==$RUNTIME_VERSION" >&2
    [[ -f "$lib" ]] || { echo "install-nvrtc: $lib missing after pip install" >&2; exit 1; }
    [[ -f "$inc/cuda_fp16.h" ]] || { echo "install-nvrtc: $inc/cuda_fp16.h missing" >&2; exit 1; }
    touch "$stamp"
    echo "install-nvrtc: installed NVRTC $NVRTC_VERSION into $dest" >&2
    # build.rs watches the library only once it exists: make cargo rerun it (mtime only).
    if [[ "$dest" == "$repo_root/.nvrtc" && -f "$repo_root/build.rs" ]]; then
        touch "$repo_root/build.rs"
    fi
fi
echo "MCDM_NVRTC_LIB=$lib MCDM_CUDA_INCLUDE=$inc"
