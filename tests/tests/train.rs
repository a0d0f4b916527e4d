//! `vmm-learn train` (and its alias `vmm train`): a state repository in, an ONNX policy
//! and its card out that the tuner loads; bad input is one line on stderr and exit
//! status 2, with nothing written. (No KVM needed.)

use std::path::Path;
use std::time::Duration;

use integration_tests::{vmm, vmm_learn, Scratch};
use tuner::actions::ActionSpace;
use tuner::policy::{ModelCard, OnnxPolicy, XorShift64};
use tuner::reward::RewardWeights;
use tuner::schema::{Schema, SCHEMA_VERSION};
use tuner::state_repo::{RepoConfig, Row, StateRepo};

const LIMIT: Duration = Duration::from_secs(120);

/// `n` rows of one VM with one drive, every 100 ms: random states and actions, reward 1
/// for `vcpu+1` when CPU utilisation (feature 0) is high.
fn rows(vm_id: &str, n: usize, seed: u64) -> Vec<Row> {
    let space = ActionSpace::new(tuner::actions::VmShape::new(2, 1, 0));
    let mut rng = XorShift64::new(seed);
    let config = r#"{"vcpus":2,"mem_mib":64,"drives":[{"path":"/d.img"}]}"#;
    (0..n)
        .map(|i| {
            let vector: Vec<f32> = (0..Schema::len()).map(|_| rng.next_f64() as f32).collect();
            let present: Vec<String> = space
                .actions()
                .iter()
                .filter(|a| space.present(a))
                .map(|a| a.name())
                .collect();
            let action = present[rng.below(present.len())].clone();
            let reward = f64::from(u8::from(vector[0] > 0.5 && action == "vcpu+1"));
            Row {
                vm_id: vm_id.into(),
                ts_ns: 1_000_000_000 + i as u64 * 100_000_000,
                interval_ns: 100_000_000,
                schema_version: SCHEMA_VERSION,
                raw: vector.iter().map(|x| f64::from(*x)).collect(),
                vector,
                action: Some(action),
                reward: (i + 1 < n).then_some(reward),
                policy_id: "random".into(),
                config: config.into(),
                anomaly: Some(false),
                anomaly_score: None,
                slo: None,
            }
        })
        .collect()
}

fn write_db(path: &Path, rows: Vec<Row>) {
    let repo = StateRepo::open(path, RepoConfig::default()).unwrap();
    let w = repo.writer();
    for r in rows {
        w.insert_blocking(r).unwrap();
    }
    repo.close().unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_writes_a_policy_the_tuner_loads() {
    let dir = Scratch::new("train-ok");
    let db = dir.path("runs.db");
    let mut all = rows("scen-a-0", 150, 1);
    all.extend(rows("scen-a-1", 150, 2));
    all.extend(rows("held-b-0", 40, 3));
    write_db(&db, all);
    let out = dir.path("models/cli.onnx");
    let run = vmm_learn(
        &[
            "train",
            "--state-db",
            s(&db),
            "--out",
            s(&out),
            "--steps",
            "40",
            "--hidden",
            "16",
            "--batch",
            "16",
            "--seed",
            "3",
            "--exclude-prefix",
            "held-",
            "--name",
            "cli-test",
        ],
        LIMIT,
    );
    run.expect_status(0);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("train: wrote "))
        .unwrap_or_else(|| panic!("no summary line\n{}\n{}", run.stdout, run.stderr));
    assert!(
        line.contains("cli.onnx (298 transitions, 40 steps, loss "),
        "{line}"
    );
    assert!(line.contains("max |dq| "), "{line}");

    let card =
        ModelCard::from_json(&std::fs::read_to_string(ModelCard::path_for(&out)).unwrap()).unwrap();
    assert_eq!(card.name, "cli-test");
    assert_eq!(card.evaluation.extra["hyper_parameters"]["hidden"], 16);
    assert_eq!(
        card.evaluation.extra["data"]["excluded_vm_ids"][0],
        "held-b-0"
    );
    let space = ActionSpace::new(tuner::actions::VmShape::new(2, 1, 0));
    OnnxPolicy::load(&out, &space, Some(&RewardWeights::default()))
        .expect("the tuner loads the trained policy");

    // `vmm train` is `vmm-learn train` (the monitor runs the binary beside it): the same
    // run writes the same summary line.
    let again = dir.path("models/alias.onnx");
    let alias = vmm(
        &[
            "train",
            "--state-db",
            s(&db),
            "--out",
            s(&again),
            "--steps",
            "40",
            "--hidden",
            "16",
            "--batch",
            "16",
            "--seed",
            "3",
            "--exclude-prefix",
            "held-",
        ],
        LIMIT,
    );
    alias.expect_status(0);
    assert!(
        alias
            .stdout
            .lines()
            .any(|l| l.contains("alias.onnx (298 transitions, 40 steps, loss ")),
        "{}\n{}",
        alias.stdout,
        alias.stderr
    );
    assert!(ModelCard::path_for(&again).exists());
}

