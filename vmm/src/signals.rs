//! SIGTERM and SIGINT end the run gracefully: the event loop reads them from a
//! `signalfd` like any other event, then the run ends as usual (the state repository is
//! flushed, the vCPU cgroup and the control socket removed) with exit status 128 + the
//! signal (143, 130).
//!
//! A signalfd rather than a signal handler (or the `signal-hook` crate, which is not in
//! this workspace's dependencies): no code runs in signal context, nothing new needs a
//! seccomp rule (the event loop already reads fds), and no extra thread is needed. The
//! two signals are blocked on the thread that sets up the VM before it starts any other
//! thread, so every thread inherits the mask and only the signalfd sees them.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// The signals that stop the VM.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// The stop signals, blocked and readable from a signalfd.
#[derive(Debug)]
pub struct StopSignals {
    fd: File,
    received: Arc<AtomicI32>,
}

fn stop_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

impl StopSignals {
    /// Blocks SIGTERM and SIGINT on the calling thread (threads it starts afterwards
    /// inherit the mask) and opens a non-blocking signalfd for them. Call it before any
    /// other thread starts.
    pub fn block() -> io::Result<StopSignals> {
        let set = stop_set();
        // SAFETY: `set` is valid; the old mask is not needed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StopSignals {
            // SAFETY: `fd` is a fresh fd nobody else owns.
            fd: unsafe { File::from_raw_fd(fd) },
            received: Arc::new(AtomicI32::new(0)),
        })
    }

    /// Where the event loop's subscriber records the signal (0: none yet).
    pub fn received(&self) -> Arc<AtomicI32> {
        Arc::clone(&self.received)
    }
}

impl StopSignals {
    /// Reads what the signalfd holds (without blocking); returns the first stop signal
    /// received so far (also kept in [`StopSignals::received`]), if any.
    pub fn take(&mut self) -> Option<i32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // A bounded drain: the fd is non-blocking and holds at most one of each signal.
        for _ in 0..STOP_SIGNALS.len() {
            match self.fd.read(&mut info) {
                Ok(n) if n == info.len() => {
                    // ssi_signo is the first field (u32, native endian).
                    let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                    let signo = i32::try_from(signo).unwrap_or(libc::SIGTERM);
                    log::info!("signal {signo} received: stopping");
                    let _ = self.received.compare_exchange(
                        0,
                        signo,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                _ => break,
            }
        }
        Some(self.received.load(Ordering::Acquire)).filter(|s| *s != 0)
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.take();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch the stop signals: {e}");
        }
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_sigterm_is_read_from_the_signalfd() {
        // In a forked child: the test harness's threads must keep their own masks.
        // SAFETY: the child only blocks signals, raises one and reads an fd before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match StopSignals::block() {
                Ok(mut s) => {
                    // SAFETY: raising a signal that is blocked on this thread.
                    unsafe { libc::raise(libc::SIGTERM) };
                    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
                    match s.fd.read(&mut info) {
                        Ok(n) if n == info.len() && info[0] as i32 == libc::SIGTERM => 0,
                        _ => 1,
                    }
                }
                Err(_) => 2,
            };
            // SAFETY: leaving the child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child killed: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
