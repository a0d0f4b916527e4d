//! Framing one HTTP/1.1 request out of the bytes a connection has sent so far: the
//! request line and headers are parsed by `httparse`; the body is `Content-Length` bytes
//! (no chunked bodies), both under a size cap.
//!
//! No dependency beyond `httparse`, so the fuzz target (`fuzz/fuzz_targets/api_request.rs`)
//! includes this file as it is.

/// Largest request body accepted, in bytes (larger: 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest request line plus headers, in bytes (larger: 413).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Headers parsed per request (more: 400).
const MAX_HEADERS: usize = 32;

/// What the bytes read so far hold.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// More bytes needed; `expects_continue` if the client waits for `100 Continue`.
    Incomplete {
        /// The client sent `Expect: 100-continue`.
        expects_continue: bool,
    },
    /// A whole request.
    Complete {
        /// The method, as sent.
        method: String,
        /// The request target.
        path: String,
        /// Where the body starts in the buffer.
        body_start: usize,
        /// The body's length.
        body_len: usize,
    },
    /// Not a request this server takes: status and reason.
    Refused(u16, String),
}

fn header_is(value: &[u8], want: &str) -> bool {
    std::str::from_utf8(value).is_ok_and(|v| v.trim().eq_ignore_ascii_case(want))
}

/// Frames one request in `buf`.
pub fn frame(buf: &[u8]) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Frame::Refused(
                413,
                format!("request line and headers larger than {MAX_HEAD_BYTES} bytes"),
            )
        }
        Ok(httparse::Status::Partial) => {
            return Frame::Incomplete {
                expects_continue: false,
            }
        }
        Err(e) => return Frame::Refused(400, format!("not an HTTP/1.1 request: {e}")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Frame::Refused(
            413,
            format!("request line and headers larger than {MAX_HEAD_BYTES} bytes"),
        );
    }
    let mut body_len: Option<usize> = None;
    let mut expects_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Frame::Refused(
                400,
                "chunked bodies are not taken: send Content-Length".into(),
            );
        }
        if h.name.eq_ignore_ascii_case("expect") && header_is(h.value, "100-continue") {
            expects_continue = true;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match n {
                Some(n) if body_len.is_none_or(|b| b as u64 == n) => {
                    if n > MAX_BODY_BYTES as u64 {
                        return Frame::Refused(
                            413,
                            format!("body of {n} bytes, larger than {MAX_BODY_BYTES}"),
                        );
                    }
                    body_len = Some(n as usize);
                }
                _ => return Frame::Refused(400, "bad or conflicting Content-Length".into()),
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    if buf.len() < head_len + body_len {
        return Frame::Incomplete { expects_continue };
    }
    Frame::Complete {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        body_start: head_len,
        body_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_waits_for_the_body_and_refuses_what_is_too_large() {
        let get = b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n";
        assert_eq!(
            frame(get),
            Frame::Complete {
                method: "GET".into(),
                path: "/vm".into(),
                body_start: get.len(),
                body_len: 0
            }
        );
        assert_eq!(
            frame(&get[..10]),
            Frame::Incomplete {
                expects_continue: false
            }
        );
        let put = b"PUT /policy HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n{}";
        assert_eq!(
            frame(put),
            Frame::Incomplete {
                expects_continue: true
            }
        );
        let big = format!(
            "PUT /policy HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert!(matches!(frame(big.as_bytes()), Frame::Refused(413, _)));
        let long_head = vec![b'A'; MAX_HEAD_BYTES + 1];
        assert!(matches!(frame(&long_head), Frame::Refused(413, _)));
        assert!(matches!(
            frame(b"\x00\x01garbage\r\n\r\n"),
            Frame::Refused(400, _)
        ));
        let chunked = b"PUT /policy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(frame(chunked), Frame::Refused(400, _)));
        let twice = b"PUT /policy HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(frame(twice), Frame::Refused(400, _)));
    }
}
