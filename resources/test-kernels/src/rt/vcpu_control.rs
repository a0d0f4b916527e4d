//! The monitor's paravirtual vCPU control device (guest side): how many vCPUs the guest
//! is asked to use, "park me" for the others, and a paravirtual idle ([`idle_us`]) for
//! vCPUs with nothing to do for a while (CPL 3 code cannot `hlt`). Layout: BOOT.md,
//! "vCPU control device". Every access is a VM exit (~26 us here), so workers check every
//! few milliseconds.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU8, Ordering};

use super::time::{ns_to_ticks, rdtsc};

/// Guest-physical address of the device.
pub const ADDR: u64 = 0xd200_0000;
const MAGIC: u32 = 0x4343_5654;
const REG_ACTIVE: u64 = 0x08;
const REG_PARK: u64 = 0x10;
const REG_RELEASE: u64 = 0x14;
const REG_VERSION: u64 = 0x04;
const REG_IDLE: u64 = 0x18;
/// First layout version with the idle register.
const IDLE_VERSION: u32 = 2;
/// Longest idle the monitor grants per request (it clamps longer ones).
pub const MAX_IDLE_US: u32 = 10_000;

/// 0 = not probed, 1 = present, 2 = absent.
static STATE: AtomicU8 = AtomicU8::new(0);
/// 0 = not probed, 1 = the device has the idle register, 2 = it does not (or no device).
static IDLE_STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the monitor offers the device (probed once, then cached).
pub fn present() -> bool {
    match STATE.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: the window is identity-mapped and user accessible; an absent
            // device reads as all ones.
            let magic = unsafe { super::io::mmio_read32(ADDR) };
            let here = magic == MAGIC;
            STATE.store(if here { 1 } else { 2 }, Ordering::Release);
            here
        }
    }
}

/// vCPUs the guest is asked to use (`u32::MAX` without the device: use them all).
pub fn active() -> u32 {
    if !present() {
        return u32::MAX;
    }
    // SAFETY: as in `present`.
    unsafe { super::io::mmio_read32(ADDR + REG_ACTIVE) }
}

/// Parks vCPU `cpu` until the monitor wants it again (returns at once without the device).
pub fn park(cpu: usize) {
    if !present() {
        return;
    }
    // SAFETY: as in `present`; the monitor holds this vCPU inside the write while parked.
    unsafe { super::io::mmio_write32(ADDR + REG_PARK, cpu as u32) };
}

/// Releases every parked vCPU for good (call when the work is over).
pub fn release_all() {
    if !present() {
        return;
    }
    // SAFETY: as in `present`.
    unsafe { super::io::mmio_write32(ADDR + REG_RELEASE, 1) };
}

/// Whether the device offers the idle register (layout version 2 or later; cached).
pub fn has_idle() -> bool {
    match IDLE_STATE.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: as in `present` (only read once the device is known to be there).
            let here =
                present() && unsafe { super::io::mmio_read32(ADDR + REG_VERSION) } >= IDLE_VERSION;
            IDLE_STATE.store(if here { 1 } else { 2 }, Ordering::Release);
            here
        }
    }
}

/// Idles the calling vCPU for up to min(`us`, [`MAX_IDLE_US`]) microseconds without using
/// a host CPU: the monitor blocks this vCPU's thread inside the write (a bounded HLT).
/// The monitor may return early (the VM stops, or the vCPU count asked of the guest
/// changes), so callers loop on their own clock. Without the device (or an older one
/// without the idle register) it spins on `pause` for the same time instead. 0 returns
/// at once.
pub fn idle_us(us: u32) {
    let us = us.min(MAX_IDLE_US);
    if us == 0 {
        return;
    }
    if has_idle() {
        // SAFETY: as in `present`; the monitor holds this vCPU inside the write.
        unsafe { super::io::mmio_write32(ADDR + REG_IDLE, us) };
        return;
    }
    let start = rdtsc();
    let ticks = ns_to_ticks(u64::from(us) * 1_000);
    while rdtsc().wrapping_sub(start) < ticks {
        spin_loop();
    }
}
