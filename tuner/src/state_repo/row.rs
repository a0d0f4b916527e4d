//! What the repository stores: one interval of one VM ([`Row`]), an [`Event`], and their
//! storage metadata, with the vector encoding shared by every backend.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::agent::Sample;
use crate::schema::SCHEMA_VERSION;
use crate::slo::{SloClass, SloReport, SloTarget};

use super::RepoError;

/// Well-known event kinds for [`Event::kind`].
pub mod event_kind {
    /// A policy could not be loaded or failed validation.
    pub const POLICY_LOAD_FAILURE: &str = "policy_load_failure";
    /// The configuration manager refused an action (bounds, cooldown, ...).
    pub const REFUSAL: &str = "refusal";
    /// An action was rolled back because the reward fell below the baseline.
    pub const ROLLBACK: &str = "rollback";
    /// The tuner fell back to the static configuration.
    pub const FALLBACK: &str = "fallback";
    /// The knobs were set to the policy's start configuration before the first interval.
    pub const POLICY_START: &str = "policy_start";
}

/// One interval of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The VM.
    pub vm_id: String,
    /// The sample's time (monotonic nanoseconds; stored as i64, clamped).
    pub ts_ns: u64,
    /// Length of the interval in nanoseconds.
    pub interval_ns: u64,
    /// Schema version of `vector` and `raw`.
    pub schema_version: u32,
    /// Normalised vector.
    pub vector: Vec<f32>,
    /// Raw values in the schema's units.
    pub raw: Vec<f64>,
    /// Action taken after this interval.
    pub action: Option<String>,
    /// Reward observed for the action.
    pub reward: Option<f64>,
    /// Policy in charge.
    pub policy_id: String,
    /// The VM's configuration, JSON text.
    pub config: String,
    /// Anomaly flag; `None` on insert lets the writer's detector decide.
    pub anomaly: Option<bool>,
    /// Anomaly score; filled together with `anomaly`.
    pub anomaly_score: Option<f64>,
    /// The interval's SLO attainment (`None` without an SLO).
    pub slo: Option<SloColumns>,
}

/// A row's SLO attainment, as stored in its `slo_*` columns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SloColumns {
    /// The VM's class.
    pub class: SloClass,
    /// Every target met.
    pub met: bool,
    /// Signed margin of the p99 latency target, if set.
    pub p99_margin: Option<f64>,
    /// Signed margin of the operation rate target, if set.
    pub ops_margin: Option<f64>,
}

impl SloColumns {
    /// The columns of an interval's report.
    pub fn of(report: &SloReport) -> SloColumns {
        SloColumns {
            class: report.class,
            met: report.met(),
            p99_margin: report.target(SloTarget::P99Us).map(|t| t.margin),
            ops_margin: report.target(SloTarget::MinOps).map(|t| t.margin),
        }
    }
}

impl Row {
    /// A row for `sample` with no action, reward or anomaly verdict yet.
    pub fn from_sample(vm_id: &str, sample: &Sample, policy_id: &str, config: &str) -> Row {
        Row {
            vm_id: vm_id.to_string(),
            ts_ns: sample.at_ns,
            interval_ns: sample.interval_ns,
            schema_version: SCHEMA_VERSION,
            vector: sample.vector.clone(),
            raw: sample.raw.clone(),
            action: None,
            reward: None,
            policy_id: policy_id.to_string(),
            config: config.to_string(),
            anomaly: None,
            anomaly_score: None,
            slo: sample.slo.as_ref().map(SloColumns::of),
        }
    }
}

/// Something worth remembering that is not an interval: a policy load failure, a refused
/// action, a rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Time (same clock as [`Row::ts_ns`]).
    pub ts_ns: u64,
    /// The VM.
    pub vm_id: String,
    /// Kind, e.g. one of [`event_kind`].
    pub kind: String,
    /// Free-form detail.
    pub detail: String,
}

/// A stored row with its storage metadata (exports and copies between backends).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// Insertion order within its repository.
    pub id: i64,
    /// Unix time (ns) when the writer received the row.
    pub wall_ns: i64,
    /// The row.
    pub row: Row,
}

/// A stored event with the Unix time (ns) its writer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Unix time (ns) when the writer received the event.
    pub wall_ns: i64,
    /// The event.
    pub event: Event,
}

/// Which rows a read returns. Every field narrows; the default is every row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowFilter {
    /// Only this VM's rows.
    pub vm_id: Option<String>,
    /// Only the rows written by this host (PostgreSQL; a SQLite file is one host's and has
    /// no host column, so a host filter there is an error).
    pub host_id: Option<String>,
    /// Only VMs whose id starts with this scenario label (benchmarks and tests name their
    /// VMs `<scenario>-<n>`, e.g. `phased-3`).
    pub scenario: Option<String>,
    /// Only rows with `ts_ns >= since_ns`.
    pub since_ns: u64,
    /// Only rows received at or after this Unix time (ns).
    pub from_wall_ns: Option<i64>,
    /// Only rows received before this Unix time (ns).
    pub to_wall_ns: Option<i64>,
}

impl RowFilter {
    /// The rows of one VM (or of all with `None`) from `since_ns` on.
    pub fn vm(vm_id: Option<&str>, since_ns: u64) -> RowFilter {
        RowFilter {
            vm_id: vm_id.map(str::to_string),
            since_ns,
            ..RowFilter::default()
        }
    }
}

/// `u64` -> `i64`, clamped (the databases store signed 64-bit integers).
pub(crate) fn to_i64(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// `i64` -> `u64`, negatives as 0.
pub(crate) fn to_u64(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

/// Unix time now, in nanoseconds.
pub(crate) fn wall_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Encodes a vector as little-endian `f32`s.
pub fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes little-endian `f32`s.
pub fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>, RepoError> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return Err(RepoError::CorruptVector(bytes.len()));
    }
    Ok(chunks
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The raw values' JSON text as stored (`null` for a non-finite value).
pub(crate) fn raw_json(raw: &[f64]) -> Result<String, RepoError> {
    Ok(serde_json::to_string(raw)?)
}

/// Raw values back from their JSON text (`null` read as 0).
pub(crate) fn raw_from_json(text: &str) -> Result<Vec<f64>, RepoError> {
    let raw: Vec<Option<f64>> = serde_json::from_str(text)?;
    Ok(raw.into_iter().map(|x| x.unwrap_or(0.0)).collect())
}

/// An SLO class read back; an unknown name reads as no SLO.
pub(crate) fn slo_columns(
    class: Option<String>,
    met: Option<bool>,
    p99_margin: Option<f64>,
    ops_margin: Option<f64>,
) -> Option<SloColumns> {
    let class = class.and_then(|c| SloClass::parse(&c).ok())?;
    Some(SloColumns {
        class,
        met: met.unwrap_or(false),
        p99_margin,
        ops_margin,
    })
}
