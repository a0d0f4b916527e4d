//! The performance vector's schema: the one place that says which features the tuner
//! sees, in which order, in which units and how each is normalised.
//!
//! Every interval the sampling agent ([`crate::agent`]) turns two counter snapshots into
//! a `raw` vector (rates and ratios in the units below) and a normalised `vector` of
//! `f32` in `[0, 1]` that a policy consumes. The schema is versioned by
//! [`SCHEMA_VERSION`]: any change to the list (order, names, units, normalisation) must
//! bump it, since trained policies record the schema in their model card
//! ([`Schema::to_json`]) and are validated against it ([`Schema::check_json`]).
//!
//! The vector has a fixed length, independent of the number of vCPUs and queues: every
//! feature is an aggregate over the VM, except the [`DRIVE_SLOTS`] drive slots (each
//! drive's request rate and the rate level and priority in force on it, so that a policy
//! sees the knobs it turns; an absent drive's slot is 0) and the network QoS level.
//!
//! Since v3 it also carries, per drive slot, the p99 of the requests' own latencies (from
//! the device seeing a request available to its completion), the VM's service level
//! objective and its attainment in the interval ([`crate::slo`]), and the host's view: how
//! long the vCPU threads waited for a host CPU, and how busy the host's allowed CPUs were.
//!
//! History: v1 had the first 23 features only (no knob state besides vCPUs and cores);
//! v2 had the first 36 (its latency features measured the time since the batch of
//! requests started, not each request's own time).
//!
//! Normalisations:
//! - [`Normalisation::Clamp`]: the raw value is already a fraction; clamped to `[0, 1]`.
//! - [`Normalisation::Linear`]: `x / scale`, clamped to `[0, 1]`.
//! - [`Normalisation::Log`]: `ln(1 + x) / ln(1 + scale)`, clamped to `[0, 1]`, for rates
//!   that span orders of magnitude (a rate of `scale` maps to 1).
//!
//! - [`Normalisation::Signed`]: `0.5 + 0.5 * clamp(x / scale, -1, 1)`, for signed
//!   values such as an SLO margin (0 maps to 0.5).
//!
//! Negative and non-finite raw values normalise to 0 (except under `Signed`, where `-inf`
//! gives 0, `+inf` 1 and NaN 0.5).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the performance vector schema. Bump on any change to [`FEATURES`].
pub const SCHEMA_VERSION: u32 = 3;

/// vCPU count that normalises to 1.0 for the `active_vcpus` feature (more is clamped).
pub const MAX_VCPUS: u32 = 8;

/// Host core count that normalises to 1.0 for the `host_cores` feature (more is clamped).
pub const MAX_HOST_CORES: u32 = 8;

/// Drives that have their own slot of features (activity and knobs in force), in the VM's
/// configuration order: the same drives the tuner's action space covers. More drives are
/// counted in the VM-wide I/O features only.
pub const DRIVE_SLOTS: usize = 4;

/// Errors of schema validation.
#[derive(Debug, Error)]
pub enum SchemaError {
    /// A vector's length does not match the schema.
    #[error("vector has {got} features, schema v{SCHEMA_VERSION} has {expected}")]
    LengthMismatch {
        /// Features in the schema.
        expected: usize,
        /// Features in the vector.
        got: usize,
    },
    /// A schema description was written for another schema version.
    #[error("schema version {got} does not match this monitor's version {expected}")]
    VersionMismatch {
        /// This build's version.
        expected: u32,
        /// The described version.
        got: u32,
    },
    /// A described feature differs from this build's feature at the same index.
    #[error("feature {index} differs: expected {expected}, found {got}")]
    FeatureMismatch {
        /// Index in the vector.
        index: usize,
        /// This build's feature (name, unit, normalisation).
        expected: String,
        /// The described feature.
        got: String,
    },
    /// A schema description is not valid JSON of the expected shape.
    #[error("invalid schema JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How a raw feature value is mapped into `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalisation {
    /// The value is a fraction already: clamp to `[0, 1]`.
    Clamp,
    /// Divide by `scale`, clamp to `[0, 1]`.
    Linear {
        /// Raw value that maps to 1.
        scale: f64,
    },
    /// `ln(1 + x) / ln(1 + scale)`, clamped to `[0, 1]`.
    Log {
        /// Raw value that maps to 1.
        scale: f64,
    },
    /// `0.5 + 0.5 * clamp(x / scale, -1, 1)`: signed values, 0 at the middle.
    Signed {
        /// Raw magnitude that maps to 0 (negative) or 1 (positive).
        scale: f64,
    },
}

