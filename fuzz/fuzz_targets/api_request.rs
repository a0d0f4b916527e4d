//! Fuzzes the control API's request path: arbitrary bytes from a client are framed as an
//! HTTP/1.1 request (`vmm/src/api/framing.rs`, httparse) and the request parsed into a
//! typed command (`vmm/src/api/request.rs`); a second pass feeds the command parser a
//! method, path and body taken straight from the input. Neither may panic, and a framed
//! body must lie inside the bytes read.
//!
//! The two files are included by path: they depend on httparse, serde and serde_json
//! only, so this target does not build the monitor (tract, burn) under the sanitizer.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../vmm/src/api/framing.rs"]
mod framing;
#[allow(dead_code)]
#[path = "../../vmm/src/api/request.rs"]
mod request;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "get"];

fuzz_target!(|data: &[u8]| {
    // 1. The bytes as a connection would send them.
    if let framing::Frame::Complete {
        method,
        path,
        body_start,
        body_len,
    } = framing::frame(data)
    {
        assert!(body_start + body_len <= data.len());
        assert!(body_len <= framing::MAX_BODY_BYTES);
        let body = &data[body_start..body_start + body_len];
        if let Err(e) = request::parse(&method, &path, body) {
            assert!(matches!(e.status(), 400 | 404 | 405));
        }
    }
    // 2. The parser alone: first byte picks a method, then path up to a newline, then body.
    if let Some((&m, rest)) = data.split_first() {
        let method = METHODS[m as usize % METHODS.len()];
        let (path, body) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let path = String::from_utf8_lossy(path);
        match request::parse(method, &path, body) {
            Ok(cmd) => {
                let _ = cmd.on_event_loop();
            }
            Err(e) => assert!(matches!(e.status(), 400 | 404 | 405)),
        }
    }
});
