//! Rate limiter accuracy: `blk-io` under `vmm` with a drive limited to a bandwidth
//! (`bw=`) or an operation rate (`iops=`), achieved rate over configured rate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::blk::{self, GuestRun, Mode, Progress, Workload};
use crate::error::BenchError;
use crate::report::{ratio, Meta};
use crate::stats::{summarize, Summary};

/// What a setting limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `bw=` bytes per second.
    BytesPerSec(u64),
    /// `iops=` requests per second.
    OpsPerSec(u64),
}

impl Limit {
    /// The `--drive` option.
    pub fn drive_option(self) -> String {
        match self {
            Limit::BytesPerSec(n) => format!("bw={n}"),
            Limit::OpsPerSec(n) => format!("iops={n}"),
        }
    }

    /// The configured rate.
    pub fn rate(self) -> f64 {
        match self {
            Limit::BytesPerSec(n) | Limit::OpsPerSec(n) => n as f64,
        }
    }
}

/// One setting: a limit and the workload run under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Setting {
    /// The limit.
    pub limit: Limit,
    /// The workload.
    pub workload: Workload,
}

/// The benchmark's settings: three bandwidths under 64 KiB sequential reads at depth 4,
/// and an operation rate under 4 KiB random reads at depth 4.
pub fn default_settings() -> Vec<Setting> {
    let seq = Workload {
        mode: Mode::SeqRead,
        bs: 65536,
        depth: 4,
    };
    let rand = Workload {
        mode: Mode::RandRead,
        bs: 4096,
        depth: 4,
    };
    vec![
        Setting {
            limit: Limit::BytesPerSec(1_000_000),
            workload: seq,
        },
        Setting {
            limit: Limit::BytesPerSec(8_000_000),
            workload: seq,
        },
        Setting {
            limit: Limit::BytesPerSec(32_000_000),
            workload: seq,
        },
        Setting {
            limit: Limit::OpsPerSec(500),
            workload: rand,
        },
    ]
}

/// Settings of the rate limiter benchmark.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `blk-io` kernel.
    pub kernel: PathBuf,
    /// The image file (written if missing).
    pub image: PathBuf,
    /// Its size in MiB.
    pub image_mib: u64,
    /// Duration of every run, ms.
    pub ms: u64,
    /// Progress line period, ms (for the steady-state rate).
    pub progress_ms: u64,
    /// Runs of each setting.
    pub runs: usize,
    /// The settings.
    pub settings: Vec<Setting>,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct RateSample {
    /// Achieved rate over the whole run (the guest's result line), in the limit's unit.
    pub achieved: f64,
    /// `achieved` / configured.
    pub accuracy: f64,
    /// Rate between the first progress line and the end of the run (past the bucket's
    /// initial fill), in the limit's unit; None without progress lines.
    pub steady: Option<f64>,
    /// `steady` / configured.
    pub steady_accuracy: Option<f64>,
    /// The guest's result line: ms, ops, bytes.
    pub ms: u64,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
}

/// One setting's results.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    /// The setting.
    pub setting: Setting,
    /// The `vmm` command.
    pub command: String,
    /// Unit of the rates: `bytes/s` or `ops/s`.
    pub unit: String,
    /// The configured rate.
    pub configured: f64,
    /// Achieved / configured over whole runs.
    pub accuracy: Summary,
    /// Achieved / configured past the first progress line.
    pub steady_accuracy: Option<Summary>,
    /// Every run, in order.
    pub samples: Vec<RateSample>,
}

/// The rate limiter benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct RateLimitReport {
    /// When and where.
    pub meta: Meta,
    /// Duration of every run, ms.
    pub ms: u64,
    /// Runs per setting.
    pub runs: usize,
    /// Period of the guest's progress lines, ms.
    pub progress_ms: u64,
    /// How the runs were ordered.
    pub order: String,
    /// One entry per setting.
    pub results: Vec<RateResult>,
}

/// The rate between the first progress line and the end of the run, in `limit`'s unit.
fn steady_rate(limit: Limit, progress: &[Progress], end: &blk::BlkLine) -> Option<f64> {
    let first = progress.first()?;
    let dt = end.ms.checked_sub(first.t_ms).filter(|d| *d > 0)? as f64 / 1e3;
    let amount = match limit {
        Limit::BytesPerSec(_) => end.bytes.checked_sub(first.bytes)?,
        Limit::OpsPerSec(_) => end.ops.checked_sub(first.ops)?,
    };
    Some(amount as f64 / dt)
}

