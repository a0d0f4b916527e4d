//! Port I/O and MMIO access (CPL 3 with IOPL 3, so `in`/`out` do not fault).
//!
//! Every port access and every access to an MMIO address the monitor emulates is a VM
//! exit (~26 us on this host): keep them few.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port writes can do anything to the machine (including ending or resetting it).
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// See [`outb`].
#[inline(always)]
pub unsafe fn outw(port: u16, value: u16) {
    asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags));
}

/// Writes a 32-bit doubleword to an I/O port.
///
/// # Safety
/// See [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Port reads can have side effects on the device behind the port.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags));
    value
}

/// Reads a 16-bit word from an I/O port.
///
/// # Safety
/// See [`inb`].
#[inline(always)]
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags));
    value
}

/// Reads a 32-bit doubleword from an I/O port.
///
/// # Safety
/// See [`inb`].
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags));
    value
}

/// Volatile 32-bit read of guest-physical (= virtual, identity map) address `addr`.
///
/// # Safety
/// `addr` must be 4-byte aligned and below 4 GiB; reading device memory can have side
/// effects.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    core::ptr::read_volatile(addr as usize as *const u32)
}

/// Volatile 32-bit write of `value` to guest-physical address `addr`.
///
/// # Safety
/// `addr` must be 4-byte aligned and below 4 GiB, and must not overlap memory the kernel
/// uses (image, stacks).
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    core::ptr::write_volatile(addr as usize as *mut u32, value)
}
