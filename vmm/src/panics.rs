//! What a panic does in the monitor. The release profile unwinds (`Cargo.toml`), so:
//!
//! - a helper thread (sampler, tuner, sinks, state repository writer, metrics server,
//!   watchdog) catches its own panic (`tuner::sandbox::run_helper`), logs it and
//!   stops; the tuner returns to the static configuration first;
//! - a vCPU thread's panic stops the run with a message and exit status 1 (`vm.rs`);
//! - a panic of the main thread outside a guard ends the process with a message and
//!   exit status 1 (`main.rs`).
//!
//! The hook installed here replaces the standard one: one `write` of one line to stderr,
//! no backtrace (capturing one opens files, which the vCPU and main seccomp filters
//! forbid: the process would die of SIGSYS instead of reporting the panic).

use std::io::Write;

/// Installs the monitor's panic hook (see the module documentation).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = tuner::sandbox::panic_message(info.payload());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!("vmm: thread '{name}' panicked at {at}: {message}\n");
        // One write: lines of concurrent panics do not interleave; errors are ignored.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }));
}
