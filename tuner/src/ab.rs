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

use std::sync::{Arc, Mutex};

use crate::policy::{Policy, PolicyContext, PolicyError};
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

/// Two policies taking turns in blocks of `block` decisions.
pub struct AbPolicy {
    arms: [Box<dyn Policy>; 2],
    block: u64,
    step: u64,
    id: String,
    slot: Option<Arc<Mutex<String>>>,
    reset_pending: bool,
}

impl AbPolicy {
    /// Alternates `a` and `b` every `block` decisions, starting with `a`. `slot` (the state
    /// repository's policy-id slot) is kept set to the arm in charge.
    pub fn new(
        a: Box<dyn Policy>,
        b: Box<dyn Policy>,
        block: u64,
        slot: Option<Arc<Mutex<String>>>,
    ) -> Result<Self, AbError> {
        if block == 0 {
            return Err(AbError::ZeroBlock);
        }
        if a.id() == b.id() {
            return Err(AbError::SameId(a.id().to_string()));
        }
        let id = format!("ab({},{})", a.id(), b.id());
        let ab = Self {
            arms: [a, b],
            block,
            step: 0,
            id,
            slot,
            reset_pending: false,
        };
        ab.label();
        Ok(ab)
    }

    fn current(&self) -> usize {
        ((self.step / self.block) % 2) as usize
    }

    fn label(&self) {
        if let Some(s) = &self.slot {
            let mut g = match s.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *g = self.arms[self.current()].id().to_string();
        }
    }
}

impl Policy for AbPolicy {
    fn id(&self) -> &str {
        &self.id
    }

    fn q_values(&mut self, input: &[f32]) -> Result<Vec<f32>, PolicyError> {
        let arm = self.current();
        let q = self.arms[arm].q_values(input);
        self.step += 1;
        if self.current() != arm {
            // The next decision belongs to the other arm: start it from the static knobs.
            self.reset_pending = true;
        }
        self.label();
        q
    }

    fn take_reset_request(&mut self) -> bool {
        std::mem::take(&mut self.reset_pending)
    }

    fn input_size(&self) -> usize {
        self.arms[self.current()].input_size()
    }

    fn set_context(&mut self, ctx: &PolicyContext) {
        let arm = self.current();
        self.arms[arm].set_context(ctx);
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
    use crate::policy::StaticPolicy;

    struct Fixed(&'static str, f32);
    impl Policy for Fixed {
        fn id(&self) -> &str {
            self.0
        }
        fn q_values(&mut self, _input: &[f32]) -> Result<Vec<f32>, PolicyError> {
            Ok(vec![self.1])
        }
    }

    #[test]
    fn arms_alternate_in_blocks_and_label_the_rows() {
        let slot = Arc::new(Mutex::new(String::new()));
        let mut ab = AbPolicy::new(
            Box::new(Fixed("a", 1.0)),
            Box::new(Fixed("b", 2.0)),
            3,
            Some(slot.clone()),
        )
        .unwrap();
        assert_eq!(*slot.lock().unwrap(), "a");
        let seq: Vec<f32> = (0..12).map(|_| ab.q_values(&[]).unwrap()[0]).collect();
        assert_eq!(seq, [1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2.]);
        assert_eq!(*slot.lock().unwrap(), "a");
        let space = crate::actions::ActionSpace::new(crate::actions::VmShape::new(4, 0, 0));
        let s1 = Box::new(StaticPolicy::new(&space));
        let s2 = Box::new(StaticPolicy::new(&space));
        assert!(matches!(
            AbPolicy::new(s1, s2, 3, None),
            Err(AbError::SameId(_))
        ));
        assert!(
            AbPolicy::new(Box::new(Fixed("a", 0.)), Box::new(Fixed("b", 0.)), 0, None).is_err()
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
