//! `vmm host --config host.json`: many VMs on one host, each its own `vmm run` process,
//! under one arbiter of the host's budget (the cores of a cpuset, a bandwidth budget
//! per backing device).
//!
//! - [`config`]: `host.json` (each VM's `vm` object is `vmm run`'s configuration).
//! - [`validate`]: every check made before anything starts (exit status 2).
//! - [`supervisor`]: the VMs' processes (spawn, reap, stop).
//! - [`arbiter`]: grants of cores and bandwidth, pushed to each VM (`PUT /grant`).
//! - [`status`]: the table of VMs that `GET /host` shows.
//! - [`server`]: the host's API socket.
//!
//! Threads: the main thread (SIGTERM/SIGINT through a signalfd, reaping the children),
//! `vmm-arbiter` (one interval every `interval_ms`), `vmm-host-api` (`GET /host`).
//! The host installs no seccomp filter of its own: it runs no guest; each VM's process
//! installs its own.

pub mod arbiter;
pub mod config;
pub mod server;
pub mod status;
pub mod supervisor;
pub mod validate;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::lock;

use crate::api::{ApiError, ApiSocket};
use crate::config::ConfigError;
use config::HostConfig;
use status::{BudgetView, HostStatus, RunState, SloState, VmStatus};
use supervisor::{Launch, VmProcess};

