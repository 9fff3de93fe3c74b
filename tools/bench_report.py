#!/usr/bin/env python3
"""The results of one `scripts/device-check.sh --run` as a markdown page for benches/results/.

    python3 tools/bench_report.py OUT_DIR > report.md

Reads what the check leaves in OUT_DIR: gpu.txt and info.log (nvidia-smi, `mcdm info`),
mode.txt ("quick" under QUICK=1), summary.txt (tests, memcheck, racecheck, each benchmark's
status), bench-kernels.log (`mcdm bench --kernels`), mcdm-<config>.json (`mcdm bench --compose`;
mcdm-synthfaces-{graph,nograph}.json with and without CUDA graphs), profile-<config>.log
(`mcdm bench --profile`) and torch-<config>-<mode>.json (tools/bench_torch.py). The composed
table puts mcdm next to PyTorch measured in the same run, with the ratios. Standard library only:
it runs on the GPU machine at the end of the check.
"""

import datetime
import json
import sys
from pathlib import Path

CONFIGS = ["imagenet64-adm", "face256"]
TORCH_MODES = [("fp16", "PyTorch fp16 eager (channels_last, cudnn.benchmark)"),
               ("fp16compile", "PyTorch fp16 torch.compile (channels_last, cudnn.benchmark)")]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def images_per_second(record):
    """images/s of the first batch size of an mcdm (dict) or bench_torch (list) record."""
    if isinstance(record, dict):
        rows = record.get("results") or []
    else:
        rows = record or []
    return rows[0].get("images_per_second") if rows else None


def spaced_tables(text):
    """`text` with a blank line before each table that follows a text line, so that it renders."""
    lines = []
    for line in text.splitlines():
        if line.startswith("|") and lines and lines[-1].strip() and not lines[-1].startswith("|"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}"


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    read = lambda name: (out / name).read_text() if (out / name).is_file() else ""
    info = read("info.log").strip()
    gpu = read("gpu.txt").strip() or "unknown GPU"  # nvidia-smi: name, memory, driver

    print(f"# Device check, {datetime.date.today().isoformat()}")
    print()
    print(f"GPU: {gpu}")
    print()
    if read("mode.txt").strip() == "quick":
        print("Command: `QUICK=1 bash scripts/device-check.sh --run` (prepared by `scripts/device-check.sh`);")
        print("composed runs: DDIM 10 steps, 3 experts + unconditional model, random weights, mcdm")
        print("`--dtype bf16`; the quick check runs no PyTorch.")
    else:
        print("Command: `bash scripts/device-check.sh --run` (prepared by `scripts/device-check.sh`);")
        print("composed runs: DDIM 10 steps, 3 experts + unconditional model, random weights, mcdm")
        print("`--dtype bf16` against guided-diffusion in PyTorch (`tools/bench_torch.py --fp16")
        print("--channels-last --cudnn-benchmark [--compile --compile-mode M] --compose 3`), both in")
        print("this run; torch.compile's mode M is in torch-<config>-fp16compile.json (`compile_mode`).")
    print()
    print("## Composed sampling")
    print()
    header = "| config | batch | mcdm bf16 images/s |"
    rule = "|---|---:|---:|"
    for _, label in TORCH_MODES:
        header += f" {label} images/s | mcdm / that |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for cfg in CONFIGS:
        mcdm = load(out / f"mcdm-{cfg}.json") or {}
        ours = images_per_second(mcdm)
        batch = (mcdm.get("results") or [{}])[0].get("batch", "?")
        row = f"| {cfg} | {batch} | {fmt(ours)} |"
        for mode, _ in TORCH_MODES:
            theirs = images_per_second(load(out / f"torch-{cfg}-{mode}.json"))
            ratio = f"{ours / theirs:.2f}x" if ours and theirs else "n/a"
            row += f" {fmt(theirs)} | {ratio} |"
        print(row)
    print()
    graph_record = load(out / "mcdm-synthfaces-graph.json")
    launch_record = load(out / "mcdm-synthfaces-nograph.json")
    graph, launches = images_per_second(graph_record), images_per_second(launch_record)
    if graph or launches:
        def host(record):
            row = ((record or {}).get("results") or [{}])[0]
            kernels, graphs = row.get("kernel_launches"), row.get("graph_launches")
            return "n/a" if kernels is None else f"{kernels} kernels + {graphs} graphs"

        print("## CUDA graphs (SynthFaces-sized models, 3 experts + unconditional, batch 8, 50 steps)")
        print()
        print("| each step's model passes | images/s | host launches / run |")
        print("|---|---:|---|")
        print(f"| replayed as one CUDA graph | {fmt(graph)} | {host(graph_record)} |")
        print(f"| launched kernel by kernel (`--no-cuda-graph`) | {fmt(launches)} | {host(launch_record)} |")
        ratio = f"{graph / launches:.2f}x" if graph and launches else "n/a"
        print(f"| graph / launches | {ratio} | |")
        print()
    kernels = read("bench-kernels.log").strip()
    if kernels:
        print("## Single kernels (`mcdm bench --device cuda --dtype bf16 --kernels --iters 20`)")
        print()
        print(spaced_tables(kernels))
        print()
    torch_kernels = read("bench-torch-kernels.log").strip()
    if torch_kernels:
        print("## The same shapes in PyTorch (`tools/bench_torch_kernels.py`: cuDNN conv2d, SDPA)")
        print()
        print(spaced_tables(torch_kernels))
        print()
    for cfg in CONFIGS:
        profile = read(f"profile-{cfg}.log").strip()
        if profile:
            print(f"## Where a forward pass spends its time: {cfg} (`mcdm bench --profile`)")
            print()
            print(spaced_tables(profile))
            print()
    summary = read("summary.txt").strip()
    if summary:
        print("## Summary of the check")
        print()
        print("```")
        print(summary)
        print("```")
        print()
    if info:
        print("## Machine")
        print()
        print("```")
        print(info)
        print("```")


if __name__ == "__main__":
    main()