impl Normalisation {
    /// Normalises one raw value. Negative, NaN and infinite-negative values give 0;
    /// `+inf` gives 1.
    pub fn apply(&self, x: f64) -> f32 {
        if let Normalisation::Signed { scale } = *self {
            if x.is_nan() || scale <= 0.0 || scale.is_nan() {
                return 0.5;
            }
            return (0.5 + 0.5 * (x / scale).clamp(-1.0, 1.0)) as f32;
        }
        if x.is_nan() || x <= 0.0 {
            return 0.0;
        }
        let y = match *self {
            Normalisation::Clamp => x,
            Normalisation::Linear { scale } => {
                if scale > 0.0 {
                    x / scale
                } else {
                    0.0
                }
            }
            Normalisation::Log { scale } => {
                let den = scale.ln_1p();
                if den > 0.0 {
                    x.ln_1p() / den
                } else {
                    0.0
                }
            }
            Normalisation::Signed { .. } => 0.5,
        };
        if y.is_nan() {
            0.0
        } else {
            y.clamp(0.0, 1.0) as f32
        }
    }

    /// Human-readable formula, as printed by [`Schema::describe`].
    pub fn formula(&self) -> String {
        match *self {
            Normalisation::Clamp => "clamp(x, 0, 1)".to_string(),
            Normalisation::Linear { scale } => format!("clamp(x / {scale}, 0, 1)"),
            Normalisation::Log { scale } if scale >= 1e4 => {
                format!("clamp(ln(1+x) / ln(1+{scale:e}), 0, 1)")
            }
            Normalisation::Log { scale } => format!("clamp(ln(1+x) / ln(1+{scale}), 0, 1)"),
            Normalisation::Signed { scale } => format!("0.5 + 0.5 * clamp(x / {scale}, -1, 1)"),
        }
    }

    fn approx_eq(&self, other: &Normalisation) -> bool {
        fn close(a: f64, b: f64) -> bool {
            (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
        }
        match (self, other) {
            (Normalisation::Clamp, Normalisation::Clamp) => true,
            (Normalisation::Linear { scale: a }, Normalisation::Linear { scale: b })
            | (Normalisation::Log { scale: a }, Normalisation::Log { scale: b })
            | (Normalisation::Signed { scale: a }, Normalisation::Signed { scale: b }) => {
                close(*a, *b)
            }
            _ => false,
        }
    }
}

/// One feature of the performance vector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Feature {
    /// Stable name (snake_case, a valid identifier).
    pub name: &'static str,
    /// Unit of the raw value.
    pub unit: &'static str,
    /// Mapping of the raw value into `[0, 1]`.
    pub normalisation: Normalisation,
    /// How the raw value is computed from two counter snapshots.
    pub description: &'static str,
}

