//! The host's API: HTTP/1.1 on its Unix socket, `GET /host` (the VMs, their classes,
//! SLOs, processes, grants and attainment). The socket is bound as the VM's is
//! ([`crate::api::ApiSocket`]: mode 0600, a live one never taken over), requests are cut
//! out of the bytes by the VM API's framing ([`crate::api::framing`]) and answered with
//! its response writer. One read-only route, served one connection at a time with a
//! short deadline: the VM's multi-connection loop is for knobs that must never wait.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::framing::{frame, Frame, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use crate::api::handler::Reply;
use crate::api::server::http_response;
use devices::lock;

use super::status::SharedStatus;

/// Time a client has to send its request and take the answer.
const CONN_DEADLINE: Duration = Duration::from_secs(2);

/// The answer to one request.
pub fn answer(status: &SharedStatus, method: &str, path: &str) -> Reply {
    let target = path.split('?').next().unwrap_or("");
    match target.trim_end_matches('/') {
        "/host" => match method {
            "GET" => Reply::ok(lock(status).to_json()),
            _ => Reply::error(
                405,
                format!(
                    "method {} not allowed on /host (allowed: GET)",
                    method.chars().take(16).collect::<String>()
                ),
            ),
        },
        _ => Reply::error(
            404,
            format!(
                "no resource {}",
                target.chars().take(256).collect::<String>()
            ),
        ),
    }
}

/// Reads one request from `stream` (until its deadline) and answers it.
fn serve(mut stream: UnixStream, status: &SharedStatus) -> io::Result<()> {
    let deadline = Instant::now() + CONN_DEADLINE;
    stream.set_nonblocking(false)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let reply = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Reply::error(408, "request not complete in time");
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Reply::error(408, "request not complete in time")
            }
            Err(e) => return Err(e),
        }
        match frame(&buf) {
            Frame::Incomplete { .. } if buf.len() <= MAX_HEAD_BYTES + MAX_BODY_BYTES => {}
            Frame::Incomplete { .. } => break Reply::error(413, "request too large"),
            Frame::Refused(code, msg) => break Reply::error(code, msg),
            Frame::Complete { method, path, .. } => break answer(status, &method, &path),
        }
    };
    stream.set_write_timeout(Some(CONN_DEADLINE))?;
    stream.write_all(&http_response(&reply))?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Serves `listener` until `stop` is set (the `vmm-host-api` thread).
pub fn run(listener: UnixListener, status: SharedStatus, stop: Arc<AtomicBool>) {
    let mut last_warn: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let mut fds = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve(stream, &status) {
                    log::debug!("host API: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // EMFILE and the like: one line per 10 s, and a pause.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    log::warn!("host API: accept failed: {e}");
                    last_warn = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
