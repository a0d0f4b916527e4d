//! A hostile driver against the whole path (MMIO transport, device, I/O engine): ring
//! layouts that made the engine loop forever (available ring at address 0, overlapping
//! rings, the device's own write moving the available index), a request queued before
//! DRIVER_OK (once served on the vCPU thread), and the per-wake byte bound.
//!
//! Every service runs on a helper thread with a generous deadline, so a hang fails the
//! test instead of stalling the suite.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::*;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, BlockConfig};
use crate::virtio::io_engine::{IoEngine, ServeReport};
use crate::virtio::{MmioTransport, VirtioDevice, VirtioInterrupt};

const MEM: usize = 4 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10_000;
const STATUS: u64 = 0x11_000;
const DATA: u64 = 0x20_000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Rig {
    mem: GuestMemoryMmap,
    block: Arc<Mutex<Block>>,
    mmio: MmioTransport,
    interrupt: Arc<VirtioInterrupt>,
    path: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A drive of `sectors` sectors, every byte `fill`, behind a transport the test drives.
fn rig(name: &str, sectors: usize, fill: u8) -> Rig {
    let path = std::env::temp_dir().join(format!("blk-hostile-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![fill; sectors * 512]).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(BlockConfig {
            id: "blk0".into(),
            path: path.clone(),
            read_only: false,
        })
        .unwrap(),
    ));
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let dev: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let mmio = MmioTransport::new(name, dev, mem.clone(), interrupt.clone());
    Rig {
        mem,
        block,
        mmio,
        interrupt,
        path,
    }
}

impl Rig {
    fn write(&mut self, offset: u32, v: u32) {
        self.mmio
            .mmio_write(MmioAddress(0), u64::from(offset), &v.to_le_bytes());
    }

    fn read(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.mmio
            .mmio_read(MmioAddress(0), u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates and sets up queue 0 at the given addresses, but stops before DRIVER_OK.
    fn set_up(&mut self, desc: u64, avail: u64, used: u64) {
        self.write(VIRTIO_MMIO_STATUS, 1);
        self.write(VIRTIO_MMIO_STATUS, 3);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
        self.write(VIRTIO_MMIO_STATUS, 11);
        self.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (lo, hi, a) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                desc,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                avail,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                used,
            ),
        ] {
            self.write(lo, a as u32);
            self.write(hi, (a >> 32) as u32);
        }
        self.write(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Sets DRIVER_OK (what a vCPU thread does) and returns the status read back.
    fn driver_ok(&mut self) -> u32 {
        self.write(VIRTIO_MMIO_STATUS, 15);
        self.read(VIRTIO_MMIO_STATUS)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a read request of `len` bytes into `data` as chain 0 and publishes it in
    /// the available ring at `avail` (slot 0, idx 1).
    fn queue_read(&self, avail: u64, data: u64, len: u32) {
        self.mem
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.desc(0, HDR, 16, NEXT, 1);
        self.desc(1, data, len, NEXT | WRITE, 2);
        self.desc(2, STATUS, 1, WRITE, 0);
        self.mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        self.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

/// Runs one engine service on a helper thread; fails the test if it does not return.
fn serve_within_deadline(block: &Arc<Mutex<Block>>, requests: usize, bytes: u64) -> ServeReport {
    let mut engine = IoEngine::new(vec![block.clone()]).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(engine.serve_bounded(requests, bytes));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("IoEngine::serve did not return: a guest-made endless loop")
}

fn needs_reset(status: u32) -> bool {
    status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
}

#[test]
fn avail_ring_at_address_zero_is_refused_and_serve_returns() {
    let mut r = rig("avail0", 64, 0);
    r.set_up(DESC, 0, USED);
    r.queue_read(0, DATA, 512);
    let status = r.driver_ok();
    assert!(needs_reset(status), "status {status:#x}");
    let report = serve_within_deadline(&r.block, 256, u64::MAX);
    assert_eq!(report.per_queue, vec![0]);
    assert_eq!(r.used_idx(), 0);
}

#[test]
fn overlapping_rings_are_refused_and_serve_returns() {
    // The used ring's first length field lands on avail.idx, and the rings coincide.
    for (name, used) in [("overlap6", AVAIL - 6), ("overlap0", AVAIL)] {
        let mut r = rig(name, 64, 0);
        r.set_up(DESC, AVAIL, used);
        r.queue_read(AVAIL, DATA, 4096);
        let status = r.driver_ok();
        assert!(needs_reset(status), "{name}: status {status:#x}");
        let report = serve_within_deadline(&r.block, 256, u64::MAX);
        assert_eq!(report.per_queue, vec![0], "{name}");
    }
}

#[test]
fn the_device_writing_over_the_available_index_stops_it() {
    // The request reads 0x77 bytes into the available ring itself: avail.idx becomes
    // 0x7777 in the middle of the batch.
    let mut r = rig("selfread", 64, 0x77);
    r.set_up(DESC, AVAIL, USED);
    r.queue_read(AVAIL, AVAIL, 512);
    assert!(!needs_reset(r.driver_ok()));
    let report = serve_within_deadline(&r.block, 256, u64::MAX);
    assert_eq!(report.per_queue, vec![1], "the request itself is served");
    assert!(r.block.lock().unwrap().is_broken());
    assert!(needs_reset(r.read(VIRTIO_MMIO_STATUS)));
    assert_ne!(
        r.interrupt.status() & VIRTIO_MMIO_INT_CONFIG,
        0,
        "config-change interrupt raised"
    );
    // A reset brings the device back.
    r.write(VIRTIO_MMIO_STATUS, 0);
    assert!(!r.block.lock().unwrap().is_broken());
}

#[test]
fn activation_leaves_queued_requests_to_the_event_loop() {
    let mut r = rig("early", 64, 0x5a);
    r.set_up(DESC, AVAIL, USED);
    r.queue_read(AVAIL, DATA, 4096);
    assert!(!needs_reset(r.driver_ok()));
    assert_eq!(r.used_idx(), 0, "nothing served on the vCPU thread");
    let kicked = r.block.lock().unwrap().queue_events()[0].read().unwrap();
    assert_eq!(kicked, 1, "the event loop was signalled");
    let report = serve_within_deadline(&r.block, 256, u64::MAX);
    assert_eq!(report.per_queue, vec![1]);
    assert_eq!(r.used_idx(), 1);
    let byte: u8 = r.mem.read_obj(GuestAddress(DATA + 4095)).unwrap();
    assert_eq!(byte, 0x5a);
}

#[test]
fn one_wake_is_bounded_in_bytes() {
    let mut r = rig("bytes", 8192, 0x33);
    r.set_up(DESC, AVAIL, USED);
    assert!(!needs_reset(r.driver_ok()));
    // Eight 2 MiB reads of the same chain.
    let len = 2 << 20;
    r.queue_read(AVAIL, DATA, len);
    for slot in 0..8u64 {
        r.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
    }
    r.mem.write_obj(8u16, GuestAddress(AVAIL + 2)).unwrap();
    let report = serve_within_deadline(&r.block, 256, 5 << 20);
    assert_eq!(report.per_queue, vec![3], "stops once 5 MiB are reached");
    assert!(report.budget_exhausted);
    let byte: u8 = r
        .mem
        .read_obj(GuestAddress(DATA + u64::from(len) - 1))
        .unwrap();
    assert_eq!(byte, 0x33);
    let report = serve_within_deadline(&r.block, 256, u64::MAX);
    assert_eq!(report.per_queue, vec![5]);
    assert_eq!(r.used_idx(), 8);
}
