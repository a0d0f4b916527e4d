//! The running VM as the tuner and the control API see it: a [`CounterSource`] that
//! gathers every counter (vCPU exits and times, KVM's binary stats, virtio queues, memory,
//! the guest's own reports), and the knobs (rate limits, I/O priorities) that can be
//! turned while the guest runs.

use devices::lock;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::guest_metrics::GuestMetricsDevice;
use devices::io_scheduler::{Priority, QueueId, SharedIoScheduler};
use devices::rate_limiter::RateLimiterConfig;
use devices::vcpu_control::VcpuControl;
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::{QueueMetrics, QueueMetricsSnapshot};
use tuner::actions::NET_QOS_LADDER;
use tuner::counters::{
    CounterSnapshot, CounterSource, DriveKnobs, GuestMetrics, HostCounters, MemoryCounters,
    QueueCounters,
};
use tuner::knob_state::{DriveKnobState, NetKnobState, VmKnobs};

use crate::cpu_quota::{CpuQuota, ProbeRoots, QuotaStatus};
use crate::grant::Grant;
use crate::knobs::KnobController;
use crate::kvm_stats::KvmStats;
use crate::tuning::{nearest_ladder_level, nearest_priority_level};
use crate::vcpu_stats::VcpuStats;

/// Longest prefix of `/proc/stat` read per snapshot: the `cpu` lines come first, one of
/// about 100 bytes per CPU (the `intr` line after them can be far longer and is not
/// needed). CPUs whose line lies beyond it (more than ~300 CPUs) are not counted.
const PROC_STAT_PREFIX: usize = 32 << 10;

/// Longest `schedstat` line read (three decimal numbers).
const SCHEDSTAT_LEN: usize = 128;

/// Errors of the control operations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// No drive has this id.
    #[error("no drive with id {0:?}")]
    UnknownDrive(String),
    /// The new setting was refused.
    #[error("{0}")]
    Refused(String),
}

/// One drive as the runtime knows it.
pub struct DriveHandle {
    /// Its id (`blk0`, ...).
    pub id: String,
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its [`tuner::actions::RATE_LADDER`] level at start (the configured `rate_level`,
    /// or the nearest to its configured limits, computed once).
    pub rate_level: usize,
}

/// Everything readable and adjustable about a running VM.
pub struct VmRuntime {
    started: Instant,
    mem_bytes: u64,
    vcpus: Vec<Arc<VcpuStats>>,
    kvm_stats: Vec<Mutex<Option<KvmStats>>>,
    drives: Vec<DriveHandle>,
    /// The knob controller: the one knob state, the one write path
    /// ([`VmRuntime::control`]); the sampler reads it without a device or scheduler lock.
    knobs: KnobController,
    nets: Vec<(String, Arc<Mutex<Net>>)>,
    /// Each drive's and network queue's counters, taken out of the devices once so the
    /// sampler never waits on a device lock held by a busy I/O thread: (device id, queue,
    /// counters).
    queue_metrics: Vec<(String, u16, Arc<QueueMetrics>)>,
    scheduler: Option<SharedIoScheduler>,
    guest: Arc<GuestMetricsDevice>,
    statm: Option<std::fs::File>,
    host_cores: u32,
    /// The CPUs the process was allowed at start; `host_cores = n` gives the first n.
    allowed_cpus: Vec<usize>,
    /// Thread id of the event-loop thread (the one that builds the runtime): its I/O
    /// thread, pinned with the vCPUs to a granted CPU list.
    main_tid: i32,
    dirty: Option<DirtyLog>,
    vcpu_control: Arc<VcpuControl>,
    vcpu_tids: Arc<Vec<AtomicI32>>,
    cores_given: AtomicU32,
    cpu_quota: CpuQuota,
    policy: Mutex<Option<tuner::control::PolicyHandle>>,
    /// The host arbiter's grant (a cap on the knobs) and what was asked below it.
    grant: Mutex<GrantState>,
    /// Each vCPU thread's `/proc/self/task/TID/schedstat`, opened once by
    /// [`VmRuntime::open_vcpu_schedstats`] (the sampler only `pread`s them).
    schedstats: Mutex<Vec<Option<std::fs::File>>>,
    /// `/proc/stat`, opened once at start.
    proc_stat: Option<std::fs::File>,
    /// The VM's service level objective.
    slo: Option<tuner::slo::Slo>,
    /// The sampling agent's latest sample (for `GET /vm`), once telemetry runs.
    latest: Mutex<Option<tuner::agent::LatestSample>>,
    /// The guest profiler, when the VM has one (`--profile-hz`, `--symbols` or an API
    /// socket).
    profiler: Option<Arc<crate::profiler::Profiler>>,
    /// The state repository's writer (its counts and health in `GET /vm` and the metrics).
    repo: Mutex<Option<tuner::state_repo::RepoWriter>>,
}

/// The grant in force and the settings asked for, before the cap (given back when a
/// larger grant arrives).
#[derive(Debug, Default)]
struct GrantState {
    grant: Grant,
    cores_asked: Option<u32>,
    quota_asked: Option<f64>,
    limits_asked: std::collections::BTreeMap<String, RateLimiterConfig>,
}

/// What reading KVM's dirty log needs, and the running total.
pub struct DirtyLog {
    /// The VM.
    pub vm: Arc<kvm_ioctls::VmFd>,
    /// (slot, size) of every memory slot registered with dirty logging.
    pub slots: Vec<(u32, usize)>,
    /// Pages dirtied so far (each read of the log clears it).
    pub total: Mutex<u64>,
}

/// Resident memory of this process in bytes, from /proc/self/statm opened once (so
/// sampling under seccomp needs only `pread`).
fn resident_bytes(statm: Option<&std::fs::File>) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = statm.and_then(|f| f.read_at(&mut buf, 0).ok()).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no side effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// The run delay (ns runnable but waiting for a CPU: the second field) of one
/// `schedstat` file, read with one bounded `pread`; 0 when unreadable.
fn run_delay_ns(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; SCHEDSTAT_LEN];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    parse_run_delay(&buf[..n])
}

