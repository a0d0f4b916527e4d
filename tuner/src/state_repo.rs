//! The state repository: an embedded time-series store of performance vectors, actions,
//! rewards and policy versions, in SQLite (WAL mode).
//!
//! # Tables
//!
//! `samples`, one row per interval per VM:
//!
//! | column | type | meaning |
//! | --- | --- | --- |
//! | `id` | INTEGER PRIMARY KEY | insertion order |
//! | `vm_id` | TEXT | the VM |
//! | `ts_ns` | INTEGER | the sample's time ([`crate::agent::Sample::at_ns`], monotonic) |
//! | `wall_ns` | INTEGER | Unix time when the writer received the row (retention by age) |
//! | `interval_ns` | INTEGER | length of the interval |
//! | `schema_version` | INTEGER | [`crate::schema::SCHEMA_VERSION`] of the vector |
//! | `vector` | BLOB | normalised vector, little-endian `f32`s |
//! | `raw` | TEXT | raw values as a JSON array (readable) |
//! | `action` | TEXT NULL | action taken after this interval |
//! | `reward` | REAL NULL | reward observed for it |
//! | `policy_id` | TEXT | policy in charge |
//! | `config` | TEXT | the VM's configuration, JSON |
//! | `anomaly` | INTEGER NULL | 1 when the anomaly detector flagged the interval |
//! | `anomaly_score` | REAL NULL | the detector's score (max \|z\|) |
//! | `slo_class` | TEXT NULL | the VM's SLO class (`critical`, `standard`, `batch`; NULL without an SLO) |
//! | `slo_met` | INTEGER NULL | 1 when every SLO target was met in the interval |
//! | `slo_p99_margin` | REAL NULL | signed margin of the p99 latency target ([`crate::slo`]) |
//! | `slo_ops_margin` | REAL NULL | signed margin of the operation rate target |
//!
//! The layout is versioned by SQLite's `user_version` ([`DB_LAYOUT_VERSION`]): layout 2
//! added the four `slo_*` columns; a layout-1 file is migrated in place when opened for
//! writing (`ALTER TABLE ... ADD COLUMN`, its old rows NULL there), and read as is.
//!
//! `events (id, ts_ns, wall_ns, vm_id, kind, detail)` for policy load failures, refused
//! actions, rollbacks and the like (see [`event_kind`]).
//!
//! # Writing
//!
//! Writes never run on the caller's thread: [`RepoWriter`] hands rows over a bounded
//! channel to a writer thread (non-blocking; when the channel is full the row is dropped
//! and counted), which batches them and commits a transaction at least every
//! [`RepoConfig::commit_interval`] (200 ms by default). A `kill -9` therefore loses at
//! most the rows of the last commit interval plus what was queued; WAL journaling keeps
//! the file consistent. `synchronous=NORMAL` makes commits survive a process crash but
//! not necessarily a power loss (the usual WAL trade-off). The writer also runs the
//! anomaly detector ([`crate::anomaly`]) per VM on rows that do not carry a verdict yet,
//! and applies retention ([`RepoConfig::max_age`], [`RepoConfig::max_rows`])
//! periodically.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

use crate::agent::{Sample, Sink};
use crate::anomaly::{AnomalyConfig, AnomalyDetector};
use crate::schema::{Schema, FEATURES, SCHEMA_VERSION};
use crate::slo::{SloClass, SloReport, SloTarget};

/// Layout version of the database (SQLite `user_version`). 2: the `slo_*` columns.
pub const DB_LAYOUT_VERSION: i64 = 2;

/// Well-known event kinds for [`Event::kind`].
pub mod event_kind {
    /// A policy could not be loaded or failed validation.
    pub const POLICY_LOAD_FAILURE: &str = "policy_load_failure";
    /// The configuration manager refused an action (bounds, cooldown, ...).
    pub const REFUSAL: &str = "refusal";
    /// An action was rolled back because the reward fell below the baseline.
    pub const ROLLBACK: &str = "rollback";
    /// The tuner fell back to the static configuration.
    pub const FALLBACK: &str = "fallback";
    /// The knobs were set to the policy's start configuration before the first interval.
    pub const POLICY_START: &str = "policy_start";
}

/// Errors of the state repository.
#[derive(Debug, Error)]
pub enum RepoError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file could not be read or written.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// JSON text could not be encoded or decoded.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The database refused WAL journaling.
    #[error("the database refused WAL mode (journal_mode is {0})")]
    WalUnavailable(String),
    /// The database was written by a newer layout.
    #[error("database layout version {found} is newer than this build's {supported}")]
    UnsupportedLayout {
        /// Layout version in the file.
        found: i64,
        /// Newest layout this build knows.
        supported: i64,
    },
    /// A configuration value is invalid.
    #[error("invalid repository configuration: {0}")]
    InvalidConfig(String),
    /// The writer's queue is full; the row or event was dropped.
    #[error("the repository writer's queue is full; dropped")]
    QueueFull,
    /// The writer thread has stopped.
    #[error("the repository writer has stopped")]
    Closed,
    /// The writer thread reported an error.
    #[error("repository writer: {0}")]
    Writer(String),
    /// A stored vector BLOB is not a whole number of `f32`s.
    #[error("stored vector of {0} bytes is not a whole number of f32s")]
    CorruptVector(usize),
    /// The writer thread could not be spawned.
    #[error("cannot spawn the repository writer: {0}")]
    Spawn(io::Error),
    /// This build has no Parquet support (the `parquet` feature is off).
    #[error("parquet export is not built in (enable the tuner's `parquet` feature)")]
    ParquetUnsupported,
    /// The Parquet writer failed.
    #[error("parquet: {0}")]
    Parquet(String),
    /// The file is not a state repository (empty, another SQLite database, not SQLite,
    /// not a regular file); it was left as it was.
    #[error("not a state repository: {0}")]
    NotARepository(String),
}

