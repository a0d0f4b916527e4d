//! The paravirtual vCPU control device: how the monitor tells a guest how many of its
//! vCPUs to use, and how a guest's idle vCPUs park so their threads cost nothing.
//!
//! MMIO layout (little endian, 4 KiB window at [`VCPU_CONTROL_ADDR`]):
//! - 0x00 u32 read: magic `0x43435654` ("TVCC"); 0x04 u32 read: version 2 (version 1 had
//!   no idle register).
//! - 0x08 u32 read: vCPUs the guest is asked to use (`active`); workers with an index at
//!   or above it should park.
//! - 0x0c u32 read: vCPUs the VM has.
//! - 0x10 u32 write: "park me": the guest writes its vCPU index; while that index is at or
//!   above `active`, the monitor keeps the writing vCPU's thread blocked inside the exit
//!   (no KVM_RUN, no host CPU). The write returns once the vCPU is wanted again (or the VM
//!   stops); the guest then re-reads `active`.
//!
//! - 0x14 u32 write: "release all": every parked vCPU returns and later park requests
//!   return at once (a guest finishing its work uses this so no worker stays parked).
//! - 0x18 u32 write: "idle for N microseconds": a bounded, guest-safe HLT for guest code at
//!   CPL 3, which cannot halt. The monitor blocks the writing vCPU's thread inside the exit
//!   for min(N, [`MAX_IDLE_US`]) us, so the time is not spent running the guest (it does
//!   not count as guest time in the vCPU's statistics). 0 returns at once. The write
//!   returns early when the VM stops, after "release all", or when `active` changes (so a
//!   worker sees a new vCPU count without waiting out its idle time).
//!
//! Guest values are checked: a park request naming another vCPU's index, or an index out
//! of range, returns at once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Guest-physical address of the device.
pub const VCPU_CONTROL_ADDR: u64 = 0xd200_0000;
/// Size of its window.
pub const VCPU_CONTROL_SIZE: u64 = 0x1000;
/// Magic value at offset 0.
pub const MAGIC: u32 = 0x4343_5654;
/// Layout version (2: with the idle register).
pub const VERSION: u32 = 2;
/// Longest single idle request (register 0x18), in microseconds; longer ones are clamped.
pub const MAX_IDLE_US: u32 = 10_000;
const REG_ACTIVE: u64 = 0x08;
const REG_TOTAL: u64 = 0x0c;
const REG_PARK: u64 = 0x10;
const REG_RELEASE: u64 = 0x14;
const REG_IDLE: u64 = 0x18;

thread_local! {
    /// The vCPU index of the calling thread (set by each vCPU thread at start), so a guest
    /// cannot park another vCPU by writing its index.
    static CURRENT_VCPU: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    /// Nanoseconds the calling vCPU thread spent blocked in a park or idle request since
    /// [`take_blocked_ns`] last read it.
    static BLOCKED_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Nanoseconds the calling vCPU thread spent blocked (parked or idle) since the last
/// call, and resets the count: the run loop takes it off the exit's monitor time, since a
/// blocked vCPU costs neither the guest nor the monitor any CPU.
pub fn take_blocked_ns() -> u64 {
    BLOCKED_NS.with(|c| c.replace(0))
}

fn add_blocked(since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    BLOCKED_NS.with(|c| c.set(c.get().saturating_add(ns)));
}

/// Records which vCPU the calling thread runs (call once at the start of a vCPU thread).
pub fn set_current_vcpu(index: u32) {
    CURRENT_VCPU.with(|c| c.set(Some(index)));
}

/// Errors of the control path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuControlError {
    /// Asked for zero vCPUs or more than the VM has.
    #[error("active vCPUs must be between 1 and {max}, not {asked}")]
    OutOfRange {
        /// Requested.
        asked: u32,
        /// The VM's vCPUs.
        max: u32,
    },
}

/// The device, shared by the vCPU threads (guest side) and the control path.
#[derive(Debug)]
pub struct VcpuControl {
    total: u32,
    active: Mutex<u32>,
    active_now: AtomicU32,
    wake: Condvar,
    parked: AtomicU32,
    idle_ns: AtomicU64,
    idling: AtomicU32,
    stopping: AtomicBool,
}

