//! Shared runtime for the vmm test kernels.
//!
//! Every kernel in `src/kernels/` pulls this module in with
//!
//! ```ignore
//! #[macro_use]
//! #[path = "../rt/mod.rs"]
//! mod rt;
//! ```
//!
//! and defines `fn kmain(cpu: usize) -> !`, which every vCPU enters at CPL 3 once the CPL 0
//! stub in [`boot`] has set the machine up (see `BOOT.md`). Everything in here runs at
//! CPL 3 (IOPL 3, interrupts off), where code executes at native speed; only the stub in
//! `boot.rs` runs at CPL 0, where every instruction is emulated and therefore expensive.
//!
//! What the runtime offers:
//! - [`print!`] / [`println!`] (core::fmt, serialised by a console lock so lines from
//!   several vCPUs never interleave), plus [`print`], [`print_dec`], [`print_hex`] and the
//!   [`console`] guard for building a line piecewise.
//! - [`exit`] (debug-exit port 0xf4), a panic handler (`PANIC: ...`, exit status 3).
//! - Port and MMIO access ([`io`]).
//! - TSC time ([`rdtsc`], [`now_ns`], ...), calibrated by the TSC kHz recorded at CPL 0.
//! - Command-line parsing ([`arg_u64`], [`arg`], [`flag`]).
//! - vCPU facts recorded at CPL 0 ([`cpu_count`], [`apic_id`], [`current_cpu`]),
//!   per-vCPU done flags, a barrier, a spinlock and [`park`].
//! - Reports to the monitor's metrics device ([`metrics`]: per-vCPU ops, bytes and
//!   latency counters, rate-limited by a [`metrics::Reporter`]).
//! - The vCPU control device ([`vcpu_control`]: vCPUs in use, park, paravirtual idle).
//! - A seeded pseudo-random generator ([`rand`]) and a CPU-burning loop body ([`work`]).
//! - `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` for the compiler.
//!
//! Each kernel only uses part of the runtime, hence the `allow`s below.
#![allow(dead_code, unused_imports, unused_macros)]

/// Prints formatted text to the serial console (COM1) while holding the console lock.
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::rt::console::print_fmt(format_args!($($arg)*))
    };
}

/// Prints a formatted line (with a trailing `\n`) to the serial console (COM1).
///
/// The whole line is written while holding the console lock, so lines printed by
/// different vCPUs never interleave.
macro_rules! println {
    () => {
        $crate::rt::console::print("\n")
    };
    ($($arg:tt)*) => {
        $crate::rt::console::print_line(format_args!($($arg)*))
    };
}

pub mod boot;
pub mod cmdline;
pub mod console;
pub mod io;
pub mod mem;
pub mod metrics;
pub mod rand;
pub mod smp;
pub mod time;
pub mod vcpu_control;
pub mod virtio;
pub mod work;

pub use boot::{MAX_CPUS, STACK_SIZE};
pub use cmdline::{arg, arg_u64, cmdline, flag, zero_page};
pub use console::{console, exit, print, print_dec, print_hex, Console};
pub use io::{inb, inl, inw, mmio_read32, mmio_write32, outb, outl, outw};
pub use smp::{
    apic_id, barrier, cpu_count, current_cpu, done_count, is_done, park, set_done, wait_all_done,
    SpinLock,
};
pub use time::{now_ns, ns_to_ticks, rdtsc, ticks_to_ns, tsc_khz, tsc_khz_known};
