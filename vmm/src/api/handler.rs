//! Executing a parsed [`Command`] against the running VM: the answer's status and JSON.

use serde_json::{json, Value};

use super::request::{Command, DrivePatch, GrantBody, RateLimitBody, VmPatch};
use crate::config::{BucketSpec, RateLimitSpec};
use crate::knobs::KnobWrite;
use crate::runtime::{ControlError, VmRuntime};

/// An answer: an HTTP status and its JSON body (`{"error": "..."}` for a refusal).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }

    /// A refusal: `status` with `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"error": msg.into()}),
        }
    }
}

fn status_of(e: &ControlError) -> u16 {
    match e {
        ControlError::UnknownDrive(_) => 404,
        ControlError::Refused(_) => 400,
    }
}

fn cpu_quota_json(rt: &VmRuntime) -> Value {
    let q = rt.cpu_quota_status();
    json!({"mode": q.mode.as_str(), "reason": q.reason, "cores": q.cores,
           "path": q.path.map(|p| p.display().to_string()), "error": q.last_error})
}

fn drive_json(rt: &VmRuntime, id: &str) -> Value {
    let knobs = rt.knob_state();
    let d = knobs.drives.iter().find(|d| d.id == id);
    json!({"id": id,
           "rate_limiter": d.map(|d| RateLimitSpec::from_limiter(d.limits)),
           "priority": d.map(|d| d.priority.to_string()),
           "rate_level": d.map(|d| d.rate_level),
           "generation": knobs.generation})
}

/// The knob state in force (the knob controller's), with its generation.
fn knobs_json(k: &tuner::knob_state::VmKnobs) -> Value {
    let drives: Vec<Value> = k
        .drives
        .iter()
        .map(|d| {
            json!({"id": d.id, "rate_level": d.rate_level,
                   "rate_limiter": RateLimitSpec::from_limiter(d.limits),
                   "priority": d.priority.to_string(), "priority_level": d.priority_level})
        })
        .collect();
    let nets: Vec<Value> = k
        .nets
        .iter()
        .map(|n| {
            json!({"id": n.id, "qos_level": n.qos_level,
                   "rate_limiter": RateLimitSpec::from_limiter(n.limits)})
        })
        .collect();
    json!({"generation": k.generation, "active_vcpus": k.active_vcpus,
           "host_cores": k.host_cores, "cpu_quota": k.cpu_quota,
           "drives": drives, "nets": nets})
}

/// The running tuner's last decision: the knob generation and levels it was made on,
/// the actions its mask allowed, and the age of its sample.
fn tuner_json(rt: &VmRuntime) -> Value {
    match rt.policy_handle() {
        Some(h) => {
            let s = h.stats();
            json!({"policy": s.policy_id, "decisions": s.decisions,
                   "knob_generation": s.knob_generation, "knobs_seen": s.knobs_seen,
                   "allowed": s.allowed_last, "last_action": s.last_action,
                   "sample_age_ns": s.sample_age_ns_last, "decision_ns": s.decision_ns_last,
                   "sample_age_ns_max": s.sample_age_ns_max,
                   "outside_changes": s.outside_changes})
        }
        None => Value::Null,
    }
}

fn rate_limit_spec(body: RateLimitBody) -> RateLimitSpec {
    let conv = |b: Option<super::request::BucketBody>| {
        b.map(|b| BucketSpec {
            size: b.size,
            refill_time_ms: b.refill_time_ms,
            one_time_burst: b.one_time_burst,
        })
    };
    RateLimitSpec {
        bandwidth: conv(body.bandwidth),
        ops: conv(body.ops),
    }
}

/// Runs `cmd` on the calling thread. [`Command::on_event_loop`] says which thread that
/// must be.
pub fn execute(rt: &VmRuntime, cmd: Command) -> Reply {
    match cmd {
        Command::GetVm => get_vm(rt),
        Command::GetDrives => {
            let drives: Vec<Value> = rt.drive_ids().iter().map(|id| drive_json(rt, id)).collect();
            Reply::ok(json!(drives))
        }
        Command::PatchVm(patch) => patch_vm(rt, patch),
        Command::PatchDrive { id, patch } => patch_drive(rt, &id, patch),
        Command::GetPolicy => match rt.policy_handle() {
            Some(h) => Reply::ok(json!({"policy": h.current_id()})),
            None => Reply::error(404, "no tuner is running"),
        },
        Command::PutPolicy { path } => put_policy(rt, &path),
        Command::GetGrant => Reply::ok(grant_json(rt)),
        Command::PutGrant(body) => put_grant(rt, body),
        Command::GetProfile => match rt.profiler() {
            Some(p) => Reply::ok(profile_json(p)),
            None => Reply::error(404, "this VM has no profiler"),
        },
        Command::PutProfile(body) => match rt.profiler() {
            Some(p) => match p.set_hz(body.hz) {
                Ok(hz) => {
                    log::info!("profiler: {hz} Hz");
                    Reply::ok(profile_json(p))
                }
                Err(e) => Reply::error(400, format!("hz: {e}")),
            },
            None => Reply::error(404, "this VM has no profiler"),
        },
    }
}

