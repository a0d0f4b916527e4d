//! Anomaly detection over the performance vector: an exponentially weighted (EWMA)
//! mean and variance per feature, and a z-score per interval.
//!
//! For each watched feature `x` the detector keeps
//!
//! ```text
//! diff = x - mean
//! mean = mean + alpha * diff
//! var  = (1 - alpha) * (var + alpha * diff^2)
//! ```
//!
//! (the usual incremental EWMA estimates; `alpha` is the weight of the newest value, so
//! the memory is about `1 / alpha` intervals). Before updating, the new value's z-score
//! is `z = (x - mean) / max(sqrt(var), min_std)`; the floor `min_std` keeps a perfectly
//! steady feature from turning tiny jitter into huge scores. The interval's score is the
//! largest `|z|` over the watched features, and it is flagged anomalous when that score
//! exceeds `threshold` once `warmup` intervals have been seen. Anomalous values still
//! update the estimates, so a lasting change of level is flagged for a few intervals and
//! then becomes the new normal.
//!
//! Works on the normalised vector (every feature in `[0, 1]`), so one threshold and one
//! `min_std` suit every feature.

use thiserror::Error;

use crate::schema::FEATURES;

/// Errors of the anomaly detector.
#[derive(Debug, Error, PartialEq)]
pub enum AnomalyError {
    /// `alpha` must lie in `(0, 1]`.
    #[error("alpha must be in (0, 1], got {0}")]
    InvalidAlpha(f64),
    /// `threshold` must be positive and finite.
    #[error("threshold must be positive and finite, got {0}")]
    InvalidThreshold(f64),
    /// `min_std` must be positive and finite.
    #[error("min_std must be positive and finite, got {0}")]
    InvalidMinStd(f64),
    /// A watched feature index is outside the vector.
    #[error("feature index {index} is outside a vector of {len} features")]
    FeatureOutOfRange {
        /// The index.
        index: usize,
        /// Vector length.
        len: usize,
    },
    /// No feature is watched.
    #[error("no feature selected")]
    NoFeature,
    /// A vector's length differs from the detector's.
    #[error("vector has {got} features, detector expects {expected}")]
    LengthMismatch {
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
}

/// Which features the detector watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureSelection {
    /// Every feature of the vector.
    All,
    /// These feature indices.
    Indices(Vec<usize>),
}

/// Configuration of the detector.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// Weight of the newest value in the EWMA estimates, in `(0, 1]`.
    pub alpha: f64,
    /// `|z|` above which an interval is flagged.
    pub threshold: f64,
    /// Intervals observed before anything is flagged.
    pub warmup: u64,
    /// Floor of the standard deviation, in normalised units.
    pub min_std: f64,
    /// Watched features.
    pub features: FeatureSelection,
}

impl Default for AnomalyConfig {
    /// `alpha` 0.05 (memory ~20 intervals, 2 s at 100 ms), threshold 5, warm-up 30
    /// intervals, `min_std` 0.01 (1% of a feature's range), every feature.
    fn default() -> Self {
        Self {
            alpha: 0.05,
            threshold: 5.0,
            warmup: 30,
            min_std: 0.01,
            features: FeatureSelection::All,
        }
    }
}

/// The detector's judgement of one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Largest `|z|` over the watched features (0 for the very first interval).
    pub score: f64,
    /// Index of the feature with the largest `|z|`, if any was scored.
    pub feature: Option<usize>,
    /// Whether the interval is flagged (score above threshold, after warm-up).
    pub anomalous: bool,
}

/// A rolling EWMA z-score detector over a fixed-length vector.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    config: AnomalyConfig,
    watched: Vec<usize>,
    len: usize,
    mean: Vec<f64>,
    var: Vec<f64>,
    seen: u64,
    skipped_non_finite: u64,
}

impl AnomalyDetector {
    /// A detector over vectors of the schema's length ([`FEATURES`]).
    pub fn new(config: AnomalyConfig) -> Result<Self, AnomalyError> {
        Self::with_len(config, FEATURES.len())
    }

