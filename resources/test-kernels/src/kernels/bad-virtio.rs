//! `bad-virtio`: a hostile virtio-blk driver. vCPU 0 breaks the protocol one way, chosen
//! by `mode`, then checks that the device either served it or asked for a reset, prints
//! one result line and exits; the monitor must stay responsive and quiet throughout.
//!
//! Parameters (`key=value`): `mode` (`early`, `avail0`, `overlap`, `runaway`, `flood`,
//! `mmio`, `busy`, `print`),
//! `dev=0` (index among the virtio-blk devices), `ms=2000` (`flood`), `depth=16`
//! (`flood`), `timeout_ms=5000` (longest wait for the device).
//!
//! - `early`: a read of sector 0 is queued and notified before DRIVER_OK (the device must
//!   not serve it on the vCPU thread that sets DRIVER_OK, but later, from its event loop).
//!   Prints `bad-virtio: early status=<s> byte=<first byte read>`; exit 0 if status is 0.
//! - `avail0`: the available ring at guest address 0 (with a request in it).
//! - `overlap`: the available ring 6 bytes after the used ring, so the used ring's first
//!   length field is the available index.
//! - `runaway`: sane rings, but the one read request's data buffer is the available ring:
//!   the device's own write moves the available index (to the image's bytes) by more than
//!   the queue size in the middle of a batch. Use an image whose sector 0 is not zero.
//! - These three print `bad-virtio: <mode> needs_reset=<0|1> used=<used.idx>` once the
//!   device set DEVICE_NEEDS_RESET, completed the request, or `timeout_ms` passed; exit 0.
//! - `flood`: `depth` writes kept in flight for `ms` ms (on a read-only drive every one
//!   fails). Prints `bad-virtio: flood requests=<n> errors=<e>`; exit 0.
//! - `mmio`: for `ms` ms, 1-byte reads of the device's registers, 2-byte writes and
//!   notifies of a queue that does not exist (each one a warning once). Prints
//!   `bad-virtio: mmio accesses=<n>`; exit 0.
//! - `busy` (2 vCPUs): vCPU 1 keeps the 16-entry ring full of reads (before and after
//!   DRIVER_OK) while vCPU 0 sets DRIVER_OK; after `ms` ms vCPU 1 stops, vCPU 0 waits for
//!   the device to drain and prints `bad-virtio: busy served=<n>`; exit 0.
//! - `print`: no device; prints `count` (2000) lines `bad-virtio: line <i> ...` of 40
//!   bytes each (for a serial output that fails every write), then
//!   `bad-virtio: printed <count>`; exit 0.
//!
//! Errors: `bad-virtio: error <what>`, exit 1 (2 for a bad parameter).
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use rt::virtio::{
    self, dma_alloc, reg, status, Blk, MmioDevice, BLK_F_FLUSH, BLK_F_RO, BLK_S_OK, BLK_T_IN,
    BLK_T_OUT, DESC_F_NEXT, DESC_F_WRITE, ID_BLOCK,
};

/// Queue size of the hand-built queues.
const QSIZE: u16 = 16;

macro_rules! die {
    ($code:expr, $($arg:tt)*) => {{
        println!("bad-virtio: error {}", format_args!($($arg)*));
        rt::exit($code)
    }};
}

fn find(dev: usize) -> MmioDevice {
    match virtio::slots()
        .filter_map(|s| MmioDevice::probe(&s).ok())
        .filter(|d| d.device_id() == ID_BLOCK)
        .nth(dev)
    {
        Some(d) => d,
        None => die!(1, "no virtio-blk device dev={}", dev),
    }
}

fn alloc(size: u64, align: u64) -> u64 {
    match dma_alloc(size, align) {
        Some(a) => a,
        None => die!(1, "DMA region exhausted"),
    }
}

/// Writes `v` at guest-physical `addr` (identity mapped, user accessible).
fn poke<T>(addr: u64, v: T) {
    // SAFETY: the address is RAM this kernel owns (DMA region or the unused page 0, never
    // address 0 itself), identity mapped; only the device reads it concurrently.
    unsafe { write_volatile(addr as usize as *mut T, v) }
}

fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: as in `poke`.
    unsafe { read_volatile(addr as usize as *const T) }
}

