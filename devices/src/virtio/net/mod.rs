//! virtio-net backed by a TAP interface: one receive and one transmit queue, a MAC in the
//! config space, no offloads.
//!
//! - [`tap`]: the TAP interface.
//! - [`device`]: the device (frames between the queues and the TAP, counters).
//! - [`event_handler`]: its place in the event loop (queue notifications, TAP readable).

pub mod device;
pub mod event_handler;
pub mod tap;

pub use device::{Net, NetConfig, NetError};

/// Size of the virtio-net header (virtio 1.x, with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from either side (Ethernet with a VLAN tag, no jumbo frames).
pub const MAX_FRAME_LEN: usize = 1522;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;

#[cfg(test)]
mod tests;
