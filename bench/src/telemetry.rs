//! The cost of telemetry (the performance monitoring agent sampling the run-loop counters
//! into the state repository): on the exit round trip (`pio-bench`), on guest compute
//! (`cpu-burn`), and how many rows per second the state repository sustains.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use tuner::schema::{FEATURES, SCHEMA_VERSION};
use tuner::state_repo::{RepoConfig, Row, StateRepo};

use crate::child::run_timed;
use crate::error::BenchError;
use crate::pio::parse_pio_line;
use crate::report::{ms, ratio, Meta};
use crate::stats::{summarize, Summary};

/// Settings of the telemetry benchmark.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `pio-bench` kernel.
    pub pio_kernel: PathBuf,
    /// The `cpu-burn` kernel.
    pub burn_kernel: PathBuf,
    /// Where the temporary state databases go.
    pub out_dir: PathBuf,
    /// Runs of each side (both parts).
    pub runs: usize,
    /// `pio-bench count=`.
    pub pio_count: u64,
    /// `cpu-burn ms=`.
    pub burn_ms: u64,
    /// Rows written in the state repository test.
    pub repo_rows: u64,
    /// Runs of the state repository test.
    pub repo_runs: usize,
}

/// A telemetry configuration of `vmm run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Config {
    /// `--metrics-interval-ms`, with `--state-db`; None = neither (no telemetry at all).
    pub interval_ms: Option<u64>,
}

impl Config {
    fn label(self) -> String {
        match self.interval_ms {
            None => "off".into(),
            Some(i) => format!("state-db, {i} ms"),
        }
    }

    /// The `vmm run` options, with the database at `db`.
    fn args(self, db: &Path) -> Vec<String> {
        match self.interval_ms {
            None => Vec::new(),
            Some(i) => vec![
                "--state-db".into(),
                db.display().to_string(),
                "--metrics-interval-ms".into(),
                i.to_string(),
            ],
        }
    }
}

/// One run of one configuration.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// The guest's figure: ns per exit (pio) or iterations (cpu-burn).
    pub value: f64,
    /// Rows the run left in its state database (None without telemetry).
    pub rows: Option<u64>,
    /// Wall time of the `vmm` process, ms.
    pub wall_ms: f64,
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The configuration.
    pub config: Config,
    /// `off`, `state-db, 10 ms`.
    pub label: String,
    /// The command (the database path is a fresh file per run).
    pub command: String,
    /// The guest's figure.
    pub value: Summary,
    /// Median of the per-round ratios to the run without telemetry (None for that one).
    pub ratio_to_off_paired_median: Option<f64>,
    /// Median over the median without telemetry.
    pub ratio_to_off: Option<f64>,
    /// Every run, in order.
    pub samples: Vec<Sample>,
}

/// One part (exit round trip, or compute).
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// What the guest measures.
    pub measures: String,
    /// The kernel's command line.
    pub cmdline: String,
    /// The first side has no telemetry; the ratios are to it.
    pub sides: Vec<Side>,
}

/// One run of the state repository test.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RepoRun {
    /// From the first insert to the last commit, s.
    pub seconds: f64,
    /// Rows over `seconds`.
    pub rows_per_sec: f64,
    /// Transactions committed.
    pub commits: u64,
    /// Size of the database file.
    pub db_bytes: u64,
}

/// What the state repository sustained.
#[derive(Debug, Clone, Serialize)]
pub struct RepoThroughput {
    /// How it was measured.
    pub what: String,
    /// Rows queued and committed per run.
    pub rows: u64,
    /// Rows per second over the runs.
    pub rows_per_sec: Summary,
    /// Every run, in order.
    pub runs: Vec<RepoRun>,
}

