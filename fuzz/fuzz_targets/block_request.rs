//! Fuzzes the virtio-blk request path: arbitrary descriptor tables, available rings,
//! headers and buffers in guest memory, processed by the device. It must never panic,
//! hang or touch memory outside the guest.
#![no_main]

mod common;

use common::*;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = memory();
    let read_only = data[0] & 1 == 1;
    let rounds = 1 + (data[1] % 4);
    // The rest of the input is laid over the descriptor table, the available ring and a
    // data area, in that order, so the fuzzer controls every byte the device reads.
    let body = &data[2..];
    let table_len = (QSIZE as usize) * 16;
    let (table, rest) = body.split_at(body.len().min(table_len));
    let _ = mem.write_slice(table, GuestAddress(DESC));
    let (avail, rest) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    let _ = mem.write_slice(avail, GuestAddress(AVAIL));
    let _ = mem.write_slice(rest, GuestAddress(0x10_000));

    let mut dev = block(read_only);
    let mut q = Queue::new(256).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    if dev.activate(mem.clone(), vec![q], interrupt()).is_err() {
        return;
    }
    for _ in 0..rounds {
        dev.process_queue();
    }
});
