#!/usr/bin/env bash
# The project's main job on a fresh machine: build the monitor and boot a demo VM with
# the tuner on. Usage: scripts/demo.sh
# Builds the monitor and the test kernels only: the learner (`vmm-learn`, burn) is not
# needed to run a VM with a trained policy (`cargo build --release -p learner` for it).
# LEARN=1 also builds vmm-learn and lets it learn online beside the last VM, warm-started
# from the shipped policy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p vmm -p test-kernels
if [ -n "${LEARN:-}" ]; then
    cargo build --release -p learner
fi
vmm=target/release/vmm
mkdir -p target/demo
rm -f target/demo/runs.db*

echo "== booting the hello test kernel"
$vmm run --kernel target/test-kernels/hello

echo "== the phased workload (cpu, io and idle phases, 2 vCPUs, 2 drives), tuned by the"
echo "   shipped DQN policy models/general.onnx (greedy; safeguards on; one row per 100 ms"
echo "   in target/demo/runs.db)"
for d in fg bg; do
    [ -f target/demo/$d.img ] || truncate -s 64M target/demo/$d.img
done
if [ -n "${LEARN:-}" ]; then
    echo "   (LEARN=1: vmm-learn online beside it, from models/general.onnx, exploring 0.1)"
    rm -f target/demo/vm.sock
    $vmm run --kernel target/test-kernels/phased --vcpus 2 --mem-mib 64 \
        --drive path=target/demo/fg.img --drive path=target/demo/bg.img \
        --cmdline "scenario=mixed seed=7 phase_ms=1500 phases=6" \
        --policy models/general.onnx --epsilon 0.1 --api-sock target/demo/vm.sock \
        --state-db target/demo/runs.db --metrics-interval-ms 100 &
    vm=$!
    for _ in $(seq 100); do
        [ -S target/demo/vm.sock ] && [ -f target/demo/runs.db ] && break
        sleep 0.1
    done
    target/release/vmm-learn online --api-sock target/demo/vm.sock \
        --state-db target/demo/runs.db --policy models/general.onnx --out-dir target/demo/online
    wait "$vm"
else
    $vmm run --kernel target/test-kernels/phased --vcpus 2 --mem-mib 64 \
        --drive path=target/demo/fg.img --drive path=target/demo/bg.img \
        --cmdline "scenario=mixed seed=7 phase_ms=1500 phases=6" \
        --policy models/general.onnx \
        --state-db target/demo/runs.db --metrics-interval-ms 100
fi

echo "== what the tuner did (action: intervals)"
$vmm state export --state-db target/demo/runs.db --format csv --out target/demo/runs.csv
python3 - <<'PY'
import csv, collections
rows = list(csv.DictReader(open("target/demo/runs.csv")))
acts = collections.Counter(r["action"] or "-" for r in rows)
for a, n in acts.most_common():
    print(f"  {a}: {n}")
PY
