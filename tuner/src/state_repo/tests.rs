//! Tests of the repository on SQLite (PostgreSQL: tests/tests/postgres.rs).

use super::*;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rusqlite::{params, Connection};

use super::row::wall_now_ns;
use super::sqlite::CREATE_SQL;
use crate::agent::Sink;
use crate::schema::{FeatureId, FEATURES, SCHEMA_VERSION};
use crate::slo::SloClass;

fn row(vm: &str, t: u64, level: f32) -> Row {
    let n = FEATURES.len();
    Row {
        vm_id: vm.to_string(),
        ts_ns: t,
        interval_ns: 100_000_000,
        schema_version: SCHEMA_VERSION,
        vector: (0..n).map(|i| level + 0.001 * i as f32).collect(),
        raw: (0..n).map(|i| i as f64 * 1.5).collect(),
        action: None,
        reward: None,
        policy_id: "static".into(),
        config: r#"{"vcpus":2,"name":"a,b"}"#.into(),
        anomaly: None,
        anomaly_score: None,
        slo: None,
    }
}

#[test]
fn readers_refuse_what_is_not_a_repository_and_leave_it_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let text = dir.path().join("text.db");
    std::fs::write(
        &text,
        b"hello, not sqlite at all; just some bytes in a file\n".repeat(100),
    )
    .unwrap();
    let foreign = dir.path().join("foreign.db");
    {
        let c = Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    for path in [&empty, &text, &foreign] {
        let before = std::fs::read(path).unwrap();
        let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
        let e = StateRepo::open_read_only(path).unwrap_err();
        assert!(
            matches!(e, RepoError::NotARepository(_)),
            "{}: {e}",
            path.display()
        );
        assert_eq!(std::fs::read(path).unwrap(), before, "{}", path.display());
        assert_eq!(std::fs::metadata(path).unwrap().modified().unwrap(), mtime);
    }
    let e = StateRepo::open_read_only(dir.path()).unwrap_err();
    assert!(e.to_string().contains("a directory"), "{e}");
    // A real repository reads back, without a byte of it changing.
    let good = dir.path().join("good.db");
    let repo = StateRepo::open(&good, quick()).unwrap();
    repo.writer().insert_blocking(row("vm", 1, 0.5)).unwrap();
    repo.close().unwrap();
    let before = std::fs::read(&good).unwrap();
    let r = StateRepo::open_read_only(&good).unwrap();
    assert_eq!(r.rows("vm", 0).unwrap().len(), 1);
    assert_eq!(r.export_csv(dir.path().join("out.csv")).unwrap(), 1);
    assert!(r.writer().insert(row("vm", 2, 0.5)).is_err());
    drop(r);
    assert_eq!(std::fs::read(&good).unwrap(), before);
    // Nothing left beside it either (no -wal or -shm file of the reader's).
    for suffix in ["-wal", "-shm"] {
        let mut p = good.clone().into_os_string();
        p.push(suffix);
        assert!(!Path::new(&p).exists(), "{suffix} left behind");
    }
    // While a writer has it open, a reader sees its committed rows.
    let live = StateRepo::open(&good, quick()).unwrap();
    live.writer().insert_blocking(row("vm", 3, 0.5)).unwrap();
    live.flush().unwrap();
    let r = StateRepo::open_read_only(&good).unwrap();
    assert_eq!(r.rows("vm", 0).unwrap().len(), 2);
    drop(r);
    live.close().unwrap();
}

fn quick() -> RepoConfig {
    RepoConfig {
        anomaly: Some(AnomalyConfig {
            warmup: 5,
            ..AnomalyConfig::default()
        }),
        ..RepoConfig::default()
    }
}