/// Identifies a feature; `id as usize` is its index in the vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureId {
    /// Share of the active vCPUs' time spent running the guest.
    CpuUtilisation,
    /// Share of vCPU thread busy time spent in the monitor handling exits.
    MonitorShare,
    /// Port-I/O exits per second.
    ExitRateIo,
    /// MMIO exits per second.
    ExitRateMmio,
    /// HLT exits per second.
    ExitRateHlt,
    /// Other exits per second.
    ExitRateOther,
    /// All exits per second.
    ExitRateTotal,
    /// Storage (non-network) requests per second.
    IoRequestRate,
    /// Storage (non-network) bytes per second.
    IoBytesRate,
    /// Failed storage requests per second.
    IoErrorRate,
    /// Mean share of the interval each queue spent throttled.
    ThrottledFraction,
    /// Mean depth of all queues.
    QueueDepthMean,
    /// Median storage request latency.
    IoLatencyP50,
    /// 99th percentile storage request latency.
    IoLatencyP99,
    /// Network packets per second.
    NetPacketRate,
    /// Network bytes per second.
    NetBytesRate,
    /// Resident share of guest memory.
    MemoryResidentFraction,
    /// Host page faults per second.
    PageFaultRate,
    /// Guest pages dirtied per second.
    DirtyPageRate,
    /// Guest-reported operations per second.
    GuestOpsRate,
    /// Guest-reported mean operation latency.
    GuestLatencyMean,
    /// vCPUs the guest is asked to use.
    ActiveVcpus,
    /// Host cores given to the vCPU threads.
    HostCores,
    /// Requests per second on drive slot 0.
    Drive0RequestRate,
    /// Rate-ladder level in force on drive slot 0.
    Drive0RateLevel,
    /// I/O priority in force on drive slot 0.
    Drive0Priority,
    /// Requests per second on drive slot 1.
    Drive1RequestRate,
    /// Rate-ladder level in force on drive slot 1.
    Drive1RateLevel,
    /// I/O priority in force on drive slot 1.
    Drive1Priority,
    /// Requests per second on drive slot 2.
    Drive2RequestRate,
    /// Rate-ladder level in force on drive slot 2.
    Drive2RateLevel,
    /// I/O priority in force on drive slot 2.
    Drive2Priority,
    /// Requests per second on drive slot 3.
    Drive3RequestRate,
    /// Rate-ladder level in force on drive slot 3.
    Drive3RateLevel,
    /// I/O priority in force on drive slot 3.
    Drive3Priority,
    /// NET_QOS_LADDER level in force on the network devices.
    NetQosLevel,
    /// p99 request latency on drive slot 0.
    Drive0LatencyP99,
    /// p99 request latency on drive slot 1.
    Drive1LatencyP99,
    /// p99 request latency on drive slot 2.
    Drive2LatencyP99,
    /// p99 request latency on drive slot 3.
    Drive3LatencyP99,
    /// The VM's SLO class (0 none, 1 batch, 2 standard, 3 critical).
    SloClass,
    /// Whether every SLO target was met in the interval.
    SloMet,
    /// The p99 latency target (0 without one).
    SloP99Target,
    /// Signed margin of the p99 latency target.
    SloP99Margin,
    /// The minimum operation rate target (0 without one).
    SloOpsTarget,
    /// Signed margin of the operation rate target.
    SloOpsMargin,
    /// Mean share of the interval the vCPU threads waited for a host CPU.
    VcpuRunDelayShare,
    /// Largest share of the interval one vCPU thread waited for a host CPU.
    VcpuRunDelayMax,
    /// Share of the host's allowed CPUs busy (the VM and its neighbours).
    HostLoad,
}

impl FeatureId {
    /// Every feature, in vector order.
    pub const ALL: [FeatureId; 49] = [
        FeatureId::CpuUtilisation,
        FeatureId::MonitorShare,
        FeatureId::ExitRateIo,
        FeatureId::ExitRateMmio,
        FeatureId::ExitRateHlt,
        FeatureId::ExitRateOther,
        FeatureId::ExitRateTotal,
        FeatureId::IoRequestRate,
        FeatureId::IoBytesRate,
        FeatureId::IoErrorRate,
        FeatureId::ThrottledFraction,
        FeatureId::QueueDepthMean,
        FeatureId::IoLatencyP50,
        FeatureId::IoLatencyP99,
        FeatureId::NetPacketRate,
        FeatureId::NetBytesRate,
        FeatureId::MemoryResidentFraction,
        FeatureId::PageFaultRate,
        FeatureId::DirtyPageRate,
        FeatureId::GuestOpsRate,
        FeatureId::GuestLatencyMean,
        FeatureId::ActiveVcpus,
        FeatureId::HostCores,
        FeatureId::Drive0RequestRate,
        FeatureId::Drive0RateLevel,
        FeatureId::Drive0Priority,
        FeatureId::Drive1RequestRate,
        FeatureId::Drive1RateLevel,
        FeatureId::Drive1Priority,
        FeatureId::Drive2RequestRate,
        FeatureId::Drive2RateLevel,
        FeatureId::Drive2Priority,
        FeatureId::Drive3RequestRate,
        FeatureId::Drive3RateLevel,
        FeatureId::Drive3Priority,
        FeatureId::NetQosLevel,
        FeatureId::Drive0LatencyP99,
        FeatureId::Drive1LatencyP99,
        FeatureId::Drive2LatencyP99,
        FeatureId::Drive3LatencyP99,
        FeatureId::SloClass,
        FeatureId::SloMet,
        FeatureId::SloP99Target,
        FeatureId::SloP99Margin,
        FeatureId::SloOpsTarget,
        FeatureId::SloOpsMargin,
        FeatureId::VcpuRunDelayShare,
        FeatureId::VcpuRunDelayMax,
        FeatureId::HostLoad,
    ];