/// The telemetry benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryReport {
    /// When and where.
    pub meta: Meta,
    /// Runs per side.
    pub runs: usize,
    /// How the runs were ordered.
    pub order: String,
    /// (a) `pio-bench` ns per exit.
    pub exit_round_trip: Part,
    /// (b) `cpu-burn` iterations on one vCPU.
    pub compute: Part,
    /// (c) the state repository alone.
    pub state_repo: RepoThroughput,
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Rows committed in the database at `db`.
fn count_rows(db: &Path) -> Result<u64, BenchError> {
    let repo = StateRepo::open(
        db,
        RepoConfig {
            anomaly: None,
            ..RepoConfig::default()
        },
    )
    .map_err(|e| BenchError::Unexpected(format!("opening {}: {e}", db.display())))?;
    let n = repo
        .count()
        .map_err(|e| BenchError::Unexpected(format!("counting rows in {}: {e}", db.display())));
    let _ = repo.close();
    n
}

/// Runs one `vmm` configuration once; `parse` extracts the guest's figure.
fn run_once(
    vmm: &Path,
    base_args: &[String],
    config: Config,
    db: &Path,
    parse: &dyn Fn(&str) -> Option<f64>,
    timeout: Duration,
) -> Result<Sample, BenchError> {
    remove_db(db);
    let mut cmd = Command::new(vmm);
    cmd.args(base_args).args(config.args(db));
    let t = run_timed(&mut cmd, timeout)?;
    let out = String::from_utf8_lossy(&t.stdout);
    let value = parse(&out)
        .filter(|_| t.status.code() == Some(0))
        .ok_or_else(|| {
            BenchError::Unexpected(format!(
                "vmm ({}): status {:?}, stdout {out:?}, stderr {:?}",
                config.label(),
                t.status.code(),
                t.stderr.trim()
            ))
        })?;
    let rows = match config.interval_ms {
        Some(_) => Some(count_rows(db)?),
        None => None,
    };
    remove_db(db);
    Ok(Sample {
        value,
        rows,
        wall_ms: ms(t.exit),
    })
}

/// One part of the benchmark: a kernel run under several telemetry configurations.
struct PartSpec<'a> {
    /// Short name for progress lines.
    name: &'a str,
    /// `vmm` arguments before the telemetry options.
    base_args: Vec<String>,
    /// The configurations; the first has no telemetry.
    configs: &'a [Config],
    /// Extracts the guest's figure from its output.
    parse: &'a dyn Fn(&str) -> Option<f64>,
    /// Per run.
    timeout: Duration,
    /// What the figure is.
    measures: &'a str,
    /// The kernel's command line.
    cmdline: &'a str,
}

/// Runs every configuration of `spec` `runs` times, rotating their order each round;
/// each run with telemetry gets a fresh database at `db`.
fn run_part(vmm: &Path, db: &Path, runs: usize, spec: PartSpec<'_>) -> Result<Part, BenchError> {
    let PartSpec {
        name,
        base_args,
        configs,
        parse,
        timeout,
        measures,
        cmdline,
    } = spec;
    let n = configs.len();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); n];
    for round in 0..runs {
        for k in 0..n {
            let i = (round + k) % n;
            let s = run_once(vmm, &base_args, configs[i], db, parse, timeout)?;
            samples[i].push(s);
        }
        let last: Vec<String> = configs
            .iter()
            .zip(&samples)
            .map(|(c, v)| {
                let s = v.last().map(|s| s.value).unwrap_or(f64::NAN);
                format!("{} {s:.0}", c.label())
            })
            .collect();
        eprintln!(
            "telemetry: {name} round {}/{runs}: {}",
            round + 1,
            last.join(", ")
        );
    }
    let off = samples[0].clone();
    let off_median = summarize(&off.iter().map(|s| s.value).collect::<Vec<_>>())
        .map(|s| s.median)
        .unwrap_or(f64::NAN);
    let mut sides = Vec::new();
    for (i, (c, v)) in configs.iter().zip(samples).enumerate() {
        let values: Vec<f64> = v.iter().map(|s| s.value).collect();
        let value = summarize(&values)
            .ok_or_else(|| BenchError::Unexpected(format!("telemetry {name}: no samples")))?;
        let paired: Vec<f64> = v
            .iter()
            .zip(&off)
            .filter_map(|(a, b)| ratio(a.value, b.value))
            .collect();
        let mut cmd = vec![vmm.display().to_string()];
        cmd.extend(base_args.iter().map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        }));
        cmd.extend(c.args(db));
        sides.push(Side {
            config: *c,
            label: c.label(),
            command: cmd.join(" "),
            ratio_to_off: (i > 0).then(|| ratio(value.median, off_median)).flatten(),
            ratio_to_off_paired_median: (i > 0)
                .then(|| summarize(&paired).map(|s| s.median))
                .flatten(),
            value,
            samples: v,
        });
    }
    Ok(Part {
        measures: measures.into(),
        cmdline: cmdline.into(),
        sides,
    })
}

