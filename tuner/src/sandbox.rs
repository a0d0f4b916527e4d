//! The hook every thread the tuner spawns runs first, so that the monitor can confine the
//! thread (a seccomp filter per role, `vmm/src/seccomp.rs`) without this crate knowing
//! how. One hook per process, set before the tuner starts; without one, threads run
//! unconfined (tests, tools).

use std::sync::OnceLock;

/// What a thread runs first: gets the thread's name (`tuner-agent`, `tuner-sink-NAME`,
/// `tuner-state-repo`, `tuner-watchdog`, `tuner-metrics`, ...).
pub type ThreadHook = Box<dyn Fn(&str) + Send + Sync>;

static HOOK: OnceLock<ThreadHook> = OnceLock::new();

/// Sets the process's thread hook. The first call wins: returns `false` (and drops
/// `hook`) when one was set already.
pub fn set_thread_hook(hook: ThreadHook) -> bool {
    HOOK.set(hook).is_ok()
}

/// Runs the hook, if any, for the calling thread, named `name`. Every thread of the tuner
/// calls this before its first piece of work.
pub fn enter_thread(name: &str) {
    if let Some(hook) = HOOK.get() {
        hook(name);
    }
}

/// The message of a panic payload (`&str` or `String`), for logs.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `body` as the whole life of helper thread `name`: enters the thread's sandbox
/// ([`enter_thread`]), then runs `body`, catching a panic. A panic is logged ("helper
/// thread NAME panicked: ...; it stops") and gives `None`: the thread ends cleanly, the
/// locks it held are released (poisoned; every lock of the tuner is taken through
/// `PoisonError::into_inner`), and the VM runs on without it.
pub fn run_helper<T>(name: &str, body: impl FnOnce() -> T) -> Option<T> {
    enter_thread(name);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(v) => Some(v),
        Err(p) => {
            log::error!(
                "helper thread {name} panicked: {}; it stops",
                panic_message(&*p)
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_panicking_helper_ends_cleanly_with_none() {
        let got =
            std::thread::spawn(|| run_helper("tuner-test-panic", || -> u32 { panic!("boom") }))
                .join()
                .expect("the thread itself does not panic");
        assert_eq!(got, None);
        assert_eq!(run_helper("tuner-test-ok", || 7), Some(7));
        assert_eq!(panic_message(&"x"), "x");
    }

    #[test]
    fn the_first_hook_runs_for_every_thread_and_a_second_is_refused() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s = Arc::clone(&seen);
        assert!(set_thread_hook(Box::new(move |name| {
            s.lock().unwrap().push(name.to_string());
        })));
        assert!(!set_thread_hook(Box::new(|_| panic!("never runs"))));
        std::thread::spawn(|| enter_thread("tuner-test"))
            .join()
            .unwrap();
        enter_thread("tuner-test-2");
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|n| n == "tuner-test"), "{seen:?}");
        assert!(seen.iter().any(|n| n == "tuner-test-2"), "{seen:?}");
    }
}
