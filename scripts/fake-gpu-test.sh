#!/usr/bin/env bash
# Runs the GPU tests (tests/gpu_ops.rs, gpu_sample.rs, gpu_text.rs) without a GPU: builds the
# fake CUDA driver of tools/fake-cuda (target/fake-cuda/libcuda.so, the real kernels/*.cu
# emulated on the CPU) and runs the test binaries against it: about 8 minutes on 2 cores, every
# launch in the emulator. Extra arguments go to the test binaries (a test name filter,
# --test-threads=1, ...); --build-only only builds the driver. FAKE_CUDA_MEMORY_BYTES sets the
# fake device's memory size, EMU_SCHEDULE the emulator's thread order (tools/kernel-emu/README.md).
#   --build-asan builds target/fake-cuda-asan, the fake and the emulated kernels under
#   AddressSanitizer and UBSan's alignment check (tests/fake_gpu.rs runs memcheck's counterpart
#   with it); a process loading it needs
#   LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/fake-cuda
sanitizers=""
if [[ ${1:-} == --build-asan ]]; then
    out=target/fake-cuda-asan
    sanitizers="-fsanitize=address,alignment -fno-sanitize-recover=all -fno-omit-frame-pointer"
fi
lib=$out/libcuda.so
export MCDM_NVRTC_LIB="${MCDM_NVRTC_LIB:-$PWD/.nvrtc/nvidia/cu13/lib/libnvrtc.so.13}"
export MCDM_CUDA_INCLUDE="${MCDM_CUDA_INCLUDE:-$PWD/.nvrtc/nvidia/cu13/include}"
if [[ ! -f $MCDM_CUDA_INCLUDE/cuda.h || ! -f $MCDM_NVRTC_LIB ]]; then
    # The fake needs <cuda.h>; mcdm needs NVRTC at build time for the sm_90 CUBINs it loads.
    echo "fake-gpu-test: no NVRTC / CUDA headers; run scripts/install-nvrtc.sh first" >&2
    exit 1
fi

# Rebuilds the library when a kernel, the emulator or the fake is newer than it.
build_fake_driver() {
    if [[ -f $lib ]] &&
        [[ -z $(find kernels tools/kernel-emu tools/fake-cuda -type f ! -name '*.md' -newer "$lib") ]]; then
        return
    fi
    echo "fake-gpu-test: building $lib" >&2
    rm -rf "$out"
    python3 tools/kernel-emu/prep.py --out "$out/emu-src"
    python3 tools/fake-cuda/gen_kernels.py kernels "$out/gen" >&2
    local sources=(tools/fake-cuda/driver.cpp "$out"/gen/kernels_*.cpp)
    export FAKE_CUDA_OUT=$out FAKE_CUDA_CXXFLAGS="-O2 $sanitizers -std=c++17 -pthread -fPIC -fvisibility=hidden \
        -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unknown-pragmas -I$MCDM_CUDA_INCLUDE -I$out/emu-src \
        -Itools/kernel-emu -Itools/fake-cuda"
    # Two at a time (the machine has two cores); xargs fails when one compilation does.
    printf '%s\n' "${sources[@]}" | xargs -P 2 -n 1 sh -c \
        'g++ $FAKE_CUDA_CXXFLAGS -c "$0" -o "$FAKE_CUDA_OUT/$(basename "$0" .cpp).o"'
    # shellcheck disable=SC2086  # sanitizers: zero or more flags
    g++ -shared -pthread $sanitizers -o "$lib" "$out"/*.o -Wl,-soname,libcuda.so.1 -Wl,--no-undefined \
        -Wl,--version-script=tools/fake-cuda/exports.map
    ln -sf libcuda.so "$out/libcuda.so.1"
    # The fake's own error paths, which the GPU tests never take.
    # shellcheck disable=SC2086
    g++ -O2 $sanitizers -std=c++17 -I"$MCDM_CUDA_INCLUDE" -o "$out/self_test" tools/fake-cuda/self_test.cpp \
        -L"$out" -l:libcuda.so.1
    ASAN_OPTIONS=detect_leaks=0 LD_LIBRARY_PATH="$PWD/$out" "$out/self_test" 2>"$out/self_test.log" || {
        cat "$out/self_test.log" >&2
        rm -f "$lib"  # rebuilt and checked again next time
        exit 1
    }
}

build_fake_driver
# tests/fake_gpu.rs builds the drivers this way
[[ ${1:-} == --build-only || ${1:-} == --build-asan ]] && exit 0
# Build the tests first, so that the fake library is only on the path of the test binaries.
cargo test --release --no-run --test gpu_ops --test gpu_sample --test gpu_text
if [[ -d models/all-MiniLM-L6-v2 ]]; then
    unset MCDM_SKIP_TEXT_TESTS
else
    echo "fake-gpu-test: models/all-MiniLM-L6-v2 missing (scripts/fetch-text-model.sh): text tests skipped" >&2
    export MCDM_SKIP_TEXT_TESTS=1
fi
# --no-fail-fast: a failure in one binary does not hide the results of the others.
LD_LIBRARY_PATH="$PWD/$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --release --no-fail-fast --test gpu_ops --test gpu_sample --test gpu_text -- "$@"
