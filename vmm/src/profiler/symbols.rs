//! The guest kernel's function symbols: from the ELF symbol table of the kernel image
//! (read with the `object` crate) or from a `System.map` (`nm` output: `ADDR TYPE NAME`
//! lines), sorted by address, each with its [`CodeClass`] judged from its name.

use std::path::Path;

use object::{Object, ObjectSymbol, SymbolKind};
use tuner::guest_profile::CodeClass;

/// Largest kernel image read for its symbols (a `vmlinux` with debug information is a
/// few hundred MiB; give its `System.map` instead when larger).
pub const ELF_CAP: u64 = 1 << 30;
/// Largest `System.map` read (Linux's is a few MiB).
pub const MAP_CAP: u64 = 64 << 20;
/// Most functions kept (Linux has about 150,000).
pub const MAX_SYMBOLS: usize = 2_000_000;
/// A symbol without a size covers at most this much when no next symbol bounds it.
const MAX_UNSIZED: u64 = 1 << 20;
/// Longest name kept, in bytes (longer ones are cut).
const MAX_NAME: usize = 512;

/// Why symbols could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    /// The file was refused (missing, not a regular file, too large).
    #[error(transparent)]
    File(#[from] tuner::files::FileError),
    /// The kernel image is not an ELF file `object` can read.
    #[error("{path}: not a readable ELF file: {reason}")]
    Elf {
        /// The file.
        path: String,
        /// `object`'s reason.
        reason: String,
    },
    /// A `System.map` line is malformed.
    #[error("{path}: line {line}: {problem}")]
    Map {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// No function symbol was found.
    #[error("{0}: holds no function symbols")]
    Empty(String),
    /// More functions than [`MAX_SYMBOLS`].
    #[error("{0}: more than {MAX_SYMBOLS} function symbols")]
    TooMany(String),
}

/// One function: where it starts and ends in the guest's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Demangled name (Rust's hash suffix dropped).
    pub name: String,
    /// What kind of code it is.
    pub class: CodeClass,
}

/// A sorted, non-overlapping table of functions.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
}

/// Name fragments of idle, halt and spin-wait code (Linux's idle loop and spin locks, the
/// test kernels' parking and barriers).
const IDLE_WORDS: &[&str] = &[
    "idle", "halt", "hlt", "mwait", "park", "barrier", "wait", "spin", "pause", "relax",
];
/// Name fragments of I/O drivers (virtio transports and rings, block and network).
const IO_WORDS: &[&str] = &[
    "virtio",
    "vring",
    "virtqueue",
    "virtblk",
    "blk",
    "block",
    "nvme",
    "scsi",
    "net",
    "rx_",
    "tx_",
];

/// The class of a function by its name: idle words first (Linux's `cpu_idle_poll` is
/// idle, not I/O), then driver words, else compute.
pub fn classify(name: &str) -> CodeClass {
    let lower = name.to_ascii_lowercase();
    if IDLE_WORDS.iter().any(|w| lower.contains(w)) {
        CodeClass::Idle
    } else if IO_WORDS.iter().any(|w| lower.contains(w)) {
        CodeClass::Io
    } else {
        CodeClass::Compute
    }
}

fn demangle(raw: &str) -> String {
    let mut name = format!("{:#}", rustc_demangle::demangle(raw));
    if name.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    // Folded stacks separate frames with ';' and the count with a space.
    name.replace([';', ' ', '\n', '\r'], "_")
}

