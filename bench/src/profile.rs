//! The cost of the guest profiler on guest compute: `cpu-burn` on one vCPU with the
//! profiler off, at 100 Hz and at 1000 Hz, interleaved (the order rotates every round)
//! so that a shared host's drift hits all three alike.
//!
//! Two figures per run: the guest's iterations in its fixed wall-clock window (what the
//! guest gets done, sensitive to other load on the host), and its iterations per CPU
//! second of the whole `vmm` process (user + system time of every thread, the profiler
//! thread and the forced exits included, from `getrusage(RUSAGE_CHILDREN)` around the
//! run): the profiler's cost per unit of work, which host contention does not move.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::child::run_timed;
use crate::error::BenchError;
use crate::report::{ms, ratio, Meta};
use crate::stats::{summarize, Summary};
use crate::telemetry::parse_burn_iterations;

/// Settings of the profiler benchmark.
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `cpu-burn` kernel.
    pub burn_kernel: PathBuf,
    /// Runs of each rate.
    pub runs: usize,
    /// `cpu-burn ms=`.
    pub burn_ms: u64,
}

/// One run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Run {
    /// Guest iterations in the window.
    pub iterations: f64,
    /// CPU seconds of the `vmm` process (user + system).
    pub cpu_s: f64,
    /// `iterations / cpu_s`.
    pub iterations_per_cpu_s: f64,
    /// Wall time of the process, ms.
    pub wall_ms: f64,
}

/// One rate's results.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// `--profile-hz` (None: off).
    pub profile_hz: Option<u32>,
    /// The command.
    pub command: String,
    /// Guest iterations in the window.
    pub iterations: Summary,
    /// Guest iterations per CPU second of the monitor process.
    pub iterations_per_cpu_s: Summary,
    /// Median over the rounds of this run's iterations over the same round's run
    /// without the profiler (None for that one).
    pub iterations_ratio_paired_median: Option<f64>,
    /// The same for iterations per CPU second: 1 - this is the profiler's overhead.
    pub per_cpu_s_ratio_paired_median: Option<f64>,
    /// Every run, in order.
    pub runs: Vec<Run>,
}

/// The profiler benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    /// When and where.
    pub meta: Meta,
    /// Runs per rate.
    pub runs: usize,
    /// How the runs were ordered.
    pub order: String,
    /// What one sample costs, by design.
    pub mechanism: String,
    /// The kernel's command line.
    pub cmdline: String,
    /// Off, 100 Hz, 1000 Hz.
    pub sides: Vec<Side>,
}

fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn args(s: &ProfileSettings, cmdline: &str, hz: Option<u32>) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        "--kernel".into(),
        s.burn_kernel.display().to_string(),
        "--vcpus".into(),
        "1".into(),
        "--cmdline".into(),
        cmdline.to_string(),
    ];
    if let Some(hz) = hz {
        a.extend(["--profile-hz".to_string(), hz.to_string()]);
    }
    a
}

fn run_once(vmm: &Path, args: &[String], timeout: Duration) -> Result<Run, BenchError> {
    let before = children_cpu_s();
    let t = run_timed(Command::new(vmm).args(args), timeout)?;
    let cpu_s = children_cpu_s() - before;
    let out = String::from_utf8_lossy(&t.stdout);
    let iterations = parse_burn_iterations(&out)
        .filter(|_| t.status.code() == Some(0))
        .ok_or_else(|| {
            BenchError::Unexpected(format!(
                "vmm {args:?}: status {:?}, stdout {out:?}, stderr {:?}",
                t.status.code(),
                t.stderr.trim()
            ))
        })? as f64;
    Ok(Run {
        iterations,
        cpu_s,
        iterations_per_cpu_s: if cpu_s > 0.0 { iterations / cpu_s } else { 0.0 },
        wall_ms: ms(t.exit),
    })
}

fn paired(a: &[Run], off: &[Run], f: fn(&Run) -> f64) -> Option<f64> {
    let r: Vec<f64> = a
        .iter()
        .zip(off)
        .filter_map(|(x, o)| ratio(f(x), f(o)))
        .collect();
    summarize(&r).map(|s| s.median)
}

/// Runs the profiler benchmark.
pub fn run(s: &ProfileSettings) -> Result<ProfileReport, BenchError> {
    let meta = Meta::now("profile");
    let cmdline = format!("ms={}", s.burn_ms);
    let rates = [None, Some(100u32), Some(1000u32)];
    let timeout = Duration::from_millis(s.burn_ms + 30_000);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); rates.len()];
    for round in 0..s.runs {
        for k in 0..rates.len() {
            let i = (round + k) % rates.len();
            let r = run_once(&s.vmm, &args(s, &cmdline, rates[i]), timeout)?;
            runs[i].push(r);
        }
        let last: Vec<String> = rates
            .iter()
            .zip(&runs)
            .map(|(hz, v)| {
                let r = v.last().copied();
                format!(
                    "{}: {:.0} it, {:.3e} it/cpu-s",
                    hz.map_or("off".to_string(), |h| format!("{h} Hz")),
                    r.map_or(f64::NAN, |r| r.iterations),
                    r.map_or(f64::NAN, |r| r.iterations_per_cpu_s)
                )
            })
            .collect();
        eprintln!(
            "profile: round {}/{}: {}",
            round + 1,
            s.runs,
            last.join("; ")
        );
    }
    let off = runs[0].clone();
    let mut sides = Vec::new();
    for (i, (hz, v)) in rates.iter().zip(runs).enumerate() {
        let summary = |f: fn(&Run) -> f64| {
            summarize(&v.iter().map(f).collect::<Vec<_>>())
                .ok_or_else(|| BenchError::Unexpected("profile: no runs".into()))
        };
        let mut cmd = vec![s.vmm.display().to_string()];
        cmd.extend(args(s, &cmdline, *hz));
        sides.push(Side {
            profile_hz: *hz,
            command: cmd.join(" "),
            iterations: summary(|r| r.iterations)?,
            iterations_per_cpu_s: summary(|r| r.iterations_per_cpu_s)?,
            iterations_ratio_paired_median: (i > 0)
                .then(|| paired(&v, &off, |r| r.iterations))
                .flatten(),
            per_cpu_s_ratio_paired_median: (i > 0)
                .then(|| paired(&v, &off, |r| r.iterations_per_cpu_s))
                .flatten(),
            runs: v,
        });
    }
    Ok(ProfileReport {
        meta,
        runs: s.runs,
        order: "each round runs every rate once, the order rotating by one each round".into(),
        mechanism: "per sample and vCPU: one tgkill from the profiler thread, one forced \
                    exit (KVM_RUN returns EINTR through immediate_exit), one KVM_GET_REGS"
            .into(),
        cmdline,
        sides,
    })
}
