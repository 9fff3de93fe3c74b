"""Real ptxas resource reports (`--ptxas-options=-v`, from NVRTC) for the parser in
src/cuda/ptxas_report.rs: kernels/group_norm.cu as build.rs compiles it (several entries, shared
memory), and a kernel limited to 32 registers so that ptxas spills.

    python tools/make_ptxas_fixtures.py   (needs scripts/install-nvrtc.sh's .nvrtc/)

Writes tests/fixtures/ptxas/{group_norm.sm_90,spill.sm_90}.log.
"""

import ctypes
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / ".nvrtc/nvidia/cu13"
OUT = ROOT / "tests/fixtures/ptxas"
# build.rs's COMMON_OPTIONS
COMMON = ["-std=c++17", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]

SPILL = """
// 64 live accumulators under a 32-register cap: ptxas keeps the rest on the stack.
extern "C" __global__ void spill(float* out, const float* in, int n) {
    float acc[64];
    #pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = in[(threadIdx.x + i * 7) % n];
    for (int r = 0; r < 8; r++) {
        #pragma unroll
        for (int i = 0; i < 64; i++) acc[i] = acc[i] * acc[(i + r) % 64] + 1.0f;
    }
    float s = 0;
    #pragma unroll
    for (int i = 0; i < 64; i++) s += acc[i];
    out[threadIdx.x] = s;
}
extern "C" __global__ void store_one(float* out) { out[threadIdx.x] = 1.0f; }
"""


def ptxas_report(nvrtc, name, source, options):
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
    args = [o.encode() for o in options + ["--ptxas-options=-v"]]
    status = nvrtc.nvrtcCompileProgram(prog, len(args), (ctypes.c_char_p * len(args))(*args))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if status != 0:
        raise SystemExit(f"{name}: NVRTC error {status}:\n{log.value.decode()}")
    return log.value.decode()


def check(nvrtc, status):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(nvrtc.nvrtcGetErrorString(status).decode())


def main():
    lib = CUDA / "lib"
    # libnvrtc loads its builtins library by name: it must be on the loader's path.
    os.environ["LD_LIBRARY_PATH"] = f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    ctypes.CDLL(str(lib / "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(lib / "libnvrtc.so.13"))
    OUT.mkdir(parents=True, exist_ok=True)
    arch = ["--gpu-architecture=sm_90"]
    group_norm = ptxas_report(
        nvrtc,
        "group_norm.cu",
        (ROOT / "kernels/group_norm.cu").read_text(),
        arch + [f"--include-path={ROOT / 'kernels'}", f"--include-path={CUDA / 'include'}"] + COMMON,
    )
    spill = ptxas_report(nvrtc, "spill.cu", SPILL, arch + COMMON + ["--maxrregcount=32"])
    for name, log in [("group_norm.sm_90", group_norm), ("spill.sm_90", spill)]:
        path = OUT / f"{name}.log"
        path.write_text(log)
        print(f"wrote {path.relative_to(ROOT)} ({len(log.splitlines())} lines)")


if __name__ == "__main__":
    main()