/// Configuration of the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoConfig {
    /// Longest time a received row waits before its transaction commits (default 200 ms).
    pub commit_interval: Duration,
    /// Rows per transaction that trigger an early commit (default 8192).
    pub max_batch: usize,
    /// Capacity of the writer's queue, in rows and events (default 65 536).
    pub queue: usize,
    /// Delete rows and events older than this (by wall-clock receipt time); `None` keeps all.
    pub max_age: Option<Duration>,
    /// Keep at most this many sample rows (the newest); `None` keeps all.
    pub max_rows: Option<u64>,
    /// How often retention runs (default 10 s).
    pub retention_interval: Duration,
    /// Anomaly detection applied by the writer to rows without a verdict; `None` disables.
    pub anomaly: Option<AnomalyConfig>,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(200),
            max_batch: 8192,
            queue: 65_536,
            max_age: None,
            max_rows: None,
            retention_interval: Duration::from_secs(10),
            anomaly: Some(AnomalyConfig::default()),
        }
    }
}

/// One interval of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The VM.
    pub vm_id: String,
    /// The sample's time (monotonic nanoseconds; stored as i64, clamped).
    pub ts_ns: u64,
    /// Length of the interval in nanoseconds.
    pub interval_ns: u64,
    /// Schema version of `vector` and `raw`.
    pub schema_version: u32,
    /// Normalised vector.
    pub vector: Vec<f32>,
    /// Raw values in the schema's units.
    pub raw: Vec<f64>,
    /// Action taken after this interval.
    pub action: Option<String>,
    /// Reward observed for the action.
    pub reward: Option<f64>,
    /// Policy in charge.
    pub policy_id: String,
    /// The VM's configuration, JSON text.
    pub config: String,
    /// Anomaly flag; `None` on insert lets the writer's detector decide.
    pub anomaly: Option<bool>,
    /// Anomaly score; filled together with `anomaly`.
    pub anomaly_score: Option<f64>,
    /// The interval's SLO attainment (`None` without an SLO).
    pub slo: Option<SloColumns>,
}

/// A row's SLO attainment, as stored in its `slo_*` columns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SloColumns {
    /// The VM's class.
    pub class: SloClass,
    /// Every target met.
    pub met: bool,
    /// Signed margin of the p99 latency target, if set.
    pub p99_margin: Option<f64>,
    /// Signed margin of the operation rate target, if set.
    pub ops_margin: Option<f64>,
}

impl SloColumns {
    /// The columns of an interval's report.
    pub fn of(report: &SloReport) -> SloColumns {
        SloColumns {
            class: report.class,
            met: report.met(),
            p99_margin: report.target(SloTarget::P99Us).map(|t| t.margin),
            ops_margin: report.target(SloTarget::MinOps).map(|t| t.margin),
        }
    }
}

impl Row {
    /// A row for `sample` with no action, reward or anomaly verdict yet.
    pub fn from_sample(vm_id: &str, sample: &Sample, policy_id: &str, config: &str) -> Row {
        Row {
            vm_id: vm_id.to_string(),
            ts_ns: sample.at_ns,
            interval_ns: sample.interval_ns,
            schema_version: SCHEMA_VERSION,
            vector: sample.vector.clone(),
            raw: sample.raw.clone(),
            action: None,
            reward: None,
            policy_id: policy_id.to_string(),
            config: config.to_string(),
            anomaly: None,
            anomaly_score: None,
            slo: sample.slo.as_ref().map(SloColumns::of),
        }
    }
}

/// Something worth remembering that is not an interval: a policy load failure, a refused
/// action, a rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Time (same clock as [`Row::ts_ns`]).
    pub ts_ns: u64,
    /// The VM.
    pub vm_id: String,
    /// Kind, e.g. one of [`event_kind`].
    pub kind: String,
    /// Free-form detail.
    pub detail: String,
}

/// Counts of the writer thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Rows committed.
    pub rows_written: u64,
    /// Rows dropped (queue full, or lost in a failed commit).
    pub rows_dropped: u64,
    /// Events committed.
    pub events_written: u64,
    /// Events dropped.
    pub events_dropped: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Failed transactions.
    pub commit_errors: u64,
    /// Rows and events deleted by retention.
    pub deleted: u64,
    /// Rows the anomaly detector flagged.
    pub anomalies: u64,
}

#[derive(Default)]
struct Counters {
    rows_written: AtomicU64,
    rows_dropped: AtomicU64,
    events_written: AtomicU64,
    events_dropped: AtomicU64,
    commits: AtomicU64,
    commit_errors: AtomicU64,
    deleted: AtomicU64,
    anomalies: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WriterStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStats {
            rows_written: l(&self.rows_written),
            rows_dropped: l(&self.rows_dropped),
            events_written: l(&self.events_written),
            events_dropped: l(&self.events_dropped),
            commits: l(&self.commits),
            commit_errors: l(&self.commit_errors),
            deleted: l(&self.deleted),
            anomalies: l(&self.anomalies),
        }
    }
}

type Reply<T> = SyncSender<Result<T, String>>;

enum Command {
    Row(Box<Row>),
    Event(Event),
    Outcome {
        vm_id: String,
        ts_ns: u64,
        action: Option<String>,
        reward: Option<f64>,
    },
    Flush(Reply<()>),
    Retention {
        now_wall_ns: Option<i64>,
        reply: Reply<u64>,
    },
    Shutdown,
}

/// A cheap, cloneable handle that queues rows and events for the writer thread.
#[derive(Clone)]
pub struct RepoWriter {
    tx: SyncSender<Command>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for RepoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWriter").finish_non_exhaustive()
    }
}

