//! The VM's settings, from the command line or a JSON file, and their validation.
//!
//! Every problem is reported as a [`ConfigError`] naming the field and what is wrong, so
//! the `vmm` binary can print one line and exit with status 2.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Smallest guest memory the monitor accepts, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
/// Guest memory used when none is given, in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Longest kernel command line accepted, in bytes (without the NUL).
pub const MAX_CMDLINE_LEN: usize = 3072;
/// Most virtio devices one VM can have.
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// A problem with one setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// The setting at fault, spelled as in the JSON file (`mem_mib`, `kernel`, ...).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// Builds an error for `field`.
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: a 64-bit ELF (test kernel or vmlinux) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs (the most the guest may use; the tuner's cost term divides by it).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// vCPUs the guest is asked to use at start (1..=`vcpus`; all of them when absent):
    /// the static configuration's vCPU setting, which the tuner's watchdog restores.
    #[serde(default)]
    pub active_vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// File that receives the guest's serial output; stdout when absent.
    #[serde(default)]
    pub serial_out: Option<PathBuf>,
    /// Install seccomp filters on the monitor's threads.
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Stop the VM after this many milliseconds (exit status 124).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// virtio-blk drives, in slot order.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// virtio-net devices (after the drives in slot order).
    #[serde(default)]
    pub network: Vec<NetworkConfig>,
    /// Unix socket of the control API (PATCH drives' limits and priorities at run time).
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Sampling interval of the performance monitoring agent, in milliseconds.
    #[serde(default = "default_metrics_interval_ms")]
    pub metrics_interval_ms: u64,
    /// State repository receiving one row per interval: a SQLite file's path or a
    /// PostgreSQL URL (`postgres://USER@HOST/DB`); off when absent.
    #[serde(default)]
    pub state_db: Option<tuner::state_repo::Location>,
    /// Address of the Prometheus endpoint (`GET /metrics`); off when absent.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Name of this VM in the state repository and metrics.
    #[serde(default = "default_vm_id")]
    pub vm_id: String,
    /// ONNX Q-network policy for the tuner (model card beside it: `NAME.card.json`).
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Built-in tuner policy instead of a model: `static` or `threshold`.
    #[serde(default)]
    pub tuner: Option<String>,
    /// Exploration rate of the tuner's epsilon-greedy selection (0 in production).
    #[serde(default)]
    pub epsilon: f64,
    /// Removed: online learning left the monitor (`vmm-learn online`). Still read so
    /// that a configuration asking for it is refused with that advice ([`LEARN_MOVED`]).
    #[serde(default)]
    pub learn: bool,
    /// Removed with `learn`; refused when given.
    #[serde(default)]
    pub learn_every: Option<u64>,
    /// Reward weights (free, throughput, miss, throughput_ref); documented in tuner::reward.
    #[serde(default)]
    pub reward_weights: Option<tuner::reward::RewardWeights>,
    /// Fewest vCPUs the tuner may leave the guest (default 1).
    #[serde(default)]
    pub min_vcpus: Option<u32>,
    /// A/B test: two policies `A,B` (each a model path, `static` or `threshold`) taking
    /// turns in blocks of `ab_block` intervals.
    #[serde(default)]
    pub ab: Option<String>,
    /// Intervals per A/B block (default 20).
    #[serde(default = "default_ab_block")]
    pub ab_block: u64,
    /// Keep the per-vCPU exit counters in the run loop (default true; off only to measure
    /// what they cost).
    #[serde(default = "default_true")]
    pub exit_counters: bool,
    /// The VM's service level objective: a class and optional p99 latency and minimum
    /// operation rate targets (`tuner::slo`).
    #[serde(default)]
    pub slo: Option<tuner::slo::Slo>,
    /// Guest profiler: samples of each vCPU's instruction pointer per second
    /// (1..=`profiler::MAX_HZ`); off when absent (the control API can turn it on).
    #[serde(default)]
    pub profile_hz: Option<u64>,
    /// The guest kernel's symbols for the profiler as a `System.map`; without it, the
    /// ELF symbol table of `kernel`.
    #[serde(default)]
    pub symbols: Option<PathBuf>,
}

/// Parses the `--slo` syntax: `class=critical|standard|batch[,p99_us=N][,min_ops=N]`.
pub fn parse_slo(spec: &str) -> Result<tuner::slo::Slo, ConfigError> {
    tuner::slo::Slo::parse_spec(spec).map_err(|e| ConfigError::new(e.field(), e.problem()))
}

