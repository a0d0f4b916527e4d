//! Checking a host configuration before anything starts: every VM's own configuration,
//! then what only the host can see (ids, sockets, images and outputs shared between
//! VMs, a budget larger than the host, targets the budget cannot meet). Each problem is
//! a [`ConfigError`] naming the VM and the field (`vms.web.vm.api_sock`), so `vmm host`
//! prints one line and exits with status 2 before starting any VM.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::config::{parse_cpu_list, HostConfig, MAX_VMS};
use crate::config::{ConfigError, VmConfig};
use tuner::slo::{Slo, SloClass};

/// Smallest guest request, bytes: the default size of one operation for the bandwidth
/// check of the SLO's `min_ops`.
const MIN_OP_BYTES: u64 = 512;

/// What the host runs: the configuration checked and resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The budget's CPUs.
    pub cpus: Vec<usize>,
    /// The budgeted devices.
    pub devices: Vec<PlannedDevice>,
    /// The VMs, in configuration order.
    pub vms: Vec<PlannedVm>,
    /// How the arbiter grants.
    pub mode: super::arbiter::ArbiterMode,
}

/// A budgeted backing device.
#[derive(Debug, Clone)]
pub struct PlannedDevice {
    /// The path that named it.
    pub path: PathBuf,
    /// Its device number (`st_dev`).
    pub dev: u64,
    /// Bytes per second shared by its drives.
    pub bandwidth_bps: u64,
}

/// One VM, checked.
#[derive(Debug, Clone)]
pub struct PlannedVm {
    /// Its id.
    pub id: String,
    /// Its class (its configuration's `slo.class`).
    pub class: SloClass,
    /// Its service level objective, as its configuration states it.
    pub slo: Slo,
    /// Bytes per guest operation for the bandwidth check (host.json `op_bytes`).
    pub op_bytes: Option<u64>,
    /// Fewest cores it is granted.
    pub min_cores: f64,
    /// Its `vmm run` configuration, parsed.
    pub config: VmConfig,
    /// The same as written in host.json (handed to the child as its `--config`).
    pub raw: serde_json::Value,
    /// Its drives: (drive id, index into [`Plan::devices`] of its budgeted device).
    pub drives: Vec<(String, Option<usize>)>,
}

fn err(field: String, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

/// `path` made absolute against the current directory, `.` and `..` resolved in its
/// parent where the parent exists (for comparing paths that need not exist yet).
fn comparable(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    if let Ok(c) = std::fs::canonicalize(&abs) {
        return c;
    }
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(f)) => std::fs::canonicalize(p)
            .map(|p| p.join(f))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && id != "."
        && id != ".."
}

/// Remembers who uses a path (or address) first, and names both on the second use.
#[derive(Default)]
struct Owners(HashMap<PathBuf, String>);

impl Owners {
    fn claim(&mut self, key: PathBuf, owner: &str, field: String) -> Result<(), ConfigError> {
        if let Some(first) = self.0.get(&key) {
            return Err(err(
                field,
                format!("{} is already used by {first}", key.display()),
            ));
        }
        self.0.insert(key, owner.to_string());
        Ok(())
    }
}

