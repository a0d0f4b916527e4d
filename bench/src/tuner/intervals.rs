//! Per-interval records of a run, read back from its state repository rows, and the
//! run's metrics (reward, latency, throughput).

use super::phases::{phase_at, KernelOutput, PhaseSpan};
use super::suite::{drive_alloc, PolicyKind, StaticConfig, VCPUS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tuner::actions::RATE_LADDER;
use tuner::schema::FeatureId;
use tuner::state_repo::Row;

/// One sampling interval of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Middle of the interval, ms since the first interval began (about the kernel's 0).
    pub t_ms: f64,
    /// Reward of this interval (stored in the previous row).
    pub reward: Option<f64>,
    /// Guest ops per second.
    pub ops_rate: f64,
    /// Guest mean operation latency in us (0: no samples).
    pub latency_us: f64,
    /// vCPUs the guest was asked to use.
    pub active_vcpus: f64,
    /// Rate level of each drive in force during the interval (reconstructed from the
    /// static configuration and the actions applied before it).
    pub levels: [usize; 2],
    /// The action chosen after this interval (the row's `action`).
    pub action: Option<String>,
    /// The phase kind the interval's middle falls in.
    pub phase: Option<String>,
}

/// Per-run figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Mean of the rows' `reward` column.
    pub mean_reward: f64,
    /// Mean guest ops per second over the run.
    pub throughput: f64,
    /// p99 of per-interval guest_latency_mean (us) over io intervals with samples.
    pub p99_io_latency_us: Option<f64>,
    /// Mean active vCPUs.
    pub mean_active_vcpus: f64,
    /// Mean drive allocation (1 unlimited .. 0 tightest).
    pub mean_drive_alloc: f64,
    /// Mean cost term: `0.5 * vcpus / 2 + 0.5 * drive allocation`.
    pub mean_cost: f64,
    /// Rows with a reward.
    pub rewarded_rows: usize,
}

/// One `vmm` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Scenario (`calibration` for the sweep).
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Policy.
    pub policy: PolicyKind,
    /// The static configuration of a static run.
    pub config: Option<StaticConfig>,
    /// The kernel command line.
    pub cmdline: String,
    /// Wall time of the `vmm` process in seconds.
    pub wall_s: f64,
    /// Exit status of `vmm`.
    pub exit_code: Option<i32>,
    /// Why the run gave no figures, if it did not.
    pub error: Option<String>,
    /// The serial log (relative to the output directory).
    pub serial_log: Option<String>,
    /// The kernel's lines.
    pub kernel: KernelOutput,
    /// The intervals.
    pub intervals: Vec<Interval>,
    /// The figures (`None` when the run failed).
    pub metrics: Option<RunMetrics>,
}

/// The intervals of a run from its state-repository rows, under `start` (the static
/// configuration the run began with).
pub fn intervals_from_rows(
    rows: &[Row],
    start: &StaticConfig,
    phases: &[PhaseSpan],
) -> Vec<Interval> {
    let idx = |f: FeatureId| f.index();
    let Some(first) = rows.first() else {
        return Vec::new();
    };
    let t0 = first.ts_ns.saturating_sub(first.interval_ns);
    let mut levels = start.levels;
    let mut prev_reward = None;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let raw = |f: FeatureId| r.raw.get(idx(f)).copied().filter(|v| v.is_finite());
        let t_ms = (r.ts_ns.saturating_sub(t0) as f64 - r.interval_ns as f64 / 2.0) / 1e6;
        if let Some(in_force) = levels_in_force(&raw) {
            levels = in_force;
        }
        out.push(Interval {
            t_ms,
            reward: prev_reward,
            ops_rate: raw(FeatureId::GuestOpsRate).unwrap_or(0.0),
            latency_us: raw(FeatureId::GuestLatencyMean).unwrap_or(0.0),
            active_vcpus: raw(FeatureId::ActiveVcpus).unwrap_or(0.0),
            levels,
            action: r.action.clone(),
            phase: phase_at(phases, t_ms).map(|p| p.kind.clone()),
        });
        prev_reward = r.reward;
        if let Some(a) = &r.action {
            apply_label(a, &mut levels, &start.levels);
        }
    }
    out
}

