#!/usr/bin/env python3
"""Writes the small, deterministic ONNX Q-networks the tuner's tests and benchmarks use.

Usage (from the repository root):

    python3 -m pip install onnx numpy      # if missing
    python3 models/make_test_models.py     # writes models/test-policy.onnx + .card.json

The network is an untrained multilayer perceptron with fixed weights (numpy's legacy
``RandomState``, whose stream is frozen, seeded with SEED):

    input  [1, N_FEATURES]  float32   the normalised performance vector (schema v3)
    Gemm(W1, b1) -> Relu -> Gemm(W2, b2) -> Relu -> Gemm(W3, b3)
    output [1, N_ACTIONS]   float32   one Q-value per action, in the action list's order

with 32 hidden units per layer. It is a fixture, not a trained policy: its Q-values are
arbitrary but reproducible. The model card beside it names the schema version, the input
and output sizes, the action layout (tuner::actions, the same for every VM shape) and the
shapes served, the reward version and weights (tuner::reward defaults) and, under ``evaluation``, a
reference input with the Q-values numpy computes for it; the Rust test
``tuner/tests/onnx_policy.rs`` checks tract's output against them to 1e-4.

The first bias of the output layer is set to MARKER (0.4242424 as float32) so that tests
can find its four bytes in the file and patch them (e.g. to NaN) to make a corrupt model.

Keep N_FEATURES, LAYOUT, SERVES, ACTIONS_VERSION, SCHEMA_VERSION, REWARD_VERSION and
REWARD_WEIGHTS in step with tuner/src/schema.rs, tuner/src/actions.rs, tuner/src/policy.rs and
tuner/src/reward.rs: the Rust tests fail
when they drift, and then this script is run again.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261126
HIDDEN = 32
SCHEMA_VERSION = 3
N_FEATURES = 49
REWARD_VERSION = 3
ACTIONS_VERSION = 2
# tuner::actions: the one layout of every VM shape (4 drive slots, 2 network slots).
DRIVE_SLOTS = 4
NET_SLOTS = 2
LAYOUT = (
    ["noop", "vcpu-2", "vcpu-1", "vcpu+1", "vcpu+2"]
    + [
        name
        for d in range(DRIVE_SLOTS)
        for name in ["prio:blk%d:%s" % (d, p) for p in ("low", "medium", "high")]
        + ["rl:blk%d:%d" % (d, level) for level in range(5)]
    ]
    + ["qos:net%d:%d" % (n, level) for n in range(NET_SLOTS) for level in range(4)]
)
# tuner::policy::ShapeRange::LAYOUT: every shape the layout covers.
SERVES = {"vcpus": [1, 8], "drives": [0, DRIVE_SLOTS], "nets": [0, NET_SLOTS]}
# The priority fixture prefers raising blk0's priority, then doing nothing.
PRIO_PREFERRED = "prio:blk0:high"
# The network-QoS fixture always prefers this action (its output bias is raised by PREFER).
NET_PREFERRED = "qos:net0:3"
PREFER = np.float32(100.0)
# tuner::reward::RewardWeights::default()
REWARD_WEIGHTS = {
    "free": 4.0,
    "throughput": 10.0,
    "miss": 10.0,
    "throughput_ref": 2e6,
}
MARKER = np.float32(0.4242424)


def layer(rng, fan_in, fan_out):
    """He-initialised weights [fan_in, fan_out] and small biases [fan_out], float32."""
    w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
    b = rng.standard_normal(fan_out) * 0.05
    return w.astype(np.float32), b.astype(np.float32)


def build(n_in, n_out, seed, prefer=None, then_noop=False):
    rng = np.random.RandomState(seed)
    w1, b1 = layer(rng, n_in, HIDDEN)
    w2, b2 = layer(rng, HIDDEN, HIDDEN)
    w3, b3 = layer(rng, HIDDEN, n_out)
    b3[0] = MARKER
    if prefer is not None:
        b3[prefer] += PREFER
    if then_noop:
        # Second choice (once the preferred action is masked as a no-change): noop.
        b3[0] += PREFER / 2
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["q_values"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "q_network",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("q_values", TensorProto.FLOAT, [1, n_out])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in params.items()],
    )
    model = helper.make_model(
        graph,
        producer_name="vmm-models-make_test_models",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, params


def forward(params, x):
    """The network in float32 numpy: the reference tract is checked against."""
    h = np.maximum(x @ params["w1"] + params["b1"], np.float32(0))
    h = np.maximum(h @ params["w2"] + params["b2"], np.float32(0))
    return h @ params["w3"] + params["b3"]


def write(out_dir, name, actions, prefer=None, description=None, then_noop=False):
    n_in, n_out = N_FEATURES, len(actions)
    model, params = build(
        n_in, n_out, SEED, None if prefer is None else actions.index(prefer), then_noop
    )
    onnx_path = os.path.join(out_dir, name + ".onnx")
    with open(onnx_path, "wb") as f:
        f.write(model.SerializeToString())
    x = ((np.arange(n_in, dtype=np.float32) + 1) / np.float32(n_in + 1)).reshape(1, n_in)
    q = forward(params, x).reshape(-1)
    card = {
        "name": name,
        "description": description
        or "Untrained MLP Q-network with fixed weights: a test fixture, not a tuning policy.",
        "schema_version": SCHEMA_VERSION,
        "input_size": n_in,
        "output_size": n_out,
        "actions_version": ACTIONS_VERSION,
        "actions": actions,
        "serves": SERVES,
        "reward_version": REWARD_VERSION,
        "reward_weights": REWARD_WEIGHTS,
        "trained_on": "nothing: weights drawn from numpy RandomState(%d), He initialisation" % SEED,
        "evaluation": {
            "reference_input": [float(v) for v in x.reshape(-1)],
            "reference_q": [float(v) for v in q],
            "note": "reference_q = the network applied to reference_input in float32 numpy",
        },
        "generator": "models/make_test_models.py (hidden %d, seed %d, opset 13)" % (HIDDEN, SEED),
    }
    card_path = os.path.join(out_dir, name + ".card.json")
    with open(card_path, "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    print("wrote %s (%d bytes) and %s" % (onnx_path, os.path.getsize(onnx_path), card_path))
    print("reference_q:", json.dumps(card["evaluation"]["reference_q"]))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder to write into (default: the folder of this script)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    write(args.out_dir, "test-policy", LAYOUT)
    write(
        args.out_dir,
        "test-policy-qos",
        LAYOUT,
        prefer=NET_PREFERRED,
        description="Test fixture for VMs with a network device: fixed weights whose "
        "output bias makes %s the greedy choice in every state." % NET_PREFERRED,
    )
    write(
        args.out_dir,
        "test-policy-prio",
        LAYOUT,
        prefer=PRIO_PREFERRED,
        then_noop=True,
        description="Test fixture for VMs with a drive: fixed weights whose output "
        "biases make %s the greedy choice in every state, and noop the next." % PRIO_PREFERRED,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
