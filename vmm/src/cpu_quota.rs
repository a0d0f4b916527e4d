//! A host CPU quota for the vCPU threads, through cgroups.
//!
//! At VM start [`CpuQuota::probe`] looks for a way to cap the CPU time of the vCPU threads:
//!
//! 1. **cgroup v2** with the `cpu` controller available in our own cgroup (mount found in
//!    `/proc/self/mountinfo`, our cgroup in `/proc/self/cgroup`): a threaded child
//!    `<our cgroup>/vmm-<pid>-vcpus` (`cgroup.type` = `threaded`, `+cpu` in our
//!    `cgroup.subtree_control`), threads moved with `cgroup.threads`, quota in `cpu.max`;
//! 2. else a writable **cgroup v1** `cpu` hierarchy: the child `vmm-<pid>-vcpus` under our
//!    cgroup there, threads moved with `tasks`, quota in `cpu.cfs_quota_us` /
//!    `cpu.cfs_period_us`;
//! 3. else **none**, with a one-line reason for the logs and the control API.
//!
//! The child cgroup is made (or, left over from a crashed run with the same name, reused)
//! and every file the monitor writes later is opened during the probe, before the seccomp
//! filters are installed: changing the quota later needs only `write`, and removing the
//! cgroup at the end only `rmdir` (see `seccomp.rs`). The vCPU threads join the cgroup on
//! the first quota change; at the end they are moved back to our cgroup and the child is
//! removed.
//!
//! The root paths are injectable ([`ProbeRoots`]) so the probe runs on fake trees in tests.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The quota period, in microseconds (100 ms).
pub const PERIOD_US: u64 = 100_000;

/// The smallest quota the kernel takes (1 ms per period), in cores.
pub const MIN_CORES: f64 = 0.01;

/// Errors of the CPU quota.
#[derive(Debug, thiserror::Error)]
pub enum CpuQuotaError {
    /// A cgroup file or directory could not be read, written or made.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// No cgroup can take a quota on this machine.
    #[error("no CPU quota on this host: {0}")]
    Unavailable(String),
    /// The quota asked for is not a usable number of cores.
    #[error("a CPU quota must be a number of cores of at least {MIN_CORES}, not {0}")]
    BadQuota(f64),
    /// The cgroup was already removed (the VM is ending).
    #[error("the vCPU cgroup {0} was already removed")]
    Released(PathBuf),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CpuQuotaError {
    let path = path.to_path_buf();
    move |source| CpuQuotaError::Io { op, path, source }
}

/// How the quota is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cgroup v2 (`cpu.max`, threaded cgroup).
    V2,
    /// cgroup v1 `cpu` controller (`cpu.cfs_quota_us`).
    V1,
    /// No quota possible.
    None,
}

impl Mode {
    /// `"v2"`, `"v1"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::V2 => "v2",
            Mode::V1 => "v1",
            Mode::None => "none",
        }
    }
}

/// One line of `/proc/self/mountinfo`, the fields the probe needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the mounted file system seen at the mount point (field 4).
    pub root: String,
    /// Where it is mounted (field 5).
    pub mount_point: PathBuf,
    /// Mounted read-only (per-mount option `ro`).
    pub read_only: bool,
    /// File system type (`cgroup`, `cgroup2`, ...).
    pub fstype: String,
    /// Super-block options (for cgroup v1: the controllers, `rw`, ...).
    pub super_options: Vec<String>,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = field
                .get(i + 1..i + 4)
                .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            if f.len() < 6 {
                return None;
            }
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let _source = r.next();
            let super_options = r
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect();
            Some(Mount {
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                read_only: f[5].split(',').any(|o| o == "ro"),
                fstype,
                super_options,
            })
        })
        .collect()
}

/// One line of `/proc/self/cgroup`: `id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine {
    /// Hierarchy id (0 for cgroup v2).
    pub id: u32,
    /// Controllers of a v1 hierarchy (empty for v2; `name=systemd` kept as written).
    pub controllers: Vec<String>,
    /// Our cgroup, relative to the hierarchy's root.
    pub path: String,
}