/// Why `learn` and `learn_every` are refused: online learning runs in its own process.
pub const LEARN_MOVED: &str = "online learning left the monitor: start the VM with \
     --tuner or --policy, --state-db DB and --api-sock SOCK, and run \
     `vmm-learn online --api-sock SOCK --state-db DB [--policy START.onnx] \
     [--learn-every N]` beside it";

fn default_ab_block() -> u64 {
    20
}

fn default_metrics_interval_ms() -> u64 {
    100
}
fn default_vm_id() -> String {
    "vm0".to_string()
}

/// One token bucket of a rate limiter (Firecracker's semantics): `size` tokens (bytes or
/// operations) refilled every `refill_time_ms`, plus an optional one-time burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    /// Tokens per refill period (and the bucket's capacity).
    pub size: u64,
    /// Refill period in milliseconds (at least 100).
    pub refill_time_ms: u64,
    /// Extra tokens available once.
    #[serde(default)]
    pub one_time_burst: u64,
}

/// A drive's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Bytes bucket.
    #[serde(default)]
    pub bandwidth: Option<BucketSpec>,
    /// Operations bucket.
    #[serde(default)]
    pub ops: Option<BucketSpec>,
}

impl RateLimitSpec {
    /// The devices crate's form, validated (refill periods of at least 100 ms).
    pub fn to_limiter(
        self,
        field: &str,
    ) -> Result<devices::rate_limiter::RateLimiterConfig, ConfigError> {
        let conv = |b: Option<BucketSpec>| {
            b.map(|b| devices::rate_limiter::BucketConfig {
                size: b.size,
                one_time_burst: b.one_time_burst,
                refill_time_ms: b.refill_time_ms,
            })
        };
        let cfg = devices::rate_limiter::RateLimiterConfig {
            bandwidth: conv(self.bandwidth),
            ops: conv(self.ops),
        };
        cfg.validate()
            .map_err(|e| ConfigError::new(field, e.to_string()))?;
        Ok(cfg)
    }

    /// From the devices crate's form.
    pub fn from_limiter(cfg: devices::rate_limiter::RateLimiterConfig) -> Self {
        let conv = |b: Option<devices::rate_limiter::BucketConfig>| {
            b.filter(|b| !b.is_unlimited()).map(|b| BucketSpec {
                size: b.size,
                refill_time_ms: b.refill_time_ms,
                one_time_burst: b.one_time_burst,
            })
        };
        Self {
            bandwidth: conv(cfg.bandwidth),
            ops: conv(cfg.ops),
        }
    }
}

/// A per-second rate as a bucket: refilled every 100 ms when the rate divides by 10
/// (small bursts, accurate over short runs), else every second.
pub fn bucket_for_rate(per_sec: u64) -> BucketSpec {
    if per_sec.is_multiple_of(10) {
        BucketSpec {
            size: per_sec / 10,
            refill_time_ms: 100,
            one_time_burst: 0,
        }
    } else {
        BucketSpec {
            size: per_sec,
            refill_time_ms: 1000,
            one_time_burst: 0,
        }
    }
}

/// One virtio-net device on a TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// TAP interface name (created if absent; needs CAP_NET_ADMIN).
    pub tap: String,
    /// Guest MAC address `xx:xx:xx:xx:xx:xx`; `06:00:00:00:00:<slot>` when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Name in logs and metrics; `net<N>` when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Limits on each direction (bytes and packets).
    #[serde(default)]
    pub rate_limiter: Option<RateLimitSpec>,
}

impl NetworkConfig {
    /// Parses the `--net` syntax: `tap=NAME[,mac=MAC][,id=NAME]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut cfg = NetworkConfig {
            tap: String::new(),
            mac: None,
            id: None,
            rate_limiter: None,
        };
        let mut limits = RateLimitSpec::default();
        let number = |k: &str, v: &str| {
            v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::new(
                    "network",
                    format!("{k}={v:?} in {spec:?} is not a positive integer"),
                )
            })
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => cfg.tap = v.to_string(),
                Some(("mac", v)) if !v.is_empty() => cfg.mac = Some(v.to_string()),
                Some(("id", v)) if !v.is_empty() => cfg.id = Some(v.to_string()),
                Some(("bw", v)) => limits.bandwidth = Some(bucket_for_rate(number("bw", v)?)),
                Some(("pps", v)) => limits.ops = Some(bucket_for_rate(number("pps", v)?)),
                _ => {
                    return Err(ConfigError::new(
                        "network",
                        format!("unknown or empty option {part:?} in {spec:?} (expected tap=NAME[,mac=MAC][,id=NAME])"),
                    ))
                }
            }
        }
        cfg.rate_limiter = (limits != RateLimitSpec::default()).then_some(limits);
        if cfg.tap.is_empty() {
            return Err(ConfigError::new(
                "network",
                format!("{spec:?} has no tap=NAME"),
            ));
        }
        Ok(cfg)
    }
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || {
        ConfigError::new(
            "network.mac",
            format!("{text:?} is not a MAC address xx:xx:xx:xx:xx:xx"),
        )
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(ConfigError::new(
            "network.mac",
            format!("{text} is a multicast address"),
        ));
    }
    Ok(mac)
}

