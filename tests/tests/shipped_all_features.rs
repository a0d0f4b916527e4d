//! The positive seccomp test: the binary that ships (target/release/vmm, filters on) runs
//! with every feature at once, under `strace -f`, and no thread is killed by SIGSYS and no
//! system call is refused with EPERM (the helper threads' filters refuse with EPERM rather
//! than killing, so a missing rule would otherwise go unseen).
//!
//! Two runs cover the features that cannot share a VM:
//! - drives with rate limits and priorities, a policy in charge, the state repository,
//!   the Prometheus endpoint (scraped), and the control API (every route, through curl);
//! - a network device on a TAP with a packet limit, the threshold tuner, the repository,
//!   the endpoint and the API, with UDP traffic through the guest. (Online learning is
//!   no longer part of the monitor: `vmm-learn online` runs in its own process.)
//!
//! Each needs the release binary, strace, curl and (the second) a network namespace; without
//! them it prints `skipped: ...`, and fails under CI=true.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::netns::Netns;
use integration_tests::{
    curl, free_port, kernel_path, kvm_available, vmm_release_bin, wait_for, Scratch,
};

/// How long a run may take under strace.
const LIMIT: Duration = Duration::from_secs(120);

/// The release binary, KVM, strace and curl, or `None` after a `skipped:` line.
fn tools() -> Option<PathBuf> {
    if !kvm_available() {
        return None;
    }
    let bin = vmm_release_bin()?;
    for tool in ["/usr/bin/strace", "/usr/bin/curl"] {
        if !Path::new(tool).exists() {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("{tool} is missing and CI=true: scripts/test.sh installs it");
            }
            eprintln!("skipped: {tool} is missing");
            return None;
        }
    }
    Some(bin)
}

/// One scrape of the Prometheus endpoint; the body.
fn scrape(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Waits for the traced monitor; kills it past [`LIMIT`].
fn finish(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "the traced monitor ran past {LIMIT:?}\n--- stdout\n{}\n--- stderr\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait")
}

/// The strace log's lines that show a seccomp refusal or kill.
fn refusals(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !text.is_empty(),
        "strace wrote nothing to {}",
        log.display()
    );
    text.lines()
        .filter(|l| l.contains("EPERM") || l.contains("SIGSYS"))
        .filter(|l| !glibc_heap_probe(l))
        .map(str::to_string)
        .collect()
}

/// glibc's one-time probe of `/proc/sys/vm/overcommit_memory`, made the first time a
/// thread's malloc arena gives memory back (`check_may_shrink_heap`): when the open fails
/// glibc takes "do not shrink by remapping" and goes on, once per process. A helper
/// thread's filter refusing it is the intended outcome, not a missing rule: widening
/// `openat` on every helper thread for it would be the defect.
fn glibc_heap_probe(line: &str) -> bool {
    line.contains(
        r#"openat(AT_FDCWD, "/proc/sys/vm/overcommit_memory", O_RDONLY|O_CLOEXEC) = -1 EPERM"#,
    )
}

