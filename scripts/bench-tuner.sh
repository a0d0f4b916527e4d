#!/usr/bin/env bash
# Tuner policies on the phased workload suite (see bench/src/tuner.rs):
#   1. installs a TrueType font for the plots' text (Debian's fonts-dejavu-core) if missing,
#   2. builds vmm, vmm-learn (the learner), vmm-bench and the test kernels in release mode,
#   3. runs `vmm-bench tuner` (one VM at a time): a calibration sweep of the 150 static
#      configurations, then every scenario x seed under threshold, random, learned
#      (models/general.onnx, when present), online (`vmm-learn online` from scratch beside
#      each VM, which runs `--tuner static --epsilon 0.2`) and
#      the top predicted static configurations.
# Output: target/bench-tuner/{report.md,results.json,*.png,serial/}.
# Usage: scripts/bench-tuner.sh [vmm-bench tuner options, e.g. --quick, --seeds 3,
#        --scenarios mixed,bursty]
# A full run takes about 30-35 minutes on a 2-core machine; --quick about 2 minutes.
# BENCH_NICE (default -10): niceness of the run when allowed (root); 0 turns it off.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -w /dev/kvm ]; then
    echo "bench-tuner.sh: /dev/kvm is missing or not writable: the benchmark needs KVM" >&2
    exit 1
fi

if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    echo "== installing fonts-dejavu-core (text in the plots)"
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    fi
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends fonts-dejavu-core; }; then
        echo "bench-tuner.sh: could not install fonts-dejavu-core; the plots will have no text" >&2
    fi
fi

echo "== build (release)"
cargo build --release -p vmm -p learner -p vmm-bench -p test-kernels

nice_level="${BENCH_NICE:--10}"
prefix=()
if [ "$nice_level" != 0 ] && { [ "$(id -u)" -eq 0 ] || [ "$nice_level" -gt 0 ]; }; then
    prefix=(nice -n "$nice_level")
    echo "   (running at niceness $nice_level)"
fi
echo "== vmm-bench tuner $* (progress below)"
start=$(date +%s)
"${prefix[@]}" target/release/vmm-bench tuner --jobs 1 "$@"
echo "== done in $(($(date +%s) - start)) s; report: target/bench-tuner/report.md"
