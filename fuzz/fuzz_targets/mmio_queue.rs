//! Fuzzes the virtio-mmio transport and queue processing together: an arbitrary sequence
//! of 32-bit register reads and writes (feature negotiation, queue set-up with any ring
//! addresses and sizes, status changes, resets, config-space accesses) interleaved with
//! queue processing, over guest memory the fuzzer also fills.
#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::MmioTransport;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    // The first byte says how many 7-byte operations follow; the rest fills guest memory
    // from the descriptor-table address on (rings, buffers).
    let split = (usize::from(count) * 7).min(rest.len());
    let (ops, memory_bytes) = rest.split_at(split);
    let mem = memory();
    let _ = mem.write_slice(&memory_bytes[..memory_bytes.len().min(8192)], GuestAddress(DESC));
    let dev = Arc::new(Mutex::new(block(false)));
    let mut t = MmioTransport::new("fuzz", dev.clone(), mem, interrupt());
    let base = MmioAddress(0xd000_0000);
    // Each operation: 1 byte kind, 2 bytes offset, 4 bytes value.
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 5 {
            0 => t.mmio_write(base, offset & !3, &value),
            1 => {
                let mut out = [0u8; 4];
                t.mmio_read(base, offset & !3, &mut out);
            }
            2 => t.mmio_write(base, offset, &value[..(op[3] as usize % 4) + 1]),
            3 => {
                let mut out = [0u8; 8];
                t.mmio_read(base, 0x100 + (offset % 16), &mut out[..(op[4] as usize % 8) + 1]);
            }
            _ => dev.lock().expect("lock").process_queue(),
        }
    }
    dev.lock().expect("lock").process_queue();
});
