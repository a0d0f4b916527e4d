//! The zero page and the kernel command line.
//!
//! The command line is at the 32-bit guest-physical address stored at zero page offset
//! 0x228 (`hdr.cmd_line_ptr`), NUL terminated. It is a list of words separated by spaces;
//! `key=value` words are parameters. When a key appears several times, the last one wins.

use core::sync::atomic::Ordering;

use super::boot::ZERO_PAGE;

/// Offset of `hdr.cmd_line_ptr` in the zero page (`boot_params`).
pub const CMD_LINE_PTR_OFFSET: u64 = 0x228;

/// Longest command line the runtime will scan.
pub const MAX_CMDLINE: usize = 4096;

/// Guest-physical address of the zero page (`boot_params`) the monitor passed in `RSI`.
pub fn zero_page() -> u64 {
    ZERO_PAGE.load(Ordering::Relaxed)
}

/// The kernel command line (without the terminating NUL); empty if there is none.
pub fn cmdline() -> &'static [u8] {
    let zp = zero_page();
    if zp == 0 {
        return &[];
    }
    // SAFETY: the monitor guarantees a valid zero page; memory is identity mapped.
    let ptr =
        unsafe { core::ptr::read_volatile((zp + CMD_LINE_PTR_OFFSET) as usize as *const u32) };
    if ptr == 0 {
        return &[];
    }
    let base = ptr as usize as *const u8;
    let mut len = 0;
    // SAFETY: the command line is NUL terminated guest memory that nobody modifies.
    while len < MAX_CMDLINE && unsafe { *base.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `base` were just read and stay valid for the VM's life.
    unsafe { core::slice::from_raw_parts(base, len) }
}

/// The value of the last `key=value` word on the command line, if any.
pub fn arg(key: &str) -> Option<&'static [u8]> {
    let key = key.as_bytes();
    let mut found = None;
    for word in cmdline().split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if word.len() > key.len() && word.starts_with(key) && word[key.len()] == b'=' {
            found = Some(&word[key.len() + 1..]);
        }
    }
    found
}

/// True if the bare word `word` (or `word=...`) is on the command line.
pub fn flag(word: &str) -> bool {
    let w = word.as_bytes();
    cmdline()
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .any(|x| x == w || (x.len() > w.len() && x.starts_with(w) && x[w.len()] == b'='))
}

/// Parses a decimal or `0x`-prefixed hexadecimal number (`_` separators allowed).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for &c in digits {
        if c == b'_' {
            continue;
        }
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        } as u64;
        if d >= radix {
            return None;
        }
        value = value.checked_mul(radix)?.checked_add(d)?;
        any = true;
    }
    any.then_some(value)
}

/// The numeric value of parameter `key` (`key=N`, decimal or `0x` hex), or `default` if
/// it is absent. Panics (exit status 3) if the value is not a number.
pub fn arg_u64(key: &str, default: u64) -> u64 {
    match arg(key) {
        None => default,
        Some(v) => match parse_u64(v) {
            Some(n) => n,
            None => panic!("bad number for {}=", key),
        },
    }
}
