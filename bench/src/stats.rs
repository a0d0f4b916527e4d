//! Order statistics of a set of measurements.

use serde::{Deserialize, Serialize};

/// Median, spread and extremes of a non-empty set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// 50th percentile.
    pub median: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// The `q`-quantile (0..=1) of sorted samples, interpolating linearly between the two
/// nearest ranks (the usual "type 7" definition, as numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The `q`-quantile (0..=1) of `samples` (any order; NaN when empty).
pub fn quantile_of(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, q)
}

/// Summarises `samples`; `None` if there are none (or any is NaN).
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        n: sorted.len(),
        median: quantile(&sorted, 0.5),
        p10: quantile(&sorted, 0.1),
        p90: quantile(&sorted, 0.9),
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
    })
}

/// Two-sided 95% critical value of Student's t with `df` degrees of freedom (rounded
/// down to a tabulated value, so never smaller than the exact one).
pub fn t_critical_95(df: f64) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if !df.is_finite() {
        return 1.960;
    }
    if df >= 120.0 {
        return 1.980;
    }
    let d = df.floor().max(1.0) as usize;
    match d {
        1..=30 => TABLE[d - 1],
        31..=39 => 2.042,
        40..=59 => 2.021,
        _ => 2.000,
    }
}

/// Mean and 95% confidence interval of a mean (Student's t over the samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanCi {
    /// Samples.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Half-width of the 95% interval (`None` with fewer than two samples).
    pub ci95: Option<f64>,
    /// Sample variance (0 with one sample).
    pub var: f64,
}

/// The mean of the finite values of `xs` with its t-distribution 95% interval; `None` if
/// there are none. Mean and variance come from `tuner::ab::estimate`.
pub fn mean_ci(xs: &[f64]) -> Option<MeanCi> {
    let e = tuner::ab::estimate(xs);
    if e.n == 0 {
        return None;
    }
    let ci95 = (e.n > 1).then(|| t_critical_95((e.n - 1) as f64) * (e.var / e.n as f64).sqrt());
    Some(MeanCi {
        n: e.n,
        mean: e.mean,
        ci95,
        var: e.var,
    })
}

/// Welch's t-test of `a` minus `b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Welch {
    /// The statistic (as `tuner::ab::report` computes it).
    pub t: f64,
    /// Welch-Satterthwaite degrees of freedom.
    pub df: f64,
    /// |t| above the two-sided 95% critical value of t at `df`.
    pub significant: bool,
}

/// Welch's t-test of two sample sets summarised by [`mean_ci`]; `None` when either has
/// fewer than two samples or both have no variance.
pub fn welch(a: &MeanCi, b: &MeanCi) -> Option<Welch> {
    if a.n < 2 || b.n < 2 {
        return None;
    }
    let (va, vb) = (a.var / a.n as f64, b.var / b.n as f64);
    let se2 = va + vb;
    if se2 <= 0.0 || !se2.is_finite() {
        return None;
    }
    let t = (a.mean - b.mean) / se2.sqrt();
    let df = se2 * se2 / (va * va / (a.n - 1) as f64 + vb * vb / (b.n - 1) as f64);
    Some(Welch {
        t,
        df,
        significant: t.abs() > t_critical_95(df),
    })
}

/// A paired comparison: the mean of per-pair differences `a - b` (e.g. two policies run
/// on the same seed, so the same workload schedule) with its 95% interval and t-test.
/// Pairing removes the spread the seeds' schedules put into both arms alike.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Pairs.
    pub n: usize,
    /// Mean difference.
    pub mean_diff: f64,
    /// Half-width of the 95% interval of the mean difference.
    pub ci95: f64,
    /// The paired t statistic (`mean / (sd / sqrt(n))`; infinite when every difference
    /// is the same non-zero value).
    pub t: f64,
    /// The interval excludes 0.
    pub significant: bool,
}

/// Paired t-test over `diffs` (one difference per pair); `None` with fewer than two
/// finite differences.
pub fn paired(diffs: &[f64]) -> Option<Paired> {
    let m = mean_ci(diffs)?;
    let ci95 = m.ci95?;
    let se = (m.var / m.n as f64).sqrt();
    let t = if se > 0.0 {
        m.mean / se
    } else if m.mean == 0.0 {
        0.0
    } else {
        f64::INFINITY.copysign(m.mean)
    };
    Some(Paired {
        n: m.n,
        mean_diff: m.mean,
        ci95,
        t,
        significant: m.mean.abs() > ci95,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_intervals_and_welch() {
        assert_eq!(t_critical_95(4.0), 2.776);
        assert_eq!(t_critical_95(4.7), 2.776);
        assert_eq!(t_critical_95(f64::INFINITY), 1.96);
        let m = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]).expect("ci");
        assert_eq!(m.mean, 3.0);
        // s = sqrt(2.5), half-width = 2.776 * s / sqrt(5).
        let want = 2.776 * (2.5f64 / 5.0).sqrt();
        assert!((m.ci95.expect("n > 1") - want).abs() < 1e-9);
        assert_eq!(mean_ci(&[7.0]).map(|m| m.ci95), Some(None));
        assert_eq!(mean_ci(&[]), None);
        let hi = mean_ci(&[10.0, 10.5, 9.5, 10.2, 9.8]).expect("ci");
        let w = welch(&hi, &m).expect("welch");
        assert!(w.t > 5.0 && w.significant, "{w:?}");
        assert!(w.df > 4.0 && w.df < 8.0, "{w:?}");
        let close = mean_ci(&[3.1, 2.0, 4.0, 1.2, 5.0]).expect("ci");
        assert!(!welch(&close, &m).expect("welch").significant);
        assert_eq!(welch(&mean_ci(&[1.0]).expect("ci"), &m), None);
    }

    #[test]
    fn paired_differences_remove_the_shared_spread() {
        // Two arms whose seeds spread widely but differ by ~0.3 on every seed: Welch sees
        // no difference, the paired test does.
        let a = [1.3, 2.4, 0.2, 3.35, 1.8];
        let b = [1.0, 2.1, -0.1, 3.0, 1.5];
        let w = welch(&mean_ci(&a).expect("ci"), &mean_ci(&b).expect("ci")).expect("welch");
        assert!(!w.significant, "{w:?}");
        let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let p = paired(&d).expect("paired");
        assert_eq!(p.n, 5);
        assert!((p.mean_diff - 0.31).abs() < 1e-9, "{p:?}");
        assert!(p.significant && p.t > 10.0, "{p:?}");
        // Differences of both signs around 0: not significant.
        let p = paired(&[0.3, -0.2, 0.1, -0.25, 0.05]).expect("paired");
        assert!(!p.significant, "{p:?}");
        assert_eq!(paired(&[0.5]), None);
        let same = paired(&[0.25, 0.25, 0.25]).expect("paired");
        assert!(same.significant && same.t.is_infinite(), "{same:?}");
        assert_eq!(
            paired(&[0.0, 0.0]).map(|p| (p.t, p.significant)),
            Some((0.0, false))
        );
    }

    #[test]
    fn quantiles_interpolate() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("summary");
        assert_eq!(s.n, 5);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert!((s.p10 - 1.4).abs() < 1e-9);
        assert!((s.p90 - 4.6).abs() < 1e-9);
        assert_eq!(s.mean, 3.0);
        let even = summarize(&[1.0, 2.0, 3.0, 4.0]).expect("summary");
        assert_eq!(even.median, 2.5);
    }

    #[test]
    fn empty_or_nan_has_no_summary() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[1.0, f64::NAN]), None);
        assert_eq!(summarize(&[7.0]).map(|s| s.p90), Some(7.0));
    }
}
