//! The CPL 0 entry stub and the static machine state it installs.
//!
//! The monitor starts every vCPU at `_start` (1 MiB) in 64-bit mode at CPL 0 with
//! `RDI` = vCPU index and `RSI` = zero page (see `BOOT.md`). On this project's nested KVM
//! every CPL 0 instruction goes through KVM's instruction emulator (~0.5 us each), so the
//! stub is 44 straight-line instructions, without loops:
//!
//! 1. `RDI >= MAX_CPUS` -> `ud2` (no IDT: the monitor reports a triple fault).
//! 2. `lgdt` our GDT: null, 0x08 kernel code64, 0x10 kernel data, 0x18 user data
//!    (selector 0x1b), 0x20 user code64 (selector 0x23), then one 64-bit TSS descriptor
//!    per vCPU at 0x28 + 16 * index, all for the same TSS, and `ltr` this vCPU's one.
//!    The TSS only exists for its I/O permission bitmap, which allows every port: on this
//!    project's nested KVM, `in`/`out` at CPL 3 are checked against the bitmap of the
//!    current TSS despite IOPL 3 (with the monitor's TSS at base 0 the "bitmap" is
//!    whatever sits at guest-physical 0..8 KiB, and ports whose bit is set there fault).
//!    One descriptor per vCPU because `ltr` marks its descriptor busy and would fault on a
//!    busy one.
//! 3. `CR3` = our own page tables (static data below): identity map of the first 4 GiB
//!    with 2 MiB pages, Present|RW|User at every level, so CPL 3 reaches all RAM and MMIO.
//! 4. `CR4 |= OSFXSR|OSXMMEXCPT` (PAE stays), `CR0`: clear EM, set MP (SSE usable).
//! 5. `cpuid` leaf 1 -> APIC id of this vCPU ([`APIC_IDS`]) and the vCPU count
//!    ([`VCPU_COUNT`]); leaf 0x4000_0010 (if leaf 0x4000_0000 reports it) -> TSC kHz
//!    ([`TSC_KHZ`]). `cpuid` at CPL 3 is not trapped on this host, so these values must be
//!    recorded here.
//! 6. Stack = top of `rt_stacks[RDI]` (16 KiB per vCPU), then `iretq` to CPL 3
//!    (CS 0x23, SS 0x1b, RFLAGS 0x3002 = IOPL 3, IF 0) into [`rt_entry`] with
//!    `RDI` = vCPU index and `RSI` = zero page preserved.
//!
//! There is no IDT (and the TSS has no usable stacks): any exception at CPL 3 becomes a
//! triple fault, which the monitor reports. That is intended (see the `bad-triple-fault` kernel).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most vCPUs a test kernel supports (one stack and one APIC-id slot each).
pub const MAX_CPUS: usize = 64;

/// Size of each vCPU's stack in bytes. There is no guard page: keep frames small.
pub const STACK_SIZE: usize = 16 * 1024;

/// Number of vCPUs, from `cpuid` leaf 1 EBX[23:16] (written at CPL 0 by every vCPU).
pub(super) static VCPU_COUNT: AtomicU32 = AtomicU32::new(0);

/// TSC frequency in kHz, from `cpuid` leaf 0x4000_0010 EAX (0 if not reported).
pub(super) static TSC_KHZ: AtomicU32 = AtomicU32::new(0);

