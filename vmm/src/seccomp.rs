//! seccomp filters for the monitor's threads, built with seccompiler.
//!
//! One filter for the vCPU threads (KVM_RUN and the few calls devices make from an exit),
//! one for the main thread's event loop: a syscall outside them kills the process with
//! SIGSYS, so an attacker who took over a device emulation path cannot open files,
//! sockets or new processes.
//!
//! The helper threads (the tuner's sampler, sinks, state repository writer, watchdog and
//! metrics server, and the control API's `vmm-api`) each get a filter of their role
//! ([`HelperRole`], installed through [`tuner::sandbox`] as each thread starts). A call
//! outside a helper's list fails with `EPERM` instead of killing the VM: these threads
//! never touch guest memory, every failure of theirs is already handled (a knob that
//! cannot be set is refused and logged, the tuner falls back to the static
//! configuration), and the guest should not die for a rare library path of the tuner's
//! (SQLite, tract). The confinement is the same: the call does not happen.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler rejected a rule or the filter.
    #[error("cannot build the {thread} seccomp filter: {source}")]
    Build {
        /// Which filter.
        thread: &'static str,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {thread} seccomp filter: {source}")]
    Install {
        /// Which filter.
        thread: &'static str,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::Error,
    },
}

// ioctl request numbers: _IO(KVMIO, 0x80) and _IOR(KVMIO, nr, struct) for the register
// reads of a crash report; the terminal requests of the main thread.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TIOCGWINSZ: u64 = 0x5413;
const FIONBIO: u64 = 0x5421;
/// _IOW(KVMIO, 0x42, struct kvm_dirty_log): the sampler's dirty-page count.
const KVM_GET_DIRTY_LOG: u64 = 0x4010_ae42;

/// Calls every thread of the monitor may make (memory, locks, signals, time, logging).
const COMMON_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_close,
    libc::SYS_getrandom,
    libc::SYS_fsync,
    // Telemetry reads its own page-fault counts.
    libc::SYS_getrusage,
    libc::SYS_gettid,
    // Rust's std checks an fd is open (F_GETFD) before closing it in debug builds.
    libc::SYS_fcntl,
];

fn ioctl_rule(requests: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    requests
        .iter()
        .map(|&req| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                req,
            )?])
        })
        .collect()
}

/// A syscall allowed only under a condition on its arguments.
type ConditionalRule = (i64, fn() -> Result<SeccompRule, seccompiler::BackendError>);

fn build(
    thread: &'static str,
    extra: &[i64],
    ioctls: &[u64],
    conditional: Option<ConditionalRule>,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build { thread, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON_SYSCALLS.iter().chain(extra) {
        rules.insert(nr, vec![]);
    }
    // An empty rule list would allow every ioctl: a thread with none gets no entry.
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rule(ioctls).map_err(err)?);
    }
    if let Some((nr, conditioned)) = conditional {
        rules.insert(nr, vec![conditioned().map_err(err)?]);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The filter of a vCPU thread.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    build(
        "vCPU",
        &[],
        &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS],
        None,
        SeccompAction::KillProcess,
    )
}

/// The filter of the main (event-loop) thread.
pub fn main_filter() -> Result<BpfProgram, SeccompError> {
    build(
        "main",
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            // virtio-blk back ends and rate-limiter timers run on the event loop.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            // virtio-blk moves data straight between the file and guest memory.
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            // Removing the control API socket at the end of the run (the API itself is
            // served by the `vmm-api` thread, [`HelperRole::Api`]).
            libc::SYS_unlink,
            // Closing the state repository (SQLite) at the end of the run.
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_ftruncate,
            libc::SYS_lseek,
            // Host cores given to the vCPU threads (`PATCH /vm` on this thread's API socket).
            libc::SYS_sched_setaffinity,
            // Their CPU quota: the vCPU cgroup is made and every cgroup file opened before
            // the filters go on (`cpu_quota.rs`), so moving threads and changing the quota
            // are plain `write`s; only removing the cgroup at the end of the run needs a
            // path call. No mkdir, no writable open.
            libc::SYS_rmdir,
            // Checking the API socket file is still this monitor's before removing it.
            libc::SYS_statx,
        ],
        &[TCGETS, TCSETS, TIOCGWINSZ, FIONBIO],
        Some((libc::SYS_openat, read_only_open)),
        SeccompAction::KillProcess,
    )
}

