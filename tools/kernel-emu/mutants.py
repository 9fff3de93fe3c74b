#!/usr/bin/env python3
"""Mutation check of the kernel emulation: each mutant is a plausible bug, most in the conv
pipelines; the kernel's driver (for conv, its quick shapes) must catch every one (wrong values,
the emulator's race / bank-conflict checks, or AddressSanitizer) in at least one of its runs
(thread schedules, and for conv and attention the two cp.async modes), and must pass unmutated in all.

Mutants are written under target/kernel-emu/mutants/; kernels/ is only read.
usage: mutants.py --cxx "g++ -O2 ..." --schedules "forward reverse ..." [--only NAME ...]
       (scripts/emulate-kernels.sh --mutants passes its flags and schedules)
"""
import argparse
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

# name: (file under kernels/, its text, replacement); each text must occur exactly once.
MUTANTS = {
    "unmutated": ("conv.cu", "", ""),
    "wait_one_group_short": ("conv.cu", "cp_async_wait<S - 2>();", "cp_async_wait<S - 1>();"),
    "no_barrier_after_wait": (
        "conv.cu",
        "        if (s.norm != nullptr) normalize_stage(kt % S, kt);\n        __syncthreads();\n",
        "        if (s.norm != nullptr) normalize_stage(kt % S, kt);\n",
    ),
    "prefetch_before_barrier": (
        "conv.cu",
        "        __syncthreads();\n        if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, kt + S - 1);\n",
        "        if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, kt + S - 1);\n        __syncthreads();\n",
    ),
    "no_commit_when_idle": (
        "conv.cu",
        "        if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, kt + S - 1);\n        cp_async_commit();\n",
        "        if (kt + S - 1 < KT) {\n            load_stage((kt + S - 1) % S, kt + S - 1);\n"
        "            cp_async_commit();\n        }\n",
    ),
    "unswizzled_reads": (
        "conv.cu",
        "const int a_off[2] = {convb_off(a_row, a_chunk), convb_off(a_row, 2 + a_chunk)};",
        "const int a_off[2] = {a_row * 64 + (a_chunk << 4), a_row * 64 + ((2 + a_chunk) << 4)};",
    ),
    "b_matrix_order": ("conv.cu", "b_chunk = (lane >> 3) & 1;", "b_chunk = lane >> 4;"),
    "epilogue_pair_swapped": ("conv.cu", "pack2<T>(v0, v1)", "pack2<T>(v1, v0)"),
    # The 64x64 kernel refills a stage while slower warps still read it: the warps of a block
    # advance together through the mma steps unless one warp runs ahead (the -by-warp schedules).
    "tile64_no_barrier_before_refill": (
        "conv.cu",
        "        __syncthreads();  // stage `cur` is refilled in the next iteration\n",
        "",
    ),
    # The copies folded into the conv's addressing: the second source read with the first's
    # channel stride, the upsampled input read at full size in y, the half-size residual read at
    # y's index, 16-byte copies across the two sources when cin1 is not a multiple of 8.
    "concat_second_source_stride": (
        "conv.cu",
        "second ? s.cin2 : s.cin1",
        "s.cin1",
    ),
    "upsample_rows_not_halved": ("conv.cu", "        iy >>= 1;\n", ""),
    "residual_not_upsampled": (
        "conv.cu",
        "if (!s.res_up && !s.res_down) return (long long)row * s.cout + col;",
        "if (!s.res_down) return (long long)row * s.cout + col;",
    ),
    "vector_copies_across_sources": ("conv.cu", " && s.cin1 % 8 == 0 && aligned16(x_)", " && aligned16(x_)"),
    # Reads weight rows past the last output channel, whose products are never stored: the values
    # cannot show it, only AddressSanitizer.
    "b_rows_past_cout": (
        "conv.cu",
        "const bool ok = co < s.cout && k_ok;",
        "const bool ok = co < s.cout + 8 && k_ok;",
    ),
    # Where a row fits in one staged chunk, only its first column block stages it in shared
    # memory; the others read what that block left there: the right values in the emulator unless
    # static shared memory is refilled for every block (on a GPU: garbage).
    "linear_stale_shared_input": (
        "linear.cu",
        "xs[r][k] = silu_in ? silu_f(v) : v;",
        "if (blockIdx.x == 0 || in > LINEAR_CHUNK) xs[r][k] = silu_in ? silu_f(v) : v;",
    ),
    # The attention pipeline (two stages): a stage refilled while slower warps still read it, a
    # tile read before its copies land, V fragments read untransposed.
    "attention_no_barrier_before_refill": (
        "attention.cu",
        "        __syncthreads();  // every warp is done with this stage before it is refilled\n",
        "",
    ),
    "attention_wait_one_group_short": ("attention.cu", "        cp_async_wait<1>();", "        cp_async_wait<2>();"),
    "attention_v_untransposed": (
        "attention.cu",
        "ldsm_x4_trans(vb, vrow + (2 * dp + (mi >> 1)) * 16);",
        "ldsm_x4(vb, vrow + (2 * dp + (mi >> 1)) * 16);",
    ),
    # A solver step that does not shift its history: h2 keeps the x_0 of two steps back.
    "solver_history_not_shifted": ("step.cu", "        *h2 = *h1;\n", ""),
    # Group norm reads the concatenation's second tensor with the whole concatenation's stride.
    # A pooled residual's window read a row too high (y's row stride for the residual's).
    "res_down_window_row": ("conv.cu", "steps[1] = 2LL * s.wo * s.cout;", "steps[1] = (long long)s.wo * s.cout;"),
    # The moments of the conv's epilogue: read back before the other threads' stores (the
    # barrier gone), or over all but the last rows of the tile; their merge into groups reading
    # a concatenation's second part at the channel index of the whole.
    "conv_moments_before_stores": (
        "conv.cu",
        "    __syncthreads();  // the tile's stores are made, and every warp is done with the shared tiles\n",
        "",
    ),
    "conv_moments_rows_short": ("conv.cu", "for (int i = row0; i < BM; i += R, at += step)",
                                "for (int i = row0; i < BM - R; i += R, at += step)"),
    "group_norm_merge_channels_second_offset": ("group_norm.cu", "(ch - c1)) * 3;", "ch) * 3;"),
    # The input's norm applied as the conv reads it: to padding chunks too, after the barrier
    # that shows the stage to the other warps, with image 0's table for every image; and its
    # table's shift made without gamma.
    "norm_pads_too": (
        "conv.cu",
        "            if (conv_inside(s, a_iy0[c] + ky, a_ix0[c] + kx))\n"
        "                conv_norm_chunk<T>(s, a_b[c], ci, As + st_off",
        "                conv_norm_chunk<T>(s, a_b[c], ci, As + st_off",
    ),
    "norm_after_barrier": (
        "conv.cu",
        "        if (s.norm != nullptr) normalize_stage(kt % S, kt);\n        __syncthreads();\n",
        "        __syncthreads();\n        if (s.norm != nullptr) normalize_stage(kt % S, kt);\n",
    ),
    "norm_first_image_table": ("conv.cu", "float4*>(s.norm + ((long long)b * s.cin + ci) * 2)", "float4*>(s.norm + ci * 2)"),
    "group_norm_affine_shift_without_gamma": ("group_norm.cu", "- st[0] * mul;", "- st[0] * st[1];"),
    "group_norm_second_source_stride": (
        "group_norm.cu",
        "return x2 == nullptr ? c : (ch < c1 ? c1 : c - c1);",
        "return x2 == nullptr ? c : (ch < c1 ? c1 : c);",
    ),
    # Group norm's statistics kernel leaves the last group unmerged.
    "group_norm_last_group_missing": ("group_norm.cu", "    if (t < groups) {\n", "    if (t < groups - 1) {\n"),
    # Group norm + pooling takes the window's lower-left pixel from the upper row.
    "group_norm_pool_window_row": (
        "group_norm.cu",
        "in[2] = *reinterpret_cast<const Pack8<T>*>(src + down);",
        "in[2] = *reinterpret_cast<const Pack8<T>*>(src + c);",
    ),
    # Group norm's apply kernel uses the per-channel table before every thread has written it.
    "group_norm_apply_no_barrier": (
        "group_norm.cu",
        "        ch_add[ch] = add;\n    }\n    __syncthreads();\n",
        "        ch_add[ch] = add;\n    }\n",
    ),
}
SANITIZER_ONLY = {"b_rows_past_cout"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cxx", required=True, help="compiler and flags, without -I and -o")
    ap.add_argument("--schedules", default="forward", help="EMU_SCHEDULE values to run, space-separated")
    ap.add_argument("--only", nargs="+", choices=sorted(MUTANTS), help="check these mutants only")
    args = ap.parse_args()
    schedules = args.schedules.split()
    repo = pathlib.Path(__file__).resolve().parents[2]
    tool = repo / "tools" / "kernel-emu"
    root = repo / "target" / "kernel-emu" / "mutants"
    wrong = 0
    sanitized = "-fsanitize=address" in args.cxx
    checked = 0
    for name, (file, old, new) in MUTANTS.items():
        if args.only and name not in args.only:
            continue
        if name in SANITIZER_ONLY and not sanitized:
            print(f"skipped  {name}: needs AddressSanitizer, which --cxx does not enable", flush=True)
            continue
        checked += 1
        work = root / name
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(repo / "kernels", work / "kernels")
        source = (repo / "kernels" / file).read_text()
        if old:
            if source.count(old) != 1:
                print(f"STALE    {name}: its text occurs {source.count(old)} times in kernels/{file}; update mutants.py")
                wrong += 1
                continue
            (work / "kernels" / file).write_text(source.replace(old, new))
        subprocess.run([sys.executable, tool / "prep.py", "--kernels", work / "kernels", "--out", work / "gen"], check=True)
        driver = "test_" + file.removesuffix(".cu")
        binary = work / driver
        cmd = shlex.split(args.cxx) + ["-I", str(work / "gen"), "-I", str(tool), "-o", str(binary), str(tool / f"{driver}.cpp")]
        subprocess.run(cmd, check=True)
        failed_runs = []
        # The conv (quick shapes) and attention drivers run in both cp.async modes; the others
        # take no arguments.
        modes = ("delayed", "immediate") if file in ("conv.cu", "attention.cu") else ("default",)
        for mode in modes:
            for schedule in schedules:
                argv = {"conv.cu": [binary, mode, "quick"], "attention.cu": [binary, mode]}.get(file, [binary])
                run = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, EMU_SCHEDULE=schedule))
                (work / f"{mode}.{schedule}.log").write_text(run.stdout + run.stderr)
                if run.returncode != 0:
                    failed_runs.append(schedule if len(modes) == 1 else f"{mode}/{schedule}")
        runs = len(modes) * len(schedules)
        expected_to_fail = bool(old)
        ok = bool(failed_runs) == expected_to_fail
        wrong += not ok
        if expected_to_fail:
            verdict = "killed  " if ok else "SURVIVED"
            detail = f"fails in {len(failed_runs)} of {runs} runs" if failed_runs else f"passes all {runs} runs"
            if failed_runs and len(failed_runs) < runs:
                detail += f" ({', '.join(failed_runs)})"
        else:
            verdict = "ok      " if ok else "FAILED  "
            detail = f"passes all {runs} runs" if ok else f"fails in {', '.join(failed_runs)}"
        print(f"{verdict} {name}: {detail} (logs: {work.relative_to(repo)}/)", flush=True)
    print(f"SUMMARY mutants {checked} checked, {len(MUTANTS) - checked} not, {wrong} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