impl VcpuControl {
    /// A VM of `total` vCPUs, all active.
    pub fn new(total: u32) -> Self {
        Self {
            total,
            active: Mutex::new(total),
            active_now: AtomicU32::new(total),
            wake: Condvar::new(),
            parked: AtomicU32::new(0),
            idle_ns: AtomicU64::new(0),
            idling: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// vCPUs the guest is asked to use.
    pub fn active(&self) -> u32 {
        self.active_now.load(Ordering::Acquire)
    }

    /// vCPU threads currently blocked in a park request.
    pub fn parked(&self) -> u32 {
        self.parked.load(Ordering::Acquire)
    }

    /// Nanoseconds vCPU threads have spent blocked in idle requests (register 0x18), all
    /// vCPUs, since the VM started.
    pub fn idle_ns(&self) -> u64 {
        self.idle_ns.load(Ordering::Relaxed)
    }

    /// vCPU threads currently blocked in an idle request.
    pub fn idling(&self) -> u32 {
        self.idling.load(Ordering::Acquire)
    }

    /// Asks the guest to use `n` vCPUs; parked vCPUs below `n` wake up.
    pub fn set_active(&self, n: u32) -> Result<(), VcpuControlError> {
        if n == 0 || n > self.total {
            return Err(VcpuControlError::OutOfRange {
                asked: n,
                max: self.total,
            });
        }
        let mut a = match self.active.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *a = n;
        self.active_now.store(n, Ordering::Release);
        self.wake.notify_all();
        crate::guest_log!(
            log::Level::Info,
            "vCPU control: guest asked to use {n} of {} vCPUs",
            self.total
        );
        Ok(())
    }

    /// Releases every parked vCPU for good (the VM is stopping).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _g = self.active.lock();
        self.wake.notify_all();
    }

    fn park(&self, index: u32) {
        let me = CURRENT_VCPU.with(|c| c.get());
        if me != Some(index) || index >= self.total {
            crate::guest_debug!("vCPU control: ignored park request for {index} from {me:?}");
            return;
        }
        let mut a = match self.active.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if index < *a {
            return;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        let since = Instant::now();
        while index >= *a && !self.stopping.load(Ordering::Acquire) {
            a = match self.wake.wait(a) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
        add_blocked(since);
    }
}

impl VcpuControl {
    /// Blocks the calling vCPU thread for min(`us`, [`MAX_IDLE_US`]) microseconds, or less
    /// if the VM stops, every vCPU is released, or `active` changes meanwhile. Returns how
    /// long it blocked.
    pub fn idle(&self, us: u32) -> Duration {
        self.idle_until(us).0
    }

    /// [`VcpuControl::idle`], also saying what ended the wait.
    fn idle_until(&self, us: u32) -> (Duration, IdleEnd) {
        let us = us.min(MAX_IDLE_US);
        if self.stopping.load(Ordering::Acquire) {
            return (Duration::ZERO, IdleEnd::Stopped);
        }
        if us == 0 {
            return (Duration::ZERO, IdleEnd::Deadline);
        }
        let start = Instant::now();
        let deadline = start + Duration::from_micros(u64::from(us));
        let mut a = match self.active.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let active_at_start = *a;
        self.idling.fetch_add(1, Ordering::AcqRel);
        let end = loop {
            if *a != active_at_start {
                break IdleEnd::ActiveChanged;
            }
            if self.stopping.load(Ordering::Acquire) {
                break IdleEnd::Stopped;
            }
            let now = Instant::now();
            if now >= deadline {
                break IdleEnd::Deadline;
            }
            a = match self.wake.wait_timeout(a, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        };
        self.idling.fetch_sub(1, Ordering::AcqRel);
        drop(a);
        let slept = start.elapsed();
        add_blocked(start);
        self.idle_ns.fetch_add(
            u64::try_from(slept.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        (slept, end)
    }
}

/// What ended an idle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleEnd {
    /// Its time ran out (or it asked for none).
    Deadline,
    /// The number of active vCPUs changed.
    ActiveChanged,
    /// The VM is stopping.
    Stopped,
}

impl DeviceMmio for VcpuControl {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            REG_ACTIVE => self.active(),
            REG_TOTAL => self.total,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = *bytes.get(i).unwrap_or(&0);
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset == REG_PARK && data.len() == 4 {
            self.park(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
        } else if offset == REG_RELEASE {
            self.stop();
        } else if offset == REG_IDLE && data.len() == 4 {
            self.idle(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn parked_vcpu_blocks_until_wanted_again() {
        let ctl = Arc::new(VcpuControl::new(2));
        ctl.set_active(1).unwrap();
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            set_current_vcpu(1);
            c.mmio_write(
                MmioAddress(VCPU_CONTROL_ADDR),
                REG_PARK,
                &1u32.to_le_bytes(),
            );
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ctl.parked(), 1);
        assert!(!t.is_finished());
        ctl.set_active(2).unwrap();
        t.join().unwrap();
        assert_eq!(ctl.parked(), 0);
    }

    #[test]
    fn guests_cannot_park_others_or_ask_for_nonsense() {
        let ctl = VcpuControl::new(2);
        ctl.set_active(1).unwrap();
        set_current_vcpu(0);
        // Names vCPU 1 from vCPU 0's thread: returns at once.
        ctl.mmio_write(
            MmioAddress(VCPU_CONTROL_ADDR),
            REG_PARK,
            &1u32.to_le_bytes(),
        );
        ctl.mmio_write(MmioAddress(VCPU_CONTROL_ADDR), REG_PARK, &[1, 0]);
        assert_eq!(
            ctl.set_active(0),
            Err(VcpuControlError::OutOfRange { asked: 0, max: 2 })
        );
        assert!(ctl.set_active(3).is_err());
        let mut m = [0u8; 4];
        ctl.mmio_read(MmioAddress(VCPU_CONTROL_ADDR), REG_ACTIVE, &mut m);
        assert_eq!(u32::from_le_bytes(m), 1);
    }

    fn idle_write(ctl: &VcpuControl, us: u32) -> Duration {
        let start = std::time::Instant::now();
        ctl.mmio_write(MmioAddress(VCPU_CONTROL_ADDR), REG_IDLE, &us.to_le_bytes());
        start.elapsed()
    }

    #[test]
    fn blocked_time_is_counted_per_thread_and_taken_once() {
        let ctl = VcpuControl::new(2);
        let _ = take_blocked_ns();
        let slept = ctl.idle(2_000);
        let blocked = take_blocked_ns();
        assert!(blocked >= 2_000_000, "{blocked} ns");
        assert!(
            blocked as u128 <= slept.as_nanos() + 1_000_000,
            "{blocked} vs {slept:?}"
        );
        assert_eq!(take_blocked_ns(), 0, "taken once");
        // Another thread's idling is not ours.
        let ctl = std::sync::Arc::new(ctl);
        let c = ctl.clone();
        std::thread::spawn(move || c.idle(1_000)).join().unwrap();
        assert_eq!(take_blocked_ns(), 0);
    }

    #[test]
    fn idle_blocks_for_the_asked_time_and_clamps_at_10_ms() {
        let ctl = VcpuControl::new(2);
        let mut m = [0u8; 4];
        ctl.mmio_read(MmioAddress(VCPU_CONTROL_ADDR), 0x04, &mut m);
        assert_eq!(u32::from_le_bytes(m), 2, "version with the idle register");
        // 0 returns at once.
        assert!(idle_write(&ctl, 0) < Duration::from_millis(1));
        // 2 ms: at least the time asked, not much more (a loaded host may add some).
        let t = idle_write(&ctl, 2_000);
        assert!(t >= Duration::from_micros(2_000), "{t:?}");
        assert!(t < Duration::from_millis(8), "{t:?}");
        // Far above the bound: clamped to 10 ms.
        let t = idle_write(&ctl, u32::MAX);
        assert!(t >= Duration::from_millis(10), "{t:?}");
        assert!(t < Duration::from_millis(60), "{t:?}");
        let t = idle_write(&ctl, 50_000);
        assert!(
            t >= Duration::from_millis(10) && t < Duration::from_millis(60),
            "{t:?}"
        );
        // The device accounts for it.
        assert!(ctl.idle_ns() >= 22_000_000, "{}", ctl.idle_ns());
        // A short write is ignored.
        let start = std::time::Instant::now();
        ctl.mmio_write(MmioAddress(VCPU_CONTROL_ADDR), REG_IDLE, &[0x10, 0x27]);
        assert!(start.elapsed() < Duration::from_millis(1));
    }

    /// Waits until a thread is blocked in an idle request (the lock is taken before it
    /// counts itself, so a notification after this cannot be missed).
    fn wait_idling(ctl: &VcpuControl) {
        while ctl.idling() == 0 {
            std::thread::yield_now();
        }
    }

    #[test]
    fn idle_returns_early_when_active_changes_or_the_vm_stops() {
        let ctl = Arc::new(VcpuControl::new(2));
        // What ended each wait, not how long it took: a loaded host may run the woken
        // thread late, but the reason is exact.
        let c = ctl.clone();
        let t = std::thread::spawn(move || c.idle_until(10_000));
        wait_idling(&ctl);
        ctl.set_active(1).unwrap();
        assert_eq!(t.join().unwrap().1, IdleEnd::ActiveChanged);

        let c = ctl.clone();
        let t = std::thread::spawn(move || c.idle_until(10_000));
        wait_idling(&ctl);
        ctl.stop();
        assert_eq!(t.join().unwrap().1, IdleEnd::Stopped);
        // Once stopped, idle requests return at once.
        assert_eq!(ctl.idle_until(10_000), (Duration::ZERO, IdleEnd::Stopped));
    }
}
