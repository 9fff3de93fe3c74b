#!/usr/bin/env bash
# Prepares the GPU check here, then (with --run, on the GPU machine) runs it.
#
# Here:        scripts/device-check.sh
#   builds the release binary and the GPU test executables (x86_64, stripped), packs them with
#   the guided-diffusion-sdk sdist and a small f16 copy of the text model into one archive,
#   .device-pack/pack.tar.xz (ignored; ~25 MB, so tree + pack stay under the 64 MiB carry), and
#   prints the command to run on the GPU machine.
# GPU machine: bash scripts/device-check.sh --run      (carry .device-pack)
#   QUICK=1 (after a kernel change, ~3 min): the parity tests, memcheck, the kernel table, the
#   profiles and mcdm's composed runs, then racecheck on attention with the time left; no
#   PyTorch, CUDA-graph or conv racecheck steps. Run it with CHECK_SECONDS=200, timeout_s 215.
#   runs the GPU tests, compute-sanitizer memcheck on a forward pass and a short sampling run,
#   the benchmarks (mcdm and PyTorch in the same run), then racecheck as time allows; leaves summary.txt, report.md (the
#   page for benches/results/) and logs.tar.gz in $OUT and prints a short table last. Every
#   step has a time limit and the whole run ends within CHECK_SECONDS (540).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.device-pack
CARRY_LIMIT=$((64 * 1024 * 1024))

