//! The control API's HTTP/1.1 server on a Unix socket, on its own thread (`vmm-api`).
//!
//! The thread accepts connections, reads each request (headers parsed by `httparse`),
//! parses it into a [`Command`] and either runs it there (reads of atomics, the policy
//! slot: a model file is read and parsed on this thread, never on the event loop) or
//! hands it to the event loop through a channel and an eventfd, and waits for the
//! answer (Firecracker's model). A slow or idle client, or a model load, never blocks
//! guest I/O.
//!
//! Why `httparse` and a small connection loop of our own rather than a server crate:
//! `dbs-uhttp` (micro_http's fork) has a fixed cap of 256 connections and no idle
//! timeout, answers an oversized body with 400, lets one failed `accept` (EMFILE) drop
//! the readiness of every other connection of the batch (edge-triggered epoll), and
//! takes file descriptors passed by clients (SCM_RIGHTS); `tiny_http` spawns a thread
//! per connection without bound and stops accepting for good after one `accept` error.
//! Here the parsing is `httparse`'s (hyper's parser); the loop adds what the monitor
//! needs: at most [`MAX_CONNECTIONS`] connections (the oldest is closed for a new one),
//! a deadline per connection, a size cap (413), a back-off on `accept` errors with one
//! log line per interval, and no threads or file descriptors from clients.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::framing::{frame, Frame, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::handler::{self, Reply};
use super::request::{self, Command};
use super::ApiError;
use crate::runtime::VmRuntime;

/// Connections served at once; a new one beyond this closes the oldest.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its whole request after connecting.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the event loop has to answer a command (then 503).
pub const EVENT_LOOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before accepting again after `accept` failed (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// On EMFILE, a connection that has sent nothing for this long may be closed for room.
const IDLE_EVICT_AGE: Duration = Duration::from_millis(250);
/// At most one log line per this interval for a repeated failure.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bound control socket, mode 0600, not yet served.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl ApiSocket {
    /// Binds `path` with mode 0600 whatever the umask. A socket file left by a monitor
    /// that is gone is replaced; a socket another monitor is serving, or a path that is
    /// not a socket, is refused.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let listen_err = |source| ApiError::Listen {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("control API: replacing the stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(listen_err)?;
                }
                Err(e) => return Err(listen_err(e)),
            }
        }
        // The socket file takes its mode from the umask at bind: 0177 makes it 0600 from
        // the start, so there is no moment when another user could connect. The umask
        // is the process's, but no other thread of the monitor creates files during
        // set-up, when this runs. The chmod after covers a directory whose default ACL
        // overrides the umask.
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
        log::info!("control API listening on {} (HTTP/1.1)", path.display());
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
        })
    }
}

impl ApiSocket {
    /// The bound listener and a guard that removes the socket file when dropped, for a
    /// server other than the VM's (`vmm host`'s API).
    pub(crate) fn into_listener(self) -> (UnixListener, ApiGuard) {
        let guard = ApiGuard {
            stop: Arc::new(AtomicBool::new(false)),
            path: self.path,
            inode: self.inode,
        };
        (self.listener, guard)
    }
}

/// A command for the event loop and where its answer goes.
struct Job {
    cmd: Command,
    reply: SyncSender<Reply>,
}

/// The event loop's end of the API: runs the commands the API thread hands over.
pub struct EventLoopBridge {
    kick: EventFd,
    jobs: Receiver<Job>,
    runtime: Arc<VmRuntime>,
}

impl MutEventSubscriber for EventLoopBridge {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        // The API thread has at most a handful of jobs queued (the channel's bound).
        while let Ok(job) = self.jobs.try_recv() {
            let reply = handler::execute(&self.runtime, job.cmd);
            // The API thread may have given up waiting (503): nothing to do then.
            let _ = job.reply.try_send(reply);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            log::error!("control API: the event loop cannot watch its eventfd: {e}");
        }
    }
}