    /// A detector over vectors of `len` features.
    pub fn with_len(config: AnomalyConfig, len: usize) -> Result<Self, AnomalyError> {
        if !(config.alpha > 0.0 && config.alpha <= 1.0) {
            return Err(AnomalyError::InvalidAlpha(config.alpha));
        }
        if !(config.threshold > 0.0 && config.threshold.is_finite()) {
            return Err(AnomalyError::InvalidThreshold(config.threshold));
        }
        if !(config.min_std > 0.0 && config.min_std.is_finite()) {
            return Err(AnomalyError::InvalidMinStd(config.min_std));
        }
        let watched = match &config.features {
            FeatureSelection::All => (0..len).collect(),
            FeatureSelection::Indices(v) => {
                if let Some(&index) = v.iter().find(|&&i| i >= len) {
                    return Err(AnomalyError::FeatureOutOfRange { index, len });
                }
                v.clone()
            }
        };
        if watched.is_empty() {
            return Err(AnomalyError::NoFeature);
        }
        Ok(Self {
            config,
            watched,
            len,
            mean: vec![0.0; len],
            var: vec![0.0; len],
            seen: 0,
            skipped_non_finite: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }

    /// Intervals observed so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Non-finite values ignored so far.
    pub fn skipped_non_finite(&self) -> u64 {
        self.skipped_non_finite
    }

    /// Current EWMA mean of feature `i`.
    pub fn mean(&self, i: usize) -> Option<f64> {
        self.mean.get(i).copied()
    }

    /// Scores one interval's vector, then folds it into the estimates.
    pub fn observe(&mut self, x: &[f32]) -> Result<Verdict, AnomalyError> {
        if x.len() != self.len {
            return Err(AnomalyError::LengthMismatch {
                expected: self.len,
                got: x.len(),
            });
        }
        let alpha = self.config.alpha;
        let mut best: Option<(usize, f64)> = None;
        for &i in &self.watched {
            let Some(v) = x.get(i).map(|v| *v as f64) else {
                continue;
            };
            if !v.is_finite() {
                self.skipped_non_finite += 1;
                continue;
            }
            if self.seen == 0 {
                self.mean[i] = v;
                self.var[i] = 0.0;
                continue;
            }
            let diff = v - self.mean[i];
            let std = self.var[i].sqrt().max(self.config.min_std);
            let z = (diff / std).abs();
            if best.is_none_or(|(_, b)| z > b) {
                best = Some((i, z));
            }
            self.mean[i] += alpha * diff;
            self.var[i] = (1.0 - alpha) * (self.var[i] + alpha * diff * diff);
        }
        self.seen += 1;
        let score = best.map_or(0.0, |(_, z)| z);
        let anomalous = self.seen > self.config.warmup && score > self.config.threshold;
        if anomalous {
            log::debug!(
                "anomaly: |z| = {score:.1} on feature {:?}",
                best.and_then(|(i, _)| FEATURES.get(i)).map(|f| f.name)
            );
        }
        Ok(Verdict {
            score,
            feature: best.map(|(i, _)| i),
            anomalous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FeatureId;

    /// A deterministic pseudo-random noise source in `[-1, 1]` (xorshift).
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 2001) as f32 / 1000.0 - 1.0
        }
    }

    fn steady(noise: &mut Noise, amplitude: f32) -> Vec<f32> {
        (0..FEATURES.len())
            .map(|i| 0.3 + 0.01 * i as f32 + amplitude * noise.next())
            .collect()
    }

    #[test]
    fn steady_state_with_noise_is_not_flagged() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default()).expect("valid config");
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let mut flagged = 0;
        for _ in 0..2000 {
            let v = d.observe(&steady(&mut noise, 0.02)).expect("right length");
            assert!(v.score.is_finite());
            flagged += v.anomalous as u32;
        }
        assert_eq!(flagged, 0);
        let m = d.mean(0).expect("feature 0");
        assert!((m - 0.3).abs() < 0.02, "{m}");
    }

