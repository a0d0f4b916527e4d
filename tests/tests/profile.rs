//! The guest profiler on real VMs: the hottest function of `cpu-burn` is its burn loop,
//! `blk-io`'s polling wait shows, the rate changes at run time through the API, a
//! `System.map` names the functions, `vmm profile` writes a flame graph, and bad
//! settings are refused with clear errors.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    curl, kernel_command, kernel_path, kvm_available, run_kernel, thread_is_filtered, vmm,
    wait_for, Scratch,
};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// Stops the VM with SIGTERM and checks that it ends gracefully (status 143).
fn stop(child: Child) {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(143),
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /profile` until it holds at least `min` samples (or 20 s pass).
fn profile_with(sock: &str, min: u64) -> Value {
    let start = Instant::now();
    loop {
        let (code, p) = curl(sock, "GET", "/profile", None);
        assert_eq!(code, 200, "{p}");
        if p["samples"].as_u64().unwrap_or(0) >= min || start.elapsed() > Duration::from_secs(20) {
            return p;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The share of the function `name` in a profile (0 when absent).
fn share_of(p: &Value, name: &str) -> f64 {
    p["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f["share"].as_f64())
        .unwrap_or(0.0)
}

#[test]
fn the_burn_loop_is_the_top_function_of_cpu_burn_and_the_flame_graph_shows_it() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("profile-burn");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let db = dir.path("t.db");
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=60000"])
        .args(["--profile-hz", "200", "--api-sock", sock])
        .args(["--state-db", db.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for(sock);
    let p = profile_with(sock, 200);
    let top = &p["functions"][0];
    assert_eq!(top["name"], "cpu_burn::burn", "{p}");
    assert_eq!(top["class"], "compute", "{p}");
    assert!(top["share"].as_f64().unwrap() > 0.9, "{p}");
    assert_eq!(p["hz"], 200, "{p}");
    assert_eq!(
        p["symbols"]["source"].as_str(),
        kernel_path("cpu-burn").to_str(),
        "{p}"
    );
    assert!(
        thread_is_filtered(child.id(), "vmm-profiler"),
        "the profiler thread runs under its seccomp role"
    );
    // The latest interval's shares in GET /vm.
    let (code, vm) = curl(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{vm}");
    let interval = &vm["profile"]["interval"];
    assert!(interval["samples"].as_u64().unwrap_or(0) > 0, "{vm}");
    assert!(interval["compute_share"].as_f64().unwrap() > 0.8, "{vm}");
    assert!(interval["hottest_share"].as_f64().unwrap() > 0.8, "{vm}");
    assert!(interval["idle_share"].as_f64().unwrap() < 0.2, "{vm}");

    // A flame graph of one second.
    let svg = dir.path("flame.svg");
    let folded = dir.path("folded.txt");
    let out = vmm(
        &[
            "profile",
            "--api-sock",
            sock,
            "--seconds",
            "1",
            "--out",
            svg.to_str().unwrap(),
            "--folded",
            folded.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    let svg = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        svg.starts_with("<?xml") && svg.contains("cpu_burn::burn"),
        "{svg:.300}"
    );
    let folded = std::fs::read_to_string(&folded).expect("folded");
    let first = folded.lines().next().expect("a line");
    let (name, count) = first.rsplit_once(' ').expect("name count");
    assert_eq!(name, "cpu_burn::burn", "{folded}");
    // About 200 samples in one second (the 2-core host is shared with other VMs and
    // builds: at least a fifth).
    let count: u64 = count.parse().expect("count");
    assert!((40..=400).contains(&count), "{folded}");
    stop(child);
}

#[test]
fn blk_io_shows_its_polling_wait_in_the_io_driver() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("profile-blk");
    let disk = dir.path("d.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("blk-io", &["--mem-mib", "64"])
        .args(["--drive", &format!("path={}", disk.display())])
        .args(["--cmdline", "mode=randread ms=60000 depth=4"])
        .args(["--profile-hz", "500", "--api-sock", sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for(sock);
    let p = profile_with(sock, 500);
    let poll = share_of(&p, "blk_io::Pump::poll_completion")
        + share_of(&p, "blk_io::rt::virtio::Blk::poll");
    assert!(poll > 0.1, "the driver's polling shows: {p}");
    let io: f64 = p["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["class"] == "io")
        .map(|f| f["share"].as_f64().unwrap())
        .sum();
    assert!(io > 0.9, "{p}");
    stop(child);
}

#[test]
fn the_rate_changes_at_run_time_and_a_system_map_names_the_functions() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("profile-map");
    // A System.map from the kernel's own symbols, renamed so that the names can only
    // come from the map.
    let table = vmm::profiler::SymbolTable::from_elf(&kernel_path("cpu-burn")).expect("symbols");
    let mut map = String::new();
    for s in table.symbols() {
        let name = s.name.replace("::", "__");
        map.push_str(&format!("{:016x} T map_{name}\n", s.start));
    }
    map.push_str("0000000000300000 D some_data\n");
    let map_path = dir.path("System.map");
    std::fs::write(&map_path, map).unwrap();
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=60000"])
        .args(["--symbols", map_path.to_str().unwrap(), "--api-sock", sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for(sock);
    // Off by default: no samples.
    std::thread::sleep(Duration::from_millis(300));
    let (code, p) = curl(sock, "GET", "/profile", None);
    assert_eq!(
        (code, &p["hz"], &p["samples"]),
        (200, &0.into(), &0.into()),
        "{p}"
    );
    // Refused rates leave it off.
    for body in [r#"{"hz": 10001}"#, r#"{"hz": -5}"#, r#"{"rate": 5}"#] {
        let (code, e) = curl(sock, "PUT", "/profile", Some(body));
        assert_eq!(code, 400, "{body}: {e}");
    }
    let (code, e) = curl(sock, "PUT", "/profile", Some(r#"{"hz": 10001}"#));
    assert!(
        e["error"].as_str().unwrap().contains("1..=10000"),
        "{code} {e}"
    );
    let (code, p) = curl(sock, "PUT", "/profile", Some(r#"{"hz": 300}"#));
    assert_eq!((code, &p["hz"]), (200, &300.into()), "{p}");
    let p = profile_with(sock, 150);
    assert_eq!(p["functions"][0]["name"], "map_cpu_burn__burn", "{p}");
    assert_eq!(p["symbols"]["source"].as_str(), map_path.to_str(), "{p}");
    // Off again: the count stops.
    let (code, _) = curl(sock, "PUT", "/profile", Some(r#"{"hz": 0}"#));
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_millis(100));
    let (_, a) = curl(sock, "GET", "/profile", None);
    std::thread::sleep(Duration::from_millis(500));
    let (_, b) = curl(sock, "GET", "/profile", None);
    assert_eq!(a["samples"], b["samples"], "{a} {b}");
    assert_eq!(b["hz"], 0, "{b}");
    stop(child);
}

#[test]
fn bad_profiler_settings_are_refused_with_clear_errors() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("profile-bad");
    for (hz, want) in [("0", "1..=10000"), ("10001", "10001 is outside")] {
        let r = run_kernel("hello", &["--profile-hz", hz], LIMIT);
        assert_eq!(r.status, Some(2), "{r:?}");
        assert!(
            r.stderr.contains("profile_hz (--profile-hz)") && r.stderr.contains(want),
            "{}",
            r.stderr
        );
    }
    let r = run_kernel("hello", &["--profile-hz", "lots"], LIMIT);
    assert_eq!(r.status, Some(2), "{r:?}");
    // A symbols file that is not a System.map.
    let junk = dir.path("junk.map");
    std::fs::write(&junk, "hello world\n").unwrap();
    let r = run_kernel("hello", &["--symbols", junk.to_str().unwrap()], LIMIT);
    assert_eq!(r.status, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("symbols (--symbols)") && r.stderr.contains("line 1"),
        "{}",
        r.stderr
    );
    // A missing one.
    let r = run_kernel("hello", &["--symbols", "/nonexistent/System.map"], LIMIT);
    assert_eq!(r.status, Some(2), "{r:?}");
    assert!(r.stderr.contains("symbols (--symbols)"), "{}", r.stderr);
    // A FIFO with no writer: refused at once, no hang.
    let fifo = dir.path("map.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path in the scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = run_kernel("hello", &["--symbols", fifo.to_str().unwrap()], LIMIT);
    assert_eq!(r.status, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    // vmm profile against a VM without the profiler on, and with a bad window.
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=60000", "--api-sock", sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for(sock);
    let svg = dir.path("x.svg");
    let svg = svg.to_str().unwrap();
    let r = vmm(
        &[
            "profile",
            "--api-sock",
            sock,
            "--seconds",
            "1",
            "--out",
            svg,
        ],
        LIMIT,
    );
    assert_eq!(r.status, Some(1), "{r:?}");
    assert!(r.stderr.contains("the profiler is off"), "{}", r.stderr);
    let r = vmm(
        &[
            "profile",
            "--api-sock",
            sock,
            "--seconds",
            "0",
            "--out",
            svg,
        ],
        LIMIT,
    );
    assert!(r.stderr.contains("--seconds 0 is outside"), "{}", r.stderr);
    // With --hz the window samples and the rate goes back to off.
    let r = vmm(
        &[
            "profile",
            "--api-sock",
            sock,
            "--seconds",
            "1",
            "--hz",
            "100",
            "--out",
            svg,
        ],
        LIMIT,
    );
    assert_eq!(r.status, Some(0), "{r:?}");
    assert!(r.stdout.contains("cpu_burn::burn"), "{}", r.stdout);
    let (_, p) = curl(sock, "GET", "/profile", None);
    assert_eq!(p["hz"], 0, "{p}");
    stop(child);
}