/// Parses `cpu-burn: cpus=<n> ms=<ms> iterations=<total>`.
pub fn parse_burn_iterations(output: &str) -> Option<u64> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("cpu-burn:"))?;
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == "iterations")
        .and_then(|(_, v)| v.parse().ok())
}

/// Writes `rows` rows through the state repository's writer thread, as the telemetry
/// agent does (8 VMs' rows of the schema's width, default configuration: WAL, batched
/// commits, anomaly detection on), and times them to the last commit; `runs` times, each
/// in a fresh database.
pub fn repo_throughput(dir: &Path, rows: u64, runs: usize) -> Result<RepoThroughput, BenchError> {
    let mut v = Vec::new();
    for _ in 0..runs {
        v.push(repo_once(dir, rows)?);
    }
    let rates: Vec<f64> = v.iter().map(|r| r.rows_per_sec).collect();
    Ok(RepoThroughput {
        what: format!(
            "tuner::state_repo::StateRepo with RepoConfig::default() (as vmm opens it), one \
             producer thread calling insert_blocking for {rows} rows of {} features from \
             8 VMs, then flush; timed from the first insert to the last commit; {runs} runs, \
             each in a fresh database",
            FEATURES.len()
        ),
        rows,
        rows_per_sec: summarize(&rates)
            .ok_or_else(|| BenchError::Unexpected("state repo: no runs".into()))?,
        runs: v,
    })
}

fn repo_once(dir: &Path, rows: u64) -> Result<RepoRun, BenchError> {
    let db = dir.join("telemetry-repo-bench.db");
    remove_db(&db);
    let err = |e: tuner::state_repo::RepoError| BenchError::Unexpected(format!("state repo: {e}"));
    let repo = StateRepo::open(&db, RepoConfig::default()).map_err(err)?;
    let writer = repo.writer();
    let width = FEATURES.len();
    let vms = 8u64;
    let t0 = Instant::now();
    for i in 0..rows {
        let level = (i % 97) as f32 / 97.0;
        writer
            .insert_blocking(Row {
                vm_id: format!("vm{}", i % vms),
                ts_ns: (i / vms) * 10_000_000,
                interval_ns: 10_000_000,
                schema_version: SCHEMA_VERSION,
                vector: (0..width)
                    .map(|k| (level + k as f32 / 64.0).fract())
                    .collect(),
                raw: (0..width)
                    .map(|k| (i * 3 + k as u64) as f64 * 0.5)
                    .collect(),
                action: None,
                reward: None,
                policy_id: "static".into(),
                config: r#"{"vcpus":1,"mem_mib":128,"drives":[]}"#.into(),
                anomaly: None,
                anomaly_score: None,
                slo: None,
            })
            .map_err(err)?;
    }
    repo.flush().map_err(err)?;
    let seconds = t0.elapsed().as_secs_f64();
    let stats = repo.close().map_err(err)?;
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    remove_db(&db);
    if stats.rows_written != rows {
        return Err(BenchError::Unexpected(format!(
            "state repo: {} of {rows} rows written ({} dropped)",
            stats.rows_written, stats.rows_dropped
        )));
    }
    Ok(RepoRun {
        seconds,
        rows_per_sec: rows as f64 / seconds,
        commits: stats.commits,
        db_bytes,
    })
}

