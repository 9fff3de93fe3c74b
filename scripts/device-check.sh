#!/usr/bin/env bash
# Prepares the GPU check here, then (with --run, on the GPU machine) runs it.
#
# Here:        scripts/device-check.sh
#   builds the release binary and the GPU test executables (x86_64, stripped), and packs them
#   with the guided-diffusion-sdk sdist into .device-pack/ (ignored), then prints the one
#   command to run on the GPU machine (carry .device-pack).
# GPU machine: bash scripts/device-check.sh --run
#   runs the GPU tests, compute-sanitizer memcheck on a forward pass and a short sampling run,
#   the benchmarks (mcdm and PyTorch in the same run), writes logs to $OUT and prints a short
#   table last.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.device-pack

if [ "${1:-}" != "--run" ]; then
    [ -d .nvrtc ] || scripts/install-nvrtc.sh
    cargo build --release --locked
    rm -rf "$PACK" && mkdir -p "$PACK/tests" "$PACK/wheels"
    cp target/release/mcdm "$PACK/"
    # GPU test executables, built with the test profile (optimised), stripped to fit the carry.
    cargo test --release --locked --no-run --message-format=json --test gpu_ops --test gpu_sample --test gpu_text \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
        | while read -r name exe; do cp "$exe" "$PACK/tests/$name"; done
    strip "$PACK/mcdm" "$PACK"/tests/*
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$PACK/wheels" guided-diffusion-sdk==1.0.0
    file "$PACK/mcdm" | grep -q x86-64 || { echo "device-check: the binary is not x86-64" >&2; exit 1; }
    "$PACK/mcdm" --version
    du -sh "$PACK"
    echo
    echo "On the GPU machine (device tool), with carry [\"$PACK\"]:"
    echo "  bash scripts/device-check.sh --run"
    exit 0
fi

OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export MCDM_FIXTURES=$PWD/tests/fixtures
# The MiniLM weights (88 MB) exceed what a run can carry: the encoder-vs-CPU test is skipped
# unless a model is carried and MCDM_TEXT_MODEL points at it (an f16 copy fits: ~45 MB).
[ -n "${MCDM_TEXT_MODEL:-}" ] || export MCDM_SKIP_TEXT_TESTS=1
BIN=$PWD/$PACK/mcdm
summary=()
record() { summary+=("$(printf '%-44s %s' "$1" "$2")"); }

"$BIN" info | tee "$OUT/info.log"

# 1. Kernel and forward parity against the CPU.
for t in "$PACK"/tests/*; do
    name=$(basename "$t")
    if "$t" --nocapture --test-threads 1 >"$OUT/test-$name.log" 2>&1; then
        record "test $name" "ok"
    else
        record "test $name" "FAILED (see test-$name.log)"
    fi
done

# 2. compute-sanitizer memcheck on a forward pass and a short sampling run.
F=tests/fixtures
sanitize() {
    local label=$1; shift
    if compute-sanitizer --tool memcheck --error-exitcode 9 "$@" >"$OUT/sanitizer-$label.log" 2>&1; then
        record "memcheck $label" "0 errors"
    else
        record "memcheck $label" "ERRORS (see sanitizer-$label.log)"
    fi
}
sanitize forward "$BIN" forward --device cuda --model $F/unet/classcond_sigma_headsup_bf16.safetensors \
    --input $F/unet/classcond_sigma_headsup_bf16.io.safetensors --output /tmp/out.safetensors
sanitize sample "$BIN" sample --device cuda --model u=$F/sample/models/uncond.safetensors \
    --model c=$F/sample/models/classes.safetensors --uncond u --expert c,class=3 \
    --num-samples 2 --steps 3 --out /tmp/sanitize-sample

# 3. Single kernels (TFLOP/s, GB/s), then composed DDIM sampling (3 experts + unconditional, 10 steps, random weights),
#    mcdm against guided-diffusion in PyTorch (fp16 eager, torch.compile) in the same run.
python3 -m pip install --quiet --no-index --no-deps --target /tmp/site "$PACK"/wheels/guided_diffusion_sdk-*.tar.gz \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
"$BIN" bench --device cuda --dtype bf16 --kernels --iters 20 >"$OUT/bench-kernels.log" 2>&1 \
    && record "kernels bf16" "see bench-kernels.log" || record "kernels bf16" "FAILED"
for cfg in imagenet64-adm face256; do
    batch=$([ $cfg = face256 ] && echo 8 || echo 64)
    "$BIN" bench --device cuda --dtype bf16 --config tools/configs/$cfg.json --compose 3 --steps 10 \
        --batch $batch --iters 3 --output "$OUT/mcdm-$cfg.json" >"$OUT/bench-mcdm-$cfg.log" 2>&1 \
        && record "mcdm bf16 $cfg b$batch" "$(tail -1 "$OUT/bench-mcdm-$cfg.log")" \
        || record "mcdm bf16 $cfg b$batch" "FAILED"
    for mode in "--fp16" "--fp16 --compile"; do
        tag=$(echo "$mode" | tr -d ' -')
        timeout 240 python3 tools/bench_torch.py tools/configs/$cfg.json --device cuda $mode --compose 3 \
            --steps 10 --batch $batch --warmup 1 --runs 3 --json "$OUT/torch-$cfg-$tag.json" \
            >"$OUT/bench-torch-$cfg-$tag.log" 2>&1 \
            && record "torch $tag $cfg b$batch" "$(grep 'images/s' "$OUT/bench-torch-$cfg-$tag.log" | tail -1)" \
            || record "torch $tag $cfg b$batch" "FAILED or over 240 s"
    done
done

echo
echo "== device check =="
cat "$OUT/bench-kernels.log" 2>/dev/null || true
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
