//! Predictive input: a one-step-ahead forecast of the performance vector.
//!
//! Each feature of the normalised vector is forecast independently with Holt's linear
//! trend method (double exponential smoothing). For a series `x_1, x_2, ...`:
//!
//! ```text
//! first value:  level_1 = x_1,  trend_1 = 0
//! then:         level_t = alpha * x_t + (1 - alpha) * (level_{t-1} + trend_{t-1})
//!               trend_t = beta * (level_t - level_{t-1}) + (1 - beta) * trend_{t-1}
//! forecast:     x^_{t+h} = clamp(level_t + h * trend_t, 0, 1)
//! ```
//!
//! `alpha` in `(0, 1]` weighs new values against the level (1 = no smoothing), `beta` in
//! `[0, 1]` weighs the newest slope against the trend (0 = no trend, i.e. plain EWMA
//! forecasting). Defaults: `alpha = 0.5`, `beta = 0.3` (a level spanning about the last
//! three intervals and a trend reacting within a few). Forecasts are clamped to `[0, 1]`
//! since the vector is normalised.
//!
//! How the tuner uses it: a policy whose input size is twice the schema's length gets
//! the current vector followed by the one-step forecast (`[x_t, x^_{t+1}]`); the
//! threshold policy in predictive mode scales on the larger of the current and the
//! forecast utilisation (scale up early on a rising trend, scale down only when both are
//! low). Non-finite inputs are treated as 0.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of the forecaster.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ForecastError {
    /// A smoothing factor outside its range.
    #[error("Holt smoothing factors must satisfy 0 < alpha <= 1 and 0 <= beta <= 1 (got alpha {alpha}, beta {beta})")]
    BadFactors {
        /// Level smoothing factor.
        alpha: f64,
        /// Trend smoothing factor.
        beta: f64,
    },
    /// A vector of another length than the forecaster's.
    #[error("vector has {got} features, the forecaster {expected}")]
    LengthMismatch {
        /// The forecaster's length.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
}

/// Smoothing factors of Holt's method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastConfig {
    /// Level smoothing factor, in `(0, 1]` (default 0.5).
    pub alpha: f64,
    /// Trend smoothing factor, in `[0, 1]` (default 0.3).
    pub beta: f64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            beta: 0.3,
        }
    }
}

impl ForecastConfig {
    /// Checks the ranges of the factors.
    pub fn validate(&self) -> Result<(), ForecastError> {
        let ok = self.alpha > 0.0 && self.alpha <= 1.0 && (0.0..=1.0).contains(&self.beta);
        if ok {
            Ok(())
        } else {
            Err(ForecastError::BadFactors {
                alpha: self.alpha,
                beta: self.beta,
            })
        }
    }
}

/// Holt's linear trend forecaster over a vector of features.
#[derive(Debug, Clone)]
pub struct HoltForecaster {
    config: ForecastConfig,
    level: Vec<f64>,
    trend: Vec<f64>,
    observed: u64,
}

impl HoltForecaster {
    /// A forecaster for vectors of `len` features.
    pub fn new(len: usize, config: ForecastConfig) -> Result<HoltForecaster, ForecastError> {
        config.validate()?;
        Ok(HoltForecaster {
            config,
            level: vec![0.0; len],
            trend: vec![0.0; len],
            observed: 0,
        })
    }

    /// The smoothing factors.
    pub fn config(&self) -> ForecastConfig {
        self.config
    }

    /// Number of features.
    pub fn len(&self) -> usize {
        self.level.len()
    }

    /// Whether the forecaster has no feature.
    pub fn is_empty(&self) -> bool {
        self.level.is_empty()
    }

    /// Vectors observed since creation or the last reset.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// Forgets the history.
    pub fn reset(&mut self) {
        self.level.iter_mut().for_each(|x| *x = 0.0);
        self.trend.iter_mut().for_each(|x| *x = 0.0);
        self.observed = 0;
    }

