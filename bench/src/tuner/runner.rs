//! The whole benchmark: its settings and report, the runs over scenarios, policies and
//! seeds, and the analysis of a finished (or reloaded) run.

use super::calibration::{phase_mixes, predict, Calibration};
use super::compare::{
    aggregate, compare, hindsight_ceiling, Aggregate, Candidate, Comparison, GoalCheck, SeedRewards,
};
use super::intervals::{reward_per_kind, RunRecord};
use super::jobs::{ensure_image, learn_bin, loadavg, policy_flags, run_job, Job};
use super::suite::{PolicyKind, StaticConfig, DRIVE_MIB};
use super::{plot, report};
use crate::error::BenchError;
use crate::report::Meta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of the benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunerSettings {
    /// The vmm binary.
    pub vmm: PathBuf,
    /// The `phased` kernel.
    pub kernel: PathBuf,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Scenarios to run.
    pub scenarios: Vec<String>,
    /// Seeds 1..=seeds.
    pub seeds: u64,
    /// `phase_ms=` of the scenarios.
    pub phase_ms: u64,
    /// `phases=` of the scenarios.
    pub phases: u64,
    /// Length of each phase of the calibration schedule (ms).
    pub calib_ms: u64,
    /// The static configurations of the sweep.
    pub sweep: Vec<StaticConfig>,
    /// Top predicted configurations re-run on every seed.
    pub top_k: usize,
    /// The learned policy's model (skipped when the file is missing).
    pub policy: PathBuf,
    /// Whether this was `--quick`.
    pub quick: bool,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunerReport {
    /// When and where.
    pub meta: Meta,
    /// The settings.
    pub settings: TunerSettings,
    /// Load average (1, 5, 15 min) before and after.
    pub loadavg_before: Option<[f64; 3]>,
    /// Load average after the runs.
    pub loadavg_after: Option<[f64; 3]>,
    /// Notes (skipped arms and why).
    pub notes: Vec<String>,
    /// The calibration sweep.
    pub calibration: Vec<Calibration>,
    /// Per scenario: candidates by predicted reward (best first), measured for the top.
    pub candidates: BTreeMap<String, Vec<Candidate>>,
    /// Per scenario: the chosen best static configuration.
    pub chosen: BTreeMap<String, StaticConfig>,
    /// Every run of the scenarios (the static candidates' included).
    pub runs: Vec<RunRecord>,
    /// Per scenario and policy.
    pub aggregates: Vec<Aggregate>,
    /// Learned against the baselines.
    pub comparisons: Vec<Comparison>,
    /// The goal check per scenario.
    pub goal: Vec<GoalCheck>,
    /// Total wall time in seconds.
    pub total_s: f64,
    /// Wall time of the calibration sweep in seconds.
    pub calibration_s: f64,
    /// Estimated wall time of a full run (default settings) in seconds, from this run's
    /// per-run times.
    pub full_run_estimate_s: f64,
    /// The plots (relative to the output directory).
    pub plots: Vec<String>,
}

/// Progress and the estimated time left, on stderr.
pub(super) struct Progress {
    start: Instant,
    done: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, what: &str, rec: &RunRecord) {
        self.done += 1;
        let el = self.start.elapsed().as_secs_f64();
        let left = el / self.done as f64 * (self.total.saturating_sub(self.done)) as f64;
        let figure = match (&rec.metrics, &rec.error) {
            (Some(m), None) => format!("reward {:.4}", m.mean_reward),
            (Some(m), Some(e)) => format!("reward {:.4} ({e})", m.mean_reward),
            (None, Some(e)) => format!("FAILED: {e}"),
            (None, None) => "no figures".into(),
        };
        eprintln!(
            "[{}/{}] {what}: {figure} ({:.1} s; ~{:.0} s left)",
            self.done, self.total, rec.wall_s, left
        );
    }
}