impl SymbolTable {
    /// The function symbols of the ELF file `path` (a test kernel or `vmlinux`).
    pub fn from_elf(path: &Path) -> Result<Self, SymbolError> {
        let bytes = tuner::files::read_capped(path, ELF_CAP)?;
        let shown = path.display().to_string();
        let file = object::File::parse(&*bytes).map_err(|e| SymbolError::Elf {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let mut raw = Vec::new();
        for sym in file.symbols() {
            if sym.kind() != SymbolKind::Text || sym.address() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if name.is_empty() {
                continue;
            }
            if raw.len() >= MAX_SYMBOLS {
                return Err(SymbolError::TooMany(shown));
            }
            raw.push((sym.address(), sym.size(), name.to_string()));
        }
        Self::build(raw, &shown)
    }

    /// The text symbols of a `System.map` (`ADDR TYPE NAME` lines, types `t`/`T`/`w`/`W`;
    /// other types are skipped).
    pub fn from_system_map(path: &Path) -> Result<Self, SymbolError> {
        let shown = path.display().to_string();
        let text = tuner::files::read_text_capped(path, MAP_CAP)?;
        let mut raw = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |problem: &str| SymbolError::Map {
                path: shown.clone(),
                line: i + 1,
                problem: problem.to_string(),
            };
            let mut words = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (words.next(), words.next(), words.next())
            else {
                return Err(bad("expected `ADDRESS TYPE NAME`"));
            };
            let addr =
                u64::from_str_radix(addr, 16).map_err(|_| bad("the address is not hexadecimal"))?;
            if kind.len() != 1 {
                return Err(bad("the type is not one letter"));
            }
            if !matches!(kind, "t" | "T" | "w" | "W") || addr == 0 {
                continue;
            }
            if raw.len() >= MAX_SYMBOLS {
                return Err(SymbolError::TooMany(shown));
            }
            raw.push((addr, 0, name.to_string()));
        }
        Self::build(raw, &shown)
    }

    /// Sorts `(address, size, raw name)` and gives each function its end: its size, cut at
    /// the next function's start; without a size, up to the next start.
    fn build(mut raw: Vec<(u64, u64, String)>, shown: &str) -> Result<Self, SymbolError> {
        if raw.is_empty() {
            return Err(SymbolError::Empty(shown.to_string()));
        }
        raw.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        // One function per address (aliases: the first name, by the sort the largest).
        raw.dedup_by_key(|s| s.0);
        let mut symbols = Vec::with_capacity(raw.len());
        for (i, (start, size, name)) in raw.iter().enumerate() {
            let next = raw.get(i + 1).map(|n| n.0);
            let sized = (*size > 0).then(|| start.saturating_add(*size));
            let end = match (sized, next) {
                (Some(e), Some(n)) => e.min(n),
                (Some(e), None) => e,
                (None, Some(n)) => n.min(start.saturating_add(MAX_UNSIZED)),
                (None, None) => start.saturating_add(MAX_UNSIZED),
            };
            let name = demangle(name);
            symbols.push(Symbol {
                start: *start,
                end,
                class: classify(&name),
                name,
            });
        }
        Ok(Self { symbols })
    }

    /// Index of the function holding `addr`, if any (binary search).
    pub fn lookup(&self, addr: u64) -> Option<usize> {
        let i = self.symbols.partition_point(|s| s.start <= addr);
        let s = self.symbols.get(i.checked_sub(1)?)?;
        (addr < s.end).then_some(i - 1)
    }

    /// The function at `index`.
    pub fn get(&self, index: usize) -> Option<&Symbol> {
        self.symbols.get(index)
    }

    /// Every function, by address.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn map_file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::write(text)
    }

    /// A scratch file without a tempfile dependency.
    mod tempfile_path {
        use super::Write;
        pub struct TempPath(pub std::path::PathBuf);
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> TempPath {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("vmm-symbols-{}-{n}.map", std::process::id()));
            let mut f = std::fs::File::create(&p).expect("create");
            f.write_all(text.as_bytes()).expect("write");
            TempPath(p)
        }
    }

    #[test]
    fn a_system_map_gives_sorted_text_symbols_with_classes() {
        let f = map_file(
            "ffffffff81000200 T default_idle\n\
             ffffffff81000000 T _stext\n\
             ffffffff81000100 t virtblk_poll\n\
             ffffffff81800000 D some_data\n\
             ffffffff81000300 W do_work\n",
        );
        let t = SymbolTable::from_system_map(&f.0).expect("map");
        assert_eq!(t.len(), 4);
        let name = |a| t.lookup(a).and_then(|i| t.get(i)).map(|s| s.name.as_str());
        assert_eq!(name(0xffffffff81000000), Some("_stext"));
        assert_eq!(name(0xffffffff810000ff), Some("_stext"));
        assert_eq!(name(0xffffffff81000150), Some("virtblk_poll"));
        assert_eq!(name(0xffffffff81000250), Some("default_idle"));
        assert_eq!(name(0xffffffff81000300), Some("do_work"));
        assert_eq!(name(0x1000), None);
        let class = |a| t.lookup(a).and_then(|i| t.get(i)).map(|s| s.class);
        assert_eq!(class(0xffffffff81000150), Some(CodeClass::Io));
        assert_eq!(class(0xffffffff81000250), Some(CodeClass::Idle));
        assert_eq!(class(0xffffffff81000300), Some(CodeClass::Compute));
    }

    #[test]
    fn a_bad_system_map_names_the_line() {
        let f = map_file("ffffffff81000000 T _stext\nnot-hex T x\n");
        let e = SymbolTable::from_system_map(&f.0).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("hexadecimal"), "{e}");
        let f = map_file("ffffffff81000000\n");
        let e = SymbolTable::from_system_map(&f.0).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let f = map_file("ffffffff81800000 D data_only\n");
        let e = SymbolTable::from_system_map(&f.0).unwrap_err().to_string();
        assert!(e.contains("no function symbols"), "{e}");
    }

    #[test]
    fn a_non_elf_file_is_refused_with_its_name() {
        let f = map_file("hello");
        let e = SymbolTable::from_elf(&f.0).unwrap_err().to_string();
        assert!(e.contains("not a readable ELF"), "{e}");
        let e = SymbolTable::from_elf(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn rust_names_are_demangled_without_their_hash() {
        assert_eq!(
            demangle("_ZN8cpu_burn4burn17h0123456789abcdefE"),
            "cpu_burn::burn"
        );
        assert_eq!(
            classify("cpu_burn::rt::vcpu_control::park"),
            CodeClass::Idle
        );
        assert_eq!(classify("blk_io::rt::virtio::Blk::poll"), CodeClass::Io);
        assert_eq!(classify("cpu_burn::burn"), CodeClass::Compute);
    }
}
