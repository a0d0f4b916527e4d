//! Running a child process with timing: time to its first byte on stdout and to its exit,
//! with a watchdog that kills it (by its pid, while it is still unreaped) if it overruns.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// Kills a child process if it is still running when its time is up.
///
/// The pid is only ever signalled while the child is unreaped (running or a zombie), so it
/// cannot hit a recycled pid: [`wait_exited`] waits without reaping, then the watchdog is
/// disarmed, then the caller reaps.
pub struct Watchdog {
    armed: Arc<Mutex<bool>>,
    fired: Arc<Mutex<bool>>,
    cancel: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `pid`, which must be an unreaped child of this process.
    pub fn start(pid: u32, timeout: Duration) -> Self {
        let armed = Arc::new(Mutex::new(true));
        let fired = Arc::new(Mutex::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let (a, f) = (armed.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                if let Ok(armed) = a.lock() {
                    if *armed {
                        // SAFETY: `pid` is our unreaped child (see the type's doc).
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                        if let Ok(mut f) = f.lock() {
                            *f = true;
                        }
                    }
                }
            }
        });
        Self {
            armed,
            fired,
            cancel: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops watching; returns whether the watchdog killed the child.
    pub fn disarm(mut self) -> bool {
        if let Ok(mut a) = self.armed.lock() {
            *a = false;
        }
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.lock().map(|f| *f).unwrap_or(false)
    }
}

/// Waits until the child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`).
pub fn wait_exited(pid: u32) -> Result<(), BenchError> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid output buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(BenchError::io(format!("waiting for process {pid}"), err));
        }
    }
}

/// What a timed run of a child process gave.
#[derive(Debug, Clone)]
pub struct Timed {
    /// From just before the spawn to the first byte read from its stdout (None: no output).
    pub first_byte: Option<Duration>,
    /// From just before the spawn to its exit (before reaping).
    pub exit: Duration,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr (lossily decoded).
    pub stderr: String,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Spawns `cmd` with stdin from /dev/null and stdout, stderr piped.
pub fn spawn_piped(cmd: &mut Command) -> Result<Child, BenchError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            program: describe(cmd),
            source,
        })
}

/// Runs `cmd` to its end (killing it after `timeout`) and times its first output byte and
/// its exit. stderr is read after the exit (a child writing more than a pipe's 64 KiB to
/// stderr would block and be killed by the watchdog).
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Result<Timed, BenchError> {
    let what = describe(cmd);
    let t0 = Instant::now();
    let mut child = spawn_piped(cmd)?;
    let pid = child.id();
    let watchdog = Watchdog::start(pid, timeout);

    let mut first_byte = None;
    let mut stdout = Vec::new();
    let read_result = match child.stdout.take() {
        Some(mut out) => {
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if first_byte.is_none() {
                            first_byte = Some(t0.elapsed());
                        }
                        stdout.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            }
        }
        None => Ok(()),
    };
    let exited = wait_exited(pid);
    let exit = t0.elapsed();
    let killed = watchdog.disarm();
    let status = child
        .wait()
        .map_err(|e| BenchError::io(format!("reaping {what}"), e))?;
    exited?;
    read_result.map_err(|e| BenchError::io(format!("reading the output of {what}"), e))?;
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let mut bytes = Vec::new();
        let _ = err.read_to_end(&mut bytes);
        stderr = String::from_utf8_lossy(&bytes).into_owned();
    }
    if killed {
        return Err(BenchError::Timeout {
            what,
            secs: timeout.as_secs(),
        });
    }
    Ok(Timed {
        first_byte,
        exit,
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_output_and_exit() {
        let t = run_timed(
            Command::new("sh").args(["-c", "printf hi; exit 3"]),
            Duration::from_secs(20),
        )
        .expect("sh runs");
        assert_eq!(t.stdout, b"hi");
        assert_eq!(t.status.code(), Some(3));
        let first = t.first_byte.expect("a first byte");
        assert!(first <= t.exit);
    }

    #[test]
    fn kills_overrunning_children() {
        let r = run_timed(
            Command::new("sh").args(["-c", "exec sleep 30"]),
            Duration::from_millis(200),
        );
        assert!(matches!(r, Err(BenchError::Timeout { .. })), "{r:?}");
    }
}
