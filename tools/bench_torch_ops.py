"""Times guided-diffusion's ops in PyTorch on the CPU at the shapes of benches/cpu_ops.json, runs
mcdm's criterion benchmark of the same shapes (`cargo bench --bench cpu_ops`), and prints one
table with both.

Usage:
    /opt/gdenv/bin/python tools/bench_torch_ops.py [--threads N] [--runs 20] [--rounds 1] [--no-cargo]
        [--criterion target/criterion] [--json out.json]

The PyTorch side is the reference's own modules (guided_diffusion.nn.conv_nd, normalization +
SiLU, guided_diffusion.unet.QKVAttention, new head order), NCHW float32 under torch.no_grad(),
the median of `--runs` calls after 3 warm-up calls. mcdm's figure is criterion's median
(target/criterion/<op>/<shape>/new/estimates.json); `--no-cargo` reads an earlier run's.
Both use `--threads` threads (default: all cores, as rayon does).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_id(s):
    k, st = s["k"], s["stride"]
    return f"{k}x{k}s{st}_n{s['n']}_{s['h']}x{s['w']}_{s['cin']}-{s['cout']}"


def gn_id(s):
    return f"n{s['n']}_{s['h']}x{s['w']}_c{s['c']}"


def attention_id(s):
    return f"n{s['n']}_t{s['t']}_c{s['c']}_heads{s['heads']}"


def cases():
    """(op, criterion id, torch module, input, work, unit) per shape of benches/cpu_ops.json."""
    from guided_diffusion.nn import conv_nd, normalization
    from guided_diffusion.unet import QKVAttention

    with open(os.path.join(ROOT, "benches", "cpu_ops.json")) as f:
        shapes = json.load(f)
    g = th.Generator().manual_seed(0)
    out = []
    for s in shapes["conv"]:
        conv = conv_nd(2, s["cin"], s["cout"], s["k"], stride=s["stride"], padding=s["k"] // 2)
        x = th.randn(s["n"], s["cin"], s["h"], s["w"], generator=g)
        ho = (s["h"] + 2 * (s["k"] // 2) - s["k"]) // s["stride"] + 1
        wo = (s["w"] + 2 * (s["k"] // 2) - s["k"]) // s["stride"] + 1
        flop = 2 * s["n"] * ho * wo * s["cout"] * s["cin"] * s["k"] ** 2
        out.append(("conv", conv_id(s), conv, x, flop, "GFLOP/s"))
    for s in shapes["group_norm_silu"]:
        gn = th.nn.Sequential(normalization(s["c"]), th.nn.SiLU())
        x = th.randn(s["n"], s["c"], s["h"], s["w"], generator=g)
        out.append(("group_norm_silu", gn_id(s), gn, x, 3 * x.numel() * 4, "GB/s"))
    for s in shapes["attention"]:
        att = QKVAttention(s["heads"])
        qkv = 0.5 * th.randn(s["n"], 3 * s["c"], s["t"], generator=g)
        flop = 4 * s["n"] * s["t"] ** 2 * s["c"]
        out.append(("attention", attention_id(s), att, qkv, flop, "GFLOP/s"))
    return out


def time_torch(module, x, runs):
    with th.no_grad():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def criterion_seconds(directory, op, ident):
    path = os.path.join(directory, op, ident, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] * 1e-9
    except FileNotFoundError:
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="PyTorch then mcdm, this many times")
    p.add_argument("--no-cargo", action="store_true", help="read an earlier criterion run")
    p.add_argument("--criterion", default=os.path.join(ROOT, "target", "criterion"))
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    th.set_num_threads(args.threads)

    torch_cases = cases()
    rows = []
    for rnd in range(1, args.rounds + 1):
        # PyTorch, then mcdm, in each round: the rounds show how much the machine drifts.
        for op, ident, module, x, work, unit in torch_cases:
            t = time_torch(module, x, args.runs)
            rows.append(dict(round=rnd, op=op, shape=ident, torch_s=t, work=work, unit=unit))
            print(f"round {rnd} torch {op}/{ident}: {t * 1e3:.3f} ms", file=sys.stderr)
        if not args.no_cargo:
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            subprocess.run(["cargo", "bench", "--bench", "cpu_ops"], cwd=ROOT, env=env, check=True,
                           stdout=sys.stderr)
        for r in rows[-len(torch_cases):]:
            r["mcdm_s"] = criterion_seconds(args.criterion, r["op"], r["shape"])

    print(f"\n{platform.processor() or platform.machine()}, {args.threads} threads, torch {th.__version__}\n")
    print("| round | op | shape | mcdm ms | PyTorch ms | PyTorch / mcdm | mcdm rate | PyTorch rate |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["mcdm_s"]
        rate = lambda s: f"{r['work'] / s / 1e9:.1f} {r['unit']}" if s else "-"  # noqa: E731
        ratio = f"{r['torch_s'] / m:.2f}x" if m else "-"
        mcdm_ms = f"{m * 1e3:.3f}" if m else "not run"
        print(f"| {r['round']} | {r['op']} | {r['shape']} | {mcdm_ms} | {r['torch_s'] * 1e3:.3f} | {ratio} | "
              f"{rate(m)} | {rate(r['torch_s'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, torch=th.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
