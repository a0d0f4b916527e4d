//! Throughput of the state repository: how many rows per second the writer thread
//! sustains (queue, batch, commit in WAL mode), end to end until the last commit.
//!
//! Run with `cargo bench -p tuner --bench state_repo`; prints one JSON object.
//! `STATE_REPO_BENCH_ROWS` sets the number of rows (default 200 000).

use std::time::Instant;

use tuner::schema::{FEATURES, SCHEMA_VERSION};
use tuner::state_repo::{RepoConfig, Row, StateRepo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: u64 = std::env::var("STATE_REPO_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir()?;
    let repo = StateRepo::open(dir.path().join("bench.db"), RepoConfig::default())?;
    let writer = repo.writer();
    let n = FEATURES.len();
    let vms = 8u64;
    let t0 = Instant::now();
    for i in 0..rows {
        let level = (i % 100) as f32 / 100.0;
        writer.insert_blocking(Row {
            vm_id: format!("vm{}", i % vms),
            ts_ns: (i / vms) * 100_000_000,
            interval_ns: 100_000_000,
            schema_version: SCHEMA_VERSION,
            vector: (0..n).map(|k| (level + k as f32 * 0.01).min(1.0)).collect(),
            raw: (0..n).map(|k| (i + k as u64) as f64 * 1.25).collect(),
            action: None,
            reward: None,
            policy_id: "bench".to_string(),
            config: r#"{"vcpus":2,"mem_mib":512}"#.to_string(),
            anomaly: None,
            anomaly_score: None,
            slo: None,
        })?;
    }
    repo.flush()?;
    let secs = t0.elapsed().as_secs_f64();
    let stats = repo.close()?;
    let db_bytes = std::fs::metadata(dir.path().join("bench.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "{{ \"rows_per_sec\": {:.0}, \"rows\": {}, \"seconds\": {:.3}, \"commits\": {}, \"db_bytes\": {} }}",
        rows as f64 / secs,
        stats.rows_written,
        secs,
        stats.commits,
        db_bytes
    );
    Ok(())
}