/// Hot reload of the tuner's policy (`PUT /policy`) opens model files: read-only opens
/// only ((flags & O_ACCMODE) == O_RDONLY).
fn read_only_open() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
        libc::O_RDONLY as u64,
    )?])
}

/// The profiler may send one signal only: its own ([`crate::profiler::profile_signal`],
/// argument 2 of `tgkill`), to the vCPU threads.
fn profile_signal_only() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        crate::profiler::profile_signal() as u64,
    )?])
}

/// The roles of the helper threads, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HelperRole {
    /// `tuner-agent`: the control loop: reads the counters every interval (KVM stats
    /// fds, the dirty log), then the tuner decides and sets the knobs (rate limiter
    /// timers, vCPU affinity and cgroup quota writes) on the same thread.
    Sampler,
    /// `tuner-metrics`: the Prometheus endpoint; reads the counters and serves HTTP on
    /// the socket bound before it started.
    Metrics,
    /// `tuner-sink-*` and `tuner-watchdog`: sinks and the fallback (the static
    /// configuration: rate limiter timers, vCPU affinity and cgroup quota writes).
    Tuner,
    /// `tuner-state-repo`: SQLite writes to the state repository opened before it, or
    /// PostgreSQL over a socket it may (re)connect.
    StateRepo,
    /// `vmm-api`: the control API's HTTP server; reads model files for `PUT /policy`.
    Api,
    /// `vmm-profiler`: the guest profiler; signals the vCPU threads (`tgkill` with the
    /// profiler's signal only) and counts their samples.
    Profiler,
}

impl HelperRole {
    /// Every role.
    pub const ALL: [HelperRole; 6] = [
        HelperRole::Sampler,
        HelperRole::Metrics,
        HelperRole::Tuner,
        HelperRole::StateRepo,
        HelperRole::Api,
        HelperRole::Profiler,
    ];

    /// The role of a thread by its name; names this monitor does not know get
    /// [`HelperRole::Tuner`] (no files, sockets or ioctls).
    pub fn of_thread(name: &str) -> HelperRole {
        match name {
            "tuner-agent" => HelperRole::Sampler,
            "tuner-metrics" => HelperRole::Metrics,
            "tuner-state-repo" => HelperRole::StateRepo,
            "vmm-api" => HelperRole::Api,
            crate::profiler::THREAD_NAME => HelperRole::Profiler,
            _ => HelperRole::Tuner,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HelperRole::Sampler => "sampler",
            HelperRole::Metrics => "metrics",
            HelperRole::Tuner => "tuner",
            HelperRole::StateRepo => "state-repo",
            HelperRole::Api => "api",
            HelperRole::Profiler => "profiler",
        }
    }
}

