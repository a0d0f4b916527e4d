//! Parsing one control API request (method, path, body bytes) into a typed [`Command`].
//!
//! A pure function with no I/O and no dependency beyond serde, serde_json and thiserror,
//! so the fuzz target (`fuzz/fuzz_targets/api_request.rs`) includes this file as it is.

use std::path::PathBuf;

use serde::Deserialize;

/// A request the monitor understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `GET /vm`: the guest's reports, vCPU use and each drive's counters.
    GetVm,
    /// `PATCH /vm`: vCPUs in use, host cores, CPU quota.
    PatchVm(VmPatch),
    /// `GET /drives`: every drive's rate limits and priority.
    GetDrives,
    /// `PATCH /drives/<id>`: a drive's rate limits and/or priority.
    PatchDrive {
        /// The drive's id.
        id: String,
        /// What to change.
        patch: DrivePatch,
    },
    /// `GET /policy`: the tuner's policy in charge.
    GetPolicy,
    /// `PUT /policy`: load a model file and swap it in.
    PutPolicy {
        /// The ONNX model (its card beside it).
        path: PathBuf,
    },
    /// `GET /grant`: the host arbiter's grant in force.
    GetGrant,
    /// `PUT /grant`: the host arbiter's new grant (replaces the old one).
    PutGrant(GrantBody),
    /// `GET /profile`: the guest profiler's samples per function.
    GetProfile,
    /// `PUT /profile`: the profiler's sampling rate (0 turns it off).
    PutProfile(ProfileBody),
}

/// The body of `PUT /profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    /// Samples per second per vCPU (0: off).
    pub hz: u64,
}

impl Command {
    /// Whether the command runs on the event loop (it changes devices or vCPU threads);
    /// the others (reads of atomics, the policy slot) run on the API thread.
    pub fn on_event_loop(&self) -> bool {
        matches!(
            self,
            Command::GetDrives
                | Command::PatchVm(_)
                | Command::PatchDrive { .. }
                | Command::PutGrant(_)
        )
    }
}

/// The body of `PATCH /vm`; every field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// vCPUs the guest is asked to use.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Host cores the vCPU threads may run on.
    #[serde(default)]
    pub host_cores: Option<u32>,
    /// CPU quota in host cores (fractional).
    #[serde(default)]
    pub cpu_quota: Option<f64>,
}

/// One token bucket in a request body (the configuration file's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketBody {
    /// Tokens per refill period.
    pub size: u64,
    /// Refill period in milliseconds.
    pub refill_time_ms: u64,
    /// Extra tokens available once.
    #[serde(default)]
    pub one_time_burst: u64,
}

/// A drive's rate limits in a request body; `{}` removes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    /// Bytes bucket.
    #[serde(default)]
    pub bandwidth: Option<BucketBody>,
    /// Operations bucket.
    #[serde(default)]
    pub ops: Option<BucketBody>,
}

/// The body of `PATCH /drives/<id>`; either field may be left out.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    /// New rate limits.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitBody>,
    /// New I/O priority (`low`, `medium`, `high` or a number).
    #[serde(default)]
    pub priority: Option<String>,
}

/// The body of `PUT /grant` (from `vmm host`'s arbiter): caps on what the VM may take;
/// a field left out is no cap.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// Host cores of CPU time (fractional, e.g. 1.5).
    #[serde(default)]
    pub cores: Option<f64>,
    /// Per drive id, its bandwidth cap.
    #[serde(default)]
    pub drives: std::collections::BTreeMap<String, DriveGrantBody>,
    /// The host CPUs all the VM's threads run on (placement; checked against the CPUs
    /// the VM was started with).
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// The weight of the VM's threads against what else runs on its CPUs (cgroup v2
    /// `cpu.weight` units, 1..=10000).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// One drive's part of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveGrantBody {
    /// Most bytes per second.
    pub bandwidth_bps: u64,
}

#[derive(Deserialize)]
struct PolicyPut {
    path: String,
}

