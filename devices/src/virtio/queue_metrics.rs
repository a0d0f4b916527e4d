//! Per-queue counters kept with atomics (no locks, no allocation per request), read by
//! the monitor's telemetry while the device runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets in microseconds; one more bucket holds
/// everything above the last bound.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

/// Live counters of one virtio queue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    throttled_ns: AtomicU64,
    depth_sum: AtomicU64,
    depth_samples: AtomicU64,
    latency_ns_sum: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

/// A copy of [`QueueMetrics`] at one instant (all counters cumulative).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueMetricsSnapshot {
    /// Requests completed.
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Requests that ended with an error status.
    pub errors: u64,
    /// Nanoseconds requests waited on a rate limiter.
    pub throttled_ns: u64,
    /// Sum of sampled queue depths.
    pub depth_sum: u64,
    /// Number of depth samples.
    pub depth_samples: u64,
    /// Sum of request latencies in nanoseconds.
    pub latency_ns_sum: u64,
    /// Latency histogram counts (see [`LATENCY_BUCKETS_US`]).
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
}

impl QueueMetrics {
    /// Counts one completed request of `bytes` data bytes.
    pub fn record_request(&self, bytes: u64, error: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.latency_ns_sum.fetch_add(ns, Ordering::Relaxed);
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds time spent waiting on a rate limiter.
    pub fn add_throttled(&self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records how many requests were waiting in the queue.
    pub fn sample_depth(&self, depth: u64) {
        self.depth_sum.fetch_add(depth, Ordering::Relaxed);
        self.depth_samples.fetch_add(1, Ordering::Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> QueueMetricsSnapshot {
        let mut latency_buckets = [0u64; LATENCY_BUCKETS_US.len() + 1];
        for (dst, src) in latency_buckets.iter_mut().zip(self.latency.iter()) {
            *dst = src.load(Ordering::Relaxed);
        }
        QueueMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            throttled_ns: self.throttled_ns.load(Ordering::Relaxed),
            depth_sum: self.depth_sum.load(Ordering::Relaxed),
            depth_samples: self.depth_samples.load(Ordering::Relaxed),
            latency_ns_sum: self.latency_ns_sum.load(Ordering::Relaxed),
            latency_buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let m = QueueMetrics::default();
        m.record_request(4096, false, Duration::from_micros(5));
        m.record_request(512, true, Duration::from_micros(30));
        m.record_request(0, false, Duration::from_secs(10));
        m.sample_depth(3);
        m.add_throttled(Duration::from_millis(2));
        let s = m.snapshot();
        assert_eq!((s.requests, s.bytes, s.errors), (3, 4608, 1));
        assert_eq!(s.latency_buckets[0], 1);
        assert_eq!(s.latency_buckets[2], 1);
        assert_eq!(s.latency_buckets[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(
            (s.depth_sum, s.depth_samples, s.throttled_ns),
            (3, 1, 2_000_000)
        );
    }
}
