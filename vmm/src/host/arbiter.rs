//! The arbiter: owns the host's budget (the cores of a cpuset, a bandwidth budget per
//! backing device) and, every interval, reads each running VM's `GET /vm`, judges its
//! SLO, decides every VM's grant and pushes it (`PUT /grant`). A VM's tuner can take
//! only what it is granted (the grant is a cap in the monitor and part of its action
//! mask).
//!
//! The decision ([`allocate`]) is pure: every VM first gets its floor; then the classes
//! are served in order, critical, standard, batch, each VM up to what it wants (what it
//! used last interval plus headroom, or everything it can use while its SLO is missed or
//! not yet known); what is left goes, in the same order, up to what each VM can use.
//! So when a critical VM's SLO is at risk, its larger want is taken from batch VMs
//! first, then from standard ones, never from another class above.
//!
//! Cores are placement as well as time ([`place`], mode `slo`): a critical VM gets whole
//! CPUs of its own, every thread of it (vCPUs and its event-loop I/O thread) pinned
//! there; the other VMs share the rest under CPU quotas. A quota alone limits time, not
//! placement: under it a batch VM's threads ran on the critical VM's core and the
//! arbiter lost to a static `taskset` partition (BENCHMARKS section 11). The I/O thread
//! counts: a VM's cap is its vCPUs plus one core.
//!
//! The baselines run under the same host as other modes ([`ArbiterMode`]): a threshold
//! autoscaler per VM, a PI controller on the critical VM's SLO margin, and no grants.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::status::{GrantView, SharedStatus, SloState};
use super::validate::Plan;
use devices::lock;
use tuner::slo::{Slo, SloClass};

/// Headroom over the last interval's use in what a VM wants (cores and bandwidth).
const HEADROOM: f64 = 1.25;
/// Added to the last interval's use of cores in what a VM wants.
const CORE_SLACK: f64 = 0.1;
/// Grants are whole multiples of 1/this of a core (rounded down, so they never exceed
/// the budget).
const CORE_STEPS: f64 = 100.0;
/// Cores a VM may use beyond its vCPUs: its event-loop (I/O) thread.
const IO_THREAD_CORES: f64 = 1.0;
/// A critical VM at risk gets one more CPU only when it uses this share of those it holds.
const GROW_USE: f64 = 0.85;
/// Intervals in a row a critical VM meets its SLO before its CPUs may shrink (`slo`).
const SHRINK_AFTER: u32 = 6;
/// Threshold autoscaler: grow above this utilisation of the grant, shrink below the low
/// mark (Kubernetes' horizontal autoscaler targets 80%).
const THRESHOLD_HIGH: f64 = 0.8;
/// Threshold autoscaler's low mark.
const THRESHOLD_LOW: f64 = 0.5;
/// Threshold autoscaler: a grant grows by this factor at least.
const THRESHOLD_GROW: f64 = 1.5;
/// PI controller: the SLO margin it holds the critical VM at (10% to spare).
const PI_SETPOINT: f64 = 0.1;
/// PI controller: proportional gain, cores per unit of margin.
const PI_KP: f64 = 0.5;
/// PI controller: integral gain, cores per unit of margin per interval.
const PI_KI: f64 = 0.3;

/// How the arbiter grants (`arbiter` in host.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArbiterMode {
    /// By class and SLO, with placement: whole CPUs of its own for a critical VM.
    #[default]
    Slo,
    /// Baseline: a threshold autoscaler per VM (used x headroom, no SLO, no class, no
    /// placement).
    Threshold,
    /// Baseline: a PI controller on each critical VM's SLO margin moves cores of time
    /// (no placement) between it and the others.
    Pi,
    /// Baseline: no grants (every VM at its maximum, Linux's scheduler).
    Off,
}

impl ArbiterMode {
    /// The mode named `name` in host.json.
    pub fn parse(name: &str) -> Option<ArbiterMode> {
        match name {
            "slo" => Some(ArbiterMode::Slo),
            "threshold" => Some(ArbiterMode::Threshold),
            "pi" => Some(ArbiterMode::Pi),
            "off" => Some(ArbiterMode::Off),
            _ => None,
        }
    }

    /// Its name in host.json and `GET /host`.
    pub fn name(self) -> &'static str {
        match self {
            ArbiterMode::Slo => "slo",
            ArbiterMode::Threshold => "threshold",
            ArbiterMode::Pi => "pi",
            ArbiterMode::Off => "off",
        }
    }
}

/// Errors talking to a VM's control socket.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The request did not reach the VM or its answer was not understood.
    #[error("{0}")]
    Api(#[from] api_client::ClientError),
    /// The VM refused.
    #[error("{method} {path}: status {status}: {error}")]
    Refused {
        /// The method.
        method: &'static str,
        /// The route.
        path: &'static str,
        /// HTTP status.
        status: u64,
        /// The VM's message.
        error: String,
    },
}

/// What one VM claims in one allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    /// Its class.
    pub class: SloClass,
    /// What it always gets.
    pub floor: f64,
    /// What it wants now (at least the floor).
    pub want: f64,
    /// The most it can use (at least the floor).
    pub cap: f64,
}