    /// Index of this feature in the vector.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The features of drive slot `slot` (request rate, rate level, priority), or `None`
    /// past [`DRIVE_SLOTS`].
    pub fn drive_slot(slot: usize) -> Option<[FeatureId; 3]> {
        use FeatureId::*;
        const SLOTS: [[FeatureId; 3]; DRIVE_SLOTS] = [
            [Drive0RequestRate, Drive0RateLevel, Drive0Priority],
            [Drive1RequestRate, Drive1RateLevel, Drive1Priority],
            [Drive2RequestRate, Drive2RateLevel, Drive2Priority],
            [Drive3RequestRate, Drive3RateLevel, Drive3Priority],
        ];
        SLOTS.get(slot).copied()
    }

    /// The p99 latency feature of drive slot `slot`, or `None` past [`DRIVE_SLOTS`].
    pub fn drive_latency_slot(slot: usize) -> Option<FeatureId> {
        use FeatureId::*;
        const SLOTS: [FeatureId; DRIVE_SLOTS] = [
            Drive0LatencyP99,
            Drive1LatencyP99,
            Drive2LatencyP99,
            Drive3LatencyP99,
        ];
        SLOTS.get(slot).copied()
    }

    /// The feature's definition.
    pub fn feature(self) -> &'static Feature {
        &FEATURES[self.index()]
    }
}

