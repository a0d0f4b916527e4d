#!/usr/bin/env bash
# Builds a training set for the tuner's learner: runs the `phased` workload kernel
# (resources/test-kernels/README.md, "phased") under exploring built-in policies and
# stores one row per interval (INTERVAL_MS, default 100 ms) in a state repository.
#
# Usage: scripts/collect.sh OUT.db [SEEDS] [EPSILON]
#   OUT.db   state repository to write (created, or appended to)
#   SEEDS    seeds 1..SEEDS per scenario (default 4)
#   EPSILON  exploration rate of the behaviour policy, 0..=1 (default 0.3)
#
# Runs the training scenarios cpu-idle, io-contention and mixed (never bursty: it is held
# out for evaluation) for every seed, each as its own VM id `<scenario>-<seed>`, with 64 MiB
# and 64 MiB sparse drives in a temporary directory. The VM's shape varies with the seed
# (SHAPES=varied, the default), so that one policy learns every slot of the action layout
# (actions v2): seeds 1..8 run 2 vCPUs/2 drives, 1/3, 4/1, 3/4, 2/4, 4/2, 1/1, 3/3 (then
# again), the foreground and background drives of the io phases moving over the drives
# (fg = drive seed mod N, bg = the next one). A VM with one drive runs cpu-idle only (io
# phases need two drives). SHAPES=fixed runs every seed on 2 vCPUs and two drives (fg =
# blk0, bg = blk1), as before actions v2. No network device: the runs need no TAP.
# The behaviour policy alternates across seeds: `--tuner threshold` for odd seeds,
# `--tuner static` for even ones, both exploring with EPSILON, so the data covers several
# behaviours; with POLICY=model.onnx every run uses that learned policy instead (exploring
# with EPSILON: the second round of scripts/train-general.sh, which gathers the states a
# learned policy leads to). A run lasts PHASES x PHASE_MS on average (default 6 x 1500 ms, at most
# 13.5 s). Prints one line per run, then the repository's row count.
#
# Environment: PHASE_MS (1500), PHASES (6), INTERVAL_MS (100, the sampling and tuning
# interval; the benchmark's), SHAPES (varied or fixed), VMM (default target/release/vmm),
# NO_BUILD=1 to skip the release build (then the binaries must exist), POLICY (see above),
# SUFFIX appended to every VM id (e.g. `-r2`, so that a second round's runs are episodes of
# their own in the same repository), FIRST_SEED (1: the seeds are FIRST_SEED ..
# FIRST_SEED + SEEDS - 1, e.g. to add seeds to a repository without repeating VM ids).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: scripts/collect.sh OUT.db [SEEDS] [EPSILON]" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 3 ] || usage
out=$1
seeds=${2:-4}
epsilon=${3:-0.3}
phase_ms=${PHASE_MS:-1500}
phases=${PHASES:-6}
interval_ms=${INTERVAL_MS:-100}
behaviour_model=${POLICY:-}
suffix=${SUFFIX:-}
first_seed=${FIRST_SEED:-1}
[[ $first_seed =~ ^[0-9]+$ ]] && [ "$first_seed" -ge 1 ] || { echo "collect.sh: FIRST_SEED must be a positive integer" >&2; exit 2; }
shapes=${SHAPES:-varied}
[ "$shapes" = varied ] || [ "$shapes" = fixed ] || { echo "collect.sh: SHAPES must be varied or fixed" >&2; exit 2; }
[[ $seeds =~ ^[0-9]+$ ]] && [ "$seeds" -ge 1 ] || { echo "collect.sh: SEEDS must be a positive integer" >&2; exit 2; }
[[ $epsilon =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || { echo "collect.sh: EPSILON must be in 0..=1" >&2; exit 2; }
[[ $phase_ms =~ ^[0-9]+$ ]] && [[ $phases =~ ^[0-9]+$ ]] && [[ $interval_ms =~ ^[0-9]+$ ]] || { echo "collect.sh: PHASE_MS, PHASES and INTERVAL_MS must be integers" >&2; exit 2; }

if [ ! -w /dev/kvm ]; then
    echo "collect.sh: /dev/kvm is missing or not writable: the runs need KVM" >&2
    exit 1
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
    echo "== build (release): vmm and the test kernels"
    cargo build --release -p vmm -p test-kernels
fi
vmm=${VMM:-target/release/vmm}
kernel=target/test-kernels/phased
if [ -n "$behaviour_model" ] && [ ! -f "$behaviour_model" ]; then
    echo "collect.sh: POLICY=$behaviour_model is not a file" >&2
    exit 2
fi
for f in "$vmm" "$kernel"; do
    [ -x "$f" ] || { echo "collect.sh: $f is missing (build first)" >&2; exit 1; }
done

mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/collect.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
truncate -s 64M "$tmp/d0.img" "$tmp/d1.img" "$tmp/d2.img" "$tmp/d3.img"

# The VM shape of a seed: "vcpus drives".
shape_of() {
    if [ "$shapes" = fixed ]; then
        echo "2 2"
        return
    fi
    local table=("2 2" "1 3" "4 1" "3 4" "2 4" "4 2" "1 1" "3 3")
    echo "${table[$(( ($1 - 1) % 8 ))]}"
}

failed=0
for seed in $(seq "$first_seed" $((first_seed + seeds - 1))); do
    if [ -n "$behaviour_model" ]; then
        policy=$(basename "$behaviour_model" .onnx)
        policy_args=(--policy "$behaviour_model")
    else
        if [ $((seed % 2)) -eq 1 ]; then policy=threshold; else policy=static; fi
        policy_args=(--tuner "$policy")
    fi
    read -r vcpus drives <<<"$(shape_of "$seed")"
    drive_args=()
    for d in $(seq 0 $((drives - 1))); do
        drive_args+=(--drive "path=$tmp/d$d.img,id=d$d")
    done
    # The io phases' foreground and background drives (a one-drive VM has no io phase).
    devs=""
    if [ "$shapes" = varied ] && [ "$drives" -ge 2 ]; then
        devs=" dev_fg=$((seed % drives)) dev_bg=$(((seed + 1) % drives))"
    fi
    scenarios="cpu-idle io-contention mixed"
    [ "$drives" -ge 2 ] || scenarios="cpu-idle"
    for scenario in $scenarios; do
        vm_id="$scenario-$seed$suffix"
        start=$(date +%s%N)
        status=0
        "$vmm" run --kernel "$kernel" --vcpus "$vcpus" --mem-mib 64 "${drive_args[@]}" \
            --metrics-interval-ms "$interval_ms" "${policy_args[@]}" --epsilon "$epsilon" \
            --state-db "$out" --vm-id "$vm_id" --timeout-ms 60000 \
            --cmdline "scenario=$scenario seed=$seed phase_ms=$phase_ms phases=$phases$devs" \
            >"$tmp/out.txt" 2>"$tmp/err.txt" || status=$?
        ms=$((($(date +%s%N) - start) / 1000000))
        done_line=$(grep -a '^phased: done' "$tmp/out.txt" || true)
        printf '%-18s vcpus=%s drives=%s policy=%-9s epsilon=%s status=%s wall_ms=%s %s\n' \
            "$vm_id" "$vcpus" "$drives" "$policy" "$epsilon" "$status" "$ms" "${done_line:-(no done line)}"
        if [ "$status" -ne 0 ]; then
            failed=$((failed + 1))
            tail -n 5 "$tmp/out.txt" "$tmp/err.txt" >&2
        fi
    done
done

if command -v sqlite3 >/dev/null 2>&1; then
    rows=$(sqlite3 "$out" 'SELECT COUNT(*) FROM samples')
else
    "$vmm" state export --state-db "$out" --out "$tmp/rows.csv" >/dev/null
    rows=$(($(wc -l <"$tmp/rows.csv") - 1))
fi
echo "collect.sh: $rows rows in $out ($failed failed runs)"
[ "$failed" -eq 0 ]
