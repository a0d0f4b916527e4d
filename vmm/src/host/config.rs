//! `host.json`: the host's budget and its VMs. Each VM's `vm` object is the
//! configuration `vmm run --config` reads ([`crate::VmConfig`]), verbatim.
//!
//! ```json
//! {
//!   "api_sock": "/tmp/vmm-host.sock",
//!   "state_db": "/tmp/vmm-host.db",
//!   "cpus": "0-1",
//!   "devices": [{"path": "/tmp", "bandwidth_bps": 200000000}],
//!   "vms": [
//!     {"id": "web", "op_bytes": 4096,
//!      "vm": {"kernel": "target/test-kernels/blk-io", "drives": [{"path": "/tmp/web.img"}],
//!             "slo": {"class": "critical", "min_ops": 1000}}}
//!   ]
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigError;

/// Arbiter interval used when none is given, in milliseconds.
pub const DEFAULT_INTERVAL_MS: u64 = 500;
/// Time the VMs have to stop after SIGTERM before SIGKILL, when none is given.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// Fewest host cores a VM is granted when none is given.
pub const DEFAULT_MIN_CORES: f64 = 0.1;
/// Most VMs one host runs.
pub const MAX_VMS: usize = 64;

/// The whole host: where it serves, its budget, its VMs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Unix socket of the host's API (`GET /host`).
    pub api_sock: PathBuf,
    /// The one state repository every VM writes its rows to (each row carries the VM's
    /// id); off when absent.
    #[serde(default)]
    pub state_db: Option<tuner::state_repo::Location>,
    /// The cores of the budget, in cpuset list syntax (`"0-1"`, `"2,4-5"`); all the CPUs
    /// this process may use when absent.
    #[serde(default)]
    pub cpus: Option<String>,
    /// Bandwidth budget per backing device (the device holding `path`).
    #[serde(default)]
    pub devices: Vec<DeviceBudget>,
    /// Arbiter interval in milliseconds (100..=60000).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Time the VMs have to stop after SIGTERM before SIGKILL, in milliseconds.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Directory for each VM's log (`<id>.log`); the host's private directory (removed
    /// at the end) when absent.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// How the arbiter grants (`slo`, the default; `threshold`, `pi`, `off`: the
    /// baselines, see [`super::arbiter::ArbiterMode`]).
    #[serde(default)]
    pub arbiter: Option<String>,
    /// The VMs.
    pub vms: Vec<VmEntry>,
}

/// The bandwidth budget of one backing device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBudget {
    /// Any file or directory on the device (drives on the same device share the budget).
    pub path: PathBuf,
    /// Bytes per second shared by every drive on the device.
    pub bandwidth_bps: u64,
}

/// One VM of the host. Its class and targets are its configuration's `slo` (the one
/// place a VM's service level is written; required under a host).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Its id: the `vm_id` of its rows in the state repository, its name in `GET /host`
    /// and in file names (1-64 of `[A-Za-z0-9_.-]`).
    pub id: String,
    /// Bytes one guest operation moves through the drives, for checking the SLO's
    /// `min_ops` against the bandwidth budget (default 512, the smallest virtio-blk
    /// request).
    #[serde(default)]
    pub op_bytes: Option<u64>,
    /// Fewest host cores the arbiter grants it (default 0.1).
    #[serde(default)]
    pub min_cores: Option<f64>,
    /// Its `vmm run` configuration, as `vmm run --config` reads it.
    pub vm: serde_json::Value,
}

impl VmEntry {
    /// The fewest cores it is granted.
    pub fn min_cores(&self) -> f64 {
        self.min_cores.unwrap_or(DEFAULT_MIN_CORES)
    }
}

fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL_MS
}

fn default_stop_timeout_ms() -> u64 {
    DEFAULT_STOP_TIMEOUT_MS
}

impl HostConfig {
    /// Parses `host.json`; unknown fields are refused.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text)
            .map_err(|e| ConfigError::new("config", format!("malformed host JSON: {e}")))
    }

    /// Reads and parses a host configuration file (a regular file of at most 1 MiB).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = tuner::files::read_text_capped(path, tuner::files::TEXT_CAP)
            .map_err(|e| ConfigError::new("config", e.to_string()))?;
        Self::from_json(&text)
    }
}

/// Parses a cpuset list (`"0-3,6"`) into sorted, distinct CPU numbers.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n < libc::CPU_SETSIZE as usize)
                .ok_or_else(|| format!("{s:?} in {text:?} is not a CPU number"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(format!("range {part:?} in {text:?} runs backwards"));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(format!("{text:?} names no CPU"));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_cpu_list("0-1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("3, 0-1,1").unwrap(), vec![0, 1, 3]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("99999").is_err());
    }

    #[test]
    fn host_json_parses_with_defaults_and_refuses_unknown_fields() {
        let cfg = HostConfig::from_json(
            r#"{"api_sock": "/tmp/h.sock", "vms": [
                {"id": "a", "vm": {"kernel": "k", "slo": {"class": "batch"}}}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.interval_ms, DEFAULT_INTERVAL_MS);
        assert_eq!(cfg.vms[0].vm["slo"]["class"], "batch");
        assert_eq!(cfg.vms[0].min_cores(), DEFAULT_MIN_CORES);
        let e = HostConfig::from_json(r#"{"api_sock": "s", "vms": [], "budget": 1}"#).unwrap_err();
        assert_eq!(e.field, "config");
        assert!(e.problem.contains("budget"), "{e}");
        let e = HostConfig::from_json(
            r#"{"api_sock": "s", "vms": [{"id": "a", "class": "gold", "vm": {}}]}"#,
        )
        .unwrap_err();
        assert!(e.problem.contains("class"), "{e}");
    }
}
