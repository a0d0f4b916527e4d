//! `mptable`: vCPU 0 looks for the Intel MP table where Linux does (the first KiB of RAM,
//! the KiB below 640 KiB, then `0xf0000..0x100000`, 16 bytes at a time), checks both
//! checksums, and prints `mptable: at 0x<addr> cpus=<n> boot=<id> ioapic=0x<addr> lines=<k>`
//! (processor entries, the boot processor's APIC id, the I/O APIC's address, I/O interrupt
//! entries); exits 0 when the table lists exactly the VM's vCPUs, 1 when it lists another
//! number, 2 with `mptable: none` or `mptable: bad <what>`.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

/// Reads guest-physical byte `addr` (identity mapped, user accessible).
fn byte(addr: u64) -> u8 {
    // SAFETY: low memory is RAM, identity mapped and readable at CPL 3.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn le(addr: u64, n: u64) -> u64 {
    (0..n).fold(0, |v, i| v | (u64::from(byte(addr + i)) << (8 * i)))
}

fn sums_to_zero(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(byte(addr + i))) == 0
}

fn find() -> Option<u64> {
    for (start, len) in [(0u64, 0x400u64), (639 * 0x400, 0x400), (0xf0000, 0x10000)] {
        let mut at = start;
        while at < start + len {
            if le(at, 4) == u64::from(u32::from_le_bytes(*b"_MP_")) {
                return Some(at);
            }
            at += 16;
        }
    }
    None
}

fn fail(what: &str) -> ! {
    println!("mptable: bad {}", what);
    rt::exit(2)
}

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let Some(fp) = find() else {
        println!("mptable: none");
        rt::exit(2)
    };
    if !sums_to_zero(fp, 16) {
        fail("floating pointer checksum");
    }
    let table = le(fp + 4, 4);
    if le(table, 4) != u64::from(u32::from_le_bytes(*b"PCMP")) {
        fail("configuration table signature");
    }
    let len = le(table + 4, 2);
    if len < 44 || len > 0x400 || !sums_to_zero(table, len) {
        fail("configuration table checksum");
    }
    let count = le(table + 34, 2);
    let (mut at, end) = (table + 44, table + len);
    let (mut cpus, mut boot, mut ioapic, mut lines) = (0u64, u64::MAX, 0u64, 0u64);
    for _ in 0..count {
        if at >= end {
            fail("entry count");
        }
        match byte(at) {
            0 => {
                cpus += 1;
                if byte(at + 3) & 2 != 0 {
                    boot = u64::from(byte(at + 1));
                }
                at += 20;
            }
            2 => {
                ioapic = le(at + 4, 4);
                at += 8;
            }
            3 => {
                lines += 1;
                at += 8;
            }
            1 | 4 => at += 8,
            _ => fail("entry type"),
        }
    }
    println!(
        "mptable: at {:#x} cpus={} boot={} ioapic={:#x} lines={}",
        fp, cpus, boot, ioapic, lines
    );
    rt::exit(if cpus == rt::cpu_count() as u64 { 0 } else { 1 })
}