/// `strace -f` (failed calls and signals only) around `vmm <args>`, optionally inside a
/// network namespace.
fn traced(ns: Option<&Netns>, log: &Path, bin: &Path, args: &[String]) -> Child {
    let strace_args = [
        "-f".to_string(),
        "-qq".to_string(),
        "-e".to_string(),
        "status=failed".to_string(),
        "-o".to_string(),
        log.display().to_string(),
        bin.display().to_string(),
    ];
    let mut cmd = match ns {
        Some(ns) => ns.command("/usr/bin/strace"),
        None => Command::new("/usr/bin/strace"),
    };
    cmd.args(strace_args)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn strace")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn drives_policy_repository_metrics_and_every_api_route_run_without_a_refused_call() {
    let Some(bin) = tools() else { return };
    let dir = Scratch::new("shipped-all-blk");
    for d in ["d0.img", "d1.img"] {
        let f = std::fs::File::create(dir.path(d)).expect("disk");
        f.set_len(16 << 20).expect("size");
    }
    let sock = dir.path("vmm.sock").display().to_string();
    let db = dir.path("runs.db").display().to_string();
    let log = dir.path("strace.log");
    let port = free_port();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/general.onnx");
    let kernel = kernel_path("blk-io");
    let args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--vcpus".into(),
        "2".into(),
        "--mem-mib".into(),
        "64".into(),
        "--drive".into(),
        format!(
            "path={},bw=20000000,iops=20000,priority=high",
            dir.path("d0.img").display()
        ),
        "--drive".into(),
        format!("path={},level=2", dir.path("d1.img").display()),
        "--cmdline".into(),
        "mode=randread devs=2 ms=5000 depth=4".into(),
        "--policy".into(),
        policy.display().to_string(),
        "--state-db".into(),
        db.clone(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
        "--api-sock".into(),
        sock.clone(),
        "--slo".into(),
        "class=critical,p99_us=500,min_ops=100".into(),
        "--timeout-ms".into(),
        "90000".into(),
        "--profile-hz".into(),
        "1000".into(),
    ];
    let child = traced(None, &log, &bin, &args);
    wait_for(&sock);

    // Every route, reads and writes, with good and bad bodies.
    let calls: [(&str, &str, Option<&str>, u16); 15] = [
        ("GET", "/vm", None, 200),
        ("GET", "/drives", None, 200),
        ("GET", "/policy", None, 200),
        (
            "PATCH",
            "/drives/blk0",
            Some(
                r#"{"priority":"low","rate_limiter":{"bandwidth":{"size":400000,"refill_time_ms":100}}}"#,
            ),
            200,
        ),
        ("PATCH", "/drives/blk1", Some(r#"{"rate_limiter":{}}"#), 200),
        ("PATCH", "/vm", Some(r#"{"vcpus":1,"host_cores":1}"#), 200),
        ("PATCH", "/vm", Some(r#"{"cpu_quota":0.5}"#), 200),
        ("PATCH", "/drives/nope", Some(r#"{"priority":"low"}"#), 404),
        ("PUT", "/vm", Some("{}"), 405),
        (
            "PUT",
            "/grant",
            Some(r#"{"cores":8,"drives":{"blk0":{"bandwidth_bps":100000000}}}"#),
            200,
        ),
        ("GET", "/grant", None, 200),
        ("GET", "/profile", None, 200),
        ("PUT", "/profile", Some(r#"{"hz":0}"#), 200),
        ("PUT", "/profile", Some(r#"{"hz":20000}"#), 400),
        ("PUT", "/profile", Some(r#"{"hz":997}"#), 200),
    ];
    for (method, path, body, want) in calls {
        let (code, text) = curl(&sock, method, path, body);
        assert_eq!(code, want, "{method} {path}: {text}");
    }
    // The profiler's client: a flame graph of one second.
    let svg = dir.path("flame.svg");
    let prof = Command::new(&bin)
        .args(["profile", "--api-sock", &sock, "--seconds", "1", "--out"])
        .arg(&svg)
        .output()
        .expect("vmm profile");
    assert!(
        prof.status.success() && svg.exists(),
        "vmm profile: {}",
        String::from_utf8_lossy(&prof.stderr)
    );
    let general = policy.display().to_string();
    let (code, text) = curl(
        &sock,
        "PUT",
        "/policy",
        Some(&format!(r#"{{"path":"{general}"}}"#)),
    );
    assert_eq!(code, 200, "PUT /policy: {text}");
    let metrics = scrape(port);
    assert!(
        metrics.contains("vmm_log_lines_suppressed_total"),
        "scrape: {metrics}"
    );
    // The SLO and the host view (run delays read from the vCPU threads' schedstat).
    // Every series carries the VM's id and the host's name.
    let series = |name: &str, label: &str| {
        metrics.lines().any(|l| {
            l.starts_with(&format!("{name}{{vm=\"")) && l.contains(",host=\"") && l.contains(label)
        })
    };
    assert!(
        series("vmm_slo_class", "class=\"critical\"} 1")
            && series("vmm_vcpu_run_delay_seconds_total", "vcpu=\"1\"}"),
        "scrape: {metrics}"
    );
    let (code, text) = curl(&sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{text}");
    assert_eq!(text["slo"]["class"], "critical", "{text}");

    let out = finish(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("blk-io: devs done devices=2"),
        "the guest did not finish its I/O:\n{stdout}"
    );
    let bad = refusals(&log);
    assert!(
        bad.is_empty(),
        "refused or killed system calls:\n{}",
        bad.join("\n")
    );
}

#[test]
fn network_tuner_repository_metrics_and_api_run_without_a_refused_call() {
    let Some(bin) = tools() else { return };
    let Some(ns) = Netns::create("shipall") else {
        return;
    };
    let dir = Scratch::new("shipped-all-net");
    let sock = dir.path("vmm.sock").display().to_string();
    let db = dir.path("runs.db").display().to_string();
    let log = dir.path("strace.log");
    let port = free_port();
    let kernel = kernel_path("net-echo");
    let mut args = strings(&["run", "--kernel"]);
    args.push(kernel.display().to_string());
    args.extend(strings(&[
        "--net",
        "tap=tap0,pps=20000",
        "--cmdline",
        "mode=echo ms=6000 ip=10.0.0.2",
        "--tuner",
        "threshold",
        "--state-db",
        &db,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--api-sock",
        &sock,
        "--timeout-ms",
        "90000",
    ]));
    let child = traced(Some(&ns), &log, &bin, &args);
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(1000));
    let script = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.1", 7000))
s.settimeout(0.5)
got = 0
for i in range(100):
    s.sendto(i.to_bytes(4, "little") + b"x" * 60, ("10.0.0.2", 7000))
    try:
        data, addr = s.recvfrom(2048)
        got += addr[0] == "10.0.0.2"
    except socket.timeout:
        pass
print(got)
"#;
    let peer = ns
        .command("python3")
        .args(["-c", script])
        .output()
        .expect("python3");
    for (method, path) in [("GET", "/vm"), ("GET", "/policy"), ("GET", "/drives")] {
        let (code, text) = curl(&sock, method, path, None);
        assert_eq!(code, 200, "{method} {path}: {text}");
    }
    let (code, text) = curl(&sock, "PATCH", "/vm", Some(r#"{"host_cores":1}"#));
    assert_eq!(code, 200, "PATCH /vm: {text}");
    // The metrics port is inside the namespace: scrape it from there.
    let scraped = ns
        .command("/usr/bin/curl")
        .args(["-s", "-m", "5", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .expect("curl metrics");
    assert!(
        String::from_utf8_lossy(&scraped.stdout).contains("vmm_tuner_feature"),
        "scrape failed"
    );

    let out = finish(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed: u32 = String::from_utf8_lossy(&peer.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        echoed >= 50,
        "only {echoed} of 100 packets came back: {}",
        String::from_utf8_lossy(&peer.stderr)
    );
    let bad = refusals(&log);
    assert!(
        bad.is_empty(),
        "refused or killed system calls:\n{}",
        bad.join("\n")
    );
}