/// Raises each of `grants` toward `targets` by water-filling `left` among them (equal
/// shares, none above its target); returns what is left.
fn fill(grants: &mut [f64], targets: &[f64], members: &[usize], mut left: f64) -> f64 {
    let mut open: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| targets[i] > grants[i])
        .collect();
    // Each round closes at least one member or spends everything: at most n rounds.
    for _ in 0..=members.len() {
        if open.is_empty() || left <= 1e-12 {
            break;
        }
        let share = left / open.len() as f64;
        let mut still = Vec::new();
        for &i in &open {
            let give = (targets[i] - grants[i]).min(share);
            grants[i] += give;
            left -= give;
            if targets[i] - grants[i] > 1e-12 {
                still.push(i);
            }
        }
        open = still;
    }
    left.max(0.0)
}

/// Splits `budget` among `claims` (see the module's documentation). The grants add up
/// to at most `budget`; floors that add up to more are scaled down to fit.
pub fn allocate(budget: f64, claims: &[Claim]) -> Vec<f64> {
    let floors: f64 = claims.iter().map(|c| c.floor).sum();
    let scale = if floors > budget && floors > 0.0 {
        budget / floors
    } else {
        1.0
    };
    let mut grants: Vec<f64> = claims.iter().map(|c| c.floor * scale).collect();
    let mut left = (budget - grants.iter().sum::<f64>()).max(0.0);
    let classes = [SloClass::Critical, SloClass::Standard, SloClass::Batch];
    let wants: Vec<f64> = claims.iter().map(|c| c.want.min(c.cap)).collect();
    let caps: Vec<f64> = claims.iter().map(|c| c.cap).collect();
    for targets in [&wants, &caps] {
        for class in classes {
            let members: Vec<usize> = (0..claims.len())
                .filter(|&i| claims[i].class == class)
                .collect();
            left = fill(&mut grants, targets, &members, left);
        }
    }
    grants
}

/// What one VM claims in a placement ([`place`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuClaim {
    /// Its claim of time.
    pub claim: Claim,
    /// Its SLO is missed or not yet known: a critical VM at risk may take the CPU kept
    /// for the others (they fall to their floors, placed on all the budget).
    pub at_risk: bool,
}

/// One VM's placement: the CPUs its threads run on and its cores of time there.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Its CPUs.
    pub cpus: Vec<usize>,
    /// Its cores of CPU time (the quota).
    pub cores: f64,
    /// Whether the CPUs are its own (no other VM placed there).
    pub exclusive: bool,
}

/// Places `claims` on `cpus`: each critical VM, in order, gets `ceil(want)` whole CPUs of
/// its own (at least 1, at most its cap) from the top of the list, keeping one CPU for
/// the others unless it is at risk; everyone else (and a critical VM left without a
/// free CPU) shares the CPUs left, their time split by [`allocate`]. When nothing is
/// left, they share the whole list at their floors.
pub fn place(cpus: &[usize], claims: &[CpuClaim]) -> Vec<Placement> {
    let n = cpus.len();
    let others = claims.iter().any(|c| c.claim.class != SloClass::Critical);
    let mut taken = 0usize;
    let mut own = vec![0usize; claims.len()];
    for (i, c) in claims.iter().enumerate() {
        if c.claim.class != SloClass::Critical {
            continue;
        }
        let reserve = usize::from(others && !c.at_risk);
        let free = n.saturating_sub(taken + reserve);
        // Finite, non-negative (checked configuration values and measured rates).
        let cap = c.claim.cap.ceil().max(1.0) as usize;
        let k = ((c.claim.want - 1e-9).ceil().max(1.0) as usize)
            .min(cap)
            .min(free);
        own[i] = k;
        taken += k;
    }
    let pool: Vec<usize> = cpus[..n - taken].to_vec();
    let members: Vec<usize> = (0..claims.len()).filter(|&i| own[i] == 0).collect();
    // Nothing left for the others: they run at their floors on all the CPUs, and the
    // critical VMs' time shrinks by as much, so the grants still add up to the budget.
    let mut squeeze = 0.0;
    let (pool, shared): (Vec<usize>, Vec<f64>) = if pool.is_empty() {
        let floors: Vec<f64> = members.iter().map(|&i| claims[i].claim.floor).collect();
        squeeze = floors.iter().sum::<f64>() / taken.max(1) as f64;
        (cpus.to_vec(), floors)
    } else {
        let budget = pool.len() as f64;
        let sub: Vec<Claim> = members
            .iter()
            .map(|&i| {
                let c = claims[i].claim;
                Claim {
                    cap: c.cap.min(budget).max(c.floor),
                    ..c
                }
            })
            .collect();
        (pool, allocate(budget, &sub))
    };
    let mut out = Vec::with_capacity(claims.len());
    let mut top = n;
    for (i, k) in own.iter().enumerate() {
        if *k > 0 {
            out.push(Placement {
                cpus: cpus[top - k..top].to_vec(),
                cores: (*k as f64 * (1.0 - squeeze)).max(claims[i].claim.floor),
                exclusive: true,
            });
            top -= k;
        } else {
            let at = members.iter().position(|&m| m == i).unwrap_or(0);
            out.push(Placement {
                cpus: pool.clone(),
                cores: shared.get(at).copied().unwrap_or(claims[i].claim.floor),
                exclusive: false,
            });
        }
    }
    out
}

/// A class's factor on its VMs' CPU weight (mode `slo`): a critical VM's threads win
/// against whatever else runs on its CPUs (load from outside the budget included).
pub fn class_weight(class: SloClass) -> f64 {
    match class {
        SloClass::Critical => 4.0,
        SloClass::Standard => 2.0,
        SloClass::Batch => 1.0,
    }
}

