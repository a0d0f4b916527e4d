//! Aggregates per scenario and policy, comparisons with confidence intervals, the
//! hindsight ceiling and the goal check.

use super::intervals::{RunMetrics, RunRecord};
use super::suite::{PolicyKind, StaticConfig, GOAL_IMPROVEMENT};
use crate::stats::{mean_ci, paired, welch, MeanCi, Paired, Welch};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A configuration's prediction and measurement on one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The configuration.
    pub config: StaticConfig,
    /// Predicted mean reward (calibration x the scenario's phase mix over its seeds).
    pub predicted: f64,
    /// Measured mean reward over the scenario's seeds (top candidates only).
    pub measured: Option<f64>,
}

/// Mean and interval of each figure of one policy on one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Scenario.
    pub scenario: String,
    /// Policy.
    pub policy: PolicyKind,
    /// The static configuration (best-static).
    pub config: Option<StaticConfig>,
    /// Runs with figures.
    pub runs: usize,
    /// Mean reward per run.
    pub reward: Option<MeanCi>,
    /// Throughput (guest ops/s).
    pub throughput: Option<MeanCi>,
    /// p99 io latency (us).
    pub p99_io_latency_us: Option<MeanCi>,
    /// Active vCPUs.
    pub active_vcpus: Option<MeanCi>,
    /// Drive allocation.
    pub drive_alloc: Option<MeanCi>,
    /// Cost term.
    pub cost: Option<MeanCi>,
}

/// Aggregates the runs of one scenario and policy.
pub fn aggregate(scenario: &str, policy: PolicyKind, runs: &[&RunRecord]) -> Aggregate {
    let ms: Vec<RunMetrics> = runs.iter().filter_map(|r| r.metrics).collect();
    let pick = |f: &dyn Fn(&RunMetrics) -> Option<f64>| {
        mean_ci(&ms.iter().filter_map(f).collect::<Vec<_>>())
    };
    Aggregate {
        scenario: scenario.to_string(),
        policy,
        config: runs.iter().find_map(|r| r.config),
        runs: ms.len(),
        reward: pick(&|m| Some(m.mean_reward)),
        throughput: pick(&|m| Some(m.throughput)),
        p99_io_latency_us: pick(&|m| m.p99_io_latency_us),
        active_vcpus: pick(&|m| Some(m.mean_active_vcpus)),
        drive_alloc: pick(&|m| Some(m.mean_drive_alloc)),
        cost: pick(&|m| Some(m.mean_cost)),
    }
}

/// The learned policy against a baseline on one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Scenario.
    pub scenario: String,
    /// The baseline (`best-static` or `threshold`).
    pub baseline: PolicyKind,
    /// (learned - baseline) in percent of |best-static mean|.
    pub improvement_pct: Option<f64>,
    /// Welch's t-test over the per-seed mean rewards.
    pub welch: Option<Welch>,
    /// Paired test over the seeds both ran (learned - baseline, seed by seed: the same
    /// workload schedule on both sides).
    #[serde(default)]
    pub paired: Option<Paired>,
}

/// Mean reward of each run by scenario, policy and seed (best-static: the chosen
/// configuration's runs), for paired comparisons.
pub type SeedRewards = BTreeMap<(String, PolicyKind, u64), f64>;

/// The goal check of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoalCheck {
    /// Scenario.
    pub scenario: String,
    /// `PASS`, `FAIL` or `N/A` (no learned policy or missing figures).
    pub verdict: String,
    /// Why.
    pub detail: String,
    /// The scenario's hindsight ceiling ([`hindsight_ceiling`]), when it has one.
    #[serde(default)]
    pub ceiling: Option<f64>,
    /// Whether the goal's target lies at or below the hindsight ceiling: `false` means no
    /// switching among the behaviours measured could have met it on these seeds.
    #[serde(default)]
    pub reachable: Option<bool>,
}