#[test]
fn bad_input_is_one_line_and_status_2() {
    let dir = Scratch::new("train-bad");
    let db = dir.path("runs.db");
    write_db(&db, rows("vm0", 30, 1));
    let out = dir.path("m.onnx");
    let expect_usage = |args: &[&str], flag: &str, words: &str| {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        let run = vmm_learn(&all, LIMIT);
        run.expect_status(2);
        let err = run.stderr.trim_end();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("vmm-learn: error: "), "{err}");
        assert!(err.contains(flag), "{err} lacks {flag}");
        assert!(err.contains(words), "{err} lacks {words}");
    };
    let missing = dir.path("nope.db");
    expect_usage(
        &["--state-db", s(&missing), "--out", s(&out)],
        "--state-db",
        "does not exist",
    );
    let text = dir.path("text.db");
    std::fs::write(&text, "not sqlite at all ".repeat(100)).unwrap();
    expect_usage(
        &["--state-db", s(&text), "--out", s(&out)],
        "--state-db",
        "not a SQLite database",
    );
    expect_usage(
        &["--state-db", s(&db), "--out", s(&out), "--gamma", "1.5"],
        "--gamma",
        "outside [0, 1)",
    );
    expect_usage(
        &[
            "--state-db",
            s(&db),
            "--out",
            s(&out),
            "--exclude-prefix",
            "vm",
        ],
        "--state-db",
        "30 excluded",
    );
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute("UPDATE samples SET schema_version = 7 WHERE id = 12", [])
        .unwrap();
    drop(c);
    expect_usage(
        &["--state-db", s(&db), "--out", s(&out)],
        "--state-db",
        "row id 12",
    );
    assert!(!out.exists(), "nothing written on bad input");
    assert!(!ModelCard::path_for(&out).exists());
}

#[test]
fn train_reads_the_fleet_from_postgres_with_filters() {
    let Some(pg) = integration_tests::postgres::Postgres::start("train") else {
        return;
    };
    pg.create_db("fleet");
    let url = pg.url("fleet");
    let dir = Scratch::new("train-pg");
    let db = dir.path("host1.db");
    let mut all = rows("scen-a-0", 150, 1);
    all.extend(rows("scen-a-1", 150, 2));
    all.extend(rows("held-b-0", 40, 3));
    write_db(&db, all);
    integration_tests::vmm(
        &["state", "export", "--state-db", s(&db), "--to", &url],
        LIMIT,
    )
    .expect_status(0);
    let train = |filter: &[&str], name: &str| {
        let out = dir.path(&format!("{name}.onnx"));
        let mut args = vec![
            "train",
            "--state-db",
            &url,
            "--out",
            s(&out),
            "--steps",
            "20",
            "--hidden",
            "16",
            "--batch",
            "16",
        ];
        args.extend_from_slice(filter);
        vmm_learn(&args, LIMIT)
    };
    let host = hostname();
    for (filter, transitions) in [
        (vec!["--scenario", "scen-a"], 298),
        (vec!["--vm", "scen-a-1"], 149),
        (vec!["--host", host.as_str(), "--scenario", "held-"], 39),
    ] {
        let run = train(&filter, "fleet");
        run.expect_status(0);
        let want = format!("fleet.onnx ({transitions} transitions");
        assert!(
            run.stdout.contains(&want),
            "{filter:?}: {}\n{}",
            run.stdout,
            run.stderr
        );
    }
    // Nothing from another host, or before 1970 + 1 s: a clear error, no model.
    let run = train(&["--host", "no-such-host"], "none");
    assert_ne!(run.status, Some(0));
    assert!(run.stderr.contains("no sample rows"), "{}", run.stderr);
    let run = train(&["--until", "1"], "none");
    assert_ne!(run.status, Some(0));
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(rc, 0);
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
