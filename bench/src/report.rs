//! What every result file carries about when and where it was measured, and writing it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// When and where a benchmark ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Which benchmark (`boot`, `pio`, `memory`).
    pub benchmark: String,
    /// Start of the run, UTC, ISO 8601 (`2026-11-24T10:00:00Z`).
    pub date_utc: String,
    /// Start of the run, seconds since the Unix epoch.
    pub unix_time: u64,
    /// The host.
    pub host: Host,
    /// `git rev-parse HEAD` of the work tree, if it is a git checkout.
    pub git_commit: Option<String>,
    /// Whether the work tree had uncommitted changes.
    pub git_dirty: Option<bool>,
}

/// The host's facts that matter to the figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// `uname -r`.
    pub kernel_release: String,
    /// CPUs this process may use.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
}

/// The civil date (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn git(args: &[&str]) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

impl Meta {
    /// The facts for `benchmark`, starting now.
    pub fn now(benchmark: &str) -> Self {
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            benchmark: benchmark.to_string(),
            date_utc: iso_utc(unix_time),
            unix_time,
            host: Host {
                kernel_release: kernel_release(),
                cpus: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                cpu_model: cpu_model(),
            },
            git_commit: git(&["rev-parse", "HEAD"]),
            git_dirty: git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        }
    }
}

/// Writes `value` as pretty JSON to `out_dir/<name>.json`; returns the path and the text.
pub fn write_json<T: Serialize>(
    out_dir: &Path,
    name: &str,
    value: &T,
) -> Result<(PathBuf, String), BenchError> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| BenchError::io(format!("creating {}", out_dir.display()), e))?;
    let path = out_dir.join(format!("{name}.json"));
    std::fs::write(&path, format!("{text}\n"))
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
    Ok((path, text))
}

/// Milliseconds in a duration, as a float.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `a / b`, or None if `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_utc(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
