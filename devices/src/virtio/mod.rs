//! Virtio devices over the MMIO transport (virtio 1.x, modern interface only).
//!
//! - [`mmio`]: the register interface a guest driver programs, one 4 KiB window per device.
//! - [`block`]: virtio-blk backed by a raw file.
//! - [`net`]: virtio-net backed by a TAP interface.
//! - [`io_engine`]: serves every drive's queue in priority order on the event loop.
//! - [`ring_check`]: ring layout and available-index checks `virtio-queue` leaves to us.
//! - [`queue_metrics`]: per-queue counters (requests, bytes, errors, throttling, depth,
//!   latency) read by the monitor's telemetry.
//!
//! A device is shared between the vCPU threads (register accesses through the transport)
//! and the event loop (queue processing on ioeventfd notifications), behind one mutex.

pub mod block;
pub mod io_engine;
pub mod mmio;
pub mod net;
pub mod queue_metrics;
pub mod ring_check;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
pub use queue_metrics::{ArrivalStamps, QueueMetrics, QueueMetricsSnapshot};

/// Feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Errors when a driver's set-up cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver gave the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver set up.
        got: usize,
    },
    /// A queue's rings do not fit in guest memory or are misaligned.
    #[error("queue {0} is not valid (rings outside guest memory, misaligned or bad size)")]
    InvalidQueue(usize),
    /// The device's back end cannot start.
    #[error("back end failed: {0}")]
    Backend(String),
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 1 = net).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Records the features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (driver wrote 0 to the status register).
    fn reset(&mut self);
    /// The eventfds the guest's queue notifications arrive on, one per queue, for the
    /// monitor to register as ioeventfds.
    fn queue_events(&self) -> &[EventFd];
    /// Whether the device stopped on a protocol violation and needs a driver reset.
    fn needs_reset(&self) -> bool {
        false
    }
}

/// A device's interrupt line: the MMIO InterruptStatus bits plus an irqfd into the
/// in-kernel irqchip.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// Wraps an eventfd registered (by the monitor) as a KVM irqfd.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Signals used-buffer notification (a queue made progress).
    pub fn signal_used_queue(&self) {
        self.raise(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING);
    }

    /// Signals a configuration change (also used after marking the device as needing reset).
    pub fn signal_config_change(&self) {
        self.raise(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            crate::guest_warn!("virtio: cannot inject interrupt: {e}");
        }
    }

    /// Current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}
