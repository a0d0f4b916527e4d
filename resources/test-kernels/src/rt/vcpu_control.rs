//! The monitor's paravirtual vCPU control device (guest side): how many vCPUs the guest
//! is asked to use, and "park me" for the others. Layout: BOOT.md, "vCPU control device".
//! Every access is a VM exit (~26 us here), so workers check every few milliseconds.

use core::sync::atomic::{AtomicU8, Ordering};

/// Guest-physical address of the device.
pub const ADDR: u64 = 0xd200_0000;
const MAGIC: u32 = 0x4343_5654;
const REG_ACTIVE: u64 = 0x08;
const REG_PARK: u64 = 0x10;
const REG_RELEASE: u64 = 0x14;

/// 0 = not probed, 1 = present, 2 = absent.
static STATE: AtomicU8 = AtomicU8::new(0);

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
