//! Per-queue counters kept with atomics (no locks, no allocation per request), read by
//! the monitor's telemetry while the device runs, and the per-queue [`ArrivalStamps`]
//! that time each request from when the device first saw it available.
//!
//! A request's latency is its own time: from the event-loop wake that found it in the
//! available ring (the wake that read the queue's ioeventfd and saw `avail.idx` move) to
//! its completion (the used-ring write), including the time it waited on a rate limiter
//! or behind other drives in the I/O scheduler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// Counts one completed request of `bytes` data bytes that took `latency` from when
    /// the device first saw it available (its [`ArrivalStamps`] stamp) to its used-ring
    /// write.
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

/// When the device first saw each entry of a queue's available ring.
///
/// One slot per ring position, `capacity` slots (the queue's maximum size rounded up to
/// a power of two), so the structure is bounded by the queue size, which the guest cannot
/// grow: at most that many requests are outstanding, and since the capacity divides
/// 65536 the available index (mod 2^16) maps outstanding entries to distinct slots.
#[derive(Debug)]
pub struct ArrivalStamps {
    /// Available index up to which entries are stamped.
    seen: u16,
    stamps: Box<[Option<Instant>]>,
}

impl ArrivalStamps {
    /// Stamps for a queue of at most `max_queue_size` entries.
    pub fn new(max_queue_size: u16) -> Self {
        let capacity = usize::from(max_queue_size.max(1)).next_power_of_two();
        Self {
            seen: 0,
            stamps: vec![None; capacity].into_boxed_slice(),
        }
    }

    fn slot(&self, index: u16) -> usize {
        usize::from(index) & (self.stamps.len() - 1)
    }

    /// Forgets every stamp; the next entry the device takes is `next_avail` (the queue
    /// was (re)activated).
    pub fn reset(&mut self, next_avail: u16) {
        self.seen = next_avail;
        self.stamps.iter_mut().for_each(|s| *s = None);
    }

    /// Stamps the entries the driver made available since the last call (`[seen,
    /// avail)`, where `next_avail` is the next entry the device will take) with `now()`,
    /// read only when there is something new. Touches at most `capacity` slots whatever
    /// the indices say. Returns how many entries were stamped.
    pub fn note(&mut self, next_avail: u16, avail: u16, now: impl FnOnce() -> Instant) -> u16 {
        let outstanding = avail.wrapping_sub(next_avail);
        // Entries the device already took without a stamp (or a guest moving its index
        // backwards): start from the device's position.
        if avail.wrapping_sub(self.seen) > outstanding {
            self.seen = next_avail;
        }
        let fresh = avail.wrapping_sub(self.seen);
        if fresh == 0 {
            return 0;
        }
        let cap = self.stamps.len();
        let fresh = usize::from(fresh).min(cap);
        let at = now();
        let first = avail.wrapping_sub(fresh as u16);
        for k in 0..fresh {
            let slot = self.slot(first.wrapping_add(k as u16));
            self.stamps[slot] = Some(at);
        }
        self.seen = avail;
        fresh as u16
    }

    /// Takes the stamp of the entry at available index `index` (the request the device
    /// is taking), leaving its slot empty.
    pub fn take(&mut self, index: u16) -> Option<Instant> {
        let slot = self.slot(index);
        self.stamps[slot].take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_stamps_keep_the_first_sighting_and_stay_bounded() {
        let mut s = ArrivalStamps::new(256);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        // Three entries seen at t0; two more at t1; the first three keep t0.
        assert_eq!(s.note(0, 3, || t0), 3);
        assert_eq!(s.note(0, 3, || panic!("nothing new: no clock read")), 0);
        assert_eq!(s.note(0, 5, || t1), 2);
        assert_eq!(s.take(0), Some(t0));
        assert_eq!(s.take(2), Some(t0));
        assert_eq!(s.take(3), Some(t1));
        assert_eq!(s.take(3), None, "taken once");
        // Indices wrap at 2^16.
        s.reset(65534);
        assert_eq!(s.note(65534, 2, || t1), 4);
        assert_eq!(s.take(65535), Some(t1));
        assert_eq!(s.take(1), Some(t1));
        // A runaway index touches at most the capacity.
        let mut s = ArrivalStamps::new(16);
        assert_eq!(s.note(0, 40_000, || t0), 16);
        // An index moved backwards restarts from the device's position.
        let mut s = ArrivalStamps::new(16);
        s.note(0, 4, || t0);
        assert_eq!(s.note(2, 3, || t1), 1);
        assert_eq!(s.take(2), Some(t1));
    }

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
