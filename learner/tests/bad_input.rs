//! Every kind of bad training input is refused with the right error, naming the row.

mod common;

use std::path::Path;

use common::{episode, exec, write_db};
use learner::dataset::{load, DatasetOptions};
use learner::{train, LearnError, Loss, TrainOptions};
use tuner::schema::Schema;

fn good_db(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("s.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    db
}

fn err(db: &Path) -> LearnError {
    load(db, &DatasetOptions::default()).expect_err("bad input accepted")
}

fn f32_blob_hex(values: &[f32]) -> String {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("{b:02X}"))
        .collect()
}

#[test]
fn missing_file_and_non_databases() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let e = err(&missing);
    assert!(matches!(e, LearnError::DbMissing { .. }), "{e}");
    assert!(e.to_string().contains("nope.db"), "{e}");
    assert_eq!(e.option(), "state_db");

    let text = dir.path().join("notes.db");
    std::fs::write(
        &text,
        "this is not a database, just some text that is long enough ".repeat(40),
    )
    .unwrap();
    let e = err(&text);
    assert!(matches!(e, LearnError::NotADatabase { .. }), "{e}");

    // A real SQLite file with its pages overwritten past the header.
    let corrupt = good_db(dir.path());
    let mut bytes = std::fs::read(&corrupt).unwrap();
    for b in bytes.iter_mut().skip(100).take(8000) {
        *b = 0xA5;
    }
    std::fs::write(&corrupt, bytes).unwrap();
    let e = err(&corrupt);
    assert!(
        matches!(e, LearnError::NotADatabase { .. }),
        "corrupt file: {e}"
    );

    let other = dir.path().join("other.db");
    exec(
        &other,
        "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);",
    );
    let e = err(&other);
    assert!(matches!(e, LearnError::NoSamplesTable { .. }), "{e}");
}

