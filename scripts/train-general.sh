#!/usr/bin/env bash
# Reproduces the shipped policy models/general.onnx (+ general.card.json) from a fresh
# clone, in one command:
#
#     scripts/train-general.sh
#
# 1. builds vmm and the test kernels in release (scripts/collect.sh does it);
# 2. collects a training set: the training scenarios of the workload suite (cpu-idle,
#    io-contention, mixed; `bursty` is held out) for seeds 1..SEEDS, behaviour policies
#    threshold/static exploring with EPSILON, into target/learn/runs.db;
# 3. trains offline with `vmm train` (DQN, Double DQN targets, Huber loss, experience
#    replay, target network) and writes the model and its card; `vmm train` loads the
#    written model back through tract and fails if its Q-values differ from the trainer's.
#
# The runs are real VMs on a shared machine, so the data (and so the weights) differ from
# run to run; the card records what the model saw. Needs /dev/kvm. ~5 minutes here.
#
# Environment: SEEDS (8), EPSILON (0.4), STEPS (20000), DB (target/learn/runs.db),
# OUT (models/general.onnx).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-8}
epsilon=${EPSILON:-0.4}
steps=${STEPS:-20000}
db=${DB:-target/learn/runs.db}
out=${OUT:-models/general.onnx}

mkdir -p "$(dirname "$db")"
rm -f "$db" "$db-wal" "$db-shm"
scripts/collect.sh "$db" "$seeds" "$epsilon"
target/release/vmm train --state-db "$db" --out "$out" --steps "$steps" --name general \
    --exclude-prefix bursty \
    --description "General policy for the phased workload suite (2 vCPUs, 2 drives): DQN trained offline on cpu-idle, io-contention and mixed runs (bursty held out)"
