//! The Intel MultiProcessor table (MP specification 1.4) that Linux looks for in low memory.
//!
//! Without one, Linux searches the first KiB of RAM, the last KiB of base memory and the
//! whole BIOS area `0xf0000..0x100000` for the `_MP_` signature, 16 bytes at a time, in code
//! that this project's nested KVM emulates about 4000 times slower than native: ~4.25 s of
//! a minimal guest's boot went to `Scan for SMP in [mem 0x000f0000-0x000fffff]`. The table
//! written here sits at the start of the EBDA (`0x9fc00`, the second range Linux scans, and
//! reserved in the e820 map), so the scan ends after a few steps, and it tells Linux which
//! processors and which I/O APIC the VM has.
//!
//! Written by hand because no maintained crate on crates.io builds MP tables (Firecracker's
//! and Cloud Hypervisor's live inside their `arch` modules, unpublished); the layout is the
//! specification's, and every field is set here explicitly.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{EBDA_START, HIMEM_START, LAPIC_START};

/// Where the I/O APIC of KVM's in-kernel irqchip lives.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Pins of KVM's in-kernel I/O APIC (one interrupt source entry each).
pub const IOAPIC_PINS: u8 = 24;
/// Most processors the table can describe: APIC ids are one byte, and the I/O APIC takes
/// the id after the last processor's (255 is "every processor").
pub const MAX_CPUS: u32 = 254;

/// Version of KVM's local APIC (what its version register reads).
const LAPIC_VERSION: u8 = 0x14;
/// Version of KVM's I/O APIC.
const IOAPIC_VERSION: u8 = 0x11;
/// Size of the floating pointer structure.
const FLOATING_POINTER_LEN: usize = 16;
/// Size of the configuration table header.
const HEADER_LEN: usize = 44;
/// Size of a processor entry.
const PROCESSOR_ENTRY_LEN: usize = 20;
/// Size of every other entry (bus, I/O APIC, interrupt sources).
const SHORT_ENTRY_LEN: usize = 8;
/// Specification revision 1.4.
const SPEC_REVISION: u8 = 4;

// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
// Interrupt types.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Local APIC id meaning "every processor".
const ALL_LAPICS: u8 = 0xff;

/// Errors while writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More processors than the reserved area can describe.
    #[error("an MP table describes 1 to {MAX_CPUS} processors, not {0}")]
    TooManyCpus(u32),
    /// Guest memory refused the write.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Bytes of the whole table (floating pointer, header and entries) for `cpus` processors.
pub fn table_len(cpus: u32) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + cpus as usize * PROCESSOR_ENTRY_LEN
        + SHORT_ENTRY_LEN * (2 + usize::from(IOAPIC_PINS) + 2)
}

// The largest table fits in the reserved area between the EBDA and 1 MiB.
const _: () = assert!(
    (FLOATING_POINTER_LEN
        + HEADER_LEN
        + MAX_CPUS as usize * PROCESSOR_ENTRY_LEN
        + SHORT_ENTRY_LEN * (2 + IOAPIC_PINS as usize + 2)) as u64
        <= HIMEM_START - EBDA_START
);

/// The byte that makes `bytes` sum to zero (the specification's checksums).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The table for `cpus` processors (local APIC ids `0..cpus`, the first one boots), laid
/// out for the guest-physical address `at`.
pub fn build(cpus: u32, at: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8; // the first id after the processors'
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus as u8 {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend([ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informative only, Linux
        // takes the real ones from CPUID.
        entries.extend(0x600u32.to_le_bytes());
        entries.extend(((1u32 << 0) | (1u32 << 9)).to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(*b"ISA   ");
    count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Each ISA interrupt line goes to the I/O APIC pin of the same number, as KVM's
    // default routing sends GSI n to pin n; the virtio-mmio devices use lines 5 and up.
    for pin in 0..IOAPIC_PINS {
        entries.extend([
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // The legacy PIC's output on the boot processor's LINT0, NMI on every LINT1.
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);
    count += 2;

    let header_at = at + FLOATING_POINTER_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN + entries.len());
    header.extend(*b"PCMP");
    header.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.extend([SPEC_REVISION, 0]); // checksum filled below
    header.extend(*b"VMM     "); // OEM id
    header.extend(*b"VMM MPTABLE "); // product id
    header.extend(0u32.to_le_bytes()); // no OEM table
    header.extend(0u16.to_le_bytes());
    header.extend(count.to_le_bytes());
    header.extend((LAPIC_START as u32).to_le_bytes());
    header.extend(0u16.to_le_bytes()); // no extended entries
    header.extend([0, 0]); // extended checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend(entries);
    header[7] = checksum(&header);

    let mut table = Vec::with_capacity(table_len(cpus));
    table.extend(*b"_MP_");
    table.extend((header_at as u32).to_le_bytes());
    table.extend([1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, ..
    table[10] = checksum(&table);
    table.extend(header);
    debug_assert_eq!(table.len(), table_len(cpus));
    Ok(table)
}

/// Writes the table for `cpus` processors at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<(), MpTableError> {
    let table = build(cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn both_structures_sum_to_zero_and_point_at_each_other() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer of {cpus} CPUs");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let header = &t[16..];
            assert_eq!(&header[0..4], b"PCMP");
            let len = u16::from_le_bytes([header[4], header[5]]) as usize;
            assert_eq!(len, header.len());
            assert_eq!(sum(header), 0, "configuration table of {cpus} CPUs");
            let count = u16::from_le_bytes([header[34], header[35]]) as u32;
            assert_eq!(count, cpus + 2 + u32::from(IOAPIC_PINS) + 2);
        }
    }

    #[test]
    fn entries_walk_to_the_end_with_one_boot_processor() {
        let t = build(4, EBDA_START).unwrap();
        let mut at = 16 + HEADER_LEN;
        let (mut cpus, mut boot, mut ioapics, mut lines) = (0, 0, 0, Vec::new());
        while at < t.len() {
            match t[at] {
                ENTRY_PROCESSOR => {
                    cpus += 1;
                    boot += usize::from(t[at + 3] & CPU_BOOT_PROCESSOR != 0);
                    at += PROCESSOR_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    ioapics += 1;
                    let addr = u32::from_le_bytes(t[at + 4..at + 8].try_into().unwrap());
                    assert_eq!(u64::from(addr), IOAPIC_START);
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(t[at + 5], t[at + 7], "ISA line n goes to pin n");
                    lines.push(t[at + 5]);
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => at += SHORT_ENTRY_LEN,
                other => panic!("unknown entry type {other} at {at}"),
            }
        }
        assert_eq!(at, t.len());
        assert_eq!((cpus, boot, ioapics), (4, 1, 1));
        assert_eq!(lines, (0..IOAPIC_PINS).collect::<Vec<_>>());
    }

    #[test]
    fn no_processor_or_too_many_is_refused() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MpTableError::TooManyCpus(0))
        ));
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
    }

    #[test]
    fn written_where_linux_scans_first_after_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(0x9fc00)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
