//! A one-shot signal through which devices and vCPU threads ask the monitor to stop the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped: what the monitor turns into its process exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote a status to the debug-exit port.
    GuestExit(u8),
    /// The guest asked for a reset (i8042 command 0xfe, or a KVM system event).
    Reset,
    /// The guest crashed (triple fault, emulation failure, ...); the text says how.
    Crash(String),
    /// The monitor itself failed while running the guest.
    MonitorError(String),
}

/// First-writer-wins stop request shared by all threads of one VM.
///
/// The monitor's event loop polls [`ExitSignal::event_fd`]; whoever calls
/// [`ExitSignal::request`] first decides the [`ExitReason`].
#[derive(Clone)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<ExitReason>>>,
    requested: Arc<AtomicBool>,
    event: Arc<EventFd>,
}

impl ExitSignal {
    /// Creates a signal with its own non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(Mutex::new(None)),
            requested: Arc::new(AtomicBool::new(false)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Records `reason` unless another reason was recorded first, then wakes the monitor.
    pub fn request(&self, reason: ExitReason) {
        {
            let mut guard = match self.reason.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if guard.is_none() {
                *guard = Some(reason);
            }
        }
        self.requested.store(true, Ordering::Release);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal the VM exit event: {e}");
        }
    }

    /// The reason recorded so far, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        match self.reason.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether a stop has been requested (one atomic load: cheap enough for every exit).
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The eventfd that becomes readable when a stop is requested.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_requested());
        s.request(ExitReason::GuestExit(7));
        s.request(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::GuestExit(7)));
        assert_eq!(s.event_fd().read().unwrap(), 2);
    }
}