/// The second field of a `schedstat` line (`on-cpu-ns run-delay-ns timeslices`).
fn parse_run_delay(text: &[u8]) -> u64 {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.split_ascii_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Busy and total clock ticks of the CPUs in `allowed`, from `/proc/stat` text: per
/// `cpuN` line, busy = user + nice + system + irq + softirq + steal (guest time is
/// inside user and nice), total = busy + idle + iowait. Lines cut off at the end of the
/// read are ignored.
fn parse_proc_stat(text: &[u8], allowed: &[usize]) -> HostCounters {
    let mut host = HostCounters {
        allowed_cpus: allowed.len() as u32,
        ..HostCounters::default()
    };
    let text = String::from_utf8_lossy(text);
    // Only complete lines: the read may end inside one.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for line in complete.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(cpu) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !allowed.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = fields.take(8).map(|f| f.parse().unwrap_or(0)).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let busy = [0, 1, 2, 5, 6, 7]
            .iter()
            .fold(0u64, |a, i| a.saturating_add(at(*i)));
        let total = busy.saturating_add(at(3)).saturating_add(at(4));
        host.busy_ticks = host.busy_ticks.saturating_add(busy);
        host.total_ticks = host.total_ticks.saturating_add(total);
    }
    host
}

/// Minor plus major page faults of this process.
fn page_faults() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    (usage.ru_minflt.max(0) + usage.ru_majflt.max(0)) as u64
}

/// The host CPUs the process may run on at start (its affinity mask: `taskset`, a
/// cpuset), in increasing order; all online CPUs when the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set and size; pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let cpus: Vec<usize> = if rc == 0 {
        // SAFETY: reading bits of a valid set below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    cpus
}

