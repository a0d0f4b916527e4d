//! A debug-exit port (in the spirit of QEMU's isa-debug-exit): a guest writes a status and
//! the `vmm` process exits with it. Unlike QEMU's, the status is the written value itself
//! (`value & 0xff`), so a guest can report success as 0.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{ExitReason, ExitSignal};

/// Port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports it decodes (a 32-bit write covers 4 of them).
pub const DEBUG_EXIT_PORT_COUNT: u16 = 4;

/// The debug-exit device.
pub struct DebugExit {
    exit: ExitSignal,
}

impl DebugExit {
    /// Creates the device; exits are reported through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            crate::guest_warn!(
                "debug-exit: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        // Any width is accepted; the low byte is the status.
        let status = data[0];
        log::info!("debug-exit: guest exits with status {status}");
        self.exit.request(ExitReason::GuestExit(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_byte_is_the_status() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = DebugExit::new(exit.clone());
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 2, &[1]);
        assert!(!exit.is_requested());
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[0x2a, 1, 0, 0]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(0x2a)));
    }
}
