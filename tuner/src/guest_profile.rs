//! The guest profiler's counters as the tuner sees them (the monitor samples each vCPU's
//! instruction pointer and names the function it falls in; `vmm::profiler`) and the
//! per-interval shares computed from two snapshots: of the samples, how many fell in the
//! guest's idle or spin-wait code, in its I/O driver, in its own compute, and in its
//! hottest function.
//!
//! These shares ride in every [`crate::agent::Sample`] and in `GET /vm`; they are not
//! features of the policy's performance vector yet (that is a schema change, with a
//! retraining, still to come).

/// What kind of guest code a function is, judged from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CodeClass {
    /// Idle loops, halts, parking, spin-waits on locks or barriers.
    Idle,
    /// Device drivers and their polling (virtio, block, network).
    Io,
    /// Anything else: the guest's own work (and addresses no symbol covers).
    #[default]
    Compute,
}

impl CodeClass {
    /// Name used in JSON answers.
    pub fn as_str(self) -> &'static str {
        match self {
            CodeClass::Idle => "idle",
            CodeClass::Io => "io",
            CodeClass::Compute => "compute",
        }
    }
}

/// One function's cumulative sample count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FunctionCount {
    /// Its class.
    pub class: CodeClass,
    /// Samples that fell in it since the VM started.
    pub count: u64,
}

/// Cumulative profiler counters. `functions` only grows at its end (a function enters the
/// list at its first sample and keeps its place), so an earlier snapshot's list is a
/// prefix of a later one's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileCounters {
    /// Samples per second per vCPU asked for now (0: off).
    pub hz: u32,
    /// Every function sampled so far, in order of first sample.
    pub functions: Vec<FunctionCount>,
}

/// The profile of one interval: shares of the interval's samples.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProfileShares {
    /// Samples taken in the interval (all vCPUs).
    pub samples: u64,
    /// Share in idle, halt or spin-wait code.
    pub idle: f64,
    /// Share in the I/O driver.
    pub io: f64,
    /// Share in the rest: the guest's own compute.
    pub compute: f64,
    /// Share of the single hottest function.
    pub hottest: f64,
}

impl ProfileShares {
    /// The shares between two snapshots of the counters; `None` when no sample was taken
    /// in between (profiler off, or every vCPU parked). A list that shrank (a new
    /// profiler) counts from zero.
    pub fn between(prev: Option<&ProfileCounters>, cur: &ProfileCounters) -> Option<Self> {
        let prev_fns: &[FunctionCount] = match prev {
            Some(p) if p.functions.len() <= cur.functions.len() => &p.functions,
            _ => &[],
        };
        let (mut total, mut idle, mut io, mut hottest) = (0u64, 0u64, 0u64, 0u64);
        for (i, f) in cur.functions.iter().enumerate() {
            let before = prev_fns.get(i).map_or(0, |p| p.count);
            let d = f.count.saturating_sub(before);
            total = total.saturating_add(d);
            hottest = hottest.max(d);
            match f.class {
                CodeClass::Idle => idle += d,
                CodeClass::Io => io += d,
                CodeClass::Compute => {}
            }
        }
        if total == 0 {
            return None;
        }
        let share = |n: u64| n as f64 / total as f64;
        Some(Self {
            samples: total,
            idle: share(idle),
            io: share(io),
            compute: share(total - idle - io),
            hottest: share(hottest),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(class: CodeClass, count: u64) -> FunctionCount {
        FunctionCount { class, count }
    }

    #[test]
    fn shares_come_from_the_interval_only() {
        let prev = ProfileCounters {
            hz: 100,
            functions: vec![f(CodeClass::Compute, 50), f(CodeClass::Idle, 10)],
        };
        let cur = ProfileCounters {
            hz: 100,
            functions: vec![
                f(CodeClass::Compute, 56),
                f(CodeClass::Idle, 12),
                f(CodeClass::Io, 2),
            ],
        };
        let s = ProfileShares::between(Some(&prev), &cur).expect("samples");
        assert_eq!(s.samples, 10);
        assert!((s.compute - 0.6).abs() < 1e-12);
        assert!((s.idle - 0.2).abs() < 1e-12);
        assert!((s.io - 0.2).abs() < 1e-12);
        assert!((s.hottest - 0.6).abs() < 1e-12);
        assert_eq!(ProfileShares::between(Some(&cur), &cur), None);
        // A first snapshot counts everything.
        assert_eq!(
            ProfileShares::between(None, &prev).map(|s| s.samples),
            Some(60)
        );
    }
}
