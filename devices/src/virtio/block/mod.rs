//! virtio-blk backed by a raw file: read, write, flush, get-id, read-only mode.
//!
//! - [`request`]: parsing and executing one request from a descriptor chain, with every
//!   guest-supplied value checked.
//! - [`device`]: the device (features, config space, queue processing, counters).
//! - [`event_handler`]: its place in the monitor's event loop (queue notifications).

pub mod device;
pub mod event_handler;
pub mod request;

pub use device::{Block, BlockConfig, BlockError, Step};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data payload of one request the device accepts (bigger ones get IOERR).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
pub(crate) mod tests;