impl RepoWriter {
    /// Queues a row without blocking. When the queue is full the row is dropped, counted
    /// and [`RepoError::QueueFull`] returned.
    pub fn insert(&self, row: Row) -> Result<(), RepoError> {
        match self.tx.try_send(Command::Row(Box::new(row))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.counters.rows_dropped.fetch_add(1, Ordering::Relaxed);
                Err(RepoError::QueueFull)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.rows_dropped.fetch_add(1, Ordering::Relaxed);
                Err(RepoError::Closed)
            }
        }
    }

    /// Queues a row, waiting for room in the queue (for backfills and benchmarks, not for
    /// the sampling path).
    pub fn insert_blocking(&self, row: Row) -> Result<(), RepoError> {
        self.tx
            .send(Command::Row(Box::new(row)))
            .map_err(|_| RepoError::Closed)
    }

    /// Queues an event without blocking (dropped and counted when the queue is full).
    pub fn record_event(&self, event: Event) -> Result<(), RepoError> {
        match self.tx.try_send(Command::Event(event)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => RepoError::QueueFull,
                    TrySendError::Disconnected(_) => RepoError::Closed,
                })
            }
        }
    }

    /// Records the action taken after the interval `(vm_id, ts_ns)` and its reward, once
    /// known (updates the existing row; a row not yet committed is updated in the same
    /// batch, since the writer applies commands in order). Does not block.
    pub fn record_outcome(
        &self,
        vm_id: &str,
        ts_ns: u64,
        action: Option<String>,
        reward: Option<f64>,
    ) -> Result<(), RepoError> {
        let cmd = Command::Outcome {
            vm_id: vm_id.to_string(),
            ts_ns,
            action,
            reward,
        };
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => RepoError::QueueFull,
            TrySendError::Disconnected(_) => RepoError::Closed,
        })
    }

    /// Commits everything queued so far and waits for the commit.
    pub fn flush(&self) -> Result<(), RepoError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Command::Flush(reply))
            .map_err(|_| RepoError::Closed)?;
        rx.recv()
            .map_err(|_| RepoError::Closed)?
            .map_err(RepoError::Writer)
    }

    fn retention(&self, now_wall_ns: Option<i64>) -> Result<u64, RepoError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Command::Retention { now_wall_ns, reply })
            .map_err(|_| RepoError::Closed)?;
        rx.recv()
            .map_err(|_| RepoError::Closed)?
            .map_err(RepoError::Writer)
    }

    /// The writer's counts.
    pub fn stats(&self) -> WriterStats {
        self.counters.snapshot()
    }
}

/// A [`Sink`] writing every sample of one VM to the repository.
pub struct RepoSink {
    writer: RepoWriter,
    vm_id: String,
    policy_id: Arc<Mutex<String>>,
    config: String,
    dropped: u64,
}

impl RepoSink {
    /// A sink for VM `vm_id`, tagging rows with `policy_id` and the VM's configuration
    /// (`config`, JSON text).
    pub fn new(writer: RepoWriter, vm_id: &str, policy_id: &str, config: &str) -> Self {
        Self {
            writer,
            vm_id: vm_id.to_string(),
            policy_id: Arc::new(Mutex::new(policy_id.to_string())),
            config: config.to_string(),
            dropped: 0,
        }
    }

    /// A handle to change the policy id written into later rows (when a policy loads).
    pub fn policy_handle(&self) -> Arc<Mutex<String>> {
        Arc::clone(&self.policy_id)
    }
}

impl Sink for RepoSink {
    fn name(&self) -> &str {
        "state-repo"
    }

    fn accept(&mut self, sample: &Arc<Sample>) {
        let policy = self
            .policy_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let row = Row::from_sample(&self.vm_id, sample, &policy, &self.config);
        if let Err(e) = self.writer.insert(row) {
            if self.dropped == 0 {
                log::warn!("state repository dropped a row: {e}");
            }
            self.dropped += 1;
        }
    }

    fn finish(&mut self) {
        if let Err(e) = self.writer.flush() {
            log::warn!("final flush of the state repository failed: {e}");
        }
    }
}

/// The state repository: owns the writer thread and a reader connection.
pub struct StateRepo {
    path: PathBuf,
    writer: RepoWriter,
    handle: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    /// What reads select for the `slo_*` columns (NULLs on a layout-1 file read as is).
    slo_columns: &'static str,
}

impl std::fmt::Debug for StateRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateRepo")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const CREATE_SQL: &str = "
CREATE TABLE IF NOT EXISTS samples (
    id             INTEGER PRIMARY KEY,
    vm_id          TEXT    NOT NULL,
    ts_ns          INTEGER NOT NULL,
    wall_ns        INTEGER NOT NULL,
    interval_ns    INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    vector         BLOB    NOT NULL,
    raw            TEXT    NOT NULL,
    action         TEXT,
    reward         REAL,
    policy_id      TEXT    NOT NULL,
    config         TEXT    NOT NULL,
    anomaly        INTEGER,
    anomaly_score  REAL,
    slo_class      TEXT,
    slo_met        INTEGER,
    slo_p99_margin REAL,
    slo_ops_margin REAL
);
CREATE INDEX IF NOT EXISTS samples_vm_ts ON samples (vm_id, ts_ns);
CREATE INDEX IF NOT EXISTS samples_wall ON samples (wall_ns);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    ts_ns   INTEGER NOT NULL,
    wall_ns INTEGER NOT NULL,
    vm_id   TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    detail  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm_ts ON events (vm_id, ts_ns);
CREATE INDEX IF NOT EXISTS events_wall ON events (wall_ns);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Layout 1 -> 2: the SLO attainment columns.
const MIGRATE_1_TO_2_SQL: &str = "
ALTER TABLE samples ADD COLUMN slo_class TEXT;
ALTER TABLE samples ADD COLUMN slo_met INTEGER;
ALTER TABLE samples ADD COLUMN slo_p99_margin REAL;
ALTER TABLE samples ADD COLUMN slo_ops_margin REAL;
";