/// One virtio-blk drive.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Name in logs, metrics and the control API; `blk<N>` when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Rate limits from the start.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitSpec>,
    /// I/O priority from the start: `low`, `medium` (default), `high` or a weight 1-1000.
    #[serde(default)]
    pub priority: Option<String>,
    /// Rate limits from the start as a level of the tuner's `RATE_LADDER` (0 = unlimited
    /// .. 4 = tightest), recorded as the drive's static rate level; excludes
    /// `rate_limiter`.
    #[serde(default)]
    pub rate_level: Option<usize>,
}

/// The limits of level `level` of the tuner's `RATE_LADDER`, with the buckets the tuner
/// itself sets (refilled every 100 ms); `None` for the unlimited level 0.
pub fn rate_level_limits(level: usize) -> Result<Option<RateLimitSpec>, ConfigError> {
    let ladder = &tuner::actions::RATE_LADDER;
    let l = ladder.get(level).ok_or_else(|| {
        ConfigError::new(
            "drives.rate_level",
            format!("{level} is outside 0..={}", ladder.len() - 1),
        )
    })?;
    let spec = RateLimitSpec::from_limiter(crate::tuning::ladder_limits(l));
    Ok((spec != RateLimitSpec::default()).then_some(spec))
}

impl DriveConfig {
    /// Parses the `--drive` syntax:
    /// `path=FILE[,read-only][,id=NAME][,bw=BYTES_PER_SEC][,iops=N][,priority=P][,level=L]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        let mut limits = RateLimitSpec::default();
        let mut priority = None;
        let mut rate_level = None;
        let number = |k: &str, v: &str| {
            v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::new(
                    "drives",
                    format!("{k}={v:?} in {spec:?} is not a positive integer"),
                )
            })
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                Some(("bw", v)) => limits.bandwidth = Some(bucket_for_rate(number("bw", v)?)),
                Some(("iops", v)) => limits.ops = Some(bucket_for_rate(number("iops", v)?)),
                Some(("priority", v)) if !v.is_empty() => priority = Some(v.to_string()),
                Some(("level", v)) => {
                    let level = v.parse::<usize>().map_err(|_| {
                        ConfigError::new(
                            "drives.rate_level",
                            format!("level={v:?} in {spec:?} is not a level 0..=4"),
                        )
                    })?;
                    rate_level_limits(level)?;
                    rate_level = Some(level);
                }
                None if part == "read-only" || part == "ro" => read_only = true,
                _ => {
                    return Err(ConfigError::new(
                        "drives",
                        format!("unknown or empty option {part:?} in {spec:?} (expected path=FILE[,read-only][,id=NAME][,bw=N][,iops=N][,priority=P][,level=L])"),
                    ))
                }
            }
        }
        let path =
            path.ok_or_else(|| ConfigError::new("drives", format!("{spec:?} has no path=FILE")))?;
        let rate_limiter = (limits != RateLimitSpec::default()).then_some(limits);
        let cfg = Self {
            path,
            read_only,
            id,
            rate_limiter,
            priority,
            rate_level,
        };
        cfg.start_limits()?;
        Ok(cfg)
    }

    /// The limits the drive starts with: its `rate_level`'s or its explicit
    /// `rate_limiter` (`None`: unlimited). Both at once is an error.
    pub fn start_limits(&self) -> Result<Option<RateLimitSpec>, ConfigError> {
        match (self.rate_level, self.rate_limiter) {
            (Some(level), Some(_)) => Err(ConfigError::new(
                "drives.rate_level",
                format!(
                    "level {level} conflicts with the explicit bw/iops limits of {}: give one or the other",
                    self.path.display()
                ),
            )),
            (Some(level), None) => rate_level_limits(level),
            (None, limits) => Ok(limits),
        }
    }
}

fn default_vcpus() -> u32 {
    1
}
fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_true() -> bool {
    true
}

