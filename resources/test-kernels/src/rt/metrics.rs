//! The monitor's paravirtual metrics device: per-vCPU cumulative counters the monitor
//! sums and exposes (see `BOOT.md`, "Metrics device").
//!
//! # Layout (MMIO at guest-physical [`BASE`] = 0xd100_0000, 4 KiB window, little endian)
//! - 0x000 u32 read: magic [`MAGIC`] 0x584d5654 (`"TVMX"`); 0x004 u32 read: version 1.
//!   Any other magic (an unmapped address reads all ones) means there is no device, and
//!   reporting is a no-op.
//! - Slot `s` (0..[`SLOTS`]) at `0x100 + 0x40 * s`: 0x00 u64 ops completed, 0x08 u64 bytes
//!   processed, 0x10 u64 sum of op latencies in ns, 0x18 u64 number of latency samples.
//!   All four are cumulative; a vCPU writes only its own slot (slot = vCPU index) with
//!   64-bit stores, in that order.
//!
//! # Costs
//! Every access is an MMIO VM exit (~26 us). [`present`] probes once (one read of the
//! magic, plus one of the version if the magic matches) and caches the answer for all
//! vCPUs; [`report`] is 4 stores (~0.1 ms) or nothing if the device is absent. Hot loops
//! use a [`Reporter`], whose fast path is one compare of the TSC, to report at most every
//! `report_ms` milliseconds (command-line parameter, default [`DEFAULT_REPORT_MS`];
//! `report_ms=0` disables reporting altogether, without even probing).

use core::hint::spin_loop;
use core::ptr::write_volatile;
use core::sync::atomic::{AtomicU8, Ordering};

use super::cmdline::arg_u64;
use super::io::mmio_read32;
use super::time::ns_to_ticks;

/// Guest-physical base of the device's register window.
pub const BASE: u64 = 0xd100_0000;
/// Size of the window.
pub const SIZE: u64 = 0x1000;
/// The magic value at offset 0: `"TVMX"` in little endian.
pub const MAGIC: u32 = 0x584d_5654;
/// The layout version at offset 4 this module implements.
pub const VERSION: u32 = 1;
/// Offset of the magic (u32).
pub const REG_MAGIC: u64 = 0x000;
/// Offset of the version (u32).
pub const REG_VERSION: u64 = 0x004;
/// Offset of slot 0.
pub const SLOT_OFFSET: u64 = 0x100;
/// Distance between two slots.
pub const SLOT_STRIDE: u64 = 0x40;
/// Number of slots (vCPUs from this index on cannot report).
pub const SLOTS: usize = 32;
/// Offsets of the four u64 counters inside a slot.
pub const OPS: u64 = 0x00;
pub const BYTES: u64 = 0x08;
pub const LAT_SUM_NS: u64 = 0x10;
pub const LAT_SAMPLES: u64 = 0x18;
/// Default of the `report_ms` command-line parameter.
pub const DEFAULT_REPORT_MS: u64 = 50;

/// Probe state: not probed yet, being probed, absent, present.
const UNKNOWN: u8 = 0;
const PROBING: u8 = 1;
const ABSENT: u8 = 2;
const PRESENT: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the metrics device is there (magic and version match). The first caller on
/// any vCPU probes (1-2 MMIO reads); concurrent first callers wait for its answer, later
/// calls read the cached answer (no exit).
pub fn present() -> bool {
    loop {
        match STATE.load(Ordering::Acquire) {
            PRESENT => return true,
            ABSENT => return false,
            UNKNOWN => {
                if STATE
                    .compare_exchange(UNKNOWN, PROBING, Ordering::Acquire, Ordering::Acquire)
                    .is_ok()
                {
                    let found = probe();
                    STATE.store(if found { PRESENT } else { ABSENT }, Ordering::Release);
                    return found;
                }
            }
            _ => spin_loop(),
        }
    }
}

/// Reads the magic and, if it matches, the version.
fn probe() -> bool {
    // SAFETY: the window is the device's MMIO or, without a device, unmapped guest-physical
    // space that reads all ones; both are harmless to read.
    unsafe { mmio_read32(BASE + REG_MAGIC) == MAGIC && mmio_read32(BASE + REG_VERSION) == VERSION }
}

