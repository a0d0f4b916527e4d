//! Service level objectives (SLOs) of a VM and, each interval, whether they were met.
//!
//! A VM's [`Slo`] has a [`SloClass`] (`critical`, `standard`, `batch`) and optional
//! targets: a p99 request latency (`p99_us`, from the per-request latency histograms of
//! the VM's drives) and a minimum rate of guest operations (`min_ops`, operations per
//! second: what the guest reports through the paravirtual metrics device, or the drives'
//! request rate when the guest reports nothing). [`attain`] scores one interval: for each
//! target, the observed value, whether it was met and a signed margin
//! ([`TargetAttainment::margin`]: positive with room to spare, negative when missed, in
//! proportion to the miss). The sampling agent puts the [`SloReport`] in every sample;
//! the reward ([`crate::reward`]), the state repository, Prometheus and the control API
//! read it from there.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::counters::LATENCY_BUCKETS_US;

/// Lowest p99 target accepted, in microseconds: the upper bound of the latency
/// histogram's first bucket. Below it a p99 cannot be told apart from 0.
pub const P99_FLOOR_US: u64 = LATENCY_BUCKETS_US[0];

/// Largest p99 target accepted, in microseconds (the histogram's last finite bound: a
/// larger p99 is never observed, so such a target could never be missed).
pub const P99_CEILING_US: u64 = LATENCY_BUCKETS_US[LATENCY_BUCKETS_US.len() - 1];

/// Largest `min_ops` target accepted (operations per second).
pub const MAX_MIN_OPS: f64 = 1e9;

/// Margins are reported within `[-MARGIN_CAP, MARGIN_CAP]` (a p99 of 100x its target
/// is a miss of 99, reported as this cap), so that a reward built on them stays bounded.
pub const MARGIN_CAP: f64 = 10.0;

/// Errors of an SLO setting; each names the field ([`SloError::field`]).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{}: {}", self.field(), self.problem())]
pub enum SloError {
    /// The class is not one of `critical`, `standard`, `batch`.
    UnknownClass(String),
    /// No class was given.
    MissingClass,
    /// A p99 target outside the measurable range.
    P99OutOfRange(u64),
    /// A value that is not a number of the right kind.
    NotANumber {
        /// The field.
        field: &'static str,
        /// What was given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A minimum rate that is zero, negative, not finite or too large.
    BadMinOps(f64),
    /// An option the SLO syntax does not know.
    UnknownOption(String),
}

impl SloError {
    /// The setting at fault (`slo.class`, `slo.p99_us`, `slo.min_ops`, `slo`).
    pub fn field(&self) -> &'static str {
        match self {
            SloError::UnknownClass(_) | SloError::MissingClass => "slo.class",
            SloError::P99OutOfRange(_) => "slo.p99_us",
            SloError::NotANumber {
                field: "p99_us", ..
            } => "slo.p99_us",
            SloError::NotANumber { .. } | SloError::BadMinOps(_) => "slo.min_ops",
            SloError::UnknownOption(_) => "slo",
        }
    }

    /// What is wrong, without the field.
    pub fn problem(&self) -> String {
        match self {
            SloError::UnknownClass(c) => {
                format!("{c:?} is not a class (expected critical, standard or batch)")
            }
            SloError::MissingClass => "missing (expected class=critical|standard|batch)".into(),
            SloError::P99OutOfRange(p) => format!(
                "{p} is outside {P99_FLOOR_US}..={P99_CEILING_US} us (the latency histogram's \
                 range; {P99_FLOOR_US} us is the device's floor)"
            ),
            SloError::NotANumber {
                value, expected, ..
            } => format!("{value:?} is not a {expected}"),
            SloError::BadMinOps(m) => {
                format!("{m} must be a finite rate above 0 and at most {MAX_MIN_OPS} ops/s")
            }
            SloError::UnknownOption(o) => format!(
                "unknown or empty option {o:?} (expected \
                 class=critical|standard|batch[,p99_us=N][,min_ops=N])"
            ),
        }
    }
}

/// How much a VM's service level matters when resources are short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SloClass {
    /// Latency-sensitive service: its targets come first.
    Critical,
    /// Ordinary service.
    Standard,
    /// Throughput work: earns what it gets done.
    Batch,
}

impl SloClass {
    /// Every class, from least to most important.
    pub const ALL: [SloClass; 3] = [SloClass::Batch, SloClass::Standard, SloClass::Critical];

    /// Name as in the configuration (`critical`, `standard`, `batch`).
    pub fn name(self) -> &'static str {
        match self {
            SloClass::Critical => "critical",
            SloClass::Standard => "standard",
            SloClass::Batch => "batch",
        }
    }

    /// Code in the performance vector: 1 batch, 2 standard, 3 critical (0: no SLO).
    pub fn code(self) -> u8 {
        match self {
            SloClass::Batch => 1,
            SloClass::Standard => 2,
            SloClass::Critical => 3,
        }
    }

    /// The class named `name`.
    pub fn parse(name: &str) -> Result<Self, SloError> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| SloError::UnknownClass(name.to_string()))
    }
}

