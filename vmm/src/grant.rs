//! The host arbiter's grant to this VM (`PUT /grant`, from `vmm host`): the most host
//! cores of CPU time and, per drive, the most bytes per second the VM may take. The
//! grant is a cap applied where the knobs are set ([`crate::runtime::VmRuntime`]): host
//! cores and CPU quota above it are lowered to it, a drive's bandwidth limit above it
//! (or none) is tightened to it, whoever asks (the tuner, `PATCH /vm`, `PATCH /drives`).
//! What was asked is remembered, so a larger grant later gives it back.

use std::collections::BTreeMap;

use devices::rate_limiter::{BucketConfig, RateLimiterConfig};

/// Smallest core grant accepted (a CPU quota below this starves the guest).
pub const MIN_GRANT_CORES: f64 = 0.05;

/// Problems with a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The core grant is not a number in range.
    #[error("cores: {0} is not a number of host cores >= {MIN_GRANT_CORES}")]
    Cores(String),
    /// A drive's bandwidth grant is zero.
    #[error("drives.{0}.bandwidth_bps: must be at least 1 byte per second")]
    Bandwidth(String),
    /// No drive with this id.
    #[error("drives.{0}: no drive with this id")]
    UnknownDrive(String),
    /// The CPU list is empty, too long, or names a CPU the VM may not use.
    #[error("cpus: {0}")]
    Cpus(String),
    /// The weight is outside 1..=10000.
    #[error("weight: {0} is outside 1..=10000")]
    Weight(u32),
}

/// What the arbiter grants; `None` / absent drive: no cap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grant {
    /// Host cores of CPU time (fractional).
    pub cores: Option<f64>,
    /// Per drive id, the most bytes per second.
    pub drive_bps: BTreeMap<String, u64>,
    /// The host CPUs every thread of the VM runs on (its vCPUs, its event-loop thread):
    /// placement on top of the time of `cores`; `None`: the CPUs the VM was started with.
    pub cpus: Option<Vec<usize>>,
    /// The weight of the VM's threads (vCPUs and I/O thread, in their cgroup) against
    /// whatever else runs on its CPUs, in cgroup v2 `cpu.weight` units (100 = one
    /// ordinary thread); `None`: left as it is.
    pub weight: Option<u32>,
}

impl Grant {
    /// Checks the values against the VM's drives and `allowed`, the CPUs the VM was
    /// started with (a granted CPU list must be a non-empty subset of them).
    pub fn validate(&self, drive_ids: &[String], allowed: &[usize]) -> Result<(), GrantError> {
        if let Some(w) = self.weight {
            if !(1..=10_000).contains(&w) {
                return Err(GrantError::Weight(w));
            }
        }
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return Err(GrantError::Cpus("the list is empty".into()));
            }
            if cpus.len() > allowed.len() {
                return Err(GrantError::Cpus(format!(
                    "{} CPUs, more than the {} this VM may use",
                    cpus.len(),
                    allowed.len()
                )));
            }
            if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(GrantError::Cpus(format!(
                    "CPU {c} is not among the CPUs this VM may use ({allowed:?})"
                )));
            }
        }
        if let Some(c) = self.cores {
            if !c.is_finite() || c < MIN_GRANT_CORES {
                return Err(GrantError::Cores(c.to_string()));
            }
        }
        for (id, bps) in &self.drive_bps {
            if !drive_ids.iter().any(|d| d == id) {
                return Err(GrantError::UnknownDrive(id.chars().take(64).collect()));
            }
            if *bps == 0 {
                return Err(GrantError::Bandwidth(id.clone()));
            }
        }
        Ok(())
    }

    /// The most host cores (affinity) the vCPU threads may have, out of `total`: the
    /// grant rounded up (its fraction is enforced by the CPU quota), at least 1, and no
    /// more than the granted CPU list holds.
    pub fn core_cap(&self, total: u32) -> u32 {
        let total = match &self.cpus {
            Some(c) => total.min(u32::try_from(c.len()).unwrap_or(u32::MAX)),
            None => total,
        };
        match self.cores {
            // Finite and >= MIN_GRANT_CORES (validated); the cast saturates anyway.
            Some(c) => (c.ceil() as u32).clamp(1, total.max(1)),
            None => total.max(1),
        }
    }

    /// `want` host cores, capped by the grant.
    pub fn cap_cores(&self, want: u32, total: u32) -> u32 {
        want.min(self.core_cap(total))
    }

    /// A CPU quota of `want` cores, capped by the grant.
    pub fn cap_quota(&self, want: f64) -> f64 {
        match self.cores {
            Some(c) => want.min(c),
            None => want,
        }
    }

    /// `want` for drive `id` with its bandwidth capped by the grant (the operations
    /// bucket is kept).
    pub fn cap_limits(&self, id: &str, want: RateLimiterConfig) -> RateLimiterConfig {
        let Some(&cap) = self.drive_bps.get(id) else {
            return want;
        };
        let over = match want.bandwidth {
            Some(b) if !b.is_unlimited() => bucket_rate(&b) > cap as f64,
            _ => true,
        };
        if !over {
            return want;
        }
        RateLimiterConfig {
            bandwidth: Some(bucket_of_rate(cap)),
            ops: want.ops,
        }
    }
}