#[test]
fn writes_and_reads_back_rows_and_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let w = repo.writer();
    for t in 0..10 {
        w.insert(row("vm1", t * 100, 0.2)).expect("queued");
    }
    w.insert(row("vm2", 50, 0.7)).expect("queued");
    w.record_event(Event {
        ts_ns: 5,
        vm_id: "vm1".into(),
        kind: event_kind::ROLLBACK.into(),
        detail: "reward 0.1 < baseline 0.3".into(),
    })
    .expect("queued");
    w.record_outcome("vm1", 300, Some("vcpu_up_1".into()), Some(0.25))
        .expect("queued");
    repo.flush().expect("flush");

    let rows = repo.rows("vm1", 200).expect("rows");
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[0].ts_ns, 200);
    let r = &rows[1];
    assert_eq!(r.ts_ns, 300);
    assert_eq!(r.action.as_deref(), Some("vcpu_up_1"));
    assert_eq!(r.reward, Some(0.25));
    let expected = row("vm1", 300, 0.2);
    assert_eq!(r.vector, expected.vector);
    assert_eq!(r.raw, expected.raw);
    assert_eq!(r.config, expected.config);
    assert_eq!(r.schema_version, SCHEMA_VERSION);
    assert_eq!(r.anomaly, Some(false));
    assert!(r.anomaly_score.is_some());
    assert_eq!(repo.rows("vm2", 0).expect("rows").len(), 1);
    assert_eq!(repo.count().expect("count"), 11);

    let ev = repo.events(Some("vm1"), 0).expect("events");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, "rollback");
    assert!(repo.events(Some("vm2"), 0).expect("events").is_empty());
    assert_eq!(repo.events(None, 0).expect("events").len(), 1);

    let stats = repo.close().expect("close");
    assert_eq!(stats.rows_written, 11);
    assert_eq!(stats.events_written, 1);
    assert_eq!(stats.rows_dropped, 0);

    // The file is in WAL mode and reopens with its data.
    let conn = Connection::open(dir.path().join("s.db")).expect("reopen");
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("pragma");
    assert_eq!(mode, "wal");
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 11);
    let blob: Vec<u8> = conn
        .query_row("SELECT vector FROM samples LIMIT 1", [], |r| r.get(0))
        .expect("blob");
    assert_eq!(blob.len(), 4 * FEATURES.len());
    assert_eq!(blob[..4], 0.2f32.to_le_bytes());
}

#[test]
fn commits_within_the_commit_interval_without_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.db");
    let repo = StateRepo::open(&path, quick()).expect("open");
    repo.writer().insert(row("vm", 1, 0.1)).expect("queued");
    // Another connection (as after a crash) sees the row once the interval passed.
    let other = Connection::open(&path).expect("open");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0i64;
    while Instant::now() < deadline && seen == 0 {
        thread::sleep(Duration::from_millis(20));
        seen = other
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
            .expect("count");
    }
    assert_eq!(seen, 1);
    assert!(repo.stats().commits >= 1);
}

#[test]
fn anomaly_column_flags_a_spike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let w = repo.writer();
    for t in 0..40 {
        w.insert(row("vm", t, 0.2)).expect("queued");
    }
    let mut spike = row("vm", 40, 0.2);
    spike.vector[FeatureId::IoLatencyP99.index()] = 0.9;
    w.insert(spike).expect("queued");
    // A verdict given by the producer is kept.
    let mut given = row("vm", 41, 0.2);
    given.anomaly = Some(true);
    given.anomaly_score = Some(99.0);
    w.insert(given).expect("queued");
    repo.flush().expect("flush");
    let rows = repo.rows("vm", 0).expect("rows");
    let flagged: Vec<u64> = rows
        .iter()
        .filter(|r| r.anomaly == Some(true))
        .map(|r| r.ts_ns)
        .collect();
    assert_eq!(flagged, vec![40, 41]);
    assert_eq!(rows[41].anomaly_score, Some(99.0));
    assert!(rows[40].anomaly_score.is_some_and(|s| s > 5.0));
    assert_eq!(repo.stats().anomalies, 1);
}

#[test]
fn retention_by_rows_and_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RepoConfig {
        max_rows: Some(100),
        max_age: Some(Duration::from_secs(60)),
        anomaly: None,
        ..RepoConfig::default()
    };
    let repo = StateRepo::open(dir.path().join("s.db"), cfg).expect("open");
    let w = repo.writer();
    for t in 0..250 {
        w.insert(row("vm", t, 0.5)).expect("queued");
    }
    assert_eq!(repo.apply_retention().expect("retention"), 150);
    let rows = repo.rows("vm", 0).expect("rows");
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[0].ts_ns, 150);
    assert_eq!(rows[0].anomaly, None);
    // Two minutes later everything is past max_age.
    w.record_event(Event {
        ts_ns: 1,
        vm_id: "vm".into(),
        kind: event_kind::REFUSAL.into(),
        detail: "cooldown".into(),
    })
    .expect("queued");
    let later = wall_now_ns() + 120_000_000_000;
    assert_eq!(repo.writer.retention(Some(later)).expect("retention"), 101);
    assert_eq!(repo.count().expect("count"), 0);
    assert_eq!(repo.stats().deleted, 251);
}