/// Most functions listed by `GET /profile` (the rest are summed in `other_samples`).
pub const PROFILE_MAX_FUNCTIONS: usize = 10_000;

/// `GET /profile`: the rate, the symbols' source, and samples per function since the
/// start, most first.
fn profile_json(p: &crate::profiler::Profiler) -> Value {
    let (samples, functions) = p.report();
    let (source, symbols) = p.symbol_source();
    let other: u64 = functions
        .iter()
        .skip(PROFILE_MAX_FUNCTIONS)
        .map(|f| f.count)
        .sum();
    let listed: Vec<Value> = functions
        .iter()
        .take(PROFILE_MAX_FUNCTIONS)
        .map(|f| {
            json!({"name": f.name, "class": f.class.as_str(), "count": f.count,
                   "share": if samples > 0 { f.count as f64 / samples as f64 } else { 0.0 }})
        })
        .collect();
    json!({"hz": p.hz(), "samples": samples, "missed": p.missed(),
           "symbols": {"source": source, "functions": symbols},
           "functions": listed, "other_samples": other})
}

/// The grant in force and what the VM holds under it.
fn grant_json(rt: &VmRuntime) -> Value {
    let g = rt.grant();
    let drives: serde_json::Map<String, Value> = g
        .drive_bps
        .iter()
        .map(|(id, bps)| (id.clone(), json!({"bandwidth_bps": bps})))
        .collect();
    json!({"cores": g.cores, "drives": drives, "cpus": g.cpus, "weight": g.weight,
           "host_cores": rt.host_cores_given(), "core_cap": rt.granted_core_cap(),
           "cpu_quota": cpu_quota_json(rt)})
}

/// `PUT /grant`: the host arbiter's caps, applied at once (on the event loop).
fn put_grant(rt: &VmRuntime, body: GrantBody) -> Reply {
    let grant = crate::grant::Grant {
        cores: body.cores,
        drive_bps: body
            .drives
            .into_iter()
            .map(|(id, d)| (id, d.bandwidth_bps))
            .collect(),
        cpus: body.cpus,
        weight: body.weight,
    };
    match rt.control(KnobWrite::Grant(grant)) {
        Ok(_) => Reply::ok(grant_json(rt)),
        Err(e) => Reply::error(status_of(&e), format!("grant: {e}")),
    }
}

/// `PUT /policy`: a regular file only (a FIFO would block the API thread in `open`,
/// `/dev/zero` would never end), then loaded and swapped in by the tuner's handle.
fn put_policy(rt: &VmRuntime, path: &std::path::Path) -> Reply {
    let refused = |e: String| {
        Reply::error(
            400,
            format!("policy not loaded, the previous one stays: {e}"),
        )
    };
    // A path that does not exist goes on to the loader, which reports (and records) it.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return refused(format!("{} is not a regular file", path.display()));
    }
    match crate::tuning::reload(rt, path) {
        Ok(id) => Reply::ok(json!({"policy": id})),
        Err(e) => refused(e),
    }
}

