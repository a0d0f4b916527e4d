//! Telemetry end to end: the state repository's rows against what the guest itself
//! reported, a `kill -9` of the monitor against the SQLite file, and a Prometheus scrape
//! of a running guest.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::{kernel_command, kvm_available, run_kernel, Scratch};
use tuner::schema::Schema;
use tuner::state_repo::{RepoConfig, StateRepo};

const LIMIT: Duration = Duration::from_secs(90);

fn feature(name: &str) -> usize {
    Schema::index_of(name).unwrap_or_else(|| panic!("no feature {name}"))
}

#[test]
fn stored_rows_match_the_rates_the_guest_reported() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("tel-rows");
    let disk = dir.path("d.img");
    std::fs::write(&disk, vec![0u8; 64 << 20]).unwrap();
    let db = dir.path("state.db");
    let spec = format!("path={},bw=8000000", disk.display());
    let run = run_kernel(
        "blk-io",
        &[
            "--drive",
            &spec,
            "--mem-mib",
            "64",
            "--state-db",
            db.to_str().unwrap(),
            "--metrics-interval-ms",
            "100",
            "--cmdline",
            "mode=seqread ms=3000 depth=4 bs=65536",
        ],
        LIMIT,
    );
    run.expect_status(0);
    let guest_rate: f64 = run
        .stdout
        .lines()
        .find(|l| l.starts_with("blk-io: mode=seqread"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("bytes_per_sec="))
        })
        .and_then(|v| v.parse().ok())
        .expect("result line");
    let repo = StateRepo::open(&db, RepoConfig::default()).unwrap();
    let rows = repo.rows("vm0", 0).unwrap();
    assert!(
        rows.len() >= 25,
        "3 s at 100 ms should give ~30 rows, got {}",
        rows.len()
    );
    // The middle of the run (skip boot and the tail): monitor-measured I/O bytes/s and
    // guest-reported ops/s against the guest's own figures.
    let busy: Vec<_> = rows
        .iter()
        .filter(|r| r.raw[feature("io_bytes_rate")] > 0.0)
        .collect();
    let mid = &busy[3..busy.len() - 3];
    let mean = |f: usize| mid.iter().map(|r| r.raw[f]).sum::<f64>() / mid.len() as f64;
    let monitor_bytes = mean(feature("io_bytes_rate"));
    let guest_ops = mean(feature("guest_ops_rate"));
    eprintln!("guest {guest_rate:.0} B/s; rows: monitor {monitor_bytes:.0} B/s, guest-reported {guest_ops:.1} ops/s");
    let ratio = monitor_bytes / guest_rate;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "stored I/O rate / guest rate = {ratio:.3}"
    );
    let ratio = guest_ops * 65536.0 / guest_rate;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "stored guest ops rate / guest rate = {ratio:.3}"
    );
    assert!(rows
        .iter()
        .all(|r| r.schema_version == tuner::schema::SCHEMA_VERSION));
}

#[test]
fn kill_9_loses_at_most_the_last_second_and_never_corrupts() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("tel-kill");
    let db = dir.path("state.db");
    let mut child = kernel_command("cpu-burn", &["--cmdline", "ms=20000"])
        .args([
            "--state-db",
            db.to_str().unwrap(),
            "--metrics-interval-ms",
            "50",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(3000));
    // SIGKILL: no chance to flush.
    child.kill().unwrap();
    let lived = start.elapsed();
    child.wait().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let repo = StateRepo::open(&db, RepoConfig::default()).unwrap();
    let rows = repo.rows("vm0", 0).unwrap();
    let last_ns = rows.iter().map(|r| r.ts_ns).max().unwrap_or(0);
    let lost = lived.as_secs_f64() - last_ns as f64 / 1e9;
    eprintln!(
        "{} rows; the last one {lost:.2} s before the kill",
        rows.len()
    );
    assert!(lost < 1.0, "lost {lost:.2} s of rows");
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn prometheus_counters_rise_while_the_guest_runs() {
    if !kvm_available() {
        return;
    }
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut child = kernel_command("cpu-burn", &["--cmdline", "ms=4000 report_ms=20"])
        .args(["--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let first = scrape(&addr);
    std::thread::sleep(Duration::from_millis(1000));
    let second = scrape(&addr);
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first.contains("# TYPE vmm_vcpu_exits_total counter"),
        "{first}"
    );
    for name in [
        "vmm_guest_ops_total",
        "vmm_vcpu_exits_total",
        "vmm_vcpu_guest_seconds_total",
    ] {
        let (a, b) = (metric(&first, name), metric(&second, name));
        assert!(b > a, "{name} did not rise: {a} -> {b}");
    }
}

#[test]
fn dirty_pages_of_a_memory_toucher_are_counted() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("tel-dirty");
    let db = dir.path("state.db");
    run_kernel(
        "mem-touch",
        &[
            "--mem-mib",
            "128",
            "--cmdline",
            "mib=64",
            "--state-db",
            db.to_str().unwrap(),
            "--metrics-interval-ms",
            "20",
        ],
        LIMIT,
    )
    .expect_status(0);
    let repo = StateRepo::open(&db, RepoConfig::default()).unwrap();
    let rows = repo.rows("vm0", 0).unwrap();
    let f = feature("dirty_page_rate");
    // 64 MiB touched once = 16384 pages; the rates times the intervals add up to nearly
    // that (the pages of the last, unsampled stretch before the guest exits are missed).
    let pages: f64 = rows
        .iter()
        .map(|r| r.raw[f] * r.interval_ns as f64 / 1e9)
        .sum();
    eprintln!("{} rows, {pages:.0} dirty pages", rows.len());
    assert!(
        (16384.0 * 0.8..=16384.0 * 1.2).contains(&pages),
        "only {pages:.0} dirty pages counted"
    );
}

#[test]
fn metrics_endpoint_does_not_disturb_a_clean_exit() {
    if !kvm_available() {
        return;
    }
    let port = 40000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    run_kernel(
        "hello",
        &["--metrics-addr", &addr, "--state-db", "/dev/null/x"],
        LIMIT,
    )
    .expect_status(2);
    run_kernel("hello", &["--metrics-addr", &addr], LIMIT)
        .expect_status(0)
        .expect_line("Hello from test kernel");
}