/// Estimated wall time of a run of the default suite (150 configurations, 4 scenarios,
/// 5 seeds), from measured seconds per second of schedule plus a fixed overhead.
pub fn estimate_full_s(
    overhead_s: f64,
    arms: usize,
    top_k: usize,
    calib_ms: u64,
    sched_ms: f64,
) -> f64 {
    let calib = 150.0 * (3.0 * calib_ms as f64 / 1e3 + overhead_s);
    let runs = 4.0 * 5.0 * (arms + top_k) as f64;
    calib + runs * (sched_ms / 1e3 + overhead_s)
}

/// Runs the benchmark and writes `results.json`, `report.md` and the plots.
pub fn run(s: &TunerSettings) -> Result<TunerReport, BenchError> {
    let t_start = Instant::now();
    let meta = Meta::now("tuner");
    let loadavg_before = loadavg();
    std::fs::create_dir_all(&s.out_dir)
        .map_err(|e| BenchError::io(format!("creating {}", s.out_dir.display()), e))?;
    let tmp = std::env::temp_dir().join(format!("vmm-bench-tuner-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)
        .map_err(|e| BenchError::io(format!("creating {}", tmp.display()), e))?;
    let drives = [tmp.join("blk0.img"), tmp.join("blk1.img")];
    for d in &drives {
        ensure_image(d, DRIVE_MIB)?;
    }

    let mut notes = Vec::new();
    let mut arms = vec![PolicyKind::Threshold, PolicyKind::Random];
    if s.policy.is_file() {
        arms.push(PolicyKind::Learned);
    } else {
        notes.push(format!(
            "learned: skipped, {} does not exist (train it with `vmm-learn train`)",
            s.policy.display()
        ));
    }
    if learn_bin(&s.vmm).is_some() {
        arms.push(PolicyKind::Online);
    } else {
        notes.push(
            "online: not available (no vmm-learn beside the vmm binary: cargo build --release -p learner)"
                .into(),
        );
    }
    for n in &notes {
        eprintln!("vmm-bench tuner: {n}");
    }
    let sched_ms = s.phase_ms * s.phases;
    let total = s.sweep.len() + s.scenarios.len() * s.seeds as usize * (arms.len() + s.top_k);
    let mut progress = Progress {
        start: Instant::now(),
        done: 0,
        total,
    };

    // 1. Calibration: every static configuration once on one phase of each kind.
    let calib_cmdline = format!("schedule=cpu:{0},io:{0},idle:{0} seed=1", s.calib_ms);
    let mut calibration = Vec::new();
    let t_calib = Instant::now();
    for c in &s.sweep {
        let job = Job {
            name: format!("calib-{}", c.slug()),
            scenario: "calibration".into(),
            seed: 1,
            policy: PolicyKind::BestStatic,
            config: Some(*c),
            cmdline: calib_cmdline.clone(),
            planned_ms: 3 * s.calib_ms,
            extra: policy_flags(PolicyKind::BestStatic, &s.policy),
            start: *c,
            settings: s,
            drives: &drives,
            tmp: &tmp,
        };
        let rec = run_job(&job)?;
        progress.step(&format!("calibration {}", c.label()), &rec);
        calibration.push(Calibration {
            config: *c,
            per_kind: reward_per_kind(&rec.intervals),
            wall_s: rec.wall_s,
            error: rec.error.clone(),
        });
    }
    let calibration_s = t_calib.elapsed().as_secs_f64();

    // 2. The adaptive arms on every scenario and seed (their phase lines give the mix).
    let mut runs: Vec<RunRecord> = Vec::new();
    for sc in &s.scenarios {
        for seed in 1..=s.seeds {
            for &p in &arms {
                let job = Job {
                    name: format!("{sc}-s{seed}-{}", p.name()),
                    scenario: sc.clone(),
                    seed,
                    policy: p,
                    config: None,
                    cmdline: scenario_cmdline(sc, seed, s),
                    planned_ms: sched_ms,
                    extra: policy_flags(p, &s.policy),
                    start: StaticConfig::DEFAULT,
                    settings: s,
                    drives: &drives,
                    tmp: &tmp,
                };
                let rec = run_job(&job)?;
                progress.step(&job.name, &rec);
                runs.push(rec);
            }
        }
    }

    // 3. Predict each scenario's mean reward per configuration; run the top k.
    let mut candidates = BTreeMap::new();
    let mut chosen = BTreeMap::new();
    for sc in &s.scenarios {
        let mixes = phase_mixes(&runs, sc);
        let mut cands: Vec<Candidate> = calibration
            .iter()
            .filter_map(|c| {
                let preds: Vec<f64> = mixes
                    .iter()
                    .filter_map(|m| predict(&c.per_kind, m))
                    .collect();
                (!preds.is_empty() && preds.len() == mixes.len()).then(|| Candidate {
                    config: c.config,
                    predicted: preds.iter().sum::<f64>() / preds.len() as f64,
                    measured: None,
                })
            })
            .collect();
        cands.sort_by(|a, b| b.predicted.total_cmp(&a.predicted));
        if cands.is_empty() {
            // No prediction possible (no phase lines or no calibration): fall back to the
            // monitor's default configuration so best-static still has figures.
            notes.push(format!(
                "{sc}: no prediction from the sweep; best-static is the default configuration"
            ));
            cands.push(Candidate {
                config: StaticConfig::DEFAULT,
                predicted: f64::NAN,
                measured: None,
            });
        }
        for cand in cands.iter_mut().take(s.top_k) {
            let c = cand.config;
            let mut measured = Vec::new();
            for seed in 1..=s.seeds {
                let job = Job {
                    name: format!("{sc}-s{seed}-static-{}", c.slug()),
                    scenario: sc.clone(),
                    seed,
                    policy: PolicyKind::BestStatic,
                    config: Some(c),
                    cmdline: scenario_cmdline(sc, seed, s),
                    planned_ms: sched_ms,
                    extra: policy_flags(PolicyKind::BestStatic, &s.policy),
                    start: c,
                    settings: s,
                    drives: &drives,
                    tmp: &tmp,
                };
                let rec = run_job(&job)?;
                progress.step(&job.name, &rec);
                if let Some(m) = rec.metrics {
                    measured.push(m.mean_reward);
                }
                runs.push(rec);
            }
            cand.measured = (!measured.is_empty())
                .then(|| measured.iter().sum::<f64>() / measured.len() as f64);
        }
        let best = cands
            .iter()
            .filter(|c| c.measured.is_some())
            .max_by(|a, b| {
                a.measured
                    .unwrap_or(f64::MIN)
                    .total_cmp(&b.measured.unwrap_or(f64::MIN))
            })
            .map(|c| c.config);
        if let Some(b) = best {
            chosen.insert(sc.clone(), b);
        }
        candidates.insert(sc.clone(), cands);
    }
    // Only the chosen configuration's runs are `best-static`; the other candidates stay
    // in results.json as `static` runs of their configuration.
    let _ = std::fs::remove_dir_all(&tmp);

    let (aggregates, comparisons, goal) = analyse(&s.scenarios, &runs, &chosen, &arms);
    let overhead = overhead_s(&runs, &calibration, s.calib_ms);
    let full_arms = 2 + 1 + 1; // threshold, random, learned, online
    let mut rep = TunerReport {
        meta,
        settings: s.clone(),
        loadavg_before,
        loadavg_after: loadavg(),
        notes,
        calibration,
        candidates,
        chosen,
        runs,
        aggregates,
        comparisons,
        goal,
        total_s: t_start.elapsed().as_secs_f64(),
        calibration_s,
        full_run_estimate_s: estimate_full_s(
            overhead,
            full_arms,
            DEFAULT_TOP_K,
            DEFAULT_CALIB_MS,
            (DEFAULT_PHASE_MS * DEFAULT_PHASES) as f64,
        ),
        plots: Vec::new(),
    };
    rep.plots = plot::write_all(&rep, &s.out_dir)
        .map_err(|e| BenchError::Unexpected(format!("plots: {e}")))?;
    report::write(&rep, &s.out_dir)?;
    Ok(rep)
}

/// Re-reads `results.json` in `dir` and recomputes, with this build's analysis, the
/// aggregates, comparisons, goal checks, plots and `report.md` from the runs it holds
/// (the runs, sweep and chosen configurations are kept as they were), so a report can
/// gain a new figure without running the VMs again. Rewrites `results.json` too.
pub fn reanalyse(dir: &Path) -> Result<TunerReport, BenchError> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::io(format!("reading {}", path.display()), e))?;
    let mut rep: TunerReport = serde_json::from_str(&text).map_err(|e| {
        BenchError::Unexpected(format!(
            "{}: not the results.json of `vmm-bench tuner`: {e}",
            path.display()
        ))
    })?;
    let arms: Vec<PolicyKind> = PolicyKind::ALL
        .into_iter()
        .filter(|p| *p != PolicyKind::BestStatic && rep.runs.iter().any(|r| r.policy == *p))
        .collect();
    let (aggregates, comparisons, goal) =
        analyse(&rep.settings.scenarios, &rep.runs, &rep.chosen, &arms);
    rep.aggregates = aggregates;
    rep.comparisons = comparisons;
    rep.goal = goal;
    rep.plots =
        plot::write_all(&rep, dir).map_err(|e| BenchError::Unexpected(format!("plots: {e}")))?;
    report::write(&rep, dir)?;
    Ok(rep)
}

