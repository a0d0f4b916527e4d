//! The control API: a Unix socket speaking one JSON request per line, answered with one
//! JSON line, so a person (or a script) can turn the monitor's knobs while the guest runs.
//!
//! Requests (`{"method": ..., "path": ..., "body": ...}`):
//! - `GET /drives`: every drive with its rate limits and I/O priority.
//! - `PATCH /drives/<id>` with body `{"rate_limiter": {"bandwidth": {"size": N,
//!   "refill_time_ms": T, "one_time_burst": B}, "ops": {...}}, "priority": "high"}`: either
//!   field may be left out; `"rate_limiter": {}` removes the limits.
//! - `GET /vm`: the guest's own reports, vCPU use and each drive's counters.
//! - `PUT /policy` with body `{"path": "models/NAME.onnx"}`: hot reload of the tuner's
//!   policy, atomic between two decisions; a policy that fails to load leaves the old one.
//! - `GET /policy`: the policy in charge.
//! - `PATCH /vm` with body `{"vcpus": N, "host_cores": M, "cpu_quota": C}`: vCPUs the
//!   guest is asked to use (the rest park); host cores the vCPU threads may run on
//!   (affinity, plus a CPU quota of M cores where a cgroup allows it); a CPU quota of C
//!   host cores (fractional, e.g. 0.25; all host cores lifts it) alone, affinity
//!   unchanged. The answer and `GET /vm` show `"cpu_quota": {"mode": "v2"|"v1"|"none",
//!   "reason", "cores" (null: unlimited), "path", "error" (last failed write)}`.
//!
//! Answers: `{"status": 200, "body": ...}` or `{"status": 4xx, "error": "..."}`. The socket
//! is served by the event loop; a request larger than 64 KiB or not valid JSON gets 400.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Deserialize;
use serde_json::{json, Value};
use tuner::counters::CounterSource;
use vmm_sys_util::epoll::EventSet;

use crate::config::RateLimitSpec;
use crate::runtime::VmRuntime;

/// Largest request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Errors setting up or using the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("api_sock: cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The client could not talk to the monitor.
    #[error("cannot reach the monitor at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The answer was not JSON.
    #[error("malformed answer from the monitor: {0}")]
    Answer(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    method: String,
    path: String,
    #[serde(default)]
    body: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    host_cores: Option<u32>,
    #[serde(default)]
    cpu_quota: Option<f64>,
}

