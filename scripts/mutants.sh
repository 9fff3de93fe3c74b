#!/usr/bin/env bash
# Mutation testing of the CPU engine (cargo-mutants): every mutant, an operator flipped or a
# function body replaced, should make some test fail; a mutant that passes shows code the tests
# do not pin down.
#
#   scripts/mutants.sh [FILE ...] [-- CARGO_MUTANTS_OPTION ...]
#   e.g. scripts/mutants.sh src/rng.rs
#        scripts/mutants.sh -- --shard 0/15 --sharding round-robin   (a spread sample)
#
# Default files: the numeric core and the input checks (diffusion, noise, sampler, ops, UNet,
# text encoder, config, files, memory checks); the CLI (src/cli/*.rs) when named. GPU code is
# left out: its tests run on the fake driver (minutes a run) or a GPU. Mutants are built in a
# worktree of HEAD under target/, never in this checkout; results in target/mutants/mutants.out
# (missed.txt: the survivors). Needs `cargo install cargo-mutants`; 10-20 s a mutant on 2 cores
# once the first build is done.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || { echo "mutants: install it with: cargo install cargo-mutants" >&2; exit 1; }

files=() opts=()
while [ $# -gt 0 ]; do
    if [ "$1" = -- ]; then shift; opts=("$@"); break; fi
    files+=(--file "$1"); shift
done
[ ${#files[@]} -gt 0 ] || for f in 'src/diffusion/*.rs' src/rng.rs 'src/sample/*.rs' 'src/ops/*.rs' \
    src/backend/cpu.rs src/backend/mod.rs src/model/unet.rs src/model/load.rs src/device.rs \
    'src/text/*.rs' src/config.rs src/weights.rs src/image.rs src/error.rs src/memory.rs; do
    files+=(--file "$f")
done

root=$PWD tree=$PWD/target/mutants-tree
git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
git worktree add --quiet --detach --force "$tree" HEAD
trap 'cd "$root" && git worktree remove --force "$tree"' EXIT
# The text-encoder tests need the model (scripts/fetch-text-model.sh); without it they fail.
if [ -d models ]; then ln -s "$root/models" "$tree/models"; fi

cd "$tree"
CARGO_TARGET_DIR=$root/target/mutants-build cargo mutants --in-place --no-shuffle \
    --exclude-re '(?i)gpu|cuda|upload' --timeout 120 --output "$root/target/mutants" \
    "${files[@]}" "${opts[@]}" -- \
    --lib --test diffusion --test rng --test sample_reference --test unet_reference \
    --test text_encoder --test api_errors --test cli_errors --test cli_sample --test cli_info \
    --test cli_bench
