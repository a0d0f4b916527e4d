//! A/B testing of policies on one VM: two arms alternate in blocks of decision intervals,
//! every stored row names the arm in charge, and the report compares the arms' reward,
//! throughput and latency with 95% confidence intervals.
//!
//! At each block boundary the tuner restores the static configuration, so both arms start
//! their blocks from the same knobs.
//!
//! Statistics: per arm the mean and a normal-approximation 95% interval
//! (`mean ± 1.96·sd/√n`); the difference of mean rewards is tested with Welch's t statistic
//! and called significant when |t| > 1.96 (two-sided, 5%). Consecutive intervals are
//! correlated, so the intervals are optimistic; longer blocks and runs make them honest.

use crate::policy::Policy;
use crate::state_repo::Row;

/// Errors of the A/B framework.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbError {
    /// Block length of zero.
    #[error("ab block length must be at least 1 interval")]
    ZeroBlock,
    /// The two arms are the same policy id, so rows could not tell them apart.
    #[error("both arms are named {0:?}: A/B needs two distinct policies")]
    SameId(String),
    /// Not enough rows to compare.
    #[error("need rows of exactly two policies with rewards, found {0}")]
    NotTwoArms(usize),
}

/// The A/B schedule, a step of the tuner's loop: two policies take turns in blocks of
/// `block` decisions. The arm in charge sits in the tuner's policy slot (so `GET /policy`
/// and every stored row name it); the other waits here. After the last decision of a
/// block the tuner exchanges them ([`AbSchedule::exchange`]) and, before the next
/// decision, restores the static configuration, so each arm starts its block from the
/// same knobs.
pub struct AbSchedule {
    waiting: Policy,
    block: u64,
    step: u64,
}

impl std::fmt::Debug for AbSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbSchedule")
            .field("waiting", &self.waiting.id())
            .field("block", &self.block)
            .field("step", &self.step)
            .finish()
    }
}

impl AbSchedule {
    /// Alternates `a` and `b` every `block` decisions, starting with `a`: returns the
    /// schedule (holding `b`) and `a`, the policy to start with.
    pub fn new(a: Policy, b: Policy, block: u64) -> Result<(Self, Policy), AbError> {
        if block == 0 {
            return Err(AbError::ZeroBlock);
        }
        if a.id() == b.id() {
            return Err(AbError::SameId(a.id().to_string()));
        }
        Ok((
            Self {
                waiting: b,
                block,
                step: 0,
            },
            a,
        ))
    }

    /// Counts one decision of the arm in charge; true when it ended the arm's block (the
    /// next decision belongs to the other arm).
    pub fn after_decision(&mut self) -> bool {
        self.step += 1;
        self.step.is_multiple_of(self.block)
    }

    /// Puts `current` (the arm whose block ended) to wait and returns the other one.
    pub fn exchange(&mut self, current: Policy) -> Policy {
        std::mem::replace(&mut self.waiting, current)
    }

    /// The id of the arm waiting.
    pub fn waiting_id(&self) -> &str {
        self.waiting.id()
    }
}

/// Mean and 95% interval of one quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Mean.
    pub mean: f64,
    /// Half-width of the 95% interval.
    pub ci95: f64,
    /// Sample variance.
    pub var: f64,
    /// Samples.
    pub n: usize,
}

/// Mean and normal-approximation 95% interval of `xs` (finite values only).
pub fn estimate(xs: &[f64]) -> Estimate {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return Estimate {
            mean: 0.0,
            ci95: f64::INFINITY,
            var: 0.0,
            n,
        };
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let ci95 = if n > 1 {
        1.96 * (var / n as f64).sqrt()
    } else {
        f64::INFINITY
    };
    Estimate { mean, ci95, var, n }
}

/// One arm of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmReport {
    /// Policy id.
    pub policy: String,
    /// Reward.
    pub reward: Estimate,
    /// Guest-reported operations per second.
    pub throughput: Estimate,
    /// Guest-reported mean latency in microseconds.
    pub latency_us: Estimate,
}

/// The comparison of two arms.
#[derive(Debug, Clone, PartialEq)]
pub struct AbReport {
    /// The arms, in order of first appearance.
    pub arms: Vec<ArmReport>,
    /// Welch's t of reward (arm 0 minus arm 1).
    pub t: f64,
    /// |t| > 1.96.
    pub significant: bool,
}

