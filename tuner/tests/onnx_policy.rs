//! The shipped test policy (`models/test-policy.onnx`, written by
//! `models/make_test_models.py`) through tract: its Q-values match the ones numpy
//! computed (recorded in the card), its card matches this build, and every kind of
//! broken policy is refused with a clear error.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tuner::actions::{ActionSpace, VmShape};
use tuner::policy::{
    load_or_static, ModelCard, OnnxPolicy, PolicyContext, PolicyError, Proposal, QNetwork,
};
use tuner::reward::RewardWeights;
use tuner::schema::Schema;

/// Bytes of the float32 0.4242424 the script writes as the output layer's first bias.
const MARKER: [u8; 4] = 0.4242424f32.to_le_bytes();

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/test-policy.onnx")
}

/// A VM the test policy serves (it serves every shape of the layout): one drive, no
/// network device.
fn space() -> ActionSpace {
    ActionSpace::new(VmShape::new(2, 1, 0))
}

fn card() -> ModelCard {
    let text = fs::read_to_string(ModelCard::path_for(&model_path())).expect("card");
    ModelCard::from_json(&text).expect("card parses")
}

/// Writes a model and card pair into `dir` as `name.onnx` / `name.card.json`.
fn write_pair(dir: &Path, name: &str, model: &[u8], card: &str) -> PathBuf {
    let path = dir.join(format!("{name}.onnx"));
    fs::write(&path, model).expect("write model");
    fs::write(ModelCard::path_for(&path), card).expect("write card");
    path
}

#[test]
fn shipped_card_matches_this_build() {
    let c = card();
    c.validate(&space(), Some(&RewardWeights::default()))
        .expect("regenerate with models/make_test_models.py if this fails");
    assert_eq!(c.input_size, Schema::len());
    assert_eq!(c.actions, space().names());
    assert_eq!(c.evaluation.reference_input.len(), Schema::len());
    assert_eq!(c.evaluation.reference_q.len(), space().len());
}

#[test]
fn tract_reproduces_the_reference_q_values() {
    let c = card();
    let mut p = OnnxPolicy::load(model_path(), &space(), Some(&RewardWeights::default()))
        .expect("test policy loads");
    assert_eq!(p.id(), "test-policy");
    assert_eq!(p.input_size(), Schema::len());
    let q = p
        .q_values(&c.evaluation.reference_input)
        .expect("inference");
    assert_eq!(q.len(), tuner::actions::LAYOUT_LEN);
    for (i, (got, want)) in q.iter().zip(&c.evaluation.reference_q).enumerate() {
        assert!((got - want).abs() < 1e-4, "q[{i}] = {got}, numpy {want}");
    }
    // Deterministic, and the state is reusable across calls.
    assert_eq!(p.q_values(&c.evaluation.reference_input).unwrap(), q);
    let other = p.q_values(&vec![0.0; Schema::len()]).unwrap();
    assert_ne!(other, q);
    assert!(matches!(
        p.q_values(&[0.5; 5]),
        Err(PolicyError::InputLength {
            expected: 49,
            got: 5
        })
    ));
}

#[test]
fn inference_is_far_below_one_percent_of_an_interval() {
    let c = card();
    let mut p = OnnxPolicy::load(model_path(), &space(), None).expect("loads");
    let input = c.evaluation.reference_input;
    for _ in 0..20 {
        p.q_values(&input).unwrap();
    }
    let mut times: Vec<u128> = (0..200)
        .map(|_| {
            let t = Instant::now();
            p.q_values(&input).unwrap();
            t.elapsed().as_nanos()
        })
        .collect();
    times.sort_unstable();
    let median_us = times[times.len() / 2] as f64 / 1e3;
    eprintln!("test-policy inference median {median_us:.1} us (unoptimised test build)");
    // 1% of the default 100 ms interval is 1 ms: even an unoptimised build stays below
    // it; an optimised one is far below (see `cargo bench -p tuner --bench policy`).
    assert!(median_us < 1_000.0, "median {median_us} us");
    if !cfg!(debug_assertions) {
        assert!(median_us < 100.0, "median {median_us} us");
    }
}