/// Writes the cumulative counters of `slot` (4 u64 stores, one VM exit each): ops
/// completed, bytes processed, sum of op latencies in ns, number of latency samples.
/// A no-op (no exit) if the device is absent or `slot >= SLOTS`.
pub fn report(slot: usize, ops: u64, bytes: u64, lat_sum_ns: u64, lat_samples: u64) {
    if slot >= SLOTS || !present() {
        return;
    }
    let base = BASE + SLOT_OFFSET + SLOT_STRIDE * slot as u64;
    for (offset, value) in [
        (OPS, ops),
        (BYTES, bytes),
        (LAT_SUM_NS, lat_sum_ns),
        (LAT_SAMPLES, lat_samples),
    ] {
        // SAFETY: an aligned u64 register of this slot in the device's window (present).
        unsafe { write_volatile((base + offset) as usize as *mut u64, value) };
    }
}

/// Rate-limits the reports of one slot for a hot loop.
///
/// Times are TSC ticks (as from [`super::rdtsc`]) so that the check needs no conversion:
/// [`Reporter::due`] and [`Reporter::maybe_report`] cost one subtraction and one compare
/// when no report is due. A disabled reporter (`report_ms=0`, no device, or a slot beyond
/// [`SLOTS`]) is never due and its [`Reporter::report`] does nothing.
pub struct Reporter {
    /// Slot written (the vCPU index).
    pub slot: usize,
    /// TSC ticks between reports; `u64::MAX` when disabled.
    pub every: u64,
    /// TSC of the last report (or of the start).
    pub last: u64,
    /// Whether reports are written at all.
    pub enabled: bool,
}

impl Reporter {
    /// A reporter for `slot` that reports at most every `every_ms` ms (0 = never, not
    /// even [`Reporter::report`]), counting from `now` (TSC). Probes the device if
    /// `every_ms > 0` and no one has yet.
    pub fn new(slot: usize, every_ms: u64, now: u64) -> Reporter {
        let enabled = every_ms > 0 && slot < SLOTS && present();
        Reporter {
            slot,
            every: if enabled {
                ns_to_ticks(every_ms.saturating_mul(1_000_000)).max(1)
            } else {
                u64::MAX
            },
            last: now,
            enabled,
        }
    }

    /// [`Reporter::new`] with the period from the `report_ms` command-line parameter
    /// (default [`DEFAULT_REPORT_MS`]).
    pub fn from_cmdline(slot: usize, now: u64) -> Reporter {
        Reporter::new(slot, arg_u64("report_ms", DEFAULT_REPORT_MS), now)
    }

    /// Whether a report is due at `now` (TSC). If so, the caller reports with
    /// [`Reporter::report_at`] (useful when the values are costly to compute).
    #[inline(always)]
    pub fn due(&self, now: u64) -> bool {
        now.wrapping_sub(self.last) >= self.every
    }

    /// Reports the counters if a report is due at `now` (TSC); returns whether it did.
    #[inline(always)]
    pub fn maybe_report(
        &mut self,
        now: u64,
        ops: u64,
        bytes: u64,
        lat_sum_ns: u64,
        lat_samples: u64,
    ) -> bool {
        if !self.due(now) {
            return false;
        }
        self.report_at(now, ops, bytes, lat_sum_ns, lat_samples);
        true
    }

    /// Reports now (TSC `now`) and restarts the period from there.
    #[cold]
    #[inline(never)]
    pub fn report_at(&mut self, now: u64, ops: u64, bytes: u64, lat_sum_ns: u64, lat_samples: u64) {
        self.last = now;
        self.report(ops, bytes, lat_sum_ns, lat_samples);
    }

    /// Reports unconditionally (e.g. the final values), unless disabled.
    pub fn report(&self, ops: u64, bytes: u64, lat_sum_ns: u64, lat_samples: u64) {
        if self.enabled {
            report(self.slot, ops, bytes, lat_sum_ns, lat_samples);
        }
    }
}