/// A VM's service level objective (configuration: JSON `slo`, flag `--slo`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// The VM's class.
    pub class: SloClass,
    /// Target p99 request latency over the VM's drives, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
    /// Minimum rate of guest operations, per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ops: Option<f64>,
}

impl Slo {
    /// Parses the `--slo` syntax: `class=critical|standard|batch[,p99_us=N][,min_ops=N]`,
    /// and validates it.
    pub fn parse_spec(spec: &str) -> Result<Self, SloError> {
        let mut class = None;
        let mut p99_us = None;
        let mut min_ops = None;
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            match part.trim().split_once('=') {
                Some(("class", v)) => class = Some(SloClass::parse(v.trim())?),
                Some(("p99_us", v)) => {
                    p99_us = Some(v.trim().parse::<u64>().map_err(|_| SloError::NotANumber {
                        field: "p99_us",
                        value: v.to_string(),
                        expected: "whole number of microseconds",
                    })?)
                }
                Some(("min_ops", v)) => {
                    min_ops = Some(v.trim().parse::<f64>().map_err(|_| SloError::NotANumber {
                        field: "min_ops",
                        value: v.to_string(),
                        expected: "rate in operations per second",
                    })?)
                }
                _ => return Err(SloError::UnknownOption(part.to_string())),
            }
        }
        let slo = Slo {
            class: class.ok_or(SloError::MissingClass)?,
            p99_us,
            min_ops,
        };
        slo.validate()?;
        Ok(slo)
    }

    /// Checks the targets: a p99 within the histogram's range, a positive finite rate.
    pub fn validate(&self) -> Result<(), SloError> {
        if let Some(p) = self.p99_us {
            if !(P99_FLOOR_US..=P99_CEILING_US).contains(&p) {
                return Err(SloError::P99OutOfRange(p));
            }
        }
        if let Some(m) = self.min_ops {
            if !m.is_finite() || m <= 0.0 || m > MAX_MIN_OPS {
                return Err(SloError::BadMinOps(m));
            }
        }
        Ok(())
    }
}

/// A kind of SLO target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SloTarget {
    /// p99 request latency at most the target.
    P99Us,
    /// Guest operations per second at least the target.
    MinOps,
}

impl SloTarget {
    /// Name as in the configuration and in metric labels (`p99_us`, `min_ops`).
    pub fn name(self) -> &'static str {
        match self {
            SloTarget::P99Us => "p99_us",
            SloTarget::MinOps => "min_ops",
        }
    }
}

/// One target's outcome in one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TargetAttainment {
    /// Which target.
    pub target: SloTarget,
    /// The target value (us, or ops/s).
    pub goal: f64,
    /// What the interval showed (us, or ops/s).
    pub observed: f64,
    /// Whether the target was met.
    pub met: bool,
    /// Signed margin, within `[-MARGIN_CAP, MARGIN_CAP]`: `(goal - observed) / goal` for
    /// a latency target, `(observed - goal) / goal` for a rate; negative = missed by that
    /// share of the target.
    pub margin: f64,
}

/// Every target's outcome in one interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloReport {
    /// The VM's class.
    pub class: SloClass,
    /// One entry per target configured, latency first.
    pub targets: Vec<TargetAttainment>,
}

impl SloReport {
    /// Whether every target was met (true without targets).
    pub fn met(&self) -> bool {
        self.targets.iter().all(|t| t.met)
    }

    /// The outcome of one target, if configured.
    pub fn target(&self, which: SloTarget) -> Option<&TargetAttainment> {
        self.targets.iter().find(|t| t.target == which)
    }

    /// Sum of the misses (the negative margins, as positive shares of their targets).
    pub fn miss(&self) -> f64 {
        self.targets.iter().map(|t| (-t.margin).max(0.0)).sum()
    }
}

/// What one interval showed, as [`attain`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observed {
    /// p99 request latency over the VM's drives in the interval, us (0 without requests).
    pub p99_us: f64,
    /// Guest operations per second (guest reports, else the drives' request rate).
    pub ops_rate: f64,
}

fn capped(x: f64) -> f64 {
    if x.is_finite() {
        x.clamp(-MARGIN_CAP, MARGIN_CAP)
    } else if x > 0.0 {
        MARGIN_CAP
    } else {
        -MARGIN_CAP
    }
}

