#!/usr/bin/env bash
# Reproduces the shipped policy models/general.onnx (+ general.card.json) from a fresh
# clone, in one command:
#
#     scripts/train-general.sh
#
# 1. builds vmm, vmm-learn (the learner) and the test kernels in release;
# 2. round 1: collects a training set: the training scenarios of the workload suite
#    (cpu-idle, io-contention, mixed; `bursty` is held out) for seeds 1..SEEDS on VMs of
#    several shapes (1 to 4 vCPUs, 1 to 4 drives, varying with the seed: scripts/collect.sh),
#    behaviour policies threshold/static exploring with EPSILON, into
#    target/learn/runs.db, and trains a first policy on it;
# 3. rounds 2..ROUNDS: run the same scenarios and seeds under the policy trained on the
#    rounds before, exploring with EPSILON2 (VM ids `<scenario>-<seed>-r2`, `-r3`, ...), so
#    the data also covers the states a learned policy leads to (e.g. a drive it throttled
#    while idle when I/O starts), which the heuristics never visit, and the policy sees
#    what its own mistakes cost (e.g. a vCPU added as an I/O phase ends);
# 4. trains offline on all rounds with `vmm-learn train` (DQN, Double DQN targets over the
#    actions valid in the next state, Huber loss, change penalty, experience replay,
#    target network) and writes the model and its card; `vmm-learn train` loads the written
#    model back through tract and fails if its Q-values differ from the trainer's.
# 5. records the recipe in the card (`evaluation.recipe`: this command with its
#    settings, its wall time, the transitions trained on).
#
# The policy uses actions v2, one layout for every VM shape, so the one file serves VMs
# of 1 to 8 vCPUs, 0 to 4 drives and 0 to 2 network devices (its card's `serves`).
#
# The runs are real VMs on a shared machine, so the data (and so the weights) differ from
# run to run; the card records what the model saw. Needs /dev/kvm. ~10 minutes here
# per round (48 runs of ~10 s, and ~10 s per training): ~50 minutes with 5 rounds.
#
# Environment: ROUNDS (5), SEEDS (16), EPSILON (0.4), EPSILON2 (0.3), STEPS (40000),
# DB (target/learn/runs.db), OUT (models/general.onnx); SHAPES, PHASE_MS, PHASES as
# scripts/collect.sh takes them, and VMM (the monitor the VMs run on). A shorter recipe:
# ROUNDS=2 SEEDS=16 (80 runs, ~20 min here).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
[[ $rounds =~ ^[0-9]+$ ]] && [ "$rounds" -ge 1 ] || { echo "train-general.sh: ROUNDS must be a positive integer" >&2; exit 2; }
seeds=${SEEDS:-16}
epsilon=${EPSILON:-0.4}
epsilon2=${EPSILON2:-0.3}
steps=${STEPS:-40000}
db=${DB:-target/learn/runs.db}
out=${OUT:-models/general.onnx}
round_dir="$(dirname "$db")"
started=$(date +%s)

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -p vmm -p learner -p test-kernels
fi
mkdir -p "$round_dir"
rm -f "$db" "$db-wal" "$db-shm"
train() {
    target/release/vmm-learn train --state-db "$db" --steps "$steps" --exclude-prefix bursty "$@"
}
echo "== round 1: heuristics exploring (epsilon $epsilon)"
NO_BUILD=1 scripts/collect.sh "$db" "$seeds" "$epsilon"
[ "$rounds" -eq 1 ] || train --out "$round_dir/round1.onnx" --name general-round1
for round in $(seq 2 "$rounds"); do
    echo "== round $round: the round-$((round - 1)) policy exploring (epsilon $epsilon2)"
    NO_BUILD=1 POLICY="$round_dir/round$((round - 1)).onnx" SUFFIX="-r$round" \
        scripts/collect.sh "$db" "$seeds" "$epsilon2"
    [ "$round" -eq "$rounds" ] || train --out "$round_dir/round$round.onnx" --name "general-round$round"
done
train --out "$out" --name general \
    --description "General policy for the phased workload suite, one file for every VM shape (actions v2: 1-8 vCPUs, 0-4 drives, 0-2 network devices; trained on VMs of 1-4 vCPUs and 1-4 drives): DQN trained offline on cpu-idle, io-contention and mixed runs of threshold/static heuristics and of $((rounds - 1)) earlier learned policies, all exploring (bursty held out)"
seconds=$(($(date +%s) - started))
command="ROUNDS=$rounds SEEDS=$seeds EPSILON=$epsilon EPSILON2=$epsilon2 STEPS=$steps SHAPES=${SHAPES:-varied} PHASE_MS=${PHASE_MS:-1500} PHASES=${PHASES:-6} scripts/train-general.sh"
card="${out%.onnx}.card.json"
python3 - "$card" "$command" "$seconds" <<'PY'
import json, sys
path, command, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path) as f:
    card = json.load(f)
ev = card.setdefault("evaluation", {})
ev["recipe"] = {
    "command": command,
    "wall_time_s": seconds,
    "transitions": ev.get("data", {}).get("transitions"),
}
with open(path, "w") as f:
    json.dump(card, f, indent=2)
    f.write("\n")
PY
echo "train-general.sh: $command took ${seconds} s; card $card"
