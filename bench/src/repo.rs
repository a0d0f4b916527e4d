//! The state repository's backends side by side: 8 writers (8 VMs, each with its own
//! repository handle, writer thread and connection, as 8 monitors have) offering one row
//! every 10 ms each, into SQLite (one file, as on one host) and into PostgreSQL; then the
//! same writers as fast as their queues take rows (capacity). With `--outage-after-s`,
//! the PostgreSQL run is a long one during which the caller (scripts/bench-pg.sh) stops
//! the server for 30 s and starts it again: the report says how many rows were offered,
//! written, dropped, and how long the writers' inserts took at most (they never wait for
//! the database).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tuner::schema::{FEATURES, SCHEMA_VERSION};
use tuner::state_repo::{Location, RepoConfig, Row, StateRepo, WriterStats};

use crate::error::BenchError;

/// Arguments of `vmm-bench repo`.
#[derive(clap::Args, Debug, Clone)]
pub struct RepoArgs {
    /// PostgreSQL database to write into (a fresh one: scripts/bench-pg.sh makes it).
    #[arg(long, value_name = "URL")]
    pub pg_url: String,
    /// Writers (VMs).
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Interval between two rows of one writer (ms).
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Length of each paced run (s).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rows each writer offers in the capacity run.
    #[arg(long, default_value_t = 20_000)]
    pub burst_rows: u64,
    /// Only the outage run: paced rows for this long (s) while the caller stops and
    /// restarts the server.
    #[arg(long, value_name = "S")]
    pub outage_run_s: Option<u64>,
}

/// One run of the writers against one backend.
#[derive(Debug, Serialize)]
pub struct RepoRun {
    /// `sqlite` or `postgresql`.
    pub backend: String,
    /// `paced` (one row per writer per interval) or `capacity` (as fast as possible).
    pub mode: String,
    /// Writers.
    pub writers: usize,
    /// Rows the writers offered.
    pub rows_offered: u64,
    /// Rows committed (sum of the writers' counts).
    pub rows_written: u64,
    /// Rows dropped (queue or buffer full, failed batches).
    pub rows_dropped: u64,
    /// Rows found in the database afterwards.
    pub rows_in_db: u64,
    /// Committed rows per second, from the first insert to the last commit.
    pub rows_per_sec: f64,
    /// Longest time one insert call took (µs): the cost a VM's sampling thread could see.
    pub max_insert_us: f64,
    /// Seconds during which a writer reported the repository degraded (outage run).
    pub degraded_s: f64,
    /// Reconnections after the database came back.
    pub reconnects: u64,
}

/// `vmm-bench repo`'s report.
#[derive(Debug, Serialize)]
pub struct RepoReport {
    /// What was measured.
    pub method: String,
    /// The runs.
    pub runs: Vec<RepoRun>,
}

fn row(vm: &str, t: u64) -> Row {
    let n = FEATURES.len();
    Row {
        vm_id: vm.into(),
        ts_ns: t,
        interval_ns: 10_000_000,
        schema_version: SCHEMA_VERSION,
        vector: (0..n)
            .map(|i| (i as f32 * 0.01 + t as f32 * 1e-6) % 1.0)
            .collect(),
        raw: (0..n).map(|i| i as f64 + t as f64).collect(),
        action: None,
        reward: None,
        policy_id: "static".into(),
        config: r#"{"vcpus":2,"mem_mib":256}"#.into(),
        anomaly: None,
        anomaly_score: None,
        slo: None,
    }
}

fn err(what: &str) -> impl Fn(tuner::state_repo::RepoError) -> BenchError + '_ {
    move |e| BenchError::Unexpected(format!("{what}: {e}"))
}