/// Parses `/proc/self/cgroup`; malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?.parse().ok()?;
            let controllers = parts
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            let path = parts.next()?.to_string();
            Some(CgroupLine {
                id,
                controllers,
                path,
            })
        })
        .collect()
}

/// The directory of cgroup `path` (from `/proc/self/cgroup`) under `mount`, with every
/// absolute path placed under `fs_root`. `None` when the cgroup is outside what is mounted
/// there or the path is not plain.
pub fn cgroup_dir(fs_root: &Path, mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else if path == mount.root {
        ""
    } else {
        path.strip_prefix(mount.root.as_str())
            .filter(|rest| rest.starts_with('/'))?
    };
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == ".." || c == ".") {
        return None;
    }
    let mp = mount.mount_point.strip_prefix("/").ok()?;
    let mut dir = fs_root.join(mp);
    if !rel.is_empty() {
        dir.push(rel);
    }
    Some(dir)
}

/// Where the probe looks: the host's files, or a fake tree in tests.
#[derive(Debug, Clone)]
pub struct ProbeRoots {
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// `/proc/self/cgroup`.
    pub proc_cgroup: PathBuf,
    /// Prefix of every mount point (`/` on the host).
    pub fs_root: PathBuf,
}

impl ProbeRoots {
    /// The host's own files.
    pub fn host() -> Self {
        Self {
            mountinfo: "/proc/self/mountinfo".into(),
            proc_cgroup: "/proc/self/cgroup".into(),
            fs_root: "/".into(),
        }
    }
}

/// The name of this process's vCPU cgroup.
pub fn default_name() -> String {
    format!("vmm-{}-vcpus", std::process::id())
}

fn read(path: &Path) -> Result<String, CpuQuotaError> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

/// Writes `text` into an existing file (no create, no truncate: cgroup files take each
/// write as one command).
fn write_existing(path: &Path, text: &str) -> Result<(), CpuQuotaError> {
    open_for_write(path)?
        .write_all(text.as_bytes())
        .map_err(io_err("write", path))
}

fn open_for_write(path: &Path) -> Result<File, CpuQuotaError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Makes `dir`, or reuses it if a crashed run left it; true if it was made now.
fn make_dir(dir: &Path) -> Result<bool, CpuQuotaError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            log::info!("reusing the leftover cgroup {}", dir.display());
            Ok(false)
        }
        Err(e) => Err(io_err("mkdir", dir)(e)),
    }
}