/// The CPU weight of `cores` (cgroup v2 units: 100 per core, as Kubernetes turns a CPU
/// request into shares) times `factor`, within 1..=10000.
pub fn weight_of(cores: f64, factor: f64) -> u32 {
    (100.0 * cores * factor).round().clamp(1.0, 10_000.0) as u32
}

/// One step of the threshold autoscaler: the grant `g` of a VM that used `used` cores,
/// between `floor` and `cap`.
pub fn threshold_step(g: f64, used: f64, floor: f64, cap: f64) -> f64 {
    let u = used / g.max(1e-9);
    let next = if u > THRESHOLD_HIGH {
        (g * THRESHOLD_GROW).max(used * HEADROOM)
    } else if u < THRESHOLD_LOW {
        used * HEADROOM
    } else {
        g
    };
    next.clamp(floor, cap.max(floor))
}

/// One step of the PI controller (velocity form): the critical VM's cores `c` given its
/// SLO margin now and the last error; returns (cores, error), cores within [lo, hi].
pub fn pi_step(c: f64, margin: f64, last_error: f64, lo: f64, hi: f64) -> (f64, f64) {
    let e = PI_SETPOINT - margin;
    let next = c + PI_KP * (e - last_error) + PI_KI * e;
    (next.clamp(lo, hi.max(lo)), e)
}

/// The smallest margin over the targets of a VM's interval report (`None`: no report).
fn interval_margin(reported: Option<&Value>) -> Option<f64> {
    let targets = reported?.get("interval")?.get("targets")?.as_array()?;
    targets
        .iter()
        .filter_map(|t| t.get("margin").and_then(Value::as_f64))
        .filter(|m| m.is_finite())
        .reduce(f64::min)
}

/// Rounds core grants down to 1/[`CORE_STEPS`], never below the smallest grant a VM
/// takes.
fn round_cores(g: f64) -> f64 {
    ((g * CORE_STEPS + 1e-6).floor() / CORE_STEPS).max(crate::grant::MIN_GRANT_CORES)
}

/// One reading of a VM's `GET /vm`, the fields the arbiter uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The VM's uptime, ns.
    pub at_ns: u64,
    /// Guest time of all vCPUs, ns.
    pub guest_ns: u64,
    /// Guest-reported operations.
    pub ops: u64,
    /// Guest-reported latency sum, ns, and samples.
    pub latency: (u64, u64),
    /// Bytes moved per drive id.
    pub drive_bytes: BTreeMap<String, u64>,
    /// The VM's own SLO report, if it gives one (`slo` in `GET /vm`).
    pub slo: Option<Value>,
    /// CPU time of the VM's whole process, ns, as the host reads it (`/proc/<pid>/stat`:
    /// the vCPU threads' time in `KVM_RUN` counts only while they hold a core, unlike
    /// the guest time the VM reports).
    pub cpu_ns: Option<u64>,
}

impl Observation {
    /// Reads the fields out of `GET /vm`'s body; missing ones read as zero.
    pub fn from_vm(body: &Value) -> Observation {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let guest = &body["guest"];
        Observation {
            at_ns: u(&body["uptime_ns"]),
            guest_ns: body["vcpu_guest_ns"]
                .as_array()
                .map(|a| a.iter().map(u).fold(0u64, u64::saturating_add))
                .unwrap_or(0),
            ops: u(&guest["ops"]),
            latency: (u(&guest["latency_ns_sum"]), u(&guest["latency_samples"])),
            drive_bytes: body["drives"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| Some((d["id"].as_str()?.to_string(), u(&d["bytes"]))))
                        .collect()
                })
                .unwrap_or_default(),
            slo: body.get("slo").filter(|s| !s.is_null()).cloned(),
            cpu_ns: None,
        }
    }
}

/// CPU time (user + system) of process `pid` so far, ns, from `/proc/<pid>/stat`.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are the 12th and 13th after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some((utime + stime).saturating_mul(1_000_000_000) / hz)
}

/// Rates over one interval, from two observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    /// Host cores used by the VM's process (by its vCPUs' guest time when the host
    /// cannot read the process's CPU time).
    pub cores: f64,
    /// Guest operations per second.
    pub ops_per_sec: f64,
    /// Mean guest latency, us (`None`: no samples).
    pub mean_latency_us: Option<f64>,
    /// Bytes per second per drive.
    pub drive_bps: BTreeMap<String, f64>,
}

impl Rates {
    /// The rates between `before` and `now`; `None` if no time passed (or the VM
    /// restarted).
    pub fn between(before: &Observation, now: &Observation) -> Option<Rates> {
        let dt = now.at_ns.checked_sub(before.at_ns).filter(|d| *d > 0)? as f64;
        let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1e9 / dt;
        let samples = now.latency.1.saturating_sub(before.latency.1);
        let cpu_ns = match (before.cpu_ns, now.cpu_ns) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => now.guest_ns.saturating_sub(before.guest_ns),
        };
        Some(Rates {
            cores: cpu_ns as f64 / dt,
            ops_per_sec: per_sec(before.ops, now.ops),
            mean_latency_us: (samples > 0).then(|| {
                now.latency.0.saturating_sub(before.latency.0) as f64 / samples as f64 / 1000.0
            }),
            drive_bps: now
                .drive_bytes
                .iter()
                .map(|(id, b)| {
                    let a = before.drive_bytes.get(id).copied().unwrap_or(*b);
                    (id.clone(), per_sec(a, *b))
                })
                .collect(),
        })
    }
}