#[test]
fn exports_csv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let w = repo.writer();
    let mut r = row("vm", 7, 0.25);
    r.action = Some("io_prio \"high\"".into());
    w.insert(r).expect("queued");
    w.insert(row("vm", 8, 0.25)).expect("queued");
    let out = dir.path().join("out.csv");
    assert_eq!(repo.export_csv(&out).expect("export"), 2);
    let text = std::fs::read_to_string(&out).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(header.len(), 12 + 2 * FEATURES.len());
    assert_eq!(header[12], "v_cpu_utilisation");
    assert_eq!(header[12 + FEATURES.len()], "raw_cpu_utilisation");
    assert!(lines[1].contains(r#""io_prio ""high""""#));
    assert!(lines[1].contains(r#""{""vcpus"":2,""name"":""a,b""}""#));
    assert!(lines[2].ends_with(&format!("{}", (FEATURES.len() - 1) as f64 * 1.5)));
}

#[cfg(feature = "parquet")]
#[test]
fn exports_parquet() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::RowAccessor;

    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let w = repo.writer();
    let mut r = row("vm-a", 7, 0.25);
    r.reward = Some(1.5);
    w.insert(r).expect("queued");
    w.insert(row("vm-b", 8, 0.5)).expect("queued");
    let out = dir.path().join("out.parquet");
    assert_eq!(repo.export_parquet(&out).expect("export"), 2);

    let reader = SerializedFileReader::new(File::open(&out).expect("open")).expect("parquet");
    assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
    let rows: Vec<_> = reader
        .get_row_iter(None)
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("decode");
    assert_eq!(rows[0].get_string(1).expect("vm_id"), "vm-a");
    assert_eq!(rows[0].get_long(2).expect("ts"), 7);
    assert_eq!(rows[0].get_double(8).expect("reward"), 1.5);
    assert!(rows[1].is_null(8).expect("null reward"));
    assert_eq!(rows[1].get_string(1).expect("vm_id"), "vm-b");
    assert_eq!(rows[1].get_float(12).expect("v0"), 0.5);
    assert_eq!(
        rows[1].get_double(12 + FEATURES.len() + 2).expect("raw2"),
        3.0
    );
}

#[cfg(not(feature = "parquet"))]
#[test]
fn parquet_is_reported_unsupported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    assert!(matches!(
        repo.export_parquet(dir.path().join("x.parquet")),
        Err(RepoError::ParquetUnsupported)
    ));
}

#[test]
fn rejects_bad_config_and_corrupt_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = RepoConfig {
        queue: 0,
        ..RepoConfig::default()
    };
    assert!(matches!(
        StateRepo::open(dir.path().join("a.db"), bad),
        Err(RepoError::InvalidConfig(_))
    ));
    let bad = RepoConfig {
        anomaly: Some(AnomalyConfig {
            alpha: 2.0,
            ..AnomalyConfig::default()
        }),
        ..RepoConfig::default()
    };
    assert!(matches!(
        StateRepo::open(dir.path().join("b.db"), bad),
        Err(RepoError::InvalidConfig(_))
    ));
    assert!(matches!(
        decode_vector(&[1, 2, 3]),
        Err(RepoError::CorruptVector(3))
    ));
    assert_eq!(
        decode_vector(&encode_vector(&[1.0, -2.5])).expect("decode"),
        vec![1.0, -2.5]
    );
    // A database from a newer layout is refused.
    let path = dir.path().join("c.db");
    let conn = Connection::open(&path).expect("open");
    conn.pragma_update(None, "user_version", 99)
        .expect("pragma");
    drop(conn);
    assert!(matches!(
        StateRepo::open(&path, RepoConfig::default()),
        Err(RepoError::UnsupportedLayout { found: 99, .. })
    ));
}