/// Scores one interval against `slo`. Non-finite or negative observations count as 0.
pub fn attain(slo: &Slo, observed: Observed) -> SloReport {
    let clean = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
    let mut targets = Vec::with_capacity(2);
    if let Some(goal) = slo.p99_us.filter(|g| *g > 0) {
        let goal = goal as f64;
        let seen = clean(observed.p99_us);
        targets.push(TargetAttainment {
            target: SloTarget::P99Us,
            goal,
            observed: seen,
            met: seen <= goal,
            margin: capped((goal - seen) / goal),
        });
    }
    if let Some(goal) = slo.min_ops.filter(|g| g.is_finite() && *g > 0.0) {
        let seen = clean(observed.ops_rate);
        targets.push(TargetAttainment {
            target: SloTarget::MinOps,
            goal,
            observed: seen,
            met: seen >= goal,
            margin: capped((seen - goal) / goal),
        });
    }
    SloReport {
        class: slo.class,
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_syntax_parses_and_validates() {
        let s = Slo::parse_spec("class=critical,p99_us=500,min_ops=10000").unwrap();
        assert_eq!(
            s,
            Slo {
                class: SloClass::Critical,
                p99_us: Some(500),
                min_ops: Some(1e4)
            }
        );
        assert_eq!(
            Slo::parse_spec("class=batch").unwrap().class,
            SloClass::Batch
        );
        let err = |spec: &str| Slo::parse_spec(spec).unwrap_err().to_string();
        assert!(
            err("class=gold").contains("slo.class"),
            "{}",
            err("class=gold")
        );
        assert!(err("p99_us=500").contains("slo.class: missing"));
        assert!(err("class=critical,p99_us=-5").contains("slo.p99_us"));
        assert!(err("class=critical,p99_us=0").contains("slo.p99_us: 0 is outside"));
        assert!(err("class=critical,p99_us=5").contains("floor"));
        assert!(err("class=critical,p99_us=999999999").contains("slo.p99_us"));
        assert!(err("class=batch,min_ops=0").contains("slo.min_ops"));
        assert!(err("class=batch,min_ops=-3").contains("slo.min_ops"));
        assert!(err("class=batch,min_ops=NaN").contains("slo.min_ops"));
        assert!(err("class=batch,min_ops=inf").contains("slo.min_ops"));
        assert!(err("class=batch,p99=5").contains("unknown or empty option"));
    }

    #[test]
    fn json_has_the_same_fields() {
        let s: Slo = serde_json::from_str(r#"{"class":"standard","p99_us":250}"#).unwrap();
        assert_eq!(
            (s.class, s.p99_us, s.min_ops),
            (SloClass::Standard, Some(250), None)
        );
        assert!(serde_json::from_str::<Slo>(r#"{"class":"gold"}"#).is_err());
        assert!(serde_json::from_str::<Slo>(r#"{"class":"batch","p99":1}"#).is_err());
    }

    #[test]
    fn attainment_is_signed_and_proportional() {
        let slo = Slo {
            class: SloClass::Critical,
            p99_us: Some(500),
            min_ops: Some(1000.0),
        };
        let r = attain(
            &slo,
            Observed {
                p99_us: 250.0,
                ops_rate: 1500.0,
            },
        );
        assert!(r.met());
        let lat = r.target(SloTarget::P99Us).unwrap();
        assert!((lat.margin - 0.5).abs() < 1e-12);
        assert!((r.target(SloTarget::MinOps).unwrap().margin - 0.5).abs() < 1e-12);
        assert_eq!(r.miss(), 0.0);
        let r = attain(
            &slo,
            Observed {
                p99_us: 1000.0,
                ops_rate: 500.0,
            },
        );
        assert!(!r.met());
        assert!((r.target(SloTarget::P99Us).unwrap().margin + 1.0).abs() < 1e-12);
        assert!((r.target(SloTarget::MinOps).unwrap().margin + 0.5).abs() < 1e-12);
        assert!((r.miss() - 1.5).abs() < 1e-12);
        // Huge misses are capped; garbage observations count as 0.
        let r = attain(
            &slo,
            Observed {
                p99_us: f64::INFINITY,
                ops_rate: f64::NAN,
            },
        );
        assert_eq!(r.target(SloTarget::P99Us).unwrap().observed, 0.0);
        assert!((r.target(SloTarget::MinOps).unwrap().margin + 1.0).abs() < 1e-12);
        let r = attain(
            &slo,
            Observed {
                p99_us: 1e9,
                ops_rate: 1e12,
            },
        );
        assert_eq!(r.target(SloTarget::P99Us).unwrap().margin, -MARGIN_CAP);
        assert_eq!(r.target(SloTarget::MinOps).unwrap().margin, MARGIN_CAP);
        // No targets: met.
        let none = attain(
            &Slo {
                class: SloClass::Batch,
                p99_us: None,
                min_ops: None,
            },
            Observed::default(),
        );
        assert!(none.met() && none.targets.is_empty());
    }
}