    #[test]
    fn a_spike_is_flagged_after_warmup_only() {
        let cfg = AnomalyConfig::default();
        let mut d = AnomalyDetector::new(cfg.clone()).expect("valid config");
        let mut noise = Noise(42);
        // A spike during warm-up is scored but not flagged.
        for _ in 0..10 {
            d.observe(&steady(&mut noise, 0.01)).expect("ok");
        }
        let mut spike = steady(&mut noise, 0.01);
        spike[FeatureId::IoLatencyP99.index()] = 0.95;
        let v = d.observe(&spike).expect("ok");
        assert!(v.score > cfg.threshold);
        assert!(!v.anomalous);
        for _ in 0..200 {
            assert!(!d.observe(&steady(&mut noise, 0.01)).expect("ok").anomalous);
        }
        let mut spike = steady(&mut noise, 0.01);
        spike[FeatureId::IoLatencyP99.index()] = 0.95;
        let v = d.observe(&spike).expect("ok");
        assert!(v.anomalous, "{v:?}");
        assert_eq!(v.feature, Some(FeatureId::IoLatencyP99.index()));
        // Back to normal afterwards.
        let v = d.observe(&steady(&mut noise, 0.01)).expect("ok");
        assert!(!v.anomalous, "{v:?}");
    }

    #[test]
    fn watches_only_selected_features() {
        let idx = FeatureId::CpuUtilisation.index();
        let cfg = AnomalyConfig {
            warmup: 5,
            features: FeatureSelection::Indices(vec![idx]),
            ..AnomalyConfig::default()
        };
        let mut d = AnomalyDetector::new(cfg).expect("valid config");
        let base = vec![0.2f32; FEATURES.len()];
        for _ in 0..20 {
            d.observe(&base).expect("ok");
        }
        let mut other = base.clone();
        other[idx + 1] = 1.0;
        assert!(!d.observe(&other).expect("ok").anomalous);
        let mut watched = base.clone();
        watched[idx] = 0.9;
        let v = d.observe(&watched).expect("ok");
        assert!(v.anomalous);
        assert!((v.score - 70.0).abs() < 1e-3, "{v:?}"); // 0.7 / min_std 0.01
    }

    #[test]
    fn rejects_bad_input() {
        let bad = |c: AnomalyConfig| AnomalyDetector::new(c).err();
        let d = AnomalyConfig::default;
        assert_eq!(
            bad(AnomalyConfig { alpha: 0.0, ..d() }),
            Some(AnomalyError::InvalidAlpha(0.0))
        );
        assert!(matches!(
            bad(AnomalyConfig {
                alpha: f64::NAN,
                ..d()
            }),
            Some(AnomalyError::InvalidAlpha(_))
        ));
        assert_eq!(
            bad(AnomalyConfig {
                threshold: -1.0,
                ..d()
            }),
            Some(AnomalyError::InvalidThreshold(-1.0))
        );
        assert_eq!(
            bad(AnomalyConfig {
                min_std: 0.0,
                ..d()
            }),
            Some(AnomalyError::InvalidMinStd(0.0))
        );
        assert_eq!(
            bad(AnomalyConfig {
                features: FeatureSelection::Indices(vec![99]),
                ..d()
            }),
            Some(AnomalyError::FeatureOutOfRange {
                index: 99,
                len: FEATURES.len()
            })
        );
        assert_eq!(
            bad(AnomalyConfig {
                features: FeatureSelection::Indices(vec![]),
                ..d()
            }),
            Some(AnomalyError::NoFeature)
        );
        let mut det = AnomalyDetector::new(d()).expect("valid");
        assert!(matches!(
            det.observe(&[0.0; 3]),
            Err(AnomalyError::LengthMismatch { got: 3, .. })
        ));
        let mut v = vec![0.5f32; FEATURES.len()];
        v[0] = f32::NAN;
        let verdict = det.observe(&v).expect("ok");
        assert!(verdict.score.is_finite());
        assert_eq!(det.skipped_non_finite(), 1);
    }
}
