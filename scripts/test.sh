#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then `cargo test --locked`
# with any extra arguments. Both installs are cached and cheap to repeat:
# - NVRTC and the CUDA headers (scripts/install-nvrtc.sh, into the ignored .nvrtc/), so that
#   build.rs compiles every kernel and the kernel-emulation and fake-driver tests can run;
# - the MiniLM sentence encoder (scripts/fetch-text-model.sh) for the text-encoder tests.
# g++ (with its AddressSanitizer runtime) and python3 come from the system. With
# MCDM_REQUIRE_ALL_CHECKS=1 (CI) a check that cannot run here fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-nvrtc.sh >/dev/null
export MCDM_NVRTC_LIB="$PWD/.nvrtc/nvidia/cu13/lib/libnvrtc.so.13"
export MCDM_CUDA_INCLUDE="$PWD/.nvrtc/nvidia/cu13/include"
export MCDM_REQUIRE_NVRTC=1
scripts/fetch-text-model.sh >/dev/null
exec cargo test --locked "$@"