/// Compares the two policies found in `rows` (rows without a reward are skipped).
pub fn report(rows: &[Row]) -> Result<AbReport, AbError> {
    let ops = crate::schema::Schema::index_of("guest_ops_rate");
    let lat = crate::schema::Schema::index_of("guest_latency_mean");
    let mut order: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.reward.is_some()) {
        if !order.contains(&r.policy_id) {
            order.push(r.policy_id.clone());
        }
    }
    if order.len() != 2 {
        return Err(AbError::NotTwoArms(order.len()));
    }
    let arms: Vec<ArmReport> = order
        .iter()
        .map(|p| {
            let mine: Vec<&Row> = rows
                .iter()
                .filter(|r| &r.policy_id == p && r.reward.is_some())
                .collect();
            let pick = |i: Option<usize>| -> Vec<f64> {
                mine.iter()
                    .map(|r| i.and_then(|i| r.raw.get(i).copied()).unwrap_or(f64::NAN))
                    .collect()
            };
            ArmReport {
                policy: p.clone(),
                reward: estimate(&mine.iter().filter_map(|r| r.reward).collect::<Vec<_>>()),
                throughput: estimate(&pick(ops)),
                latency_us: estimate(&pick(lat)),
            }
        })
        .collect();
    let (a, b) = (&arms[0].reward, &arms[1].reward);
    let se = (a.var / a.n.max(1) as f64 + b.var / b.n.max(1) as f64).sqrt();
    let t = if se > 0.0 {
        (a.mean - b.mean) / se
    } else {
        0.0
    };
    Ok(AbReport {
        significant: t.abs() > 1.96,
        t,
        arms,
    })
}

/// The report as a printable table.
pub fn render(r: &AbReport) -> String {
    let mut s = String::from("arm                      rows  reward (95% CI)        ops/s (95% CI)           latency us (95% CI)\n");
    for a in &r.arms {
        s.push_str(&format!(
            "{:<24} {:>5}  {:>8.4} ± {:<10.4} {:>10.1} ± {:<10.1} {:>8.1} ± {:<8.1}\n",
            a.policy,
            a.reward.n,
            a.reward.mean,
            a.reward.ci95,
            a.throughput.mean,
            a.throughput.ci95,
            a.latency_us.mean,
            a.latency_us.ci95
        ));
    }
    s.push_str(&format!(
        "difference in reward ({} - {}): t = {:.2}: {}\n",
        r.arms[0].policy,
        r.arms[1].policy,
        r.t,
        if r.significant {
            "significant at 5%"
        } else {
            "not significant at 5%"
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str);
    impl crate::policy::QNetwork for Fixed {
        fn id(&self) -> &str {
            self.0
        }
        fn q_values(&mut self, _input: &[f32]) -> Result<Vec<f32>, crate::policy::PolicyError> {
            Ok(vec![0.0])
        }
    }

    #[test]
    fn arms_alternate_in_blocks() {
        let (mut ab, mut current) =
            AbSchedule::new(Policy::network(Fixed("a")), Policy::network(Fixed("b")), 3).unwrap();
        let mut seq = Vec::new();
        for _ in 0..12 {
            seq.push(current.id().to_string());
            if ab.after_decision() {
                current = ab.exchange(current);
            }
        }
        assert_eq!(
            seq,
            ["a", "a", "a", "b", "b", "b", "a", "a", "a", "b", "b", "b"]
        );
        assert_eq!(ab.waiting_id(), "b");
        let space = crate::actions::ActionSpace::new(crate::actions::VmShape::new(4, 0, 0));
        assert!(matches!(
            AbSchedule::new(Policy::static_for(&space), Policy::static_for(&space), 3),
            Err(AbError::SameId(_))
        ));
        assert!(
            AbSchedule::new(Policy::network(Fixed("a")), Policy::network(Fixed("b")), 0).is_err()
        );
    }

    fn row(policy: &str, reward: f64) -> Row {
        Row {
            vm_id: "vm0".into(),
            ts_ns: 0,
            interval_ns: 1,
            schema_version: crate::schema::SCHEMA_VERSION,
            vector: vec![0.0; crate::schema::Schema::len()],
            raw: vec![1.0; crate::schema::Schema::len()],
            action: None,
            reward: Some(reward),
            policy_id: policy.into(),
            config: String::new(),
            anomaly: None,
            anomaly_score: None,
            slo: None,
        }
    }

    #[test]
    fn a_clear_difference_is_significant_and_noise_is_not() {
        let mut rows = Vec::new();
        for i in 0..50 {
            let noise = ((i * 37) % 11) as f64 / 100.0;
            rows.push(row("good", 1.0 + noise));
            rows.push(row("bad", 0.5 + noise));
        }
        let r = report(&rows).unwrap();
        assert!(r.significant && r.t > 10.0, "{r:?}");
        assert!((r.arms[0].reward.mean - 1.05).abs() < 0.01);
        let mut same = Vec::new();
        for i in 0..50 {
            let noise = ((i * 37) % 11) as f64 / 100.0;
            same.push(row("x", 1.0 + noise));
            same.push(row("y", 1.0 + ((i * 53) % 11) as f64 / 100.0));
        }
        assert!(!report(&same).unwrap().significant);
        assert_eq!(report(&rows[..1]), Err(AbError::NotTwoArms(1)));
        assert!(render(&r).contains("significant at 5%"));
    }
}
