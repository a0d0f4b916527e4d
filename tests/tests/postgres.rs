//! The state repository on PostgreSQL: a private server per test (`integration_tests::
//! postgres`), a real VM writing into it, copies SQLite -> PostgreSQL -> SQLite, the
//! server stopped mid-run and restarted, and the errors for bad input.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use integration_tests::postgres::{Postgres, PASSWORD};
use integration_tests::{api, kernel_command, kvm_available, vmm, wait_for, Scratch};
use tuner::schema::FEATURES;
use tuner::slo::SloClass;
use tuner::state_repo::{
    event_kind, Event, Location, RepoConfig, RepoError, Row, RowFilter, SloColumns, StateRepo,
};

fn loc(s: &str) -> Location {
    Location::parse(s).expect("location")
}

fn row(vm: &str, t: u64) -> Row {
    let n = FEATURES.len();
    Row {
        vm_id: vm.into(),
        ts_ns: t,
        interval_ns: 100_000_000,
        schema_version: tuner::schema::SCHEMA_VERSION,
        vector: (0..n).map(|i| (i as f32 + t as f32) / 100.0).collect(),
        raw: (0..n).map(|i| i as f64 * 1.5 + t as f64).collect(),
        action: (t.is_multiple_of(3)).then(|| format!("a{t}")),
        reward: (t.is_multiple_of(2)).then_some(t as f64 * 0.25),
        policy_id: "static".into(),
        config: r#"{"vcpus":2}"#.into(),
        anomaly: Some(t.is_multiple_of(5)),
        anomaly_score: Some(t as f64),
        slo: (t.is_multiple_of(4)).then_some(SloColumns {
            class: SloClass::Critical,
            met: t.is_multiple_of(8),
            p99_margin: Some(0.5),
            ops_margin: None,
        }),
    }
}

fn quick() -> RepoConfig {
    RepoConfig {
        commit_interval: Duration::from_millis(20),
        anomaly: None,
        ..RepoConfig::default()
    }
}

#[test]
fn rows_events_and_outcomes_round_trip_with_host_ids_and_partitions() {
    let Some(pg) = Postgres::start("roundtrip") else {
        return;
    };
    pg.create_db("rt");
    let url = loc(&pg.url("rt"));
    let cfg = RepoConfig {
        host_id: Some("host-a".into()),
        ..quick()
    };
    let repo = StateRepo::open_at(&url, cfg).expect("open");
    assert!(!repo.stats().degraded);
    let w = repo.writer();
    for t in 0..500u64 {
        w.insert(row(if t.is_multiple_of(2) { "vm-a" } else { "vm-b" }, t))
            .expect("queued");
    }
    w.record_event(Event {
        ts_ns: 3,
        vm_id: "vm-a".into(),
        kind: event_kind::ROLLBACK.into(),
        detail: "reward fell".into(),
    })
    .expect("event");
    w.record_outcome("vm-a", 2, Some("cpu_quota=0.5".into()), Some(-1.25))
        .expect("outcome");
    repo.flush().expect("flush");
    let stats = repo.close().expect("close");
    assert_eq!((stats.rows_written, stats.rows_dropped), (500, 0));

    let reader = StateRepo::open_read_only_at(&url).expect("read-only");
    let a = reader.rows("vm-a", 0).expect("rows");
    assert_eq!(a.len(), 250);
    let mut want = row("vm-a", 2);
    want.action = Some("cpu_quota=0.5".into());
    want.reward = Some(-1.25);
    assert_eq!(a[1], want);
    assert_eq!(a[10], row("vm-a", 20));
    assert_eq!(reader.count().expect("count"), 500);
    let ev = reader.events(Some("vm-a"), 0).expect("events");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].detail, "reward fell");
    // Filters: host, scenario label (VM id prefix), time range.
    let f = |host: Option<&str>, scenario: Option<&str>| RowFilter {
        host_id: host.map(str::to_string),
        scenario: scenario.map(str::to_string),
        ..RowFilter::default()
    };
    assert_eq!(reader.select(&f(Some("host-a"), None)).unwrap().len(), 500);
    assert_eq!(reader.select(&f(Some("host-b"), None)).unwrap().len(), 0);
    assert_eq!(reader.select(&f(None, Some("vm-b"))).unwrap().len(), 250);
    let future = RowFilter {
        from_wall_ns: Some(i64::MAX - 1),
        ..RowFilter::default()
    };
    assert_eq!(reader.select(&future).unwrap().len(), 0);
    // Stored with the host id, in a day partition, under schema layout 1.
    assert_eq!(
        pg.psql("rt", "SELECT DISTINCT host_id FROM samples"),
        "host-a"
    );
    assert_eq!(
        pg.psql(
            "rt",
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'samples'::regclass"
        ),
        "1"
    );
    assert_eq!(pg.psql("rt", "SELECT version FROM repo_version"), "1");
}

