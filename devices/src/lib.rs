//! Devices the `vmm` monitor emulates for its guests.
//!
//! `legacy` holds the port-I/O devices of a PC (serial UART, i8042 reset line, a
//! debug-exit port); every device validates what the guest writes and never panics on
//! guest input. Devices report a guest-requested stop through [`ExitSignal`].

pub mod exit_signal;
pub mod guest_metrics;
pub mod io_scheduler;
pub mod legacy;
pub mod log_limit;
pub mod rate_limiter;
pub mod vcpu_control;
pub mod virtio;

pub use exit_signal::{ExitReason, ExitSignal};

/// Locks `m`, carrying on with the data if a panicking thread poisoned it (device state
/// stays usable; a panic is already reported where it happened).
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
