//! `exit-code`: parameter `code=N` (default 0). vCPU 0 prints `exit-code: N` and exits
//! with status `N mod 256`; other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let code = rt::arg_u64("code", 0);
    println!("exit-code: {}", code);
    rt::exit(code as u8)
}
