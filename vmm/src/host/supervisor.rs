//! The VMs' processes: each VM is its own `vmm run` (this same binary), so it has its
//! own seccomp filters, vCPU cgroup and crash domain. A child runs in its own process
//! group, on the budget's CPUs, with SIGTERM/SIGINT unblocked (the host blocks them for
//! its signalfd, and a blocked mask would be inherited), its stdout and stderr in its
//! log file, and SIGTERM as its parent-death signal (a host that is killed outright
//! leaves no VM behind). A child that ends is reaped and recorded; the others keep running.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::status::RunState;

/// Errors starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Its configuration file could not be written.
    #[error("VM {id}: cannot write {path}: {source}")]
    Config {
        /// The VM.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its log file could not be opened.
    #[error("VM {id}: cannot open the log {path}: {source}")]
    Log {
        /// The VM.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The process could not be started.
    #[error("VM {id}: cannot start `vmm run`: {source}")]
    Spawn {
        /// The VM.
        id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What starting one VM takes.
pub struct Launch<'a> {
    /// The VM's id (its `--vm-id`).
    pub id: &'a str,
    /// Its `vmm run` configuration, as host.json holds it.
    pub config: &'a serde_json::Value,
    /// Where its configuration file goes.
    pub config_path: PathBuf,
    /// Its control socket.
    pub api_sock: &'a Path,
    /// Its log file.
    pub log: &'a Path,
    /// The host's state repository.
    pub state_db: Option<&'a tuner::state_repo::Location>,
    /// The budget's CPUs (the child's affinity).
    pub cpus: &'a [usize],
}

/// One running (or ended) VM process.
pub struct VmProcess {
    /// The VM's id.
    pub id: String,
    child: Child,
    /// Its state as last seen.
    pub state: RunState,
}

/// The binary to run children with: this one.
fn vmm_exe() -> io::Result<PathBuf> {
    std::env::current_exe()
}

impl VmProcess {
    /// Writes the VM's configuration file and starts `vmm run --config` on it.
    pub fn spawn(l: &Launch<'_>) -> Result<VmProcess, SupervisorError> {
        let id = l.id.to_string();
        let text = serde_json::to_vec_pretty(l.config).map_err(|e| SupervisorError::Config {
            id: id.clone(),
            path: l.config_path.clone(),
            source: io::Error::other(e),
        })?;
        std::fs::write(&l.config_path, text).map_err(|source| SupervisorError::Config {
            id: id.clone(),
            path: l.config_path.clone(),
            source,
        })?;
        let log_err = |source| SupervisorError::Log {
            id: id.clone(),
            path: l.log.to_path_buf(),
            source,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(l.log)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        let exe = vmm_exe().map_err(|source| SupervisorError::Spawn {
            id: id.clone(),
            source,
        })?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg("--config")
            .arg(&l.config_path)
            .arg("--api-sock")
            .arg(l.api_sock)
            .arg("--vm-id")
            .arg(l.id);
        if let Some(db) = l.state_db {
            cmd.arg("--state-db").arg(db.to_arg());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        // SAFETY: an all-zero cpu_set_t is valid; CPU_SET is given numbers below
        // CPU_SETSIZE (checked when the budget was parsed).
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in l.cpus {
            if c < libc::CPU_SETSIZE as usize {
                // SAFETY: c < CPU_SETSIZE.
                unsafe { libc::CPU_SET(c, &mut set) };
            }
        }
        let host_pid = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (sigfillset, sigprocmask, sched_setaffinity,
        // prctl, getppid) on its own stack values.
        unsafe {
            cmd.pre_exec(move || {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut none);
                if libc::sigprocmask(libc::SIG_UNBLOCK, &none, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // A host killed outright (SIGKILL, a crash) leaves no VM behind: each
                // gets SIGTERM and stops as it would on the host's own SIGTERM.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The host may have died before the prctl: then do not start at all.
                if libc::getppid() != host_pid {
                    return Err(io::Error::other("the host is gone"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
            id: id.clone(),
            source,
        })?;
        log::info!("VM {id}: started, pid {}", child.id());
        Ok(VmProcess {
            id,
            child,
            state: RunState::Running,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reaps it if it ended; returns the new state when it just did.
    pub fn reap(&mut self) -> Option<RunState> {
        if self.state != RunState::Running {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.state = RunState::Exited {
                    code: status.code(),
                    signal: status.signal(),
                };
                Some(self.state)
            }
            Ok(None) => None,
            Err(e) => {
                log::warn!("VM {}: waitpid: {e}", self.id);
                None
            }
        }
    }

    /// Sends `sig` to its process group (the `vmm run` process and anything it
    /// started), if it still runs.
    pub fn signal(&self, sig: libc::c_int) {
        if self.state != RunState::Running {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: signalling our own child's process group (it is not reaped yet, so the
        // id still names it).
        if unsafe { libc::killpg(pgid, sig) } != 0 {
            log::debug!(
                "VM {}: killpg {sig}: {}",
                self.id,
                io::Error::last_os_error()
            );
        }
    }
}

/// Stops every running VM: SIGTERM, then up to `deadline` for them to end, then
/// SIGKILL for the rest. Returns the ids of the VMs that had to be killed.
pub fn stop_all(vms: &mut [VmProcess], deadline: Duration) -> Vec<String> {
    for v in vms.iter() {
        v.signal(libc::SIGTERM);
    }
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        for v in vms.iter_mut() {
            v.reap();
        }
        if vms.iter().all(|v| v.state != RunState::Running) {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut killed = Vec::new();
    for v in vms.iter_mut() {
        if v.state == RunState::Running {
            v.signal(libc::SIGKILL);
            killed.push(v.id.clone());
        }
    }
    // SIGKILL cannot be refused: a bounded wait for the kernel to end them.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && vms.iter().any(|v| v.state == RunState::Running) {
        for v in vms.iter_mut() {
            v.reap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}