/// The performance vector, in order. Index `i` is described by [`FeatureId::ALL`]`[i]`.
pub const FEATURES: [Feature; FeatureId::ALL.len()] = [
    Feature {
        name: "cpu_utilisation",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "sum of vCPU guest_ns deltas / (interval_ns * active vCPUs)",
    },
    Feature {
        name: "monitor_share",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "monitor_ns delta / (guest_ns delta + monitor_ns delta), all vCPUs",
    },
    Feature {
        name: "exit_rate_io",
        unit: "exits/s",
        normalisation: Normalisation::Log { scale: 1e5 },
        description: "io_in + io_out exits per second, all vCPUs",
    },
    Feature {
        name: "exit_rate_mmio",
        unit: "exits/s",
        normalisation: Normalisation::Log { scale: 1e5 },
        description: "mmio_read + mmio_write exits per second, all vCPUs",
    },
    Feature {
        name: "exit_rate_hlt",
        unit: "exits/s",
        normalisation: Normalisation::Log { scale: 1e5 },
        description: "hlt exits per second, all vCPUs",
    },
    Feature {
        name: "exit_rate_other",
        unit: "exits/s",
        normalisation: Normalisation::Log { scale: 1e5 },
        description: "shutdown, internal_error, interrupted and other exits per second",
    },
    Feature {
        name: "exit_rate_total",
        unit: "exits/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "all exits per second, all vCPUs",
    },
    Feature {
        name: "io_request_rate",
        unit: "requests/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "completed requests per second, non-network queues",
    },
    Feature {
        name: "io_bytes_rate",
        unit: "bytes/s",
        normalisation: Normalisation::Log { scale: 1e10 },
        description: "bytes moved per second, non-network queues",
    },
    Feature {
        name: "io_error_rate",
        unit: "errors/s",
        normalisation: Normalisation::Log { scale: 1e4 },
        description: "requests ending in an error status per second, non-network queues",
    },
    Feature {
        name: "throttled_fraction",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "per queue min(throttled_ns delta / interval_ns, 1), averaged over all queues",
    },
    Feature {
        name: "queue_depth_mean",
        unit: "requests",
        normalisation: Normalisation::Log { scale: 256.0 },
        description: "depth_sum delta / depth_samples delta, pooled over all queues",
    },
    Feature {
        name: "io_latency_p50",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "median request latency in the interval (histogram, interpolated), non-network queues",
    },
    Feature {
        name: "io_latency_p99",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "99th percentile request latency in the interval (histogram, interpolated), non-network queues",
    },
    Feature {
        name: "net_packet_rate",
        unit: "packets/s",
        normalisation: Normalisation::Log { scale: 1e7 },
        description: "completed requests per second, queues whose device starts with `net`",
    },
    Feature {
        name: "net_bytes_rate",
        unit: "bytes/s",
        normalisation: Normalisation::Log { scale: 1e10 },
        description: "bytes per second, queues whose device starts with `net`",
    },
    Feature {
        name: "memory_resident_fraction",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "resident_bytes / guest_bytes at the current snapshot",
    },
    Feature {
        name: "page_fault_rate",
        unit: "faults/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "host page faults of the monitor per second",
    },
    Feature {
        name: "dirty_page_rate",
        unit: "pages/s",
        normalisation: Normalisation::Log { scale: 1e7 },
        description: "guest pages dirtied per second (memory access pressure)",
    },
    Feature {
        name: "guest_ops_rate",
        unit: "ops/s",
        normalisation: Normalisation::Log { scale: 1e7 },
        description: "guest-reported operations per second",
    },
    Feature {
        name: "guest_latency_mean",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "guest-reported latency_ns_sum delta / latency_samples delta, in us",
    },
    Feature {
        name: "active_vcpus",
        unit: "vCPUs",
        normalisation: Normalisation::Linear {
            scale: MAX_VCPUS as f64,
        },
        description: "vCPUs the guest is asked to use (normalised by MAX_VCPUS)",
    },
    Feature {
        name: "host_cores",
        unit: "cores",
        normalisation: Normalisation::Linear {
            scale: MAX_HOST_CORES as f64,
        },
        description: "host cores the vCPU threads may run on (normalised by MAX_HOST_CORES)",
    },
    Feature {
        name: "drive0_request_rate",
        unit: "requests/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "requests completed on the queues of drive 0 (configuration order) / interval",
    },
    Feature {
        name: "drive0_rate_level",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 4.0 },
        description: "RATE_LADDER level in force on drive 0 (0 unlimited .. 4 tightest; nearest level for a limit set off the ladder; 0 without the drive)",
    },
    Feature {
        name: "drive0_priority",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "I/O priority of drive 0: 1 low, 2 medium, 3 high (0 without the drive)",
    },
    Feature {
        name: "drive1_request_rate",
        unit: "requests/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "requests completed on the queues of drive 1 (configuration order) / interval",
    },
    Feature {
        name: "drive1_rate_level",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 4.0 },
        description: "RATE_LADDER level in force on drive 1 (0 unlimited .. 4 tightest; nearest level for a limit set off the ladder; 0 without the drive)",
    },
    Feature {
        name: "drive1_priority",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "I/O priority of drive 1: 1 low, 2 medium, 3 high (0 without the drive)",
    },
    Feature {
        name: "drive2_request_rate",
        unit: "requests/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "requests completed on the queues of drive 2 (configuration order) / interval",
    },
    Feature {
        name: "drive2_rate_level",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 4.0 },
        description: "RATE_LADDER level in force on drive 2 (0 unlimited .. 4 tightest; nearest level for a limit set off the ladder; 0 without the drive)",
    },
    Feature {
        name: "drive2_priority",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "I/O priority of drive 2: 1 low, 2 medium, 3 high (0 without the drive)",
    },
    Feature {
        name: "drive3_request_rate",
        unit: "requests/s",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "requests completed on the queues of drive 3 (configuration order) / interval",
    },
    Feature {
        name: "drive3_rate_level",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 4.0 },
        description: "RATE_LADDER level in force on drive 3 (0 unlimited .. 4 tightest; nearest level for a limit set off the ladder; 0 without the drive)",
    },
    Feature {
        name: "drive3_priority",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "I/O priority of drive 3: 1 low, 2 medium, 3 high (0 without the drive)",
    },
    Feature {
        name: "net_qos_level",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "NET_QOS_LADDER level in force on the network devices (0 unlimited .. 3 tightest; 0 without a network device)",
    },
    Feature {
        name: "drive0_latency_p99",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "99th percentile of the per-request latency (available to used) on drive 0's queues in the interval (histogram, interpolated; 0 without requests or without the drive)",
    },
    Feature {
        name: "drive1_latency_p99",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "99th percentile of the per-request latency (available to used) on drive 1's queues in the interval (histogram, interpolated; 0 without requests or without the drive)",
    },
    Feature {
        name: "drive2_latency_p99",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "99th percentile of the per-request latency (available to used) on drive 2's queues in the interval (histogram, interpolated; 0 without requests or without the drive)",
    },
    Feature {
        name: "drive3_latency_p99",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "99th percentile of the per-request latency (available to used) on drive 3's queues in the interval (histogram, interpolated; 0 without requests or without the drive)",
    },
    Feature {
        name: "slo_class",
        unit: "level",
        normalisation: Normalisation::Linear { scale: 3.0 },
        description: "the VM's SLO class: 1 batch, 2 standard, 3 critical (0 without an SLO)",
    },
    Feature {
        name: "slo_met",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "1 when every SLO target was met in the interval (also without targets), else 0",
    },
    Feature {
        name: "slo_p99_target",
        unit: "us",
        normalisation: Normalisation::Log { scale: 1e6 },
        description: "the SLO's p99 request latency target (0 without one)",
    },
    Feature {
        name: "slo_p99_margin",
        unit: "share",
        normalisation: Normalisation::Signed { scale: 1.0 },
        description: "(target - p99 of the drives' requests) / target, capped to [-10, 10]; negative: missed (0 without the target)",
    },
    Feature {
        name: "slo_ops_target",
        unit: "ops/s",
        normalisation: Normalisation::Log { scale: 1e7 },
        description: "the SLO's minimum rate of guest operations (0 without one)",
    },
    Feature {
        name: "slo_ops_margin",
        unit: "share",
        normalisation: Normalisation::Signed { scale: 1.0 },
        description: "(ops rate - target) / target, capped to [-10, 10], ops = guest-reported operations, else the drives' requests; negative: missed (0 without the target)",
    },
    Feature {
        name: "vcpu_run_delay_share",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "sum over vCPU threads of the schedstat run delay delta / (interval_ns * vCPU threads): time runnable but waiting for a host CPU",
    },
    Feature {
        name: "vcpu_run_delay_max",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "largest schedstat run delay delta of one vCPU thread / interval_ns",
    },
    Feature {
        name: "host_load",
        unit: "fraction",
        normalisation: Normalisation::Clamp,
        description: "busy ticks delta / all ticks delta of the host CPUs the monitor may use (/proc/stat): the VM and its neighbours",
    },
];

