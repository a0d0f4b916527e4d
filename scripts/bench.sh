#!/usr/bin/env bash
# The project's benchmarks in one command (see BENCHMARKS.md):
#   1. builds everything in release mode,
#   2. installs QEMU (Debian's qemu-system-x86) if qemu-system-x86_64 is missing,
#   3. runs vmm-bench all: boot latency (vmm vs QEMU microvm), port-I/O exit round trip
#      (vmm vs a bare kvm-ioctls loop, and QEMU), the monitor's resident memory, virtio-blk
#      throughput (vmm vs a host pread/pwrite loop on the same file, and QEMU microvm's
#      virtio-blk), rate limiter accuracy, telemetry overhead,
#   4. prints a summary. JSON results:
#      target/bench/{boot,pio,memory,blk,ratelimit,telemetry,all}.json.
# Usage: scripts/bench.sh [vmm-bench all options, e.g. --quick or --no-qemu]
# BENCH_NICE (default -10): niceness of the benchmark run, when allowed (root): the machine
# is shared, and a higher priority than the builds around it keeps the figures steadier;
# both sides of every comparison run at the same priority. BENCH_NICE=0 turns it off.
# Takes about 5 to 6 minutes after the build on a 2-core machine; it writes a 256 MiB
# image, target/bench/blk.img, for the virtio-blk benchmarks (rewritten on every run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -w /dev/kvm ]; then
    echo "bench.sh: /dev/kvm is missing or not writable: the benchmarks need KVM" >&2
    exit 1
fi

echo "== build (release)"
cargo build --release --workspace

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "== installing qemu-system-x86 (for the QEMU microvm comparison)"
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    fi
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends qemu-system-x86; }; then
        echo "bench.sh: could not install qemu-system-x86; QEMU will be reported as not measured" >&2
    fi
fi

mkdir -p target/bench
echo "== benchmarks (progress below; JSON in target/bench/)"
nice_level="${BENCH_NICE:--10}"
prefix=()
if [ "$nice_level" != 0 ] && { [ "$(id -u)" -eq 0 ] || [ "$nice_level" -gt 0 ]; }; then
    prefix=(nice -n "$nice_level")
    echo "   (running at niceness $nice_level)"
fi
start=$(date +%s)
"${prefix[@]}" target/release/vmm-bench all "$@" >/dev/null
echo "== done in $(($(date +%s) - start)) s"
echo
target/release/vmm-bench summary