/// Kernel image formats the monitor can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A 64-bit ELF file.
    Elf,
    /// A Linux bzImage.
    BzImage,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: default_vcpus(),
            active_vcpus: None,
            mem_mib: DEFAULT_MEM_MIB,
            serial_out: None,
            seccomp: true,
            timeout_ms: None,
            drives: Vec::new(),
            network: Vec::new(),
            api_sock: None,
            metrics_interval_ms: default_metrics_interval_ms(),
            state_db: None,
            metrics_addr: None,
            vm_id: default_vm_id(),
            policy: None,
            tuner: None,
            epsilon: 0.0,
            learn: false,
            learn_every: None,
            reward_weights: None,
            min_vcpus: None,
            ab: None,
            ab_block: default_ab_block(),
            exit_counters: true,
            slo: None,
            profile_hz: None,
            symbols: None,
        }
    }

    /// Whether the VM gets a guest profiler: asked for at start (`profile_hz`,
    /// `symbols`), or possible at run time through the control API.
    pub fn profiler_wanted(&self) -> bool {
        self.profile_hz.is_some() || self.symbols.is_some() || self.api_sock.is_some()
    }

    /// Parses a JSON configuration; unknown fields are rejected.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde names the unknown or missing field in its message; keep it.
            ConfigError::new("config", format!("malformed JSON: {msg}"))
        })
    }

    /// Reads and parses a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        // A regular file of at most 1 MiB: a FIFO or /dev/zero is refused, never read.
        let text = tuner::files::read_text_capped(path, tuner::files::TEXT_CAP)
            .map_err(|e| ConfigError::new("config", e.to_string()))?;
        Self::from_json(&text)
    }

    /// Checks every setting that can be checked without KVM; returns the kernel's format.
    ///
    /// `max_vcpus` is KVM's limit and `host_mem_mib` the host's memory, both from the caller.
    pub fn validate(&self, max_vcpus: u32, host_mem_mib: u64) -> Result<KernelFormat, ConfigError> {
        if self.learn {
            return Err(ConfigError::new("learn", LEARN_MOVED));
        }
        if self.learn_every.is_some() {
            return Err(ConfigError::new("learn_every", LEARN_MOVED));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::new("vcpus", "must be at least 1"));
        }
        if self.vcpus > max_vcpus {
            return Err(ConfigError::new(
                "vcpus",
                format!("{} exceeds the KVM limit of {max_vcpus}", self.vcpus),
            ));
        }
        if let Some(a) = self.active_vcpus {
            if a == 0 || a > self.vcpus {
                return Err(ConfigError::new(
                    "active_vcpus",
                    format!("{a} is outside 1..={} (vcpus)", self.vcpus),
                ));
            }
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::new(
                "mem_mib",
                format!(
                    "{} MiB is below the minimum of {MIN_MEM_MIB} MiB",
                    self.mem_mib
                ),
            ));
        }
        if self.mem_mib > host_mem_mib {
            return Err(ConfigError::new(
                "mem_mib",
                format!("{} MiB exceeds the host's {host_mem_mib} MiB", self.mem_mib),
            ));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::new(
                "cmdline",
                format!(
                    "{} bytes is longer than {MAX_CMDLINE_LEN}",
                    self.cmdline.len()
                ),
            ));
        }
        if !self.cmdline.is_ascii() || self.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(ConfigError::new(
                "cmdline",
                "must be printable ASCII without NUL or newline",
            ));
        }
        if self.timeout_ms == Some(0) {
            return Err(ConfigError::new("timeout_ms", "must be greater than 0"));
        }
        if let Some(hz) = self.profile_hz {
            if hz == 0 || hz > u64::from(crate::profiler::MAX_HZ) {
                return Err(ConfigError::new(
                    "profile_hz",
                    format!(
                        "{hz} is outside 1..={} samples per second (leave it out to keep \
                         the profiler off)",
                        crate::profiler::MAX_HZ
                    ),
                ));
            }
        }
        if let Some(path) = &self.symbols {
            tuner::files::open_regular(path)
                .map_err(|e| ConfigError::new("symbols", e.to_string()))?;
        }
        if let Some(initrd) = &self.initrd {
            let meta = std::fs::metadata(initrd)
                .map_err(|e| ConfigError::new("initrd", format!("{}: {e}", initrd.display())))?;
            if !meta.is_file() {
                return Err(ConfigError::new(
                    "initrd",
                    format!("{} is not a file", initrd.display()),
                ));
            }
        }
        if let Some(out) = &self.serial_out {
            check_serial_out(out)?;
        }
        if self.drives.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::new(
                "drives",
                format!(
                    "{} drives exceed the limit of {MAX_VIRTIO_DEVICES}",
                    self.drives.len()
                ),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.drives.iter().enumerate() {
            let meta = std::fs::metadata(&d.path)
                .map_err(|e| ConfigError::new("drives", format!("{}: {e}", d.path.display())))?;
            if !meta.is_file() {
                return Err(ConfigError::new(
                    "drives",
                    format!("{} is not a regular file", d.path.display()),
                ));
            }
            if meta.len() < 512 {
                return Err(ConfigError::new(
                    "drives",
                    format!("{} is smaller than one 512-byte sector", d.path.display()),
                ));
            }
            let id = d.id.clone().unwrap_or_else(|| format!("blk{i}"));
            if id.is_empty()
                || id.len() > 32
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::new(
                    "drives",
                    format!("id {id:?} must be 1-32 of [A-Za-z0-9_-]"),
                ));
            }
            if !ids.insert(id.clone()) {
                return Err(ConfigError::new(
                    "drives",
                    format!("id {id:?} is used twice"),
                ));
            }
            if let Some(l) = d.start_limits()? {
                l.to_limiter("drives.rate_limiter")?;
            }
            if let Some(p) = &d.priority {
                p.parse::<devices::io_scheduler::Priority>()
                    .and_then(|p| p.validated_weight())
                    .map_err(|e| ConfigError::new("drives.priority", e.to_string()))?;
            }
        }
        if !(1..=60_000).contains(&self.metrics_interval_ms) {
            return Err(ConfigError::new(
                "metrics_interval_ms",
                format!("{} is outside 1..=60000", self.metrics_interval_ms),
            ));
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::new("metrics_addr", format!("{addr:?}: {e} (expected IP:PORT)"))
            })?;
        }
        if !(0.0..=1.0).contains(&self.epsilon) {
            return Err(ConfigError::new(
                "epsilon",
                format!("{} is outside 0..=1", self.epsilon),
            ));
        }
        if let Some(t) = &self.tuner {
            if t != "static" && t != "threshold" {
                return Err(ConfigError::new(
                    "tuner",
                    format!("{t:?} is not static or threshold"),
                ));
            }
        }
        if let Some(ab) = &self.ab {
            let arms: Vec<&str> = ab.split(',').collect();
            if arms.len() != 2 || arms.iter().any(|a| a.is_empty()) || arms[0] == arms[1] {
                return Err(ConfigError::new(
                    "ab",
                    format!("{ab:?} must be two different policies A,B"),
                ));
            }
            if self.policy.is_some() || self.tuner.is_some() {
                return Err(ConfigError::new(
                    "ab",
                    "use either ab or policy/tuner, not both",
                ));
            }
        }
        if self.ab_block == 0 {
            return Err(ConfigError::new("ab_block", "must be at least 1"));
        }
        if let Some(m) = self.min_vcpus {
            if m == 0 || m > self.vcpus {
                return Err(ConfigError::new(
                    "min_vcpus",
                    format!("{m} is outside 1..={}", self.vcpus),
                ));
            }
            if m > self.start_vcpus() {
                return Err(ConfigError::new(
                    "active_vcpus",
                    format!("{} is below min_vcpus {m}", self.start_vcpus()),
                ));
            }
        }
        if let Some(slo) = &self.slo {
            slo.validate()
                .map_err(|e| ConfigError::new(e.field(), e.problem()))?;
            if slo.p99_us.is_some() && self.drives.is_empty() {
                return Err(ConfigError::new(
                    "slo.p99_us",
                    "a p99 request latency target needs at least one drive to measure",
                ));
            }
        }
        if let Some(w) = &self.reward_weights {
            w.validate()
                .map_err(|e| ConfigError::new("reward_weights", e.to_string()))?;
        }
        if self.vm_id.is_empty() || self.vm_id.len() > 64 {
            return Err(ConfigError::new("vm_id", "must be 1-64 characters"));
        }
        let format = detect_kernel_format(&self.kernel)?;
        // Kernel and initrd go into guest memory: neither can be larger.
        let mem_bytes = self.mem_mib.saturating_mul(1 << 20);
        for (field, path) in std::iter::once(("kernel", &self.kernel))
            .chain(self.initrd.as_ref().map(|p| ("initrd", p)))
        {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len > mem_bytes {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} ({len} bytes) is larger than guest memory ({} MiB)",
                        path.display(),
                        self.mem_mib
                    ),
                ));
            }
        }
        Ok(format)
    }

    /// vCPUs the guest is asked to use at start: `active_vcpus`, or all `vcpus`.
    pub fn start_vcpus(&self) -> u32 {
        self.active_vcpus.unwrap_or(self.vcpus)
    }

    /// Whether a tuner runs: a model, a built-in policy or an A/B test.
    pub fn tuner_on(&self) -> bool {
        self.policy.is_some() || self.tuner.is_some() || self.ab.is_some()
    }

    /// The id of network device `index` (its own or `net<index>`).
    pub fn net_id(&self, index: usize) -> String {
        self.network
            .get(index)
            .and_then(|n| n.id.clone())
            .unwrap_or_else(|| format!("net{index}"))
    }

    /// The id of drive `index` (its own or `blk<index>`).
    pub fn drive_id(&self, index: usize) -> String {
        self.drives
            .get(index)
            .and_then(|d| d.id.clone())
            .unwrap_or_else(|| format!("blk{index}"))
    }
}