#[test]
fn missing_files_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let e = OnnxPolicy::load(dir.path().join("nope.onnx"), &space(), None).unwrap_err();
    assert!(matches!(e, PolicyError::CardMissing { .. }), "{e}");
    assert!(e.to_string().contains("nope.card.json"), "{e}");
    let card_text = fs::read_to_string(ModelCard::path_for(&model_path())).unwrap();
    let path = dir.path().join("lonely.onnx");
    fs::write(ModelCard::path_for(&path), &card_text).unwrap();
    let e = OnnxPolicy::load(&path, &space(), None).unwrap_err();
    assert!(matches!(e, PolicyError::ModelMissing { .. }), "{e}");
    // The monitor runs on: the fallback is the static policy.
    let (mut p, err) = load_or_static(&path, &space(), None);
    assert!(err.is_some());
    assert_eq!(p.id(), "static");
    // A baseline: it proposes `noop`, no Q-values.
    assert_eq!(
        p.propose(&vec![0.0; Schema::len()], &PolicyContext::default())
            .unwrap(),
        Proposal::Action(tuner::actions::Action::NoOp)
    );
}

#[test]
fn corrupt_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(model_path()).unwrap();
    let card_text = fs::read_to_string(ModelCard::path_for(&model_path())).unwrap();

    // Truncated file.
    let p = write_pair(
        dir.path(),
        "truncated",
        &bytes[..bytes.len() / 2],
        &card_text,
    );
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(matches!(e, PolicyError::Onnx { .. }), "{e}");

    // Not ONNX at all.
    let p = write_pair(
        dir.path(),
        "garbage",
        b"\x08\x07hello, not a graph",
        &card_text,
    );
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(
        matches!(e, PolicyError::Onnx { .. } | PolicyError::Shape { .. }),
        "{e}"
    );

    // A NaN weight: the output layer's first bias patched to NaN.
    let at = bytes
        .windows(4)
        .position(|w| w == MARKER)
        .expect("marker bias in the model");
    assert_eq!(
        bytes.windows(4).filter(|w| *w == MARKER).count(),
        1,
        "marker must be unique"
    );
    let mut nan = bytes.clone();
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = write_pair(dir.path(), "nan", &nan, &card_text);
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(matches!(e, PolicyError::NonFinite { index: 0, .. }), "{e}");

    // A changed weight: the reference check catches it.
    let mut changed = bytes.clone();
    changed[at..at + 4].copy_from_slice(&1.5f32.to_le_bytes());
    let p = write_pair(dir.path(), "changed", &changed, &card_text);
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(matches!(e, PolicyError::Reference { index: 0, .. }), "{e}");
}

