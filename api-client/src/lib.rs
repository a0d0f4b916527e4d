//! The client side of the monitor's control API, shared by `vmm api` and `vmm-learn`:
//! turns a request (`{"method", "path", "body"}`) into an HTTP/1.1 request on the
//! monitor's Unix socket and the answer back into one JSON value, `{"status": 200,
//! "body": ...}` or `{"status": 4xx, "error": "..."}`.
//!
//! The request is a few formatted lines; the answer is parsed by `httparse`. A crate of
//! its own so that a program talking to the monitor (the learner's `vmm-learn online`)
//! does not link the monitor.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Largest answer read, in bytes.
const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// How long the client waits for the monitor.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of talking to the monitor.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client could not talk to the monitor.
    #[error("cannot reach the monitor at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The request is not `{"method", "path", "body"}` with printable method and path.
    #[error("{0}")]
    Request(String),
    /// The answer was not HTTP with a JSON body.
    #[error("malformed answer from the monitor: {0}")]
    Answer(String),
}

impl ClientError {
    /// Whether nothing serves the socket any more (the monitor is gone): the socket file
    /// is missing or the connection was refused.
    pub fn monitor_gone(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { source, .. }
                if matches!(source.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound)
        )
    }
}

/// One request to the monitor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// HTTP method (`GET`, `PUT`, `PATCH`).
    pub method: String,
    /// Resource path, starting with `/`.
    pub path: String,
    /// JSON body, if any.
    #[serde(default)]
    pub body: Option<Value>,
}

/// Builds the HTTP request.
fn http_request(req: &Request) -> Result<Vec<u8>, ClientError> {
    let ok_token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !ok_token(&req.method) || !ok_token(&req.path) || !req.path.starts_with('/') {
        return Err(ClientError::Request(format!(
            "method {:?} and path {:?} must be printable ASCII without spaces, the path starting with /",
            req.method, req.path
        )));
    }
    let body = req.body.as_ref().map(Value::to_string).unwrap_or_default();
    let mut text = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
        req.method, req.path
    );
    if !body.is_empty() {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(&body);
    Ok(text.into_bytes())
}

/// Reads an HTTP answer into `{"status", "body"|"error"}`.
fn parse_answer(bytes: &[u8]) -> Result<Value, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Answer("truncated answer".into()))
        }
        Err(e) => return Err(ClientError::Answer(format!("not HTTP: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let rest = &bytes[head..];
    let body = match len {
        Some(n) if n <= rest.len() => &rest[..n],
        Some(_) => {
            return Err(ClientError::Answer(
                "answer shorter than its Content-Length".into(),
            ))
        }
        None => rest,
    };
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ClientError::Answer(format!("{e}: {:?}", String::from_utf8_lossy(body))))?
    };
    if (200..300).contains(&status) {
        Ok(json!({"status": status, "body": value}))
    } else {
        let error = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        Ok(json!({"status": status, "error": error}))
    }
}

/// Sends `req` to the monitor serving the socket at `sock` and returns the answer as
/// `{"status": N, "body": ...}` or `{"status": N, "error": "..."}`. A request with a bad
/// method or path is an error here and never reaches the socket.
pub fn send(sock: &Path, req: &Request) -> Result<Value, ClientError> {
    let bytes = http_request(req)?;
    let conn_err = |source| ClientError::Connect {
        path: sock.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(sock).map_err(conn_err)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(conn_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(conn_err)?;
    stream.write_all(&bytes).map_err(conn_err)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .map_err(conn_err)?;
    parse_answer(&answer)
}

/// Sends one command-line request (the JSON text `{"method", "path", "body"}`) to the
/// monitor at `sock`: the `vmm api` command.
///
/// A request that is not `{"method", "path", "body"}` is answered here, in the same
/// shape, with status 400 (as the monitor answers a bad request): it never reaches the
/// socket.
pub fn call(sock: &Path, request: &str) -> Result<Value, ClientError> {
    let req: Request = match serde_json::from_str(request.trim()) {
        Ok(r) => r,
        Err(e) => return Ok(json!({"status": 400, "error": format!("malformed request: {e}")})),
    };
    match send(sock, &req) {
        Err(ClientError::Request(msg)) => Ok(json!({"status": 400, "error": msg})),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: Option<Value>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body,
        }
    }

    #[test]
    fn the_request_becomes_http_and_the_answer_json() {
        let r = http_request(&req("PATCH", "/vm", Some(json!({"vcpus": 1})))).unwrap();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("PATCH /vm HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Content-Length: 11\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"vcpus\":1}"), "{text}");
        assert!(http_request(&req("GET", "/v m", None)).is_err());
        assert!(http_request(&req("GET", "vm", None)).is_err());
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n").unwrap();
        assert_eq!(ok, json!({"status": 200, "body": {"a": 1}}));
        let err =
            parse_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}")
                .unwrap();
        assert_eq!(err, json!({"status": 404, "error": "x"}));
        assert!(parse_answer(b"garbage").is_err());
    }

    #[test]
    fn a_bad_command_line_request_is_answered_400_without_a_socket() {
        let missing = Path::new("/nonexistent/vmm.sock");
        let a = call(missing, "not json").unwrap();
        assert_eq!(a["status"], 400);
        let a = call(missing, r#"{"method":"GET","path":"no-slash"}"#).unwrap();
        assert_eq!(a["status"], 400);
        let e = call(missing, r#"{"method":"GET","path":"/vm"}"#).unwrap_err();
        assert!(e.monitor_gone(), "{e}");
    }
}
