//! Serial console output (COM1 at 0x3f8), the console lock, `exit` and the panic handler.
//!
//! Every byte written is one `out` and therefore one VM exit (~26 us): keep lines short.
//! The monitor's UART always reports THR empty, so the line status register is not polled.

use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::io::outb;
use super::smp::{current_cpu, park};

/// I/O port of the COM1 transmit holding register.
pub const COM1: u16 = 0x3f8;

/// Debug-exit port: writing a byte ends the VM, `vmm` exits with that status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Exit status used by the panic handler.
pub const PANIC_EXIT_CODE: u8 = 3;

/// Console lock owner: 0 = free, otherwise vCPU index + 1.
static OWNER: AtomicUsize = AtomicUsize::new(0);

/// Exclusive access to the serial console; released when dropped.
///
/// Obtained from [`console`]. Implements [`core::fmt::Write`], and has cheap helpers
/// that avoid `core::fmt` ([`Console::str`], [`Console::dec`], [`Console::hex`]).
pub struct Console {
    release: bool,
}

/// Takes the console lock (spinning) and returns the guard.
///
/// Re-entrant on the same vCPU (e.g. a panic while printing): the nested guard does not
/// release the lock.
pub fn console() -> Console {
    let me = current_cpu() + 1;
    if OWNER.load(Ordering::Relaxed) == me {
        return Console { release: false };
    }
    while OWNER
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spin_loop();
    }
    Console { release: true }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.release {
            OWNER.store(0, Ordering::Release);
        }
    }
}

impl Console {
    /// Writes raw bytes to COM1.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            // SAFETY: writing to the COM1 data register only prints the byte.
            unsafe { outb(COM1, b) };
        }
        self
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Writes `value` in decimal.
    pub fn dec(&mut self, mut value: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }

    /// Writes `value` in lower-case hexadecimal, without a `0x` prefix.
    pub fn hex(&mut self, mut value: u64) -> &mut Self {
        let mut buf = [0u8; 16];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(value & 0xf) as usize];
            value >>= 4;
            if value == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.str(s);
        Ok(())
    }
}

/// Prints a string (under the console lock).
pub fn print(s: &str) {
    console().str(s);
}

/// Prints `value` in decimal (under the console lock).
pub fn print_dec(value: u64) {
    console().dec(value);
}

/// Prints `value` in lower-case hexadecimal without prefix (under the console lock).
pub fn print_hex(value: u64) {
    console().hex(value);
}

/// Backend of [`print!`]: formats `args` under the console lock.
pub fn print_fmt(args: fmt::Arguments) {
    let _ = console().write_fmt(args);
}

/// Backend of [`println!`]: formats `args` and a `\n` under the console lock.
pub fn print_line(args: fmt::Arguments) {
    let mut c = console();
    let _ = c.write_fmt(args);
    c.str("\n");
}

/// Ends the VM through the debug-exit port: `vmm` exits with status `code`.
pub fn exit(code: u8) -> ! {
    // SAFETY: the debug-exit port ends the VM; nothing runs afterwards.
    unsafe { outb(DEBUG_EXIT_PORT, code) };
    park()
}

/// Prints `PANIC: <message> at <file>:<line>` and exits with status 3.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    {
        let mut c = console();
        let _ = write!(c, "PANIC: {}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(c, " at {}:{}", loc.file(), loc.line());
        }
        c.str("\n");
    }
    exit(PANIC_EXIT_CODE)
}
