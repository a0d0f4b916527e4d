#![allow(dead_code)] // each target uses a different part of this module
//! Shared set-up of the fuzz targets: a small guest memory, a block device on a scratch
//! file, and a queue whose rings sit at fixed addresses.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::VirtioInterrupt;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MEM_SIZE: usize = 1 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const QSIZE: u16 = 16;

/// A 64 KiB scratch disk shared by all iterations.
pub fn disk() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vmm-fuzz-disk-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 * 1024]).expect("scratch disk");
        p
    })
    .clone()
}

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

pub fn block(read_only: bool) -> Block {
    Block::new(BlockConfig {
        id: "fuzz".into(),
        path: disk(),
        read_only,
    })
    .expect("block device")
}

pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
}