/// Judges one interval: the VM's own report in `GET /vm` (`slo.interval.met`, from its
/// per-request latency histograms and operation rate), the one judge of a VM's SLO.
pub fn judge(slo: &Slo, reported: Option<&Value>) -> SloState {
    if slo.p99_us.is_none() && slo.min_ops.is_none() {
        return SloState::NoTargets;
    }
    let met = reported
        .and_then(|r| r.get("interval"))
        .and_then(|i| i.get("met"))
        .and_then(Value::as_bool);
    match met {
        Some(true) => SloState::Met,
        Some(false) => SloState::Missed,
        // No interval sampled yet.
        None => SloState::Unknown,
    }
}

/// Sends one request to a VM's control socket; the answer's body on 200. The only
/// place the host uses the control API's client.
fn vm_api(
    sock: &Path,
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
) -> Result<Value, ArbiterError> {
    let mut req = json!({"method": method, "path": path});
    if let Some(b) = body {
        req["body"] = b;
    }
    let answer = api_client::call(sock, &req.to_string())?;
    match answer["status"].as_u64() {
        Some(200) => Ok(answer["body"].clone()),
        status => Err(ArbiterError::Refused {
            method,
            path,
            status: status.unwrap_or(0),
            error: answer["error"].as_str().unwrap_or("").to_string(),
        }),
    }
}

/// Pins every thread of process `pid` but its vCPU threads (named `vcpu<N>`; the VM
/// places those itself, within the grant) to `cpus`. Best effort: a thread that ends
/// meanwhile is skipped.
fn pin_helpers(pid: u32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
        // SAFETY: c < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    // A process has a bounded number of threads; read_dir ends.
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            continue;
        }
        // SAFETY: valid set and size; the thread belongs to a VM this host started.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
}

/// A running VM in one interval: its index in the table, id and control socket.
type Running = (usize, String, std::path::PathBuf);

/// The arbiter's memory between intervals.
pub struct Arbiter {
    plan: Plan,
    status: SharedStatus,
    last: HashMap<String, Observation>,
    pushed: HashMap<String, GrantView>,
    /// `slo`: each critical VM's own CPUs and how many intervals in a row it met its SLO.
    held: HashMap<usize, (usize, u32)>,
    /// `threshold`: each VM's grant.
    scaled: HashMap<usize, f64>,
    /// `pi`: each critical VM's cores and last error.
    pi: HashMap<usize, (f64, f64)>,
}

impl Arbiter {
    /// An arbiter of `plan`'s budget, writing into `status`.
    pub fn new(plan: Plan, status: SharedStatus) -> Self {
        Self {
            plan,
            status,
            last: HashMap::new(),
            pushed: HashMap::new(),
            held: HashMap::new(),
            scaled: HashMap::new(),
            pi: HashMap::new(),
        }
    }