/// Serialised form of one feature (for model cards).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Index in the vector.
    pub index: usize,
    /// Feature name.
    pub name: String,
    /// Unit of the raw value.
    pub unit: String,
    /// Normalisation.
    pub normalisation: Normalisation,
    /// How the raw value is computed.
    #[serde(default)]
    pub description: String,
}

/// Serialised form of the schema (for model cards).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemaSpec {
    /// Schema version.
    pub schema_version: u32,
    /// Features in vector order.
    pub features: Vec<FeatureSpec>,
}

/// Accessors for the performance vector schema (a namespace: the schema itself is the
/// constant [`FEATURES`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Schema;

impl Schema {
    /// The schema version ([`SCHEMA_VERSION`]).
    pub fn version() -> u32 {
        SCHEMA_VERSION
    }

    /// The features in vector order.
    pub fn features() -> &'static [Feature] {
        &FEATURES
    }

    /// Number of features (the vector's length).
    pub fn len() -> usize {
        FEATURES.len()
    }

    /// Index of the feature called `name`.
    pub fn index_of(name: &str) -> Option<usize> {
        FEATURES.iter().position(|f| f.name == name)
    }

    /// Normalises a raw vector (one value per feature, in units) into `[0, 1]`.
    pub fn normalise(raw: &[f64]) -> Result<Vec<f32>, SchemaError> {
        if raw.len() != FEATURES.len() {
            return Err(SchemaError::LengthMismatch {
                expected: FEATURES.len(),
                got: raw.len(),
            });
        }
        Ok(raw
            .iter()
            .zip(FEATURES.iter())
            .map(|(x, f)| f.normalisation.apply(*x))
            .collect())
    }

    /// A printable table of the schema: index, name, unit and normalisation.
    pub fn describe() -> String {
        let head = ("#", "name", "unit", "normalisation");
        let w_name = FEATURES
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(0)
            .max(head.1.len());
        let w_unit = FEATURES
            .iter()
            .map(|f| f.unit.len())
            .max()
            .unwrap_or(0)
            .max(head.2.len());
        let mut out = format!(
            "performance vector schema v{SCHEMA_VERSION} ({} features)\n",
            FEATURES.len()
        );
        out.push_str(&format!(
            "{:>2}  {:<w_name$}  {:<w_unit$}  {}\n",
            head.0, head.1, head.2, head.3
        ));
        for (i, f) in FEATURES.iter().enumerate() {
            out.push_str(&format!(
                "{:>2}  {:<w_name$}  {:<w_unit$}  {}\n",
                i,
                f.name,
                f.unit,
                f.normalisation.formula()
            ));
        }
        out
    }

    /// The schema as a serialisable value.
    pub fn spec() -> SchemaSpec {
        SchemaSpec {
            schema_version: SCHEMA_VERSION,
            features: FEATURES
                .iter()
                .enumerate()
                .map(|(index, f)| FeatureSpec {
                    index,
                    name: f.name.to_string(),
                    unit: f.unit.to_string(),
                    normalisation: f.normalisation,
                    description: f.description.to_string(),
                })
                .collect(),
        }
    }

    /// The schema as pretty-printed JSON, for model cards.
    pub fn to_json() -> String {
        // Serialising plain strings, integers and finite floats cannot fail; fall back to
        // an empty object rather than panic if it ever did.
        serde_json::to_string_pretty(&Self::spec()).unwrap_or_else(|e| {
            log::error!("serialising the schema failed: {e}");
            "{}".to_string()
        })
    }

    /// Checks that a schema description (as written by [`Schema::to_json`], e.g. in a
    /// model card) matches this build's schema: same version, same features in the same
    /// order with the same units and normalisations. Descriptions may differ.
    pub fn check_json(json: &str) -> Result<(), SchemaError> {
        let spec: SchemaSpec = serde_json::from_str(json)?;
        Self::check_spec(&spec)
    }

    /// Like [`Schema::check_json`], on an already parsed description.
    pub fn check_spec(spec: &SchemaSpec) -> Result<(), SchemaError> {
        if spec.schema_version != SCHEMA_VERSION {
            return Err(SchemaError::VersionMismatch {
                expected: SCHEMA_VERSION,
                got: spec.schema_version,
            });
        }
        if spec.features.len() != FEATURES.len() {
            return Err(SchemaError::LengthMismatch {
                expected: FEATURES.len(),
                got: spec.features.len(),
            });
        }
        for (index, (want, got)) in FEATURES.iter().zip(spec.features.iter()).enumerate() {
            if want.name != got.name
                || want.unit != got.unit
                || !want.normalisation.approx_eq(&got.normalisation)
            {
                return Err(SchemaError::FeatureMismatch {
                    index,
                    expected: format!("{} [{}] {:?}", want.name, want.unit, want.normalisation),
                    got: format!("{} [{}] {:?}", got.name, got.unit, got.normalisation),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_ids_match_the_table() {
        assert_eq!(FeatureId::ALL.len(), FEATURES.len());
        for (i, id) in FeatureId::ALL.iter().enumerate() {
            assert_eq!(id.index(), i);
        }
        assert_eq!(FeatureId::CpuUtilisation.feature().name, "cpu_utilisation");
        assert_eq!(FeatureId::HostCores.feature().name, "host_cores");
        assert_eq!(FeatureId::IoLatencyP99.feature().name, "io_latency_p99");
        assert_eq!(FeatureId::NetPacketRate.feature().name, "net_packet_rate");
        assert_eq!(
            Schema::index_of("guest_ops_rate"),
            Some(FeatureId::GuestOpsRate.index())
        );
        assert_eq!(Schema::index_of("nope"), None);
    }

    #[test]
    fn names_are_unique_identifiers() {
        let mut names: Vec<_> = FEATURES.iter().map(|f| f.name).collect();
        for n in &names {
            assert!(!n.is_empty());
            assert!(n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            assert!(n.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURES.len());
    }

    #[test]
    fn normalisations_map_into_unit_interval() {
        let lin = Normalisation::Linear { scale: 8.0 };
        assert_eq!(lin.apply(2.0), 0.25);
        assert_eq!(lin.apply(80.0), 1.0);
        assert_eq!(lin.apply(-1.0), 0.0);
        let log = Normalisation::Log { scale: 1e5 };
        assert_eq!(log.apply(0.0), 0.0);
        assert!((log.apply(1e5) - 1.0).abs() < 1e-6);
        let mid = log.apply(316.0);
        assert!(mid > 0.45 && mid < 0.55, "{mid}");
        assert_eq!(log.apply(1e12), 1.0);
        assert_eq!(Normalisation::Clamp.apply(0.3), 0.3);
        assert_eq!(Normalisation::Clamp.apply(3.0), 1.0);
        for n in [lin, log, Normalisation::Clamp] {
            assert_eq!(n.apply(-1.0), 0.0);
            assert_eq!(n.apply(f64::NAN), 0.0);
            assert_eq!(n.apply(f64::NEG_INFINITY), 0.0);
            assert_eq!(n.apply(f64::INFINITY), 1.0);
        }
        assert_eq!(Normalisation::Log { scale: 0.0 }.apply(5.0), 0.0);
        let signed = Normalisation::Signed { scale: 1.0 };
        assert_eq!(signed.apply(0.0), 0.5);
        assert_eq!(signed.apply(-0.5), 0.25);
        assert_eq!(signed.apply(0.5), 0.75);
        assert_eq!(signed.apply(-7.0), 0.0);
        assert_eq!(signed.apply(f64::NEG_INFINITY), 0.0);
        assert_eq!(signed.apply(f64::INFINITY), 1.0);
        assert_eq!(signed.apply(f64::NAN), 0.5);
        assert_eq!(Normalisation::Signed { scale: 0.0 }.apply(1.0), 0.5);
        assert_eq!(Normalisation::Linear { scale: 0.0 }.apply(5.0), 0.0);
    }

    #[test]
    fn normalise_checks_length() {
        let raw = vec![0.5; Schema::len()];
        let v = Schema::normalise(&raw).expect("right length");
        assert_eq!(v.len(), Schema::len());
        assert_eq!(v[FeatureId::CpuUtilisation.index()], 0.5);
        assert!(matches!(
            Schema::normalise(&raw[1..]),
            Err(SchemaError::LengthMismatch { got, .. }) if got == Schema::len() - 1
        ));
    }

    #[test]
    fn describe_lists_every_feature() {
        let table = Schema::describe();
        assert!(table.starts_with("performance vector schema v3 (49 features)"));
        assert_eq!(table.lines().count(), FEATURES.len() + 2);
        for f in &FEATURES {
            let line = table
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(f.name))
                .expect("feature row");
            assert!(line.contains(f.unit));
            assert!(line.contains(&f.normalisation.formula()));
        }
    }

    #[test]
    fn json_round_trips_and_validates() {
        let json = Schema::to_json();
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid json");
        assert_eq!(v["schema_version"], 3);
        assert_eq!(v["features"][0]["name"], "cpu_utilisation");
        assert_eq!(v["features"][2]["normalisation"]["kind"], "log");
        Schema::check_json(&json).expect("own schema is compatible");

        let mut spec = Schema::spec();
        spec.schema_version = 1;
        assert!(matches!(
            Schema::check_spec(&spec),
            Err(SchemaError::VersionMismatch { got: 1, .. })
        ));
        let mut spec = Schema::spec();
        spec.features.swap(0, 1);
        assert!(matches!(
            Schema::check_spec(&spec),
            Err(SchemaError::FeatureMismatch { index: 0, .. })
        ));
        let mut spec = Schema::spec();
        spec.features[3].normalisation = Normalisation::Log { scale: 1e3 };
        assert!(matches!(
            Schema::check_spec(&spec),
            Err(SchemaError::FeatureMismatch { index: 3, .. })
        ));
        let mut spec = Schema::spec();
        spec.features.pop();
        assert!(matches!(
            Schema::check_spec(&spec),
            Err(SchemaError::LengthMismatch { .. })
        ));
        assert!(matches!(
            Schema::check_json("{not json"),
            Err(SchemaError::Json(_))
        ));
    }
}