const INSERT_ROW_SQL: &str = "INSERT INTO samples (vm_id, ts_ns, wall_ns, interval_ns, \
     schema_version, vector, raw, action, reward, policy_id, config, anomaly, anomaly_score, \
     slo_class, slo_met, slo_p99_margin, slo_ops_margin) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

const SELECT_COLUMNS: &str = "id, wall_ns, vm_id, ts_ns, interval_ns, schema_version, vector, \
     raw, action, reward, policy_id, config, anomaly, anomaly_score";

/// The SLO columns, selected after [`SELECT_COLUMNS`] from a layout-2 file (a layout-1
/// file read as is has none: NULLs instead).
const SELECT_SLO_COLUMNS: &str = "slo_class, slo_met, slo_p99_margin, slo_ops_margin";
const SELECT_NO_SLO_COLUMNS: &str = "NULL, NULL, NULL, NULL";

/// A stored row with its storage metadata (for exports).
struct StoredRow {
    id: i64,
    wall_ns: i64,
    row: Row,
}

fn to_i64(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

fn to_u64(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

fn wall_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Encodes a vector as little-endian `f32`s.
pub fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes little-endian `f32`s.
pub fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>, RepoError> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return Err(RepoError::CorruptVector(bytes.len()));
    }
    Ok(chunks
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_stored(r: &rusqlite::Row<'_>) -> Result<StoredRow, RepoError> {
    let blob: Vec<u8> = r.get(6)?;
    let raw_json: String = r.get(7)?;
    let raw: Vec<Option<f64>> = serde_json::from_str(&raw_json)?;
    let schema_version: i64 = r.get(5)?;
    Ok(StoredRow {
        id: r.get(0)?,
        wall_ns: r.get(1)?,
        row: Row {
            vm_id: r.get(2)?,
            ts_ns: to_u64(r.get(3)?),
            interval_ns: to_u64(r.get(4)?),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            vector: decode_vector(&blob)?,
            raw: raw.into_iter().map(|x| x.unwrap_or(0.0)).collect(),
            action: r.get(8)?,
            reward: r.get(9)?,
            policy_id: r.get(10)?,
            config: r.get(11)?,
            anomaly: r.get::<_, Option<i64>>(12)?.map(|a| a != 0),
            anomaly_score: r.get(13)?,
            slo: read_slo(r)?,
        },
    })
}

/// The `slo_*` columns (selected at 14..=17); `None` when absent or unreadable.
fn read_slo(r: &rusqlite::Row<'_>) -> Result<Option<SloColumns>, RepoError> {
    let class: Option<String> = r.get(14)?;
    let Some(class) = class.and_then(|c| SloClass::parse(&c).ok()) else {
        return Ok(None);
    };
    Ok(Some(SloColumns {
        class,
        met: r.get::<_, Option<i64>>(15)?.is_some_and(|m| m != 0),
        p99_margin: r.get(16)?,
        ops_margin: r.get(17)?,
    }))
}

fn configure(conn: &Connection) -> Result<(), RepoError> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(RepoError::WalUnavailable(mode));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

/// Opens the SQLite database at `path` for reading only, leaving no file behind: with no
/// `-wal` file beside it no writer has it open (SQLite removes that file when the last
/// writer closes), so it is opened `immutable` (no `-shm`/`-wal` files created, no
/// locks); otherwise read-only through the live writer's WAL. Never writes the database.
pub fn open_sqlite_read_only(path: &Path) -> Result<Connection, rusqlite::Error> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if Path::new(&wal).exists() {
        Connection::open_with_flags(path, flags)?
    } else {
        // A URI: `%`, `?` and `#` in the path are escaped.
        let mut uri = String::from("file:");
        for c in path.to_string_lossy().chars() {
            match c {
                '%' => uri.push_str("%25"),
                '?' => uri.push_str("%3f"),
                '#' => uri.push_str("%23"),
                c => uri.push(c),
            }
        }
        uri.push_str("?immutable=1");
        Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)?
    };
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl StateRepo {
    /// Opens (creating if needed) the repository at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>, config: RepoConfig) -> Result<StateRepo, RepoError> {
        if config.commit_interval.is_zero() || config.retention_interval.is_zero() {
            return Err(RepoError::InvalidConfig(
                "commit and retention intervals must be positive".into(),
            ));
        }
        if config.max_batch == 0 || config.queue == 0 {
            return Err(RepoError::InvalidConfig(
                "max_batch and queue must be at least 1".into(),
            ));
        }
        let detector_check = match &config.anomaly {
            Some(a) => AnomalyDetector::new(a.clone()).map(|_| ()),
            None => Ok(()),
        };
        detector_check.map_err(|e| RepoError::InvalidConfig(e.to_string()))?;

        let path = path.as_ref().to_path_buf();
        // SQLite's own open would block on a FIFO: a regular file (or a new one) only.
        crate::files::check_regular_if_exists(&path)
            .map_err(|e| RepoError::NotARepository(e.to_string()))?;
        let conn = Connection::open(&path)?;
        configure(&conn)?;
        let layout: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if layout > DB_LAYOUT_VERSION {
            return Err(RepoError::UnsupportedLayout {
                found: layout,
                supported: DB_LAYOUT_VERSION,
            });
        }
        conn.execute_batch(CREATE_SQL)?;
        if layout == 1 {
            // In one transaction: a crash leaves layout 1 whole, never half a migration.
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATE_1_TO_2_SQL} PRAGMA user_version = 2; COMMIT;"
            ))?;
            log::info!(
                "state repository {}: layout 1 migrated to 2 (SLO columns)",
                path.display()
            );
        }
        conn.pragma_update(None, "user_version", DB_LAYOUT_VERSION)?;
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1), \
             ('schema', ?2)",
            params![SCHEMA_VERSION.to_string(), Schema::to_json()],
        )?;

        let reader = Connection::open(&path)?;
        reader.busy_timeout(Duration::from_secs(5))?;

        let (tx, rx) = mpsc::sync_channel(config.queue);
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let handle = thread::Builder::new()
            .name("tuner-state-repo".to_string())
            .spawn(move || {
                crate::sandbox::run_helper("tuner-state-repo", move || {
                    let mut w = WriterThread::new(conn, config, thread_counters);
                    w.run(rx);
                });
            })
            .map_err(RepoError::Spawn)?;
        log::info!("state repository opened at {}", path.display());
        Ok(StateRepo {
            path,
            writer: RepoWriter { tx, counters },
            handle: Some(handle),
            reader: Mutex::new(reader),
            slo_columns: SELECT_SLO_COLUMNS,
        })
    }

    /// Opens an existing repository for reading only (`vmm state export`, `vmm ab
    /// report`): SQLite's read-only mode, no journal-mode change, no tables created, no
    /// writer thread. A file that is not a regular file, not SQLite, or a SQLite database
    /// without the repository's layout is refused and left untouched.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<StateRepo, RepoError> {
        let path = path.as_ref().to_path_buf();
        let not_repo =
            |why: String| RepoError::NotARepository(format!("{}: {why}", path.display()));
        crate::files::open_regular(&path).map_err(|e| not_repo(e.to_string()))?;
        let conn = open_sqlite_read_only(&path)?;
        // The first read is where SQLite notices a file that is not a database.
        let layout: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| not_repo(e.to_string()))?;
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
                 AND name IN ('samples', 'events', 'meta')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| not_repo(e.to_string()))?;
        if layout == 0 || tables != 3 {
            return Err(not_repo(
                "no samples, events and meta tables of a state repository".into(),
            ));
        }
        if layout > DB_LAYOUT_VERSION {
            return Err(RepoError::UnsupportedLayout {
                found: layout,
                supported: DB_LAYOUT_VERSION,
            });
        }
        // No writer: a channel whose receiving end is gone (every write is `Closed`).
        let (tx, _) = mpsc::sync_channel(1);
        Ok(StateRepo {
            path,
            writer: RepoWriter {
                tx,
                counters: Arc::new(Counters::default()),
            },
            handle: None,
            reader: Mutex::new(conn),
            slo_columns: if layout >= 2 {
                SELECT_SLO_COLUMNS
            } else {
                SELECT_NO_SLO_COLUMNS
            },
        })
    }

    /// Commits what is queued, unless the repository was opened read-only.
    fn flush_if_writing(&self) -> Result<(), RepoError> {
        if self.handle.is_some() {
            self.flush()?;
        }
        Ok(())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for queueing rows and events (clone freely, e.g. one per VM).
    pub fn writer(&self) -> RepoWriter {
        self.writer.clone()
    }

    /// A sink for the sampling agent that writes the samples of VM `vm_id`.
    pub fn sink(&self, vm_id: &str, policy_id: &str, config_json: &str) -> RepoSink {
        RepoSink::new(self.writer(), vm_id, policy_id, config_json)
    }

    /// Commits everything queued so far.
    pub fn flush(&self) -> Result<(), RepoError> {
        self.writer.flush()
    }

    /// The writer's counts.
    pub fn stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Applies retention now (after committing what is queued); returns rows and events
    /// deleted.
    pub fn apply_retention(&self) -> Result<u64, RepoError> {
        self.writer.retention(None)
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Committed rows of `vm_id` with `ts_ns >= since_ns`, oldest first.
    pub fn rows(&self, vm_id: &str, since_ns: u64) -> Result<Vec<Row>, RepoError> {
        self.select_rows(Some(vm_id), since_ns)
    }

    /// The rows of every VM from `since_ns` on, VM by VM, each in time order (for reports
    /// over several VMs sharing one repository).
    pub fn rows_of_all_vms(&self, since_ns: u64) -> Result<Vec<Row>, RepoError> {
        self.select_rows(None, since_ns)
    }

    fn select_rows(&self, vm_id: Option<&str>, since_ns: u64) -> Result<Vec<Row>, RepoError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SELECT_COLUMNS}, {} FROM samples WHERE (?1 IS NULL OR vm_id = ?1) \
             AND ts_ns >= ?2 ORDER BY vm_id, ts_ns, id",
            self.slo_columns
        ))?;
        let mut rows = stmt.query(params![vm_id, to_i64(since_ns)])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(read_stored(r)?.row);
        }
        Ok(out)
    }

    /// Committed events with `ts_ns >= since_ns`, of one VM or of all, oldest first.
    pub fn events(&self, vm_id: Option<&str>, since_ns: u64) -> Result<Vec<Event>, RepoError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT ts_ns, vm_id, kind, detail FROM events \
             WHERE (?1 IS NULL OR vm_id = ?1) AND ts_ns >= ?2 ORDER BY ts_ns, id",
        )?;
        let mut rows = stmt.query(params![vm_id, to_i64(since_ns)])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(Event {
                ts_ns: to_u64(r.get(0)?),
                vm_id: r.get(1)?,
                kind: r.get(2)?,
                detail: r.get(3)?,
            });
        }
        Ok(out)
    }

    /// Number of committed sample rows.
    pub fn count(&self) -> Result<u64, RepoError> {
        let n: i64 = self
            .reader()
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))?;
        Ok(to_u64(n))
    }

    /// Streams every committed row (all VMs, insertion order) in chunks of `chunk`.
    fn for_each_chunk(
        &self,
        chunk: usize,
        mut f: impl FnMut(&[StoredRow]) -> Result<(), RepoError>,
    ) -> Result<u64, RepoError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SELECT_COLUMNS}, {} FROM samples ORDER BY id",
            self.slo_columns
        ))?;
        let mut rows = stmt.query([])?;
        let mut buf = Vec::with_capacity(chunk);
        let mut n = 0u64;
        while let Some(r) = rows.next()? {
            buf.push(read_stored(r)?);
            if buf.len() >= chunk {
                f(&buf)?;
                n += buf.len() as u64;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            f(&buf)?;
            n += buf.len() as u64;
        }
        Ok(n)
    }

    /// Exports every row (after committing what is queued) as CSV with a header: the
    /// storage columns, then `v_<feature>` (normalised) and `raw_<feature>` columns in
    /// schema order. Returns the number of rows written.
    pub fn export_csv(&self, path: impl AsRef<Path>) -> Result<u64, RepoError> {
        self.flush_if_writing()?;
        let mut out = BufWriter::new(File::create(path.as_ref())?);
        let header: Vec<String> = export_columns();
        writeln!(out, "{}", header.join(","))?;
        let n = self.for_each_chunk(4096, |rows| {
            for s in rows {
                let r = &s.row;
                let mut fields: Vec<String> = vec![
                    s.id.to_string(),
                    csv_field(&r.vm_id),
                    r.ts_ns.to_string(),
                    s.wall_ns.to_string(),
                    r.interval_ns.to_string(),
                    r.schema_version.to_string(),
                    csv_field(&r.policy_id),
                    r.action.as_deref().map(csv_field).unwrap_or_default(),
                    r.reward.map(|x| x.to_string()).unwrap_or_default(),
                    r.anomaly.map(|a| (a as u8).to_string()).unwrap_or_default(),
                    r.anomaly_score.map(|x| x.to_string()).unwrap_or_default(),
                    csv_field(&r.config),
                ];
                for i in 0..FEATURES.len() {
                    fields.push(r.vector.get(i).map(|x| x.to_string()).unwrap_or_default());
                }
                for i in 0..FEATURES.len() {
                    fields.push(r.raw.get(i).map(|x| x.to_string()).unwrap_or_default());
                }
                writeln!(out, "{}", fields.join(","))?;
            }
            Ok(())
        })?;
        out.flush()?;
        Ok(n)
    }

    /// Exports every row (after committing what is queued) as a Parquet file with the same
    /// columns as [`StateRepo::export_csv`] (uncompressed, one row group per 65 536 rows).
    /// Returns the number of rows written, or [`RepoError::ParquetUnsupported`] when the
    /// `parquet` feature is off.
    pub fn export_parquet(&self, path: impl AsRef<Path>) -> Result<u64, RepoError> {
        #[cfg(feature = "parquet")]
        {
            self.flush_if_writing()?;
            let mut out = parquet_export::ParquetOut::create(path.as_ref())?;
            let n = self.for_each_chunk(65_536, |rows| out.write_group(rows))?;
            out.close()?;
            Ok(n)
        }
        #[cfg(not(feature = "parquet"))]
        {
            let _ = path;
            Err(RepoError::ParquetUnsupported)
        }
    }

    /// Commits what is queued, stops the writer thread and returns its final counts.
    pub fn close(mut self) -> Result<WriterStats, RepoError> {
        self.shutdown()?;
        Ok(self.writer.stats())
    }

    fn shutdown(&mut self) -> Result<(), RepoError> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        // A blocking send: waits for room, fails only if the thread is gone already.
        let _ = self.writer.tx.send(Command::Shutdown);
        handle
            .join()
            .map_err(|_| RepoError::Writer("the writer thread panicked".into()))
    }
}

