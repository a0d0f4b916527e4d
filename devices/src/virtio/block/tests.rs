//! Unit tests of the block device against hand-built queues in guest memory, including
//! the hostile cases: chains that loop, point outside memory, are too long, have the
//! wrong direction or size, or run past the capacity.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, BlockConfig};
use crate::virtio::{VirtioDevice, VirtioInterrupt};

pub(crate) const DESC: u64 = 0x1000;
pub(crate) const AVAIL: u64 = 0x2000;
pub(crate) const USED: u64 = 0x3000;
pub(crate) const HDR: u64 = 0x10_000;
pub(crate) const DATA: u64 = 0x20_000;
pub(crate) const STATUS: u64 = 0x90_000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM: usize = 1 << 20;

pub(crate) struct Harness {
    mem: GuestMemoryMmap,
    block: Block,
    path: PathBuf,
    avail_idx: u16,
}

/// A harness whose device moved behind a mutex, for the I/O engine.
pub(crate) struct SharedHarness {
    mem: GuestMemoryMmap,
    avail_idx: u16,
    /// The device.
    pub(crate) block: Arc<std::sync::Mutex<Block>>,
}

impl SharedHarness {
    /// Makes chain `head` available without processing it.
    pub(crate) fn make_available(&mut self, head: u16) {
        self.avail_idx = push_avail(&self.mem, self.avail_idx, head);
    }
}

