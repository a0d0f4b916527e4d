//! Reads what linux-loader does not expose from an ELF kernel: the extent of its loadable
//! segments (to check guest memory is large enough before loading) and the project's own
//! `TUNEVMM` note, which asks for every vCPU to start at the entry point.
//!
//! Written by hand because linux-loader only parses the Xen PVH note and keeps its ELF
//! structures private; this reads a handful of little-endian fields, with every offset and
//! length checked against the file.

use std::io::{Read, Seek, SeekFrom};

/// Name of the project's ELF note (NUL included in the file).
pub const NOTE_NAME: &[u8] = b"TUNEVMM\0";
/// Note type meaning "start every vCPU at the entry point".
pub const NOTE_TYPE_MULTI_ENTRY: u32 = 1;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const MAX_PHDRS: u16 = 256;
const MAX_NOTE_SEGMENT: u64 = 64 * 1024;

/// What [`inspect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ElfFacts {
    /// End (exclusive) of the highest loadable segment in guest-physical memory.
    pub load_end: u64,
    /// The `TUNEVMM` multi-entry note is present.
    pub multi_entry: bool,
}

/// Errors while reading the ELF headers.
#[derive(Debug, thiserror::Error)]
pub enum ElfNoteError {
    /// The file could not be read where its headers said.
    #[error("truncated or unreadable ELF file: {0}")]
    Io(#[from] std::io::Error),
    /// A header field is out of range.
    #[error("malformed ELF header: {0}")]
    Malformed(&'static str),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads the program headers of a 64-bit little-endian ELF file.
pub fn inspect<F: Read + Seek>(file: &mut F) -> Result<ElfFacts, ElfNoteError> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if phentsize != 56 {
        return Err(ElfNoteError::Malformed("program header size is not 56"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfNoteError::Malformed("program header count out of range"));
    }
    let mut facts = ElfFacts::default();
    let mut notes = Vec::new();
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.checked_add(i * 56).ok_or(
            ElfNoteError::Malformed("program header offset overflows"),
        )?))?;
        file.read_exact(&mut ph)?;
        let p_type = u32_at(&ph, 0);
        let p_offset = u64_at(&ph, 8);
        let p_paddr = u64_at(&ph, 24);
        let p_filesz = u64_at(&ph, 32);
        let p_memsz = u64_at(&ph, 40);
        match p_type {
            PT_LOAD => {
                if p_filesz > p_memsz {
                    return Err(ElfNoteError::Malformed(
                        "segment file size exceeds memory size",
                    ));
                }
                let end = p_paddr
                    .checked_add(p_memsz)
                    .ok_or(ElfNoteError::Malformed("segment end overflows"))?;
                facts.load_end = facts.load_end.max(end);
            }
            PT_NOTE if p_filesz <= MAX_NOTE_SEGMENT => notes.push((p_offset, p_filesz)),
            _ => {}
        }
    }
    for (offset, size) in notes {
        let mut buf = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut buf)?;
        if has_multi_entry_note(&buf) {
            facts.multi_entry = true;
        }
    }
    Ok(facts)
}

/// Walks the notes of one PT_NOTE segment (4-byte aligned name and descriptor).
fn has_multi_entry_note(seg: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut pos = 0usize;
    while pos + 12 <= seg.len() {
        let namesz = u32_at(seg, pos) as usize;
        let descsz = u32_at(seg, pos + 4) as usize;
        let ntype = u32_at(seg, pos + 8);
        let name_start = pos + 12;
        let Some(desc_start) = name_start.checked_add(align4(namesz)) else {
            return false;
        };
        let Some(next) = desc_start.checked_add(align4(descsz)) else {
            return false;
        };
        if next > seg.len() {
            return false;
        }
        if &seg[name_start..name_start + namesz] == NOTE_NAME && ntype == NOTE_TYPE_MULTI_ENTRY {
            return true;
        }
        pos = next;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn note(name: &[u8], ty: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(name);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    fn elf_with(notes: &[u8], phnum: u16) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56 * 2];
        f[..4].copy_from_slice(b"\x7fELF");
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD at 1 MiB, 0x3000 bytes in memory.
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x3000u64.to_le_bytes());
        let ph = 64 + 56;
        let note_off = f.len() as u64;
        f[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        f.extend_from_slice(notes);
        f
    }

    #[test]
    fn finds_the_note_among_others() {
        let mut notes = note(b"GNU\0", 3);
        notes.extend(note(NOTE_NAME, NOTE_TYPE_MULTI_ENTRY));
        let facts = inspect(&mut Cursor::new(elf_with(&notes, 2))).unwrap();
        assert!(facts.multi_entry);
        assert_eq!(facts.load_end, 0x10_3000);
        let facts = inspect(&mut Cursor::new(elf_with(&note(b"GNU\0", 1), 2))).unwrap();
        assert!(!facts.multi_entry);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let f = elf_with(&note(NOTE_NAME, 1), 2);
        assert!(inspect(&mut Cursor::new(f[..100].to_vec())).is_err());
        assert!(inspect(&mut Cursor::new(elf_with(&[], 0))).is_err());
        assert!(inspect(&mut Cursor::new(elf_with(&[], 300))).is_err());
        // A note whose sizes run past the segment is ignored.
        let mut bad = note(NOTE_NAME, 1);
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            !inspect(&mut Cursor::new(elf_with(&bad, 2)))
                .unwrap()
                .multi_entry
        );
    }
}
