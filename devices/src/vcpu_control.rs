//! The paravirtual vCPU control device: how the monitor tells a guest how many of its
//! vCPUs to use, and how a guest's idle vCPUs park so their threads cost nothing.
//!
//! MMIO layout (little endian, 4 KiB window at [`VCPU_CONTROL_ADDR`]):
//! - 0x00 u32 read: magic `0x43435654` ("TVCC"); 0x04 u32 read: version 1.
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
//!
//! Guest values are checked: a park request naming another vCPU's index, or an index out
//! of range, returns at once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Guest-physical address of the device.
pub const VCPU_CONTROL_ADDR: u64 = 0xd200_0000;
/// Size of its window.
pub const VCPU_CONTROL_SIZE: u64 = 0x1000;
/// Magic value at offset 0.
pub const MAGIC: u32 = 0x4343_5654;
/// Layout version.
pub const VERSION: u32 = 1;
const REG_ACTIVE: u64 = 0x08;
const REG_TOTAL: u64 = 0x0c;
const REG_PARK: u64 = 0x10;
const REG_RELEASE: u64 = 0x14;

thread_local! {
    /// The vCPU index of the calling thread (set by each vCPU thread at start), so a guest
    /// cannot park another vCPU by writing its index.
    static CURRENT_VCPU: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
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
        log::info!(
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
            log::debug!("vCPU control: ignored park request for {index} from {me:?}");
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
        while index >= *a && !self.stopping.load(Ordering::Acquire) {
            a = match self.wake.wait(a) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }
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
}