/// Removes `vmm-<pid>-vcpus` siblings whose process is gone. `rmdir` of a cgroup that
/// still holds threads fails, so a live VM's cgroup is never taken away.
fn sweep_stale(parent: &Path, own: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix("vmm-")
            .and_then(|r| r.strip_suffix("-vcpus"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if name == own || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir(e.path()) {
            Ok(()) => log::info!("removed the stale cgroup {}", e.path().display()),
            Err(err) => log::debug!("stale cgroup {}: {err}", e.path().display()),
        }
    }
}

/// The open files of a working vCPU cgroup.
#[derive(Debug)]
struct Backend {
    mode: Mode,
    /// The child cgroup.
    dir: PathBuf,
    /// v2 `cpu.max` or v1 `cpu.cfs_quota_us`.
    quota: File,
    /// v1 `cpu.cfs_period_us`.
    period: Option<File>,
    /// The child's `cgroup.threads` (v2) or `tasks` (v1).
    members: File,
    /// Our own cgroup's `cgroup.threads` / `tasks`, to move the threads back at the end.
    parent_members: File,
    /// Threads moved in so far.
    tids: Vec<i32>,
    /// v2 `cpu.weight` or v1 `cpu.shares` (`None`: not writable here).
    weight: Option<File>,
}

impl Backend {
    fn member_file(mode: Mode) -> &'static str {
        if mode == Mode::V2 {
            "cgroup.threads"
        } else {
            "tasks"
        }
    }

    fn v2(parent: &Path, name: &str) -> Result<Self, CpuQuotaError> {
        let controllers_path = parent.join("cgroup.controllers");
        let controllers = read(&controllers_path)?;
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return Err(CpuQuotaError::Unavailable(format!(
                "cgroup v2: no cpu controller in {} (has: {})",
                controllers_path.display(),
                controllers.trim()
            )));
        }
        let dir = parent.join(name);
        let made = make_dir(&dir)?;
        let set_up = || -> Result<Self, CpuQuotaError> {
            let type_path = dir.join("cgroup.type");
            if read(&type_path)?.trim() != "threaded" {
                write_existing(&type_path, "threaded")?;
            }
            let subtree = parent.join("cgroup.subtree_control");
            if !read(&subtree)?.split_whitespace().any(|c| c == "cpu") {
                write_existing(&subtree, "+cpu")?;
            }
            Ok(Self {
                mode: Mode::V2,
                quota: open_for_write(&dir.join("cpu.max"))?,
                period: None,
                members: open_for_write(&dir.join("cgroup.threads"))?,
                parent_members: open_for_write(&parent.join("cgroup.threads"))?,
                weight: open_for_write(&dir.join("cpu.weight")).ok(),
                dir: dir.clone(),
                tids: Vec::new(),
            })
        };
        set_up().inspect_err(|_| {
            if made {
                let _ = std::fs::remove_dir(&dir);
            }
        })
    }

    fn v1(parent: &Path, name: &str) -> Result<Self, CpuQuotaError> {
        let dir = parent.join(name);
        let made = make_dir(&dir)?;
        let set_up = || -> Result<Self, CpuQuotaError> {
            Ok(Self {
                mode: Mode::V1,
                quota: open_for_write(&dir.join("cpu.cfs_quota_us"))?,
                period: Some(open_for_write(&dir.join("cpu.cfs_period_us"))?),
                members: open_for_write(&dir.join("tasks"))?,
                parent_members: open_for_write(&parent.join("tasks"))?,
                weight: open_for_write(&dir.join("cpu.shares")).ok(),
                dir: dir.clone(),
                tids: Vec::new(),
            })
        };
        set_up().inspect_err(|_| {
            if made {
                let _ = std::fs::remove_dir(&dir);
            }
        })
    }

    fn write(file: &mut File, dir: &Path, name: &str, text: &str) -> Result<(), CpuQuotaError> {
        file.write_all(text.as_bytes())
            .map_err(io_err("write", &dir.join(name)))
    }

    fn add_threads(&mut self, tids: &[i32]) -> Result<(), CpuQuotaError> {
        let members = Self::member_file(self.mode);
        for &tid in tids.iter().filter(|t| **t > 0) {
            if self.tids.contains(&tid) {
                continue;
            }
            Self::write(&mut self.members, &self.dir, members, &format!("{tid}\n"))?;
            self.tids.push(tid);
        }
        Ok(())
    }

    /// The cgroup's weight against its siblings (v2 `cpu.weight`, 1..=10000, 100 by
    /// default; v1 `cpu.shares` = weight x 1024 / 100).
    fn set_weight(&mut self, weight: u32) -> Result<(), CpuQuotaError> {
        let (name, text) = match self.mode {
            Mode::V2 => ("cpu.weight", format!("{}\n", weight.clamp(1, 10_000))),
            _ => (
                "cpu.shares",
                format!("{}\n", (u64::from(weight) * 1024 / 100).max(2)),
            ),
        };
        let dir = self.dir.clone();
        match &mut self.weight {
            Some(f) => Self::write(f, &dir, name, &text),
            None => Err(io_err("open", &dir.join(name))(std::io::Error::from(
                std::io::ErrorKind::PermissionDenied,
            ))),
        }
    }

    /// `quota_us` of `None` means unlimited.
    fn set(&mut self, quota_us: Option<u64>) -> Result<(), CpuQuotaError> {
        match self.mode {
            Mode::V2 => {
                let text = match quota_us {
                    Some(q) => format!("{q} {PERIOD_US}\n"),
                    None => format!("max {PERIOD_US}\n"),
                };
                Self::write(&mut self.quota, &self.dir, "cpu.max", &text)
            }
            _ => {
                if let Some(period) = &mut self.period {
                    Self::write(
                        period,
                        &self.dir,
                        "cpu.cfs_period_us",
                        &format!("{PERIOD_US}\n"),
                    )?;
                }
                let text = match quota_us {
                    Some(q) => format!("{q}\n"),
                    None => "-1\n".to_string(),
                };
                Self::write(&mut self.quota, &self.dir, "cpu.cfs_quota_us", &text)
            }
        }
    }

    /// Moves the threads back to our own cgroup and removes the child.
    fn release(&mut self) -> Result<(), CpuQuotaError> {
        let parent = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        let members = Self::member_file(self.mode);
        for tid in std::mem::take(&mut self.tids) {
            if let Err(e) = self.parent_members.write_all(format!("{tid}\n").as_bytes()) {
                // A thread that has ended (ESRCH) has left the cgroup anyway.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(io_err("write", &parent.join(members))(e));
                }
            }
        }
        std::fs::remove_dir(&self.dir).map_err(io_err("rmdir", &self.dir))
    }
}

