//! The 64-bit machine state the monitor gives a vCPU at the kernel's entry point: a GDT,
//! an identity map of the first 4 GiB, control registers for long mode, MSRs, FPU and the
//! local APIC's LINT pins. This is the state Linux's 64-bit boot protocol expects.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_COUNT, PD_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors while setting up a vCPU for long mode.
#[derive(Debug, thiserror::Error)]
pub enum LongModeError {
    /// Boot structures could not be written to guest memory.
    #[error("cannot write the boot {what} to guest memory: {source}")]
    WriteMemory {
        /// Which structure.
        what: &'static str,
        /// vm-memory's reason.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM vCPU ioctl failed.
    #[error("cannot set the vCPU's {what}: {source}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// KVM's reason.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Given.
        wanted: usize,
    },
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the 64-bit code segment in the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment in the boot GDT.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS in the boot GDT.
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs a segment descriptor (Intel SDM vol. 3, 3.4.5) from flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), 64-bit TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Unpacks a GDT descriptor into the form KVM wants for a segment register.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity-mapping page tables into guest memory.
/// Shared by all vCPUs; call once.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), LongModeError> {
    let wr = |what, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| LongModeError::WriteMemory { what, source })
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        wr("GDT", GDT_START + 8 * i as u64, *e)?;
    }
    wr("IDT", IDT_START, 0)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> PDs; each PD maps 1 GiB with 2 MiB pages.
    // Flags: present | writable (0x3); PS (0x80) for 2 MiB pages.
    wr("page tables", PML4_START, PDPT_START | 0x3)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        wr("page tables", PDPT_START + pd * 8, pd_addr | 0x3)?;
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let phys = (pd << 30) | ((i as u64) << 21);
            chunk.copy_from_slice(&(phys | 0x83).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr))
            .map_err(|source| LongModeError::WriteMemory {
                what: "page tables",
                source,
            })?;
    }
    Ok(())
}

/// Puts `vcpu` in 64-bit mode at `entry`, with `rdi` = `vcpu_index` and `rsi` = zero page.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64, vcpu_index: u32) -> Result<(), LongModeError> {
    let kvm = |what| move |source| LongModeError::Kvm { what, source };

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let code = segment_from_gdt(BOOT_GDT[1], CODE_SELECTOR);
    let data = segment_from_gdt(BOOT_GDT[2], DATA_SELECTOR);
    let tss = segment_from_gdt(BOOT_GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rdi: u64::from(vcpu_index),
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))?;

    setup_msrs(vcpu)?;
    setup_lint(vcpu)
}

/// MSR values for a clean boot: syscall MSRs cleared, TSC at 0, fast strings on, MTRRs
/// enabled with write-back as the default type.
fn setup_msrs(vcpu: &VcpuFd) -> Result<(), LongModeError> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let wanted = entries.len();
    let msrs = Msrs::from_entries(&entries).map_err(|_| LongModeError::Msrs { set: 0, wanted })?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| LongModeError::Kvm {
        what: "MSRs",
        source,
    })?;
    if set != wanted {
        return Err(LongModeError::Msrs { set, wanted });
    }
    Ok(())
}

/// Wires the local APIC's LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), LongModeError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(|source| LongModeError::Kvm {
        what: "local APIC",
        source,
    })?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let val = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| LongModeError::Kvm {
        what: "local APIC",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trips_through_kvm_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.dpl, code.present, code.s),
            (1, 0, 0, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 3));
        let tss = segment_from_gdt(BOOT_GDT[3], TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.unusable), (0, 0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        let last_pd: u64 = mem.read_obj(GuestAddress(PDPT_START + 24)).unwrap();
        assert_eq!(last_pd, (PD_START + 3 * 4096) | 3);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_START + 3 * 4096 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }
}
