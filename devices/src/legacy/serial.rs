//! COM1: a 16550 UART (vm-superio) on ports 0x3f8-0x3ff, interrupting on IRQ 4 through an
//! irqfd; output to any writer (stdout or a file), input from an fd watched by the event loop.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const COM1_PORT_COUNT: u16 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output writer failed.
    #[error("serial output failed: {0}")]
    Output(#[source] io::Error),
}

/// The guest's COM1 port: a vm-superio 16550 plus the bookkeeping the monitor needs.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    ignored_accesses: u64,
}

impl SerialConsole {
    /// Creates a UART writing guest output to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
            ignored_accesses: 0,
        }
    }

    /// Hands bytes typed by the user to the guest; returns how many fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(done) => done,
            Err(e) => {
                log::warn!("serial: cannot hand input to the guest: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Flushes the output writer.
    pub fn flush(&mut self) -> Result<(), SerialError> {
        self.uart.writer_mut().flush().map_err(SerialError::Output)
    }

    fn offset(&mut self, offset: PioAddressOffset, len: usize) -> Option<u8> {
        // A 16550 has 8 one-byte registers; wider or out-of-range accesses are a guest bug.
        if len != 1 || offset >= COM1_PORT_COUNT {
            self.ignored_accesses += 1;
            if self.ignored_accesses <= 8 {
                log::warn!("serial: ignored {len}-byte access at offset {offset}");
            }
            return None;
        }
        Some(offset as u8)
    }
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match self.offset(offset, data.len()) {
            Some(off) => data[0] = self.uart.read(off),
            None => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(off) = self.offset(offset, data.len()) {
            if let Err(e) = self.uart.write(off, data[0]) {
                crate::guest_warn!("serial: write failed: {e:?}");
            }
        }
    }
}

/// Event-loop subscriber that feeds an input fd (usually stdin) into the UART.
pub struct SerialInput {
    console: Arc<Mutex<SerialConsole>>,
    input: Box<dyn ReadFd + Send>,
}

/// Something readable with a file descriptor the event loop can watch.
pub trait ReadFd: Read + AsRawFd {}
impl<T: Read + AsRawFd> ReadFd for T {}

impl SerialInput {
    /// Watches `input` and forwards what it yields to `console`.
    pub fn new(console: Arc<Mutex<SerialConsole>>, input: Box<dyn ReadFd + Send>) -> Self {
        Self { console, input }
    }

    fn fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let closed = events.event_set().contains(EventSet::HANG_UP)
            || events.event_set().contains(EventSet::ERROR);
        match self.input.read(&mut buf) {
            Ok(0) => {
                // EOF: stop watching, the guest simply gets no more input.
                let _ = ops.remove(Events::new_raw(self.fd(), EventSet::IN));
            }
            Ok(n) => {
                let mut console = match self.console.lock() {
                    Ok(c) => c,
                    Err(p) => p.into_inner(),
                };
                let taken = console.enqueue_input(&buf[..n]);
                if taken < n {
                    log::debug!("serial: guest input FIFO full, dropped {} bytes", n - taken);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial: input closed: {e}");
                let _ = ops.remove(Events::new_raw(self.fd(), EventSet::IN));
            }
        }
        if closed {
            let _ = ops.remove(Events::new_raw(self.fd(), EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd(), EventSet::IN)) {
            // epoll refuses regular files and /dev/null (EPERM): such input has nothing to
            // wait for, so the guest simply gets no console input.
            log::debug!("serial: input is not pollable, the guest gets no console input: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_write_reaches_output_and_bad_sizes_are_ignored() {
        let sink = Sink::default();
        let mut c = SerialConsole::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(sink.clone()));
        c.pio_write(PioAddress(COM1_PORT), 0, b"A");
        c.pio_write(PioAddress(COM1_PORT), 0, &[1, 2, 3, 4]);
        c.pio_write(PioAddress(COM1_PORT), 9, b"B");
        let mut d = [0u8; 4];
        c.pio_read(PioAddress(COM1_PORT), 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(&*sink.0.lock().unwrap(), b"A");
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let mut c = SerialConsole::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(io::sink()));
        assert_eq!(c.enqueue_input(b"hi"), 2);
        let mut d = [0u8; 1];
        c.pio_read(PioAddress(COM1_PORT), 0, &mut d);
        assert_eq!(d[0], b'h');
    }
}