fn push_avail(mem: &GuestMemoryMmap, idx: u16, head: u16) -> u16 {
    let slot = u64::from(idx % QSIZE);
    mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    let next = idx.wrapping_add(1);
    mem.write_obj(next, GuestAddress(AVAIL + 2)).unwrap();
    next
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn harness(name: &str, sectors: u64, read_only: bool) -> Harness {
    let path = std::env::temp_dir().join(format!("blk-test-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut block = Block::new(BlockConfig {
        id: "blk0".into(),
        path: path.clone(),
        read_only,
    })
    .unwrap();
    let mut q = Queue::new(256).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    block.activate(mem.clone(), vec![q], irq).unwrap();
    Harness {
        mem,
        block,
        path,
        avail_idx: 0,
    }
}

impl Harness {
    pub(crate) fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    pub(crate) fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Two one-sector reads of sector 0 in distinct chains, heads 0 and 3 (not yet
    /// available).
    pub(crate) fn two_read_chains(&self) {
        self.header(VIRTIO_BLK_T_IN, 0);
        self.desc(0, HDR, 16, NEXT, 1);
        self.desc(1, DATA, 512, NEXT | WRITE, 2);
        self.desc(2, STATUS, 1, WRITE, 0);
        self.desc(3, HDR, 16, NEXT, 4);
        self.desc(4, DATA + 4096, 512, NEXT | WRITE, 5);
        self.desc(5, STATUS + 16, 1, WRITE, 0);
    }

    /// Makes chain `head` available without processing it.
    pub(crate) fn make_available(&mut self, head: u16) {
        self.avail_idx = push_avail(&self.mem, self.avail_idx, head);
    }

    /// Moves the device behind an `Arc<Mutex<_>>` (the harness keeps a read-only stand-in
    /// on the same file, which it deletes when dropped; the moved device keeps its fd).
    pub(crate) fn into_shared(mut self) -> SharedHarness {
        let stand_in = Block::new(BlockConfig {
            id: "stand-in".into(),
            path: self.path.clone(),
            read_only: true,
        })
        .unwrap();
        let block = std::mem::replace(&mut self.block, stand_in);
        SharedHarness {
            mem: self.mem.clone(),
            avail_idx: self.avail_idx,
            block: Arc::new(std::sync::Mutex::new(block)),
        }
    }

    /// Makes chain `head` available and processes the queue.
    fn submit(&mut self, head: u16) {
        self.make_available(head);
        self.block.process_queue();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// (id, len) of used element `n`.
    fn used(&self, n: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(n % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A standard 3-descriptor request: header, data (`len` bytes), status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, data_writable: bool) {
        self.header(kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.desc(0, HDR, 16, NEXT, 1);
        self.desc(
            1,
            DATA,
            len,
            NEXT | if data_writable { WRITE } else { 0 },
            2,
        );
        self.desc(2, STATUS, 1, WRITE, 0);
        self.submit(0);
    }
}

#[test]
fn write_then_read_round_trips_through_the_file() {
    let mut h = harness("rw", 64, false);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    h.request(VIRTIO_BLK_T_OUT, 8, 4096, false);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used(0), (0, 1));
    let file = std::fs::read(&h.path).unwrap();
    assert_eq!(&file[8 * 512..8 * 512 + 4096], &pattern[..]);

    h.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    h.request(VIRTIO_BLK_T_IN, 8, 4096, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used(1), (0, 4097));
    let mut back = vec![0u8; 4096];
    h.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    let m = h.block.metrics().snapshot();
    assert_eq!((m.requests, m.bytes, m.errors), (2, 8192, 0));
}

#[test]
fn scattered_chains_move_the_right_bytes() {
    // Any layout is legal: the header split over two descriptors and sharing its second
    // one with the start of the data, the data spread over three buffers out of order in
    // guest memory, the status byte sharing the last data descriptor.
    let mut h = harness("scatter", 64, false);
    let pattern: Vec<u8> = (0..3072u32).map(|i| (i * 13 + 1) as u8).collect();
    // Write 3 KiB at sector 2: header bytes 0..10 at HDR, 10..16 + data 0..1024 at DATA.
    h.header(VIRTIO_BLK_T_OUT, 2);
    let mut hdr = [0u8; 16];
    h.mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    h.mem.write_slice(&hdr[10..], GuestAddress(DATA)).unwrap();
    h.mem
        .write_slice(&pattern[..1024], GuestAddress(DATA + 6))
        .unwrap();
    h.mem
        .write_slice(&pattern[1024..2048], GuestAddress(DATA + 0x8000))
        .unwrap();
    h.mem
        .write_slice(&pattern[2048..], GuestAddress(DATA + 0x4000))
        .unwrap();
    h.desc(0, HDR, 10, NEXT, 1);
    h.desc(1, DATA, 6 + 1024, NEXT, 2);
    h.desc(2, DATA + 0x8000, 1024, NEXT, 3);
    h.desc(3, DATA + 0x4000, 1024, NEXT, 4);
    h.desc(4, STATUS, 1, WRITE, 0);
    h.submit(0);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let file = std::fs::read(&h.path).unwrap();
    assert_eq!(&file[1024..1024 + 3072], &pattern[..]);

    // Read it back into three writable buffers, the last one also holding the status.
    h.header(VIRTIO_BLK_T_IN, 2);
    h.desc(0, HDR, 16, NEXT, 1);
    h.desc(1, DATA + 0x10000, 512, NEXT | WRITE, 2);
    h.desc(2, DATA + 0x20000, 1536, NEXT | WRITE, 3);
    h.desc(3, DATA + 0x30000, 1024 + 1, WRITE, 0);
    h.submit(0);
    let status: u8 = h.mem.read_obj(GuestAddress(DATA + 0x30000 + 1024)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used(1), (0, 3073));
    let mut back = vec![0u8; 3072];
    h.mem
        .read_slice(&mut back[..512], GuestAddress(DATA + 0x10000))
        .unwrap();
    h.mem
        .read_slice(&mut back[512..2048], GuestAddress(DATA + 0x20000))
        .unwrap();
    h.mem
        .read_slice(&mut back[2048..], GuestAddress(DATA + 0x30000))
        .unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn read_only_drive_refuses_writes() {
    let mut h = harness("ro", 8, true);
    assert_ne!(h.block.features() & (1 << 5), 0, "RO feature offered");
    h.request(VIRTIO_BLK_T_OUT, 0, 512, false);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    h.request(VIRTIO_BLK_T_IN, 0, 512, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn requests_past_the_capacity_fail() {
    let mut h = harness("range", 8, false);
    h.request(VIRTIO_BLK_T_IN, 7, 1024, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    h.request(VIRTIO_BLK_T_IN, u64::MAX - 1, 512, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.block.metrics().snapshot().errors, 2);
}

#[test]
fn wrong_direction_unaligned_and_unknown_requests_fail() {
    let mut h = harness("shape", 8, false);
    h.request(VIRTIO_BLK_T_IN, 0, 512, false);
    assert_eq!(
        h.status(),
        VIRTIO_BLK_S_IOERR as u8,
        "read into a readable buffer"
    );
    h.request(VIRTIO_BLK_T_OUT, 0, 512, true);
    assert_eq!(
        h.status(),
        VIRTIO_BLK_S_IOERR as u8,
        "write from a writable buffer"
    );
    h.request(VIRTIO_BLK_T_IN, 0, 100, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8, "unaligned length");
    h.request(77, 0, 512, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = harness("id", 8, false);
    h.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(
        id.starts_with(b"blk0:blk-test-"),
        "{:?}",
        String::from_utf8_lossy(&id)
    );
}

#[test]
fn descriptors_outside_guest_memory_are_refused() {
    let mut h = harness("oob", 8, false);
    h.header(VIRTIO_BLK_T_IN, 0);
    h.desc(0, HDR, 16, NEXT, 1);
    h.desc(1, MEM as u64 - 256, 512, NEXT | WRITE, 2);
    h.desc(2, STATUS, 1, WRITE, 0);
    h.submit(0);
    assert_eq!(h.used_idx(), 1, "the chain is completed, not left hanging");
    assert_eq!(h.used(0).1, 0, "nothing written into guest memory");
    h.desc(1, u64::MAX - 100, 512, NEXT | WRITE, 2);
    h.submit(0);
    assert_eq!(h.used_idx(), 2);
}

#[test]
fn looping_and_overlong_chains_terminate() {
    let mut h = harness("loop", 8, false);
    h.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ... : a loop the iterator must cut.
    h.desc(0, HDR, 16, NEXT, 1);
    h.desc(1, DATA, 512, NEXT | WRITE, 0);
    h.submit(0);
    assert_eq!(h.used_idx(), 1);
    // A chain naming a descriptor beyond the table.
    h.desc(0, HDR, 16, NEXT, 200);
    h.submit(0);
    assert_eq!(h.used_idx(), 2);
    // A chain that uses every descriptor of the table and then some.
    for i in 0..QSIZE {
        h.desc(i, DATA, 512, NEXT | WRITE, (i + 1) % QSIZE);
    }
    h.submit(0);
    assert_eq!(h.used_idx(), 3);
    assert!(!h.block.is_broken());
}

#[test]
fn chain_without_status_byte_gets_no_status() {
    let mut h = harness("nostatus", 8, false);
    h.header(VIRTIO_BLK_T_IN, 0);
    h.desc(0, HDR, 16, 0, 0);
    h.submit(0);
    assert_eq!(h.used(0), (0, 0));
}

#[test]
fn an_available_index_far_ahead_stops_the_device() {
    let mut h = harness("avail", 8, false);
    h.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    h.block.process_queue();
    assert!(h.block.is_broken());
    assert!(h.block.needs_reset());
    assert_eq!(h.used_idx(), 0);
    h.block.reset();
    assert!(!h.block.is_broken());
}

#[test]
fn config_space_holds_the_capacity() {
    let h = harness("cfg", 24, false);
    let mut b = [0u8; 8];
    h.block.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 24);
    let mut far = [0xaau8; 4];
    h.block.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn throttled_requests_wait_and_are_not_lost() {
    use crate::rate_limiter::{BucketConfig, RateLimiterConfig};
    let mut h = harness("throttle", 64, false);
    h.block
        .set_rate_limit(RateLimiterConfig::one_op_per(100))
        .unwrap();
    // Two requests in distinct chains: the second must wait for a refill.
    h.two_read_chains();
    h.submit(0);
    h.submit(3);
    assert_eq!(h.used_idx(), 1, "second request throttled");
    std::thread::sleep(std::time::Duration::from_millis(120));
    h.block.on_rate_limiter_event();
    assert_eq!(h.used_idx(), 2, "throttled request served after the refill");
    assert!(h.block.metrics().snapshot().throttled_ns > 0);
    // Removing the limit lets everything through at once.
    h.block
        .set_rate_limit(RateLimiterConfig::default())
        .unwrap();
    h.submit(0);
    h.submit(3);
    assert_eq!(h.used_idx(), 4);
    // A refill period below 100 ms is refused with the field named.
    let err = h
        .block
        .set_rate_limit(RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 10,
            }),
            ops: None,
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("bandwidth.refill_time_ms"),
        "{err}"
    );
}

/// A throttled request's latency runs from when the device first saw it available to its
/// used-ring write: the time it waited for the rate limiter's refill is in it.
#[test]
fn a_throttled_requests_latency_includes_its_wait() {
    use crate::rate_limiter::RateLimiterConfig;
    use crate::virtio::queue_metrics::LATENCY_BUCKETS_US;
    let mut h = harness("throttle-latency", 64, false);
    h.block
        .set_rate_limit(RateLimiterConfig::one_op_per(100))
        .unwrap();
    h.two_read_chains();
    // Both made available before one wake: the first is served at once, the second
    // waits for the refill (>= 100 ms).
    h.make_available(0);
    h.make_available(3);
    h.block.note_available();
    h.block.process_queue();
    assert_eq!(h.used_idx(), 1, "second request throttled");
    std::thread::sleep(std::time::Duration::from_millis(120));
    h.block.on_rate_limiter_event();
    assert_eq!(h.used_idx(), 2);
    let m = h.block.metrics().snapshot();
    // Bucket of [50 ms, 250 ms): the throttled one; the first well below 50 ms.
    let slow = LATENCY_BUCKETS_US
        .iter()
        .position(|b| *b == 250_000)
        .unwrap();
    assert_eq!(m.latency_buckets[slow], 1, "{:?}", m.latency_buckets);
    assert_eq!(m.latency_buckets.iter().sum::<u64>(), 2);
    assert!(m.latency_ns_sum >= 100_000_000, "{}", m.latency_ns_sum);
    // The wait also shows as throttled time.
    assert!(m.throttled_ns >= 90_000_000, "{}", m.throttled_ns);
}

/// Latency starts at the wake that first saw the request, not when its batch was served:
/// a request seen, then served 20 ms later (as when it waits behind another drive in the
/// I/O scheduler), reports at least 20 ms.
#[test]
fn latency_starts_when_the_device_first_sees_the_request() {
    use crate::virtio::queue_metrics::LATENCY_BUCKETS_US;
    let mut h = harness("seen-latency", 64, false);
    h.header(VIRTIO_BLK_T_IN, 0);
    h.desc(0, HDR, 16, NEXT, 1);
    h.desc(1, DATA, 512, NEXT | WRITE, 2);
    h.desc(2, STATUS, 1, WRITE, 0);
    h.make_available(0);
    h.block.note_available();
    std::thread::sleep(std::time::Duration::from_millis(20));
    h.block.process_queue();
    assert_eq!(h.used_idx(), 1);
    let m = h.block.metrics().snapshot();
    // [10 ms, 50 ms).
    let bucket = LATENCY_BUCKETS_US
        .iter()
        .position(|b| *b == 50_000)
        .unwrap();
    assert_eq!(m.latency_buckets[bucket], 1, "{:?}", m.latency_buckets);
    // A request made available and served in the same wake is fast.
    h.submit(0);
    let m = h.block.metrics().snapshot();
    assert_eq!(m.latency_buckets[bucket], 1);
    assert_eq!(m.latency_buckets.iter().sum::<u64>(), 2);
}