/// `GET /vm`, from the counters alone: KVM's dirty log is read by the sampler thread
/// only (its ioctl is outside this thread's filter).
fn get_vm(rt: &VmRuntime) -> Reply {
    let snap = rt.api_snapshot();
    let g = rt.guest_report();
    let latest = rt.latest_sample();
    let drives: Vec<Value> = snap
        .queues
        .iter()
        .map(|q| {
            // The latest interval's per-request latency quantiles (null before the first).
            let lat = latest.as_ref().and_then(|s| {
                s.queue_latency
                    .iter()
                    .find(|l| l.device == q.device && l.queue == q.queue)
            });
            json!({"id": q.device, "queue": q.queue, "requests": q.requests, "bytes": q.bytes,
                   "errors": q.errors, "throttled_ns": q.throttled_ns,
                   "p50_us": lat.map(|l| l.p50_us), "p99_us": lat.map(|l| l.p99_us)})
        })
        .collect();
    let slo = rt.slo().map(|slo| {
        json!({"class": slo.class, "p99_us": slo.p99_us, "min_ops": slo.min_ops,
        "interval": latest.as_ref().and_then(|s| s.slo.as_ref()).map(|r| {
            json!({"met": r.met(), "targets": r.targets})
        })})
    });
    let feature = |id: tuner::schema::FeatureId| latest.as_ref().map(|s| s.raw_of(id));
    Reply::ok(json!({
        "uptime_ns": snap.at_ns,
        "vcpus": snap.vcpus.len(),
        "active_vcpus": snap.active_vcpus,
        "parked_vcpus": rt.parked_vcpus(),
        "vcpu_guest_ns": snap.vcpus.iter().map(|v| v.guest_ns).collect::<Vec<_>>(),
        "host_cores": snap.host_cores,
        "cpu_quota": cpu_quota_json(rt),
        "guest": {"ops": g.ops, "bytes": g.bytes, "latency_ns_sum": g.latency_ns_sum,
                  "latency_samples": g.latency_samples},
        "drives": drives,
        "log_lines_suppressed": snap.log_lines_suppressed,
        "slo": slo,
        "knobs": knobs_json(&rt.knob_state()),
        "tuner": tuner_json(rt),
        "state_repo": rt.repo_stats().map(|s| json!({
            "degraded": s.degraded, "rows_written": s.rows_written,
            "rows_dropped": s.rows_dropped, "rows_buffered": s.rows_buffered,
            "reconnects": s.reconnects, "commit_errors": s.commit_errors})),
        "vcpu_run_delay_ns": snap.vcpus.iter().map(|v| v.run_delay_ns).collect::<Vec<_>>(),
        "vcpu_run_delay_share": feature(tuner::schema::FeatureId::VcpuRunDelayShare),
        "profile": rt.profiler().map(|p| {
            let shares = latest.as_ref().and_then(|s| s.profile);
            json!({"hz": p.hz(), "interval": shares.map(|s| json!({
                "samples": s.samples, "idle_share": s.idle, "io_share": s.io,
                "compute_share": s.compute, "hottest_share": s.hottest}))})
        }),
        "host": {"load": feature(tuner::schema::FeatureId::HostLoad),
                 "allowed_cpus": snap.host.allowed_cpus,
                 "busy_ticks": snap.host.busy_ticks, "total_ticks": snap.host.total_ticks},
    }))
}

fn patch_vm(rt: &VmRuntime, patch: VmPatch) -> Reply {
    if let Some(n) = patch.vcpus {
        if let Err(e) = rt.control(KnobWrite::Vcpus(n)) {
            return Reply::error(400, format!("vcpus: {e}"));
        }
    }
    if let Some(n) = patch.host_cores {
        if let Err(e) = rt.control(KnobWrite::HostCores(n)) {
            return Reply::error(400, format!("host_cores: {e}"));
        }
    }
    if let Some(c) = patch.cpu_quota {
        if let Err(e) = rt.control(KnobWrite::CpuQuota(c)) {
            return Reply::error(400, format!("cpu_quota: {e}"));
        }
    }
    let knobs = rt.knob_state();
    Reply::ok(json!({"active_vcpus": knobs.active_vcpus,
                     "host_cores": knobs.host_cores,
                     "cpu_quota": cpu_quota_json(rt),
                     "knobs": knobs_json(&knobs)}))
}

fn patch_drive(rt: &VmRuntime, id: &str, patch: DrivePatch) -> Reply {
    if !rt.drive_ids().iter().any(|d| d == id) {
        return Reply::error(404, format!("no drive with id {id:?}"));
    }
    if let Some(p) = &patch.priority {
        let prio = match p.parse::<devices::io_scheduler::Priority>() {
            Ok(p) => p,
            Err(e) => return Reply::error(400, format!("priority: {e}")),
        };
        if let Err(e) = rt.control(KnobWrite::DrivePriority {
            id: id.to_string(),
            priority: prio,
        }) {
            return Reply::error(status_of(&e), format!("priority: {e}"));
        }
    }
    if let Some(body) = patch.rate_limiter {
        let cfg = match rate_limit_spec(body).to_limiter("rate_limiter") {
            Ok(c) => c,
            Err(e) => return Reply::error(400, e.to_string()),
        };
        if let Err(e) = rt.control(KnobWrite::DriveLimits {
            id: id.to_string(),
            limits: cfg,
        }) {
            return Reply::error(status_of(&e), format!("rate_limiter: {e}"));
        }
    }
    Reply::ok(drive_json(rt, id))
}
