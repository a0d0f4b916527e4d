//! The reward: the one place where its formula is defined.
//!
//! Every interval the tuner scores the interval that just ended (the consequence of the
//! previous decision) with
//!
//! ```text
//! reward = w_throughput  * throughput
//!        - w_latency     * latency
//!        + w_utilisation * utilisation
//!        - w_cost        * cost
//! ```
//!
//! where every term lies in `[0, 1]`:
//!
//! - `throughput` = `min(1, guest_ops_rate / throughput_ref)`: the guest-reported
//!   operations per second as a share of a reference rate ([`RewardWeights::throughput_ref`],
//!   default 2e6 ops/s). Linear, so doubling the rate doubles the term.
//! - `latency` = the normalised `guest_latency_mean` feature (guest-reported mean
//!   operation latency in us, `ln(1 + x) / ln(1 + 1e6)`; halving it removes ~0.05). An
//!   interval without latency samples counts as 0.
//! - `utilisation` = the `cpu_utilisation` feature: the share of the allocated vCPUs'
//!   time spent running the guest (resources used rather than wasted).
//! - `cost` = the resources allocated: `vcpus / max_vcpus` (the VM's hard bound) when the
//!   space has no drive and no network device; otherwise the mean of that and of the
//!   mean I/O allocation, where a drive's allocation is `1 - level / 4` on
//!   [`crate::actions::RATE_LADDER`] (unlimited = 1, tightest = 0) and the network's is
//!   `1 - level / 3` on [`crate::actions::NET_QOS_LADDER`]. Priorities cost nothing (they
//!   share, not allocate).
//!
//! The features come from the sample's normalised vector (see [`crate::schema`]), so the
//! reward uses the guest-reported metrics and the monitor's counters through the same
//! normalisation a policy sees. The weights are part of the VM's configuration
//! ([`RewardWeights`], serde) and are written into every model card.
//!
//! Defaults ([`RewardWeights::default`]): throughput 10 (reference 2e6 ops/s), latency 10,
//! utilisation 0.5, cost 4: allocating everything costs as much as 40% of the reference
//! throughput. With them, a second of 2 vCPUs (cost +0.25 with drives, so -1) pays off
//! when it adds more than 2e5 ops/s, an idle VM is pushed back down, and an unlimited but
//! unused drive costs 0.5 (two drives: each level of its ladder gives back 0.125).
//!
//! History: reward v1 (before schema v2) scored throughput as `ln(1 + ops) / ln(1 + 1e7)`
//! with cost weight 1. That compressed a doubling of throughput into +0.43 on a reward of
//! about 8, so no decision moved the mean reward by more than a few percent: a per-phase
//! oracle measured on the benchmark's sweep gained only ~5% over the best static
//! configuration.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::actions::{NET_QOS_LADDER, RATE_LADDER};
use crate::agent::Sample;
use crate::manager::{Bounds, KnobState};
use crate::schema::FeatureId;

/// Errors of reward configuration.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RewardError {
    /// A weight that is negative, NaN or infinite (or a throughput reference that is not
    /// positive).
    #[error(
        "reward weight {name} = {value} must be finite and non-negative (throughput_ref: positive)"
    )]
    BadWeight {
        /// Which weight.
        name: &'static str,
        /// Its value.
        value: f64,
    },
}

/// Weights of the reward's terms (see the module documentation for the formula).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    /// Weight of throughput (guest operations per second). Default 10.
    pub throughput: f64,
    /// Weight of latency (guest mean operation latency), subtracted. Default 10.
    pub latency: f64,
    /// Weight of CPU utilisation of the allocated vCPUs. Default 0.5.
    pub utilisation: f64,
    /// Weight of the cost of the allocated resources, subtracted. Default 4.
    pub cost: f64,
    /// Guest operations per second that score the full throughput term (not a weight: the
    /// reference the rate is divided by). Default 2e6; must be positive.
    pub throughput_ref: f64,
}

/// Default [`RewardWeights::throughput_ref`].
pub const DEFAULT_THROUGHPUT_REF: f64 = 2e6;

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            throughput: 10.0,
            latency: 10.0,
            utilisation: 0.5,
            cost: 4.0,
            throughput_ref: DEFAULT_THROUGHPUT_REF,
        }
    }
}

