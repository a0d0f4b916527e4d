//! Plain snapshots of the monitor's counters: what the tuner reads each interval.
//!
//! The monitor fills these from its own atomics (vCPU run loops, virtio queues, memory,
//! the guest's metrics device) through [`CounterSource`]; the tuner never touches the
//! monitor's internals, so it can be tested against a fake source. All counters are
//! cumulative since the VM started; the sampling agent turns them into rates.

/// Exit reasons counted per vCPU, in a fixed order (the index into [`VcpuCounters::exits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// Port I/O read (`in`).
    IoIn,
    /// Port I/O write (`out`).
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT reached the monitor.
    Hlt,
    /// Triple fault / shutdown.
    Shutdown,
    /// KVM internal error.
    InternalError,
    /// Signal or immediate exit (EINTR).
    Interrupted,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// Every kind, in index order.
    pub const ALL: [ExitKind; 9] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::InternalError,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];
    /// Number of kinds.
    pub const COUNT: usize = Self::ALL.len();

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name used in metrics and the schema (`io_in`, `mmio_write`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::InternalError => "internal_error",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// Cumulative counters of one vCPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VcpuCounters {
    /// vCPU index.
    pub index: u32,
    /// Exits by [`ExitKind`] index.
    pub exits: [u64; ExitKind::COUNT],
    /// Nanoseconds spent inside `KVM_RUN` (guest time plus in-kernel exit handling).
    pub guest_ns: u64,
    /// Nanoseconds spent in the monitor handling exits.
    pub monitor_ns: u64,
    /// KVM's binary statistics for this vCPU (name, value), where the kernel offers them.
    pub kvm_stats: Vec<(String, u64)>,
    /// Nanoseconds the vCPU's thread was runnable but waiting for a host CPU (the
    /// scheduler's run delay, `/proc/self/task/TID/schedstat`; 0 where unknown).
    pub run_delay_ns: u64,
}

/// Cumulative counters of one virtio queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueCounters {
    /// Device id (e.g. `blk0`, `net0`).
    pub device: String,
    /// Queue index within the device.
    pub queue: u16,
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Requests that ended in an error status.
    pub errors: u64,
    /// Nanoseconds requests waited on a rate limiter.
    pub throttled_ns: u64,
    /// Sum of sampled queue depths and number of samples (mean depth = sum / samples).
    pub depth_sum: u64,
    /// Number of depth samples.
    pub depth_samples: u64,
    /// Latency histogram: counts per bucket, bucket `i` holding latencies below
    /// [`LATENCY_BUCKETS_US`]`[i]` microseconds (the last bucket is unbounded).
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of the latencies of the requests counted in `latency_buckets`, in nanoseconds
    /// (the Prometheus histogram's `_sum`; 0 where the monitor does not track it).
    pub latency_ns_sum: u64,
}

impl QueueCounters {
    /// Whether this queue belongs to a network device (its device id starts with `net`).
    pub fn is_net(&self) -> bool {
        self.device.starts_with("net")
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds: the devices' own
/// definition (one source of truth; the monitor fills the histograms with it).
pub use devices::virtio::queue_metrics::LATENCY_BUCKETS_US;

/// Memory counters of the VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryCounters {
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Guest memory resident on the host, in bytes.
    pub resident_bytes: u64,
    /// Host page faults taken by the monitor process (minor + major), cumulative.
    pub page_faults: u64,
    /// Pages the guest dirtied (cumulative, from KVM's dirty log).
    pub dirty_pages: u64,
}

/// What the guest workload reported through the paravirtual metrics device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestMetrics {
    /// Operations completed (cumulative).
    pub ops: u64,
    /// Bytes processed (cumulative).
    pub bytes: u64,
    /// Sum of operation latencies in nanoseconds (cumulative).
    pub latency_ns_sum: u64,
    /// Number of latency samples (cumulative).
    pub latency_samples: u64,
}

/// The host's CPUs as the VM's threads may use them (cumulative, from `/proc/stat`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostCounters {
    /// Clock ticks the allowed CPUs spent busy (everything but idle and iowait).
    pub busy_ticks: u64,
    /// Clock ticks the allowed CPUs counted in all.
    pub total_ticks: u64,
    /// CPUs the monitor may run on.
    pub allowed_cpus: u32,
}

/// Everything the monitor exposes at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CounterSnapshot {
    /// Monotonic time of the snapshot in nanoseconds (any fixed origin).
    pub at_ns: u64,
    /// Per-vCPU counters.
    pub vcpus: Vec<VcpuCounters>,
    /// Per-queue counters.
    pub queues: Vec<QueueCounters>,
    /// Memory counters.
    pub memory: MemoryCounters,
    /// Guest-reported workload metrics.
    pub guest: GuestMetrics,
    /// vCPUs the guest is currently asked to use.
    pub active_vcpus: u32,
    /// Host cores the vCPU threads may run on.
    pub host_cores: u32,
    /// The knobs in force on each drive, in the VM's configuration order.
    pub drives: Vec<DriveKnobs>,
    /// [`crate::actions::NET_QOS_LADDER`] level in force on the network devices (`None`
    /// without one).
    pub net_qos_level: Option<u8>,
    /// Log lines a guest triggered that the monitor's rate limits held back (cumulative).
    pub log_lines_suppressed: u64,
    /// The host's CPU time (the VM's neighbours included).
    pub host: HostCounters,
    /// The VM's service level objective, if configured (attainment is computed per
    /// interval by the sampling agent).
    pub slo: Option<crate::slo::Slo>,
    /// The guest profiler's cumulative counts (`None` in a monitor without one).
    pub profile: Option<crate::guest_profile::ProfileCounters>,
}

/// The knobs in force on one drive, in the terms of the tuner's actions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriveKnobs {
    /// The drive's id (its queues' [`QueueCounters::device`]).
    pub id: String,
    /// [`crate::actions::RATE_LADDER`] level in force (the nearest level when the limit
    /// was set off the ladder).
    pub rate_level: u8,
    /// I/O priority in force.
    pub priority: crate::actions::PriorityLevel,
}

/// The one narrow read path from the monitor into the tuner.
pub trait CounterSource: Send + Sync {
    /// Reads every counter now.
    fn snapshot(&self) -> CounterSnapshot;

    /// The state repository writer's counts and health, when the VM writes to one.
    fn repo_stats(&self) -> Option<crate::state_repo::WriterStats> {
        None
    }
}