/// Checks `cfg` against the host: `allowed` are the CPUs this process may use
/// (`sched_getaffinity`), `max_vcpus` KVM's limit, `host_mem_mib` the host's memory.
pub fn validate(
    cfg: &HostConfig,
    allowed: &[usize],
    max_vcpus: u32,
    host_mem_mib: u64,
) -> Result<Plan, ConfigError> {
    if cfg.vms.is_empty() {
        return Err(err("vms".into(), "no VM to run"));
    }
    if cfg.vms.len() > MAX_VMS {
        return Err(err(
            "vms".into(),
            format!("{} VMs exceed the limit of {MAX_VMS}", cfg.vms.len()),
        ));
    }
    if !(100..=60_000).contains(&cfg.interval_ms) {
        return Err(err(
            "interval_ms".into(),
            format!("{} is outside 100..=60000", cfg.interval_ms),
        ));
    }
    if !(100..=600_000).contains(&cfg.stop_timeout_ms) {
        return Err(err(
            "stop_timeout_ms".into(),
            format!("{} is outside 100..=600000", cfg.stop_timeout_ms),
        ));
    }
    let mode = match &cfg.arbiter {
        None => super::arbiter::ArbiterMode::default(),
        Some(name) => super::arbiter::ArbiterMode::parse(name).ok_or_else(|| {
            err(
                "arbiter".into(),
                format!(
                    "{:?} is not an arbiter mode (slo, threshold, pi or off)",
                    name.chars().take(32).collect::<String>()
                ),
            )
        })?,
    };
    let cpus = match &cfg.cpus {
        Some(text) => parse_cpu_list(text).map_err(|e| err("cpus".into(), e))?,
        None => allowed.to_vec(),
    };
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(err(
            "cpus".into(),
            format!(
                "the budget {} names CPU {c}, which this host does not allow this process \
                 (allowed: {allowed:?}, from sched_getaffinity): the budget is larger than the host",
                cfg.cpus.as_deref().unwrap_or_default()
            ),
        ));
    }
    let budget = cpus.len() as f64;
    let mut owners = Owners::default();
    let dir_missing = |p: &Path| comparable(p).parent().is_some_and(|d| !d.is_dir());
    if dir_missing(&cfg.api_sock) {
        return Err(err(
            "api_sock".into(),
            format!("the directory of {} does not exist", cfg.api_sock.display()),
        ));
    }
    owners.claim(
        comparable(&cfg.api_sock),
        "the host's api_sock",
        "api_sock".into(),
    )?;
    if let Some(db) = cfg.state_db.as_ref().and_then(|l| l.sqlite_path()) {
        if dir_missing(db) {
            return Err(err(
                "state_db".into(),
                format!("the directory of {} does not exist", db.display()),
            ));
        }
    }
    if let Some(dir) = &cfg.log_dir {
        if !dir.is_dir() {
            return Err(err(
                "log_dir".into(),
                format!("{} is not a directory", dir.display()),
            ));
        }
    }
    let mut devices: Vec<PlannedDevice> = Vec::new();
    for (i, d) in cfg.devices.iter().enumerate() {
        let field = format!("devices[{i}]");
        let meta = std::fs::metadata(&d.path).map_err(|e| {
            err(
                format!("{field}.path"),
                format!("{}: {e}", d.path.display()),
            )
        })?;
        if d.bandwidth_bps == 0 {
            return Err(err(
                format!("{field}.bandwidth_bps"),
                "must be at least 1 byte per second",
            ));
        }
        if let Some(other) = devices.iter().find(|o| o.dev == meta.dev()) {
            return Err(err(
                format!("{field}.path"),
                format!(
                    "{} is on the same device as {} (one budget per device)",
                    d.path.display(),
                    other.path.display()
                ),
            ));
        }
        devices.push(PlannedDevice {
            path: d.path.clone(),
            dev: meta.dev(),
            bandwidth_bps: d.bandwidth_bps,
        });
    }

    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut vms = Vec::new();
    let mut mem_total: u64 = 0;
    let mut min_cores_total = 0.0;
    for (i, entry) in cfg.vms.iter().enumerate() {
        if !id_ok(&entry.id) {
            return Err(err(
                format!("vms[{i}].id"),
                format!("{:?} must be 1-64 of [A-Za-z0-9_.-]", entry.id),
            ));
        }
        if let Some(first) = ids.insert(&entry.id, i) {
            return Err(err(
                format!("vms[{i}].id"),
                format!("{:?} is also the id of vms[{first}]", entry.id),
            ));
        }
        let at = |f: &str| format!("vms.{}.{f}", entry.id);
        let config: VmConfig = serde_json::from_value(entry.vm.clone())
            .map_err(|e| err(at("vm"), format!("not a `vmm run` configuration: {e}")))?;
        config
            .validate(max_vcpus, host_mem_mib)
            .map_err(|e| err(at(&format!("vm.{}", e.field)), e.problem))?;
        if entry.vm.get("vm_id").is_some() && config.vm_id != entry.id {
            return Err(err(
                at("vm.vm_id"),
                format!(
                    "{:?} differs from the VM's id {:?} (leave it out: the host sets it)",
                    config.vm_id, entry.id
                ),
            ));
        }
        if let (Some(own), Some(host)) = (&config.state_db, &cfg.state_db) {
            let same = match (own.sqlite_path(), host.sqlite_path()) {
                (Some(a), Some(b)) => comparable(a) == comparable(b),
                _ => own == host,
            };
            if !same {
                return Err(err(
                    at("vm.state_db"),
                    format!(
                        "{} is not the host's state_db {}: every VM writes to the one repository",
                        own, host
                    ),
                ));
            }
        }
        if let Some(sock) = &config.api_sock {
            if dir_missing(sock) {
                return Err(err(
                    at("vm.api_sock"),
                    format!("the directory of {} does not exist", sock.display()),
                ));
            }
            owners.claim(
                comparable(sock),
                &format!("VM {}", entry.id),
                at("vm.api_sock"),
            )?;
        }
        if let Some(out) = &config.serial_out {
            owners.claim(
                comparable(out),
                &format!("VM {}", entry.id),
                at("vm.serial_out"),
            )?;
        }
        if let Some(addr) = &config.metrics_addr {
            owners.claim(
                PathBuf::from(format!("metrics address {addr}")),
                &format!("VM {}", entry.id),
                at("vm.metrics_addr"),
            )?;
        }
        let mut drives = Vec::new();
        for (j, d) in config.drives.iter().enumerate() {
            let field = at(&format!("vm.drives[{j}].path"));
            let real = std::fs::canonicalize(&d.path)
                .map_err(|e| err(field.clone(), format!("{}: {e}", d.path.display())))?;
            owners.claim(real.clone(), &format!("VM {}", entry.id), field)?;
            let dev = std::fs::metadata(&real).map(|m| m.dev()).ok();
            let device = devices.iter().position(|b| Some(b.dev) == dev);
            drives.push((config.drive_id(j), device));
        }
        mem_total = mem_total.saturating_add(config.mem_mib);
        let min_cores = entry.min_cores();
        if !min_cores.is_finite() || min_cores < crate::grant::MIN_GRANT_CORES {
            return Err(err(
                at("min_cores"),
                format!(
                    "{min_cores} is below {} host cores",
                    crate::grant::MIN_GRANT_CORES
                ),
            ));
        }
        if min_cores > budget {
            return Err(err(
                at("min_cores"),
                format!("{min_cores} is more than the budget's {budget} cores"),
            ));
        }
        min_cores_total += min_cores;
        let slo = config.slo.ok_or_else(|| {
            err(
                at("vm.slo"),
                "a VM under a host needs an SLO, at least its class \
                 ({\"class\": \"critical\"|\"standard\"|\"batch\"})",
            )
        })?;
        check_slo(&at, &slo, entry.op_bytes, &config, &drives, &devices)?;
        vms.push(PlannedVm {
            id: entry.id.clone(),
            class: slo.class,
            slo,
            op_bytes: entry.op_bytes,
            min_cores,
            config,
            raw: entry.vm.clone(),
            drives,
        });
    }
    if min_cores_total > budget + 1e-9 {
        return Err(err(
            "vms".into(),
            format!(
                "the VMs' min_cores add up to {min_cores_total:.2} cores, more than the \
                 budget's {budget} (cpus)"
            ),
        ));
    }
    if mem_total > host_mem_mib {
        return Err(err(
            "vms".into(),
            format!("the VMs' mem_mib add up to {mem_total} MiB, more than the host's {host_mem_mib} MiB"),
        ));
    }
    Ok(Plan {
        cpus,
        devices,
        vms,
        mode,
    })
}