fn sample(limit: Limit, r: &GuestRun) -> RateSample {
    let achieved = match limit {
        Limit::BytesPerSec(_) => r.line.bytes as f64,
        Limit::OpsPerSec(_) => r.line.ops as f64,
    } / (r.line.ms.max(1) as f64 / 1e3);
    let steady = steady_rate(limit, &r.progress, &r.line);
    RateSample {
        achieved,
        accuracy: achieved / limit.rate(),
        steady,
        steady_accuracy: steady.and_then(|s| ratio(s, limit.rate())),
        ms: r.line.ms,
        ops: r.line.ops,
        bytes: r.line.bytes,
    }
}

fn command(s: &RateLimitSettings, st: &Setting, span: u64) -> (Vec<String>, String) {
    let drive = format!("path={},{}", s.image.display(), st.limit.drive_option());
    let cmdline = format!(
        "{} progress={}",
        st.workload.cmdline(s.ms, span),
        s.progress_ms
    );
    let args = blk::vmm_args(&s.kernel, &drive, &cmdline, &[]);
    let line = format!(
        "{} {}",
        s.vmm.display(),
        blk::vmm_args(&s.kernel, &drive, &format!("'{cmdline}'"), &[]).join(" ")
    );
    (args, line)
}

/// Runs the rate limiter benchmark.
pub fn run(s: &RateLimitSettings) -> Result<RateLimitReport, BenchError> {
    let meta = Meta::now("ratelimit");
    blk::ensure_image(&s.image, s.image_mib)?;
    let span = (s.image_mib << 20) / blk::SECTOR;
    let timeout = Duration::from_millis(s.ms + 30_000);
    let n = s.settings.len();
    let mut samples: Vec<Vec<RateSample>> = vec![Vec::new(); n];
    for round in 0..s.runs {
        for k in 0..n {
            // Rotate which setting goes first each round.
            let i = (round + k) % n;
            let st = &s.settings[i];
            let (args, _) = command(s, st, span);
            let r = blk::run_guest(
                "vmm blk-io (rate limited)",
                Command::new(&s.vmm).args(&args),
                0,
                timeout,
            )?;
            let x = sample(st.limit, &r);
            eprintln!(
                "ratelimit: round {}/{} {:<14} achieved/configured {:.3} (steady {})",
                round + 1,
                s.runs,
                st.limit.drive_option(),
                x.accuracy,
                x.steady_accuracy
                    .map(|a| format!("{a:.3}"))
                    .unwrap_or_else(|| "n/a".into())
            );
            samples[i].push(x);
        }
    }
    let mut results = Vec::new();
    for (st, v) in s.settings.iter().zip(samples) {
        let acc: Vec<f64> = v.iter().map(|x| x.accuracy).collect();
        let steady: Vec<f64> = v.iter().filter_map(|x| x.steady_accuracy).collect();
        results.push(RateResult {
            setting: *st,
            command: command(s, st, span).1,
            unit: match st.limit {
                Limit::BytesPerSec(_) => "bytes/s",
                Limit::OpsPerSec(_) => "ops/s",
            }
            .into(),
            configured: st.limit.rate(),
            accuracy: summarize(&acc)
                .ok_or_else(|| BenchError::Unexpected("ratelimit: no samples".into()))?,
            steady_accuracy: summarize(&steady),
            samples: v,
        });
    }
    Ok(RateLimitReport {
        meta,
        ms: s.ms,
        runs: s.runs,
        progress_ms: s.progress_ms,
        order: "rounds over the settings, the first setting rotating each round".into(),
        results,
    })
}

/// The image used when none is given: the one `blk` writes.
pub fn default_image(out_dir: &Path) -> PathBuf {
    out_dir.join("blk.img")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_starts_at_the_first_progress_line() {
        let line = blk::parse_blk_line(
            "blk-io: mode=seqread bs=65536 depth=4 ms=3000 ops=100 bytes=6553600 \
             ops_per_sec=33 bytes_per_sec=2184533 errors=0",
        )
        .expect("line");
        let p = [Progress {
            t_ms: 1000,
            ops: 40,
            bytes: 40 * 65536,
        }];
        let bw = steady_rate(Limit::BytesPerSec(1), &p, &line).expect("rate");
        assert!((bw - 60.0 * 65536.0 / 2.0).abs() < 1e-6);
        let ops = steady_rate(Limit::OpsPerSec(1), &p, &line).expect("rate");
        assert!((ops - 30.0).abs() < 1e-9);
        assert_eq!(steady_rate(Limit::OpsPerSec(1), &[], &line), None);
    }
}
