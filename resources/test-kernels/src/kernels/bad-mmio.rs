//! `bad-mmio`: vCPU 0 prints `bad-mmio: writing`, writes a u32 to guest-physical
//! 0xfe00_0000 (no device there), reads it back, prints `bad-mmio: read 0x<value>`
//! (`0xffffffff` expected) and `bad-mmio: survived`, then exits 0. Other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

/// An MMIO address where the monitor has no device.
const ADDR: u64 = 0xfe00_0000;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    println!("bad-mmio: writing");
    // SAFETY: nothing of ours lives at ADDR; the monitor drops the write.
    unsafe { rt::mmio_write32(ADDR, 0x1234_5678) };
    // SAFETY: as above; the monitor returns all ones.
    let value = unsafe { rt::mmio_read32(ADDR) };
    println!("bad-mmio: read {:#x}", value);
    println!("bad-mmio: survived");
    rt::exit(0)
}
