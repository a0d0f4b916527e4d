//! `pio-bench`: parameter `count=N` (default 100000). vCPU 0 writes a byte to port 0x80
//! N times (one VM exit each), timed with the TSC, prints
//! `pio-bench: count=<N> ns=<total ns> ns_per_exit=<avg>` and exits 0. Other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

/// POST/diagnostic port: the monitor accepts and ignores writes.
const PORT: u16 = 0x80;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let count = rt::arg_u64("count", 100_000);
    let t0 = rt::rdtsc();
    for _ in 0..count {
        // SAFETY: port 0x80 writes are ignored by the monitor.
        unsafe { rt::outb(PORT, 0) };
    }
    let ns = rt::ticks_to_ns(rt::rdtsc() - t0);
    let per_exit = ns.checked_div(count).unwrap_or(0);
    println!(
        "pio-bench: count={} ns={} ns_per_exit={}",
        count, ns, per_exit
    );
    rt::exit(0)
}
