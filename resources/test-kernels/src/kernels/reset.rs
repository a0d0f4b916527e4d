//! `reset`: vCPU 0 prints `reset: requesting` and asks the i8042 controller to pulse the
//! CPU reset line (command 0xfe on port 0x64); the monitor ends the run with status 0.
//! If the reset is ignored it prints `reset: ignored` and exits 1.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    println!("reset: requesting");
    // SAFETY: port I/O at CPL 3 is allowed by the kernel's TSS bitmap.
    unsafe { rt::outb(0x64, 0xfe) };
    // The monitor stops the VM at the write; getting here means it did not.
    let deadline = rt::now_ns() + 100_000_000;
    while rt::now_ns() < deadline {
        core::hint::spin_loop();
    }
    println!("reset: ignored");
    rt::exit(1)
}
