//! `bad-loop`: vCPU 0 prints `bad-loop: spinning`, then every vCPU loops forever at
//! CPL 3. Only the monitor's `--timeout-ms` ends it.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    if cpu == 0 {
        println!("bad-loop: spinning");
    }
    let mut n: u64 = 0;
    loop {
        n = core::hint::black_box(n.wrapping_add(1));
    }
}
