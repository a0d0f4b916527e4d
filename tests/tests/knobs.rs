//! The one knob state: a `PATCH /drives` made while the tuner runs goes through the
//! knob controller, so `GET /vm` and the tuner's next decision (the knob levels it read
//! and its mask) see the new level under a higher generation; and the tuner decides on
//! the current interval's sample (the control loop: no queue in front of it).

use std::time::{Duration, Instant};

use integration_tests::{curl, kernel_command, kvm_available, wait_for, Scratch};

/// The control loop's interval in these tests.
const INTERVAL_MS: u64 = 200;

fn disk(dir: &Scratch) -> String {
    let p = dir.path("d.img");
    std::fs::write(&p, vec![0u8; 16 << 20]).unwrap();
    p.to_str().unwrap().to_string()
}

/// `GET /vm` until `done` holds for it (at most 10 s); the last answer.
fn vm_until(sock: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, v) = curl(sock, "GET", "/vm", None);
        assert_eq!(code, 200, "{v}");
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn allowed(v: &serde_json::Value) -> Vec<String> {
    v["tuner"]["allowed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_drive_limit_patched_while_the_tuner_runs_is_what_the_tuner_and_get_vm_see_next() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("knobs-patch");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    // The static policy decides every interval (noop) without touching the knobs: the
    // only writer of blk0's limit is the API.
    let mut child = kernel_command("blk-io", &["--mem-mib", "64"])
        .args(["--drive", &format!("path={}", disk(&dir))])
        .args(["--cmdline", "mode=randread ms=8000 depth=4"])
        .args(["--tuner", "static", "--api-sock", sock])
        .args(["--metrics-interval-ms", &INTERVAL_MS.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);

    // Before: level 0 (unlimited), and the tuner has decided on it at least once.
    let before = vm_until(sock, |v| v["tuner"]["decisions"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(before["knobs"]["drives"][0]["rate_level"], 0, "{before}");
    assert_eq!(
        before["tuner"]["knobs_seen"]["rate_level"][0], 0,
        "{before}"
    );
    let g0 = before["knobs"]["generation"].as_u64().unwrap();
    assert!(
        allowed(&before).iter().any(|a| a == "rl:blk0:2"),
        "{before}"
    );

    // A user's limit off the ladder: 45 MB/s and 5000 ops/s, nearest to level 2
    // (50 MB/s + 5 kiops). The level is computed once, when the limit is given.
    let (code, patched) = curl(
        sock,
        "PATCH",
        "/drives/blk0",
        Some(
            r#"{"rate_limiter":{"bandwidth":{"size":4500000,"refill_time_ms":100},
                "ops":{"size":500,"refill_time_ms":100}}}"#,
        ),
    );
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["rate_level"], 2, "{patched}");
    let g1 = patched["generation"].as_u64().unwrap();
    assert!(g1 > g0, "generation {g1} after {g0}");

    // GET /vm shows the new level and generation at once; the tuner's next decision
    // is made on them: level 2 read, and "rl:blk0:2" (no change) masked.
    let after = vm_until(sock, |v| {
        v["tuner"]["knob_generation"].as_u64().unwrap_or(0) >= g1
    });
    assert!(
        after["knobs"]["generation"].as_u64().unwrap() >= g1,
        "{after}"
    );
    assert_eq!(after["knobs"]["drives"][0]["rate_level"], 2, "{after}");
    assert_eq!(
        after["knobs"]["drives"][0]["rate_limiter"]["bandwidth"]["size"], 4_500_000,
        "{after}"
    );
    assert!(
        after["tuner"]["knob_generation"].as_u64().unwrap() >= g1,
        "the tuner never decided on generation {g1}: {after}"
    );
    assert_eq!(after["tuner"]["knobs_seen"]["rate_level"][0], 2, "{after}");
    let mask = allowed(&after);
    assert!(!mask.iter().any(|a| a == "rl:blk0:2"), "{mask:?}");
    assert!(mask.iter().any(|a| a == "rl:blk0:1"), "{mask:?}");
    assert_eq!(after["tuner"]["outside_changes"], 1, "{after}");

    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_tuner_decides_on_the_current_interval_s_sample() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("knobs-age");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let mut child = kernel_command("blk-io", &["--mem-mib", "64"])
        .args(["--drive", &format!("path={}", disk(&dir))])
        .args(["--cmdline", "mode=randread ms=6000 depth=4"])
        .args(["--tuner", "threshold", "--api-sock", sock])
        .args(["--metrics-interval-ms", &INTERVAL_MS.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    let v = vm_until(sock, |v| {
        v["tuner"]["decisions"].as_u64().unwrap_or(0) >= 10
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(v["tuner"]["decisions"].as_u64().unwrap() >= 10, "{v}");
    // From the interval's snapshot to the decision applied: the oldest of at least ten
    // decisions is younger than one interval.
    let age_max = v["tuner"]["sample_age_ns_max"].as_u64().unwrap();
    let age_last = v["tuner"]["sample_age_ns"].as_u64().unwrap();
    assert!(age_last > 0, "{v}");
    assert!(
        age_max < INTERVAL_MS * 1_000_000,
        "a decision was made on a sample {age_max} ns old (interval {INTERVAL_MS} ms): {v}"
    );
}
