//! A PVH wrapper for test kernels, so that QEMU can boot them.
//!
//! QEMU's `-kernel` on `-M microvm` accepts a Linux bzImage or an ELF file with a Xen
//! `XEN_ELFNOTE_PHYS32_ENTRY` note (the PVH boot ABI); it refuses the project's test kernels
//! ("Error loading uncompressed kernel without PVH ELF Note"). PVH enters the kernel in
//! 32-bit protected mode with paging off, while the test kernels expect the state described
//! in `resources/test-kernels/BOOT.md` (64-bit long mode, `RDI` = vCPU index, `RSI` = zero
//! page with a command line).
//!
//! [`wrap_with`] builds a new ELF file holding the kernel's `PT_LOAD` segments unchanged plus one
//! extra segment, placed above the kernel's image: a 23-instruction shim that goes from the
//! PVH state to the test kernels' entry state, its page tables (identity map of the first
//! GiB with 2 MiB pages), a GDT, a minimal zero page whose `cmd_line_ptr` points to the
//! command line, and the command line itself. A `Xen` note names the shim as the PVH entry.
//! The kernel itself is byte for byte the one `vmm` boots.

use thiserror::Error;

/// Errors while wrapping a kernel.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PvhError {
    /// The input is not an ELF64 x86-64 executable.
    #[error("not an ELF64 x86-64 executable: {0}")]
    NotElf(&'static str),
    /// A program header points outside the file.
    #[error("program header {0} is out of the file's bounds")]
    BadSegment(usize),
    /// The kernel has no loadable segment.
    #[error("the kernel has no PT_LOAD segment")]
    NoSegments,
    /// The kernel or its shim would not fit in the first GiB (the shim's identity map).
    #[error("the kernel ends at {0:#x}, too high for the shim (must stay below 1 GiB)")]
    TooHigh(u64),
    /// The command line does not fit in the shim.
    #[error("the command line is {0} bytes long; at most {max} fit", max = CMDLINE_MAX)]
    CmdlineTooLong(usize),
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_RWX: u32 = 7;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PAGE: u64 = 0x1000;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

// Layout of the shim segment, as offsets from its base (page aligned).
const OFF_PML4: u64 = 0x0000;
const OFF_PDPT: u64 = 0x1000;
const OFF_PD: u64 = 0x2000;
const OFF_ZERO_PAGE: u64 = 0x3000;
const OFF_CMDLINE: u64 = 0x4000;
/// Longest command line the shim carries (NUL excluded).
pub const CMDLINE_MAX: usize = 0x7ff;
const OFF_GDT: u64 = 0x4800;
const OFF_GDTR: u64 = 0x4820;
const OFF_CODE32: u64 = 0x5000;
const OFF_CODE64: u64 = 0x5100;
const SHIM_SIZE: u64 = 0x5200;
/// Offset of `hdr.cmd_line_ptr` in the zero page.
const CMD_LINE_PTR_OFFSET: u64 = 0x228;
/// The shim's selectors: 0x08 = 64-bit code, 0x10 = data.
const GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

/// Where the wrapped kernel's command line comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineSource {
    /// The command line given to [`wrap_with`], embedded in the shim segment.
    Embedded,
    /// The loader's: the shim points the zero page's `cmd_line_ptr` at the
    /// `cmdline_paddr` of the PVH start info (`hvm_start_info`, whose address the loader
    /// passes in `EBX`), which QEMU's firmware fills from `-append` plus, on `microvm`, the
    /// `virtio_mmio.device=` words of its automatic kernel command line (`microvm` adds
    /// them only with `acpi=off`). When `EBX` does not point to a start info (bad magic)
    /// or its command line is absent or empty, the embedded one is kept.
    PvhStartInfo,
}

/// `XEN_HVM_START_MAGIC_VALUE`: the first u32 of `hvm_start_info`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of `cmdline_paddr` (u64) in `hvm_start_info`.
const HVM_START_CMDLINE_PADDR: u8 = 0x18;

/// A wrapped kernel: the ELF bytes and where the PVH entry is.
#[derive(Debug, Clone)]
pub struct Wrapped {
    /// The new ELF file.
    pub elf: Vec<u8>,
    /// Guest-physical address of the shim's 32-bit entry point.
    pub pvh_entry: u32,
    /// Guest-physical address of the shim segment.
    pub shim_base: u64,
}