/// Targets that cannot be met whatever the arbiter does: a minimum operation rate above
/// what the VM's own drive limits, or the bandwidth budget of its drives' devices, let
/// through.
fn check_slo(
    at: &dyn Fn(&str) -> String,
    slo: &Slo,
    op_bytes: Option<u64>,
    config: &VmConfig,
    drives: &[(String, Option<usize>)],
    devices: &[PlannedDevice],
) -> Result<(), ConfigError> {
    if op_bytes == Some(0) {
        return Err(err(at("op_bytes"), "must be at least 1 byte"));
    }
    // The VM's own configuration check has refused a zero, negative or huge rate.
    let Some(min_ops) = slo.min_ops else {
        return Ok(());
    };
    if config.drives.is_empty() {
        return Ok(());
    }
    // The drives' own operation limits, when every drive has one.
    let mut ops_cap: Option<f64> = Some(0.0);
    for d in &config.drives {
        let rate = d
            .start_limits()
            .ok()
            .flatten()
            .and_then(|l| l.ops)
            .filter(|b| b.size > 0)
            .map(|b| b.size as f64 * 1000.0 / b.refill_time_ms.max(1) as f64);
        ops_cap = match (ops_cap, rate) {
            (Some(sum), Some(r)) => Some(sum + r),
            _ => None,
        };
    }
    if let Some(cap) = ops_cap {
        if min_ops > cap {
            return Err(err(
                at("vm.slo.min_ops"),
                format!(
                    "{min_ops} ops/s is above the {cap:.0} ops/s the VM's own drive limits allow"
                ),
            ));
        }
    }
    // The bandwidth budgets of the devices its drives are on, when every drive is on a
    // budgeted device.
    let mut seen = Vec::new();
    let mut bw_cap: Option<u64> = Some(0);
    for (_, device) in drives {
        bw_cap = match (bw_cap, device) {
            (Some(sum), Some(i)) if seen.contains(i) => Some(sum),
            (Some(sum), Some(i)) => {
                seen.push(*i);
                devices.get(*i).map(|d| sum.saturating_add(d.bandwidth_bps))
            }
            _ => None,
        };
    }
    if let Some(bw) = bw_cap {
        let op_bytes = op_bytes.unwrap_or(MIN_OP_BYTES);
        let need = (min_ops * op_bytes as f64).ceil() as u64;
        if need > bw {
            return Err(err(
                at("vm.slo.min_ops"),
                format!(
                    "{min_ops} ops/s of {op_bytes} bytes need {need} bytes/s, more than the \
                     {bw} bytes/s bandwidth budget of the VM's drives' device(s) allows"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d =
            std::env::temp_dir().join(format!("vmm-host-validate-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A host.json with `vms` (JSON array text) in `dir`, a kernel file and two images.
    fn host(dir: &Path, extra: &str, vms: &str) -> HostConfig {
        let mut elf = vec![0u8; 64];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[18] = 62;
        std::fs::write(dir.join("k"), elf).unwrap();
        for img in ["a.img", "b.img"] {
            std::fs::write(dir.join(img), vec![0u8; 4096]).unwrap();
        }
        let text = format!(
            r#"{{"api_sock": "{d}/h.sock", {extra} "vms": {vms}}}"#,
            d = dir.display()
        )
        .replace("DIR", &dir.display().to_string());
        HostConfig::from_json(&text).unwrap()
    }

    fn check(cfg: &HostConfig) -> Result<Plan, ConfigError> {
        validate(cfg, &[0, 1], 255, 1 << 20)
    }

    #[test]
    fn a_good_host_is_planned() {
        let d = scratch("good");
        let cfg = host(
            &d.0,
            r#""cpus": "0-1", "devices": [{"path": "DIR", "bandwidth_bps": 10000000}],"#,
            r#"[{"id": "web",
                 "vm": {"kernel": "DIR/k", "slo": {"class": "critical", "min_ops": 1000}, "drives": [{"path": "DIR/a.img"}]}},
                {"id": "batch", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
        );
        let plan = check(&cfg).unwrap();
        assert_eq!(plan.cpus, vec![0, 1]);
        assert_eq!(plan.vms.len(), 2);
        assert_eq!(plan.vms[0].drives, vec![("blk0".to_string(), Some(0))]);
        assert_eq!(plan.mode, super::super::arbiter::ArbiterMode::Slo);
        for (name, mode) in [
            ("off", super::super::arbiter::ArbiterMode::Off),
            ("pi", super::super::arbiter::ArbiterMode::Pi),
            ("threshold", super::super::arbiter::ArbiterMode::Threshold),
        ] {
            let mut c = cfg.clone();
            c.arbiter = Some(name.into());
            assert_eq!(check(&c).unwrap().mode, mode);
        }
    }

    #[test]
    fn each_bad_host_names_the_vm_and_field() {
        let d = scratch("bad");
        let cases: &[(&str, &str, &str)] = &[
            // An arbiter mode that does not exist.
            (
                r#""arbiter": "greedy","#,
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "arbiter",
            ),
            // A budget larger than the host.
            (
                r#""cpus": "0-3","#,
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "cpus",
            ),
            // Duplicate ids.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}},
                    {"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "vms[1].id",
            ),
            // Two VMs on one socket path.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "api_sock": "DIR/s"}},
                    {"id": "b", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "api_sock": "DIR/./s"}}]"#,
                "vms.b.vm.api_sock",
            ),
            // A VM on the host's socket.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "api_sock": "DIR/h.sock"}}]"#,
                "vms.a.vm.api_sock",
            ),
            // Two VMs on one image.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "drives": [{"path": "DIR/a.img"}]}},
                    {"id": "b", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "drives": [{"path": "DIR/b.img"}, {"path": "DIR/a.img"}]}}]"#,
                "vms.b.vm.drives[1].path",
            ),
            // A target the bandwidth budget cannot meet.
            (
                r#""devices": [{"path": "DIR", "bandwidth_bps": 1000000}],"#,
                r#"[{"id": "a", "op_bytes": 4096,
                     "vm": {"kernel": "DIR/k", "slo": {"class": "critical", "min_ops": 1000}, "drives": [{"path": "DIR/a.img"}]}}]"#,
                "vms.a.vm.slo.min_ops",
            ),
            // A target the VM's own drive limit cannot meet.
            (
                "",
                r#"[{"id": "a", 
                     "vm": {"kernel": "DIR/k", "slo": {"class": "critical", "min_ops": 1000}, "drives": [{"path": "DIR/a.img", "rate_limiter": {"ops": {"size": 10, "refill_time_ms": 100}}}]}}]"#,
                "vms.a.vm.slo.min_ops",
            ),
            // Floors above the budget.
            (
                r#""cpus": "0","#,
                r#"[{"id": "a", "min_cores": 0.75, "vm": {"kernel": "DIR/k", "slo": {"class": "critical"}}},
                    {"id": "b", "min_cores": 0.5, "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "vms",
            ),
            // The VM's own configuration, checked as `vmm run` would.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "vcpus": 0}}]"#,
                "vms.a.vm.vcpus",
            ),
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "vm_id": "other"}}]"#,
                "vms.a.vm.vm_id",
            ),
            (
                r#""state_db": "DIR/host.db","#,
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "state_db": "DIR/own.db"}}]"#,
                "vms.a.vm.state_db",
            ),
            (
                "",
                r#"[{"id": "a/b", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "vms[0].id",
            ),
            ("", "[]", "vms"),
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}, "api_sock": "DIR/nodir/s"}}]"#,
                "vms.a.vm.api_sock",
            ),
            // No SLO: the host cannot rank the VM.
            (
                "",
                r#"[{"id": "a", "vm": {"kernel": "DIR/k"}}]"#,
                "vms.a.vm.slo",
            ),
            // The bandwidth check's unit.
            (
                "",
                r#"[{"id": "a", "op_bytes": 0, "vm": {"kernel": "DIR/k", "slo": {"class": "batch"}}}]"#,
                "vms.a.op_bytes",
            ),
        ];
        for (extra, vms, field) in cases {
            let cfg = host(&d.0, extra, vms);
            let e = check(&cfg).expect_err(vms);
            assert_eq!(e.field, *field, "{vms}: {e}");
        }
    }
}