#[test]
fn wrong_cards_are_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(model_path()).unwrap();
    let card_text = fs::read_to_string(ModelCard::path_for(&model_path())).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&card_text).unwrap();
        f(&mut v);
        v.to_string()
    };
    let field_of = |name: &str, card: String| match OnnxPolicy::load(
        write_pair(dir.path(), name, &bytes, &card),
        &space(),
        Some(&RewardWeights::default()),
    ) {
        Err(PolicyError::Card { source, .. }) => source.field,
        other => panic!("{name}: expected a card error, got {other:?}"),
    };
    assert_eq!(
        field_of("schema", edit(&|v| v["schema_version"] = 99.into())),
        "schema_version"
    );
    assert_eq!(
        field_of(
            "actions",
            edit(&|v| v["actions"][5] = "prio:blk0:urgent".into())
        ),
        "actions[5]"
    );
    assert_eq!(
        field_of(
            "weights",
            edit(&|v| v["reward_weights"]["free"] = 3.0.into())
        ),
        "reward_weights.free"
    );
    // A card of reward v2 (no reward_version, v2's weights) is refused by its version,
    // not as malformed.
    assert_eq!(
        field_of(
            "reward2",
            edit(&|v| {
                v.as_object_mut().unwrap().remove("reward_version");
                v["reward_weights"] = serde_json::json!({"throughput": 10.0, "latency": 10.0,
                    "utilisation": 0.5, "cost": 4.0, "throughput_ref": 2e6});
            })
        ),
        "reward_version"
    );
    assert_eq!(
        field_of("outsize", edit(&|v| v["output_size"] = 14.into())),
        "output_size"
    );
    // A card serving two-drive VMs only, on a one-drive VM: refused, saying so.
    let narrow = edit(&|v| v["serves"]["drives"] = serde_json::json!([2, 2]));
    let p = write_pair(dir.path(), "twodrives", &bytes, &narrow);
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("field `serves.drives`: expected a range that includes this VM's 1 drives"),
        "{e}"
    );
    // A card of the v1 per-shape action lists.
    let v1 = edit(&|v| v["actions_version"] = 1.into());
    let p = write_pair(dir.path(), "v1", &bytes, &v1);
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(e.to_string().contains("actions_version"), "{e}");

    // Malformed JSON.
    let p = write_pair(dir.path(), "badjson", &bytes, "{\"schema_version\": 1,");
    assert!(matches!(
        OnnxPolicy::load(&p, &space(), None),
        Err(PolicyError::CardJson { .. })
    ));

    // The card promises the forecast input (46 values), the graph takes 23.
    let wide = edit(&|v| {
        v["input_size"] = (2 * Schema::len()).into();
        v["evaluation"] = serde_json::json!({});
    });
    let p = write_pair(dir.path(), "wide", &bytes, &wide);
    let e = OnnxPolicy::load(&p, &space(), None).unwrap_err();
    assert!(
        matches!(
            e,
            PolicyError::Shape {
                what: "input shape",
                ..
            }
        ),
        "{e}"
    );
}

/// The shipped general policy (`models/general.onnx`, trained by `vmm train`, see
/// `scripts/train-general.sh`): one file for every VM shape of the layout (1 to 8
/// vCPUs, 0 to 4 drives, 0 to 2 network devices), tract reproduces the Q-values its card
/// recorded from the trainer, and its start configuration is valid.
#[test]
fn the_shipped_general_policy_loads_and_matches_its_card() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/general.onnx");
    let text = fs::read_to_string(ModelCard::path_for(&path)).expect("general card");
    let c = ModelCard::from_json(&text).expect("general card parses");
    for (v, d, n) in [(1, 0, 0), (2, 2, 0), (4, 1, 0), (3, 4, 1), (8, 4, 2)] {
        let space = ActionSpace::new(VmShape::new(v, d, n));
        OnnxPolicy::load(&path, &space, Some(&c.reward_weights))
            .unwrap_or_else(|e| panic!("{v} vCPUs, {d} drives, {n} nets: {e}"));
    }
    let space = ActionSpace::new(VmShape::new(2, 2, 0));
    assert_eq!(c.actions, space.names());
    let mut p = OnnxPolicy::load(&path, &space, Some(&c.reward_weights)).expect("loads");
    assert_eq!(p.input_size(), Schema::len());
    assert_eq!(c.evaluation.reference_input.len(), Schema::len());
    let q = p
        .q_values(&c.evaluation.reference_input)
        .expect("inference");
    assert_eq!(q.len(), c.evaluation.reference_q.len());
    for (i, (got, want)) in q.iter().zip(&c.evaluation.reference_q).enumerate() {
        let tol = 1e-4 * want.abs().max(1.0);
        assert!((got - want).abs() <= tol, "q[{i}] = {got}, trainer {want}");
    }
    // A start configuration, when the trainer found one, is valid for any VM.
    if let Some(start) = p.card().start.clone() {
        assert!((1..=8).contains(&start.active_vcpus), "{start:?}");
        assert!(start.drives.len() <= 4, "{start:?}");
    }
}