    /// Runs intervals until `stop` is set (on its own thread: a VM slow to answer delays
    /// the arbiter, never the supervisor's signal handling).
    pub fn run(mut self, interval: Duration, stop: Arc<AtomicBool>) {
        let mut next = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            next = now + interval;
            self.interval();
        }
    }

    /// One interval: observe, judge, decide, push.
    pub fn interval(&mut self) {
        let (running, pids): (Vec<Running>, Vec<Option<u32>>) = {
            let st = lock(&self.status);
            st.vms
                .iter()
                .enumerate()
                .filter(|(_, v)| v.running())
                .map(|(i, v)| ((i, v.id.clone(), v.api_sock.clone()), v.pid))
                .unzip()
        };
        // Observe (outside the lock: a request may take a while).
        let mut rates: HashMap<usize, Option<Rates>> = HashMap::new();
        let mut reported: HashMap<usize, Option<Value>> = HashMap::new();
        for ((i, id, sock), pid) in running.iter().zip(&pids) {
            // Not serving yet (starting up): no observation, no grant this interval.
            if !sock.exists() {
                continue;
            }
            match vm_api(sock, "GET", "/vm", None) {
                Ok(body) => {
                    let mut obs = Observation::from_vm(&body);
                    obs.cpu_ns = pid.and_then(process_cpu_ns);
                    let r = self.last.get(id).and_then(|b| Rates::between(b, &obs));
                    reported.insert(*i, obs.slo.clone());
                    rates.insert(*i, r);
                    self.last.insert(id.clone(), obs);
                }
                Err(e) => log::debug!("arbiter: VM {id}: {e}"),
            }
        }
        // Judge and decide.
        let pushes = {
            let status = self.status.clone();
            let mut st = lock(&status);
            for (i, _, _) in &running {
                let Some(v) = st.vms.get_mut(*i) else {
                    continue;
                };
                let r = rates.get(i).cloned().flatten();
                let rep = reported.get(i).cloned().flatten();
                let state = judge(&v.slo, rep.as_ref());
                if matches!(state, SloState::Met | SloState::Missed) {
                    v.intervals += 1;
                    if state == SloState::Met {
                        v.intervals_met += 1;
                    }
                }
                v.slo_state = state;
                v.used_cores = r.as_ref().map(|r| r.cores);
                v.ops_per_sec = r.as_ref().map(|r| r.ops_per_sec);
                v.mean_latency_us = r.as_ref().and_then(|r| r.mean_latency_us);
                v.reported = rep;
            }
            let grants = self.decide(&st, &rates, &running);
            let mut pushes: Vec<(usize, String, std::path::PathBuf, GrantView)> = running
                .iter()
                .filter(|(i, _, _)| rates.contains_key(i))
                .filter_map(|(i, id, sock)| {
                    let g = grants.get(i)?.clone();
                    (self.pushed.get(id) != Some(&g)).then(|| (*i, id.clone(), sock.clone(), g))
                })
                .collect();
            // Reclaim before giving: the VMs whose cores shrink hear it first, so the
            // grants in force never add up to more than the budget on the way.
            let change = |id: &str, g: &GrantView| {
                g.cores - self.pushed.get(id).map_or(f64::INFINITY, |p| p.cores)
            };
            pushes.sort_by(|a, b| change(&a.1, &a.3).total_cmp(&change(&b.1, &b.3)));
            pushes
        };
        // Push (outside the lock).
        let mut results = Vec::new();
        for (i, id, sock, g) in pushes {
            let drives: serde_json::Map<String, Value> = g
                .drive_bps
                .iter()
                .map(|(d, b)| (d.clone(), json!({"bandwidth_bps": b})))
                .collect();
            let mut body = json!({"cores": g.cores, "drives": drives});
            if let Some(c) = &g.cpus {
                body["cpus"] = json!(c);
            }
            if let Some(w) = g.weight {
                body["weight"] = json!(w);
            }
            let r = vm_api(&sock, "PUT", "/grant", Some(body));
            if r.is_ok() {
                // The VM pins its vCPUs and event-loop thread; its helper threads
                // (API, sampler, tuner) follow here.
                let pid = lock(&self.status).vms.get(i).and_then(|v| v.pid);
                if let Some(pid) = pid {
                    pin_helpers(pid, g.cpus.as_deref().unwrap_or(&self.plan.cpus));
                }
                self.pushed.insert(id.clone(), g.clone());
            }
            results.push((i, id, g, r.err().map(|e| e.to_string())));
        }
        let mut st = lock(&self.status);
        for (i, id, g, error) in results {
            if let Some(v) = st.vms.get_mut(i) {
                match error {
                    None => {
                        v.grant = Some(g);
                        v.grant_error = None;
                    }
                    Some(e) => {
                        log::warn!("arbiter: grant to VM {id} not taken: {e}");
                        v.grant_error = Some(e);
                    }
                }
            }
        }
    }

    /// Every running VM's grant for this interval (none under [`ArbiterMode::Off`]).
    fn decide(
        &mut self,
        st: &super::status::HostStatus,
        rates: &HashMap<usize, Option<Rates>>,
        running: &[Running],
    ) -> HashMap<usize, GrantView> {
        let budget = self.plan.cpus.len() as f64;
        let at_risk = |i: usize| {
            matches!(
                st.vms.get(i).map(|v| v.slo_state),
                Some(SloState::Missed | SloState::Unknown)
            )
        };
        let used = |i: usize| rates.get(&i).and_then(Option::as_ref).map(|r| r.cores);
        // A VM's cap: its vCPUs and its I/O thread, within the budget.
        let cap_of = |i: usize| {
            let pv = &self.plan.vms[i];
            (f64::from(pv.config.vcpus) + IO_THREAD_CORES)
                .min(budget)
                .max(pv.min_cores)
        };
        // The baselines leave the weight as it is (the cgroup's default, 100).
        let view = |cores: f64, cpus: Option<Vec<usize>>| GrantView {
            cores: round_cores(cores),
            drive_bps: BTreeMap::new(),
            cpus,
            weight: None,
        };
        let mut out: HashMap<usize, GrantView> = HashMap::new();
        match self.plan.mode {
            ArbiterMode::Off => return out,
            ArbiterMode::Slo => {
                let claims: Vec<CpuClaim> = running
                    .iter()
                    .map(|(i, _, _)| {
                        let pv = &self.plan.vms[*i];
                        let cap = cap_of(*i);
                        let risk = at_risk(*i) || used(*i).is_none();
                        let held = self.held.get(i).map_or(0, |h| h.0);
                        let mut want = match used(*i) {
                            Some(u) if !risk => {
                                (u * HEADROOM + CORE_SLACK).clamp(pv.min_cores, cap)
                            }
                            // A critical VM at risk grows one CPU at a time, and only while
                            // it uses what it holds: more CPUs do not help a VM held back
                            // by something else (its device, load from outside the budget).
                            Some(u) if pv.class == SloClass::Critical && held > 0 => {
                                let k = held as f64;
                                if u >= GROW_USE * k {
                                    (k + 1.0).min(cap)
                                } else {
                                    k
                                }
                            }
                            _ if pv.class == SloClass::Critical => 1.0_f64.min(cap),
                            _ => cap,
                        };
                        // Hold a critical VM's CPUs until it has met its SLO a while.
                        if let Some((k, streak)) = self.held.get(i) {
                            if *streak < SHRINK_AFTER {
                                want = want.max(*k as f64).min(cap);
                            }
                        }
                        CpuClaim {
                            claim: Claim {
                                class: pv.class,
                                floor: pv.min_cores,
                                want,
                                cap,
                            },
                            at_risk: risk && pv.class == SloClass::Critical,
                        }
                    })
                    .collect();
                let placed = place(&self.plan.cpus, &claims);
                for ((i, _, _), p) in running.iter().zip(placed) {
                    if p.exclusive {
                        let met = st.vms.get(*i).map(|v| v.slo_state) == Some(SloState::Met);
                        let (k0, streak0) = self.held.get(i).copied().unwrap_or((0, 0));
                        let k = p.cpus.len();
                        let streak = if k != k0 || !met { 0 } else { streak0 + 1 };
                        self.held.insert(*i, (k, streak));
                    } else {
                        self.held.remove(i);
                    }
                    // Weight for the threads it may run (its cap), not its grant: with
                    // its CPUs placed, the weight only matters against load from
                    // outside the budget and the VMs sharing its pool.
                    let mut g = view(p.cores, Some(p.cpus));
                    g.weight = Some(weight_of(cap_of(*i), class_weight(self.plan.vms[*i].class)));
                    out.insert(*i, g);
                }
            }
            ArbiterMode::Threshold => {
                let mut grants: Vec<(usize, f64)> = running
                    .iter()
                    .map(|(i, _, _)| {
                        let (floor, cap) = (self.plan.vms[*i].min_cores, cap_of(*i));
                        let g = self.scaled.get(i).copied().unwrap_or(cap);
                        let g = used(*i).map_or(g, |u| threshold_step(g, u, floor, cap));
                        self.scaled.insert(*i, g);
                        (*i, g)
                    })
                    .collect();
                // Each VM scales on its own; the host can give no more than it has.
                let total: f64 = grants.iter().map(|(_, g)| g).sum();
                if total > budget {
                    for (_, g) in &mut grants {
                        *g *= budget / total;
                    }
                }
                for (i, g) in grants {
                    out.insert(i, view(g, None));
                }
            }
            ArbiterMode::Pi => {
                let floors: f64 = running
                    .iter()
                    .filter(|(i, _, _)| self.plan.vms[*i].class != SloClass::Critical)
                    .map(|(i, _, _)| self.plan.vms[*i].min_cores)
                    .sum();
                let mut critical = 0.0;
                for (i, _, _) in running {
                    let pv = &self.plan.vms[*i];
                    if pv.class != SloClass::Critical {
                        continue;
                    }
                    let hi = cap_of(*i).min(budget - floors - critical);
                    let (c, e) = self.pi.get(i).copied().unwrap_or((1.0, 0.0));
                    let margin = interval_margin(st.vms.get(*i).and_then(|v| v.reported.as_ref()));
                    let (c, e) = match margin {
                        Some(m) => pi_step(c, m, e, pv.min_cores, hi),
                        None => (c.clamp(pv.min_cores, hi.max(pv.min_cores)), e),
                    };
                    self.pi.insert(*i, (c, e));
                    critical += c;
                    out.insert(*i, view(c, None));
                }
                let rest: Vec<usize> = running
                    .iter()
                    .map(|(i, _, _)| *i)
                    .filter(|i| self.plan.vms[*i].class != SloClass::Critical)
                    .collect();
                let claims: Vec<Claim> = rest
                    .iter()
                    .map(|&i| Claim {
                        class: self.plan.vms[i].class,
                        floor: self.plan.vms[i].min_cores,
                        want: cap_of(i),
                        cap: cap_of(i),
                    })
                    .collect();
                let left = (budget - critical).max(0.0);
                for (i, g) in rest.iter().zip(allocate(left, &claims)) {
                    out.insert(*i, view(g, None));
                }
            }
        }
        // Bandwidth, device by device, among the VMs with drives on it.
        for (dev, budget_dev) in self.plan.devices.iter().enumerate() {
            let bps = budget_dev.bandwidth_bps as f64;
            let users: Vec<(usize, Vec<String>)> = running
                .iter()
                .map(|(i, _, _)| {
                    let drives = self.plan.vms[*i]
                        .drives
                        .iter()
                        .filter(|(_, d)| *d == Some(dev))
                        .map(|(id, _)| id.clone())
                        .collect::<Vec<_>>();
                    (*i, drives)
                })
                .filter(|(_, d)| !d.is_empty())
                .collect();
            if users.is_empty() {
                continue;
            }
            let floor = (bps / (2.0 * users.len() as f64)).min(1024.0 * 1024.0);
            let claims: Vec<Claim> = users
                .iter()
                .map(|(i, drives)| {
                    let used: Option<f64> = rates.get(i).and_then(Option::as_ref).map(|r| {
                        drives
                            .iter()
                            .filter_map(|d| r.drive_bps.get(d))
                            .sum::<f64>()
                    });
                    let want = match used {
                        Some(u) if !at_risk(*i) => (u * HEADROOM + floor).min(bps),
                        _ => bps,
                    };
                    Claim {
                        class: self.plan.vms[*i].class,
                        floor,
                        want,
                        cap: bps,
                    }
                })
                .collect();
            let grants = allocate(bps, &claims);
            for ((i, drives), g) in users.iter().zip(grants) {
                let per_drive = (g / drives.len() as f64).floor().max(1.0) as u64;
                if let Some(v) = out.get_mut(i) {
                    for d in drives {
                        v.drive_bps.insert(d.clone(), per_drive);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(class: SloClass, want: f64, cap: f64) -> Claim {
        Claim {
            class,
            floor: 0.1,
            want,
            cap,
        }
    }

    #[test]
    fn grants_never_exceed_the_budget_and_classes_are_served_in_order() {
        // Everyone wants everything: critical first, then standard, batch keeps its floor.
        let c = [
            claim(SloClass::Batch, 2.0, 2.0),
            claim(SloClass::Critical, 1.0, 1.0),
            claim(SloClass::Standard, 2.0, 2.0),
        ];
        let g = allocate(2.0, &c);
        assert!(g.iter().sum::<f64>() <= 2.0 + 1e-9, "{g:?}");
        assert!((g[1] - 1.0).abs() < 1e-9, "{g:?}");
        assert!((g[0] - 0.1).abs() < 1e-9, "{g:?}");
        assert!((g[2] - 0.9).abs() < 1e-9, "{g:?}");
        // Everyone content: the leftover goes up to each cap, in class order.
        let c = [
            claim(SloClass::Batch, 0.3, 2.0),
            claim(SloClass::Critical, 0.3, 1.0),
        ];
        let g = allocate(2.0, &c);
        assert!((g[1] - 1.0).abs() < 1e-9, "{g:?}");
        assert!((g[0] - 1.0).abs() < 1e-9, "{g:?}");
        // Floors larger than the budget are scaled to fit.
        let g = allocate(
            0.1,
            &[
                claim(SloClass::Batch, 1.0, 1.0),
                claim(SloClass::Batch, 1.0, 1.0),
            ],
        );
        assert!(g.iter().sum::<f64>() <= 0.1 + 1e-9, "{g:?}");
    }

    #[test]
    fn a_critical_vm_at_risk_takes_from_batch_before_standard() {
        // Quiet: critical wants little, everyone holds something.
        let quiet = [
            claim(SloClass::Critical, 0.5, 2.0),
            claim(SloClass::Standard, 0.6, 2.0),
            claim(SloClass::Batch, 0.6, 2.0),
        ];
        let before = allocate(2.0, &quiet);
        // At risk: critical wants all it can use.
        let risk = [claim(SloClass::Critical, 1.3, 2.0), quiet[1], quiet[2]];
        let after = allocate(2.0, &risk);
        assert!(after[0] > before[0], "{before:?} -> {after:?}");
        // Batch gave first: standard keeps its want while batch is above its floor.
        assert!(after[2] < before[2], "{before:?} -> {after:?}");
        assert!((after[1] - 0.6).abs() < 1e-9, "{before:?} -> {after:?}");
        assert!((after[2] - 0.1).abs() < 1e-9, "{after:?}");
        // Wanting still more reaches standard, never below its floor.
        let more = [claim(SloClass::Critical, 2.0, 2.0), quiet[1], quiet[2]];
        let g = allocate(2.0, &more);
        assert!(g[1] < 0.6 && g[1] >= 0.1 - 1e-9, "{g:?}");
        assert!(g.iter().sum::<f64>() <= 2.0 + 1e-9);
    }

    fn cpu_claim(class: SloClass, want: f64, cap: f64, at_risk: bool) -> CpuClaim {
        CpuClaim {
            claim: claim(class, want, cap),
            at_risk,
        }
    }

    #[test]
    fn a_critical_vm_gets_cpus_of_its_own_and_the_others_share_the_rest() {
        let cpus = [0, 1];
        // Content critical VM wanting 1.4 cores: 1 CPU of its own (one kept for batch).
        let p = place(
            &cpus,
            &[
                cpu_claim(SloClass::Batch, 3.0, 3.0, false),
                cpu_claim(SloClass::Critical, 1.4, 2.0, false),
            ],
        );
        assert_eq!(p[1].cpus, vec![1]);
        assert!(p[1].exclusive && p[1].cores == 1.0, "{p:?}");
        assert_eq!(p[0].cpus, vec![0]);
        assert!(!p[0].exclusive && (p[0].cores - 1.0).abs() < 1e-9, "{p:?}");
        // Disjoint: no CPU of the critical VM is in anyone else's list.
        assert!(p[0].cpus.iter().all(|c| !p[1].cpus.contains(c)));
        // At risk it takes both; batch falls to its floor on all the CPUs.
        let p = place(
            &cpus,
            &[
                cpu_claim(SloClass::Batch, 3.0, 3.0, false),
                cpu_claim(SloClass::Critical, 2.0, 2.0, true),
            ],
        );
        assert_eq!(p[1].cpus, vec![0, 1]);
        assert_eq!(p[0].cpus, vec![0, 1]);
        assert!((p[0].cores - 0.1).abs() < 1e-9, "{p:?}");
        assert!((p[1].cores - 1.9).abs() < 1e-9, "{p:?}");
        // The cap is not the vCPU count: a 1-vCPU VM capped at 2 (its I/O thread) may
        // hold 2 CPUs when alone.
        let p = place(&cpus, &[cpu_claim(SloClass::Critical, 1.6, 2.0, false)]);
        assert_eq!(p[0].cpus, vec![0, 1]);
        // Two critical VMs and a batch one on 4 CPUs: disjoint, top down, batch keeps one.
        let p = place(
            &[0, 1, 2, 3],
            &[
                cpu_claim(SloClass::Critical, 2.0, 3.0, false),
                cpu_claim(SloClass::Standard, 1.0, 2.0, false),
                cpu_claim(SloClass::Critical, 3.0, 3.0, false),
            ],
        );
        assert_eq!(p[0].cpus, vec![2, 3]);
        assert_eq!(p[2].cpus, vec![1]);
        assert_eq!(p[1].cpus, vec![0]);
        // No room left for a second critical VM: it shares the pool with the others.
        let p = place(
            &cpus,
            &[
                cpu_claim(SloClass::Critical, 1.0, 2.0, false),
                cpu_claim(SloClass::Critical, 1.0, 2.0, false),
                cpu_claim(SloClass::Batch, 1.0, 2.0, false),
            ],
        );
        assert_eq!(p[0].cpus, vec![1]);
        assert_eq!((p[1].cpus.clone(), p[1].exclusive), (vec![0], false));
        assert_eq!(p[2].cpus, vec![0]);
        // Critical first in the shared pool: all but the batch floor.
        assert!(
            (p[1].cores - 0.9).abs() < 1e-9 && (p[2].cores - 0.1).abs() < 1e-9,
            "{p:?}"
        );
        // Time in the pool never exceeds the pool.
        let shared: f64 = p.iter().filter(|x| !x.exclusive).map(|x| x.cores).sum();
        assert!(shared <= 1.0 + 1e-9);
    }

    #[test]
    fn threshold_and_pi_steps_move_the_right_way() {
        // Busy (90% of 1 core): grows by at least half; idle: shrinks to use x headroom.
        assert!((threshold_step(1.0, 0.9, 0.1, 3.0) - 1.5).abs() < 1e-9);
        assert!((threshold_step(1.0, 0.2, 0.1, 3.0) - 0.25).abs() < 1e-9);
        assert_eq!(threshold_step(1.0, 0.6, 0.1, 3.0), 1.0);
        assert_eq!(threshold_step(2.0, 2.0, 0.1, 3.0), 3.0);
        assert_eq!(threshold_step(1.0, 0.0, 0.1, 3.0), 0.1);
        // Missed by 50%: more cores; comfortably met: fewer; within bounds always.
        let (up, e) = pi_step(1.0, -0.5, 0.0, 0.1, 1.9);
        assert!(up > 1.0 && (e - 0.6).abs() < 1e-9, "{up}");
        let (down, _) = pi_step(1.0, 2.0, 0.0, 0.1, 1.9);
        assert!(down < 1.0);
        assert_eq!(pi_step(1.8, -10.0, 0.0, 0.1, 1.9).0, 1.9);
        assert_eq!(pi_step(0.2, 10.0, 0.0, 0.1, 1.9).0, 0.1);
        let r = json!({"interval": {"met": false, "targets": [{"margin": 0.3}, {"margin": -0.2}]}});
        assert_eq!(interval_margin(Some(&r)), Some(-0.2));
        assert_eq!(interval_margin(Some(&json!({"interval": null}))), None);
        assert_eq!(ArbiterMode::parse("pi"), Some(ArbiterMode::Pi));
        assert_eq!(weight_of(1.0, class_weight(SloClass::Critical)), 400);
        assert_eq!(weight_of(0.5, class_weight(SloClass::Batch)), 50);
        assert_eq!(weight_of(0.001, 1.0), 1);
        assert_eq!(weight_of(500.0, 4.0), 10_000);
        assert_eq!(ArbiterMode::parse("PI"), None);
        assert_eq!(ArbiterMode::Threshold.name(), "threshold");
    }

    #[test]
    fn rounding_keeps_the_sum_under_the_budget() {
        let g = allocate(
            2.0,
            &[
                claim(SloClass::Batch, 2.0, 2.0),
                claim(SloClass::Batch, 2.0, 2.0),
                claim(SloClass::Batch, 2.0, 2.0),
            ],
        );
        let rounded: f64 = g.iter().map(|c| round_cores(*c)).sum();
        assert!(rounded <= 2.0 + 1e-9, "{g:?}");
        assert_eq!(round_cores(0.0), crate::grant::MIN_GRANT_CORES);
        assert_eq!(round_cores(0.4700001), 0.47);
    }

    #[test]
    fn observations_and_judging_tolerate_missing_fields() {
        let a = Observation::from_vm(&json!({"uptime_ns": 1_000_000_000u64,
            "vcpu_guest_ns": [0, 0], "guest": {"ops": 100, "latency_ns_sum": 0, "latency_samples": 0},
            "drives": [{"id": "blk0", "bytes": 0}]}));
        let b = Observation::from_vm(&json!({"uptime_ns": 2_000_000_000u64,
            "vcpu_guest_ns": [500_000_000u64, 250_000_000u64],
            "guest": {"ops": 1100, "latency_ns_sum": 50_000_000u64, "latency_samples": 1000},
            "drives": [{"id": "blk0", "bytes": 4096000}]}));
        let r = Rates::between(&a, &b).unwrap();
        assert!((r.cores - 0.75).abs() < 1e-9);
        assert!((r.ops_per_sec - 1000.0).abs() < 1e-9);
        assert_eq!(r.mean_latency_us, Some(50.0));
        assert_eq!(r.drive_bps["blk0"], 4_096_000.0);
        assert!(Rates::between(&b, &a).is_none());
        assert_eq!(Observation::from_vm(&json!({})), Observation::default());
        // The host's reading of the process's CPU time wins over guest time.
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a2.cpu_ns = Some(0);
        b2.cpu_ns = Some(250_000_000);
        assert!((Rates::between(&a2, &b2).unwrap().cores - 0.25).abs() < 1e-9);
        assert!(process_cpu_ns(std::process::id()).is_some());
        let slo = Slo {
            class: SloClass::Critical,
            min_ops: Some(500.0),
            p99_us: Some(100),
        };
        let report = |met: bool| json!({"class": "critical", "interval": {"met": met}});
        assert_eq!(judge(&slo, Some(&report(true))), SloState::Met);
        assert_eq!(judge(&slo, Some(&report(false))), SloState::Missed);
        assert_eq!(judge(&slo, None), SloState::Unknown);
        assert_eq!(
            judge(&slo, Some(&json!({"class": "critical", "interval": null}))),
            SloState::Unknown
        );
        let batch = Slo {
            class: SloClass::Batch,
            min_ops: None,
            p99_us: None,
        };
        assert_eq!(judge(&batch, Some(&report(false))), SloState::NoTargets);
    }
}
