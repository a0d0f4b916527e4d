#!/usr/bin/env bash
# Multi-tenant benchmark of `vmm host` (issue 16, items 6-7): every scenario (noisy,
# peaks, bursty: held out) x arm (alone, static taskset partition, arbiter off,
# threshold, pi, slo), interleaved per seed. The driver is scripts/bench_host.py (its
# docstring describes the scenarios, arms and figures).
#
# Usage: scripts/bench-host.sh [SEEDS] [more bench_host.py arguments]
#   (env: VMM, KERNELS, RUN_MS, WARM_MS, MIN_OPS, P99_US, BURSTY_MIN_OPS)
# Writes target/bench/host-<scenario>.json and target/bench/host-all.json; draw the plots
# with `vmm-bench host-plot`.
set -euo pipefail
SEEDS=${1:-5}
shift || true
exec python3 "$(cd "$(dirname "$0")" && pwd)/bench_host.py" --seeds "$SEEDS" "$@"
