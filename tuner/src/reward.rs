//! The reward: the one place where its formula is defined (reward version
//! [`REWARD_VERSION`], written into every model card; a policy trained for another
//! version is refused).
//!
//! Every interval the tuner scores the interval that just ended (the consequence of the
//! previous decision). Reward v3 pays a VM for meeting its service level objectives
//! ([`crate::slo`]) with the resources it leaves to the host's other VMs:
//!
//! ```text
//! SLO met (or no SLO):
//!     reward = w_free * free + w_throughput * throughput          (throughput: batch and
//!                                                                  VMs without an SLO)
//! SLO missed:
//!     reward = -(floor(class) + w_miss * class_factor(class) * miss)
//! ```
//!
//! - `free` = `1 - cost` in `[0, 1]`: the share of the VM's allocatable resources it does
//!   not hold (cores and I/O bandwidth another VM could be granted). `cost` is
//!   `vcpus / max_vcpus` (the VM's hard bound) when the space has no drive and no network
//!   device; otherwise the mean of that and of the mean I/O allocation, where a drive's
//!   allocation is `1 - level / 4` on [`crate::actions::RATE_LADDER`] (unlimited = 1,
//!   tightest = 0) and the network's `1 - level / 3` on [`crate::actions::NET_QOS_LADDER`].
//!   Priorities cost nothing (they share, not allocate).
//! - `throughput` = `min(1, ops / throughput_ref)`: guest-reported operations per second
//!   (the drives' request rate when the guest reports nothing), linear up to the
//!   reference. Earned by `batch` VMs and VMs without an SLO; `critical` and `standard`
//!   VMs state what they need as targets, and earn only what they leave.
//! - `miss` = the sum over the missed targets of `-margin` (the miss as a share of the
//!   target: a p99 of 750 us against 500 us is 0.5), each capped at
//!   [`crate::slo::MARGIN_CAP`]: a miss costs in proportion to its size.
//! - `class_factor`: critical 4, standard 1, batch 0.5 ([`class_factor`]).
//! - `floor(critical)` = `w_free + w_throughput`, the most any interval can earn; 0 for
//!   the other classes. A critical miss therefore costs more than the best met interval
//!   earns: no setting of the knobs scores higher with a critical target missed than with
//!   it met (unit-tested below), and trading one missed interval for savings elsewhere
//!   loses at least as much as the savings can win.
//!
//! The SLO attainment, the guest's rate and the drives' rate come from the sample
//! ([`Sample::slo`], the raw vector); the knob state from the manager. The weights are
//! part of the VM's configuration ([`RewardWeights`], serde) and of every model card.
//!
//! Defaults ([`RewardWeights::default`]): free 4, throughput 10 (reference 2e6 ops/s),
//! miss 10. For a VM without an SLO this is reward v2's trade-off between throughput and
//! the resources held (`10 * throughput - 4 * cost`, shifted by 4), without its latency
//! and utilisation terms.
//!
//! History: reward v2 (schema v2) was
//! `10 * throughput - 10 * latency + 0.5 * utilisation - 4 * cost` with the guest's mean
//! latency: a policy could win it while the p99 of a drive's requests rose from 92 us to
//! 3 424 us (BENCHMARKS 9). Reward v1 scored throughput on a log scale.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::actions::{NET_QOS_LADDER, RATE_LADDER};
use crate::agent::Sample;
use crate::manager::{Bounds, KnobState};
use crate::schema::FeatureId;
use crate::slo::{SloClass, MARGIN_CAP};

/// Version of the reward formula. Bump on any change to it; model cards record it.
pub const REWARD_VERSION: u32 = 3;

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
    /// Weight of the share of resources left to others, earned when the SLO is met.
    /// Default 4.
    pub free: f64,
    /// Weight of throughput (guest operations per second), earned by batch VMs and VMs
    /// without an SLO when met. Default 10.
    pub throughput: f64,
    /// Weight of a missed SLO, per unit of miss (times the class factor). Default 10.
    pub miss: f64,
    /// Operations per second that score the full throughput term (not a weight: the
    /// reference the rate is divided by). Default 2e6; must be positive.
    pub throughput_ref: f64,
}

/// Default [`RewardWeights::throughput_ref`].
pub const DEFAULT_THROUGHPUT_REF: f64 = 2e6;

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            free: 4.0,
            throughput: 10.0,
            miss: 10.0,
            throughput_ref: DEFAULT_THROUGHPUT_REF,
        }
    }
}

impl RewardWeights {
    /// The weights by name, in formula order, then the throughput reference.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("free", self.free),
            ("throughput", self.throughput),
            ("miss", self.miss),
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

    /// The most one interval can earn (`w_free + w_throughput`).
    pub fn max_earning(&self) -> f64 {
        finite_or_zero(self.free.max(0.0) + self.throughput.max(0.0))
    }
}

/// How much a missed target of a VM of `class` weighs, per unit of miss.
pub fn class_factor(class: SloClass) -> f64 {
    match class {
        SloClass::Critical => 4.0,
        SloClass::Standard => 1.0,
        SloClass::Batch => 0.5,
    }
}

