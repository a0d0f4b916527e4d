//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`, which the compiler may call.
//!
//! Nothing else provides them (no libc, and `compiler_builtins` leaves them out on
//! Linux targets). The copies use `rep movsb` / `rep stosb` and the comparisons read
//! through volatile loads, so the compiler cannot turn them back into calls to themselves.
//!
//! Also `rust_eh_personality`: the precompiled `core` (built for unwinding) references it
//! from its unwind tables. With `panic=abort` it is never called; the stub only satisfies
//! the linker.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dst` (non-overlapping).
///
/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!(
        "rep movsb",
        inout("rcx") n => _,
        inout("rdi") dst => _,
        inout("rsi") src => _,
        options(nostack, preserves_flags)
    );
    dst
}

/// Copies `n` bytes from `src` to `dst`; the regions may overlap.
///
/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src, or the regions do not overlap: copy forwards.
        memcpy(dst, src, n)
    } else {
        // dst overlaps the tail of src: copy backwards.
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
        dst
    }
}

/// Fills `n` bytes at `dst` with the byte `c`.
///
/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!(
        "rep stosb",
        inout("rcx") n => _,
        inout("rdi") dst => _,
        in("al") c as u8,
        options(nostack, preserves_flags)
    );
    dst
}

/// Compares `n` bytes; returns <0, 0 or >0 like C `memcmp`.
///
/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let x = core::ptr::read_volatile(a.add(i));
        let y = core::ptr::read_volatile(b.add(i));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality only (0 = equal), as LLVM emits for `==` on slices.
///
/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// Unwinding personality routine referenced by `core`'s unwind tables; never called
/// (`panic=abort`, and there is no unwinder).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