/// Errors of `vmm host`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration is wrong (exit status 2, nothing started).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The host's socket could not be served.
    #[error("api_sock: {0}")]
    Api(#[from] ApiError),
    /// A VM could not be started (the others were stopped).
    #[error("{0}")]
    Start(#[from] supervisor::SupervisorError),
    /// Setting up the host failed.
    #[error("{0}")]
    Setup(String),
}

/// Removes the host's private directory (VM sockets, configurations, default logs).
struct RunDir(PathBuf);

impl RunDir {
    /// A new directory, mode 0700, under the temporary directory.
    fn create() -> io::Result<RunDir> {
        let template = std::env::temp_dir().join(format!("vmm-host-{}-XXXXXX", std::process::id()));
        let mut bytes = template.into_os_string().into_encoded_bytes();
        bytes.push(0);
        // SAFETY: `bytes` is a NUL-terminated template that mkdtemp rewrites in place.
        let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        bytes.pop();
        // SAFETY: mkdtemp kept the bytes a path (it only replaced the Xs).
        let path =
            PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) });
        Ok(RunDir(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last `n` lines of a VM's log, for the host's own message when it ends badly.
fn log_tail(path: &Path, n: usize) -> String {
    let text = tuner::files::read_text_capped(path, tuner::files::TEXT_CAP).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n    ")
}

/// Runs the host described by `config_path` until SIGTERM/SIGINT (exit status 143/130,
/// every VM stopped) or until every VM has ended (0 if all exited with 0, else 1).
pub fn run(config_path: &Path) -> Result<i32, HostError> {
    let cfg = HostConfig::from_file(config_path)?;
    let max_vcpus = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus() as u32)
        .unwrap_or(u32::MAX);
    let plan = validate::validate(
        &cfg,
        &crate::runtime::allowed_cpus(),
        max_vcpus,
        crate::config::host_mem_mib(),
    )?;
    // Before any thread starts: every thread inherits the blocked mask.
    let mut signals = crate::signals::StopSignals::block()
        .map_err(|e| HostError::Setup(format!("cannot set up SIGTERM/SIGINT: {e}")))?;
    let socket = match ApiSocket::bind(&cfg.api_sock) {
        Ok(s) => s,
        Err(e @ (ApiError::InUse(_) | ApiError::NotASocket(_))) => {
            return Err(ConfigError::new("api_sock", e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    };
    let (listener, _socket_guard) = socket.into_listener();
    let run_dir = RunDir::create()
        .map_err(|e| HostError::Setup(format!("cannot create the host's directory: {e}")))?;
    let log_dir = cfg.log_dir.clone().unwrap_or_else(|| run_dir.0.clone());
    if let Some(db) = &cfg.state_db {
        // Created once here, so the VMs' writers find the tables and WAL mode in place.
        tuner::state_repo::StateRepo::open_at(db, tuner::state_repo::RepoConfig::default())
            .map_err(|e| ConfigError::new("state_db", format!("{db}: {e}")))?;
    }

    let mut table = Vec::new();
    for v in &plan.vms {
        let sock = v
            .config
            .api_sock
            .clone()
            .unwrap_or_else(|| run_dir.0.join(format!("{}.sock", v.id)));
        table.push(VmStatus {
            id: v.id.clone(),
            class: v.class,
            slo: v.slo,
            vcpus: v.config.vcpus,
            pid: None,
            state: RunState::Starting,
            api_sock: sock,
            log: log_dir.join(format!("{}.log", v.id)),
            grant: None,
            grant_error: None,
            used_cores: None,
            ops_per_sec: None,
            mean_latency_us: None,
            slo_state: SloState::Unknown,
            intervals: 0,
            intervals_met: 0,
            reported: None,
        });
    }
    let status = Arc::new(Mutex::new(HostStatus {
        budget: BudgetView {
            cpus: plan.cpus.clone(),
            devices: plan
                .devices
                .iter()
                .map(|d| (d.path.clone(), d.bandwidth_bps))
                .collect(),
        },
        interval_ms: cfg.interval_ms,
        arbiter: plan.mode.name(),
        vms: table,
    }));

    let mut procs: Vec<VmProcess> = Vec::new();
    for (i, v) in plan.vms.iter().enumerate() {
        let (sock, log) = {
            let st = lock(&status);
            (st.vms[i].api_sock.clone(), st.vms[i].log.clone())
        };
        let launch = Launch {
            id: &v.id,
            config: &v.raw,
            config_path: run_dir.0.join(format!("{}.json", v.id)),
            api_sock: &sock,
            log: &log,
            state_db: cfg.state_db.as_ref(),
            cpus: &plan.cpus,
        };
        match VmProcess::spawn(&launch) {
            Ok(p) => {
                let mut st = lock(&status);
                st.vms[i].pid = Some(p.pid());
                st.vms[i].state = RunState::Running;
                procs.push(p);
            }
            Err(e) => {
                supervisor::stop_all(&mut procs, Duration::from_millis(cfg.stop_timeout_ms));
                return Err(e.into());
            }
        }
    }
    eprintln!(
        "vmm host: {} VMs started on CPUs {:?}; GET /host on {}",
        procs.len(),
        plan.cpus,
        cfg.api_sock.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    // The arbiter stops first, before the VMs are told to: a grant pushed to a VM that
    // is shutting down would only fail.
    let arbiter_stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(cfg.interval_ms);
    let arbiter = arbiter::Arbiter::new(plan, status.clone());
    let threads = [
        {
            let stop = arbiter_stop.clone();
            std::thread::Builder::new()
                .name("vmm-arbiter".into())
                .spawn(move || arbiter.run(interval, stop))
        },
        {
            let stop = stop.clone();
            let status = status.clone();
            std::thread::Builder::new()
                .name("vmm-host-api".into())
                .spawn(move || server::run(listener, status, stop))
        },
    ];
    let mut handles = Vec::new();
    for t in threads {
        match t {
            Ok(h) => handles.push(h),
            Err(e) => {
                stop.store(true, Ordering::Release);
                arbiter_stop.store(true, Ordering::Release);
                supervisor::stop_all(&mut procs, Duration::from_millis(cfg.stop_timeout_ms));
                return Err(HostError::Setup(format!("cannot start a host thread: {e}")));
            }
        }
    }

    let signal = loop {
        let mut fds = [libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        if let Some(sig) = signals.take() {
            break Some(sig);
        }
        reap(&mut procs, &status);
        if procs.iter().all(|p| p.state != RunState::Running) {
            break None;
        }
    };
    arbiter_stop.store(true, Ordering::Release);
    if !handles.is_empty() {
        let _ = handles.remove(0).join();
    }
    if let Some(sig) = signal {
        eprintln!(
            "vmm host: signal {sig}: stopping {} VM(s)",
            procs
                .iter()
                .filter(|p| p.state == RunState::Running)
                .count()
        );
        let killed = supervisor::stop_all(&mut procs, Duration::from_millis(cfg.stop_timeout_ms));
        if !killed.is_empty() {
            eprintln!(
                "vmm host: killed after {} ms: {killed:?}",
                cfg.stop_timeout_ms
            );
        }
        reap(&mut procs, &status);
    }
    stop.store(true, Ordering::Release);
    for h in handles {
        let _ = h.join();
    }
    let st = lock(&status);
    for v in &st.vms {
        remove_stale_socket(&v.api_sock);
    }
    Ok(match signal {
        Some(sig) => 128 + sig,
        None => {
            let all_ok = st
                .vms
                .iter()
                .all(|v| matches!(v.state, RunState::Exited { code: Some(0), .. }));
            i32::from(!all_ok)
        }
    })
}

/// Reaps the VMs that ended, records them and says so (with the end of the log of one
/// that failed).
fn reap(procs: &mut [VmProcess], status: &status::SharedStatus) {
    for (i, p) in procs.iter_mut().enumerate() {
        let Some(state) = p.reap() else { continue };
        let mut st = lock(status);
        let Some(v) = st.vms.get_mut(i) else { continue };
        v.state = state;
        match state {
            RunState::Exited { code: Some(0), .. } => {
                eprintln!("vmm host: VM {} exited with status 0", v.id)
            }
            RunState::Exited { code, signal } => {
                let how = match (code, signal) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(s)) => format!("was killed by signal {s}"),
                    _ => "ended".to_string(),
                };
                eprintln!(
                    "vmm host: VM {} {how}; the other VMs keep running. End of its log ({}):\n    {}",
                    v.id,
                    v.log.display(),
                    log_tail(&v.log, 5)
                );
            }
            _ => {}
        }
        remove_stale_socket(&v.api_sock);
    }
}

/// Removes a VM's control socket left behind (a VM killed by a signal cannot remove
/// it): only a socket nobody serves.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket
        && matches!(std::os::unix::net::UnixStream::connect(path),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    {
        let _ = std::fs::remove_file(path);
    }
}
