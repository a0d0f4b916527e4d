//! The client side of the control API (`vmm api`): turns the JSON request of the command
//! line into an HTTP/1.1 request on the Unix socket and the answer back into one JSON
//! value, `{"status": 200, "body": ...}` or `{"status": 4xx, "error": "..."}`.
//!
//! The request is a few formatted lines; the answer is parsed by `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiError;

/// Largest answer read, in bytes.
const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// How long the client waits for the monitor.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The command line's request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    method: String,
    path: String,
    #[serde(default)]
    body: Option<Value>,
}

/// Builds the HTTP request for `{"method", "path", "body"}`.
fn http_request(request: &str) -> Result<Vec<u8>, ApiError> {
    let req: JsonRequest = serde_json::from_str(request.trim())
        .map_err(|e| ApiError::Request(format!("malformed request: {e}")))?;
    let ok_token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !ok_token(&req.method) || !ok_token(&req.path) || !req.path.starts_with('/') {
        return Err(ApiError::Request(format!(
            "method {:?} and path {:?} must be printable ASCII without spaces, the path starting with /",
            req.method, req.path
        )));
    }
    let body = req.body.map(|b| b.to_string()).unwrap_or_default();
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
fn parse_answer(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ApiError::Answer("truncated answer".into())),
        Err(e) => return Err(ApiError::Answer(format!("not HTTP: {e}"))),
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
            return Err(ApiError::Answer(
                "answer shorter than its Content-Length".into(),
            ))
        }
        None => rest,
    };
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::Answer(format!("{e}: {:?}", String::from_utf8_lossy(body))))?
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

/// Sends one request (`{"method", "path", "body"}`) to the monitor at `path` over HTTP and
/// returns the answer as `{"status": N, "body": ...}` or `{"status": N, "error": "..."}`.
///
/// A command-line request that is not `{"method", "path", "body"}` is answered here, in
/// the same shape, with status 400 (as the monitor answers a bad request): it never
/// reaches the socket.
pub fn call(path: &Path, request: &str) -> Result<Value, ApiError> {
    let bytes = match http_request(request) {
        Ok(b) => b,
        Err(ApiError::Request(msg)) => return Ok(json!({"status": 400, "error": msg})),
        Err(e) => return Err(e),
    };
    let conn_err = |source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(conn_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_request_becomes_http_and_the_answer_json() {
        let req = http_request(r#"{"method":"PATCH","path":"/vm","body":{"vcpus":1}}"#).unwrap();
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("PATCH /vm HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Content-Length: 11\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"vcpus\":1}"), "{text}");
        assert!(http_request(r#"{"method":"GET","path":"/v m"}"#).is_err());
        assert!(http_request("not json").is_err());
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n").unwrap();
        assert_eq!(ok, json!({"status": 200, "body": {"a": 1}}));
        let err =
            parse_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}")
                .unwrap();
        assert_eq!(err, json!({"status": 404, "error": "x"}));
        assert!(parse_answer(b"garbage").is_err());
    }
}