#[test]
fn sink_writes_agent_samples() {
    use crate::agent::tests::snapshot_at;
    use crate::agent::Sampler;

    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let mut sink = repo.sink("vm7", "dqn-v3", r#"{"vcpus":1}"#);
    let mut sampler = Sampler::new();
    let sample = Arc::new(sampler.sample(&snapshot_at(1), &snapshot_at(2)));
    sink.accept(&sample);
    *sink
        .policy_handle()
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = "dqn-v4".into();
    let sample2 = Arc::new(sampler.sample(&snapshot_at(2), &snapshot_at(3)));
    sink.accept(&sample2);
    sink.finish();
    let rows = repo.rows("vm7", 0).expect("rows");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].vector, sample.vector);
    assert_eq!(rows[0].raw, sample.raw);
    assert_eq!(rows[0].policy_id, "dqn-v3");
    assert_eq!(rows[1].policy_id, "dqn-v4");
    assert_eq!(rows[1].ts_ns, 3_000_000_000);
    // The SLO attainment of snapshot_at's critical SLO: p99 missed by 0.25, ops met.
    let slo = rows[0].slo.expect("SLO columns");
    assert_eq!((slo.class, slo.met), (SloClass::Critical, false));
    assert!((slo.p99_margin.unwrap() + 0.25).abs() < 1e-9);
    assert!((slo.ops_margin.unwrap() - 0.25).abs() < 1e-9);
    let conn = Connection::open(dir.path().join("s.db")).expect("open");
    let (class, met, missed): (String, i64, i64) = conn
        .query_row(
            "SELECT slo_class, slo_met, \
             (SELECT count(*) FROM samples WHERE slo_p99_margin < 0) \
             FROM samples ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("query");
    assert_eq!((class.as_str(), met, missed), ("critical", 0, 2));
}

/// A layout-1 file (before the SLO columns) is read as is, and migrated in place when
/// opened for writing: old rows keep their data with NULL SLO columns.
#[test]
fn a_layout_1_repository_is_read_and_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    {
        let conn = Connection::open(&path).expect("create");
        let v1 = CREATE_SQL.replace(
            ",\n    slo_class      TEXT,\n    slo_met        INTEGER,\n    \
             slo_p99_margin REAL,\n    slo_ops_margin REAL",
            "",
        );
        assert!(!v1.contains("slo_"), "the layout-1 table");
        conn.execute_batch(&v1).expect("layout 1");
        conn.pragma_update(None, "user_version", 1).expect("pragma");
        let r = row("old", 1, 0.5);
        conn.execute(
            "INSERT INTO samples (vm_id, ts_ns, wall_ns, interval_ns, schema_version, \
             vector, raw, action, reward, policy_id, config) \
             VALUES (?1, ?2, 0, ?3, 2, ?4, ?5, NULL, NULL, 'static', '{}')",
            params![
                r.vm_id,
                1i64,
                100_000_000i64,
                encode_vector(&r.vector),
                serde_json::to_string(&r.raw).unwrap()
            ],
        )
        .expect("old row");
    }
    let ro = StateRepo::open_read_only(&path).expect("read-only");
    let rows = ro.rows("old", 0).expect("rows");
    assert_eq!((rows.len(), rows[0].slo), (1, None));
    drop(ro);
    let repo = StateRepo::open(&path, quick()).expect("migrated");
    let mut r = row("new", 2, 0.5);
    r.slo = Some(SloColumns {
        class: SloClass::Batch,
        met: true,
        p99_margin: None,
        ops_margin: Some(0.5),
    });
    repo.writer().insert_blocking(r.clone()).expect("insert");
    repo.flush().expect("flush");
    assert_eq!(repo.rows("old", 0).expect("old")[0].slo, None);
    assert_eq!(repo.rows("new", 0).expect("new")[0].slo, r.slo);
    drop(repo);
    let conn = Connection::open(&path).expect("open");
    let layout: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("pragma");
    assert_eq!(layout, DB_LAYOUT_VERSION);
}

#[test]
fn sustains_a_useful_row_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = StateRepo::open(dir.path().join("s.db"), quick()).expect("open");
    let w = repo.writer();
    let n = 5_000u64;
    let t0 = Instant::now();
    for t in 0..n {
        w.insert_blocking(row("vm", t, 0.3)).expect("queued");
    }
    repo.flush().expect("flush");
    let secs = t0.elapsed().as_secs_f64();
    let rate = n as f64 / secs;
    log::info!("{rate:.0} rows/s");
    // 100 VMs at 10 samples/s need 1000 rows/s; even a debug build does far more.
    assert!(rate > 1_000.0, "{rate} rows/s");
    assert_eq!(repo.count().expect("count"), n);
}
