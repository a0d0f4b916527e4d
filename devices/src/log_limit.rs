//! Rate limiting of log lines a guest can trigger.
//!
//! Every guest-triggered message goes through [`guest_log!`](crate::guest_log) (or its
//! level shorthands [`guest_warn!`](crate::guest_warn) and
//! [`guest_debug!`](crate::guest_debug)). Each call site owns one [`LogLimit`]: it lets
//! one line through per [`LOG_INTERVAL`]; the next line that gets through carries the
//! number of lines suppressed in between. A guest that triggers one message in a tight
//! loop therefore produces about one line per second and call site, however fast it loops.
//! The limiter is per call site, not per device: with several drives, a flood on one can
//! hide another's line of the same kind for that second (its count is in the next line).
//!
//! Suppressed lines are counted in a process-wide total ([`suppressed_total`]) for the
//! monitor's metrics.
//!
//! Hand-written (about 40 lines) because the `log` crate has no rate limiting, and the
//! crates that add it wrap the logger itself, which would also limit the monitor's own
//! (not guest-triggered) messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Shortest time between two lines of one call site.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Lines suppressed by every limiter of the process since it started.
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    // Offset by one interval so that the very first line of a call site always passes.
    let ns = base.elapsed().as_nanos().min(u128::from(u64::MAX / 2)) as u64;
    ns.saturating_add(LOG_INTERVAL.as_nanos() as u64)
}

/// The state of one call site: when it may log next and how many lines it dropped.
#[derive(Debug, Default)]
pub struct LogLimit {
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// A limiter that lets its first line through.
    pub const fn new() -> Self {
        Self {
            next_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the lines suppressed since the
    /// last one that passed, or `None` (the line is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ns())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ns.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now.saturating_add(LOG_INTERVAL.as_nanos() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        SUPPRESSED_TOTAL.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Logs at `level` through a limiter private to this call site (see the module docs).
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if log::log_enabled!($level) {
            if let Some(skipped) = LIMIT.allow() {
                if skipped > 0 {
                    log::log!(
                        $level,
                        "{} ({skipped} similar lines suppressed)",
                        format_args!($($arg)+)
                    );
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

/// [`guest_log!`] at WARN.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::guest_log!(log::Level::Warn, $($arg)+) };
}

/// [`guest_log!`] at DEBUG.
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)+) => { $crate::guest_log!(log::Level::Debug, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let l = LogLimit::new();
        let t0 = LOG_INTERVAL.as_nanos() as u64;
        assert_eq!(l.allow_at(t0), Some(0));
        let before = suppressed_total();
        for i in 0..1000 {
            assert_eq!(l.allow_at(t0 + i), None);
        }
        assert!(suppressed_total() >= before + 1000);
        assert_eq!(l.allow_at(t0 + t0 - 1), None);
        assert_eq!(l.allow_at(t0 + t0), Some(1001));
        assert_eq!(l.allow_at(t0 + t0 + 1), None);
    }
}