if [ "${1:-}" != "--run" ]; then
    [ -d .nvrtc ] || scripts/install-nvrtc.sh
    export MCDM_NVRTC_LIB="$PWD/.nvrtc/nvidia/cu13/lib/libnvrtc.so.13"
    export MCDM_CUDA_INCLUDE="$PWD/.nvrtc/nvidia/cu13/include"
    export MCDM_REQUIRE_NVRTC=1
    [ -f models/all-MiniLM-L6-v2/model.safetensors ] || scripts/fetch-text-model.sh
    cargo build --release --locked
    stage=target/device-pack
    rm -rf "$stage" "$PACK" && mkdir -p "$stage/tests" "$PACK"
    cp target/release/mcdm "$stage/"
    # GPU test executables, built with the test profile (optimised), stripped to fit the carry.
    cargo test --release --locked --no-run --message-format=json --test gpu_ops --test gpu_sample --test gpu_text \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
        | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
    strip "$stage/mcdm" "$stage"/tests/*
    file "$stage/mcdm" | grep -q x86-64 || { echo "device-check: the binary is not x86-64" >&2; exit 1; }
    # guided_diffusion is pure Python: its package folder from the PyPI sdist goes on PYTHONPATH there.
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$stage/sdist" guided-diffusion-sdk==1.0.0
    mkdir -p "$stage/py" && tar -xzf "$stage"/sdist/guided_diffusion_sdk-1.0.0.tar.gz -C "$stage/py" \
        --strip-components=1 guided_diffusion_sdk-1.0.0/guided_diffusion && rm -r "$stage/sdist"
    python3 tools/pack_text_model.py models/all-MiniLM-L6-v2 tests/fixtures/text/sentences.json "$stage/text-model"
    # What the parity tests will vouch for: this build's entry points, at this commit.
    { echo -e "commit\t$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo -dirty)"
      python3 tools/gpu_parity.py entries target/release/mcdm | sed 's/^/entry\t/'; } >"$stage/parity.tsv"
    echo "entry points a GPU has not checked as they are now (benches/results/gpu-parity.tsv):"
    python3 tools/gpu_parity.py stale target/release/mcdm | sed 's/^/  /'
    # The test executables run here (skipping their GPU parts): they are runnable x86-64 programs.
    for t in "$stage"/tests/*; do "$t" --test-threads 1 >/dev/null 2>&1 || { echo "device-check: $t fails here" >&2; exit 1; }; done
    tar -C "$stage" -cf - . | xz -T0 -6 >"$PACK/pack.tar.xz"
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
    packed=$(stat -c %s "$PACK/pack.tar.xz")
    awk -v p="$packed" -v t="$tree" -v l=$CARRY_LIMIT \
        'BEGIN {printf "pack %.1f MB + tree %.1f MB = %.1f MB (limit %.1f MB)\n", p/1e6, t/1e6, (p+t)/1e6, l/1e6}'
    [ $((packed + tree)) -lt $CARRY_LIMIT ] || { echo "device-check: over the carry limit" >&2; exit 1; }
    echo
    echo "On the GPU machine (device tool run, carry [\"$PACK\"], timeout_s 590):"
    echo "  bash scripts/device-check.sh --run"
    exit 0
fi

# Only 8 files come back from $OUT: logs go to $LOG, and $OUT gets summary.txt, report.md
# (tools/bench_report.py: the page for benches/results/) and logs.tar.gz, all three kept current
# as the check goes, and parity.tsv when every GPU test passed.
OUT=${OUT:-/tmp/device-check-out}
LOG=/tmp/device-check
rm -rf "$LOG" && mkdir -p "$OUT" "$LOG"
DEADLINE=$((SECONDS + ${CHECK_SECONDS:-540}))
QUICK=${QUICK:-0}
[ "$QUICK" = 1 ] && echo quick >"$LOG/mode.txt"
ROOT=/tmp/mcdm-pack
rm -rf "$ROOT" && mkdir -p "$ROOT"
tar -C "$ROOT" -xJf "$PACK/pack.tar.xz" 2>/dev/null \
    || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$PACK/pack.tar.xz" "$ROOT"
export MCDM_FIXTURES=$PWD/tests/fixtures MCDM_TEXT_MODEL=$ROOT/text-model
BIN=$ROOT/mcdm
: >"$LOG/summary.txt"
# The report and the logs are rewritten after every step: should the device tool's limit cut the
# run short (a slow machine start leaves less than timeout_s), what ran so far still comes back.
snapshot() {
    python3 tools/bench_report.py "$LOG" >"$OUT/report.md.tmp" 2>/dev/null && mv "$OUT/report.md.tmp" "$OUT/report.md"
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOG" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
    true
}
record() { printf '%-40s %s\n' "$1" "$2" | tee -a "$LOG/summary.txt"; cp "$LOG/summary.txt" "$OUT/summary.txt"; snapshot; }

# step LABEL MAX_SECONDS LOG CMD...: runs CMD with at most MAX_SECONDS (less if the deadline is
# nearer), output to $LOG/LOG; returns CMD's status, 124 on timeout, 125 when no time is left.
step() {
    local label=$1 cap=$2 log=$3; shift 3
    local left=$((DEADLINE - SECONDS - 5))
    [ "$left" -gt "$cap" ] && left=$cap
    if [ "$left" -lt 15 ]; then record "$label" "skipped (out of time)"; return 125; fi
    local start=$SECONDS rc=0
    timeout -k 10 "$left" "$@" >"$LOG/$log" 2>&1 || rc=$?
    [ $rc -eq 124 ] && echo "(stopped after ${left} s)" >>"$LOG/$log"
    LAST_SECONDS=$((SECONDS - start))
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$LOG/gpu.txt" 2>/dev/null || : >"$LOG/gpu.txt"
{ nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv; "$BIN" info --kernels; } \
    2>&1 | tee "$LOG/info.log" || true

# 1. Kernel, forward, sampling and text-encoder parity against the CPU: together they launch
#    every entry point of the build (tests/fake_gpu.rs checks that), so when all pass,
#    $OUT/parity.tsv says which entry points this GPU checked at which commit (record it here
#    with `python3 tools/gpu_parity.py record parity.tsv`).
parity_ok=1
for t in "$ROOT"/tests/*; do
    name=$(basename "$t")
    rc=0
    step "test $name" 150 "test-$name.log" "$t" --nocapture --test-threads 1 || rc=$?
    skipped=$(grep -c 'skipped, no GPU' "$LOG/test-$name.log" || true)
    [ $rc -eq 0 ] && [ "$skipped" -eq 0 ] || parity_ok=0
    if [ $rc -eq 0 ]; then
        record "test $name" "$([ "$skipped" -gt 0 ] && echo "SKIPPED $skipped (no GPU)" || echo ok) (${LAST_SECONDS} s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "test $name" "STOPPED at its time limit (${LAST_SECONDS} s; see test-$name.log)"
    elif [ $rc -ne 125 ]; then
        record "test $name" "FAILED: $(grep -E '^test .*FAILED|panicked' "$LOG/test-$name.log" | head -3 | tr '\n' ' ')"
    fi
done

if [ $parity_ok = 1 ]; then
    { grep '^commit' "$ROOT/parity.tsv"
      echo -e "date\t$(date -u +%F)"
      echo -e "gpu\t$(cut -d, -f1 "$LOG/gpu.txt")"
      grep '^entry' "$ROOT/parity.tsv"; } >"$OUT/parity.tsv"
    record "parity" "$(grep -c '^entry' "$OUT/parity.tsv") entry points checked at $(cut -f2 <(grep '^commit' "$ROOT/parity.tsv"))"
else
    record "parity" "NOT RECORDED: a GPU test failed or was skipped"
fi

# 2. compute-sanitizer memcheck on a forward pass, the conv variants and a short sampling run (it
#    refuses the device on gVisor machines: recorded as unavailable, not as a failure).
F=tests/fixtures
# sanitize TOOL LABEL MAX_SECONDS CMD...
sanitize() {
    local tool=$1 label=$2 cap=$3; shift 3
    local rc=0 log="sanitizer-$tool-$label.log"
    step "$tool $label" "$cap" "$log" compute-sanitizer --tool "$tool" --error-exitcode 9 "$@" || rc=$?
    [ $rc -eq 125 ] && return  # out of time: recorded by step
    if grep -q 'skipped, no GPU' "$LOG/$log"; then
        record "$tool $label" "NOT RUN: under the sanitizer the tests saw no GPU (see $log)"
    elif [ $rc -eq 0 ]; then
        record "$tool $label" "$(grep -o 'ERROR SUMMARY: [0-9]* errors' "$LOG/$log" || echo '0 errors')"
    elif grep -q 'Device not supported' "$LOG/$log"; then
        record "$tool $label" "unavailable on this machine (device not supported)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$tool $label" "STOPPED at its time limit (${LAST_SECONDS} s; see $log)"
    else
        record "$tool $label" "ERRORS (rc $rc, see $log)"
    fi
}
sanitize memcheck forward 120 "$BIN" forward --device cuda --model $F/unet/classcond_sigma_headsup_bf16.safetensors \
    --input $F/unet/classcond_sigma_headsup_bf16.io.safetensors --output /tmp/out.safetensors
# The same forward with the group norms fused into the convs (statistics and apply; off by default
# until this check times them).
(export MCDM_NORM_STATS_IN_CONV=1 MCDM_NORM_APPLY_IN_CONV=1
    sanitize memcheck forward-fused-norms 120 "$BIN" forward --device cuda \
        --model $F/unet/classcond_sigma_headsup_bf16.safetensors \
        --input $F/unet/classcond_sigma_headsup_bf16.io.safetensors --output /tmp/out-fused.safetensors)
# Every conv variant at its edge shapes (the forward above is small enough for 64x64 tiles).
sanitize memcheck conv-variants 120 "$ROOT/tests/gpu_ops" --nocapture --test-threads 1 conv_matches_cpu
sanitize memcheck sample 120 "$BIN" sample --device cuda --model u=$F/sample/models/uncond.safetensors \
    --model c=$F/sample/models/classes.safetensors --uncond u --expert c,class=3 \
    --num-samples 2 --steps 3 --out /tmp/sanitize-sample
# racecheck: shared-memory hazards between threads, which the CPU emulation (one fiber at a time)
# cannot provoke. The small attention cases here; every conv variant at the end, with the time left.
[ "$QUICK" = 1 ] || sanitize racecheck attention 90 "$ROOT/tests/gpu_ops" --nocapture --test-threads 1 attention_matches_cpu

# 3. Single kernels (TFLOP/s, GB/s, share of the measured peaks), then composed DDIM sampling (3 experts + unconditional, 10 steps,
#    random weights): mcdm, guided-diffusion in PyTorch fp16 eager, a per-kernel profile of one
#    mcdm forward pass, then torch.compile, each on both configs, so that neither the profile nor
#    a slow compile can crowd out the eager baseline.
export PYTHONPATH=$ROOT/py:${PYTHONPATH:-}
if step "kernels bf16" 90 bench-kernels.log "$BIN" bench --device cuda --dtype bf16 --kernels --iters 20; then
    record "kernels bf16" "ok (${LAST_SECONDS} s, table below)"
elif [ $? -ne 125 ]; then record "kernels bf16" "FAILED or stopped"; fi
# The same shapes in PyTorch: cuDNN conv2d (channels_last, cudnn.benchmark), cat / interpolate +
# conv where mcdm folds the copy, scaled_dot_product_attention.
if [ -s "$LOG/bench-kernels.log" ] && step "torch kernels bf16" 90 bench-torch-kernels.log python3 \
    tools/bench_torch_kernels.py "$LOG/bench-kernels.log" --dtype bf16 --iters 20 --json "$LOG/torch-kernels.json"; then
    record "torch kernels bf16" "ok (${LAST_SECONDS} s, table below)"
elif [ $? -ne 125 ]; then record "torch kernels bf16" "FAILED, stopped or no kernel table"; fi
batch_of() { [ "$1" = face256 ] && echo 8 || echo 64; }
for cfg in imagenet64-adm face256; do
    b=$(batch_of $cfg)
    if step "mcdm bf16 $cfg b$b" 90 "bench-mcdm-$cfg.log" "$BIN" bench --device cuda --dtype bf16 \
        --config tools/configs/$cfg.json --compose 3 --steps 10 --batch "$b" --iters 3 --output "$LOG/mcdm-$cfg.json"; then
        record "mcdm bf16 $cfg b$b" "$(tail -1 "$LOG/bench-mcdm-$cfg.log")"
    elif [ $? -ne 125 ]; then record "mcdm bf16 $cfg b$b" "FAILED or stopped"; fi
done
# What folding the decoder's concatenations and the upsamplings into the convolutions' and group
# norms' addressing saves: the ADM run again with those copies made (MCDM_FOLD_COPIES=0).
if step "mcdm bf16 imagenet64-adm b64 copies" 90 bench-mcdm-copies.log env MCDM_FOLD_COPIES=0 "$BIN" bench \
    --device cuda --dtype bf16 --config tools/configs/imagenet64-adm.json --compose 3 --steps 10 --batch 64 \
    --iters 3 --output "$LOG/mcdm-imagenet64-adm-copies.json"; then
    record "mcdm bf16 imagenet64-adm b64 copies" "$(tail -1 "$LOG/bench-mcdm-copies.log")"
elif [ $? -ne 125 ]; then record "mcdm bf16 imagenet64-adm b64 copies" "FAILED or stopped"; fi
# What group norms taking their statistics from the convs' epilogues save (off by default until
# this run shows a gain): the ADM run again with MCDM_NORM_STATS_IN_CONV=1.
if step "mcdm bf16 imagenet64-adm b64 norm stats in conv" 90 bench-mcdm-norm-stats.log env MCDM_NORM_STATS_IN_CONV=1 \
    "$BIN" bench --device cuda --dtype bf16 --config tools/configs/imagenet64-adm.json --compose 3 --steps 10 \
    --batch 64 --iters 3 --output "$LOG/mcdm-imagenet64-adm-norm-stats.json"; then
    record "mcdm bf16 imagenet64-adm b64 norm stats in conv" "$(tail -1 "$LOG/bench-mcdm-norm-stats.log")"
elif [ $? -ne 125 ]; then record "mcdm bf16 imagenet64-adm b64 norm stats in conv" "FAILED or stopped"; fi
# And with the norms applied by the convs that read them too (MCDM_NORM_APPLY_IN_CONV=1): no
# normalised tensor stored but the pooled ones.
if step "mcdm bf16 imagenet64-adm b64 norms in conv" 90 bench-mcdm-norms-in-conv.log env MCDM_NORM_STATS_IN_CONV=1 \
    MCDM_NORM_APPLY_IN_CONV=1 "$BIN" bench --device cuda --dtype bf16 --config tools/configs/imagenet64-adm.json \
    --compose 3 --steps 10 --batch 64 --iters 3 --output "$LOG/mcdm-imagenet64-adm-norms-in-conv.json"; then
    record "mcdm bf16 imagenet64-adm b64 norms in conv" "$(tail -1 "$LOG/bench-mcdm-norms-in-conv.log")"
elif [ $? -ne 125 ]; then record "mcdm bf16 imagenet64-adm b64 norms in conv" "FAILED or stopped"; fi
# What replaying each step as a CUDA graph saves where launches dominate: the SynthFaces models'
# size (32x32, 32 channels), the default composition's 3 experts, batch 8, 50 steps.
[ "$QUICK" = 1 ] && graph_modes="" || graph_modes="graph nograph"
for graphs in $graph_modes; do
    flag=$([ $graphs = nograph ] && echo --no-cuda-graph || true)
    # shellcheck disable=SC2086  # flag: none or one
    if step "mcdm bf16 synthfaces b8 $graphs" 60 "bench-mcdm-synthfaces-$graphs.log" "$BIN" bench --device cuda \
        --dtype bf16 --config weights/uncond.json --compose 3 --steps 50 --batch 8 --iters 5 $flag \
        --output "$LOG/mcdm-synthfaces-$graphs.json"; then
        record "mcdm bf16 synthfaces b8 $graphs" "$(tail -1 "$LOG/bench-mcdm-synthfaces-$graphs.log")"
    elif [ $? -ne 125 ]; then record "mcdm bf16 synthfaces b8 $graphs" "FAILED or stopped"; fi
done
torch_bench() {
    local tag=$1 mode=$2 cfg b
    for cfg in imagenet64-adm face256; do
        b=$(batch_of $cfg)
        if step "torch $tag $cfg b$b" 150 "bench-torch-$cfg-$tag.log" python3 tools/bench_torch.py \
            tools/configs/$cfg.json --device cuda $mode --compose 3 --steps 10 --batch "$b" --warmup 1 \
            --runs 3 --json "$LOG/torch-$cfg-$tag.json"; then
            record "torch $tag $cfg b$b" "$(grep 'images/s' "$LOG/bench-torch-$cfg-$tag.log" | tail -1)"
        elif [ $? -ne 125 ]; then record "torch $tag $cfg b$b" "FAILED or stopped"; fi
    done
}
# PyTorch at its best without compiling: fp16, channels_last, cuDNN's autotuner.
[ "$QUICK" = 1 ] || torch_bench fp16 "--fp16 --channels-last --cudnn-benchmark"
# Where one forward pass of each config spends its GPU time, kernel by kernel (CUDA events).
for cfg in imagenet64-adm face256; do
    b=$(batch_of $cfg)
    if step "profile $cfg b$b" 60 "profile-$cfg.log" "$BIN" bench --device cuda --dtype bf16 \
        --config tools/configs/$cfg.json --batch "$b" --iters 2 --profile; then
        record "profile $cfg b$b" "ok (${LAST_SECONDS} s, table in report.md)"
    elif [ $? -ne 125 ]; then record "profile $cfg b$b" "FAILED or stopped"; fi
done
if [ "$QUICK" = 1 ]; then
    sanitize racecheck attention 120 "$ROOT/tests/gpu_ops" --nocapture --test-threads 1 attention_matches_cpu
else
    # TORCH_COMPILE_MODE: default unless set (max-autotune compiles for minutes per model).
    torch_bench fp16compile \
        "--fp16 --channels-last --cudnn-benchmark --compile --compile-mode ${TORCH_COMPILE_MODE:-default}"
    # 4. With the time left: racecheck on every conv variant (cp.async pipelines, ldmatrix reads).
    sanitize racecheck conv-variants 90 "$ROOT/tests/gpu_ops" --nocapture --test-threads 1 conv_matches_cpu
fi

snapshot
echo
echo "== device check ($SECONDS s) =="
cat "$LOG/bench-kernels.log" 2>/dev/null || true
cat "$LOG/bench-torch-kernels.log" 2>/dev/null || true
cat "$LOG/summary.txt"