struct Segment {
    flags: u32,
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The loadable segments of an ELF64 x86-64 executable, and its entry point.
fn parse(elf: &[u8]) -> Result<(u64, Vec<Segment>), PvhError> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(PvhError::NotElf("bad magic"));
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(PvhError::NotElf("not 64-bit little-endian"));
    }
    if u16_at(elf, 18) != Some(EM_X86_64) {
        return Err(PvhError::NotElf("not x86-64"));
    }
    let short = PvhError::NotElf("truncated header");
    let entry = u64_at(elf, 24).ok_or(short.clone())?;
    let phoff = u64_at(elf, 32).ok_or(short.clone())? as usize;
    let phentsize = usize::from(u16_at(elf, 54).ok_or(short.clone())?);
    let phnum = usize::from(u16_at(elf, 56).ok_or(short)?);
    if phentsize < PHDR_SIZE {
        return Err(PvhError::NotElf("program headers too small"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(PvhError::BadSegment(i))?;
        let field = |o: usize| u64_at(elf, ph + o).ok_or(PvhError::BadSegment(i));
        let p_type = u32_at(elf, ph).ok_or(PvhError::BadSegment(i))?;
        if p_type != PT_LOAD {
            continue;
        }
        let flags = u32_at(elf, ph + 4).ok_or(PvhError::BadSegment(i))?;
        let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
        let start = usize::try_from(offset).map_err(|_| PvhError::BadSegment(i))?;
        let end = start
            .checked_add(usize::try_from(filesz).map_err(|_| PvhError::BadSegment(i))?)
            .ok_or(PvhError::BadSegment(i))?;
        let data = elf.get(start..end).ok_or(PvhError::BadSegment(i))?.to_vec();
        if memsz < filesz {
            return Err(PvhError::BadSegment(i));
        }
        segments.push(Segment {
            flags,
            paddr,
            data,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err(PvhError::NoSegments);
    }
    Ok((entry, segments))
}

fn put_u32(buf: &mut [u8], off: u64, v: u32) {
    let o = off as usize;
    buf[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], off: u64, v: u64) {
    let o = off as usize;
    buf[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Machine code of the shim, for a segment at `base` and a kernel entry at `entry`.
///
/// 32-bit part (PVH entry, protected mode, paging off):
/// `cli; lgdt [gdtr]; cr4 |= PAE; cr3 = pml4; EFER |= LME; cr0 |= PG|PE; ljmp 0x08:code64`.
/// With [`CmdlineSource::PvhStartInfo`], right after `cli` (7 more instructions):
/// `p = [ebx + 0x18]; if [ebx] == magic && p != 0 && [p] != 0 { zero_page.cmd_line_ptr = p }`.
/// 64-bit part: `ds = es = ss = 0x10; edi = 0; esi = zero page; jmp entry`.
fn shim_code(base: u32, entry: u32, source: CmdlineSource) -> (Vec<u8>, Vec<u8>) {
    let le = |v: u32| v.to_le_bytes();
    let mut c32 = vec![0xfa]; // cli
    if source == CmdlineSource::PvhStartInfo {
        c32.extend([0x81, 0x3b]); // cmp dword [ebx], imm32
        c32.extend(le(HVM_START_MAGIC));
        c32.extend([0x75, 0x11]); // jne +17 (past the next six instructions)
        c32.extend([0x8b, 0x43, HVM_START_CMDLINE_PADDR]); // mov eax, [ebx + 0x18]
        c32.extend([0x85, 0xc0]); // test eax, eax
        c32.extend([0x74, 0x0a]); // jz +10 (past the store)
        c32.extend([0x80, 0x38, 0x00]); // cmp byte [eax], 0
        c32.extend([0x74, 0x05]); // je +5 (empty: keep the embedded one)
        c32.push(0xa3); // mov [moffs32], eax
        c32.extend(le(base + (OFF_ZERO_PAGE + CMD_LINE_PTR_OFFSET) as u32));
    }
    c32.extend([0x0f, 0x01, 0x15]); // lgdt [disp32]
    c32.extend(le(base + OFF_GDTR as u32));
    c32.extend([0x0f, 0x20, 0xe0]); // mov eax, cr4
    c32.extend([0x83, 0xc8, 0x20]); // or eax, 0x20 (PAE)
    c32.extend([0x0f, 0x22, 0xe0]); // mov cr4, eax
    c32.push(0xb8); // mov eax, imm32
    c32.extend(le(base + OFF_PML4 as u32));
    c32.extend([0x0f, 0x22, 0xd8]); // mov cr3, eax
    c32.push(0xb9); // mov ecx, imm32
    c32.extend(le(0xc000_0080)); // IA32_EFER
    c32.extend([0x0f, 0x32]); // rdmsr
    c32.push(0x0d); // or eax, imm32
    c32.extend(le(0x100)); // LME
    c32.extend([0x0f, 0x30]); // wrmsr
    c32.extend([0x0f, 0x20, 0xc0]); // mov eax, cr0
    c32.push(0x0d); // or eax, imm32
    c32.extend(le(0x8000_0001)); // PG | PE
    c32.extend([0x0f, 0x22, 0xc0]); // mov cr0, eax
    c32.push(0xea); // ljmp ptr16:32
    c32.extend(le(base + OFF_CODE64 as u32));
    c32.extend([0x08, 0x00]);

    let mut c64 = vec![0xb8]; // mov eax, imm32
    c64.extend(le(0x10));
    c64.extend([0x8e, 0xd8]); // mov ds, eax
    c64.extend([0x8e, 0xc0]); // mov es, eax
    c64.extend([0x8e, 0xd0]); // mov ss, eax
    c64.extend([0x31, 0xff]); // xor edi, edi (vCPU index 0)
    c64.push(0xbe); // mov esi, imm32 (zero-extended into rsi)
    c64.extend(le(base + OFF_ZERO_PAGE as u32));
    c64.push(0xb8); // mov eax, imm32
    c64.extend(le(entry));
    c64.extend([0xff, 0xe0]); // jmp rax
    (c32, c64)
}

/// The shim segment's contents for a segment at `base`.
fn shim_segment(base: u64, entry: u64, cmdline: &str, source: CmdlineSource) -> Vec<u8> {
    let mut s = vec![0u8; SHIM_SIZE as usize];
    put_u64(&mut s, OFF_PML4, (base + OFF_PDPT) | 0x3);
    put_u64(&mut s, OFF_PDPT, (base + OFF_PD) | 0x3);
    for i in 0..512u64 {
        // Present | RW | PS (2 MiB page).
        put_u64(&mut s, OFF_PD + i * 8, (i << 21) | 0x83);
    }
    put_u32(
        &mut s,
        OFF_ZERO_PAGE + CMD_LINE_PTR_OFFSET,
        (base + OFF_CMDLINE) as u32,
    );
    let c = OFF_CMDLINE as usize;
    s[c..c + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    for (i, d) in GDT.iter().enumerate() {
        put_u64(&mut s, OFF_GDT + 8 * i as u64, *d);
    }
    let g = OFF_GDTR as usize;
    s[g..g + 2].copy_from_slice(&((GDT.len() * 8 - 1) as u16).to_le_bytes());
    put_u64(&mut s, OFF_GDTR + 2, base + OFF_GDT);
    let (c32, c64) = shim_code(base as u32, entry as u32, source);
    let o = OFF_CODE32 as usize;
    s[o..o + c32.len()].copy_from_slice(&c32);
    let o = OFF_CODE64 as usize;
    s[o..o + c64.len()].copy_from_slice(&c64);
    s
}

/// Wraps the test kernel `elf` for a PVH boot; the command line is `cmdline` or, with
/// [`CmdlineSource::PvhStartInfo`], the loader's when it passes one.
pub fn wrap_with(elf: &[u8], cmdline: &str, source: CmdlineSource) -> Result<Wrapped, PvhError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(PvhError::CmdlineTooLong(cmdline.len()));
    }
    let (entry, mut segments) = parse(elf)?;
    let kernel_end = segments
        .iter()
        .map(|s| s.paddr.saturating_add(s.memsz))
        .max()
        .unwrap_or(0);
    let base = kernel_end.div_ceil(PAGE) * PAGE;
    if base + SHIM_SIZE > (1 << 30) || entry >= (1 << 30) {
        return Err(PvhError::TooHigh(kernel_end.max(entry)));
    }
    segments.push(Segment {
        flags: PF_RWX,
        paddr: base,
        data: shim_segment(base, entry, cmdline, source),
        memsz: SHIM_SIZE,
    });
    let pvh_entry = (base + OFF_CODE32) as u32;

    // File layout: ELF header, program headers, the note, then each segment page aligned.
    let phnum = segments.len() + 1;
    let note_off = EHDR_SIZE + phnum * PHDR_SIZE;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend(8u32.to_le_bytes()); // descsz
    note.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend(b"Xen\0");
    note.extend(u64::from(pvh_entry).to_le_bytes());

    let mut out = vec![0u8; note_off];
    out.extend(&note);
    let mut phdrs = Vec::new();
    for seg in &segments {
        // Offset congruent to the address modulo the page size.
        let mut off = out.len() as u64;
        let want = seg.paddr % PAGE;
        off = off.div_ceil(PAGE) * PAGE + want;
        out.resize(off as usize, 0);
        out.extend(&seg.data);
        phdrs.push((
            PT_LOAD,
            seg.flags,
            off,
            seg.paddr,
            seg.data.len() as u64,
            seg.memsz,
            PAGE,
        ));
    }
    phdrs.push((
        PT_NOTE,
        4,
        note_off as u64,
        0,
        note.len() as u64,
        note.len() as u64,
        4,
    ));

    // ELF header.
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little endian
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    out[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    out[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    for (i, (ty, flags, off, addr, filesz, memsz, align)) in phdrs.into_iter().enumerate() {
        let p = EHDR_SIZE + i * PHDR_SIZE;
        out[p..p + 4].copy_from_slice(&ty.to_le_bytes());
        out[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
        for (j, v) in [off, addr, addr, filesz, memsz, align]
            .into_iter()
            .enumerate()
        {
            out[p + 8 + 8 * j..p + 16 + 8 * j].copy_from_slice(&v.to_le_bytes());
        }
    }
    Ok(Wrapped {
        elf: out,
        pvh_entry,
        shim_base: base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(elf: &[u8], cmdline: &str) -> Result<Wrapped, PvhError> {
        wrap_with(elf, cmdline, CmdlineSource::Embedded)
    }

    fn kernel() -> Vec<u8> {
        let path = test_kernels::kernel_path("hello");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn wrapped_kernel_keeps_segments_and_adds_shim_and_note() {
        let original = kernel();
        let (entry, segs) = parse(&original).expect("parse hello");
        let w = wrap(&original, "count=5").expect("wrap");
        let (entry2, segs2) = parse(&w.elf).expect("parse wrapped");
        assert_eq!(entry, entry2);
        assert_eq!(segs2.len(), segs.len() + 1);
        for (a, b) in segs.iter().zip(&segs2) {
            assert_eq!((a.paddr, a.memsz, &a.data), (b.paddr, b.memsz, &b.data));
        }
        let shim = &segs2[segs.len()];
        assert_eq!(shim.paddr, w.shim_base);
        assert_eq!(shim.paddr % PAGE, 0);
        assert!(segs.iter().all(|s| s.paddr + s.memsz <= shim.paddr));
        let zp = (OFF_ZERO_PAGE + CMD_LINE_PTR_OFFSET) as usize;
        let ptr = u32_at(&shim.data, zp).expect("cmd_line_ptr");
        let c = (u64::from(ptr) - shim.paddr) as usize;
        assert_eq!(&shim.data[c..c + 8], b"count=5\0");
        // The note names the PVH entry.
        let note = EHDR_SIZE + (segs2.len() + 1) * PHDR_SIZE;
        assert_eq!(u32_at(&w.elf, note + 8), Some(XEN_ELFNOTE_PHYS32_ENTRY));
        assert_eq!(&w.elf[note + 12..note + 16], b"Xen\0");
        assert_eq!(u64_at(&w.elf, note + 16), Some(u64::from(w.pvh_entry)));
    }

    #[test]
    fn start_info_variant_only_adds_the_cmdline_override() {
        let original = kernel();
        let plain = wrap(&original, "x=1").expect("wrap");
        let loader = wrap_with(&original, "x=1", CmdlineSource::PvhStartInfo).expect("wrap");
        assert_eq!(plain.pvh_entry, loader.pvh_entry);
        let (_, a) = parse(&plain.elf).expect("parse");
        let (_, b) = parse(&loader.elf).expect("parse");
        let (sa, sb) = (&a[a.len() - 1].data, &b[b.len() - 1].data);
        let code = OFF_CODE32 as usize;
        // Everything but the 32-bit code is the same (tables, zero page, command line).
        assert_eq!(sa[..code], sb[..code]);
        assert_eq!(sa[OFF_CODE64 as usize..], sb[OFF_CODE64 as usize..]);
        // The override comes right after `cli`: the magic check, then a store to the zero
        // page's cmd_line_ptr, then the plain shim's code unchanged.
        let (c32, _) = shim_code(plain.shim_base as u32, 0x10_0000, CmdlineSource::Embedded);
        let (l32, _) = shim_code(
            plain.shim_base as u32,
            0x10_0000,
            CmdlineSource::PvhStartInfo,
        );
        let extra = l32.len() - c32.len();
        assert_eq!(extra, 6 + 2 + 3 + 2 + 2 + 3 + 2 + 5);
        assert_eq!(l32[0], 0xfa);
        assert_eq!(l32[3..7], HVM_START_MAGIC.to_le_bytes());
        let ptr = (plain.shim_base + OFF_ZERO_PAGE + CMD_LINE_PTR_OFFSET) as u32;
        assert_eq!(l32[extra - 3..extra + 1], ptr.to_le_bytes());
        assert_eq!(l32[extra + 1..], c32[1..]);
    }

    #[test]
    fn rejects_garbage_and_long_cmdlines() {
        assert_eq!(
            wrap(b"hello", "").err(),
            Some(PvhError::NotElf("bad magic"))
        );
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert_eq!(
            wrap(&kernel(), &long).err(),
            Some(PvhError::CmdlineTooLong(CMDLINE_MAX + 1))
        );
    }
}