fn cpu_quota_json(rt: &VmRuntime) -> Value {
    let q = rt.cpu_quota_status();
    json!({"mode": q.mode.as_str(), "reason": q.reason, "cores": q.cores,
           "path": q.path.map(|p| p.display().to_string()), "error": q.last_error})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrivePatch {
    #[serde(default)]
    rate_limiter: Option<RateLimitSpec>,
    #[serde(default)]
    priority: Option<String>,
}

fn error(status: u16, msg: impl Into<String>) -> Value {
    json!({"status": status, "error": msg.into()})
}

fn drive_json(rt: &VmRuntime, id: &str) -> Value {
    let limits = rt.rate_limit(id).map(RateLimitSpec::from_limiter).ok();
    let priority = rt.priority(id).map(|p| p.to_string()).ok();
    json!({"id": id, "rate_limiter": limits, "priority": priority})
}

/// Answers one request line.
pub fn handle_request(rt: &VmRuntime, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return error(400, format!("malformed request: {e}")),
    };
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["drives"]) => {
            let drives: Vec<Value> = rt.drive_ids().iter().map(|id| drive_json(rt, id)).collect();
            json!({"status": 200, "body": drives})
        }
        ("GET", ["vm"]) => {
            let snap = rt.snapshot();
            let g = rt.guest_report();
            let drives: Vec<Value> = snap
                .queues
                .iter()
                .map(|q| {
                    json!({"id": q.device, "requests": q.requests, "bytes": q.bytes,
                           "errors": q.errors, "throttled_ns": q.throttled_ns})
                })
                .collect();
            json!({"status": 200, "body": {
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
            }})
        }
        ("PUT", ["policy"]) => {
            let path = req
                .body
                .as_ref()
                .and_then(|b| b.get("path"))
                .and_then(|p| p.as_str())
                .map(std::path::PathBuf::from);
            let Some(path) = path else {
                return error(400, "PUT /policy needs a body {\"path\": \"model.onnx\"}");
            };
            match crate::tuning::reload(rt, &path) {
                Ok(id) => json!({"status": 200, "body": {"policy": id}}),
                Err(e) => error(
                    400,
                    format!("policy not loaded, the previous one stays: {e}"),
                ),
            }
        }
        ("GET", ["policy"]) => match rt.policy_handle() {
            Some(h) => json!({"status": 200, "body": {"policy": h.current_id()}}),
            None => error(404, "no tuner is running"),
        },
        ("PATCH", ["vm"]) => {
            let Some(body) = req.body else {
                return error(400, "PATCH needs a body");
            };
            let patch: VmPatch = match serde_json::from_value(body) {
                Ok(p) => p,
                Err(e) => return error(400, format!("body: {e}")),
            };
            if let Some(n) = patch.vcpus {
                if let Err(e) = rt.set_vcpus(n) {
                    return error(400, format!("vcpus: {e}"));
                }
            }
            if let Some(n) = patch.host_cores {
                if let Err(e) = rt.set_host_cores(n) {
                    return error(400, format!("host_cores: {e}"));
                }
            }
            if let Some(c) = patch.cpu_quota {
                if let Err(e) = rt.set_cpu_quota(c) {
                    return error(400, format!("cpu_quota: {e}"));
                }
            }
            json!({"status": 200, "body": {"active_vcpus": rt.active_vcpus(),
                                           "host_cores": rt.host_cores_given(),
                                           "cpu_quota": cpu_quota_json(rt)}})
        }
        ("PATCH", ["drives", id]) => {
            if !rt.drive_ids().iter().any(|d| d == id) {
                return error(404, format!("no drive with id {id:?}"));
            }
            let Some(body) = req.body else {
                return error(400, "PATCH needs a body");
            };
            let patch: DrivePatch = match serde_json::from_value(body) {
                Ok(p) => p,
                Err(e) => return error(400, format!("body: {e}")),
            };
            if let Some(p) = &patch.priority {
                let prio = match p.parse::<devices::io_scheduler::Priority>() {
                    Ok(p) => p,
                    Err(e) => return error(400, format!("priority: {e}")),
                };
                if let Err(e) = rt.set_priority(id, prio) {
                    return error(status_of(&e), format!("priority: {e}"));
                }
            }
            if let Some(spec) = patch.rate_limiter {
                let cfg = match spec.to_limiter("rate_limiter") {
                    Ok(c) => c,
                    Err(e) => return error(400, e.to_string()),
                };
                if let Err(e) = rt.set_rate_limit(id, cfg) {
                    return error(status_of(&e), format!("rate_limiter: {e}"));
                }
            }
            json!({"status": 200, "body": drive_json(rt, id)})
        }
        (m, _) if m != "GET" && m != "PATCH" && m != "PUT" => {
            error(405, format!("method {m} not allowed"))
        }
        _ => error(404, format!("no resource {}", req.path)),
    }
}

fn status_of(e: &crate::runtime::ControlError) -> u16 {
    match e {
        crate::runtime::ControlError::UnknownDrive(_) => 404,
        crate::runtime::ControlError::Refused(_) => 400,
    }
}

/// The API socket in the event loop.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    runtime: Arc<VmRuntime>,
    conns: HashMap<RawFd, (UnixStream, Vec<u8>)>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path, runtime: Arc<VmRuntime>) -> Result<Self, ApiError> {
        let listen_err = |source| ApiError::Listen {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(listen_err)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        log::info!("control API listening on {}", path.display());
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            runtime,
            conns: HashMap::new(),
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        log::warn!("control API: cannot watch a connection: {e}");
                        continue;
                    }
                    self.conns.insert(fd, (stream, Vec::new()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control API: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some((stream, _)) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
        }
    }

    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some((stream, buf)) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let done = loop {
            match stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.contains(&b'\n') || buf.len() > MAX_REQUEST_BYTES {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if !done {
            return;
        }
        let answer = if buf.len() > MAX_REQUEST_BYTES {
            error(
                400,
                format!("request larger than {MAX_REQUEST_BYTES} bytes"),
            )
        } else if buf.iter().all(|b| b.is_ascii_whitespace()) {
            self.close(fd, ops);
            return;
        } else {
            let line = String::from_utf8_lossy(buf);
            let line = line.lines().next().unwrap_or("");
            handle_request(&self.runtime, line)
        };
        let mut text = answer.to_string();
        text.push('\n');
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = stream.write_all(text.as_bytes());
        self.close(fd, ops);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("control API: cannot watch the socket: {e}");
        }
    }
}

/// Client side: sends one request line and returns the parsed answer.
pub fn call(path: &Path, request: &str) -> Result<Value, ApiError> {
    let conn_err = |source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(conn_err)?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(conn_err)?;
    let mut line = request.trim().to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(conn_err)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(conn_err)?;
    serde_json::from_str(answer.trim()).map_err(|e| ApiError::Answer(format!("{e}: {answer:?}")))
}