/// Runs `writers` writers on `location`; `paced` every `interval`, else as fast as the
/// queue takes rows. Returns the run's figures.
fn run(
    location: &Location,
    writers: usize,
    paced: Option<(Duration, Duration)>,
    burst_rows: u64,
) -> Result<RepoRun, BenchError> {
    let config = RepoConfig::default();
    let repos: Vec<Arc<StateRepo>> = (0..writers)
        .map(|_| StateRepo::open_at(location, config.clone()).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(err("open"))?;
    let start = Instant::now();
    let threads: Vec<_> = repos
        .iter()
        .enumerate()
        .map(|(i, repo)| {
            let repo = Arc::clone(repo);
            std::thread::spawn(move || {
                let w = repo.writer();
                let vm = format!("bench-{i}");
                let mut offered = 0u64;
                let mut max_insert = Duration::ZERO;
                let mut degraded = Duration::ZERO;
                match paced {
                    Some((interval, length)) => {
                        let mut next = Instant::now();
                        while next.duration_since(start) < length {
                            let t0 = Instant::now();
                            let _ = w.insert(row(&vm, offered));
                            max_insert = max_insert.max(t0.elapsed());
                            if w.stats().degraded {
                                degraded += interval;
                            }
                            offered += 1;
                            next += interval;
                            std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        }
                    }
                    None => {
                        for t in 0..burst_rows {
                            let t0 = Instant::now();
                            let _ = w.insert_blocking(row(&vm, t));
                            max_insert = max_insert.max(t0.elapsed());
                            offered += 1;
                        }
                    }
                }
                (offered, max_insert, degraded)
            })
        })
        .collect();
    let mut offered = 0;
    let mut max_insert = Duration::ZERO;
    let mut degraded = Duration::ZERO;
    for t in threads {
        let (o, m, d) = t
            .join()
            .map_err(|_| BenchError::Unexpected("a writer thread panicked".into()))?;
        offered += o;
        max_insert = max_insert.max(m);
        degraded = degraded.max(d);
    }
    // Wait (up to 60 s) for every writer to commit what it has.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = |repos: &[Arc<StateRepo>]| -> Vec<WriterStats> {
        repos.iter().map(|r| r.stats()).collect()
    };
    loop {
        for r in &repos {
            let _ = r.flush();
        }
        let s = stats(&repos);
        let settled: u64 = s.iter().map(|s| s.rows_written + s.rows_dropped).sum();
        if settled >= offered || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let s = stats(&repos);
    let rows_in_db = repos[0].count().map_err(err("count"))?;
    Ok(RepoRun {
        backend: location.backend().into(),
        mode: if paced.is_some() { "paced" } else { "capacity" }.into(),
        writers,
        rows_offered: offered,
        rows_written: s.iter().map(|s| s.rows_written).sum(),
        rows_dropped: s.iter().map(|s| s.rows_dropped).sum(),
        rows_in_db,
        rows_per_sec: s.iter().map(|s| s.rows_written).sum::<u64>() as f64 / elapsed,
        max_insert_us: max_insert.as_secs_f64() * 1e6,
        degraded_s: degraded.as_secs_f64(),
        reconnects: s.iter().map(|s| s.reconnects).sum(),
    })
}

/// Clears the PostgreSQL repository's rows between runs.
fn pg_clear(url: &str) -> Result<(), BenchError> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)
        .map_err(|e| BenchError::Unexpected(format!("postgresql: {e}")))?;
    c.batch_execute("DO $$ BEGIN IF to_regclass('samples') IS NOT NULL THEN TRUNCATE samples, events; END IF; END $$")
        .map_err(|e| BenchError::Unexpected(format!("postgresql: {e}")))?;
    Ok(())
}

/// `vmm-bench repo`.
pub fn repo(out_dir: &std::path::Path, a: &RepoArgs) -> Result<RepoReport, BenchError> {
    let pg = Location::parse(&a.pg_url).map_err(err("--pg-url"))?;
    let interval = Duration::from_millis(a.interval_ms.max(1));
    let mut runs = Vec::new();
    if let Some(s) = a.outage_run_s {
        pg_clear(&a.pg_url)?;
        runs.push(run(
            &pg,
            a.writers,
            Some((interval, Duration::from_secs(s))),
            0,
        )?);
        return Ok(RepoReport {
            method: format!(
                "{} writers (one StateRepo each: its own writer thread and connection, as {} \
                 monitors), one row every {} ms each for {s} s into PostgreSQL; the server \
                 stopped for 30 s and started again during the run (scripts/bench-pg.sh)",
                a.writers, a.writers, a.interval_ms
            ),
            runs,
        });
    }
    let dir: PathBuf = out_dir.join("repo-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io(format!("{}", dir.display()), e))?;
    for paced in [Some((interval, Duration::from_secs(a.seconds))), None] {
        let db = dir.join(format!("s-{}.db", paced.is_some()));
        runs.push(run(&Location::Sqlite(db), a.writers, paced, a.burst_rows)?);
        pg_clear(&a.pg_url)?;
        runs.push(run(&pg, a.writers, paced, a.burst_rows)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RepoReport {
        method: format!(
            "{} writers (one StateRepo each: its own writer thread and connection, as {} \
             monitors on one host), RepoConfig::default() (commit every 200 ms); paced: one \
             row every {} ms each for {} s; capacity: {} rows each, as fast as the queue \
             takes them (insert_blocking). SQLite: one WAL file; PostgreSQL: binary COPY",
            a.writers, a.writers, a.interval_ms, a.seconds, a.burst_rows
        ),
        runs,
    })
}
