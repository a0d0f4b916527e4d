//! The network device against a hostile driver, on a datagram socket pair standing in
//! for the TAP: activation leaves queued frames to the event loop, and a queue whose
//! available index runs away stops the device instead of being offered again.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::Tap;
use super::{Net, NetConfig, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use crate::rate_limiter::RateLimiterConfig;
use crate::virtio::{VirtioDevice, VirtioInterrupt};

const QSIZE: u16 = 16;
/// Rings of queue q sit at `0x1000 + 0x3000 * q` (desc), +0x1000 (avail), +0x2000 (used).
fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + 0x3000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}
const FRAME: u64 = 0x10_000;

struct Rig {
    mem: GuestMemoryMmap,
    net: Net,
    host: UnixDatagram,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (host, tap_end) = UnixDatagram::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    tap_end.set_nonblocking(true).unwrap();
    let net = Net::with_tap(
        NetConfig {
            id: "net-test".into(),
            tap: "test".into(),
            mac: [2, 0, 0, 0, 0, 1],
            rate_limiter: RateLimiterConfig::default(),
        },
        Tap::from_file("test", File::from(OwnedFd::from(tap_end))),
    )
    .unwrap();
    Rig { mem, net, host }
}

impl Rig {
    fn activate(&mut self) {
        let queues = (0..2)
            .map(|q| {
                let (d, a, u) = ring(q);
                let mut queue = Queue::new(256).unwrap();
                queue.set_size(QSIZE);
                queue.set_desc_table_address(Some(d as u32), Some(0));
                queue.set_avail_ring_address(Some(a as u32), Some(0));
                queue.set_used_ring_address(Some(u as u32), Some(0));
                queue.set_ready(true);
                queue
            })
            .collect();
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        self.net.activate(self.mem.clone(), queues, irq).unwrap();
    }

    /// Queues one transmit frame of `len` bytes (after the header) as chain 0.
    fn queue_tx(&self, len: u32) {
        let (d, a, _) = ring(TX_QUEUE);
        self.mem.write_obj(FRAME, GuestAddress(d)).unwrap();
        self.mem
            .write_obj(NET_HDR_LEN as u32 + len, GuestAddress(d + 8))
            .unwrap();
        self.mem.write_obj(0u16, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(a + 4)).unwrap();
        self.mem.write_obj(1u16, GuestAddress(a + 2)).unwrap();
    }
}

#[test]
fn activation_leaves_queued_frames_to_the_event_loop() {
    let mut r = rig();
    r.queue_tx(60);
    r.activate();
    let mut buf = [0u8; 2048];
    assert!(r.host.recv(&mut buf).is_err(), "nothing sent on activation");
    for q in [RX_QUEUE, TX_QUEUE] {
        assert_eq!(
            r.net.queue_events()[q].read().unwrap(),
            1,
            "queue {q} signalled"
        );
    }
    r.net.process_tx();
    assert_eq!(
        r.host.recv(&mut buf).unwrap(),
        60,
        "the event loop sends it"
    );
}

#[test]
fn a_runaway_available_index_stops_the_device() {
    for q in [TX_QUEUE, RX_QUEUE] {
        let mut r = rig();
        r.activate();
        let (_, a, _) = ring(q);
        r.mem.write_obj(1000u16, GuestAddress(a + 2)).unwrap();
        if q == RX_QUEUE {
            // A frame from the host makes the device look for a receive buffer.
            r.host.send(&[0u8; 60]).unwrap();
            r.net.process_rx();
        } else {
            r.net.process_tx();
        }
        assert!(r.net.is_broken(), "queue {q}");
        assert!(r.net.needs_reset());
        r.net.reset();
        assert!(!r.net.is_broken());
    }
}

/// A transmit frame throttled by the rate limiter reports, as its latency, the time from
/// the wake that first saw it to its used-ring write: its wait for the refill included.
#[test]
fn a_throttled_frames_latency_includes_its_wait() {
    use crate::virtio::queue_metrics::LATENCY_BUCKETS_US;
    let mut r = rig();
    r.activate();
    r.net
        .set_rate_limit(RateLimiterConfig::one_op_per(100))
        .unwrap();
    // Two frames (chain 0 twice): the first goes at once, the second waits ~100 ms.
    let (_, a, _) = ring(TX_QUEUE);
    r.queue_tx(60);
    r.mem.write_obj(0u16, GuestAddress(a + 6)).unwrap();
    r.mem.write_obj(2u16, GuestAddress(a + 2)).unwrap();
    r.net.process_tx();
    let mut buf = [0u8; 2048];
    assert_eq!(r.host.recv(&mut buf).unwrap(), 60);
    assert!(r.host.recv(&mut buf).is_err(), "second frame throttled");
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert!(r.net.clear_tx_limiter_event());
    r.net.process_tx();
    assert_eq!(r.host.recv(&mut buf).unwrap(), 60);
    let m = r.net.tx_metrics().snapshot();
    let slow = LATENCY_BUCKETS_US
        .iter()
        .position(|b| *b == 250_000)
        .unwrap();
    assert_eq!(m.latency_buckets[slow], 1, "{:?}", m.latency_buckets);
    assert_eq!(m.requests, 2);
    assert!(m.latency_ns_sum >= 100_000_000, "{}", m.latency_ns_sum);
}