/// Held by the run: stops the API thread and removes the socket file when dropped
/// (only if the path still names this monitor's socket).
#[derive(Debug)]
pub struct ApiGuard {
    stop: Arc<AtomicBool>,
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for ApiGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Starts the `vmm-api` thread serving `socket`; returns the event loop's end and the
/// guard that ends the service.
pub fn spawn(
    socket: ApiSocket,
    runtime: Arc<VmRuntime>,
) -> Result<(EventLoopBridge, ApiGuard), ApiError> {
    let kick = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Thread)?;
    let (tx, rx) = mpsc::sync_channel(4);
    let stop = Arc::new(AtomicBool::new(false));
    let guard = ApiGuard {
        stop: stop.clone(),
        path: socket.path.clone(),
        inode: socket.inode,
    };
    let server = Server {
        listener: socket.listener,
        conns: Vec::new(),
        runtime: runtime.clone(),
        jobs: tx,
        kick: kick.try_clone().map_err(ApiError::Thread)?,
        stop,
        backoff_until: None,
        accept_log: LogLimit::default(),
    };
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            tuner::sandbox::enter_thread("vmm-api");
            server.run();
        })
        .map_err(ApiError::Thread)?;
    Ok((
        EventLoopBridge {
            kick,
            jobs: rx,
            runtime,
        },
        guard,
    ))
}

/// One line per [`LOG_INTERVAL`] for a repeated failure, with the count of the others.
#[derive(Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!("{msg} ({} more since the last line)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    deadline: Instant,
    accepted: Instant,
    continued: bool,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The bytes of an HTTP/1.1 answer; the connection closes after it.
pub(crate) fn http_response(reply: &Reply) -> Vec<u8> {
    let body = if reply.status == 204 {
        String::new()
    } else {
        reply.body.to_string()
    };
    format!(
        "HTTP/1.1 {} {}\r\nServer: vmm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reply.status,
        reason(reply.status),
        body.len()
    )
    .into_bytes()
}

struct Server {
    listener: UnixListener,
    conns: Vec<Conn>,
    runtime: Arc<VmRuntime>,
    jobs: SyncSender<Job>,
    kick: EventFd,
    stop: Arc<AtomicBool>,
    backoff_until: Option<Instant>,
    accept_log: LogLimit,
}

