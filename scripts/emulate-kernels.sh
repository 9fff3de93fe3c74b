#!/usr/bin/env bash
# Checks every CUDA kernel's real source on the CPU (tools/kernel-emu/README.md): rewrites
# kernels/ into target/kernel-emu/gen, builds one test driver per kernel family against the
# emulator, runs each under every thread schedule and prints a table. Exit status non-zero on
# any failure. The drivers are
# built with AddressSanitizer and UBSan where the compiler has them: every input and output is an
# allocation of exactly its size, so a kernel that reads or writes outside one aborts its run,
# the CPU's counterpart of compute-sanitizer's memcheck.
#   scripts/emulate-kernels.sh [--mutants]   (--mutants: also the mutation check, ~80 s)
set -euo pipefail
cd "$(dirname "$0")/.."

mutants=0
case "${1:-}" in
    "") ;;
    --mutants) mutants=1 ;;
    *) echo "usage: $0 [--mutants]" >&2; exit 2 ;;
esac

out=target/kernel-emu
cxx="${CXX:-g++} -O2 -std=c++17 -pthread -ffp-contract=off"
sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
if echo 'int main() { return 0; }' | ${CXX:-g++} $sanitizers -x c++ -o /dev/null - 2>/dev/null; then
    cxx="$cxx $sanitizers"
    # Memory errors only: LeakSanitizer needs ptrace, which sandboxes (gVisor) may refuse.
    export ASAN_OPTIONS=detect_leaks=0
elif [[ "${MCDM_REQUIRE_ALL_CHECKS:-}" == 1 ]]; then
    echo "emulate-kernels: ${CXX:-g++} has no AddressSanitizer (libasan), and MCDM_REQUIRE_ALL_CHECKS=1 requires the bounds check" >&2
    exit 1
else
    echo "emulate-kernels: ${CXX:-g++} has no AddressSanitizer: out-of-bounds accesses go unchecked" >&2
fi
drivers=(conv group_norm attention linear resample layout layer_norm step peak)
# driver and arguments, one row of the table each
runs=("conv delayed" "conv immediate" group_norm "attention delayed" "attention immediate" linear resample layout layer_norm step peak)
# EMU_SCHEDULE values (emu.h): the orders in which threads, warps and blocks run; a missing
# barrier or a dependence between blocks shows in some of them only.
schedules=(forward reverse shuffle forward-by-warp reverse-by-warp shuffle-by-warp)
# A run (one driver, one schedule) takes under 15 s here: past this it is a kernel that spins.
run_timeout=${EMU_RUN_TIMEOUT:-300}

rm -rf "$out/logs"
mkdir -p "$out/bin" "$out/logs"
python3 tools/kernel-emu/prep.py --out "$out/gen"

start=$SECONDS
echo "building ${#drivers[@]} drivers ..."
printf '%s\n' "${drivers[@]}" | xargs -P "$(nproc)" -I{} \
    sh -c "$cxx -I $out/gen -I tools/kernel-emu -o $out/bin/test_{} tools/kernel-emu/test_{}.cpp || exit 255"
echo "built in $((SECONDS - start)) s"

failed=0
printf '\n%-22s %6s %9s %7s %10s %6s\n' driver cases schedules failed "emu errors" time
for run in "${runs[@]}"; do
    read -r driver args <<<"$run"
    t0=$SECONDS
    cases=0 failures=0 errors=0 bad=()
    for schedule in "${schedules[@]}"; do
        log="$out/logs/${run// /_}.$schedule.log"
        status=0
        # shellcheck disable=SC2086  # args: zero or more words
        EMU_SCHEDULE=$schedule timeout -k 5 "$run_timeout" "$out/bin/test_$driver" $args >"$log" 2>&1 \
            || status=$?
        summary=$(grep '^SUMMARY' "$log" || true)
        field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$summary"; }
        if [[ $status -eq 124 || $status -eq 137 ]]; then
            bad+=("$schedule: timed out after ${run_timeout} s, $(grep -o 'running kernel .*' "$log" || echo 'killed') (see $log)")
            continue
        elif [[ -z "$summary" ]]; then
            bad+=("$schedule: CRASHED (exit $status, see $log)")
            continue
        fi
        cases=$(field cases)
        failures=$((failures + $(field failed)))
        errors=$((errors + $(field emulator_errors) + $(field bank_conflicts)))
        [[ $status -eq 0 ]] || bad+=("$schedule")
    done
    printf '%-22s %6s %9s %7s %10s %5ds %s\n' "$run" "$cases" "${#schedules[@]}" "$failures" "$errors" \
        "$((SECONDS - t0))" "${bad:+FAILED in ${bad[*]}}"
    [[ ${#bad[@]} -eq 0 ]] || failed=1
done

if [[ $failed -ne 0 ]]; then
    echo
    grep -h -E '^FAIL|EMU' "$out"/logs/*.log | head -40 || true
fi

if [[ $mutants -eq 1 ]]; then
    echo
    python3 tools/kernel-emu/mutants.py --cxx "$cxx" --schedules "${schedules[*]}" || failed=1
fi

echo
echo "total $((SECONDS - start)) s, logs in $out/logs: $([[ $failed -eq 0 ]] && echo PASS || echo FAIL)"
exit $failed