/// The drives' rate levels a row's vector reports (schema v2 carries the knobs in force,
/// so a policy's start configuration, set before the first interval, shows too); `None`
/// when a row lacks them.
pub(super) fn levels_in_force(raw: &dyn Fn(FeatureId) -> Option<f64>) -> Option<[usize; 2]> {
    let level =
        |f: FeatureId| raw(f).map(|v| (v.round().max(0.0) as usize).min(RATE_LADDER.len() - 1));
    Some([
        level(FeatureId::Drive0RateLevel)?,
        level(FeatureId::Drive1RateLevel)?,
    ])
}

/// Updates drive rate levels for a stored action label (`rl:blk1:3`,
/// `rollback:rl:blk0:0`, `static`; refusals and other knobs change nothing).
pub fn apply_label(label: &str, levels: &mut [usize; 2], static_levels: &[usize; 2]) {
    if label == "static" {
        *levels = *static_levels;
        return;
    }
    let name = label.strip_prefix("rollback:").unwrap_or(label);
    let parts: Vec<&str> = name.split(':').collect();
    if let ["rl", dev, level] = parts.as_slice() {
        let d = dev
            .strip_prefix("blk")
            .and_then(|d| d.parse::<usize>().ok());
        if let (Some(d), Ok(l)) = (d, level.parse::<usize>()) {
            if let Some(slot) = levels.get_mut(d) {
                *slot = l.min(RATE_LADDER.len() - 1);
            }
        }
    }
}

/// The 99th percentile (linear interpolation) of `xs`, `None` if empty.
pub fn p99(xs: &[f64]) -> Option<f64> {
    crate::stats::summarize(xs).map(|_| {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let pos = 0.99 * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
    })
}

/// The figures of a run: `rewards` is the rows' reward column.
pub fn metrics(rewards: &[f64], intervals: &[Interval]) -> Option<RunMetrics> {
    if intervals.is_empty() || rewards.is_empty() {
        return None;
    }
    let n = intervals.len() as f64;
    let mean = |f: &dyn Fn(&Interval) -> f64| intervals.iter().map(f).sum::<f64>() / n;
    let io_lat: Vec<f64> = intervals
        .iter()
        .filter(|i| i.phase.as_deref() == Some("io") && i.latency_us > 0.0)
        .map(|i| i.latency_us)
        .collect();
    let mean_active_vcpus = mean(&|i| i.active_vcpus);
    let mean_drive_alloc = mean(&|i| drive_alloc(&i.levels));
    Some(RunMetrics {
        mean_reward: rewards.iter().sum::<f64>() / rewards.len() as f64,
        throughput: mean(&|i| i.ops_rate),
        p99_io_latency_us: p99(&io_lat),
        mean_active_vcpus,
        mean_drive_alloc,
        mean_cost: mean(&|i| {
            0.5 * (i.active_vcpus / f64::from(VCPUS)).clamp(0.0, 1.0) + 0.5 * drive_alloc(&i.levels)
        }),
        rewarded_rows: rewards.len(),
    })
}

/// Mean reward per phase kind of a calibration run, leaving out each phase's first
/// interval (the change-over).
pub fn reward_per_kind(intervals: &[Interval]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut prev_phase: Option<&str> = None;
    for i in intervals {
        let phase = i.phase.as_deref();
        let first_of_phase = phase != prev_phase;
        prev_phase = phase;
        if first_of_phase {
            continue;
        }
        if let (Some(k), Some(r)) = (phase, i.reward) {
            let e = sums.entry(k.to_string()).or_insert((0.0, 0));
            e.0 += r;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}
