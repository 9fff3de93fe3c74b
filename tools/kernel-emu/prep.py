#!/usr/bin/env python3
"""Rewrites kernels/common.cuh and kernels/*.cu into sources g++ compiles against emu.h.

Only four things change; the kernel code itself is compiled as written:
  - the CUDA headers of common.cuh are replaced by emu.h;
  - every function whose body is inline PTX (asm) keeps its signature and gets an emulated
    body from EMULATED below (an asm function missing there is an error: model it first);
  - `extern __shared__ ... name[];` (dynamic shared memory) becomes the emulator's buffer;
  - every static `__shared__ ... name[...];` is followed by a call that refills it with NaN
    bytes for each block (emu.h, emu_shared_fresh).

usage: prep.py [--kernels DIR] --out DIR
"""
import argparse
import pathlib
import re
import sys

# Emulated bodies of the asm functions, keyed by the name in the definition (with its explicit
# template arguments); {0}, {1}, ... are the function's parameter names.
EMULATED = {
    "mma16816<__half>": "emu_mma16816({0}, {1}, {2}, bits_to_float<__half>);",
    "mma16816<__nv_bfloat16>": "emu_mma16816({0}, {1}, {2}, bits_to_float<__nv_bfloat16>);",
    "cp_async16": "emu_cp_async16({0}, {1}, {2});",
    "cp_async_commit": "emu_cp_commit();",
    "cp_async_wait": "emu_cp_wait(N);",
    "ldsm_x4": "emu_ldmatrix({0}, {1}, 4);",
    "ldsm_x2": "emu_ldmatrix({0}, {1}, 2);",
    "ldsm_x1": "emu_ldmatrix({0}, {1}, 1);",
    "ldsm_x4_trans": "emu_ldmatrix({0}, {1}, 4, true);",
    "ldsm_x2_trans": "emu_ldmatrix({0}, {1}, 2, true);",
}

CUDA_INCLUDES = re.compile(r"#include <(cuda_fp16|cuda_bf16)\.h>\n")
DYNAMIC_SHARED = re.compile(r"extern __shared__[^;\[]*?(\w+)\[\];")
STATIC_SHARED = re.compile(r"^(\s*__shared__[^;\[]*?(\w+)\s*(?:\[[^\];,]*\])+\s*;)", re.M)


def matching_brace(src, open_at):
    """Index of the '}' closing the '{' at open_at, skipping string and char literals."""
    depth, i = 0, open_at
    while i < len(src):
        ch = src[i]
        if ch in "\"'":
            i += 1
            while src[i] != ch:
                i += 2 if src[i] == "\\" else 1
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced braces")


def emulate_asm_functions(src, path):
    """Replaces the body of every function containing asm (definitions start at column 0)."""
    while True:
        m = re.search(r"\basm\s*(volatile\s*)?\(", src)
        if not m:
            return src
        start = max(src.rfind("\nMCDM_DEV", 0, m.start()), src.rfind("\ntemplate", 0, m.start())) + 1
        paren = src.index("(", start)
        head = src[start:paren].split()
        name = head[-1]
        body_open = src.index("{", paren)
        params = src[paren + 1 : src.rindex(")", paren, body_open)]
        names = [re.findall(r"\w+", p)[-1] for p in params.split(",") if p.strip()]
        if name not in EMULATED:
            sys.exit(f"prep.py: {path}: `{name}` is inline asm with no emulation; add it to EMULATED")
        body = EMULATED[name].format(*names)
        src = src[: body_open + 1] + " " + body + " " + src[matching_brace(src, body_open) :]


def convert(text, path):
    text = CUDA_INCLUDES.sub("", text)
    if path.name == "common.cuh":
        text = text.replace("#pragma once\n", '#pragma once\n#include "emu.h"\n', 1)
    text = DYNAMIC_SHARED.sub(r"#define \1 g_dyn_smem", text)
    text = STATIC_SHARED.sub(
        r"\1 static long emu_fresh_\2 = -1; emu_shared_fresh(\2, sizeof(\2), emu_fresh_\2);", text
    )
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("//")[0]
        if "__shared__" in code and "emu_shared_fresh" not in code:
            sys.exit(
                f"prep.py: {path}: a __shared__ declaration of a form prep.py does not rewrite "
                f"(one array per declaration): {line.strip()}"
            )
    return emulate_asm_functions(text, path)


def main():
    repo = pathlib.Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=pathlib.Path, default=repo / "kernels")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = sorted(args.kernels.glob("*.cu")) + [args.kernels / "common.cuh"]
    for path in sources:
        (args.out / path.name).write_text(convert(path.read_text(), path))


if __name__ == "__main__":
    main()
