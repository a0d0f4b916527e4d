//! Fuzzes the virtio-net device's transmit and receive paths: arbitrary descriptor
//! tables and available rings for both queues, frame and buffer bytes in guest memory,
//! frames arriving from the "TAP" (one end of a datagram socket pair), and an arbitrary
//! order of transmit runs, receive runs, arriving frames and resets. The device must
//! never panic, hang or write outside guest memory, and never send the host a frame
//! longer than the Ethernet limit.
#![no_main]

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use common::*;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::net::tap::Tap;
use devices::virtio::net::{Net, NetConfig, MAX_FRAME_LEN};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};


/// Receive queue rings (the transmit queue's sit 0x3000 higher).
const RX_DESC: u64 = DESC;
const TX_OFFSET: u64 = 0x3000;
const DATA: u64 = 0x10_000;

fn queue(off: u64) -> Queue {
    let mut q = Queue::new(256).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some((RX_DESC + off) as u32), Some(0));
    q.set_avail_ring_address(Some((AVAIL + off) as u32), Some(0));
    q.set_used_ring_address(Some((USED + off) as u32), Some(0));
    q.set_ready(true);
    q
}

fn activate(net: &mut Net, mem: &GuestMemoryMmap) -> bool {
    net.activate(mem.clone(), vec![queue(0), queue(TX_OFFSET)], interrupt())
        .is_ok()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let ops_len = usize::from(data[0] % 32);
    let body = &data[1..];
    let (ops, body) = body.split_at(body.len().min(ops_len));
    // Guest memory: both descriptor tables and available rings, then buffer bytes.
    let mem = memory();
    let table = usize::from(QSIZE) * 16;
    let ring = 4 + 2 * usize::from(QSIZE);
    let mut rest = body;
    for (addr, len) in [
        (RX_DESC, table),
        (AVAIL, ring),
        (RX_DESC + TX_OFFSET, table),
        (AVAIL + TX_OFFSET, ring),
        (DATA, 4096),
    ] {
        let (now, later) = rest.split_at(rest.len().min(len));
        let _ = mem.write_slice(now, GuestAddress(addr));
        rest = later;
    }
    // What is left is frames from the host side, each prefixed by a length byte.
    let (host, tap_end) = UnixDatagram::pair().expect("socket pair");
    host.set_nonblocking(true).expect("non-blocking");
    tap_end.set_nonblocking(true).expect("non-blocking");
    let tap = Tap::from_file("fuzz", File::from(OwnedFd::from(tap_end)));
    let mut net = Net::with_tap(
        NetConfig {
            id: "fuzz".into(),
            tap: "fuzz".into(),
            mac: [2, 0, 0, 0, 0, 1],
            rate_limiter: RateLimiterConfig::default(),
        },
        tap,
    )
    .expect("net device");
    if !activate(&mut net, &mem) {
        return;
    }
    let mut frames = rest;
    let mut sink = vec![0u8; 65536];
    for &op in ops {
        match op % 5 {
            0 => net.process_tx(),
            1 => {
                let _ = net.process_rx();
            }
            2 => {
                if let Some((&n, more)) = frames.split_first() {
                    let n = usize::from(n).min(more.len());
                    let _ = host.send(&more[..n]);
                    frames = &more[n..];
                }
            }
            3 => {
                net.reset();
                if !activate(&mut net, &mem) {
                    return;
                }
            }
            _ => {
                // The host reads what the guest sent: every frame within the limits.
                while let Ok(n) = host.recv(&mut sink) {
                    assert!(n <= MAX_FRAME_LEN, "transmitted frame of {n} bytes");
                }
            }
        }
    }
    net.process_tx();
    let _ = net.process_rx();
    while let Ok(n) = host.recv(&mut sink) {
        assert!(n <= MAX_FRAME_LEN, "transmitted frame of {n} bytes");
    }
});