impl RewardWeights {
    /// The weights by name, in formula order, then the throughput reference.
    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("throughput", self.throughput),
            ("latency", self.latency),
            ("utilisation", self.utilisation),
            ("cost", self.cost),
            ("throughput_ref", self.throughput_ref),
        ]
    }

    /// Checks that every weight is finite and non-negative and the reference positive.
    pub fn validate(&self) -> Result<(), RewardError> {
        for (name, value) in self.named() {
            if !value.is_finite() || value < 0.0 {
                return Err(RewardError::BadWeight { name, value });
            }
        }
        if self.throughput_ref == 0.0 {
            return Err(RewardError::BadWeight {
                name: "throughput_ref",
                value: self.throughput_ref,
            });
        }
        Ok(())
    }
}

/// The reward's terms for one interval, each in `[0, 1]`, and the weighted total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardTerms {
    /// Guest throughput as a share of the reference rate.
    pub throughput: f64,
    /// Normalised guest latency.
    pub latency: f64,
    /// CPU utilisation of the allocated vCPUs.
    pub utilisation: f64,
    /// Share of the allocatable resources allocated.
    pub cost: f64,
    /// The weighted sum.
    pub total: f64,
}

/// Share of the allocatable resources that `knobs` allocates (the `cost` term).
pub fn cost(knobs: &KnobState, bounds: &Bounds) -> f64 {
    let vcpu = if bounds.max_vcpus > 0 {
        (f64::from(knobs.vcpus) / f64::from(bounds.max_vcpus)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let ladder_alloc = |level: usize, len: usize| {
        let tightest = len.saturating_sub(1).max(1) as f64;
        (1.0 - level as f64 / tightest).clamp(0.0, 1.0)
    };
    let io: Vec<f64> = knobs
        .rate_level
        .iter()
        .map(|level| ladder_alloc(*level, RATE_LADDER.len()))
        .chain(
            knobs
                .net_qos
                .iter()
                .map(|level| ladder_alloc(*level, NET_QOS_LADDER.len())),
        )
        .collect();
    if io.is_empty() {
        vcpu
    } else {
        0.5 * vcpu + 0.5 * io.iter().sum::<f64>() / io.len() as f64
    }
}

/// The reward's terms for the interval of `sample`, under the knob settings that were in
/// force during it.
pub fn reward_terms(
    sample: &Sample,
    knobs: &KnobState,
    bounds: &Bounds,
    weights: &RewardWeights,
) -> RewardTerms {
    let feature = |id: FeatureId| {
        let v = f64::from(sample.value_of(id));
        if v.is_finite() {
            v.clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    let ops = sample.raw_of(FeatureId::GuestOpsRate);
    let throughput = if ops.is_finite() && ops > 0.0 && weights.throughput_ref > 0.0 {
        (ops / weights.throughput_ref).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let latency = feature(FeatureId::GuestLatencyMean);
    let utilisation = feature(FeatureId::CpuUtilisation);
    let cost = cost(knobs, bounds);
    let total = weights.throughput * throughput - weights.latency * latency
        + weights.utilisation * utilisation
        - weights.cost * cost;
    RewardTerms {
        throughput,
        latency,
        utilisation,
        cost,
        total: if total.is_finite() { total } else { 0.0 },
    }
}

/// The reward of the interval of `sample` (see the module documentation). Always finite.
pub fn reward(sample: &Sample, knobs: &KnobState, bounds: &Bounds, weights: &RewardWeights) -> f64 {
    reward_terms(sample, knobs, bounds, weights).total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::{ActionSpace, VmShape};
    use crate::schema::{Schema, FEATURES};

    fn sample(ops: f64, lat_us: f64, util: f64) -> Sample {
        let mut raw = vec![0.0; FEATURES.len()];
        raw[FeatureId::GuestOpsRate.index()] = ops;
        raw[FeatureId::GuestLatencyMean.index()] = lat_us;
        raw[FeatureId::CpuUtilisation.index()] = util;
        let vector = Schema::normalise(&raw).expect("schema length");
        Sample {
            at_ns: 0,
            interval_ns: 100_000_000,
            raw,
            vector,
        }
    }

    #[test]
    fn formula_combines_the_weighted_terms() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 2);
        let knobs = KnobState::initial(&space, 1);
        let w = RewardWeights::default();
        let s = sample(1e4, 100.0, 0.6);
        let t = reward_terms(&s, &knobs, &bounds, &w);
        let thr = 1e4 / DEFAULT_THROUGHPUT_REF;
        let lat = (100f64).ln_1p() / (1e6f64).ln_1p();
        assert!((t.throughput - thr).abs() < 1e-6, "{t:?}");
        assert!((t.latency - lat).abs() < 1e-6, "{t:?}");
        assert!((t.utilisation - 0.6).abs() < 1e-6);
        // 1 of 2 vCPUs (0.5) and an unlimited drive (1.0): cost 0.75.
        assert!((t.cost - 0.75).abs() < 1e-12);
        let expected = 10.0 * t.throughput - 10.0 * t.latency + 0.5 * t.utilisation - 4.0 * 0.75;
        assert!((t.total - expected).abs() < 1e-12);
        assert_eq!(reward(&s, &knobs, &bounds, &w), t.total);
        // Linear in the rate, capped at the reference.
        let double = reward_terms(&sample(2e4, 100.0, 0.6), &knobs, &bounds, &w);
        assert!((double.throughput - 2.0 * t.throughput).abs() < 1e-12);
        let over = reward_terms(&sample(1e9, 100.0, 0.6), &knobs, &bounds, &w);
        assert_eq!(over.throughput, 1.0);
    }

    #[test]
    fn more_throughput_less_latency_and_less_cost_score_higher() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let w = RewardWeights::default();
        let one = KnobState::initial(&space, 1);
        let mut four = one.clone();
        four.vcpus = 4;
        let base = reward(&sample(1e3, 500.0, 0.5), &one, &bounds, &w);
        assert!(reward(&sample(2e3, 500.0, 0.5), &one, &bounds, &w) > base);
        assert!(reward(&sample(1e3, 50.0, 0.5), &one, &bounds, &w) > base);
        assert!(reward(&sample(1e3, 500.0, 0.9), &one, &bounds, &w) > base);
        assert!(reward(&sample(1e3, 500.0, 0.5), &four, &bounds, &w) < base);
        let mut limited = one.clone();
        limited.rate_level[0] = 4;
        assert!(reward(&sample(1e3, 500.0, 0.5), &limited, &bounds, &w) > base);
        assert_eq!(cost(&limited, &bounds), 0.5 * 0.25);
    }

    #[test]
    fn cost_covers_network_and_vcpu_only_spaces() {
        let space = ActionSpace::new(VmShape::new(4, 0, 1));
        let bounds = Bounds::for_space(&space, 1, 2);
        let mut knobs = KnobState::initial(&space, 2);
        assert_eq!(cost(&knobs, &bounds), 1.0);
        knobs.net_qos = vec![3];
        assert_eq!(cost(&knobs, &bounds), 0.5);
        let space = ActionSpace::new(VmShape::new(4, 0, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let knobs = KnobState::initial(&space, 1);
        assert_eq!(cost(&knobs, &bounds), 0.25);
    }

    #[test]
    fn weights_validate_and_deserialise_with_defaults() {
        let w: RewardWeights = serde_json::from_str(r#"{"latency": 2.5}"#).expect("partial");
        assert_eq!(w.latency, 2.5);
        assert_eq!(w.throughput, 10.0);
        assert!(serde_json::from_str::<RewardWeights>(r#"{"latncy": 1}"#).is_err());
        w.validate().expect("valid");
        let bad = RewardWeights {
            cost: -1.0,
            ..RewardWeights::default()
        };
        assert_eq!(
            bad.validate(),
            Err(RewardError::BadWeight {
                name: "cost",
                value: -1.0
            })
        );
        let nan = RewardWeights {
            throughput: f64::NAN,
            ..RewardWeights::default()
        };
        assert!(nan.validate().is_err());
        let zero_ref = RewardWeights {
            throughput_ref: 0.0,
            ..RewardWeights::default()
        };
        assert!(matches!(
            zero_ref.validate(),
            Err(RewardError::BadWeight {
                name: "throughput_ref",
                ..
            })
        ));
        // A non-finite weight never makes a non-finite reward.
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 2);
        let knobs = KnobState::initial(&space, 1);
        let inf = RewardWeights {
            throughput: f64::INFINITY,
            latency: f64::INFINITY,
            ..RewardWeights::default()
        };
        assert!(reward(&sample(1e3, 5.0, 0.5), &knobs, &bounds, &inf).is_finite());
    }
}
