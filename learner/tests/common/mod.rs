//! Synthetic state repositories for the learner's tests.

#![allow(dead_code)]

use std::path::Path;

use tuner::actions::{ActionSpace, VmShape};
use tuner::policy::XorShift64;
use tuner::schema::{Schema, SCHEMA_VERSION};
use tuner::state_repo::{RepoConfig, Row, StateRepo};

/// Configuration JSON of a VM with `drives` drives, as the monitor stores it.
pub fn config(drives: usize) -> String {
    let drives: Vec<_> = (0..drives)
        .map(|i| serde_json::json!({"path": format!("/d{i}.img"), "read_only": false}))
        .collect();
    serde_json::json!({"vcpus": 2, "mem_mib": 64, "drives": drives}).to_string()
}

/// The rewarded action in `state`: `vcpu+1` when CPU utilisation (feature 0) is above
/// one half, `vcpu-1` otherwise.
pub fn best_action(state: &[f32]) -> &'static str {
    if state[0] > 0.5 {
        "vcpu+1"
    } else {
        "vcpu-1"
    }
}

/// Reward 1 for [`best_action`], 0 for anything else.
pub fn reward(state: &[f32], action: &str) -> f64 {
    if action == best_action(state) {
        1.0
    } else {
        0.0
    }
}

/// A random state: every feature uniform in [0, 1).
pub fn state(rng: &mut XorShift64) -> Vec<f32> {
    (0..Schema::len()).map(|_| rng.next_f64() as f32).collect()
}

/// `n` rows of one 2-vCPU VM with `drives` drives every 100 ms: random states, uniformly
/// random actions of the layout on devices the VM has, rewards from [`reward`]; the last
/// row has no reward, like the tuner's.
pub fn episode(vm_id: &str, n: usize, seed: u64, drives: usize, start_ns: u64) -> Vec<Row> {
    let space = ActionSpace::new(VmShape::new(2, drives, 0));
    let names: Vec<String> = space
        .actions()
        .iter()
        .filter(|a| space.present(a))
        .map(|a| a.name())
        .collect();
    let mut rng = XorShift64::new(seed);
    let cfg = config(drives);
    (0..n)
        .map(|i| {
            let vector = state(&mut rng);
            let action = names[rng.below(names.len())].clone();
            let r = reward(&vector, &action);
            Row {
                vm_id: vm_id.to_string(),
                ts_ns: start_ns + i as u64 * 100_000_000,
                interval_ns: 100_000_000,
                schema_version: SCHEMA_VERSION,
                raw: vector.iter().map(|x| f64::from(*x)).collect(),
                vector,
                action: Some(action),
                reward: (i + 1 < n).then_some(r),
                policy_id: "random".into(),
                config: cfg.clone(),
                anomaly: Some(false),
                anomaly_score: None,
                slo: None,
            }
        })
        .collect()
}

/// Writes `rows` into a new state repository at `path` (through the tuner's writer).
pub fn write_db(path: &Path, rows: Vec<Row>) {
    let repo = StateRepo::open(path, RepoConfig::default()).expect("open repo");
    let w = repo.writer();
    for r in rows {
        w.insert_blocking(r).expect("insert");
    }
    repo.flush().expect("flush");
    repo.close().expect("close");
}

/// Runs `sql` on the database at `path` (to plant bad rows).
pub fn exec(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch(sql).expect("sql");
}
