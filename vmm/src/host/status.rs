//! What the host knows of each VM (one table, shared by the supervisor, the arbiter and
//! the host API): its process, its grant, its latest observation and SLO attainment.
//! `GET /host` is this table as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use tuner::slo::{Slo, SloClass};

/// A VM's process state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet.
    Starting,
    /// Its `vmm run` process runs.
    Running,
    /// It ended: exit status, or the signal that killed it.
    Exited {
        /// Exit status when it exited.
        code: Option<i32>,
        /// Signal when a signal killed it.
        signal: Option<i32>,
    },
}

/// A grant as the arbiter decided it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrantView {
    /// Host cores of CPU time.
    pub cores: f64,
    /// Per drive id, bytes per second (drives on budgeted devices only).
    pub drive_bps: BTreeMap<String, u64>,
    /// The CPUs all the VM's threads are placed on (`None`: the whole budget, time only).
    pub cpus: Option<Vec<usize>>,
    /// The weight of the VM's threads against what else runs on its CPUs.
    pub weight: Option<u32>,
}

/// SLO attainment so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SloState {
    /// The VM has no targets.
    NoTargets,
    /// Not measured yet (no interval observed, or the VM does not report what is needed).
    Unknown,
    /// The last interval met every target.
    Met,
    /// The last interval missed a target.
    Missed,
}

impl SloState {
    fn as_str(self) -> &'static str {
        match self {
            SloState::NoTargets => "no targets",
            SloState::Unknown => "unknown",
            SloState::Met => "met",
            SloState::Missed => "missed",
        }
    }
}

/// One VM's row.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// Its id.
    pub id: String,
    /// Its class.
    pub class: SloClass,
    /// Its service level objective (its configuration's `slo`).
    pub slo: Slo,
    /// Its vCPUs (the most cores it can use).
    pub vcpus: u32,
    /// Its process id once started.
    pub pid: Option<u32>,
    /// Its process state.
    pub state: RunState,
    /// Its control socket.
    pub api_sock: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// The grant in force (last pushed and accepted).
    pub grant: Option<GrantView>,
    /// Why the last push of a grant failed.
    pub grant_error: Option<String>,
    /// Host cores its vCPUs used in the last interval.
    pub used_cores: Option<f64>,
    /// Guest operations per second in the last interval.
    pub ops_per_sec: Option<f64>,
    /// Mean guest-reported latency in the last interval, microseconds.
    pub mean_latency_us: Option<f64>,
    /// The SLO of the last interval.
    pub slo_state: SloState,
    /// Intervals judged against the targets.
    pub intervals: u64,
    /// Of those, the ones that met every target.
    pub intervals_met: u64,
    /// The VM's own SLO report (`GET /vm`'s `slo`), when it gives one.
    pub reported: Option<Value>,
}

impl VmStatus {
    /// Share of the judged intervals that met every target.
    pub fn attainment(&self) -> Option<f64> {
        (self.intervals > 0).then(|| self.intervals_met as f64 / self.intervals as f64)
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.state == RunState::Running
    }

    fn to_json(&self) -> Value {
        let (state, code, signal) = match self.state {
            RunState::Starting => ("starting", None, None),
            RunState::Running => ("running", None, None),
            RunState::Exited { code, signal } => ("exited", code, signal),
        };
        let grant = self.grant.as_ref().map(|g| {
            let drives: serde_json::Map<String, Value> = g
                .drive_bps
                .iter()
                .map(|(id, b)| (id.clone(), json!({"bandwidth_bps": b})))
                .collect();
            json!({"cores": g.cores, "drives": drives, "cpus": g.cpus, "weight": g.weight})
        });
        json!({
            "id": self.id,
            "class": self.class.name(),
            "slo": self.slo,
            "vcpus": self.vcpus,
            "pid": self.pid,
            "state": state,
            "exit_status": code,
            "signal": signal,
            "api_sock": self.api_sock.display().to_string(),
            "log": self.log.display().to_string(),
            "grant": grant,
            "grant_error": self.grant_error,
            "used_cores": self.used_cores,
            "ops_per_sec": self.ops_per_sec,
            "mean_latency_us": self.mean_latency_us,
            "slo_state": self.slo_state.as_str(),
            "attainment": self.attainment(),
            "intervals": self.intervals,
            "reported_slo": self.reported,
        })
    }
}

/// The host's budget as `GET /host` shows it.
#[derive(Debug, Clone)]
pub struct BudgetView {
    /// The budget's CPUs.
    pub cpus: Vec<usize>,
    /// (path, bytes per second) of each budgeted device.
    pub devices: Vec<(PathBuf, u64)>,
}

/// The table: the budget and every VM.
#[derive(Debug, Clone)]
pub struct HostStatus {
    /// The budget.
    pub budget: BudgetView,
    /// The arbiter's interval.
    pub interval_ms: u64,
    /// The arbiter's mode (`slo`, `threshold`, `pi`, `off`).
    pub arbiter: &'static str,
    /// The VMs, in configuration order.
    pub vms: Vec<VmStatus>,
}

impl HostStatus {
    /// `GET /host`'s body.
    pub fn to_json(&self) -> Value {
        let granted: f64 = self
            .vms
            .iter()
            .filter(|v| v.running())
            .filter_map(|v| v.grant.as_ref().map(|g| g.cores))
            .sum();
        json!({
            "budget": {
                "cpus": self.budget.cpus,
                "cores": self.budget.cpus.len(),
                "devices": self.budget.devices.iter()
                    .map(|(p, b)| json!({"path": p.display().to_string(), "bandwidth_bps": b}))
                    .collect::<Vec<_>>(),
            },
            "interval_ms": self.interval_ms,
            "arbiter": self.arbiter,
            "granted_cores": granted,
            "vms": self.vms.iter().map(VmStatus::to_json).collect::<Vec<_>>(),
        })
    }
}

/// The table shared between the host's threads.
pub type SharedStatus = Arc<Mutex<HostStatus>>;
