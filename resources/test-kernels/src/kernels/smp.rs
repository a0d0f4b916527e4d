//! `smp`: every vCPU prints `cpu <index> apic <apic id>`; vCPU 0 waits until all have
//! printed, then prints `smp: <count> cpus` and exits 0.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

fn kmain(cpu: usize) -> ! {
    println!("cpu {} apic {}", cpu, rt::apic_id(cpu));
    rt::set_done(cpu);
    if cpu != 0 {
        rt::park();
    }
    rt::wait_all_done();
    println!("smp: {} cpus", rt::cpu_count());
    rt::exit(0)
}