/// Initial APIC id of each vCPU, from `cpuid` leaf 1 EBX[31:24], indexed by vCPU index.
pub(super) static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// Guest-physical address of the zero page (`boot_params`) passed in `RSI`.
pub(super) static ZERO_PAGE: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    // ---- CPL 0 entry stub: straight-line, every instruction here is emulated. ----
    ".section .text.boot, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    cmp rdi, {max_cpus}",
    "    jae 9f",
    "    lgdt [rip + rt_gdt_ptr]",
    "    mov eax, edi", // TSS selector 0x28 + 16 * index
    "    shl eax, 4",
    "    add eax, {tss_sel0}",
    "    ltr ax",
    "    lea rax, [rip + rt_pml4]",
    "    mov cr3, rax",
    "    mov rax, cr4",
    "    or eax, 0x600", // OSFXSR | OSXMMEXCPT
    "    mov cr4, rax",
    "    mov rax, cr0",
    "    and eax, 0xfffffffb", // clear EM (bit 31, PG, is kept)
    "    or eax, 0x2",         // set MP
    "    mov cr0, rax",
    // cpuid leaf 1: EBX[31:24] = APIC id, EBX[23:16] = vCPU count.
    "    mov eax, 1",
    "    cpuid",
    "    mov eax, ebx",
    "    shr eax, 24",
    "    lea rcx, [rip + {apic_ids}]",
    "    mov dword ptr [rcx + rdi * 4], eax",
    "    shr ebx, 16",
    "    movzx ebx, bl",
    "    mov dword ptr [rip + {vcpu_count}], ebx",
    // cpuid leaf 0x4000_0010 EAX = TSC kHz, if the hypervisor range reaches it.
    "    mov eax, 0x40000000",
    "    cpuid",
    "    cmp eax, 0x40000010",
    "    jb 1f",
    "    mov eax, 0x40000010",
    "    cpuid",
    "    mov dword ptr [rip + {tsc_khz}], eax",
    "1:",
    // Stack: top of rt_stacks[rdi]; the iretq frame is built on it.
    "    lea rsp, [rip + rt_stacks + {stack_size}]",
    "    mov rax, rdi",
    "    shl rax, {stack_shift}",
    "    add rsp, rax",
    "    lea rax, [rsp - 8]", // CPL 3 RSP: as if `call`ed (RSP + 8 is 16-byte aligned)
    "    push 0x1b",          // SS: user data, RPL 3
    "    push rax",           // RSP
    "    push 0x3002",        // RFLAGS: IOPL 3, IF 0
    "    push 0x23",          // CS: user code64, RPL 3
    "    lea rax, [rip + {entry}]",
    "    push rax", // RIP
    "    iretq",    // RDI = vCPU index, RSI = zero page: rt_entry's arguments
    "9:",
    "    ud2",
    ".size _start, . - _start",
    //
    // ---- GDT (Accessed bits preset so the CPU never writes to it). ----
    ".section .data.rt_gdt, \"aw\", @progbits",
    ".balign 16",
    "rt_gdt:",
    "    .quad 0",                  // 0x00 null
    "    .quad 0x00af9b000000ffff", // 0x08 kernel code64 (DPL 0, L)
    "    .quad 0x00cf93000000ffff", // 0x10 kernel data (DPL 0)
    "    .quad 0x00cff3000000ffff", // 0x18 user data (DPL 3) -> selector 0x1b
    "    .quad 0x00affb000000ffff", // 0x20 user code64 (DPL 3, L) -> selector 0x23
    // 0x28 + 16 * i: 64-bit available TSS for vCPU i, all describing rt_tss. The two
    // halves are computed by kernel.ld (the assembler cannot split a symbol's address).
    "    .rept {max_cpus}",
    "    .quad __rt_tss_desc_lo",
    "    .quad __rt_tss_desc_hi",
    "    .endr",
    "rt_gdt_end:",
    "    .balign 8",
    "    .skip 6",
    "rt_gdt_ptr:",
    "    .word rt_gdt_end - rt_gdt - 1",
    "    .quad rt_gdt",
    //
    // ---- TSS: only the I/O permission bitmap matters; all ports allowed (bits clear). ----
    ".section .data.rt_tss, \"aw\", @progbits",
    ".balign 4096",
    ".global rt_tss",
    "rt_tss:",
    "    .fill 0x66, 1, 0",
    "    .word rt_tss_iomap - rt_tss", // I/O map base
    "rt_tss_iomap:",
    "    .fill 8192, 1, 0", // one bit per port 0..=0xffff, 0 = allowed
    "    .byte 0xff",       // terminator (the CPU reads two bitmap bytes)
    ".global rt_tss_end",
    "rt_tss_end:",
    //
    // ---- Page tables: identity map of 0..4 GiB, 2 MiB pages, P|RW|US everywhere. ----
    ".section .data.rt_pagetables, \"aw\", @progbits",
    ".balign 4096",
    "rt_pml4:",
    "    .quad rt_pdpt + 0x7",
    "    .fill 511, 8, 0",
    "rt_pdpt:",
    "    .quad rt_pd + 0x0000 + 0x7",
    "    .quad rt_pd + 0x1000 + 0x7",
    "    .quad rt_pd + 0x2000 + 0x7",
    "    .quad rt_pd + 0x3000 + 0x7",
    "    .fill 508, 8, 0",
    "rt_pd:", // 4 page directories, 2048 entries of 2 MiB: P|RW|US|PS = 0x87
    "    .set rt_pd_addr, 0",
    "    .rept 2048",
    "    .quad rt_pd_addr + 0x87",
    "    .set rt_pd_addr, rt_pd_addr + 0x200000",
    "    .endr",
    //
    // ---- Per-vCPU stacks (bss; placed first in .bss by kernel.ld). ----
    ".section .bss.rt_stacks, \"aw\", @nobits",
    ".balign 4096",
    ".global rt_stacks",
    "rt_stacks:",
    "    .skip {stacks_bytes}",
    ".global rt_stacks_end",
    "rt_stacks_end:",
    //
    // ---- ELF note "TUNEVMM", type 1, desc 0: start every vCPU at the entry point. ----
    ".section .note.tunevmm, \"a\", @note",
    ".balign 4",
    "    .long 8", // namesz ("TUNEVMM\0")
    "    .long 4", // descsz
    "    .long 1", // type
    "    .asciz \"TUNEVMM\"",
    "    .long 0", // desc
    //
    ".text",
    max_cpus = const MAX_CPUS,
    tss_sel0 = const TSS_SELECTOR_0,
    stack_size = const STACK_SIZE,
    stack_shift = const STACK_SIZE.trailing_zeros(),
    stacks_bytes = const MAX_CPUS * STACK_SIZE,
    apic_ids = sym APIC_IDS,
    vcpu_count = sym VCPU_COUNT,
    tsc_khz = sym TSC_KHZ,
    entry = sym rt_entry,
);

/// GDT selector of vCPU 0's TSS descriptor; vCPU `i` uses `TSS_SELECTOR_0 + 16 * i`.
pub const TSS_SELECTOR_0: usize = 0x28;

const _: () = assert!(STACK_SIZE.is_power_of_two());

/// First Rust code, entered by every vCPU at CPL 3 from the `_start` stub.
///
/// Records the zero page, has vCPU 0 warn if the TSC frequency is unknown, then runs the
/// kernel's `kmain(cpu)`.
extern "C" fn rt_entry(cpu: usize, zero_page: u64) -> ! {
    ZERO_PAGE.store(zero_page, Ordering::Relaxed);
    if cpu == 0 && !super::time::tsc_khz_known() {
        println!("warning: TSC kHz unknown, assuming 1 GHz");
    }
    crate::kmain(cpu)
}