/// The reward's terms for one interval and the total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardTerms {
    /// Share of the allocatable resources left to others (`1 - cost`).
    pub free: f64,
    /// Operations per second as a share of the reference rate, `[0, 1]`.
    pub throughput: f64,
    /// Whether the interval met every SLO target (true without an SLO).
    pub met: bool,
    /// Sum of the missed targets' shortfalls (0 when met).
    pub miss: f64,
    /// The reward.
    pub total: f64,
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Share of the allocatable resources that `knobs` allocates (`1 - free`).
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

/// Operations per second the interval of `sample` did: guest-reported, else the drives'.
pub fn ops_rate(sample: &Sample) -> f64 {
    let guest = sample.raw_of(FeatureId::GuestOpsRate);
    let ops = if guest > 0.0 {
        guest
    } else {
        sample.raw_of(FeatureId::IoRequestRate)
    };
    if ops.is_finite() && ops > 0.0 {
        ops
    } else {
        0.0
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
    let free = 1.0 - cost(knobs, bounds);
    let throughput = if weights.throughput_ref > 0.0 {
        (ops_rate(sample) / weights.throughput_ref).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let class = sample.slo.as_ref().map(|r| r.class);
    let (met, miss) = match &sample.slo {
        Some(r) if !r.met() => {
            let miss: f64 = r
                .targets
                .iter()
                .map(|t| (-t.margin).clamp(0.0, MARGIN_CAP))
                .sum();
            (false, miss)
        }
        _ => (true, 0.0),
    };
    let total = if met {
        let earns_throughput = matches!(class, None | Some(SloClass::Batch));
        weights.free * free
            + if earns_throughput {
                weights.throughput * throughput
            } else {
                0.0
            }
    } else {
        // `class` is set: only a report can be missed.
        let class = class.unwrap_or(SloClass::Standard);
        let floor = if class == SloClass::Critical {
            weights.max_earning()
        } else {
            0.0
        };
        -(floor + weights.miss * class_factor(class) * miss)
    };
    RewardTerms {
        free,
        throughput,
        met,
        miss,
        total: finite_or_zero(total),
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
    use crate::slo::{attain, Observed, Slo};

    fn sample(ops: f64, slo: Option<(Slo, Observed)>) -> Sample {
        let mut raw = vec![0.0; FEATURES.len()];
        raw[FeatureId::GuestOpsRate.index()] = ops;
        let vector = Schema::normalise(&raw).expect("schema length");
        Sample {
            at_ns: 0,
            interval_ns: 100_000_000,
            raw,
            vector,
            slo: slo.map(|(s, o)| attain(&s, o)),
            ..Sample::default()
        }
    }

    fn critical(p99_us: u64) -> Slo {
        Slo {
            class: SloClass::Critical,
            p99_us: Some(p99_us),
            min_ops: None,
        }
    }

    fn seen(p99_us: f64) -> Observed {
        Observed {
            p99_us,
            ops_rate: 0.0,
        }
    }

    #[test]
    fn met_intervals_earn_what_they_leave_and_batch_its_throughput() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 2);
        let knobs = KnobState::initial(&space, 1);
        let w = RewardWeights::default();
        // 1 of 2 vCPUs (0.5) and an unlimited drive (1.0): cost 0.75, free 0.25.
        assert!((cost(&knobs, &bounds) - 0.75).abs() < 1e-12);
        let t = reward_terms(&sample(1e4, None), &knobs, &bounds, &w);
        assert!(t.met);
        assert!((t.free - 0.25).abs() < 1e-12);
        assert!((t.throughput - 1e4 / DEFAULT_THROUGHPUT_REF).abs() < 1e-12);
        assert!((t.total - (4.0 * 0.25 + 10.0 * t.throughput)).abs() < 1e-12);
        // A critical VM meeting its target earns the free share only.
        let c = reward_terms(
            &sample(1e4, Some((critical(500), seen(100.0)))),
            &knobs,
            &bounds,
            &w,
        );
        assert!((c.total - 4.0 * 0.25).abs() < 1e-12, "{c:?}");
        // Batch earns throughput, linear up to the reference.
        let batch = Slo {
            class: SloClass::Batch,
            p99_us: None,
            min_ops: Some(10.0),
        };
        let b = |ops: f64| {
            reward(
                &sample(
                    ops,
                    Some((
                        batch,
                        Observed {
                            p99_us: 0.0,
                            ops_rate: ops,
                        },
                    )),
                ),
                &knobs,
                &bounds,
                &w,
            )
        };
        assert!((b(2e4) - b(1e4) - 10.0 * 1e4 / DEFAULT_THROUGHPUT_REF).abs() < 1e-9);
        assert!((b(1e9) - (1.0 + 10.0)).abs() < 1e-9);
        // Tightening the drive leaves more to others: more reward while met.
        let mut limited = knobs.clone();
        limited.rate_level[0] = 4;
        assert!(
            reward(&sample(1e4, None), &limited, &bounds, &w)
                > reward(&sample(1e4, None), &knobs, &bounds, &w)
        );
        // Without guest reports the drives' request rate counts.
        let mut s = sample(0.0, None);
        s.raw[FeatureId::IoRequestRate.index()] = 4e4;
        assert!((ops_rate(&s) - 4e4).abs() < 1e-12);
    }

    #[test]
    fn a_miss_costs_in_proportion_to_its_size() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 2);
        let knobs = KnobState::initial(&space, 1);
        let w = RewardWeights::default();
        let standard = Slo {
            class: SloClass::Standard,
            p99_us: Some(500),
            min_ops: None,
        };
        let r = |p99: f64| {
            reward(
                &sample(0.0, Some((standard, seen(p99)))),
                &knobs,
                &bounds,
                &w,
            )
        };
        // 750 us against 500: miss 0.5; 1000 us: miss 1.
        assert!((r(750.0) + 10.0 * 0.5).abs() < 1e-9);
        assert!((r(1000.0) + 10.0 * 1.0).abs() < 1e-9);
        assert!(r(1e9).is_finite() && r(1e9) >= -(10.0 * MARGIN_CAP) - 1e-9);
        // Critical: the floor, then 4x the miss.
        let c = reward(
            &sample(0.0, Some((critical(500), seen(750.0)))),
            &knobs,
            &bounds,
            &w,
        );
        assert!(
            (c + (w.max_earning() + 4.0 * 10.0 * 0.5)).abs() < 1e-9,
            "{c}"
        );
    }

    /// The property reward v3 exists for: whatever the knobs, the throughput and the
    /// size of the miss, an interval in which a critical VM misses its latency target
    /// scores below every interval in which it meets it, by more than the best interval
    /// earns; so a policy cannot win by missing it.
    #[test]
    fn no_knob_setting_wins_while_a_critical_latency_target_is_missed() {
        let space = ActionSpace::new(VmShape::new(4, 2, 1));
        let bounds = Bounds::for_space(&space, 1, 4);
        for w in [
            RewardWeights::default(),
            RewardWeights {
                free: 100.0,
                throughput: 0.0,
                miss: 0.0,
                throughput_ref: 1.0,
            },
            RewardWeights {
                free: 0.0,
                throughput: 50.0,
                miss: 0.01,
                throughput_ref: 1e3,
            },
        ] {
            let mut knob_settings = Vec::new();
            for vcpus in 1..=4 {
                for l0 in 0..RATE_LADDER.len() {
                    for l1 in 0..RATE_LADDER.len() {
                        for q in 0..NET_QOS_LADDER.len() {
                            let mut k = KnobState::initial(&space, 4);
                            k.vcpus = vcpus;
                            k.rate_level[0] = l0;
                            k.rate_level[1] = l1;
                            k.net_qos = vec![q];
                            knob_settings.push(k);
                        }
                    }
                }
            }
            let mut best_met = f64::NEG_INFINITY;
            let mut worst_met = f64::INFINITY;
            let mut best_missed = f64::NEG_INFINITY;
            for k in &knob_settings {
                for ops in [0.0, 1e3, 1e6, 1e12] {
                    for p99 in [0.0, 10.0, 499.0, 500.0] {
                        let s = sample(ops, Some((critical(500), seen(p99))));
                        let r = reward(&s, k, &bounds, &w);
                        best_met = best_met.max(r);
                        worst_met = worst_met.min(r);
                    }
                    for p99 in [500.001, 501.0, 750.0, 5e3, 1e9] {
                        let s = sample(ops, Some((critical(500), seen(p99))));
                        let r = reward(&s, k, &bounds, &w);
                        best_missed = best_missed.max(r);
                    }
                }
            }
            assert!(
                best_missed < worst_met,
                "{w:?}: a missed interval scored {best_missed}, a met one {worst_met}"
            );
            assert!(
                best_missed <= -best_met,
                "{w:?}: a miss ({best_missed}) costs less than the best interval earns ({best_met})"
            );
        }
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
        let w: RewardWeights = serde_json::from_str(r#"{"miss": 2.5}"#).expect("partial");
        assert_eq!(w.miss, 2.5);
        assert_eq!(w.throughput, 10.0);
        // Reward v2's weights are not v3's.
        assert!(serde_json::from_str::<RewardWeights>(r#"{"latency": 1}"#).is_err());
        w.validate().expect("valid");
        let bad = RewardWeights {
            free: -1.0,
            ..RewardWeights::default()
        };
        assert_eq!(
            bad.validate(),
            Err(RewardError::BadWeight {
                name: "free",
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
            miss: f64::INFINITY,
            ..RewardWeights::default()
        };
        assert!(reward(&sample(1e3, None), &knobs, &bounds, &inf).is_finite());
        let missed = sample(1e3, Some((critical(500), seen(1e3))));
        assert!(reward(&missed, &knobs, &bounds, &inf).is_finite());
    }
}
