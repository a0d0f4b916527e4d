#!/usr/bin/env bash
# The project's test command: everything a fresh machine needs, then the whole suite.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== set-up"
# The Linux boot test needs Debian's cloud kernel; fetch it once into target/.
bash scripts/fetch-debian-kernel.sh target/debian-kernel

echo "== build (also builds the test kernels into target/test-kernels/)"
cargo build --workspace --all-targets

echo "== tests"
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