#[test]
fn no_rows_and_no_transitions() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.db");
    write_db(&empty, Vec::new());
    let e = err(&empty);
    assert!(
        matches!(
            e,
            LearnError::NoRows {
                total: 0,
                excluded: 0,
                ..
            }
        ),
        "{e}"
    );

    let db = good_db(dir.path());
    let opts = DatasetOptions {
        exclude_prefixes: vec!["vm".into()],
        ..DatasetOptions::default()
    };
    let e = load(&db, &opts).unwrap_err();
    assert!(
        matches!(
            e,
            LearnError::NoRows {
                total: 12,
                excluded: 12,
                ..
            }
        ),
        "{e}"
    );

    // Rows, but no action recorded anywhere: nothing to pair.
    exec(&db, "UPDATE samples SET action = NULL;");
    let e = err(&db);
    assert!(
        matches!(e, LearnError::NoTransitions { rows: 12, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("12 without action"), "{e}");

    // Rows far apart: every one is its own episode.
    let sparse = dir.path().join("sparse.db");
    let mut rows = episode("vm0", 4, 2, 1, 0);
    for (i, r) in rows.iter_mut().enumerate() {
        r.ts_ns = i as u64 * 10_000_000_000;
    }
    write_db(&sparse, rows);
    let e = err(&sparse);
    assert!(
        matches!(e, LearnError::NoTransitions { rows: 4, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("3 at an episode's end"), "{e}");
}

#[test]
fn bad_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = good_db(dir.path());
    exec(&db, "UPDATE samples SET schema_version = 1 WHERE id = 3;");
    let e = err(&db);
    assert!(
        matches!(
            e,
            LearnError::SchemaVersion {
                row_id: 3,
                found: 1,
                expected: tuner::schema::SCHEMA_VERSION,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("row id 3"), "{e}");

    let db = dir.path().join("nan.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    let mut v = vec![0.5f32; Schema::len()];
    v[4] = f32::NAN;
    exec(
        &db,
        &format!(
            "UPDATE samples SET vector = X'{}' WHERE id = 5;",
            f32_blob_hex(&v)
        ),
    );
    let e = err(&db);
    assert!(
        matches!(&e, LearnError::NonFinite { row_id: 5, what, .. } if what.starts_with("vector[4]")),
        "{e}"
    );

    let db = dir.path().join("inf.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    exec(&db, "UPDATE samples SET reward = -9e999 WHERE id = 4;");
    let e = err(&db);
    assert!(
        matches!(&e, LearnError::NonFinite { row_id: 4, what, .. } if what == "reward"),
        "{e}"
    );

    let db = dir.path().join("text.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    exec(&db, "UPDATE samples SET reward = 'NaN' WHERE id = 6;");
    let e = err(&db);
    assert!(
        matches!(
            e,
            LearnError::BadColumn {
                row_id: 6,
                column: "reward",
                ..
            }
        ),
        "{e}"
    );

    let db = dir.path().join("action.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    exec(&db, "UPDATE samples SET action = 'qos:net:1' WHERE id = 7;");
    let e = err(&db);
    assert!(
        matches!(&e, LearnError::UnknownAction { row_id: 7, name, .. } if name == "qos:net:1"),
        "{e}"
    );

    let db = dir.path().join("short.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    exec(
        &db,
        &format!(
            "UPDATE samples SET vector = X'{}' WHERE id = 8;",
            f32_blob_hex(&vec![0.5; Schema::len() - 1])
        ),
    );
    let e = err(&db);
    assert!(
        matches!(e, LearnError::VectorLength { row_id: 8, .. }),
        "{e}"
    );
    exec(&db, "UPDATE samples SET vector = X'000000' WHERE id = 8;");
    let e = err(&db);
    assert!(
        matches!(&e, LearnError::VectorLength { row_id: 8, got, .. } if got.contains("3 bytes")),
        "{e}"
    );

    let db = dir.path().join("config.db");
    write_db(&db, episode("vm0", 12, 1, 1, 1_000_000_000));
    exec(
        &db,
        "UPDATE samples SET config = '{\"drives\": 2}' WHERE id = 9;",
    );
    let e = err(&db);
    assert!(matches!(e, LearnError::BadConfig { row_id: 9, .. }), "{e}");
}

#[test]
fn vms_of_any_shape_and_one_set_of_weights() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mixed.db");
    let mut rows = episode("vm-a", 10, 1, 1, 1_000_000_000);
    rows.extend(episode("vm-b", 10, 2, 2, 1_000_000_000));
    write_db(&db, rows);
    // One action layout: VMs of two shapes make one dataset, each transition with its
    // VM's shape.
    let data = load(&db, &DatasetOptions::default()).unwrap();
    assert_eq!(data.transitions.len(), 18);
    let one = tuner::actions::VmShape::new(2, 1, 0);
    let two = tuner::actions::VmShape::new(2, 2, 0);
    assert_eq!(
        data.transitions.iter().filter(|t| t.shape == one).count(),
        9
    );
    assert_eq!(
        data.transitions.iter().filter(|t| t.shape == two).count(),
        9
    );
    assert_eq!(data.summary.shapes.len(), 2, "{:?}", data.summary.shapes);
    // An action on a device the VM does not have is refused, naming the VM's shape.
    let absent = dir.path().join("absent.db");
    write_db(&absent, episode("vm-a", 10, 1, 1, 1_000_000_000));
    exec(
        &absent,
        "UPDATE samples SET action = 'rl:blk1:2' WHERE id = 4;",
    );
    let e = err(&absent);
    assert!(
        matches!(&e, LearnError::UnknownAction { row_id: 4, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("1 drive"), "{e}");
    // Holding a VM out.
    let opts = DatasetOptions {
        exclude_prefixes: vec!["vm-b".into()],
        ..DatasetOptions::default()
    };
    let data = load(&db, &opts).unwrap();
    assert_eq!(data.summary.vm_ids, ["vm-a"]);
    assert_eq!(data.summary.excluded_vm_ids, ["vm-b"]);
    assert_eq!(data.transitions.len(), 9);

    let db = dir.path().join("weights.db");
    write_db(&db, episode("vm0", 10, 1, 1, 1_000_000_000));
    exec(
        &db,
        "UPDATE samples SET config = json_set(config, '$.reward_weights', json('{\"free\": 3}')) \
         WHERE id > 5;",
    );
    let e = err(&db);
    assert!(
        matches!(e, LearnError::MixedRewardWeights { row_id: 6, .. }),
        "{e}"
    );
}

#[test]
fn bad_options_and_divergence_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = good_db(dir.path());
    let out = dir.path().join("m.onnx");
    let run = |f: &dyn Fn(&mut TrainOptions)| {
        let mut o = TrainOptions::new(&db, &out);
        o.steps = 5;
        o.dqn.hidden = 8;
        o.dqn.batch = 4;
        f(&mut o);
        train(&o)
    };
    let e = run(&|o| o.dqn.gamma = 1.5).unwrap_err();
    assert!(
        matches!(
            e,
            LearnError::BadOption {
                option: "gamma",
                ..
            }
        ),
        "{e}"
    );
    let e = run(&|o| o.steps = 0).unwrap_err();
    assert!(
        matches!(
            e,
            LearnError::BadOption {
                option: "steps",
                ..
            }
        ),
        "{e}"
    );
    let e = run(&|o| o.out = dir.path().join("m.bin")).unwrap_err();
    assert!(
        matches!(e, LearnError::BadOption { option: "out", .. }),
        "{e}"
    );
    let e = run(&|o| o.dqn.lr = f64::NAN).unwrap_err();
    assert!(
        matches!(e, LearnError::BadOption { option: "lr", .. }),
        "{e}"
    );
    let e = run(&|o| o.dqn.change_penalty = -0.5).unwrap_err();
    assert!(
        matches!(
            e,
            LearnError::BadOption {
                option: "change_penalty",
                ..
            }
        ),
        "{e}"
    );

    // Rewards so large that the squared TD error overflows f32: the loss is infinite at
    // the first step.
    exec(
        &db,
        "UPDATE samples SET reward = 1e30 WHERE reward IS NOT NULL;",
    );
    let e = run(&|o| o.dqn.loss = Loss::Mse).unwrap_err();
    assert!(
        matches!(
            e,
            LearnError::Diverged {
                step: 0,
                what: "loss",
                ..
            }
        ),
        "{e}"
    );
    assert!(!out.exists(), "nothing written after a divergence");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|f| !f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".onnx")),
        "no temporary model left behind"
    );
}
