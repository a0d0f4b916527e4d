//! Port 0x80, the POST/diagnostic port: firmware and Linux write to it as an I/O delay.
//! Writes are counted and dropped, reads return all ones.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// The POST port.
pub const POST_PORT: u16 = 0x80;

/// Accepts and ignores writes to port 0x80, counting them.
#[derive(Debug, Default)]
pub struct PostPort {
    writes: u64,
}

impl PostPort {
    /// Number of writes seen.
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl MutDevicePio for PostPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {
        self.writes = self.writes.wrapping_add(1);
    }
}