/// Why a request was refused, with the HTTP status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such resource (404).
    #[error("no resource {0}")]
    NotFound(String),
    /// The resource exists but not with this method (405).
    #[error("method {method} not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        /// The method asked.
        method: String,
        /// The resource.
        path: String,
        /// The methods it takes.
        allowed: &'static str,
    },
    /// The body is missing or not what the resource takes (400).
    #[error("{0}")]
    BadBody(String),
}

impl RequestError {
    /// The HTTP status code of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::NotFound(_) => 404,
            RequestError::MethodNotAllowed { .. } => 405,
            RequestError::BadBody(_) => 400,
        }
    }
}

/// The longest drive id accepted in a path.
const MAX_ID_BYTES: usize = 256;

fn body_of<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::BadBody(format!("{what} needs a JSON body")));
    }
    serde_json::from_slice(body).map_err(|e| RequestError::BadBody(format!("body: {e}")))
}

/// Parses a request: `method` as sent (case-sensitive, as HTTP says), `path` the request
/// target (a query string is ignored), `body` the bytes after the headers.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Command, RequestError> {
    let target = path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = target.trim_matches('/').split('/').collect();
    let not_allowed = |allowed: &'static str| RequestError::MethodNotAllowed {
        method: method.chars().take(16).collect(),
        path: target.chars().take(64).collect(),
        allowed,
    };
    match parts.as_slice() {
        ["vm"] => match method {
            "GET" => Ok(Command::GetVm),
            "PATCH" => Ok(Command::PatchVm(body_of("PATCH /vm", body)?)),
            _ => Err(not_allowed("GET, PATCH")),
        },
        ["drives"] => match method {
            "GET" => Ok(Command::GetDrives),
            _ => Err(not_allowed("GET")),
        },
        ["drives", id] if !id.is_empty() && id.len() <= MAX_ID_BYTES => match method {
            "PATCH" => Ok(Command::PatchDrive {
                id: (*id).to_string(),
                patch: body_of("PATCH /drives/<id>", body)?,
            }),
            _ => Err(not_allowed("PATCH")),
        },
        ["policy"] => match method {
            "GET" => Ok(Command::GetPolicy),
            "PUT" => {
                let put: PolicyPut = body_of("PUT /policy", body).map_err(|_| {
                    RequestError::BadBody(
                        "PUT /policy needs a body {\"path\": \"model.onnx\"}".into(),
                    )
                })?;
                if put.path.is_empty() || put.path.contains('\0') {
                    return Err(RequestError::BadBody(
                        "PUT /policy: the path is empty or holds a NUL byte".into(),
                    ));
                }
                Ok(Command::PutPolicy {
                    path: PathBuf::from(put.path),
                })
            }
            _ => Err(not_allowed("GET, PUT")),
        },
        ["profile"] => match method {
            "GET" => Ok(Command::GetProfile),
            "PUT" => Ok(Command::PutProfile(body_of("PUT /profile", body)?)),
            _ => Err(not_allowed("GET, PUT")),
        },
        ["grant"] => match method {
            "GET" => Ok(Command::GetGrant),
            "PUT" => Ok(Command::PutGrant(body_of("PUT /grant", body)?)),
            _ => Err(not_allowed("GET, PUT")),
        },
        _ => Err(RequestError::NotFound(target.chars().take(256).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses_to_its_command() {
        assert_eq!(parse("GET", "/vm", b""), Ok(Command::GetVm));
        assert_eq!(parse("GET", "/vm?x=1", b""), Ok(Command::GetVm));
        assert_eq!(parse("GET", "/drives/", b""), Ok(Command::GetDrives));
        assert_eq!(parse("GET", "/policy", b""), Ok(Command::GetPolicy));
        assert_eq!(
            parse("PATCH", "/vm", br#"{"vcpus": 2, "cpu_quota": 0.5}"#),
            Ok(Command::PatchVm(VmPatch {
                vcpus: Some(2),
                host_cores: None,
                cpu_quota: Some(0.5)
            }))
        );
        assert_eq!(
            parse(
                "PATCH",
                "/drives/blk0",
                br#"{"priority":"high","rate_limiter":{"bandwidth":{"size":1,"refill_time_ms":100}}}"#
            ),
            Ok(Command::PatchDrive {
                id: "blk0".into(),
                patch: DrivePatch {
                    rate_limiter: Some(RateLimitBody {
                        bandwidth: Some(BucketBody {
                            size: 1,
                            refill_time_ms: 100,
                            one_time_burst: 0
                        }),
                        ops: None
                    }),
                    priority: Some("high".into())
                }
            })
        );
        assert_eq!(
            parse("PUT", "/policy", br#"{"path":"m.onnx"}"#),
            Ok(Command::PutPolicy {
                path: PathBuf::from("m.onnx")
            })
        );
    }

    #[test]
    fn the_grant_route_parses_its_body() {
        assert_eq!(parse("GET", "/grant", b""), Ok(Command::GetGrant));
        let mut drives = std::collections::BTreeMap::new();
        drives.insert(
            "blk0".to_string(),
            DriveGrantBody {
                bandwidth_bps: 1000,
            },
        );
        assert_eq!(
            parse(
                "PUT",
                "/grant",
                br#"{"cores": 1.5, "drives": {"blk0": {"bandwidth_bps": 1000}}, "cpus": [1]}"#
            ),
            Ok(Command::PutGrant(GrantBody {
                cores: Some(1.5),
                drives,
                cpus: Some(vec![1]),
                weight: None,
            }))
        );
        assert_eq!(
            parse("PUT", "/grant", b"{}"),
            Ok(Command::PutGrant(GrantBody::default()))
        );
        let status = |b: &[u8]| parse("PUT", "/grant", b).unwrap_err().status();
        assert_eq!(status(b""), 400);
        assert_eq!(status(br#"{"core": 1}"#), 400);
        assert_eq!(
            status(br#"{"drives": {"blk0": {"bandwidth_bps": -1}}}"#),
            400
        );
        assert_eq!(parse("PATCH", "/grant", b"{}").unwrap_err().status(), 405);
    }

    #[test]
    fn the_profile_route_parses_its_body() {
        assert_eq!(parse("GET", "/profile", b""), Ok(Command::GetProfile));
        assert_eq!(
            parse("PUT", "/profile", br#"{"hz": 100}"#),
            Ok(Command::PutProfile(ProfileBody { hz: 100 }))
        );
        let status = |b: &[u8]| parse("PUT", "/profile", b).unwrap_err().status();
        assert_eq!(status(b""), 400);
        assert_eq!(status(br#"{"hz": -1}"#), 400);
        assert_eq!(status(br#"{"rate": 1}"#), 400);
        assert_eq!(parse("PATCH", "/profile", b"{}").unwrap_err().status(), 405);
    }

    #[test]
    fn refusals_carry_their_status() {
        let status = |m: &str, p: &str, b: &[u8]| parse(m, p, b).unwrap_err().status();
        assert_eq!(status("GET", "/nothing", b""), 404);
        assert_eq!(status("GET", "/drives/a/b", b""), 404);
        assert_eq!(status("DELETE", "/drives", b""), 405);
        assert_eq!(status("PUT", "/vm", b"{}"), 405);
        assert_eq!(status("get", "/vm", b""), 405);
        assert_eq!(status("PATCH", "/vm", b""), 400);
        assert_eq!(status("PATCH", "/vm", b"{\"vcpu\": 1}"), 400);
        assert_eq!(status("PATCH", "/vm", b"\xff\xfe"), 400);
        assert_eq!(status("PATCH", "/drives/x", b"[1,2]"), 400);
        assert_eq!(status("PUT", "/policy", b"{}"), 400);
        assert_eq!(status("PUT", "/policy", br#"{"path":""}"#), 400);
        let long = format!("/drives/{}", "a".repeat(MAX_ID_BYTES + 1));
        assert_eq!(status("PATCH", &long, b"{}"), 404);
    }
}
