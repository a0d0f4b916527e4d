//! `vmm profile`: the client side of the profiler. Reads `GET /profile` of a running
//! monitor before and after a window, and writes the window's samples as folded stacks
//! and as an SVG flame graph (the `inferno` crate).
//!
//! Stacks have one frame per sample (`function count` lines): the monitor reads only the
//! instruction pointer, not the guest's stack, so the graph is flat, a bar per function
//! whose width is its share of the samples.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api_client::{ClientError, Request};
use serde_json::{json, Value};

/// Longest window.
pub const MAX_SECONDS: u64 = 3600;

/// Why `vmm profile` failed.
#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    /// The control socket could not be used.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The monitor refused a request.
    #[error("{request}: the monitor answered {status}: {error}")]
    Refused {
        /// The request.
        request: &'static str,
        /// HTTP status.
        status: u64,
        /// Its message.
        error: String,
    },
    /// The answer is not the profile's shape.
    #[error("GET /profile: unexpected answer: {0}")]
    Answer(String),
    /// A bad argument.
    #[error("{0}")]
    Argument(String),
    /// The profiler is off and no rate was given.
    #[error("the profiler is off: start the VM with --profile-hz N, or give --hz N here")]
    Off,
    /// No sample fell in the window.
    #[error("no samples in the window (are the vCPUs all parked?)")]
    NoSamples,
    /// An output file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What to profile and where to write it.
#[derive(Debug, Clone)]
pub struct FlameRequest {
    /// The monitor's control socket.
    pub sock: PathBuf,
    /// Length of the window.
    pub seconds: u64,
    /// SVG output.
    pub out: PathBuf,
    /// Folded stacks output, if wanted.
    pub folded: Option<PathBuf>,
    /// A rate to sample at during the window (the previous rate is restored after).
    pub hz: Option<u64>,
}

/// What a profile window gave.
#[derive(Debug, Clone, PartialEq)]
pub struct FlameSummary {
    /// Samples in the window.
    pub samples: u64,
    /// Functions with samples, most first.
    pub functions: Vec<(String, u64)>,
}

fn call(
    sock: &Path,
    request: &'static str,
    method: &str,
    body: Option<Value>,
) -> Result<Value, FlameError> {
    let answer = api_client::send(
        sock,
        &Request {
            method: method.into(),
            path: "/profile".into(),
            body,
        },
    )?;
    let status = answer.get("status").and_then(Value::as_u64).unwrap_or(0);
    if status != 200 {
        return Err(FlameError::Refused {
            request,
            status,
            error: answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(answer.get("body").cloned().unwrap_or(Value::Null))
}

/// The `hz` and per-function counts of a `GET /profile` body.
fn counts_of(body: &Value) -> Result<(u64, BTreeMap<String, u64>), FlameError> {
    let bad = |what: &str| FlameError::Answer(what.to_string());
    let hz = body
        .get("hz")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no hz"))?;
    let mut map = BTreeMap::new();
    for f in body
        .get("functions")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no functions"))?
    {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a function without a name"))?;
        let count = f
            .get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("a function without a count"))?;
        map.insert(name.to_string(), count);
    }
    Ok((hz, map))
}

/// The folded-stack lines of a window, most samples first.
pub fn folded_lines(functions: &[(String, u64)]) -> Vec<String> {
    functions.iter().map(|(n, c)| format!("{n} {c}")).collect()
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), FlameError> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| FlameError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Profiles the monitor at `req.sock` for `req.seconds` and writes the flame graph.
pub fn profile(req: &FlameRequest) -> Result<FlameSummary, FlameError> {
    if req.seconds == 0 || req.seconds > MAX_SECONDS {
        return Err(FlameError::Argument(format!(
            "--seconds {} is outside 1..={MAX_SECONDS}",
            req.seconds
        )));
    }
    let before = call(&req.sock, "GET /profile", "GET", None)?;
    let (old_hz, before) = counts_of(&before)?;
    if let Some(hz) = req.hz {
        call(&req.sock, "PUT /profile", "PUT", Some(json!({"hz": hz})))?;
    } else if old_hz == 0 {
        return Err(FlameError::Off);
    }
    std::thread::sleep(Duration::from_secs(req.seconds));
    let after = call(&req.sock, "GET /profile", "GET", None);
    if req.hz.is_some() {
        // Back to the rate in force before, whatever the window gave.
        call(
            &req.sock,
            "PUT /profile",
            "PUT",
            Some(json!({"hz": old_hz})),
        )?;
    }
    let (_, after) = counts_of(&after?)?;
    let mut functions: Vec<(String, u64)> = after
        .into_iter()
        .map(|(name, n)| {
            let d = n.saturating_sub(before.get(&name).copied().unwrap_or(0));
            (name, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    functions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let samples: u64 = functions.iter().map(|f| f.1).sum();
    if samples == 0 {
        return Err(FlameError::NoSamples);
    }
    let lines = folded_lines(&functions);
    if let Some(path) = &req.folded {
        let mut text = lines.join("\n");
        text.push('\n');
        write_file(path, text.as_bytes())?;
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("guest profile, {} s", req.seconds);
    opts.count_name = "samples".into();
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg)
        .map_err(|source| FlameError::Write {
            path: req.out.clone(),
            source,
        })?;
    write_file(&req.out, &svg)?;
    Ok(FlameSummary { samples, functions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_body_gives_its_counts_and_bad_ones_are_named() {
        let body = json!({"hz": 100, "functions": [{"name": "a", "count": 3}]});
        let (hz, m) = counts_of(&body).expect("counts");
        assert_eq!(hz, 100);
        assert_eq!(m.get("a"), Some(&3));
        let e = counts_of(&json!({"hz": 1, "functions": [{"count": 1}]})).unwrap_err();
        assert!(e.to_string().contains("without a name"), "{e}");
        assert!(counts_of(&json!({})).is_err());
    }

    #[test]
    fn folded_lines_are_one_frame_and_a_count() {
        let lines = folded_lines(&[("cpu_burn::burn".into(), 97), ("[unknown]".into(), 3)]);
        assert_eq!(lines, vec!["cpu_burn::burn 97", "[unknown] 3"]);
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(
            &mut inferno::flamegraph::Options::default(),
            lines.iter().map(String::as_str),
            &mut svg,
        )
        .expect("svg");
        let svg = String::from_utf8(svg).expect("utf8");
        assert!(svg.contains("<svg") && svg.contains("cpu_burn::burn"));
    }
}
