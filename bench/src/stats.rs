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
