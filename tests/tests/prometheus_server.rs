//! A real Prometheus server (Debian's `prometheus` package, installed by `scripts/test.sh`)
//! scrapes two running monitors; the test reads a performance-vector metric and a counter
//! of each VM back through Prometheus's HTTP query API, and `promtool check metrics`
//! passes on each monitor's endpoint.
//!
//! Everything listens on 127.0.0.1 ports picked by the kernel; the server's data goes in
//! a scratch directory. Without the binaries the test prints `skipped: ...`, and fails
//! under `CI=true`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{free_port, kernel_command, kvm_available, Scratch};
use serde_json::Value;

/// How long Prometheus may take to start and report both VMs.
const LIMIT: Duration = Duration::from_secs(60);

/// Kills the process when dropped, so that a failing test leaves nothing behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether Debian's `prometheus` and `promtool` are installed; fails under CI=true.
fn prometheus_available() -> bool {
    let ok = ["/usr/bin/prometheus", "/usr/bin/promtool"]
        .iter()
        .all(|p| Path::new(p).exists());
    if !ok {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("prometheus/promtool are missing and CI=true: scripts/test.sh installs Debian's prometheus package");
        }
        eprintln!("skipped: no prometheus (apt-get install prometheus)");
    }
    ok
}

/// `GET path` on 127.0.0.1:`port`; the body, or None if nothing answers yet.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The series of an instant query, as (labels, value) pairs.
fn query(port: u16, promql: &str) -> Vec<(Value, f64)> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some(body) = http_get(port, &format!("/api/v1/query?query={q}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| {
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"].clone(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_two_monitors_and_answers_queries() {
    if !kvm_available() || !prometheus_available() {
        return;
    }
    let dir = Scratch::new("prometheus-server");
    let ports = [free_port(), free_port()];
    let mut vms = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let addr = format!("127.0.0.1:{port}");
        let id = format!("vm-{i}");
        let child = kernel_command(
            "cpu-burn",
            &[
                "--cmdline",
                "ms=60000",
                "--metrics-addr",
                &addr,
                "--vm-id",
                &id,
                // vm-0 asks for an operation rate cpu-burn reaches, vm-1 for one it cannot.
                "--slo",
                if i == 0 {
                    "class=batch,min_ops=1"
                } else {
                    "class=critical,min_ops=1000000000"
                },
                "--timeout-ms",
                "90000",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
        vms.push(Killed(child));
    }

    // Each endpoint's text passes promtool's lint.
    let start = Instant::now();
    for port in ports {
        let body = loop {
            if let Some(b) = http_get(port, "/metrics").filter(|b| b.contains("vmm_tuner_feature"))
            {
                break b;
            }
            assert!(
                start.elapsed() < LIMIT,
                "monitor on {port} never served metrics"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut lint = Command::new("/usr/bin/promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn promtool");
        lint.stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("feed promtool");
        let out = lint.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics failed on {port}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A real server scrapes both every second.
    let prom_port = free_port();
    let config = dir.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vmm\n    static_configs:\n      - targets: ['127.0.0.1:{}', '127.0.0.1:{}']\n",
            ports[0], ports[1]
        ),
    )
    .expect("write prometheus.yml");
    let data = dir.path("data");
    let _server = Killed(
        Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus"),
    );

    // Both VMs' vector feature and guest-op counter come back through PromQL.
    let start = Instant::now();
    let features = loop {
        let features = query(prom_port, "vmm_tuner_feature{feature=\"cpu_utilisation\"}");
        let ops = query(prom_port, "vmm_guest_ops_total");
        if features.len() == 2 && ops.len() == 2 && ops.iter().all(|(_, v)| *v > 0.0) {
            break features;
        }
        assert!(
            start.elapsed() < LIMIT,
            "Prometheus did not report both VMs within {LIMIT:?}: features {features:?}, ops {ops:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut instances: Vec<String> = features
        .iter()
        .map(|(m, _)| m["instance"].as_str().unwrap_or_default().to_string())
        .collect();
    instances.sort();
    let mut want: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    want.sort();
    assert_eq!(instances, want);
    for (labels, v) in &features {
        assert!(
            (0.0..=1.0).contains(v),
            "a normalised feature out of [0, 1]: {labels} = {v}"
        );
    }
    // cpu-burn keeps its vCPU busy: the scraped utilisation says so.
    assert!(
        features.iter().any(|(_, v)| *v > 0.5),
        "cpu-burn's utilisation should be high: {features:?}"
    );
    // Each series names its VM (and host) itself, whatever Prometheus calls the target.
    let mut vms_seen: Vec<String> = features
        .iter()
        .map(|(m, _)| m["vm"].as_str().unwrap_or_default().to_string())
        .collect();
    vms_seen.sort();
    assert_eq!(vms_seen, ["vm-0", "vm-1"], "{features:?}");
    assert!(
        features
            .iter()
            .all(|(m, _)| !m["host"].as_str().unwrap_or_default().is_empty()),
        "{features:?}"
    );
    // The SLO verdict comes back through PromQL, per VM: met for the reachable target,
    // missed for the other.
    let start = Instant::now();
    loop {
        let met = query(prom_port, "vmm_slo_met{target=\"min_ops\"}");
        let of = |vm: &str| {
            met.iter()
                .find(|(m, _)| m["vm"].as_str() == Some(vm))
                .map(|(_, v)| *v)
        };
        if of("vm-0") == Some(1.0) && of("vm-1") == Some(0.0) {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the SLO verdicts did not come back through Prometheus: {met:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(vms);
}
