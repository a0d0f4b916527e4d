//! `hello`: vCPU 0 prints `Hello from test kernel` and exits 0; other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    println!("Hello from test kernel");
    rt::exit(0)
}
