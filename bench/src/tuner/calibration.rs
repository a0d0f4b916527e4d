//! Calibration: the reward each static configuration earns per kind of phase, and the
//! predictions made from it (the best static configuration of a scenario, the oracle).

use super::intervals::RunRecord;
use super::phases::kind_ms;
use super::suite::StaticConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The calibration result of one static configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The configuration.
    pub config: StaticConfig,
    /// Mean reward per phase kind.
    pub per_kind: BTreeMap<String, f64>,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Why it gave nothing, if so.
    pub error: Option<String>,
}

/// The predicted mean reward of a configuration on a phase mix (ms per kind), `None` if
/// a kind of the mix was not calibrated.
pub fn predict(per_kind: &BTreeMap<String, f64>, mix: &BTreeMap<String, u64>) -> Option<f64> {
    let total: u64 = mix.values().sum();
    if total == 0 {
        return None;
    }
    let mut s = 0.0;
    for (k, ms) in mix {
        s += per_kind.get(k)? * *ms as f64 / total as f64;
    }
    Some(s)
}

/// The phase mix (ms per kind) of each seed of scenario `sc` that printed its phases, one
/// per seed.
pub(super) fn phase_mixes(runs: &[RunRecord], sc: &str) -> Vec<BTreeMap<String, u64>> {
    runs.iter()
        .filter(|r| r.scenario == sc && !r.kernel.phases.is_empty())
        .map(|r| (r.seed, kind_ms(&r.kernel.phases)))
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .collect()
}

/// The predicted mean reward of a per-phase oracle on scenario `sc`: the best static
/// configuration of the sweep for each phase kind, switched for free at every phase edge,
/// weighted by the scenario's phase mix and averaged over its seeds. It bounds what
/// switching among static configurations can gain (a policy also pays the reaction time
/// at every edge). `None` without a calibrated kind of the mix.
pub fn oracle_prediction(calibration: &[Calibration], runs: &[RunRecord], sc: &str) -> Option<f64> {
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    for c in calibration {
        for (k, v) in &c.per_kind {
            let e = best.entry(k.clone()).or_insert(f64::NEG_INFINITY);
            *e = e.max(*v);
        }
    }
    let mixes = phase_mixes(runs, sc);
    let preds: Vec<f64> = mixes.iter().filter_map(|m| predict(&best, m)).collect();
    (!preds.is_empty() && preds.len() == mixes.len())
        .then(|| preds.iter().sum::<f64>() / preds.len() as f64)
}