/// Checks `--serial-out`: a regular file (created or truncated at start) or an existing
/// character device (`/dev/null`, `/dev/full`, a terminal: opening one never blocks and
/// writing to one never grows anything). A FIFO (whose open blocks until a reader comes,
/// and whose writes block when it stops reading), a directory, a socket or a block device
/// is refused.
pub fn check_serial_out(out: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(out) {
        Ok(m) => serial_out_kind(out, m.file_type()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ConfigError::new(
            "serial_out",
            format!("{}: {e}", out.display()),
        )),
    }
}

/// The rule of [`check_serial_out`] for a file of `kind` (also applied to the opened file,
/// so a path swapped after the check is caught).
pub fn serial_out_kind(out: &Path, kind: std::fs::FileType) -> Result<(), ConfigError> {
    if kind.is_file() || kind.is_char_device() {
        return Ok(());
    }
    Err(ConfigError::new(
        "serial_out",
        format!(
            "{} is {}; give a regular file or a character device such as /dev/null",
            out.display(),
            tuner::files::kind_of(kind)
        ),
    ))
}

/// Looks at a kernel file's magic numbers: ELF64 x86-64 or bzImage ("HdrS" at 0x202).
/// A regular file only (opened without blocking: a FIFO is refused, not waited on).
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let mut file =
        tuner::files::open_regular(path).map_err(|e| ConfigError::new("kernel", e.to_string()))?;
    let mut head = vec![0u8; 0x210];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                return Err(ConfigError::new(
                    "kernel",
                    format!("{}: {e}", path.display()),
                ))
            }
        }
    }
    head.truncate(got);
    if head.len() >= 20 && head[..4] == *b"\x7fELF" {
        // EI_CLASS 2 = 64-bit, EI_DATA 1 = little endian, e_machine 62 = x86-64.
        if head[4] != 2 || head[5] != 1 || u16::from_le_bytes([head[18], head[19]]) != 62 {
            return Err(ConfigError::new(
                "kernel",
                format!("{} is an ELF file but not 64-bit x86-64", path.display()),
            ));
        }
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::new(
        "kernel",
        format!("{} is not an ELF or bzImage file", path.display()),
    ))
}

