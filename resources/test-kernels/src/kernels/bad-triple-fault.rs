//! `bad-triple-fault`: vCPU 0 prints `bad-triple-fault: faulting`, then executes `ud2` at
//! CPL 3. There is no IDT, so #UD escalates to a triple fault, which the monitor must
//! report. Other vCPUs park.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    println!("bad-triple-fault: faulting");
    // SAFETY: deliberately faults; nothing runs afterwards.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
