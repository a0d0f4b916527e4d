//! `mem-touch`: parameter `mib=N` (default 64). vCPU 0 writes one u64 (derived from the
//! address) per 4 KiB page of [16 MiB, 16 MiB + N MiB), reads them all back and checks
//! them. Prints `mem-touch: mib=<N> ok ns=<elapsed>` and exits 0, or
//! `mem-touch: mismatch at 0x<addr>` and exits 1. If 16 + N > 3072 it prints
//! `mem-touch: mib too large` and exits 2. Other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

/// First byte touched: 16 MiB, well above the kernel image (which ends below 3 MiB).
const BASE: u64 = 16 << 20;
/// Highest end of the touched range, in MiB (stay below the 3 GiB MMIO hole).
const LIMIT_MIB: u64 = 3072;
const PAGE: u64 = 4096;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let mib = rt::arg_u64("mib", 64);
    if mib.saturating_add(BASE >> 20) > LIMIT_MIB {
        println!("mem-touch: mib too large");
        rt::exit(2);
    }
    let end = BASE + (mib << 20);
    let start = rt::now_ns();
    let mut addr = BASE;
    while addr < end {
        // SAFETY: [16 MiB, 3 GiB) is RAM (or unmapped) the kernel does not otherwise use.
        unsafe { core::ptr::write_volatile(addr as usize as *mut u64, pattern(addr)) };
        addr += PAGE;
    }
    addr = BASE;
    while addr < end {
        // SAFETY: as above.
        let value = unsafe { core::ptr::read_volatile(addr as usize as *const u64) };
        if value != pattern(addr) {
            println!("mem-touch: mismatch at {:#x}", addr);
            rt::exit(1);
        }
        addr += PAGE;
    }
    let ns = rt::now_ns() - start;
    println!("mem-touch: mib={} ok ns={}", mib, ns);
    rt::exit(0)
}

/// The value stored at `addr`: odd, and different for every page.
fn pattern(addr: u64) -> u64 {
    (addr ^ 0x5a5a_5a5a_5a5a_5a5a).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}