impl Drop for StateRepo {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("closing the state repository: {e}");
        }
    }
}

/// Names of the exported columns, in order.
fn export_columns() -> Vec<String> {
    let mut cols: Vec<String> = [
        "id",
        "vm_id",
        "ts_ns",
        "wall_ns",
        "interval_ns",
        "schema_version",
        "policy_id",
        "action",
        "reward",
        "anomaly",
        "anomaly_score",
        "config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cols.extend(FEATURES.iter().map(|f| format!("v_{}", f.name)));
    cols.extend(FEATURES.iter().map(|f| format!("raw_{}", f.name)));
    cols
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

struct WriterThread {
    conn: Connection,
    config: RepoConfig,
    counters: Arc<Counters>,
    pending: Vec<Command>,
    pending_rows: usize,
    first_pending: Option<Instant>,
    last_retention: Instant,
    detectors: HashMap<String, AnomalyDetector>,
}

impl WriterThread {
    fn new(conn: Connection, config: RepoConfig, counters: Arc<Counters>) -> Self {
        Self {
            conn,
            config,
            counters,
            pending: Vec::new(),
            pending_rows: 0,
            first_pending: None,
            last_retention: Instant::now(),
            detectors: HashMap::new(),
        }
    }

    fn run(&mut self, rx: Receiver<Command>) {
        loop {
            let now = Instant::now();
            let commit_due = self.first_pending.map(|t| t + self.config.commit_interval);
            let retention_due = (self.config.max_age.is_some() || self.config.max_rows.is_some())
                .then(|| self.last_retention + self.config.retention_interval);
            let wake = match (commit_due, retention_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let received = match wake {
                Some(t) => rx.recv_timeout(t.saturating_duration_since(now)),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(Command::Flush(reply)) => {
                    let r = self.commit();
                    let _ = reply.send(r);
                }
                Ok(Command::Retention { now_wall_ns, reply }) => {
                    let r = self
                        .commit()
                        .and_then(|()| self.retention(now_wall_ns.unwrap_or_else(wall_now_ns)));
                    let _ = reply.send(r);
                }
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    if let Err(e) = self.commit() {
                        log::error!("state repository: final commit failed: {e}");
                    }
                    break;
                }
                Ok(cmd) => self.enqueue(cmd),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if self.pending_rows >= self.config.max_batch
                || self
                    .first_pending
                    .is_some_and(|t| now >= t + self.config.commit_interval)
            {
                if let Err(e) = self.commit() {
                    log::error!("state repository: commit failed: {e}");
                }
            }
            if retention_due.is_some_and(|t| now >= t) {
                if let Err(e) = self.retention(wall_now_ns()) {
                    log::error!("state repository: retention failed: {e}");
                }
            }
        }
        log::info!("state repository writer stopped");
    }

    fn enqueue(&mut self, cmd: Command) {
        let cmd = match cmd {
            Command::Row(mut row) => {
                self.judge(&mut row);
                self.pending_rows += 1;
                Command::Row(row)
            }
            other => other,
        };
        self.pending.push(cmd);
        if self.first_pending.is_none() {
            self.first_pending = Some(Instant::now());
        }
    }

    /// Runs the VM's anomaly detector on a row that carries no verdict.
    fn judge(&mut self, row: &mut Row) {
        let Some(cfg) = &self.config.anomaly else {
            return;
        };
        if row.anomaly.is_some() || row.schema_version != SCHEMA_VERSION {
            return;
        }
        let detector = match self.detectors.get_mut(&row.vm_id) {
            Some(d) => d,
            None => match AnomalyDetector::new(cfg.clone()) {
                Ok(d) => self.detectors.entry(row.vm_id.clone()).or_insert(d),
                Err(e) => {
                    log::error!("anomaly detector: {e}");
                    return;
                }
            },
        };
        match detector.observe(&row.vector) {
            Ok(v) => {
                row.anomaly = Some(v.anomalous);
                row.anomaly_score = Some(v.score);
                if v.anomalous {
                    self.counters.anomalies.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => log::debug!("anomaly detector skipped a row of {}: {e}", row.vm_id),
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        let rows = std::mem::take(&mut self.pending_rows);
        self.first_pending = None;
        let events = batch
            .iter()
            .filter(|c| matches!(c, Command::Event(_)))
            .count();
        match write_batch(&mut self.conn, batch) {
            Ok(()) => {
                let c = &self.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
                c.events_written.fetch_add(events as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let c = &self.counters;
                c.commit_errors.fetch_add(1, Ordering::Relaxed);
                c.rows_dropped.fetch_add(rows as u64, Ordering::Relaxed);
                c.events_dropped.fetch_add(events as u64, Ordering::Relaxed);
                Err(e.to_string())
            }
        }
    }

    fn retention(&mut self, now_wall_ns: i64) -> Result<u64, String> {
        self.last_retention = Instant::now();
        let r = apply_retention(
            &mut self.conn,
            now_wall_ns,
            self.config.max_age,
            self.config.max_rows,
        );
        match r {
            Ok(n) => {
                if n > 0 {
                    log::debug!("state repository retention deleted {n} rows/events");
                }
                self.counters.deleted.fetch_add(n, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

fn write_batch(conn: &mut Connection, batch: Vec<Command>) -> Result<(), RepoError> {
    let tx = conn.transaction()?;
    {
        let wall = wall_now_ns();
        let mut insert = tx.prepare_cached(INSERT_ROW_SQL)?;
        let mut event = tx.prepare_cached(
            "INSERT INTO events (ts_ns, wall_ns, vm_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut outcome = tx.prepare_cached(
            "UPDATE samples SET action = ?3, reward = ?4 WHERE vm_id = ?1 AND ts_ns = ?2",
        )?;
        for cmd in batch {
            match cmd {
                Command::Row(r) => {
                    let raw = serde_json::to_string(&r.raw)?;
                    insert.execute(params![
                        r.vm_id,
                        to_i64(r.ts_ns),
                        wall,
                        to_i64(r.interval_ns),
                        r.schema_version,
                        encode_vector(&r.vector),
                        raw,
                        r.action,
                        r.reward,
                        r.policy_id,
                        r.config,
                        r.anomaly,
                        r.anomaly_score,
                        r.slo.map(|s| s.class.name()),
                        r.slo.map(|s| s.met),
                        r.slo.and_then(|s| s.p99_margin),
                        r.slo.and_then(|s| s.ops_margin),
                    ])?;
                }
                Command::Event(e) => {
                    event.execute(params![to_i64(e.ts_ns), wall, e.vm_id, e.kind, e.detail])?;
                }
                Command::Outcome {
                    vm_id,
                    ts_ns,
                    action,
                    reward,
                } => {
                    let n = outcome.execute(params![vm_id, to_i64(ts_ns), action, reward])?;
                    if n == 0 {
                        log::warn!("outcome for unknown interval {vm_id}@{ts_ns}");
                    }
                }
                Command::Flush(_) | Command::Retention { .. } | Command::Shutdown => {}
            }
        }
    }
    tx.commit()?;
    Ok(())
}

fn apply_retention(
    conn: &mut Connection,
    now_wall_ns: i64,
    max_age: Option<Duration>,
    max_rows: Option<u64>,
) -> Result<u64, RepoError> {
    let tx = conn.transaction()?;
    let mut deleted = 0u64;
    if let Some(age) = max_age {
        let age_ns = i64::try_from(age.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = now_wall_ns.saturating_sub(age_ns);
        deleted += tx.execute("DELETE FROM samples WHERE wall_ns < ?1", [cutoff])? as u64;
        deleted += tx.execute("DELETE FROM events WHERE wall_ns < ?1", [cutoff])? as u64;
    }
    if let Some(max) = max_rows {
        let cutoff: Option<i64> = tx
            .query_row(
                "SELECT id FROM samples ORDER BY id DESC LIMIT 1 OFFSET ?1",
                [to_i64(max)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(cutoff) = cutoff {
            deleted += tx.execute("DELETE FROM samples WHERE id <= ?1", [cutoff])? as u64;
        }
    }
    tx.commit()?;
    Ok(deleted)
}

#[cfg(feature = "parquet")]
mod parquet_export {
    use std::fs::File;
    use std::path::Path;
    use std::sync::Arc;

    use parquet::data_type::{
        BoolType, ByteArray, ByteArrayType, DataType, DoubleType, FloatType, Int32Type, Int64Type,
    };
    use parquet::errors::ParquetError;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
    use parquet::schema::parser::parse_message_type;

    use super::{export_columns, RepoError, StoredRow};
    use crate::schema::FEATURES;

    impl From<ParquetError> for RepoError {
        fn from(e: ParquetError) -> Self {
            RepoError::Parquet(e.to_string())
        }
    }

    /// The Parquet schema: the columns of [`export_columns`] with their types.
    pub(super) fn message_type() -> String {
        let cols = export_columns();
        let types = [
            "REQUIRED INT64",
            "REQUIRED BYTE_ARRAY",
            "REQUIRED INT64",
            "REQUIRED INT64",
            "REQUIRED INT64",
            "REQUIRED INT32",
            "REQUIRED BYTE_ARRAY",
            "OPTIONAL BYTE_ARRAY",
            "OPTIONAL DOUBLE",
            "OPTIONAL BOOLEAN",
            "OPTIONAL DOUBLE",
            "REQUIRED BYTE_ARRAY",
        ];
        let mut s = String::from("message samples {\n");
        for (i, name) in cols.iter().enumerate() {
            let ty = types
                .get(i)
                .copied()
                .unwrap_or(if i < types.len() + FEATURES.len() {
                    "OPTIONAL FLOAT"
                } else {
                    "OPTIONAL DOUBLE"
                });
            let utf8 = if ty.ends_with("BYTE_ARRAY") {
                " (UTF8)"
            } else {
                ""
            };
            s.push_str(&format!("  {ty} {name}{utf8};\n"));
        }
        s.push('}');
        s
    }

    pub(super) struct ParquetOut {
        writer: SerializedFileWriter<File>,
    }

    fn req<T: DataType>(
        cw: &mut SerializedColumnWriter<'_>,
        values: Vec<T::T>,
    ) -> Result<(), ParquetError> {
        cw.typed::<T>().write_batch(&values, None, None)?;
        Ok(())
    }

    fn opt<T: DataType>(
        cw: &mut SerializedColumnWriter<'_>,
        values: Vec<Option<T::T>>,
    ) -> Result<(), ParquetError> {
        let defs: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
        let present: Vec<T::T> = values.into_iter().flatten().collect();
        cw.typed::<T>().write_batch(&present, Some(&defs), None)?;
        Ok(())
    }

    fn text(s: &str) -> ByteArray {
        ByteArray::from(s.as_bytes().to_vec())
    }

    impl ParquetOut {
        pub(super) fn create(path: &Path) -> Result<Self, RepoError> {
            let schema = Arc::new(parse_message_type(&message_type())?);
            let props = Arc::new(WriterProperties::builder().build());
            let file = File::create(path)?;
            Ok(Self {
                writer: SerializedFileWriter::new(file, schema, props)?,
            })
        }

        pub(super) fn write_group(&mut self, rows: &[StoredRow]) -> Result<(), RepoError> {
            let n = FEATURES.len();
            let mut group = self.writer.next_row_group()?;
            let mut col = 0usize;
            while let Some(mut cw) = group.next_column()? {
                let w = &mut cw;
                match col {
                    0 => req::<Int64Type>(w, rows.iter().map(|s| s.id).collect())?,
                    1 => {
                        req::<ByteArrayType>(w, rows.iter().map(|s| text(&s.row.vm_id)).collect())?
                    }
                    2 => req::<Int64Type>(
                        w,
                        rows.iter().map(|s| super::to_i64(s.row.ts_ns)).collect(),
                    )?,
                    3 => req::<Int64Type>(w, rows.iter().map(|s| s.wall_ns).collect())?,
                    4 => req::<Int64Type>(
                        w,
                        rows.iter()
                            .map(|s| super::to_i64(s.row.interval_ns))
                            .collect(),
                    )?,
                    5 => req::<Int32Type>(
                        w,
                        rows.iter()
                            .map(|s| i32::try_from(s.row.schema_version).unwrap_or(i32::MAX))
                            .collect(),
                    )?,
                    6 => req::<ByteArrayType>(
                        w,
                        rows.iter().map(|s| text(&s.row.policy_id)).collect(),
                    )?,
                    7 => opt::<ByteArrayType>(
                        w,
                        rows.iter()
                            .map(|s| s.row.action.as_deref().map(text))
                            .collect(),
                    )?,
                    8 => opt::<DoubleType>(w, rows.iter().map(|s| s.row.reward).collect())?,
                    9 => opt::<BoolType>(w, rows.iter().map(|s| s.row.anomaly).collect())?,
                    10 => opt::<DoubleType>(w, rows.iter().map(|s| s.row.anomaly_score).collect())?,
                    11 => {
                        req::<ByteArrayType>(w, rows.iter().map(|s| text(&s.row.config)).collect())?
                    }
                    c if c < 12 + n => {
                        let f = c - 12;
                        opt::<FloatType>(
                            w,
                            rows.iter().map(|s| s.row.vector.get(f).copied()).collect(),
                        )?
                    }
                    c => {
                        let f = c - 12 - n;
                        opt::<DoubleType>(
                            w,
                            rows.iter().map(|s| s.row.raw.get(f).copied()).collect(),
                        )?
                    }
                }
                cw.close()?;
                col += 1;
            }
            group.close()?;
            Ok(())
        }

        pub(super) fn close(self) -> Result<(), RepoError> {
            self.writer.close()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FeatureId;

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
}
