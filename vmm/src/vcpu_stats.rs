//! Per-vCPU counters kept in the run loop: exits by reason and the time spent in the guest
//! (inside `KVM_RUN`) versus in the monitor (handling the exit). Atomics only, no lock and
//! no allocation per exit, so they stay on in production; a reader takes a snapshot at
//! any time.

use std::sync::atomic::{AtomicU64, Ordering};

use tuner::counters::{ExitKind, VcpuCounters};

/// Live counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: [AtomicU64; ExitKind::COUNT],
    guest_ns: AtomicU64,
    monitor_ns: AtomicU64,
}

impl VcpuStats {
    /// Counts one exit of `kind`.
    #[inline]
    pub fn count_exit(&self, kind: ExitKind) {
        self.exits[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds time spent in `KVM_RUN` and in the monitor's exit handling.
    #[inline]
    pub fn add_times(&self, guest_ns: u64, monitor_ns: u64) {
        self.guest_ns.fetch_add(guest_ns, Ordering::Relaxed);
        self.monitor_ns.fetch_add(monitor_ns, Ordering::Relaxed);
    }

    /// Exits of `kind` so far.
    pub fn exits(&self, kind: ExitKind) -> u64 {
        self.exits[kind.index()].load(Ordering::Relaxed)
    }

    /// A copy for the tuner (KVM's binary stats and the thread's run delay are added by
    /// the caller).
    pub fn snapshot(&self, index: u32) -> VcpuCounters {
        let mut exits = [0u64; ExitKind::COUNT];
        for (dst, src) in exits.iter_mut().zip(self.exits.iter()) {
            *dst = src.load(Ordering::Relaxed);
        }
        VcpuCounters {
            index,
            exits,
            guest_ns: self.guest_ns.load(Ordering::Relaxed),
            monitor_ns: self.monitor_ns.load(Ordering::Relaxed),
            kvm_stats: Vec::new(),
            run_delay_ns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_time() {
        let s = VcpuStats::default();
        s.count_exit(ExitKind::IoOut);
        s.count_exit(ExitKind::IoOut);
        s.count_exit(ExitKind::MmioRead);
        s.add_times(100, 7);
        let snap = s.snapshot(3);
        assert_eq!(snap.index, 3);
        assert_eq!(snap.exits[ExitKind::IoOut.index()], 2);
        assert_eq!(snap.exits[ExitKind::MmioRead.index()], 1);
        assert_eq!((snap.guest_ns, snap.monitor_ns), (100, 7));
    }
}