/// The state shown to the control API.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaStatus {
    /// How the quota is applied.
    pub mode: Mode,
    /// Why this mode (and, for `none`, why no quota is possible).
    pub reason: String,
    /// The quota in force, in cores (`None`: unlimited).
    pub cores: Option<f64>,
    /// The vCPU cgroup's directory, when there is one.
    pub path: Option<PathBuf>,
    /// The last failure to write the quota, if the last change failed.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct State {
    backend: Option<Backend>,
    cores: Option<f64>,
    last_error: Option<String>,
}

/// The vCPU threads' CPU quota of one VM.
#[derive(Debug)]
pub struct CpuQuota {
    mode: Mode,
    reason: String,
    host_cores: u32,
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl CpuQuota {
    /// A quota that cannot be applied, for `reason`.
    pub fn unavailable(reason: impl Into<String>, host_cores: u32) -> Self {
        Self {
            mode: Mode::None,
            reason: reason.into(),
            host_cores,
            path: None,
            state: Mutex::new(State {
                backend: None,
                cores: None,
                last_error: None,
            }),
        }
    }

    /// Finds a way to cap the vCPU threads (v2, else v1, else none) and makes the cgroup
    /// `name` under our own; `host_cores` is what "unlimited" means.
    pub fn probe(roots: &ProbeRoots, name: &str, host_cores: u32) -> Self {
        let texts = read(&roots.mountinfo).and_then(|m| Ok((m, read(&roots.proc_cgroup)?)));
        let (mountinfo, proc_cgroup) = match texts {
            Ok(t) => t,
            Err(e) => return Self::unavailable(e.to_string(), host_cores),
        };
        let mounts = parse_mountinfo(&mountinfo);
        let lines = parse_proc_cgroup(&proc_cgroup);
        let v2 = Self::probe_v2(roots, &mounts, &lines, name);
        let v2_reason = match v2 {
            Ok(b) => return Self::with(b, "cgroup v2 cpu controller".into(), host_cores),
            Err(e) => e,
        };
        match Self::probe_v1(roots, &mounts, &lines, name) {
            Ok(b) => Self::with(b, format!("{v2_reason}; using cgroup v1 cpu"), host_cores),
            Err(v1_reason) => Self::unavailable(format!("{v2_reason}; {v1_reason}"), host_cores),
        }
    }

    fn with(backend: Backend, reason: String, host_cores: u32) -> Self {
        Self {
            mode: backend.mode,
            reason,
            host_cores,
            path: Some(backend.dir.clone()),
            state: Mutex::new(State {
                backend: Some(backend),
                cores: None,
                last_error: None,
            }),
        }
    }

    fn probe_v2(
        roots: &ProbeRoots,
        mounts: &[Mount],
        lines: &[CgroupLine],
        name: &str,
    ) -> Result<Backend, String> {
        let Some(line) = lines.iter().find(|l| l.id == 0 && l.controllers.is_empty()) else {
            return Err("cgroup v2: we are in no v2 hierarchy".into());
        };
        let dir = mounts
            .iter()
            .filter(|m| m.fstype == "cgroup2" && !m.read_only)
            .find_map(|m| cgroup_dir(&roots.fs_root, m, &line.path))
            .ok_or_else(|| format!("cgroup v2: our cgroup {} is not mounted rw", line.path))?;
        sweep_stale(&dir, name);
        Backend::v2(&dir, name).map_err(|e| match e {
            CpuQuotaError::Unavailable(r) => r,
            e => format!("cgroup v2: {e}"),
        })
    }

    fn probe_v1(
        roots: &ProbeRoots,
        mounts: &[Mount],
        lines: &[CgroupLine],
        name: &str,
    ) -> Result<Backend, String> {
        let has_cpu = |c: &[String]| c.iter().any(|c| c == "cpu");
        let Some(line) = lines.iter().find(|l| l.id != 0 && has_cpu(&l.controllers)) else {
            return Err("cgroup v1: no cpu hierarchy".into());
        };
        let candidates: Vec<&Mount> = mounts
            .iter()
            .filter(|m| m.fstype == "cgroup" && has_cpu(&m.super_options))
            .collect();
        if candidates.is_empty() {
            return Err("cgroup v1: the cpu hierarchy is not mounted".into());
        }
        let dir = candidates
            .iter()
            .filter(|m| !m.read_only)
            .find_map(|m| cgroup_dir(&roots.fs_root, m, &line.path))
            .ok_or_else(|| format!("cgroup v1: our cpu cgroup {} is not mounted rw", line.path))?;
        sweep_stale(&dir, name);
        Backend::v1(&dir, name).map_err(|e| format!("cgroup v1: {e}"))
    }

    /// How the quota is applied.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Why this mode.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The state for the control API.
    pub fn status(&self) -> QuotaStatus {
        let s = devices::lock(&self.state);
        QuotaStatus {
            mode: self.mode,
            reason: self.reason.clone(),
            cores: s.cores,
            path: self.path.clone(),
            last_error: s.last_error.clone(),
        }
    }

    /// Puts the threads `tids` (0 = not started, skipped) in the cgroup and sets its
    /// weight against the other cgroups and threads beside it (`weight`: cgroup v2
    /// `cpu.weight` units, 100 = one ordinary thread's share).
    pub fn set_weight(&self, weight: u32, tids: &[i32]) -> Result<(), CpuQuotaError> {
        if self.mode == Mode::None {
            return Err(CpuQuotaError::Unavailable(self.reason.clone()));
        }
        let mut s = devices::lock(&self.state);
        let path = self.path.clone().unwrap_or_default();
        let backend = s.backend.as_mut().ok_or(CpuQuotaError::Released(path))?;
        backend.add_threads(tids)?;
        backend.set_weight(weight)
    }

    /// Puts the threads `tids` (0 = not started, skipped) in the cgroup and caps them at
    /// `cores` host cores together (`cores` >= the host's cores: unlimited).
    pub fn set_quota(&self, cores: f64, tids: &[i32]) -> Result<(), CpuQuotaError> {
        if !cores.is_finite() || cores < MIN_CORES {
            return Err(CpuQuotaError::BadQuota(cores));
        }
        if self.mode == Mode::None {
            return Err(CpuQuotaError::Unavailable(self.reason.clone()));
        }
        let mut s = devices::lock(&self.state);
        let result = Self::apply(&mut s, cores, self.host_cores, self.path.as_deref(), tids);
        match &result {
            Ok(cores) => {
                s.cores = *cores;
                s.last_error = None;
                match cores {
                    Some(c) => log::info!("vCPU threads capped at {c} host core(s)"),
                    None => log::info!("vCPU threads' CPU quota lifted"),
                }
            }
            Err(e) => s.last_error = Some(e.to_string()),
        }
        result.map(|_| ())
    }

    fn apply(
        s: &mut State,
        cores: f64,
        host_cores: u32,
        path: Option<&Path>,
        tids: &[i32],
    ) -> Result<Option<f64>, CpuQuotaError> {
        let backend = s
            .backend
            .as_mut()
            .ok_or_else(|| CpuQuotaError::Released(path.unwrap_or(Path::new("")).into()))?;
        backend.add_threads(tids)?;
        if cores >= f64::from(host_cores) {
            backend.set(None)?;
            Ok(None)
        } else {
            let quota_us = (cores * PERIOD_US as f64).round() as u64;
            backend.set(Some(quota_us))?;
            Ok(Some(quota_us as f64 / PERIOD_US as f64))
        }
    }

    /// Moves the vCPU threads back to our own cgroup and removes the vCPU cgroup (once;
    /// later calls do nothing).
    pub fn release(&self) {
        let backend = devices::lock(&self.state).backend.take();
        if let Some(mut b) = backend {
            match b.release() {
                Ok(()) => log::debug!("removed the cgroup {}", b.dir.display()),
                Err(e) => log::warn!("vCPU cgroup not removed: {e}"),
            }
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime shared:5 - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 /a\\040b /mnt/with\\040space ro,relatime - ext4 /dev/vda rw
";

    const PROC_CGROUP: &str = "\
9:name=systemd:/
4:memory:/process_api/fd91
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn mountinfo_lines_are_parsed() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(m[1].fstype, "cgroup");
        assert_eq!(m[1].super_options, vec!["rw", "cpu"]);
        assert_eq!(m[1].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(
            m[3].super_options,
            vec!["rw", "cpuset"],
            "optional fields skipped"
        );
        assert_eq!(m[4].fstype, "cgroup2");
        assert!(!m[4].read_only);
        assert_eq!(m[5].root, "/a b");
        assert_eq!(m[5].mount_point, PathBuf::from("/mnt/with space"));
        assert!(m[5].read_only);
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
    }

    #[test]
    fn proc_cgroup_lines_are_parsed() {
        let l = parse_proc_cgroup(PROC_CGROUP);
        assert_eq!(l.len(), 5);
        assert_eq!(l[0].controllers, vec!["name=systemd"]);
        assert_eq!(l[1].path, "/process_api/fd91");
        assert_eq!(
            l[4],
            CgroupLine {
                id: 0,
                controllers: vec![],
                path: "/".into()
            }
        );
        let l = parse_proc_cgroup("3:cpu,cpuacct:/a:b\nnot a line\n");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(l[0].path, "/a:b", "a colon in the path is kept");
    }

    #[test]
    fn cgroup_dirs_follow_the_mount_root() {
        let mount = |root: &str| Mount {
            root: root.into(),
            mount_point: "/sys/fs/cgroup".into(),
            read_only: false,
            fstype: "cgroup2".into(),
            super_options: vec![],
        };
        let fs = Path::new("/");
        assert_eq!(
            cgroup_dir(fs, &mount("/"), "/user.slice/x.scope"),
            Some("/sys/fs/cgroup/user.slice/x.scope".into())
        );
        assert_eq!(
            cgroup_dir(fs, &mount("/"), "/"),
            Some("/sys/fs/cgroup".into())
        );
        assert_eq!(
            cgroup_dir(fs, &mount("/ctr"), "/ctr/job"),
            Some("/sys/fs/cgroup/job".into())
        );
        assert_eq!(cgroup_dir(fs, &mount("/ctr"), "/ctrx/job"), None);
        assert_eq!(cgroup_dir(fs, &mount("/"), "/a/../b"), None);
        assert_eq!(
            cgroup_dir(Path::new("/tmp/fake"), &mount("/"), "/a"),
            Some("/tmp/fake/sys/fs/cgroup/a".into())
        );
    }

    /// A fake tree under a temporary directory.
    struct Fake(PathBuf);

    impl Fake {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "vmm-cpu-quota-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.0.join(rel)).unwrap()
        }

        fn roots(&self, mountinfo: &str, proc_cgroup: &str) -> ProbeRoots {
            self.file("proc/mountinfo", mountinfo);
            self.file("proc/cgroup", proc_cgroup);
            ProbeRoots {
                mountinfo: self.0.join("proc/mountinfo"),
                proc_cgroup: self.0.join("proc/cgroup"),
                fs_root: self.0.clone(),
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn last_line(text: &str) -> &str {
        text.lines().last().unwrap_or("")
    }

    const V1_FILES: [&str; 3] = ["cpu.cfs_quota_us", "cpu.cfs_period_us", "tasks"];

    #[test]
    fn v1_is_used_when_v2_has_no_cpu_controller() {
        let fake = Fake::new("v1");
        fake.file("sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
        fake.file("sys/fs/cgroup/cpu/tasks", "");
        // A crashed run left the cgroup: reused, not an error. (On a real cgroupfs
        // mkdir makes these files.)
        for f in V1_FILES {
            fake.file(&format!("sys/fs/cgroup/cpu/vmm-t-vcpus/{f}"), "");
        }
        let q = CpuQuota::probe(&fake.roots(MOUNTINFO, PROC_CGROUP), "vmm-t-vcpus", 2);
        assert_eq!(q.mode(), Mode::V1, "{}", q.reason());
        assert!(q.reason().contains("no cpu controller"), "{}", q.reason());
        assert!(q.reason().contains("hugetlb"), "{}", q.reason());

        q.set_quota(0.25, &[0, 101, 102]).unwrap();
        let dir = "sys/fs/cgroup/cpu/vmm-t-vcpus";
        assert_eq!(fake.read(&format!("{dir}/tasks")), "101\n102\n");
        assert_eq!(
            last_line(&fake.read(&format!("{dir}/cpu.cfs_quota_us"))),
            "25000"
        );
        assert_eq!(
            last_line(&fake.read(&format!("{dir}/cpu.cfs_period_us"))),
            "100000"
        );
        assert_eq!(q.status().cores, Some(0.25));

        q.set_quota(2.0, &[101, 102]).unwrap();
        assert_eq!(
            last_line(&fake.read(&format!("{dir}/cpu.cfs_quota_us"))),
            "-1"
        );
        assert_eq!(
            fake.read(&format!("{dir}/tasks")),
            "101\n102\n",
            "no second move"
        );
        assert_eq!(q.status().cores, None);
        assert!(matches!(
            q.set_quota(0.001, &[]),
            Err(CpuQuotaError::BadQuota(_))
        ));
        assert!(matches!(
            q.set_quota(f64::NAN, &[]),
            Err(CpuQuotaError::BadQuota(_))
        ));

        // The threads go back to our cgroup; rmdir fails on a plain directory with files,
        // which is only logged.
        q.release();
        assert_eq!(fake.read("sys/fs/cgroup/cpu/tasks"), "101\n102\n");
        assert!(matches!(
            q.set_quota(1.0, &[]),
            Err(CpuQuotaError::Released(_))
        ));
    }

    #[test]
    fn v2_is_preferred_when_it_has_a_cpu_controller() {
        let fake = Fake::new("v2");
        let mountinfo = "24 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let base = "sys/fs/cgroup/user.slice/vm.scope";
        fake.file(
            &format!("{base}/cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        fake.file(&format!("{base}/cgroup.subtree_control"), "");
        fake.file(&format!("{base}/cgroup.threads"), "");
        for (f, text) in [
            ("cgroup.type", "domain\n"),
            ("cpu.max", ""),
            ("cgroup.threads", ""),
        ] {
            fake.file(&format!("{base}/vmm-t-vcpus/{f}"), text);
        }
        let roots = fake.roots(mountinfo, "0::/user.slice/vm.scope\n");
        let q = CpuQuota::probe(&roots, "vmm-t-vcpus", 4);
        assert_eq!(q.mode(), Mode::V2, "{}", q.reason());
        assert_eq!(
            fake.read(&format!("{base}/vmm-t-vcpus/cgroup.type")),
            "threaded",
            "a plain file is overwritten from its start"
        );
        assert_eq!(fake.read(&format!("{base}/cgroup.subtree_control")), "+cpu");
        q.set_quota(1.5, &[7]).unwrap();
        assert_eq!(
            fake.read(&format!("{base}/vmm-t-vcpus/cpu.max")),
            "150000 100000\n"
        );
        assert_eq!(
            fake.read(&format!("{base}/vmm-t-vcpus/cgroup.threads")),
            "7\n"
        );
        q.set_quota(4.0, &[7]).unwrap();
        assert_eq!(
            last_line(&fake.read(&format!("{base}/vmm-t-vcpus/cpu.max"))),
            "max 100000"
        );
        assert!(q.status().path.unwrap().ends_with("vm.scope/vmm-t-vcpus"));
    }

    #[test]
    fn a_v2_child_that_cannot_be_set_up_is_removed_and_reported() {
        let fake = Fake::new("v2fail");
        let mountinfo = "24 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        fake.file("sys/fs/cgroup/cgroup.controllers", "cpu\n");
        // mkdir on a plain directory makes no cgroup.type: set-up fails, the new
        // directory is removed again.
        let q = CpuQuota::probe(&fake.roots(mountinfo, "0::/\n"), "vmm-t-vcpus", 2);
        assert_eq!(q.mode(), Mode::None);
        assert!(q.reason().contains("cgroup.type"), "{}", q.reason());
        assert!(
            q.reason().contains("cgroup v1: no cpu hierarchy"),
            "{}",
            q.reason()
        );
        assert!(!fake.0.join("sys/fs/cgroup/vmm-t-vcpus").exists());
        let err = q.set_quota(1.0, &[1]).unwrap_err();
        assert!(matches!(err, CpuQuotaError::Unavailable(_)), "{err}");
        assert_eq!(q.status().mode.as_str(), "none");
    }

    #[test]
    fn a_read_only_or_missing_hierarchy_gives_none_with_a_reason() {
        let fake = Fake::new("none");
        let ro = "32 31 0:29 / /sys/fs/cgroup/cpu ro,relatime - cgroup cgroup rw,cpu\n";
        let q = CpuQuota::probe(&fake.roots(ro, "1:cpu:/\n"), "vmm-t-vcpus", 2);
        assert_eq!(q.mode(), Mode::None);
        assert!(q.reason().contains("not mounted rw"), "{}", q.reason());
        assert!(q.reason().contains("no v2 hierarchy"), "{}", q.reason());

        let q = CpuQuota::probe(&fake.roots("", "1:cpu:/\n"), "vmm-t-vcpus", 2);
        assert!(
            q.reason().contains("cpu hierarchy is not mounted"),
            "{}",
            q.reason()
        );

        let roots = ProbeRoots {
            mountinfo: fake.0.join("missing"),
            ..ProbeRoots::host()
        };
        let q = CpuQuota::probe(&roots, "vmm-t-vcpus", 2);
        assert_eq!(q.mode(), Mode::None);
        assert!(q.reason().contains("missing"), "{}", q.reason());
    }

    #[test]
    fn stale_cgroups_of_dead_processes_are_swept() {
        let fake = Fake::new("sweep");
        let parent = fake.0.join("cg");
        // pid 0x7fff_fff0 does not exist; our own pid does.
        let dead = parent.join("vmm-2147483632-vcpus");
        let live = parent.join(format!("vmm-{}-vcpus", std::process::id()));
        let other = parent.join("something-else");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        sweep_stale(&parent, "vmm-t-vcpus");
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("trail\\04"), "trail\\04");
        assert_eq!(unescape("\\"), "\\");
    }
}
