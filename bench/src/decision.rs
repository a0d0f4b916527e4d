//! The tuner's decision on the control loop, measured in a running VM: how long a
//! decision takes (sample handed over -> observed knobs, reward, forecast, inference,
//! mask, selection, apply) and how old the sample it is made on is (from the interval's
//! snapshot to the action applied; it must stay under one interval).
//!
//! The VM runs the `blk-io` kernel with a shipped policy (`models/general.onnx`) and the
//! control API; the benchmark reads `GET /vm` (the tuner's last decision) four times per
//! interval and keeps one figure per decision (a decision it did not see in time is
//! missing from the distribution, not counted twice); the tuner's own maximum over every
//! decision is reported beside it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::child::Watchdog;
use crate::error::BenchError;
use crate::stats::{quantile_of, summarize, Summary};

/// What to run.
pub struct DecisionSettings {
    /// The vmm binary.
    pub vmm: PathBuf,
    /// The `blk-io` kernel.
    pub kernel: PathBuf,
    /// The policy.
    pub policy: PathBuf,
    /// Scratch directory (disk image, control socket).
    pub scratch: PathBuf,
    /// The control loop's interval.
    pub interval: Duration,
    /// How long the guest runs.
    pub run: Duration,
}

/// Distribution of one figure, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Median, spread, extremes.
    pub summary: Summary,
    /// 99th percentile.
    pub p99: f64,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionReport {
    /// The control loop's interval, µs.
    pub interval_us: f64,
    /// The policy's id.
    pub policy: String,
    /// Decisions the tuner made.
    pub decisions: u64,
    /// Decisions seen (one figure each).
    pub observed: usize,
    /// Decision time (sample -> vector already made -> inference -> mask -> apply), µs.
    pub decision_us: Figure,
    /// Age of the sample each decision is made on, µs.
    pub sample_age_us: Figure,
    /// The oldest sample any decision was made on (the tuner's own maximum), µs.
    pub sample_age_max_us: f64,
    /// The oldest sample over the interval (must be < 1).
    pub sample_age_max_over_interval: f64,
}

fn figure(xs: &[f64]) -> Result<Figure, BenchError> {
    let summary =
        summarize(xs).ok_or_else(|| BenchError::Unexpected("no decision was observed".into()))?;
    Ok(Figure {
        summary,
        p99: quantile_of(xs, 0.99),
    })
}

/// Runs the VM and measures.
pub fn run(s: &DecisionSettings) -> Result<DecisionReport, BenchError> {
    std::fs::create_dir_all(&s.scratch)
        .map_err(|e| BenchError::io(format!("creating {}", s.scratch.display()), e))?;
    let disk = s.scratch.join("decision.img");
    std::fs::write(&disk, vec![0u8; 16 << 20])
        .map_err(|e| BenchError::io(format!("writing {}", disk.display()), e))?;
    let sock = s.scratch.join("decision.sock");
    let _ = std::fs::remove_file(&sock);
    let ms = s.run.as_millis().to_string();
    let mut child = Command::new(&s.vmm)
        .arg("run")
        .arg("--kernel")
        .arg(&s.kernel)
        .args(["--mem-mib", "64", "--drive"])
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", &format!("mode=randread ms={ms} depth=4")])
        .arg("--policy")
        .arg(&s.policy)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--metrics-interval-ms", &s.interval.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            program: s.vmm.display().to_string(),
            source,
        })?;
    let watchdog = Watchdog::start(child.id(), s.run + Duration::from_secs(30));
    let poll = s.interval / 4;
    let mut last_seen = 0u64;
    let (mut decision_us, mut age_us) = (Vec::new(), Vec::new());
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + s.run + Duration::from_secs(10);
    while Instant::now() < deadline {
        std::thread::sleep(poll);
        let answer = match api_client::call(&sock, r#"{"method":"GET","path":"/vm"}"#) {
            Ok(a) => a,
            // Not up yet, or the guest has finished.
            Err(e) if e.monitor_gone() && !last.is_null() => break,
            Err(_) => continue,
        };
        let t = &answer["body"]["tuner"];
        let n = t["decisions"].as_u64().unwrap_or(0);
        if n > last_seen {
            last_seen = n;
            // The policy's first decisions include its warm-up; keep every one.
            decision_us.push(t["decision_ns"].as_f64().unwrap_or(0.0) / 1e3);
            age_us.push(t["sample_age_ns"].as_f64().unwrap_or(0.0) / 1e3);
            last = t.clone();
        }
    }
    let _ = child.kill();
    watchdog.disarm();
    let _ = child.wait();
    let _ = std::fs::remove_file(&disk);
    let interval_us = s.interval.as_secs_f64() * 1e6;
    let age_max_us = last["sample_age_ns_max"].as_f64().unwrap_or(f64::NAN) / 1e3;
    Ok(DecisionReport {
        interval_us,
        policy: last["policy"].as_str().unwrap_or("?").to_string(),
        decisions: last["decisions"].as_u64().unwrap_or(0),
        observed: decision_us.len(),
        decision_us: figure(&decision_us)?,
        sample_age_us: figure(&age_us)?,
        sample_age_max_us: age_max_us,
        sample_age_max_over_interval: age_max_us / interval_us,
    })
}
