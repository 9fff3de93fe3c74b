#!/usr/bin/env bash
# A sharded run on a real Slurm scheduler, killed and resumed, equals the one-process run byte
# for byte (issue #25). Installs Slurm and munge from Debian's packages when they are missing
# (as root, or with sudo), starts a one-node cluster on this machine (munged, slurmctld and
# slurmd, their state and sockets in a temporary folder, on free ports), and:
#   1. submits the default job (8 images, 50 DDPM steps, CPU) as a job array of 4 tasks, each
#      shard SLURM_ARRAY_TASK_ID of --num-shards 4 (the contract of examples/slurm/array.sbatch);
#   2. kills task 2 with SIGKILL once it has published its first image;
#   3. resubmits task 2 alone (`sbatch --array=2`) with --resume;
#   4. merges the shards and compares every PNG, the grid and the .npz with a one-process run.
# It stops the daemons it started and removes its folder. Exit 77: Slurm is missing and cannot
# be installed here (tests/slurm.rs then skips, or fails under MCDM_REQUIRE_ALL_CHECKS=1).
#
#   scripts/slurm-test.sh                    # uses target/release/mcdm (MCDM_BIN to override)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MCDM=${MCDM_BIN:-$ROOT/target/release/mcdm}
[ -x "$MCDM" ] || { echo "slurm-test: no mcdm binary at $MCDM (cargo build --release)" >&2; exit 1; }
START=$(date +%s)
say() { echo "slurm-test: [$(( $(date +%s) - START )) s] $*"; }

have_slurm() { command -v sbatch && command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null
if ! have_slurm; then
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
            echo "slurm-test: Slurm is not installed and this user cannot install it (not root, no sudo)" >&2
            exit 77
        fi
    fi
    command -v apt-get >/dev/null || { echo "slurm-test: Slurm is not installed and there is no apt-get" >&2; exit 77; }
    say "installing slurmctld, slurmd, slurm-client and munge from Debian's packages"
    packages=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1; then
        "${SUDO[@]}" apt-get update -qq >/dev/null
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    fi
    # The packages' own services (if an init system started them) are not ours: stop them.
    for s in slurmctld slurmd munge; do "${SUDO[@]}" service "$s" stop >/dev/null 2>&1 || true; done
fi

T=$(mktemp -d /tmp/mcdm-slurm.XXXXXX)
chmod 755 "$T"
stop_daemons() {
    for pidfile in "$T"/slurmd.pid "$T"/slurmctld.pid "$T"/munge/munged.pid; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    for pidfile in "$T"/slurmd.pid "$T"/slurmctld.pid "$T"/munge/munged.pid; do
        [ -s "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
}
finish() {
    rc=$?
    if [ $rc != 0 ] && [ -d "$T" ]; then
        for log in "$T"/*.log; do
            [ -f "$log" ] && { echo "--- $log (last lines)"; tail -n 15 "$log"; }
        done >&2
    fi
    stop_daemons
    rm -rf "$T"
    exit $rc
}
trap finish EXIT

# Ports: the first free pair from a random start, so that two runs on one machine do not meet.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=$(( 20000 + RANDOM % 20000 ))
while ! { port_free "$port" && port_free $((port + 1)); }; do port=$((port + 2)); done

user=$(id -un)
host=$(hostname -s)
mkdir -p "$T"/state "$T"/spool "$T"/munge
chmod 700 "$T"/munge
head -c 1024 /dev/urandom > "$T"/munge/munge.key
chmod 400 "$T"/munge/munge.key
cat > "$T"/slurm.conf <<EOF
ClusterName=mcdmtest
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$T/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
export SLURM_CONF=$T/slurm.conf
munged --key-file="$T"/munge/munge.key --socket="$T"/munge/munge.sock \
    --pid-file="$T"/munge/munged.pid --log-file="$T"/munge/munged.log --seed-file="$T"/munge/seed --force
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 0.2
done
sinfo -h -o %T | grep -q idle || { echo "slurm-test: the node did not come up" >&2; exit 1; }
say "a one-node cluster is up ($host, ports $port-$((port + 1)), $(nproc) CPUs)"

# The run: small enough for CI, long enough (one image per batch) for a kill to land midway.
# No scheduler variables leak in from whatever runs this script.
unset RANK WORLD_SIZE SLURM_PROCID SLURM_NTASKS SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_MIN \
    SLURM_ARRAY_TASK_COUNT JOB_COMPLETION_INDEX
run=(sample --job "$ROOT"/examples/default.json --num-samples 8 --batch-size 1 --device cpu)
"$MCDM" "${run[@]}" --out "$T"/single --npz "$T"/single.npz >/dev/null 2>"$T"/single.log
say "one-process run: $(ls "$T"/single | grep -c '^[0-9]*\.png$') images"

cat > "$T"/job.sbatch <<EOF
#!/bin/bash
#SBATCH --job-name=mcdm-test
#SBATCH --array=0-3
#SBATCH --output=$T/task-%a.log
exec "$MCDM" ${run[*]} --num-shards 4 --out "$T"/run --resume
EOF
job=$(cd "$T" && sbatch --parsable "$T"/job.sbatch)
job=${job%%;*}
say "submitted job array $job (tasks 0-3)"
record=$T/run/shard-2-of-4/record.json
for _ in $(seq 3000); do
    [ -f "$record" ] && grep -q '"partial"' "$record" && break
    sleep 0.05
done
grep -q '"partial"' "$record" 2>/dev/null || { echo "slurm-test: task 2 never published a partial run" >&2; exit 1; }
scancel --signal=KILL --full "${job}_2"
for _ in $(seq 1200); do
    [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break
    sleep 0.1
done
[ -z "$(squeue -h -j "$job")" ] || { echo "slurm-test: job $job did not end" >&2; exit 1; }
grep -q '"partial"' "$record" || { echo "slurm-test: task 2 finished before it was killed" >&2; exit 1; }
kept=$(grep -o '"images": *[0-9]*' "$record" | grep -o '[0-9]*$')
say "killed task 2 with SIGKILL after $kept of its 2 images; the other tasks finished"

(cd "$T" && sbatch --wait --array=2 "$T"/job.sbatch >/dev/null)
grep -q '"complete"' "$record" || { echo "slurm-test: the resubmitted task 2 did not complete" >&2; exit 1; }
grep -q "kept from the stopped run" "$T"/task-2.log \
    || { echo "slurm-test: the resubmitted task 2 did not resume" >&2; exit 1; }
say "resubmitted task 2 alone with --resume: complete, $kept image(s) kept"

"$MCDM" merge "$T"/run/shard-{0,1,2,3}-of-4 --out "$T"/merged --npz "$T"/merged.npz >/dev/null 2>"$T"/merge.log
count=0
for f in "$T"/single/*.png; do
    cmp -s "$f" "$T/merged/$(basename "$f")" || { echo "slurm-test: $(basename "$f") differs from the one-process run" >&2; exit 1; }
    count=$((count + 1))
done
[ "$(ls "$T"/merged | grep -c '\.png$')" = "$count" ] || { echo "slurm-test: the merged run has other images" >&2; exit 1; }
cmp -s "$T"/single.npz "$T"/merged.npz || { echo "slurm-test: the .npz differs" >&2; exit 1; }
say "PASS: the merged shards equal the one-process run byte for byte ($count PNGs with the grid, and the .npz)"
