//! seccomp filters for the monitor's threads, built with seccompiler.
//!
//! Two filters: one for the vCPU threads (KVM_RUN and the few calls devices make from an
//! exit), one for the main thread's event loop. A syscall outside a filter kills the
//! process with SIGSYS: an attacker who took over a device emulation path cannot open
//! files, sockets or new processes.

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
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build { thread, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON_SYSCALLS.iter().chain(extra) {
        rules.insert(nr, vec![]);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rule(ioctls).map_err(err)?);
    if let Some((nr, conditioned)) = conditional {
        rules.insert(nr, vec![conditioned().map_err(err)?]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The filter of a vCPU thread.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    build("vCPU", &[], &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS], None)
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
            libc::SYS_fdatasync,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            // The control API socket.
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_setsockopt,
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
            // Reading a policy file for hot reload.
            libc::SYS_statx,
        ],
        &[TCGETS, TCSETS, TIOCGWINSZ, FIONBIO],
        Some((libc::SYS_openat, read_only_open)),
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
    }
}
