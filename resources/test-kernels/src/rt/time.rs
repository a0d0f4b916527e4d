//! Time from the TSC, calibrated by the TSC frequency recorded at CPL 0.
//!
//! `rdtsc` is not trapped at CPL 3. If the monitor did not report the TSC frequency
//! (`cpuid` 0x4000_0010 EAX = 0), 1 GHz is assumed and vCPU 0 prints a warning line at
//! start-up (`warning: TSC kHz unknown, assuming 1 GHz`).

use core::arch::asm;
use core::sync::atomic::Ordering;

use super::boot::TSC_KHZ;

/// TSC frequency assumed when the monitor does not report one (1 GHz).
pub const FALLBACK_TSC_KHZ: u64 = 1_000_000;

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no side effects (CR4.TSD is clear).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Whether the monitor reported the TSC frequency.
pub fn tsc_khz_known() -> bool {
    TSC_KHZ.load(Ordering::Relaxed) != 0
}

/// TSC frequency in kHz (ticks per millisecond), or [`FALLBACK_TSC_KHZ`] if unknown.
pub fn tsc_khz() -> u64 {
    match TSC_KHZ.load(Ordering::Relaxed) {
        0 => FALLBACK_TSC_KHZ,
        khz => khz as u64,
    }
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / tsc_khz() as u128) as u64
}

/// Converts nanoseconds to TSC ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * tsc_khz() as u128 / 1_000_000) as u64
}

/// Nanoseconds since the TSC was zero (roughly: since the VM started).
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}