/// Default `phase_ms=` of the suite's scenarios.
pub const DEFAULT_PHASE_MS: u64 = 1500;
/// Default `phases=` of the suite's scenarios.
pub const DEFAULT_PHASES: u64 = 6;
/// Default length of each calibration phase (ms).
pub const DEFAULT_CALIB_MS: u64 = 1000;
/// Default number of predicted configurations re-run on every seed.
pub const DEFAULT_TOP_K: usize = 3;

pub(super) fn scenario_cmdline(sc: &str, seed: u64, s: &TunerSettings) -> String {
    format!(
        "scenario={sc} seed={seed} phase_ms={} phases={}",
        s.phase_ms, s.phases
    )
}

/// Mean seconds a run takes beyond its schedule (boot, start-up, shut-down).
pub(super) fn overhead_s(runs: &[RunRecord], calibration: &[Calibration], calib_ms: u64) -> f64 {
    let mut extra: Vec<f64> = runs
        .iter()
        .filter(|r| r.wall_s > 0.0)
        .filter_map(|r| {
            let planned: u64 = r.kernel.phases.iter().map(|p| p.ms).sum();
            (planned > 0).then(|| r.wall_s - planned as f64 / 1e3)
        })
        .collect();
    extra.extend(
        calibration
            .iter()
            .filter(|c| c.wall_s > 0.0)
            .map(|c| c.wall_s - 3.0 * calib_ms as f64 / 1e3),
    );
    if extra.is_empty() {
        0.5
    } else {
        (extra.iter().sum::<f64>() / extra.len() as f64).max(0.0)
    }
}

/// Aggregates, comparisons and goal checks of the runs.
pub fn analyse(
    scenarios: &[String],
    runs: &[RunRecord],
    chosen: &BTreeMap<String, StaticConfig>,
    arms: &[PolicyKind],
) -> (Vec<Aggregate>, Vec<Comparison>, Vec<GoalCheck>) {
    let mut aggregates = Vec::new();
    let mut comparisons = Vec::new();
    let mut goal = Vec::new();
    let mut per_seed = SeedRewards::new();
    for sc in scenarios {
        for p in PolicyKind::ALL {
            let mine: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| &r.scenario == sc && r.policy == p)
                .filter(|r| p != PolicyKind::BestStatic || r.config == chosen.get(sc).copied())
                .collect();
            if p != PolicyKind::BestStatic && !arms.contains(&p) {
                continue;
            }
            for r in &mine {
                if let Some(m) = r.metrics {
                    per_seed.insert((sc.clone(), p, r.seed), m.mean_reward);
                }
            }
            aggregates.push(aggregate(sc, p, &mine));
        }
        let (c, g) = compare(sc, &aggregates, &per_seed, hindsight_ceiling(runs, sc));
        comparisons.extend(c);
        goal.push(g);
    }
    (aggregates, comparisons, goal)
}
