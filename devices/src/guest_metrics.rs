//! The paravirtual metrics device: how a guest workload reports what it achieved
//! (operations, bytes, latency) so the tuner's reward can use real throughput and latency.
//!
//! MMIO layout (little endian, 4 KiB window):
//! - 0x000 u32 read: magic `0x584d5654` ("TVMX"); 0x004 u32 read: version 1.
//! - Slot `s` (0..32) at `0x100 + 0x40 * s`: 0x00 u64 operations completed, 0x08 u64 bytes
//!   processed, 0x10 u64 sum of operation latencies in ns, 0x18 u64 number of latency
//!   samples. All cumulative; each guest vCPU owns one slot and the monitor sums them.
//!
//! Guest values are untrusted: anything outside the slots is ignored, wrong-sized writes
//! are dropped, and a slot going backwards is accepted as-is (the sampler treats counter
//! resets), so a hostile guest can only lie about its own performance.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Guest-physical address of the device.
pub const GUEST_METRICS_ADDR: u64 = 0xd100_0000;
/// Size of its window.
pub const GUEST_METRICS_SIZE: u64 = 0x1000;
/// Magic value at offset 0.
pub const MAGIC: u32 = 0x584d_5654;
/// Layout version at offset 4.
pub const VERSION: u32 = 1;
/// Number of report slots.
pub const SLOTS: usize = 32;
const SLOTS_START: u64 = 0x100;
const SLOT_SIZE: u64 = 0x40;
const FIELDS: usize = 4;

/// Sums of all slots at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// Operations completed.
    pub ops: u64,
    /// Bytes processed.
    pub bytes: u64,
    /// Sum of latencies in ns.
    pub latency_ns_sum: u64,
    /// Number of latency samples.
    pub latency_samples: u64,
    /// Register writes the guest made (how often it reported).
    pub writes: u64,
}

/// The device's state: one set of counters per slot, readable without locks.
#[derive(Debug)]
pub struct GuestMetricsDevice {
    slots: Vec<[AtomicU64; FIELDS]>,
    writes: AtomicU64,
    ignored: AtomicU64,
}

impl Default for GuestMetricsDevice {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Default::default()).collect(),
            writes: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
        }
    }
}

impl GuestMetricsDevice {
    /// Sums every slot.
    pub fn report(&self) -> GuestReport {
        let mut r = GuestReport {
            writes: self.writes.load(Ordering::Relaxed),
            ..Default::default()
        };
        for slot in &self.slots {
            r.ops = r.ops.wrapping_add(slot[0].load(Ordering::Relaxed));
            r.bytes = r.bytes.wrapping_add(slot[1].load(Ordering::Relaxed));
            r.latency_ns_sum = r
                .latency_ns_sum
                .wrapping_add(slot[2].load(Ordering::Relaxed));
            r.latency_samples = r
                .latency_samples
                .wrapping_add(slot[3].load(Ordering::Relaxed));
        }
        r
    }

    /// Writes the guest made that were ignored (bad offset or size).
    pub fn ignored_writes(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    fn field(offset: u64) -> Option<(usize, usize)> {
        let rel = offset.checked_sub(SLOTS_START)?;
        let slot = (rel / SLOT_SIZE) as usize;
        let within = rel % SLOT_SIZE;
        if slot >= SLOTS || !within.is_multiple_of(8) || within / 8 >= FIELDS as u64 {
            return None;
        }
        Some((slot, (within / 8) as usize))
    }

    /// Handles a guest write.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            8 => u64::from_le_bytes([
                data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
            ]),
            _ => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        match Self::field(offset) {
            Some((slot, field)) => {
                self.slots[slot][field].store(value, Ordering::Relaxed);
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if self.ignored.fetch_add(1, Ordering::Relaxed) < 8 {
                    log::warn!("guest metrics: ignored write at offset {offset:#x}");
                }
            }
        }
    }

    /// Handles a guest read.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let value: u64 = match offset {
            0 => u64::from(MAGIC),
            4 => u64::from(VERSION),
            o => match Self::field(o) {
                Some((slot, field)) => self.slots[slot][field].load(Ordering::Relaxed),
                None => 0,
            },
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = *bytes.get(i).unwrap_or(&0);
        }
    }
}

// The counters are atomics, so vCPU threads use the device through a shared reference:
// no lock serialises their reports.
impl DeviceMmio for GuestMetricsDevice {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_sum_and_bad_writes_are_ignored() {
        let d = GuestMetricsDevice::default();
        let mut m = [0u8; 4];
        d.read(0, &mut m);
        assert_eq!(u32::from_le_bytes(m), MAGIC);
        d.write(0x100, &10u64.to_le_bytes());
        d.write(0x108, &4096u64.to_le_bytes());
        d.write(0x140, &5u64.to_le_bytes());
        d.write(0x150, &700u64.to_le_bytes());
        d.write(0x158, &7u64.to_le_bytes());
        d.write(0x100, &[1, 2, 3, 4]); // wrong size
        d.write(0x120, &1u64.to_le_bytes()); // outside the fields
        d.write(0x100 + 0x40 * 32, &1u64.to_le_bytes()); // beyond the slots
        d.write(u64::MAX - 3, &1u64.to_le_bytes());
        let r = d.report();
        assert_eq!(
            (r.ops, r.bytes, r.latency_ns_sum, r.latency_samples),
            (15, 4096, 700, 7)
        );
        assert_eq!(r.writes, 5);
        assert_eq!(d.ignored_writes(), 4);
    }
}