/// Builds a read of sector 0 into `data` (`len` bytes) as chain 0 of the descriptor table
/// at `desc`; returns the status byte's address.
fn read_request(desc: u64, data: u64, len: u32) -> u64 {
    let hdr = alloc(32, 16);
    let status = hdr + 16;
    poke(hdr, BLK_T_IN);
    poke(hdr + 4, 0u32);
    poke(hdr + 8, 0u64);
    poke(status, 0xffu8);
    let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let p = desc + 16 * i;
        poke(p, addr);
        poke(p + 8, len);
        poke(p + 12, flags);
        poke(p + 14, next);
    };
    d(0, hdr, 16, DESC_F_NEXT, 1);
    d(1, data, len, DESC_F_NEXT | DESC_F_WRITE, 2);
    d(2, status, 1, DESC_F_WRITE, 0);
    status
}

/// Queues chain 0 in the available ring at `avail` (slot 0, idx 1).
fn publish(avail: u64) {
    poke(avail + 4, 0u16);
    fence(Ordering::SeqCst);
    poke(avail + 2, 1u16);
    fence(Ordering::SeqCst);
}

/// A hand-built queue at the given layout, DRIVER_OK, then one read request and a
/// notify; waits for NEEDS_RESET or a completion and prints the outcome.
fn hostile_layout(name: &str, dev: usize, timeout_ms: u64, layout: Layout) -> ! {
    let mut d = find(dev);
    if let Err(e) = d.negotiate(BLK_F_RO | BLK_F_FLUSH) {
        die!(1, "negotiate: {}", e);
    }
    let desc = alloc(16 * u64::from(QSIZE), 4096);
    let ring_page = alloc(8192, 4096);
    let (avail, used, data) = match layout {
        // Page 0 holds nothing of ours; address 0 itself is never dereferenced here
        // (the ring's flags stay 0), only its idx (2) and first entry (4).
        Layout::AvailAtZero => (0, ring_page, alloc(4096, 4096)),
        Layout::Overlap => (ring_page + 6, ring_page, alloc(4096, 4096)),
        Layout::DataOverAvail => (ring_page, ring_page + 4096, ring_page),
    };
    let len = if matches!(layout, Layout::DataOverAvail) {
        512
    } else {
        4096
    };
    let status_addr = read_request(desc, data, len);
    d.setup_queue_raw(0, QSIZE, desc, avail, used);
    d.add_status(status::DRIVER_OK);
    // The request goes in after DRIVER_OK, so that the event loop (not the activation)
    // meets the bad ring.
    if avail == 0 {
        poke(4u64, 0u16);
        fence(Ordering::SeqCst);
        poke(2u64, 1u16);
    } else {
        publish(avail);
    }
    d.write(reg::QUEUE_NOTIFY, 0);
    let start = rt::time::now_ns();
    let (mut needs_reset, mut used_idx);
    loop {
        needs_reset = d.status() & status::DEVICE_NEEDS_RESET != 0;
        used_idx = peek::<u16>(used + 2);
        if needs_reset || used_idx != 0 && !matches!(layout, Layout::DataOverAvail) {
            break;
        }
        if rt::time::now_ns().wrapping_sub(start) > timeout_ms * 1_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    let _ = status_addr;
    if avail == 0 {
        poke(2u64, 0u16);
    }
    println!(
        "bad-virtio: {} needs_reset={} used={}",
        name, needs_reset as u8, used_idx
    );
    // Leave the device as a driver would after an error.
    d.write(reg::STATUS, 0);
    rt::exit(0)
}

#[derive(Clone, Copy)]
enum Layout {
    AvailAtZero,
    Overlap,
    DataOverAvail,
}

fn early(dev: usize, timeout_ms: u64) -> ! {
    let mut blk = match Blk::init_without_driver_ok(find(dev)) {
        Ok(b) => b,
        Err(e) => die!(1, "virtio-blk init: {}", e),
    };
    let buf = alloc(4096, 4096);
    poke(buf, 0xeeu8);
    if blk.submit(BLK_T_IN, 0, buf, 512).is_none() {
        die!(1, "queue full");
    }
    blk.kick();
    if let Err(e) = blk.device().driver_ok() {
        die!(1, "driver_ok: {}", e);
    }
    // The notify before DRIVER_OK may have been dropped: notify again, as Linux does.
    blk.device().write(reg::QUEUE_NOTIFY, 0);
    match blk.wait(timeout_ms * 1_000_000) {
        Ok(c) => {
            println!("bad-virtio: early status={} byte={}", c.status, peek::<u8>(buf));
            rt::exit(if c.status == BLK_S_OK { 0 } else { 1 })
        }
        Err(e) => die!(1, "{}", e),
    }
}

fn flood(dev: usize, ms: u64, depth: usize, timeout_ms: u64) -> ! {
    let mut blk = match Blk::open(dev) {
        Ok(b) => b,
        Err(e) => die!(1, "virtio-blk init: {}", e),
    };
    let depth = depth.clamp(1, blk.max_in_flight());
    let buf = alloc(4096, 4096);
    let (mut requests, mut errors) = (0u64, 0u64);
    let start = rt::time::now_ns();
    let mut last = start;
    loop {
        let now = rt::time::now_ns();
        let submitting = now.wrapping_sub(start) < ms * 1_000_000;
        while submitting && blk.in_flight() < depth {
            if blk.submit(BLK_T_OUT, 0, buf, 512).is_none() {
                break;
            }
        }
        blk.kick();
        if !submitting && blk.in_flight() == 0 {
            break;
        }
        match blk.poll() {
            Ok(Some(c)) => {
                requests += 1;
                if c.status != BLK_S_OK {
                    errors += 1;
                }
                last = now;
            }
            Ok(None) => {
                if now.wrapping_sub(last) > timeout_ms * 1_000_000 {
                    die!(1, "timeout waiting for the device ({} in flight)", blk.in_flight());
                }
                core::hint::spin_loop();
            }
            Err(e) => die!(1, "{}", e),
        }
    }
    println!("bad-virtio: flood requests={} errors={}", requests, errors);
    rt::exit(0)
}

fn mmio_abuse(dev: usize, ms: u64) -> ! {
    let d = find(dev);
    let base = d.base();
    let start = rt::time::now_ns();
    let mut n = 0u64;
    while rt::time::now_ns().wrapping_sub(start) < ms * 1_000_000 {
        // SAFETY: the device's register window (MMIO, not RAM); the monitor ignores
        // accesses of the wrong width.
        unsafe {
            let _ = read_volatile((base + 1) as usize as *const u8);
            write_volatile((base + reg::STATUS) as usize as *mut u16, 0x55);
        }
        d.write(reg::QUEUE_NOTIFY, 7);
        n += 3;
    }
    println!("bad-virtio: mmio accesses={}", n);
    rt::exit(0)
}

/// `busy`: the used ring's address once the queue is set up (0 before).
static BUSY_USED: AtomicU64 = AtomicU64::new(0);
/// `busy`: the available ring's address.
static BUSY_AVAIL: AtomicU64 = AtomicU64::new(0);
/// `busy`: the device's QueueNotify register.
static BUSY_NOTIFY: AtomicU64 = AtomicU64::new(0);
/// `busy`: vCPU 0 asks vCPU 1 to stop refilling.
static BUSY_STOP: AtomicBool = AtomicBool::new(false);
/// `busy`: requests vCPU 1 saw completed, and 1 << 63 once it stopped.
static BUSY_SERVED: AtomicU64 = AtomicU64::new(0);
const BUSY_STOPPED: u64 = 1 << 63;

/// vCPU 1 of `busy`: keeps every ring slot filled with chain 0 until told to stop.
fn busy_refill() -> ! {
    let (avail, used) = loop {
        let u = BUSY_USED.load(Ordering::Acquire);
        if u != 0 {
            break (BUSY_AVAIL.load(Ordering::Acquire), u);
        }
        core::hint::spin_loop();
    };
    let (mut idx, mut last_used, mut served) = (0u16, 0u16, 0u64);
    while !BUSY_STOP.load(Ordering::Acquire) {
        let now_used = peek::<u16>(used + 2);
        served += u64::from(now_used.wrapping_sub(last_used));
        last_used = now_used;
        if idx.wrapping_sub(now_used) < QSIZE {
            while idx.wrapping_sub(now_used) < QSIZE {
                poke(avail + 4 + 2 * u64::from(idx % QSIZE), 0u16);
                idx = idx.wrapping_add(1);
            }
            fence(Ordering::SeqCst);
            poke(avail + 2, idx);
            fence(Ordering::SeqCst);
            // SAFETY: the device's QueueNotify register (an ioeventfd in KVM).
            unsafe { rt::mmio_write32(BUSY_NOTIFY.load(Ordering::Relaxed), 0) };
        }
        core::hint::spin_loop();
    }
    // Wait for the device to finish what is queued.
    let start = rt::time::now_ns();
    while peek::<u16>(used + 2) != idx && rt::time::now_ns().wrapping_sub(start) < 5_000_000_000 {
        core::hint::spin_loop();
    }
    served += u64::from(peek::<u16>(used + 2).wrapping_sub(last_used));
    BUSY_SERVED.store(served | BUSY_STOPPED, Ordering::Release);
    rt::park()
}

fn delay_ns(ns: u64) {
    let start = rt::time::now_ns();
    while rt::time::now_ns().wrapping_sub(start) < ns {
        core::hint::spin_loop();
    }
}

/// vCPU 0 of `busy`.
fn busy(dev: usize, ms: u64) -> ! {
    if rt::cpu_count() < 2 {
        die!(2, "bad parameter mode=busy (needs --vcpus 2)");
    }
    let mut d = find(dev);
    if let Err(e) = d.negotiate(BLK_F_RO | BLK_F_FLUSH) {
        die!(1, "negotiate: {}", e);
    }
    let desc = alloc(16 * u64::from(QSIZE), 4096);
    let avail = alloc(4096, 4096);
    let used = alloc(4096, 4096);
    let data = alloc(4096, 4096);
    read_request(desc, data, 512);
    d.setup_queue_raw(0, QSIZE, desc, avail, used);
    BUSY_NOTIFY.store(d.base() + reg::QUEUE_NOTIFY, Ordering::Release);
    BUSY_AVAIL.store(avail, Ordering::Release);
    BUSY_USED.store(used, Ordering::Release);
    // Let vCPU 1 fill the ring, then activate the device under its feet.
    delay_ns(20_000_000);
    d.add_status(status::DRIVER_OK);
    d.write(reg::QUEUE_NOTIFY, 0);
    delay_ns(ms * 1_000_000);
    BUSY_STOP.store(true, Ordering::Release);
    let served = loop {
        let s = BUSY_SERVED.load(Ordering::Acquire);
        if s & BUSY_STOPPED != 0 {
            break s & !BUSY_STOPPED;
        }
        core::hint::spin_loop();
    };
    println!("bad-virtio: busy served={}", served);
    rt::exit(0)
}

fn kmain(cpu: usize) -> ! {
    if cpu == 1 && rt::cmdline::arg("mode") == Some(b"busy") {
        busy_refill();
    }
    if cpu != 0 {
        rt::park();
    }
    let dev = rt::cmdline::arg_u64("dev", 0) as usize;
    let timeout_ms = rt::cmdline::arg_u64("timeout_ms", 5000);
    let mode = rt::cmdline::arg("mode").unwrap_or(b"early");
    match mode {
        b"early" => early(dev, timeout_ms),
        b"avail0" => hostile_layout("avail0", dev, timeout_ms, Layout::AvailAtZero),
        b"overlap" => hostile_layout("overlap", dev, timeout_ms, Layout::Overlap),
        b"runaway" => hostile_layout("runaway", dev, timeout_ms, Layout::DataOverAvail),
        b"flood" => flood(
            dev,
            rt::cmdline::arg_u64("ms", 2000),
            rt::cmdline::arg_u64("depth", 16) as usize,
            timeout_ms,
        ),
        b"busy" => busy(dev, rt::cmdline::arg_u64("ms", 1000)),
        b"mmio" => mmio_abuse(dev, rt::cmdline::arg_u64("ms", 2000)),
        b"print" => {
            let count = rt::cmdline::arg_u64("count", 2000);
            for i in 0..count {
                println!("bad-virtio: line {:08} .............", i);
            }
            println!("bad-virtio: printed {}", count);
            rt::exit(0)
        }
        _ => die!(2, "bad parameter mode"),
    }
}