/// The affinity mask of the first `n` CPUs of `allowed` (host_cores = n).
fn first_cpus(allowed: &[usize], n: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in allowed.iter().take(n) {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: c < CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    set
}

/// What a [`VmRuntime`] is assembled from.
pub struct RuntimeParts {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// Run-loop counters, one per vCPU.
    pub vcpus: Vec<Arc<VcpuStats>>,
    /// KVM's binary stats, one per vCPU where the kernel offers them.
    pub kvm_stats: Vec<Option<KvmStats>>,
    /// The drives.
    pub drives: Vec<DriveHandle>,
    /// The network devices (id, device).
    pub nets: Vec<(String, Arc<Mutex<Net>>)>,
    /// The I/O engine's scheduler, if there are drives.
    pub scheduler: Option<SharedIoScheduler>,
    /// The guest metrics device.
    pub guest: Arc<GuestMetricsDevice>,
    /// The vCPU control device.
    pub vcpu_control: Arc<VcpuControl>,
    /// Thread ids of the vCPU threads (0 until a thread starts).
    pub vcpu_tids: Arc<Vec<AtomicI32>>,
    /// Dirty-page tracking, when on.
    pub dirty: Option<DirtyLog>,
    /// The VM's service level objective, if any.
    pub slo: Option<tuner::slo::Slo>,
    /// The guest profiler, if any.
    pub profiler: Option<Arc<crate::profiler::Profiler>>,
}

impl VmRuntime {
    /// Assembles the runtime view of a VM.
    pub fn new(parts: RuntimeParts) -> Self {
        let RuntimeParts {
            mem_bytes,
            vcpus,
            kvm_stats,
            drives,
            nets,
            scheduler,
            guest,
            vcpu_control,
            vcpu_tids,
            dirty,
            slo,
            profiler,
        } = parts;
        let allowed_cpus = allowed_cpus();
        let host_cores = allowed_cpus.len() as u32;
        let cpu_quota = CpuQuota::probe(
            &ProbeRoots::host(),
            &crate::cpu_quota::default_name(),
            host_cores,
        );
        log::info!(
            "vCPU CPU quota: {} ({})",
            cpu_quota.mode().as_str(),
            cpu_quota.reason()
        );
        let mut queue_metrics: Vec<(String, u16, Arc<QueueMetrics>)> = drives
            .iter()
            .map(|d| (d.id.clone(), 0, lock(&d.block).metrics()))
            .collect();
        for (id, net) in &nets {
            let n = lock(net);
            queue_metrics.push((id.clone(), 0, n.rx_metrics()));
            queue_metrics.push((id.clone(), 1, n.tx_metrics()));
        }
        let knobs = KnobController::new(VmKnobs {
            generation: 0,
            active_vcpus: vcpu_control.active(),
            host_cores,
            cpu_quota: None,
            drives: drives
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let priority = scheduler
                        .as_ref()
                        .and_then(|s| lock(s).priority(QueueId(i as u32)).ok())
                        .unwrap_or(Priority::Medium);
                    DriveKnobState {
                        id: d.id.clone(),
                        limits: lock(&d.block).rate_limit(),
                        rate_level: d.rate_level,
                        priority,
                        priority_level: nearest_priority_level(priority),
                    }
                })
                .collect(),
            // A network device's limits come from its configuration (one value for every
            // device): the nearest level is computed once, here.
            nets: nets
                .iter()
                .map(|(id, n)| {
                    let limits = lock(n).rate_limit();
                    NetKnobState {
                        id: id.clone(),
                        limits,
                        qos_level: usize::from(nearest_ladder_level(&limits, &NET_QOS_LADDER)),
                    }
                })
                .collect(),
        });
        Self {
            knobs,
            queue_metrics,
            started: Instant::now(),
            mem_bytes,
            vcpus,
            kvm_stats: kvm_stats.into_iter().map(Mutex::new).collect(),
            drives,
            nets,
            scheduler,
            guest,
            statm: std::fs::File::open("/proc/self/statm").ok(),
            host_cores,
            allowed_cpus,
            // SAFETY: gettid has no arguments and no side effects.
            main_tid: i32::try_from(unsafe { libc::syscall(libc::SYS_gettid) }).unwrap_or(0),
            dirty,
            vcpu_control,
            vcpu_tids,
            cores_given: AtomicU32::new(host_cores),
            cpu_quota,
            policy: Mutex::new(None),
            grant: Mutex::new(GrantState::default()),
            schedstats: Mutex::new(Vec::new()),
            proc_stat: std::fs::File::open("/proc/stat").ok(),
            slo,
            latest: Mutex::new(None),
            profiler,
            repo: Mutex::new(None),
        }
    }

    /// The knob controller (see [`crate::knobs`]).
    pub(crate) fn knob_controller(&self) -> &KnobController {
        &self.knobs
    }

    /// Registers the sampling agent's latest-sample slot (for `GET /vm`).
    pub fn set_latest_sample(&self, latest: tuner::agent::LatestSample) {
        *lock(&self.latest) = Some(latest);
    }

    /// Registers the state repository's writer (for `GET /vm` and the metrics).
    pub fn set_repo_stats(&self, writer: tuner::state_repo::RepoWriter) {
        *lock(&self.repo) = Some(writer);
    }

    /// The state repository writer's counts, when the VM writes to one.
    pub fn repo_stats(&self) -> Option<tuner::state_repo::WriterStats> {
        lock(&self.repo).as_ref().map(|w| w.stats())
    }

    /// The latest interval's sample, once the sampling agent has made one.
    pub fn latest_sample(&self) -> Option<Arc<tuner::agent::Sample>> {
        lock(&self.latest).as_ref().and_then(|l| l.get())
    }

    /// Opens each vCPU thread's `schedstat` once its thread id is known, waiting at most
    /// `wait` for the threads to record it. Called on the main thread right after the
    /// vCPU threads start and before its seccomp filter goes on, so the sampling thread
    /// only reads them (`pread`, in its filter) and needs no `open`. A vCPU whose file
    /// cannot be opened reports a run delay of 0.
    pub fn open_vcpu_schedstats(&self, wait: std::time::Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let all_known = self
                .vcpu_tids
                .iter()
                .all(|t| t.load(Ordering::Acquire) != 0);
            if all_known || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let files = self
            .tids()
            .into_iter()
            .map(|tid| {
                if tid == 0 {
                    return None;
                }
                let path = format!("/proc/self/task/{tid}/schedstat");
                std::fs::File::open(&path)
                    .map_err(|e| log::warn!("{path}: {e}; its run delay reads as 0"))
                    .ok()
            })
            .collect();
        *lock(&self.schedstats) = files;
    }

    /// The VM's service level objective.
    pub fn slo(&self) -> Option<&tuner::slo::Slo> {
        self.slo.as_ref()
    }

    /// The guest profiler, if the VM has one.
    pub fn profiler(&self) -> Option<&Arc<crate::profiler::Profiler>> {
        self.profiler.as_ref()
    }

    /// Busy and total ticks of the CPUs the process may run on, now.
    fn host_counters(&self) -> HostCounters {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.proc_stat else {
            return HostCounters {
                allowed_cpus: self.allowed_cpus.len() as u32,
                ..HostCounters::default()
            };
        };
        let mut buf = vec![0u8; PROC_STAT_PREFIX];
        let n = f.read_at(&mut buf, 0).unwrap_or(0);
        parse_proc_stat(&buf[..n], &self.allowed_cpus)
    }

    /// Registers the running tuner's policy slot (for `PUT /policy`).
    pub fn set_policy_handle(&self, handle: tuner::control::PolicyHandle) {
        *lock(&self.policy) = Some(handle);
    }

    /// The running tuner's policy slot, if a tuner runs.
    pub fn policy_handle(&self) -> Option<tuner::control::PolicyHandle> {
        lock(&self.policy).clone()
    }

    /// Requests completed per drive so far (for the threshold policy's "busiest device").
    pub fn drive_requests(&self) -> Vec<u64> {
        // Drives come first in `queue_metrics`, one queue each.
        self.queue_metrics
            .iter()
            .take(self.drives.len())
            .map(|(_, _, m)| m.snapshot().requests)
            .collect()
    }

    /// vCPUs the guest is asked to use.
    pub fn active_vcpus(&self) -> u32 {
        self.vcpu_control.active()
    }

    /// vCPU threads blocked in a park request.
    pub fn parked_vcpus(&self) -> u32 {
        self.vcpu_control.parked()
    }

    /// Asks the guest to use `n` vCPUs (the others park; their threads block in the
    /// monitor and cost no host CPU).
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_vcpus(&self, n: u32) -> Result<(), ControlError> {
        self.vcpu_control
            .set_active(n)
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    /// Host cores the machine has (the most [`VmRuntime::device_set_host_cores`] gives).
    pub fn host_cores_total(&self) -> u32 {
        self.host_cores
    }

    /// Host cores the vCPU threads may run on.
    pub fn host_cores_given(&self) -> u32 {
        self.cores_given.load(Ordering::Acquire)
    }

    /// Lets the vCPU threads run on the first n of the host cores the process was allowed
    /// at start only (CPU affinity: under `taskset -c 4-7`, n = 2 means cores 4 and 5)
    /// and, where a cgroup
    /// allows it ([`crate::cpu_quota`]: v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), caps
    /// them at n cores of CPU time together (n = all host cores lifts the cap). A failure
    /// to write the quota is logged and kept in [`Self::cpu_quota_status`]; the affinity
    /// still applies. Without any usable cgroup only the affinity applies.
    ///
    /// The host arbiter's grant caps it ([`Self::device_set_grant`]): n above the grant gives
    /// the grant (rounded up, its fraction as CPU quota), and n is given back when a
    /// larger grant arrives.
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_host_cores(&self, n: u32) -> Result<(), ControlError> {
        if n == 0 || n > self.host_cores {
            return Err(ControlError::Refused(format!(
                "host_cores must be between 1 and {}, not {n}",
                self.host_cores
            )));
        }
        let (n, quota, granted, pool) = {
            let mut g = lock(&self.grant);
            g.cores_asked = Some(n);
            (
                g.grant.cap_cores(n, self.host_cores),
                g.grant.cap_quota(f64::from(n)),
                g.grant.cores.is_some(),
                g.grant
                    .cpus
                    .clone()
                    .unwrap_or_else(|| self.allowed_cpus.clone()),
            )
        };
        // Under a host's grant several VMs share the budget's CPUs: pinning each VM to
        // the first n of them stacked every VM on the same cores (BENCHMARKS section 11:
        // all vCPU threads of both VMs on CPU 0). There the share is the CPU quota's
        // alone and the threads may run on any allowed CPU; without a grant, or without
        // a cgroup quota to enforce it, the threads are pinned to n cores.
        let quota_only = granted && self.cpu_quota.mode() != crate::cpu_quota::Mode::None;
        // A granted CPU list is the pool: placement from the arbiter, time from the quota.
        let pinned = if quota_only { pool.len() } else { n as usize };
        let set = first_cpus(&pool, pinned);
        for (i, tid) in self.vcpu_tids.iter().enumerate() {
            let tid = tid.load(Ordering::Acquire);
            if tid == 0 {
                continue;
            }
            // SAFETY: valid set and size; the tid is one of our own threads.
            let rc = unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if rc != 0 {
                return Err(ControlError::Refused(format!(
                    "vCPU {i}: sched_setaffinity: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        self.cores_given.store(n, Ordering::Release);
        if quota_only {
            log::info!("vCPU threads held to {quota} core(s) of CPU time on any allowed CPU");
        } else {
            log::info!("vCPU threads confined to {n} host core(s)");
        }
        if self.cpu_quota.mode() != crate::cpu_quota::Mode::None {
            if let Err(e) = self.cpu_quota.set_quota(quota, &self.quota_tids()) {
                log::warn!("CPU quota of {n} core(s) not applied: {e}");
            }
        }
        Ok(())
    }

    fn tids(&self) -> Vec<i32> {
        self.vcpu_tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .collect()
    }

    /// The threads a CPU quota holds: the vCPU threads and, under a host's grant of
    /// cores or weight, the event-loop (I/O) thread too. Its time is the VM's, and it must share the
    /// vCPUs' cgroup: in a cgroup of their own the vCPU threads leave the I/O thread
    /// waiting a whole slice for each request it is woken for (measured: a `blk-io`
    /// randread VM pinned to one CPU fell from 19 700 to under 2 000 reads/s when its
    /// vCPU alone was moved into the cgroup, quota lifted).
    fn quota_tids(&self) -> Vec<i32> {
        let mut t = self.tids();
        let g = lock(&self.grant);
        if (g.grant.cores.is_some() || g.grant.weight.is_some()) && self.main_tid > 0 {
            t.push(self.main_tid);
        }
        t
    }

    /// Caps the vCPU threads at `cores` (fractional) host cores of CPU time together,
    /// without changing their affinity; `cores` >= the host's cores lifts the cap.
    /// The grant caps it as it caps [`Self::device_set_host_cores`].
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_cpu_quota(&self, cores: f64) -> Result<(), ControlError> {
        let cores = {
            let mut g = lock(&self.grant);
            g.quota_asked = Some(cores);
            g.grant.cap_quota(cores)
        };
        self.cpu_quota
            .set_quota(cores, &self.quota_tids())
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    /// The CPU quota's mode, reason, value and last error.
    pub fn cpu_quota_status(&self) -> QuotaStatus {
        self.cpu_quota.status()
    }

    /// Moves the vCPU threads out of their cgroup and removes it (at the end of the run).
    pub fn release_cpu_quota(&self) {
        self.cpu_quota.release();
    }

    /// The host arbiter's grant in force.
    pub fn grant(&self) -> Grant {
        lock(&self.grant).grant.clone()
    }

    /// Most host cores the grant leaves the vCPU threads (all of them without a grant).
    pub fn granted_core_cap(&self) -> u32 {
        lock(&self.grant).grant.core_cap(self.host_cores)
    }

    /// Takes the host arbiter's grant and applies it at once: host cores, CPU quota and
    /// drive bandwidth above it are lowered to it; what was asked before a tighter grant
    /// is given back (up to the new one) when it grows.
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_grant(&self, grant: Grant) -> Result<(), ControlError> {
        grant
            .validate(&self.drive_ids(), &self.allowed_cpus)
            .map_err(|e| ControlError::Refused(e.to_string()))?;
        // The event-loop thread (the VM's I/O) goes where the grant places the VM; the
        // vCPU threads follow in device_set_host_cores. Without a list it gets its start CPUs back.
        let place = grant
            .cpus
            .clone()
            .unwrap_or_else(|| self.allowed_cpus.clone());
        if self.main_tid > 0 {
            let set = first_cpus(&place, place.len());
            // SAFETY: valid set and size; the tid is this process's event-loop thread.
            let rc = unsafe {
                libc::sched_setaffinity(self.main_tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if rc != 0 {
                return Err(ControlError::Refused(format!(
                    "event-loop thread: sched_setaffinity: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        let (cores, quota, limits) = {
            let mut g = lock(&self.grant);
            g.grant = grant;
            let limits: Vec<(String, RateLimiterConfig)> = self
                .drives
                .iter()
                .map(|d| {
                    let asked = g
                        .limits_asked
                        .get(&d.id)
                        .copied()
                        .unwrap_or_else(|| lock(&d.block).rate_limit());
                    (d.id.clone(), asked)
                })
                .collect();
            (
                g.cores_asked.unwrap_or_else(|| self.host_cores_given()),
                g.quota_asked,
                limits,
            )
        };
        log::info!("host grant: {:?}", self.grant());
        self.device_set_host_cores(cores.clamp(1, self.host_cores))?;
        if let Some(w) = self.grant().weight {
            if self.cpu_quota.mode() != crate::cpu_quota::Mode::None {
                if let Err(e) = self.cpu_quota.set_weight(w, &self.quota_tids()) {
                    log::warn!("CPU weight {w} not applied: {e}");
                }
            }
        }
        if let Some(q) = quota {
            // A quota asked alone (PATCH /vm cpu_quota) stays capped by the new grant.
            if let Err(e) = self.device_set_cpu_quota(q) {
                log::warn!("CPU quota under the grant: {e}");
            }
        }
        for (id, asked) in limits {
            self.device_set_rate_limit(&id, asked)?;
        }
        Ok(())
    }

    /// Cumulative dirty pages, reading (and clearing) KVM's log now.
    fn dirty_pages(&self) -> u64 {
        let Some(d) = &self.dirty else {
            return 0;
        };
        let mut total = lock(&d.total);
        match crate::memory::dirty_pages(&d.vm, &d.slots) {
            Ok(n) => *total += n,
            Err(e) => log::debug!("dirty log: {e}"),
        }
        *total
    }

    /// Ids of the drives, in slot order.
    pub fn drive_ids(&self) -> Vec<String> {
        self.drives.iter().map(|d| d.id.clone()).collect()
    }

    fn drive(&self, id: &str) -> Result<(usize, &DriveHandle), ControlError> {
        self.drives
            .iter()
            .enumerate()
            .find(|(_, d)| d.id == id)
            .ok_or_else(|| ControlError::UnknownDrive(id.to_string()))
    }

    /// Changes a network device's limits (both directions) while the guest runs.
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_net_rate_limit(
        &self,
        id: &str,
        config: RateLimiterConfig,
    ) -> Result<(), ControlError> {
        let (_, net) = self
            .nets
            .iter()
            .find(|(n, _)| n == id)
            .ok_or_else(|| ControlError::UnknownDrive(id.to_string()))?;
        lock(net)
            .set_rate_limit(config)
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    /// Ids of the network devices.
    pub fn net_ids(&self) -> Vec<String> {
        self.nets.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Changes a drive's rate limits while the guest runs (tokens already spent stay spent).
    /// A bandwidth above the host arbiter's grant for the drive is lowered to it.
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_rate_limit(
        &self,
        id: &str,
        config: RateLimiterConfig,
    ) -> Result<RateLimiterConfig, ControlError> {
        let (_, d) = self.drive(id)?;
        let config = {
            let mut g = lock(&self.grant);
            let capped = g.grant.cap_limits(id, config);
            g.limits_asked.insert(id.to_string(), config);
            capped
        };
        lock(&d.block)
            .set_rate_limit(config)
            .map_err(|e| ControlError::Refused(e.to_string()))?;
        Ok(config)
    }

    /// A drive's rate limits in force.
    pub fn rate_limit(&self, id: &str) -> Result<RateLimiterConfig, ControlError> {
        let (_, d) = self.drive(id)?;
        Ok(lock(&d.block).rate_limit())
    }

    /// Changes a drive's I/O priority while the guest runs.
    /// Only the knob controller calls this ([`VmRuntime::control`]).
    pub(crate) fn device_set_priority(
        &self,
        id: &str,
        priority: Priority,
    ) -> Result<(), ControlError> {
        let (index, _) = self.drive(id)?;
        let sched = self
            .scheduler
            .as_ref()
            .ok_or_else(|| ControlError::Refused("no I/O scheduler".into()))?;
        lock(sched)
            .set_priority(QueueId(index as u32), priority)
            .map_err(|e| ControlError::Refused(e.to_string()))?;
        log::info!("{id}: I/O priority set to {priority}");
        Ok(())
    }

    /// A drive's I/O priority.
    pub fn priority(&self, id: &str) -> Result<Priority, ControlError> {
        let (index, _) = self.drive(id)?;
        let sched = self
            .scheduler
            .as_ref()
            .ok_or_else(|| ControlError::Refused("no I/O scheduler".into()))?;
        lock(sched)
            .priority(QueueId(index as u32))
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    /// The guest's own reports so far.
    pub fn guest_report(&self) -> devices::guest_metrics::GuestReport {
        self.guest.report()
    }
}

impl CounterSource for VmRuntime {
    fn repo_stats(&self) -> Option<tuner::state_repo::WriterStats> {
        VmRuntime::repo_stats(self)
    }

    fn snapshot(&self) -> CounterSnapshot {
        self.counters(true)
    }
}

impl VmRuntime {
    /// The counters for the control API: neither KVM's dirty log (read and cleared by
    /// the sampler thread only; its ioctl is outside the API thread's filter, and a
    /// read here would take pages from the sampler's count) nor the KVM stats fds; the
    /// dirty-page figure is the sampler's latest total.
    pub fn api_snapshot(&self) -> CounterSnapshot {
        self.counters(false)
    }

    /// Every counter; `live` also reads KVM's dirty log and binary stats now.
    fn counters(&self, live: bool) -> CounterSnapshot {
        let run_delays: Vec<u64> = lock(&self.schedstats)
            .iter()
            .map(|f| f.as_ref().map_or(0, run_delay_ns))
            .collect();
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut c = s.snapshot(i as u32);
                c.run_delay_ns = run_delays.get(i).copied().unwrap_or(0);
                if !live {
                    return c;
                }
                if let Some(Some(stats)) = self
                    .kvm_stats
                    .get(i)
                    .map(|m| lock(m).as_mut().map(|k| k.read()))
                {
                    match stats {
                        Ok(v) => c.kvm_stats = v,
                        Err(e) => log::debug!("vCPU {i}: KVM stats: {e}"),
                    }
                }
                c
            })
            .collect();
        let counters = |device: &str, queue: u16, m: QueueMetricsSnapshot| QueueCounters {
            device: device.to_string(),
            queue,
            requests: m.requests,
            bytes: m.bytes,
            errors: m.errors,
            throttled_ns: m.throttled_ns,
            depth_sum: m.depth_sum,
            depth_samples: m.depth_samples,
            latency_buckets: m.latency_buckets,
            latency_ns_sum: m.latency_ns_sum,
        };
        let queues: Vec<QueueCounters> = self
            .queue_metrics
            .iter()
            .map(|(id, queue, m)| counters(id, *queue, m.snapshot()))
            .collect();
        let g = self.guest.report();
        let knobs = self.knob_state();
        CounterSnapshot {
            at_ns: self.started.elapsed().as_nanos() as u64,
            vcpus,
            queues,
            memory: MemoryCounters {
                guest_bytes: self.mem_bytes,
                resident_bytes: resident_bytes(self.statm.as_ref()),
                page_faults: page_faults(),
                dirty_pages: if live {
                    self.dirty_pages()
                } else {
                    self.dirty.as_ref().map_or(0, |d| *lock(&d.total))
                },
            },
            guest: GuestMetrics {
                ops: g.ops,
                bytes: g.bytes,
                latency_ns_sum: g.latency_ns_sum,
                latency_samples: g.latency_samples,
            },
            active_vcpus: knobs.active_vcpus,
            host_cores: knobs.host_cores,
            drives: knobs
                .drives
                .iter()
                .map(|d| DriveKnobs {
                    id: d.id.clone(),
                    rate_level: u8::try_from(d.rate_level).unwrap_or(u8::MAX),
                    priority: d.priority_level,
                })
                .collect(),
            net_qos_level: knobs
                .nets
                .first()
                .map(|n| u8::try_from(n.qos_level).unwrap_or(u8::MAX)),
            log_lines_suppressed: devices::log_limit::suppressed_total(),
            host: self.host_counters(),
            slo: self.slo,
            profile: self.profiler.as_ref().map(|p| p.counters()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(set: &libc::cpu_set_t) -> Vec<usize> {
        // SAFETY: reading bits below CPU_SETSIZE of a valid set.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
            .collect()
    }

    #[test]
    fn host_cores_take_the_first_allowed_cpus_not_cpu_zero() {
        // Issue 14: under `taskset -c 4-7`, one host core was CPU 0.
        assert_eq!(members(&first_cpus(&[4, 5, 6, 7], 2)), vec![4, 5]);
        assert_eq!(members(&first_cpus(&[1], 1)), vec![1]);
        assert_eq!(members(&first_cpus(&[0, 3], 5)), vec![0, 3]);
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "{allowed:?}");
    }

    #[test]
    fn host_view_parsers_take_the_right_fields() {
        assert_eq!(parse_run_delay(b"123456 789000 42\n"), 789_000);
        assert_eq!(parse_run_delay(b"garbage"), 0);
        assert_eq!(parse_run_delay(b""), 0);
        let stat = b"cpu  10 10 10 10 10 10 10 10 0 0\n\
cpu0 1 2 3 100 4 5 6 7 0 0\n\
cpu1 10 0 0 90 0 0 0 0 0 0\n\
cpu2 1000 0 0 0 0 0 0 0 0 0\n\
intr 1 2 3\n\
cpu3 5 5";
        // Allowed: cpu0 and cpu1 (cpu2 is not; the aggregate line is not a CPU).
        let h = parse_proc_stat(stat, &[0, 1]);
        // cpu0: busy 1+2+3+5+6+7 = 24, total 24 + 100 + 4 = 128; cpu1: 10 of 100.
        assert_eq!((h.busy_ticks, h.total_ticks, h.allowed_cpus), (34, 228, 2));
        // A line cut off at the end of the read is ignored.
        assert_eq!(parse_proc_stat(stat, &[3]).total_ticks, 0);
        // This host's own file parses, read as the sampler reads it: `pread` at 0 of a
        // file opened once, twice.
        use std::os::unix::fs::FileExt;
        let cpus = allowed_cpus();
        let f = std::fs::File::open("/proc/stat").unwrap();
        let mut buf = vec![0u8; PROC_STAT_PREFIX];
        let n = f.read_at(&mut buf, 0).unwrap();
        let first = parse_proc_stat(&buf[..n], &cpus);
        assert!(
            first.total_ticks > 0 && first.busy_ticks <= first.total_ticks,
            "{first:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
        let n = f.read_at(&mut buf, 0).unwrap();
        let again = parse_proc_stat(&buf[..n], &cpus);
        assert!(
            again.total_ticks >= first.total_ticks,
            "{again:?} after {first:?}"
        );
        // And a thread's schedstat.
        // SAFETY: gettid has no side effects.
        let tid = unsafe { libc::gettid() };
        let f = std::fs::File::open(format!("/proc/self/task/{tid}/schedstat")).unwrap();
        let mut line = [0u8; SCHEDSTAT_LEN];
        let n = f.read_at(&mut line, 0).unwrap();
        assert!(
            n > 0 && line[..n].split(|b| *b == b' ').count() == 3,
            "{line:?}"
        );
        let _ = run_delay_ns(&f);
    }
}