/// The hindsight ceiling of scenario `sc`: on each seed, the best reward that any run of
/// that seed (every policy and every static candidate) earned in each interval, averaged
/// over the intervals, then over the seeds. Runs of one seed share the phase schedule and
/// their intervals line up (the same 100 ms grid from the kernel's start), so this is
/// what a clairvoyant that switched, for free and at every interval, to whichever measured
/// behaviour did best there would have scored. No reactive policy reaches it, and noise
/// favours it (a maximum of several noisy values), so a goal above it is out of reach of
/// anything measured. `None` when a seed has fewer than two runs with figures.
pub fn hindsight_ceiling(runs: &[RunRecord], sc: &str) -> Option<f64> {
    let mut seeds: BTreeMap<u64, Vec<&RunRecord>> = BTreeMap::new();
    for r in runs
        .iter()
        .filter(|r| r.scenario == sc && r.metrics.is_some())
    {
        seeds.entry(r.seed).or_default().push(r);
    }
    let mut per_seed = Vec::new();
    for rs in seeds.values() {
        if rs.len() < 2 {
            return None;
        }
        let n = rs.iter().map(|r| r.intervals.len()).min().unwrap_or(0);
        let best: Vec<f64> = (0..n)
            .filter_map(|i| {
                rs.iter()
                    .filter_map(|r| r.intervals[i].reward)
                    .filter(|v| v.is_finite())
                    .max_by(f64::total_cmp)
            })
            .collect();
        if best.is_empty() {
            return None;
        }
        per_seed.push(best.iter().sum::<f64>() / best.len() as f64);
    }
    (!per_seed.is_empty()).then(|| per_seed.iter().sum::<f64>() / per_seed.len() as f64)
}

/// The goal's target on a scenario whose best static configuration scores `best_static`:
/// 15% of its magnitude above it.
pub fn goal_target(best_static: f64) -> f64 {
    best_static + GOAL_IMPROVEMENT * best_static.abs()
}

/// Compares learned against best-static and threshold on one scenario, and checks the
/// goal: learned >= best-static + 15% of |best-static| and above threshold.
pub fn compare(
    scenario: &str,
    aggs: &[Aggregate],
    per_seed: &SeedRewards,
    ceiling: Option<f64>,
) -> (Vec<Comparison>, GoalCheck) {
    let get = |p: PolicyKind| {
        aggs.iter()
            .find(|a| a.scenario == scenario && a.policy == p)
            .and_then(|a| a.reward)
    };
    let learned = get(PolicyKind::Learned);
    let best = get(PolicyKind::BestStatic);
    let thr = get(PolicyKind::Threshold);
    let mut comps = Vec::new();
    for (kind, base) in [(PolicyKind::BestStatic, best), (PolicyKind::Threshold, thr)] {
        let improvement_pct = match (learned, base, best) {
            (Some(l), Some(b), Some(bs)) if bs.mean != 0.0 => {
                Some((l.mean - b.mean) / bs.mean.abs() * 100.0)
            }
            _ => None,
        };
        comps.push(Comparison {
            scenario: scenario.to_string(),
            baseline: kind,
            improvement_pct,
            welch: match (learned, base) {
                (Some(l), Some(b)) => welch(&l, &b),
                _ => None,
            },
            paired: paired(&seed_differences(
                scenario,
                PolicyKind::Learned,
                kind,
                per_seed,
            )),
        });
    }
    let goal = match (learned, best, thr) {
        (None, _, _) => GoalCheck {
            scenario: scenario.to_string(),
            verdict: "N/A".into(),
            detail: "no learned policy was run".into(),
            ceiling,
            reachable: None,
        },
        (Some(l), Some(b), Some(t)) => {
            let target = goal_target(b.mean);
            let pass = l.mean >= target && l.mean > t.mean;
            let reachable = ceiling.map(|c| target <= c);
            let room = match ceiling {
                Some(c) if b.mean != 0.0 => format!(
                    "; hindsight ceiling {c:.4} ({:+.1}%): the target is {}",
                    (c - b.mean) / b.mean.abs() * 100.0,
                    if target <= c {
                        "below it"
                    } else {
                        "above it, out of reach of every behaviour measured"
                    }
                ),
                _ => String::new(),
            };
            GoalCheck {
                scenario: scenario.to_string(),
                verdict: if pass { "PASS" } else { "FAIL" }.into(),
                detail: format!(
                    "learned {:.4} vs target {:.4} (best-static {:.4} + 15% of its magnitude) and threshold {:.4}{room}",
                    l.mean, target, b.mean, t.mean
                ),
                ceiling,
                reachable,
            }
        }
        _ => GoalCheck {
            scenario: scenario.to_string(),
            verdict: "N/A".into(),
            detail: "best-static or threshold has no figures".into(),
            ceiling,
            reachable: None,
        },
    };
    (comps, goal)
}

/// `a - b` on every seed of `scenario` that both policies have a reward for.
pub(super) fn seed_differences(
    scenario: &str,
    a: PolicyKind,
    b: PolicyKind,
    per_seed: &SeedRewards,
) -> Vec<f64> {
    per_seed
        .iter()
        .filter(|((sc, p, _), _)| sc == scenario && *p == a)
        .filter_map(|((_, _, seed), ra)| {
            per_seed
                .get(&(scenario.to_string(), b, *seed))
                .map(|rb| ra - rb)
        })
        .collect()
}
