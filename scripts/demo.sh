#!/usr/bin/env bash
# The project's main job on a fresh machine: build the monitor and boot a demo VM.
# Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
echo "== booting the hello test kernel"
target/release/vmm run --kernel target/test-kernels/hello
echo "== a 2-vCPU cpu-burn guest for 1 s"
target/release/vmm run --kernel target/test-kernels/cpu-burn --vcpus 2 --cmdline ms=1000