/// Runs the telemetry benchmark.
pub fn run(s: &TelemetrySettings) -> Result<TelemetryReport, BenchError> {
    let meta = Meta::now("telemetry");
    let db = s.out_dir.join("telemetry-run.db");

    let pio_cmdline = format!("count={}", s.pio_count);
    let pio_args = vec![
        "run".to_string(),
        "--kernel".into(),
        s.pio_kernel.display().to_string(),
        "--cmdline".into(),
        pio_cmdline.clone(),
    ];
    let pio_parse = |out: &str| parse_pio_line(out).map(|l| l.ns_per_exit as f64);
    let exit_round_trip = run_part(
        &s.vmm,
        &db,
        s.runs,
        PartSpec {
            name: "pio-bench",
            base_args: pio_args,
            configs: &[
                Config { interval_ms: None },
                Config {
                    interval_ms: Some(10),
                },
            ],
            parse: &pio_parse,
            timeout: Duration::from_millis(s.pio_count.saturating_add(30_000)),
            measures: "pio-bench ns per exit (guest TSC)",
            cmdline: &pio_cmdline,
        },
    )?;

    let burn_cmdline = format!("ms={}", s.burn_ms);
    let burn_args = vec![
        "run".to_string(),
        "--kernel".into(),
        s.burn_kernel.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--cmdline".into(),
        burn_cmdline.clone(),
    ];
    let burn_parse = |out: &str| parse_burn_iterations(out).map(|i| i as f64);
    let compute = run_part(
        &s.vmm,
        &db,
        s.runs,
        PartSpec {
            name: "cpu-burn",
            base_args: burn_args,
            configs: &[
                Config { interval_ms: None },
                Config {
                    interval_ms: Some(100),
                },
                Config {
                    interval_ms: Some(10),
                },
            ],
            parse: &burn_parse,
            timeout: Duration::from_millis(s.burn_ms + 30_000),
            measures: "cpu-burn iterations in the run (one vCPU)",
            cmdline: &burn_cmdline,
        },
    )?;

    eprintln!(
        "telemetry: state repository, {} rows, {} runs",
        s.repo_rows, s.repo_runs
    );
    let state_repo = repo_throughput(&s.out_dir, s.repo_rows, s.repo_runs)?;
    eprintln!(
        "telemetry: state repository sustained {:.0} rows/s (median)",
        state_repo.rows_per_sec.median
    );
    Ok(TelemetryReport {
        meta,
        runs: s.runs,
        order: "per part, rounds over the configurations, the first one rotating each round".into(),
        exit_round_trip,
        compute,
        state_repo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_burn() {
        let out = "cpu 0 iterations 1331731456\ncpu-burn: cpus=1 ms=2000 iterations=1331731456\n";
        assert_eq!(parse_burn_iterations(out), Some(1_331_731_456));
        assert_eq!(parse_burn_iterations("cpu 0 iterations 5\n"), None);
    }

    #[test]
    fn configs_give_their_options() {
        let db = Path::new("/tmp/x.db");
        assert!(Config { interval_ms: None }.args(db).is_empty());
        assert_eq!(
            Config {
                interval_ms: Some(10)
            }
            .args(db),
            ["--state-db", "/tmp/x.db", "--metrics-interval-ms", "10"]
        );
    }

    #[test]
    fn repo_throughput_commits_every_row() {
        let dir = std::env::temp_dir().join(format!("vmm-bench-repo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let r = repo_throughput(&dir, 500, 2).expect("repo");
        assert_eq!(r.rows, 500);
        assert_eq!(r.runs.len(), 2);
        assert!(r.rows_per_sec.min > 0.0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
