#!/usr/bin/env bash
# The project's main job on a fresh machine: build the monitor and boot a demo VM with
# the tuner on. Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
vmm=target/release/vmm
mkdir -p target/demo
rm -f target/demo/runs.db*

echo "== booting the hello test kernel"
$vmm run --kernel target/test-kernels/hello

echo "== a guest doing random disk reads for 5 s, tuned by an ONNX Q-network"
echo "   (the policy explores with epsilon 0.2; safeguards on; one row per 100 ms in target/demo/runs.db)"
[ -f target/demo/disk.img ] || dd if=/dev/zero of=target/demo/disk.img bs=1M count=64 status=none
$vmm run --kernel target/test-kernels/blk-io --vcpus 2 --mem-mib 64 \
    --drive path=target/demo/disk.img \
    --cmdline "mode=randread ms=5000 depth=4" \
    --policy models/test-policy.onnx --epsilon 0.2 \
    --state-db target/demo/runs.db --metrics-interval-ms 100

echo "== what the tuner did (action: intervals)"
$vmm state export --state-db target/demo/runs.db --format csv --out target/demo/runs.csv
python3 - <<'PY'
import csv, collections
rows = list(csv.DictReader(open("target/demo/runs.csv")))
acts = collections.Counter(r["action"] or "-" for r in rows)
for a, n in acts.most_common():
    print(f"  {a}: {n}")
PY