/// The filter of a helper thread of `role` (mismatch: `EPERM`).
pub fn helper_filter(role: HelperRole) -> Result<BpfProgram, SeccompError> {
    // Beyond COMMON_SYSCALLS: std asks for the CPU set and SQLite for the pid. An abort
    // (a panic while unwinding) ends in Rust's SIGSEGV handler, which must be able to
    // reset the signal to its default: refused, it looped forever (issue 14).
    let mut extra = vec![
        libc::SYS_getpid,
        libc::SYS_sched_getaffinity,
        libc::SYS_rt_sigaction,
    ];
    let mut ioctls: Vec<u64> = Vec::new();
    let mut conditional: Option<ConditionalRule> = None;
    match role {
        HelperRole::Sampler => {
            extra.extend([
                libc::SYS_pread64,
                libc::SYS_timerfd_settime,
                libc::SYS_timerfd_gettime,
                libc::SYS_sched_setaffinity,
            ]);
            ioctls.push(KVM_GET_DIRTY_LOG);
        }
        HelperRole::Metrics => {
            extra.extend([
                libc::SYS_pread64,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_setsockopt,
                libc::SYS_shutdown,
                libc::SYS_poll,
            ]);
            ioctls.push(KVM_GET_DIRTY_LOG);
        }
        HelperRole::Tuner => extra.extend([
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_sched_setaffinity,
        ]),
        HelperRole::StateRepo => extra.extend([
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            // The WAL and shared-memory files go when the repository closes.
            libc::SYS_unlink,
            // PostgreSQL: (re)connecting to the server (TCP or Unix socket; host names
            // were resolved before the filter went on) and the client's current-thread
            // runtime (epoll, an eventfd waker) on this thread.
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_eventfd2,
        ]),
        HelperRole::Api => {
            extra.extend([
                // Connections: accept, non-blocking reads and writes, poll.
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_poll,
                // PUT /policy: the model and its card, read-only.
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_lseek,
                libc::SYS_pread64,
            ]);
            ioctls.push(FIONBIO);
            conditional = Some((libc::SYS_openat, read_only_open));
        }
        HelperRole::Profiler => {
            conditional = Some((libc::SYS_tgkill, profile_signal_only));
        }
    }
    build(
        role.name(),
        &extra,
        &ioctls,
        conditional,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// The helper filters, built once before the helper threads start.
#[derive(Debug)]
pub struct HelperFilters(BTreeMap<HelperRole, BpfProgram>);

impl HelperFilters {
    /// Builds the filter of every role.
    pub fn build() -> Result<HelperFilters, SeccompError> {
        HelperRole::ALL
            .into_iter()
            .map(|r| Ok((r, helper_filter(r)?)))
            .collect::<Result<_, _>>()
            .map(HelperFilters)
    }

    /// Installs the filter of thread `name`'s role on the calling thread. A failure is
    /// logged: the kernel took the main and vCPU filters, so it does not happen short
    /// of a bug, and the helper's work is not worth the guest's life.
    pub fn install_for(&self, name: &str) {
        let role = HelperRole::of_thread(name);
        if let Some(filter) = self.0.get(&role) {
            match seccompiler::apply_filter(filter) {
                Ok(()) => log::debug!("seccomp filter {} installed on {name}", role.name()),
                Err(e) => log::error!("cannot install the seccomp filter of {name}: {e}"),
            }
        }
    }
}

/// Installs `filter` on the calling thread.
pub fn install(thread: &'static str, filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install { thread, source })?;
    log::debug!("seccomp filter installed on the {thread} thread");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child with `filter` installed; returns the wait status.
    fn in_child(filter: &BpfProgram, body: fn()) -> libc::c_int {
        // SAFETY: the child only makes raw syscalls before `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if seccompiler::apply_filter(filter).is_err() {
                // SAFETY: leaving the child without running destructors.
                unsafe { libc::_exit(90) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_syscall_outside_the_vcpu_filter_is_refused() {
        let filter = vcpu_filter().unwrap();
        let status = in_child(&filter, || {
            // SAFETY: plain syscall; the filter kills the process before it runs.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn an_ioctl_outside_the_list_is_refused_and_allowed_calls_pass() {
        let filter = main_filter().unwrap();
        let status = in_child(&filter, || {
            // SAFETY: KVM_GET_API_VERSION on stdin: refused by the filter before it runs.
            unsafe { libc::ioctl(0, 0xae00) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        let status = in_child(&filter, || {
            // SAFETY: writing nothing to stderr is harmless.
            unsafe { libc::write(2, std::ptr::null(), 0) };
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }

    #[test]
    fn only_the_main_thread_may_remove_the_vcpu_cgroup() {
        let rmdir = || {
            // SAFETY: a NUL-terminated path that does not exist; rmdir fails with ENOENT.
            unsafe { libc::rmdir(c"/nonexistent-vmm-seccomp-test".as_ptr()) };
        };
        let status = in_child(&main_filter().unwrap(), rmdir);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let status = in_child(&vcpu_filter().unwrap(), rmdir);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
    }

    /// Runs `body` in a child under `filter`; the child exits with `body`'s result.
    fn child_exit(filter: &BpfProgram, body: fn() -> bool) -> bool {
        // SAFETY: the child only makes raw syscalls before `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if seccompiler::apply_filter(filter).is_err() {
                90
            } else if body() {
                0
            } else {
                1
            };
            // SAFETY: leaving the child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        libc::WEXITSTATUS(status) == 0
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn helper_threads_get_eperm_outside_their_role_and_keep_running() {
        let sampler = helper_filter(HelperRole::Sampler).unwrap();
        // A socket is no sampler's business: EPERM, and the process lives on.
        assert!(child_exit(&sampler, || {
            // SAFETY: plain syscall; refused by the filter.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            fd == -1 && errno() == libc::EPERM
        }));
        // Neither is opening a file, even read-only.
        assert!(child_exit(&sampler, || {
            // SAFETY: NUL-terminated path; refused by the filter.
            let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            fd == -1 && errno() == libc::EPERM
        }));
        // What it needs passes: pread on a stats fd (here: an invalid one, EBADF, not EPERM).
        assert!(child_exit(&sampler, || {
            let mut b = [0u8; 8];
            // SAFETY: fd -1 is invalid; the kernel answers EBADF without touching `b`.
            let n = unsafe { libc::pread(-1, b.as_mut_ptr().cast(), 8, 0) };
            n == -1 && errno() == libc::EBADF
        }));
        // The state repository may not spawn a process or open files.
        let repo = helper_filter(HelperRole::StateRepo).unwrap();
        assert!(child_exit(&repo, || {
            // SAFETY: NUL-terminated path; refused by the filter.
            let fd = unsafe { libc::open(c"/tmp/vmm-seccomp-test".as_ptr(), libc::O_RDONLY) };
            fd == -1 && errno() == libc::EPERM
        }));
        // The tuner may move vCPU threads between cores but not ask for KVM ioctls.
        let tuner = helper_filter(HelperRole::Tuner).unwrap();
        assert!(child_exit(&tuner, || {
            // SAFETY: KVM_GET_API_VERSION on stdin: refused by the filter before it runs.
            let r = unsafe { libc::ioctl(0, 0xae00) };
            r == -1 && errno() == libc::EPERM
        }));
    }

    #[test]
    fn the_profiler_may_send_its_signal_and_no_other() {
        let filter = helper_filter(HelperRole::Profiler).unwrap();
        // Its own signal to a thread that does not exist: ESRCH, not EPERM.
        assert!(child_exit(&filter, || {
            // SAFETY: tgkill to a thread id that does not exist in this process.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    i32::MAX,
                    crate::profiler::profile_signal(),
                )
            };
            r == -1 && errno() == libc::ESRCH
        }));
        // Any other signal is refused.
        assert!(child_exit(&filter, || {
            // SAFETY: as above; refused by the filter before it runs.
            let r =
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), i32::MAX, libc::SIGKILL) };
            r == -1 && errno() == libc::EPERM
        }));
    }

    #[test]
    fn an_abort_under_a_helper_filter_ends_the_process_instead_of_hanging() {
        let filter = helper_filter(HelperRole::Tuner).unwrap();
        // SAFETY: the child only makes raw syscalls before it dies.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // A hang shows as SIGALRM (alarm is set before the filter forbids it).
            // SAFETY: plain syscalls.
            unsafe { libc::alarm(20) };
            if seccompiler::apply_filter(&filter).is_err() {
                // SAFETY: leaving the child without running destructors.
                unsafe { libc::_exit(90) };
            }
            // SAFETY: ending the child.
            unsafe { libc::abort() };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_ne!(libc::WTERMSIG(status), libc::SIGALRM, "the abort hung");
    }

    #[test]
    fn thread_names_map_to_roles() {
        assert_eq!(HelperRole::of_thread("tuner-agent"), HelperRole::Sampler);
        assert_eq!(HelperRole::of_thread("tuner-metrics"), HelperRole::Metrics);
        assert_eq!(
            HelperRole::of_thread("tuner-state-repo"),
            HelperRole::StateRepo
        );
        assert_eq!(HelperRole::of_thread("vmm-api"), HelperRole::Api);
        assert_eq!(HelperRole::of_thread("vmm-profiler"), HelperRole::Profiler);
        for n in ["tuner-sink-tuner", "tuner-watchdog", "learner", "anything"] {
            assert_eq!(HelperRole::of_thread(n), HelperRole::Tuner, "{n}");
        }
        assert_eq!(HelperFilters::build().unwrap().0.len(), 6);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // _IOR(type, nr, size) = (2 << 30) | (size << 16) | (type << 8) | nr.
        let ior = |nr: u64, size: usize| (2u64 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
        // _IOW: direction 1.
        let iow = |nr: u64, size: usize| (1u64 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        assert_eq!(
            KVM_GET_DIRTY_LOG,
            iow(0x42, std::mem::size_of::<kvm_bindings::kvm_dirty_log>())
        );
    }
}