impl Server {
    fn run(mut self) {
        let mut poll_log = LogLimit::default();
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            for c in self.conns.iter_mut() {
                if c.deadline <= now && c.out.is_empty() && !c.buf.is_empty() {
                    // Best effort: a client too slow to send its request hears why.
                    let msg = format!(
                        "request not complete within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    );
                    let _ = c.stream.write(&http_response(&Reply::error(408, msg)));
                }
            }
            self.conns.retain(|c| c.deadline > now);
            if self.backoff_until.is_some_and(|t| now >= t) {
                self.backoff_until = None;
            }
            let listening = self.backoff_until.is_none();
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.conns.len() + 1);
            for c in &self.conns {
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: if c.out.is_empty() {
                        libc::POLLIN
                    } else {
                        libc::POLLOUT
                    },
                    revents: 0,
                });
            }
            if listening {
                fds.push(libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // Wake for the nearest deadline, the end of a back-off, or a stop check.
            let mut wake = now + Duration::from_secs(1);
            for t in self
                .conns
                .iter()
                .map(|c| c.deadline)
                .chain(self.backoff_until)
            {
                wake = wake.min(t);
            }
            let timeout = wake.saturating_duration_since(now).as_millis() as i32 + 1;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    poll_log.warn(format_args!("control API: poll failed: {e}"));
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
                continue;
            }
            let conn_events: Vec<i16> = fds
                .iter()
                .take(self.conns.len())
                .map(|f| f.revents)
                .collect();
            let listener_ready =
                listening && fds.last().is_some_and(|f| f.revents & libc::POLLIN != 0);
            let mut i = self.conns.len();
            while i > 0 {
                i -= 1;
                if conn_events[i] != 0 && !self.serve(i) {
                    self.conns.swap_remove(i);
                }
            }
            if listener_ready {
                self.accept();
            }
        }
    }

    /// Accepts what is waiting, closing the oldest connections beyond the cap.
    fn accept(&mut self) {
        for _ in 0..MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNECTIONS {
                        self.close_oldest();
                    }
                    self.conns.push(Conn {
                        stream,
                        buf: Vec::new(),
                        out: Vec::new(),
                        sent: 0,
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                        accepted: Instant::now(),
                        continued: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued; try
                    // again after a pause instead of spinning on a ready listener, and
                    // free a descriptor by closing the oldest connection that has sent
                    // nothing (the others end at their deadline).
                    self.accept_log
                        .warn(format_args!("control API: accept failed: {e}; pausing"));
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    self.close_oldest_idle();
                    return;
                }
            }
        }
    }

    /// Closes the connection that has waited longest for its request (idle or slow),
    /// or, if all are being answered, the oldest one.
    fn close_oldest(&mut self) {
        let reading = self.conns.iter().any(|c| c.out.is_empty());
        if let Some(oldest) = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| !reading || c.out.is_empty())
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
        {
            self.conns.swap_remove(oldest);
        }
    }

    /// On EMFILE (which `accept` also returns once the queue is empty): closes the
    /// oldest connection that has sent nothing for [`IDLE_EVICT_AGE`], so a descriptor
    /// frees up without dropping a client that has just connected and is sending.
    fn close_oldest_idle(&mut self) {
        let now = Instant::now();
        if let Some(oldest) = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.buf.is_empty() && now.duration_since(c.accepted) >= IDLE_EVICT_AGE)
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
        {
            self.conns.swap_remove(oldest);
        }
    }

    /// Moves connection `i` on; false when it is done (answered, closed or broken).
    fn serve(&mut self, i: usize) -> bool {
        if !self.conns[i].out.is_empty() {
            return self.write(i);
        }
        let conn = &mut self.conns[i];
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let reply = match frame(&conn.buf) {
            Frame::Incomplete { .. } if eof => return false,
            Frame::Incomplete { expects_continue } => {
                if expects_continue && !conn.continued {
                    conn.continued = true;
                    // Best effort: a client that sees no 100 sends its body anyway.
                    let _ = conn.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                return true;
            }
            Frame::Refused(status, msg) => {
                log::debug!("control API: refused a request: {status} {msg}");
                Reply::error(status, msg)
            }
            Frame::Complete {
                method,
                path,
                body_start,
                body_len,
            } => {
                let body = conn.buf[body_start..body_start + body_len].to_vec();
                log::debug!("control API: {method} {path}");
                self.answer(&method, &path, &body)
            }
        };
        let conn = &mut self.conns[i];
        conn.out = http_response(&reply);
        conn.deadline = Instant::now() + WRITE_TIMEOUT;
        self.write(i)
    }

    /// Writes what the socket takes; false when done or broken.
    fn write(&mut self, i: usize) -> bool {
        let conn = &mut self.conns[i];
        while conn.sent < conn.out.len() {
            match conn.stream.write(&conn.out[conn.sent..]) {
                Ok(0) => return false,
                Ok(n) => conn.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        false
    }

    fn answer(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        match request::parse(method, path, body) {
            Err(e) => Reply::error(e.status(), e.to_string()),
            Ok(cmd) if cmd.on_event_loop() => self.on_event_loop(cmd),
            Ok(cmd) => handler::execute(&self.runtime, cmd),
        }
    }

    /// Hands `cmd` to the event loop and waits (bounded) for its answer.
    fn on_event_loop(&self, cmd: Command) -> Reply {
        let (tx, rx) = mpsc::sync_channel(1);
        match self.jobs.try_send(Job { cmd, reply: tx }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Reply::error(503, "the event loop is busy with earlier requests")
            }
            Err(TrySendError::Disconnected(_)) => return Reply::error(503, "the VM is stopping"),
        }
        if let Err(e) = self.kick.write(1) {
            return Reply::error(500, format!("cannot wake the event loop: {e}"));
        }
        match rx.recv_timeout(EVENT_LOOP_TIMEOUT) {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Timeout) => Reply::error(
                503,
                format!(
                    "the event loop did not answer within {} s",
                    EVENT_LOOP_TIMEOUT.as_secs()
                ),
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => Reply::error(503, "the VM is stopping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_http_with_a_json_body() {
        let text = String::from_utf8(http_response(&Reply::error(404, "no"))).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no\"}"), "{text}");
        assert!(text.contains("Content-Length: 14\r\n"), "{text}");
    }

    #[test]
    fn the_socket_is_0600_and_a_live_one_is_not_taken_over() {
        let dir = std::env::temp_dir().join(format!("vmm-api-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(ApiSocket::bind(&path), Err(ApiError::InUse(_))));
        drop(first);
        // The file stays but nobody listens: stale, replaced.
        assert!(path.exists());
        let again = ApiSocket::bind(&path).unwrap();
        drop(again);
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            ApiSocket::bind(&plain),
            Err(ApiError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&plain).unwrap(), b"x");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