    /// Updates level and trend with the vector of one interval.
    pub fn observe(&mut self, x: &[f32]) -> Result<(), ForecastError> {
        if x.len() != self.level.len() {
            return Err(ForecastError::LengthMismatch {
                expected: self.level.len(),
                got: x.len(),
            });
        }
        let ForecastConfig { alpha, beta } = self.config;
        for ((level, trend), v) in self.level.iter_mut().zip(self.trend.iter_mut()).zip(x) {
            let v = if v.is_finite() { f64::from(*v) } else { 0.0 };
            if self.observed == 0 {
                *level = v;
                *trend = 0.0;
            } else {
                let prev = *level;
                *level = alpha * v + (1.0 - alpha) * (prev + *trend);
                *trend = beta * (*level - prev) + (1.0 - beta) * *trend;
            }
        }
        self.observed += 1;
        Ok(())
    }

    /// The forecast `h` steps ahead (`level + h * trend`, clamped to `[0, 1]`); zeros
    /// before the first observation.
    pub fn forecast(&self, h: u32) -> Vec<f32> {
        self.level
            .iter()
            .zip(&self.trend)
            .map(|(l, t)| (l + f64::from(h) * t).clamp(0.0, 1.0) as f32)
            .collect()
    }

    /// The one-step-ahead forecast.
    pub fn next(&self) -> Vec<f32> {
        self.forecast(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_linear_trend() {
        let mut f = HoltForecaster::new(2, ForecastConfig::default()).unwrap();
        assert_eq!(f.next(), vec![0.0, 0.0]);
        for t in 0..30 {
            let x = 0.1 + 0.02 * t as f32;
            f.observe(&[x, 0.5]).unwrap();
        }
        // Next value of the ramp is 0.1 + 0.02 * 30 = 0.7; the constant stays.
        let next = f.next();
        assert!((next[0] - 0.70).abs() < 0.01, "{next:?}");
        assert!((next[1] - 0.5).abs() < 1e-6);
        let two = f.forecast(2);
        assert!((two[0] - 0.72).abs() < 0.01, "{two:?}");
        // A forecast beyond the range is clamped.
        assert_eq!(f.forecast(100)[0], 1.0);
        assert_eq!(f.observed(), 30);
    }

    #[test]
    fn matches_the_recurrence_by_hand() {
        let cfg = ForecastConfig {
            alpha: 0.5,
            beta: 0.5,
        };
        let mut f = HoltForecaster::new(1, cfg).unwrap();
        f.observe(&[0.2]).unwrap(); // level 0.2, trend 0
        f.observe(&[0.4]).unwrap(); // level 0.3, trend 0.05
        f.observe(&[0.6]).unwrap(); // level 0.475, trend 0.1125
        let next = f.next()[0];
        assert!((next - 0.5875).abs() < 1e-6, "{next}");
        // beta = 0 is a plain EWMA: no trend.
        let mut ewma = HoltForecaster::new(
            1,
            ForecastConfig {
                alpha: 0.5,
                beta: 0.0,
            },
        )
        .unwrap();
        for x in [0.2, 0.4, 0.6] {
            ewma.observe(&[x]).unwrap();
        }
        assert!((ewma.next()[0] - 0.45).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_input_and_config() {
        assert!(HoltForecaster::new(
            3,
            ForecastConfig {
                alpha: 0.0,
                beta: 0.3
            }
        )
        .is_err());
        assert!(ForecastConfig {
            alpha: 0.5,
            beta: 1.5
        }
        .validate()
        .is_err());
        let mut f = HoltForecaster::new(3, ForecastConfig::default()).unwrap();
        assert_eq!(
            f.observe(&[0.1, 0.2]),
            Err(ForecastError::LengthMismatch {
                expected: 3,
                got: 2
            })
        );
        f.observe(&[f32::NAN, f32::INFINITY, 0.5]).unwrap();
        assert_eq!(f.next(), vec![0.0, 0.0, 0.5]);
        f.reset();
        assert_eq!(f.observed(), 0);
        assert_eq!(f.next(), vec![0.0; 3]);
        assert_eq!(f.len(), 3);
    }
}
