"""Which kernel entry points a GPU has checked, and at which commit.

benches/results/gpu-parity.tsv lists every kernel entry point of the build with the commit of
its last GPU parity run: a device check (scripts/device-check.sh) in which every GPU test passed
(gpu_ops, gpu_sample and gpu_text launch every entry point: tests/fake_gpu.rs fails otherwise).
An entry point is stale when it has never run on a GPU, or when its kernel file or
kernels/common.cuh changed since that commit: only the emulator and the fake driver vouch for it.

    python3 tools/gpu_parity.py entries BINARY           the build's entry points (file, name)
    python3 tools/gpu_parity.py stale BINARY             those a GPU has not checked as they are
    python3 tools/gpu_parity.py record PARITY_TSV        after a device check: marks the entry
                                                         points of its parity.tsv as checked
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "benches/results/gpu-parity.tsv"
HEADER = """\
# Kernel entry points and their last GPU parity run: the commit whose build passed every GPU
# test on a GPU (gpu_ops, gpu_sample, gpu_text), its date and the GPU. `never`: not yet run on a
# GPU. Kept by tools/gpu_parity.py (`record`, after scripts/device-check.sh); see its `stale`.
# The first rows come from the two H200 runs of 2026-11-30 (benches/results/2026-11-30-*.md):
# the second, at e6ef84a, ran every GPU test, with the f32 group-norm statistics kernel then
# unrolling four loads where e6ef84a unrolls two.
"""
COLUMNS = ["entry_point", "file", "commit", "date", "gpu"]


def entries(binary):
    """(file stem, entry point) of every kernel in the build, from `mcdm info --kernels`."""
    text = subprocess.run(
        [binary, "info", "--kernels", "--arch", "sm_90"], check=True, capture_output=True, text=True
    ).stdout
    rows = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 6 and words[0].endswith(".cu"):
            rows.append((words[0][: -len(".cu")], words[1]))
    if not rows:
        raise SystemExit(f"{binary} lists no kernels (built without NVRTC?)")
    return sorted(set(rows))


def read_list():
    rows = {}
    for line in LIST.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split("\t")
        if fields == COLUMNS:
            continue
        if len(fields) != len(COLUMNS):
            raise SystemExit(f"{LIST}: not {len(COLUMNS)} tab-separated fields: {line!r}")
        rows[fields[0]] = dict(zip(COLUMNS, fields))
    return rows


def write_list(rows):
    lines = [HEADER + "\t".join(COLUMNS)]
    for name in sorted(rows, key=lambda n: (rows[n]["file"], n)):
        lines.append("\t".join(rows[name][c] for c in COLUMNS))
    tmp = LIST.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(LIST)


def changed_since(commit, stem):
    """Whether kernels/<stem>.cu or kernels/common.cuh differ between `commit` and the work tree."""
    paths = [f"kernels/{stem}.cu", "kernels/common.cuh"]
    diff = subprocess.run(["git", "diff", "--quiet", commit, "--", *paths], cwd=ROOT)
    if diff.returncode > 1:
        raise SystemExit(f"git diff against {commit} failed")
    return diff.returncode == 1


def stale(binary):
    rows = read_list()
    found = []
    for stem, name in entries(binary):
        row = rows.get(name)
        if row is None or row["commit"] == "never":
            found.append((name, "never run on a GPU"))
        elif changed_since(row["commit"], stem):
            found.append((name, f"kernels/{stem}.cu or common.cuh changed since {row['commit']}"))
    return found


def record(parity_tsv):
    """parity.tsv from a device check: `commit`, `date` and `gpu` lines, then `entry FILE NAME`."""
    meta, checked = {}, []
    for line in Path(parity_tsv).read_text().splitlines():
        key, _, value = line.partition("\t")
        if key == "entry":
            stem, _, name = value.partition("\t")
            checked.append((stem, name))
        elif key in ("commit", "date", "gpu"):
            meta[key] = value
    if set(meta) != {"commit", "date", "gpu"} or not checked:
        raise SystemExit(f"{parity_tsv}: needs commit, date, gpu and entry lines")
    if meta["commit"].endswith("-dirty"):
        raise SystemExit(f"{parity_tsv}: built from uncommitted changes; nothing to record")
    rows = read_list()
    for stem, name in checked:
        rows[name] = {"entry_point": name, "file": stem, **meta}
    write_list(rows)
    print(f"{LIST.relative_to(ROOT)}: {len(checked)} entry points checked at {meta['commit']}")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("entries", "stale", "record"):
        raise SystemExit(__doc__)
    command, arg = sys.argv[1:]
    if command == "entries":
        for stem, name in entries(arg):
            print(f"{stem}\t{name}")
    elif command == "stale":
        found = stale(arg)
        for name, why in found:
            print(f"{name}\t{why}")
        print(f"{len(found)} of {len(entries(arg))} entry points not checked on a GPU as they are now",
              file=sys.stderr)
    else:
        record(arg)


if __name__ == "__main__":
    main()