#[test]
fn export_copies_sqlite_to_postgres_and_back_unchanged() {
    let Some(pg) = Postgres::start("export") else {
        return;
    };
    pg.create_db("fleet");
    let dir = Scratch::new("pg-export");
    let a = dir.path("a.db");
    {
        let repo = StateRepo::open(&a, quick()).expect("open");
        let w = repo.writer();
        for t in 0..300 {
            w.insert(row(&format!("vm-{}", t % 3), t)).expect("queued");
        }
        w.record_event(Event {
            ts_ns: 7,
            vm_id: "vm-1".into(),
            kind: event_kind::REFUSAL.into(),
            detail: "cooldown, \"quoted\"".into(),
        })
        .expect("event");
        repo.close().expect("close");
    }
    let url = pg.url("fleet");
    let b = dir.path("b.db");
    let to_pg = vmm(
        &[
            "state",
            "export",
            "--state-db",
            a.to_str().unwrap(),
            "--to",
            &url,
        ],
        Duration::from_secs(60),
    );
    to_pg.expect_status(0);
    assert!(
        to_pg.stdout.contains("copied 300 rows and 1 events"),
        "{}",
        to_pg.stdout
    );
    assert!(
        !to_pg.stdout.contains(PASSWORD),
        "the password is not printed"
    );
    vmm(
        &[
            "state",
            "export",
            "--state-db",
            &url,
            "--to",
            b.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    )
    .expect_status(0);
    let (ra, rb) = (
        StateRepo::open_read_only(&a).expect("a"),
        StateRepo::open_read_only(&b).expect("b"),
    );
    let all = |r: &StateRepo| r.select_stored(&RowFilter::default()).expect("rows");
    let (sa, sb) = (all(&ra), all(&rb));
    assert_eq!(sa.len(), 300);
    // Same rows, VM ids, times, verdicts and receipt times (ids are each file's own).
    let strip = |v: Vec<tuner::state_repo::StoredRow>| {
        v.into_iter()
            .map(|s| (s.wall_ns, s.row))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(sa), strip(sb));
    assert_eq!(ra.events(None, 0).unwrap(), rb.events(None, 0).unwrap());
    // The report reads PostgreSQL directly too.
    let report = vmm(
        &["ab", "report", "--state-db", &url],
        Duration::from_secs(60),
    );
    assert!(
        !report.stderr.contains("state_db"),
        "ab report on postgres: {}",
        report.stderr
    );
}

#[test]
fn a_server_stopped_mid_run_loses_no_row_within_the_buffer() {
    let Some(pg) = Postgres::start("outage") else {
        return;
    };
    pg.create_db("o");
    let url = loc(&pg.url("o"));
    let cfg = RepoConfig {
        buffer: 1000,
        ..quick()
    };
    let repo = StateRepo::open_at(&url, cfg).expect("open");
    let w = repo.writer();
    let mut t = 0u64;
    let mut put = |n: u64| {
        for _ in 0..n {
            // Never blocks: the caller is a sampling thread.
            let start = Instant::now();
            w.insert(row("vm", t)).expect("queued");
            assert!(start.elapsed() < Duration::from_millis(50));
            t += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    put(100);
    repo.flush().expect("flush");
    pg.stop();
    put(400);
    std::thread::sleep(Duration::from_millis(300));
    let down = repo.stats();
    assert!(down.degraded, "{down:?}");
    assert!(down.rows_buffered >= 300, "{down:?}");
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while repo.stats().rows_written < 500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = repo.stats();
    assert_eq!((up.rows_written, up.rows_dropped), (500, 0), "{up:?}");
    assert!(!up.degraded && up.reconnects >= 1, "{up:?}");
    let rows = repo.rows("vm", 0).expect("rows");
    assert_eq!(rows.len(), 500);
    assert!(rows.iter().enumerate().all(|(i, r)| r.ts_ns == i as u64));

    // Past the buffer the oldest rows go, counted.
    pg.stop();
    put(1500);
    std::thread::sleep(Duration::from_millis(300));
    let full = repo.stats();
    assert_eq!(full.rows_dropped, 500, "{full:?}");
    assert_eq!(full.rows_buffered, 1000, "{full:?}");
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while repo.stats().rows_written < 1500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(repo.stats().rows_written, 1500);
    let rows = repo.rows("vm", 0).expect("rows");
    // The newest 1000 of the second outage's rows are there.
    assert_eq!(rows.len(), 1500);
    assert_eq!(rows[500].ts_ns, 1000);
}

#[test]
fn bad_urls_wrong_passwords_and_other_schema_versions_are_named() {
    let e = Location::parse("postgres://vmm@h/db?sslmode=sideways").expect_err("bad");
    assert!(e.to_string().starts_with("postgresql: bad URL"), "{e}");
    let Some(pg) = Postgres::start("bad") else {
        return;
    };
    pg.create_db("bad");
    let wrong = format!(
        "postgresql://vmm:nope@/bad?host={}",
        pg.socket_dir().display()
    );
    let e = StateRepo::open_at(&loc(&wrong), quick()).expect_err("auth");
    let text = e.to_string();
    assert!(
        text.starts_with("postgresql: cannot connect") && text.contains("password"),
        "{text}"
    );
    let missing = pg.url("nosuchdb");
    let e = StateRepo::open_at(&loc(&missing), quick()).expect_err("no db");
    assert!(e.to_string().contains("nosuchdb"), "{e}");
    // Another schema version.
    let url = loc(&pg.url("bad"));
    StateRepo::open_at(&url, quick()).expect("create");
    pg.psql("bad", "UPDATE repo_version SET version = 99");
    let e = StateRepo::open_at(&url, quick()).expect_err("version");
    assert!(
        matches!(
            e,
            RepoError::SchemaVersion {
                backend: "postgresql",
                found: 99,
                supported: 1
            }
        ),
        "{e}"
    );
    let e = StateRepo::open_read_only_at(&url).expect_err("version");
    assert!(e.to_string().contains("schema version 99"), "{e}");
    // The CLI says the same, naming the field.
    let r = vmm(
        &["ab", "report", "--state-db", &pg.url("bad")],
        Duration::from_secs(30),
    );
    assert!(
        r.stderr.contains("state_db")
            && r.stderr.contains("postgresql: database schema version 99"),
        "{}",
        r.stderr
    );
    // Unreachable at start: no error, degraded, rows buffered.
    let gone = loc("postgresql://vmm@/x?host=/nonexistent-socket-dir");
    let repo = StateRepo::open_at(&gone, quick()).expect("degraded, not refused");
    repo.writer().insert(row("vm", 1)).expect("buffered");
    std::thread::sleep(Duration::from_millis(100));
    let s = repo.stats();
    assert!(s.degraded && s.rows_buffered == 1, "{s:?}");
    assert!(repo.flush().is_err());
}

fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_vm_writes_its_rows_into_postgres() {
    if !kvm_available() {
        return;
    }
    let Some(pg) = Postgres::start("vm") else {
        return;
    };
    pg.create_db("vms");
    let url = pg.url("vms");
    let dir = Scratch::new("pg-vm");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=4000"])
        .args([
            "--state-db",
            &url,
            "--vm-id",
            "pg-vm-1",
            "--metrics-interval-ms",
            "100",
            "--api-sock",
            sock,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm");
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(1500));
    let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    assert_eq!(v["body"]["state_repo"]["degraded"], false, "{v}");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(0), "{stderr}");
    let repo = StateRepo::open_read_only_at(&loc(&url)).expect("open");
    let rows = repo.rows("pg-vm-1", 0).expect("rows");
    assert!(
        rows.len() >= 25,
        "4 s at 100 ms: {} rows; {stderr}",
        rows.len()
    );
    assert!(rows.iter().all(|r| r.vector.len() == FEATURES.len()));
    let busy = rows
        .iter()
        .filter(|r| r.raw[tuner::schema::Schema::index_of("cpu_utilisation").unwrap()] > 0.5)
        .count();
    assert!(busy >= 10, "cpu-burn rows should be busy: {busy}");
}

#[test]
fn a_vm_runs_with_its_database_unreachable_and_says_so() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("pg-down");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let gone = format!(
        "postgresql://vmm@/x?host={}",
        dir.path("no-socket-here").display()
    );
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=2500"])
        .args([
            "--state-db",
            &gone,
            "--metrics-interval-ms",
            "100",
            "--api-sock",
            sock,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm");
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(800));
    let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    let s = &v["body"]["state_repo"];
    assert_eq!(s["degraded"], true, "{v}");
    assert!(s["rows_buffered"].as_u64().unwrap_or(0) >= 3, "{v}");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(0), "the guest ran to its end: {stderr}");
    assert!(stderr.contains("postgresql"), "{stderr}");
}

#[test]
fn a_vm_keeps_running_through_a_database_outage_and_its_rows_arrive() {
    if !kvm_available() {
        return;
    }
    let Some(pg) = Postgres::start("vm-outage") else {
        return;
    };
    pg.create_db("o");
    let url = pg.url("o");
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=5000"])
        .args([
            "--state-db",
            &url,
            "--vm-id",
            "through",
            "--metrics-interval-ms",
            "100",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm");
    std::thread::sleep(Duration::from_millis(1500));
    pg.stop();
    std::thread::sleep(Duration::from_millis(2000));
    pg.restart();
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("cpu-burn: cpus="),
        "the guest finished: {stdout}"
    );
    // The writer's final counts: everything written after a reconnect, nothing dropped.
    let stats = stderr
        .lines()
        .find(|l| l.contains("state repository: WriterStats"))
        .unwrap_or_else(|| panic!("no final counts: {stderr}"));
    assert!(stats.contains("rows_dropped: 0,"), "{stats}");
    assert!(!stats.contains("reconnects: 0,"), "{stats}");
    let written: u64 = stats
        .split("rows_written: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("rows_written");
    assert!(written >= 40, "5 s at 100 ms: {written}");
    let in_db: u64 = pg
        .psql("o", "SELECT count(*) FROM samples WHERE vm_id = 'through'")
        .parse()
        .expect("count");
    assert_eq!(in_db, written);
}
