//! A minimal i8042 keyboard controller: enough for guests to probe it and to reset the
//! machine with command 0xfe, which is how Linux and many test kernels reboot.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{ExitReason, ExitSignal};

/// Data port of the i8042.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port of the i8042. Register the device at both ports (one port each);
/// 0x61-0x63 belong to other chips.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller; a reset command stops the VM with [`ExitReason::Reset`].
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    /// Creates the controller; resets are reported through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; no keyboard data.
        data.fill(0);
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let port = base.0.wrapping_add(offset);
        if port == I8042_COMMAND_PORT && data.len() == 1 && data[0] == CMD_RESET_CPU {
            log::info!("i8042: guest requested a reset");
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_exit_other_writes_do_not() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.pio_write(PioAddress(I8042_DATA_PORT), 0, &[CMD_RESET_CPU]);
        dev.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[0xfe, 0xfe]);
        assert!(!exit.is_requested());
        dev.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
