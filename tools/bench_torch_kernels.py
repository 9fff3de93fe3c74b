"""PyTorch's kernels on the shapes of `mcdm bench --kernels`, beside mcdm's: cuDNN's conv2d
(channels_last, torch.backends.cudnn.benchmark) on every conv shape of the table, the concatenation,
nearest upsampling or group norm + SiLU a folded mcdm conv replaces followed by that conv, and
scaled_dot_product_attention on the attention shapes, in the table's storage type.

Usage (scripts/device-check.sh runs it after the kernel table):
    python3 tools/bench_torch_kernels.py bench-kernels.log [--dtype bf16|f16|f32] [--device cuda]
        [--iters 20] [--json out.json]

bench-kernels.log is what `mcdm bench --kernels` printed: its rows
`| conv3x3 tile128 (auto) | n64 32x32 384->384 | ms | ... |` give the shapes and mcdm's times
(per shape, the fastest variant, and the one auto picks). Times are CUDA-event medians of
`--iters` calls after warm-up, as mcdm's are. Prints one markdown table: shape, mcdm's best and
auto ms, PyTorch ms, and PyTorch ms / mcdm auto ms (above 1: mcdm is faster).
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch as th
import torch.nn.functional as F

CONV = re.compile(r"^conv(\d)x\d (?:(concat-read|upsample-read|norm\+SiLU-read) )?(\S+)( \(auto\))?$")
CONV_SHAPE = re.compile(r"^n(\d+) (\d+)x(\d+)(?:->(\d+)x(\d+))? (\d+)(?:\+(\d+))?->(\d+)$")
ATTN_SHAPE = re.compile(r"^n(\d+) t(\d+) c(\d+) heads(\d+)$")
DTYPES = {"bf16": th.bfloat16, "f16": th.float16, "f32": th.float32}


def parse_table(path):
    """{(kind, shape): {"best": ms, "auto": ms}} from the kernel table's rows, in table order."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        try:
            ms = float(cells[2])
        except ValueError:
            continue
        kernel, shape = cells[0], cells[1]
        m = CONV.match(kernel)
        if m:
            kind = f"conv{m.group(1)}x{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else "")
        elif kernel == "attention":
            kind = "attention"
        else:
            continue
        r = rows.setdefault((kind, shape), {"best": ms, "auto": None})
        r["best"] = min(r["best"], ms)
        if kernel.endswith("(auto)") or kind == "attention":
            r["auto"] = ms
    return rows


def time_ms(fn, iters, device):
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def conv_case(kind, shape, dtype, device):
    """The PyTorch work of one conv row and its FLOP count."""
    m = CONV_SHAPE.match(shape)
    if not m:
        raise SystemExit(f"unreadable conv shape `{shape}` in the kernel table")
    n, h, w = int(m.group(1)), int(m.group(2)), int(m.group(3))
    ca, cb, cout = int(m.group(6)), int(m.group(7) or 0), int(m.group(8))
    k = int(kind[4])
    up = "upsample-read" in kind
    oh, ow = (int(m.group(4)), int(m.group(5))) if up else (h, w)
    cl = th.channels_last
    weight = th.randn(cout, ca + cb, k, k, device=device, dtype=dtype).to(memory_format=cl)
    a = th.randn(n, ca, h, w, device=device, dtype=dtype).to(memory_format=cl)
    b = th.randn(n, cb, h, w, device=device, dtype=dtype).to(memory_format=cl) if cb else None
    if "norm+SiLU-read" in kind:
        norm = th.nn.GroupNorm(32, ca, device=device, dtype=dtype)

        def run():
            return F.conv2d(F.silu(norm(a)), weight, padding=k // 2)
    elif up:
        def run():
            return F.conv2d(F.interpolate(a, scale_factor=2, mode="nearest"), weight, padding=k // 2)
    elif cb:
        def run():
            return F.conv2d(th.cat([a, b], dim=1), weight, padding=k // 2)
    else:
        def run():
            return F.conv2d(a, weight, padding=k // 2)
    return run, 2.0 * n * oh * ow * cout * (ca + cb) * k * k


def attention_case(shape, dtype, device):
    m = ATTN_SHAPE.match(shape)
    if not m:
        raise SystemExit(f"unreadable attention shape `{shape}` in the kernel table")
    n, t, c, heads = (int(v) for v in m.groups())
    q, k, v = (th.randn(n, heads, t, c // heads, device=device, dtype=dtype) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v)), 4.0 * n * t * t * c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="the output of `mcdm bench --kernels`")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    device, dtype = th.device(args.device), DTYPES[args.dtype]
    th.backends.cudnn.benchmark = True
    rows = parse_table(args.table)
    if not rows:
        raise SystemExit(f"{args.table}: no conv or attention rows of `mcdm bench --kernels`")
    gpu = th.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    timer = "CUDA events" if device.type == "cuda" else "wall clock"
    print(f"\nPyTorch {th.__version__} on {gpu}, {args.dtype}, channels_last, cudnn.benchmark; "
          f"median of {args.iters} calls ({timer})\n")
    print("| op | shape | mcdm best ms | mcdm auto ms | PyTorch ms | PyTorch TFLOP/s | PyTorch / mcdm auto |")
    print("|---|---|---:|---:|---:|---:|---:|")
    out = []
    with th.no_grad():
        for (kind, shape), r in rows.items():
            if kind == "attention":
                run, flop = attention_case(shape, dtype, device)
                op = "sdpa"
            else:
                run, flop = conv_case(kind, shape, dtype, device)
                op = {"conv3x3 concat-read": "cat + cudnn conv", "conv3x3 upsample-read":
                      "interpolate + cudnn conv", "conv3x3 norm+SiLU-read":
                      "group_norm + silu + cudnn conv"}.get(kind, f"cudnn {kind}")
            ms = time_ms(run, args.iters, device)
            auto = r["auto"] if r["auto"] is not None else r["best"]
            print(f"| {op} | {shape} | {r['best']:.3f} | {auto:.3f} | {ms:.3f} | {flop / ms / 1e9:.1f} | "
                  f"{ms / auto:.2f} |", flush=True)
            out.append(dict(op=op, kind=kind, shape=shape, mcdm_best_ms=r["best"], mcdm_auto_ms=auto,
                            torch_ms=ms, torch_tflops=flop / ms / 1e9, dtype=args.dtype, gpu=gpu,
                            torch=th.__version__))
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    sys.exit(main())
