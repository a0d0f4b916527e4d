//! The control API: HTTP/1.1 on a Unix socket, so a person (or a script, or
//! `curl --unix-socket S http://localhost/vm`) can turn the monitor's knobs while the
//! guest runs.
//!
//! Resources (JSON bodies):
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
//! - `PUT /grant` with body `{"cores": 1.5, "drives": {"blk0": {"bandwidth_bps": N}}}`:
//!   the host arbiter's caps (from `vmm host`), applied at once and to every later
//!   setting of the knobs; `GET /grant` shows them (`vmm::grant`).
//! - `GET /profile`: the guest profiler's rate, symbol source and samples per guest
//!   function since the start (most first, at most 10,000 listed); `PUT /profile` with
//!   body `{"hz": N}` sets the rate (0: off; at most 10,000). 404 in a VM without a
//!   profiler (no `--profile-hz`, `--symbols` or `--api-sock`).
//!
//! Answers: 200 with the JSON body, or 400 (bad body), 404 (unknown resource or drive),
//! 405 (method), 408 (request not complete within 5 s), 413 (request larger than 64 KiB
//! of body or 8 KiB of headers), 503 (the event loop did not answer in time) with
//! `{"error": "..."}`.
//!
//! The parts: [`framing`] cuts an HTTP request out of a connection's bytes, [`request`] parses a request into a typed command (pure), [`handler`] runs
//! it, [`server`] is the `vmm-api` thread and its socket. The client side (`vmm api`,
//! `vmm-learn online`) is the `api-client` crate.

pub mod framing;
pub mod handler;
pub mod request;
pub mod server;

use std::io;
use std::path::PathBuf;

pub use server::{ApiGuard, ApiSocket, EventLoopBridge};

/// Errors setting up or using the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another monitor serves the socket.
    #[error("{0} is the live control socket of another monitor (remove it only if that monitor is gone)")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The API thread or its eventfd could not be made.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] io::Error),
}