/// The host's memory in MiB (from /proc/meminfo), or `u64::MAX` if it cannot be read.
pub fn host_mem_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_out_takes_regular_files_and_character_devices_only() {
        let dir = std::env::temp_dir().join(format!("vmm-serial-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for bad in [&fifo, &dir] {
            let e = check_serial_out(bad).unwrap_err();
            assert_eq!(e.field, "serial_out");
        }
        assert!(check_serial_out(&fifo)
            .unwrap_err()
            .problem
            .contains("a FIFO"));
        assert!(check_serial_out(Path::new("/dev/null")).is_ok());
        assert!(check_serial_out(&dir.join("new.log")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
    use std::io::Write;

    fn elf_file() -> tempfile_lite::TempFile {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[18] = 62;
        tempfile_lite::TempFile::with(&head)
    }

    /// A tiny temporary-file helper so the tests need no extra crate.
    mod tempfile_lite {
        use std::path::PathBuf;
        pub struct TempFile(pub PathBuf);
        impl TempFile {
            pub fn with(bytes: &[u8]) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmm-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, bytes).unwrap();
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let c = VmConfig::from_json(r#"{"kernel":"k"}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, DEFAULT_MEM_MIB);
        assert!(c.seccomp);
        let e = VmConfig::from_json(r#"{"kernel":"k","vcpu":2}"#).unwrap_err();
        assert!(e.problem.contains("unknown field `vcpu`"), "{e}");
        let e = VmConfig::from_json(r#"{"kernel":"k","vcpus":"two"}"#).unwrap_err();
        assert!(e.problem.contains("invalid type"), "{e}");
        assert!(VmConfig::from_json("{").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let k = elf_file();
        let mut c = VmConfig::new(&k.0);
        assert_eq!(c.validate(8, 1024).unwrap(), KernelFormat::Elf);
        c.vcpus = 0;
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "vcpus");
        c.vcpus = 9;
        assert!(c
            .validate(8, 1024)
            .unwrap_err()
            .problem
            .contains("KVM limit of 8"));
        c.vcpus = 1;
        c.mem_mib = 8;
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "mem_mib");
        c.mem_mib = 4096;
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "mem_mib");
        c.mem_mib = 64;
        c.cmdline = "a\nb".into();
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "cmdline");
        c.cmdline = String::new();
        c.learn = true;
        let e = c.validate(8, 1024).unwrap_err();
        assert_eq!(e.field, "learn");
        assert!(e.problem.contains("vmm-learn online"), "{e}");
        c.learn = false;
        c.learn_every = Some(10);
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "learn_every");
        c.learn_every = None;
        assert!(c.validate(8, 1024).is_ok());
    }

    #[test]
    fn drive_specs() {
        let d = DriveConfig::parse("path=/tmp/a.img,read-only,id=data").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("data"));
        assert!(!DriveConfig::parse("path=x").unwrap().read_only);
        assert_eq!(DriveConfig::parse("read-only").unwrap_err().field, "drives");
        assert!(DriveConfig::parse("path=x,fast")
            .unwrap_err()
            .problem
            .contains("\"fast\""));
        let c = VmConfig::from_json(r#"{"kernel":"k","drives":[{"path":"d","read_only":true}]}"#)
            .unwrap();
        assert!(c.drives[0].read_only);
        assert!(VmConfig::from_json(r#"{"kernel":"k","drives":[{"file":"d"}]}"#).is_err());
    }

    #[test]
    fn active_vcpus_is_checked_against_vcpus() {
        let k = elf_file();
        let mut c = VmConfig::new(&k.0);
        c.vcpus = 2;
        assert_eq!(c.start_vcpus(), 2);
        c.active_vcpus = Some(1);
        assert_eq!(c.validate(8, 1024).unwrap(), KernelFormat::Elf);
        assert_eq!(c.start_vcpus(), 1);
        c.active_vcpus = Some(3);
        let e = c.validate(8, 1024).unwrap_err();
        assert_eq!(e.field, "active_vcpus");
        assert!(e.problem.contains("outside 1..=2"), "{e}");
        c.active_vcpus = Some(0);
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "active_vcpus");
        c.active_vcpus = Some(1);
        c.min_vcpus = Some(2);
        let e = c.validate(8, 1024).unwrap_err();
        assert_eq!(e.field, "active_vcpus");
        assert!(e.problem.contains("below min_vcpus 2"), "{e}");
        let j = VmConfig::from_json(r#"{"kernel":"k","vcpus":2,"active_vcpus":1}"#).unwrap();
        assert_eq!((j.vcpus, j.active_vcpus), (2, Some(1)));
    }

    #[test]
    fn drive_rate_levels() {
        let d = DriveConfig::parse("path=x,level=3").unwrap();
        assert_eq!(d.rate_level, Some(3));
        assert_eq!(d.rate_limiter, None);
        let l = d.start_limits().unwrap().expect("level 3 limits");
        // 10 MB/s + 1k IOPS in 100 ms buckets, as the tuner sets them.
        assert_eq!(
            l.bandwidth.map(|b| (b.size, b.refill_time_ms)),
            Some((1_000_000, 100))
        );
        assert_eq!(l.ops.map(|b| (b.size, b.refill_time_ms)), Some((100, 100)));
        assert_eq!(
            DriveConfig::parse("path=x,level=0").unwrap().start_limits(),
            Ok(None)
        );
        let e = DriveConfig::parse("path=x,level=5").unwrap_err();
        assert_eq!(e.field, "drives.rate_level");
        assert!(e.problem.contains("outside 0..=4"), "{e}");
        let e = DriveConfig::parse("path=x,level=high").unwrap_err();
        assert_eq!(e.field, "drives.rate_level");
        let e = DriveConfig::parse("path=x,bw=1000000,level=2").unwrap_err();
        assert_eq!(e.field, "drives.rate_level");
        assert!(e.problem.contains("conflicts"), "{e}");
        assert!(DriveConfig::parse("path=x,level=2,iops=100").is_err());
        let c = VmConfig::from_json(r#"{"kernel":"k","drives":[{"path":"d","rate_level":4}]}"#)
            .unwrap();
        assert_eq!(c.drives[0].rate_level, Some(4));
        let img = tempfile_lite::TempFile::with(&[0u8; 1024]);
        let k = elf_file();
        let mut c = VmConfig::new(&k.0);
        let mut d = DriveConfig::parse(&format!("path={}", img.0.display())).unwrap();
        d.rate_level = Some(2);
        d.rate_limiter = Some(RateLimitSpec {
            bandwidth: Some(bucket_for_rate(1000)),
            ops: None,
        });
        c.drives.push(d);
        let e = c.validate(8, 1024).unwrap_err();
        assert_eq!(e.field, "drives.rate_level");
        c.drives[0].rate_limiter = None;
        assert!(c.validate(8, 1024).is_ok());
        c.drives[0].rate_level = Some(9);
        assert_eq!(c.validate(8, 1024).unwrap_err().field, "drives.rate_level");
    }

    #[test]
    fn kernel_format_detection() {
        let junk = tempfile_lite::TempFile::with(b"not a kernel at all");
        let e = detect_kernel_format(&junk.0).unwrap_err();
        assert!(e.problem.contains("not an ELF or bzImage"));
        let e = detect_kernel_format(Path::new("/nonexistent/kernel")).unwrap_err();
        assert_eq!(e.field, "kernel");
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = tempfile_lite::TempFile::with(&bz);
        assert_eq!(detect_kernel_format(&bz.0).unwrap(), KernelFormat::BzImage);
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        let elf32 = tempfile_lite::TempFile::with(&elf32);
        assert!(detect_kernel_format(&elf32.0)
            .unwrap_err()
            .problem
            .contains("not 64-bit"));
        let _ = std::io::stdout().flush();
    }

    #[test]
    fn slo_from_the_flag_and_json_with_errors_naming_the_field() {
        let s = parse_slo("class=critical,p99_us=500,min_ops=10000").unwrap();
        assert_eq!((s.p99_us, s.min_ops), (Some(500), Some(10000.0)));
        let e = parse_slo("class=gold").unwrap_err();
        assert_eq!(e.field, "slo.class");
        assert!(e.problem.contains("critical, standard or batch"), "{e}");
        assert_eq!(
            parse_slo("class=batch,min_ops=0").unwrap_err().field,
            "slo.min_ops"
        );
        assert_eq!(
            parse_slo("class=batch,min_ops=-1").unwrap_err().field,
            "slo.min_ops"
        );
        let e = parse_slo("class=critical,p99_us=3").unwrap_err();
        assert_eq!(e.field, "slo.p99_us");
        assert!(e.problem.contains("floor"), "{e}");
        assert_eq!(parse_slo("p99_us=500").unwrap_err().field, "slo.class");
        assert_eq!(parse_slo("class=batch,fast").unwrap_err().field, "slo");
        let c =
            VmConfig::from_json(r#"{"kernel":"k","slo":{"class":"batch","min_ops":5}}"#).unwrap();
        assert_eq!(c.slo.map(|s| s.class), Some(tuner::slo::SloClass::Batch));
        assert!(VmConfig::from_json(r#"{"kernel":"k","slo":{"class":"gold"}}"#).is_err());
        assert!(VmConfig::from_json(r#"{"kernel":"k","slo":{"class":"batch","p":1}}"#).is_err());
    }

    #[test]
    fn the_profiler_fields_are_checked_naming_them() {
        let c = VmConfig::from_json(r#"{"kernel":"k","profile_hz":100,"symbols":"S.map"}"#)
            .expect("json");
        assert_eq!(c.profile_hz, Some(100));
        assert!(c.profiler_wanted());
        assert!(!VmConfig::new("k").profiler_wanted());
        for hz in [0, 10_001] {
            let mut c = VmConfig::new("/nonexistent-kernel");
            c.profile_hz = Some(hz);
            let e = c.validate(8, 1 << 20).unwrap_err();
            assert_eq!(e.field, "profile_hz", "{e:?}");
            assert!(e.problem.contains("outside 1..=10000"), "{e:?}");
        }
        let mut c = VmConfig::new("/nonexistent-kernel");
        c.symbols = Some(PathBuf::from("/dev/null"));
        let e = c.validate(8, 1 << 20).unwrap_err();
        assert_eq!(e.field, "symbols", "{e:?}");
        assert!(e.problem.contains("not a regular file"), "{e:?}");
    }
}