/// Tokens per second of a (limited) bucket.
fn bucket_rate(b: &BucketConfig) -> f64 {
    b.size as f64 * 1000.0 / b.refill_time_ms.max(1) as f64
}

/// A bucket of `per_sec` tokens per second, refilled every 100 ms (every second for
/// rates below 10/s), no burst.
fn bucket_of_rate(per_sec: u64) -> BucketConfig {
    if per_sec >= 10 {
        BucketConfig {
            size: per_sec / 10,
            one_time_burst: 0,
            refill_time_ms: 100,
        }
    } else {
        BucketConfig {
            size: per_sec.max(1),
            one_time_burst: 0,
            refill_time_ms: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(cores: Option<f64>, drives: &[(&str, u64)]) -> Grant {
        Grant {
            cores,
            drive_bps: drives.iter().map(|(i, b)| (i.to_string(), *b)).collect(),
            cpus: None,
            weight: None,
        }
    }

    #[test]
    fn cores_are_capped_by_the_grant_rounded_up() {
        let g = grant(Some(1.5), &[]);
        assert_eq!(g.core_cap(4), 2);
        assert_eq!(g.cap_cores(4, 4), 2);
        assert_eq!(g.cap_cores(1, 4), 1);
        assert_eq!(g.cap_quota(4.0), 1.5);
        assert_eq!(g.cap_quota(1.0), 1.0);
        assert_eq!(grant(Some(0.25), &[]).cap_cores(2, 2), 1);
        assert_eq!(grant(Some(8.0), &[]).cap_cores(2, 2), 2);
        assert_eq!(Grant::default().cap_cores(3, 4), 3);
        assert_eq!(Grant::default().cap_quota(3.5), 3.5);
    }

    #[test]
    fn a_drive_bandwidth_above_the_grant_is_tightened_to_it() {
        let g = grant(None, &[("blk0", 1_000_000)]);
        let unlimited = RateLimiterConfig::default();
        let capped = g.cap_limits("blk0", unlimited);
        let b = capped.bandwidth.unwrap();
        assert_eq!(bucket_rate(&b), 1_000_000.0);
        // Below the grant: kept as asked, operations bucket untouched.
        let low = RateLimiterConfig {
            bandwidth: Some(bucket_of_rate(500_000)),
            ops: Some(bucket_of_rate(100)),
        };
        assert_eq!(g.cap_limits("blk0", low), low);
        let high = RateLimiterConfig {
            bandwidth: Some(bucket_of_rate(5_000_000)),
            ops: Some(bucket_of_rate(100)),
        };
        let c = g.cap_limits("blk0", high);
        assert_eq!(bucket_rate(&c.bandwidth.unwrap()), 1_000_000.0);
        assert_eq!(c.ops, high.ops);
        // Another drive: no cap.
        assert_eq!(g.cap_limits("blk1", unlimited), unlimited);
        assert!(c.validate().is_ok());
        assert!(g
            .cap_limits("blk0", RateLimiterConfig::default())
            .validate()
            .is_ok());
        let tiny = grant(None, &[("blk0", 3)]).cap_limits("blk0", unlimited);
        assert!(tiny.validate().is_ok());
    }

    #[test]
    fn bad_grants_are_refused_with_the_field() {
        let ids = vec!["blk0".to_string()];
        let cpus = [0, 1];
        assert!(grant(Some(0.5), &[("blk0", 1)])
            .validate(&ids, &cpus)
            .is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.01] {
            let e = grant(Some(bad), &[]).validate(&ids, &cpus).unwrap_err();
            assert!(e.to_string().starts_with("cores:"), "{e}");
        }
        let e = grant(None, &[("blk9", 1)])
            .validate(&ids, &cpus)
            .unwrap_err();
        assert_eq!(e.to_string(), "drives.blk9: no drive with this id");
        let e = grant(None, &[("blk0", 0)])
            .validate(&ids, &cpus)
            .unwrap_err();
        assert!(e.to_string().contains("bandwidth_bps"), "{e}");
        // CPU lists: a non-empty subset of the allowed CPUs.
        let with = |c: Vec<usize>| Grant {
            cpus: Some(c),
            ..grant(Some(1.0), &[])
        };
        assert!(with(vec![1]).validate(&ids, &cpus).is_ok());
        for (bad, says) in [
            (vec![], "empty"),
            (vec![2], "CPU 2 is not among"),
            (vec![0, 1, 1], "more than the 2"),
        ] {
            let e = with(bad).validate(&ids, &cpus).unwrap_err().to_string();
            assert!(e.starts_with("cpus: ") && e.contains(says), "{e}");
        }
        for w in [0, 10_001] {
            let e = Grant {
                weight: Some(w),
                ..grant(None, &[])
            };
            assert!(e
                .validate(&ids, &cpus)
                .unwrap_err()
                .to_string()
                .starts_with("weight:"));
        }
        // The affinity cap never exceeds the CPU list.
        assert_eq!(with(vec![1]).core_cap(2), 1);
        assert_eq!(
            Grant {
                cores: Some(2.0),
                ..with(vec![0, 1])
            }
            .core_cap(2),
            2
        );
    }
}
