#!/usr/bin/env bash
# Scaling of sharded runs on this machine (issue #25): the same run as one process and as N
# shards in parallel processes (each shard given cores/N rayon threads), then `mcdm merge` of
# the shards, with wall times; and the merge of a large run of tiny images, for its cost per
# image. Prints a Markdown table.
#
#   scripts/bench-shards.sh [IMAGES] [STEPS] [MERGE_IMAGES]   # default 64 20 4000
set -euo pipefail
cd "$(dirname "$0")/.."
MCDM=${MCDM_BIN:-$PWD/target/release/mcdm}
images=${1:-64}
steps=${2:-20}
merge_images=${3:-4000}
cores=$(nproc)
T=$(mktemp -d /tmp/mcdm-shards.XXXXXX)
trap 'rm -rf "$T"' EXIT
unset RANK WORLD_SIZE SLURM_PROCID SLURM_NTASKS SLURM_ARRAY_TASK_ID JOB_COMPLETION_INDEX
run=(sample --model u=weights/uncond.safetensors --uncond u --num-samples "$images" --steps "$steps"
     --sampler ddim --batch-size 16 --device cpu --seed 0)
now() { date +%s.%N; }

echo "| processes | rayon threads each | wall s | images/s | vs one process |"
echo "|---:|---:|---:|---:|---:|"
base=""
for n in 1 2 4; do
    threads=$(( cores / n > 0 ? cores / n : 1 ))
    t0=$(now)
    for i in $(seq 0 $((n - 1))); do
        RAYON_NUM_THREADS=$threads "$MCDM" "${run[@]}" --shard "$i/$n" --out "$T/run$n" >/dev/null 2>&1 &
    done
    wait
    if [ "$n" = 1 ]; then
        # --shard 0/1 is the whole run, written into the folder itself.
        :
    else
        "$MCDM" merge "$T/run$n"/shard-*-of-$n --out "$T/merged$n" >/dev/null 2>&1
    fi
    wall=$(echo "$(now) - $t0" | bc -l)
    [ -z "$base" ] && base=$wall
    printf '| %d | %d | %.1f | %.2f | %.2fx |\n' "$n" "$threads" "$wall" \
        "$(echo "$images / $wall" | bc -l)" "$(echo "$base / $wall" | bc -l)"
done

# The merge alone, at many images: 4 shards of 2-step samples.
for i in 0 1 2 3; do
    "$MCDM" sample --model u=weights/uncond.safetensors --uncond u --num-samples "$merge_images" \
        --steps 2 --sampler ddim --batch-size 64 --device cpu --shard "$i/4" --out "$T/big" >/dev/null 2>&1
done
t0=$(now)
"$MCDM" merge "$T"/big/shard-*-of-4 --out "$T/big-merged" --npz "$T/big.npz" >/dev/null 2>&1
merge=$(echo "$(now) - $t0" | bc -l)
bytes=$(du -sb "$T/big-merged" | cut -f1)
echo
printf 'merge of 4 shards, %d images of 32x32 (with --npz): %.2f s, %.3f ms per image; merged folder %d bytes (%.0f bytes per image, hard links to the shards'"'"' files)\n' \
    "$merge_images" "$merge" "$(echo "$merge * 1000 / $merge_images" | bc -l)" "$bytes" \
    "$(echo "$bytes / $merge_images" | bc -l)"
