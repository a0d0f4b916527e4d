//! The state repository: a time series of performance vectors, actions, rewards and
//! policy versions, in SQLite (one file per host, the embedded default) or PostgreSQL (one
//! database for a fleet), behind one interface ([`backend`]).
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
//! PostgreSQL adds `host_id` (the writing host) and partitions `samples` by day of
//! `wall_ns` ([`postgres`]). `events (id, ts_ns, wall_ns, vm_id, kind, detail)` for policy
//! load failures, refused actions, rollbacks and the like (see [`event_kind`]); `meta`
//! holds the vector schema. Each backend versions its layout ([`sqlite::DB_LAYOUT_VERSION`],
//! [`postgres::PG_LAYOUT_VERSION`]) and migrates it on first use.
//!
//! # Writing
//!
//! Writes never run on the caller's thread ([`writer`]): [`RepoWriter`] hands rows over a
//! bounded channel to a writer thread, which batches them and commits a transaction at
//! least every [`RepoConfig::commit_interval`] (200 ms by default). A `kill -9` therefore
//! loses at most the rows of the last commit interval plus what was queued. With SQLite,
//! WAL journaling keeps the file consistent; `synchronous=NORMAL` makes commits survive a
//! process crash but not necessarily a power loss. With PostgreSQL, rows wait in the
//! writer's bounded buffer while the server is unreachable and are written when it is
//! back. The writer also runs the anomaly detector ([`crate::anomaly`]) per VM on rows
//! that do not carry a verdict yet, and applies retention ([`RepoConfig::max_age`],
//! [`RepoConfig::max_rows`]) periodically.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::anomaly::{AnomalyConfig, AnomalyDetector};

pub mod backend;
mod export;
pub mod location;
pub mod postgres;
pub mod row;
pub mod sqlite;
pub mod writer;

pub use location::{Location, PgUrl};
pub use row::{
    decode_vector, encode_vector, event_kind, Event, Row, RowFilter, SloColumns, StoredEvent,
    StoredRow,
};
pub use sqlite::{open_sqlite_read_only, DB_LAYOUT_VERSION};
pub use writer::{RepoSink, RepoWriter, WriterStats};

use backend::Reader;

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
    #[error("sqlite: database layout version {found} is newer than this build's {supported}")]
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
    /// PostgreSQL reported an error while doing `what`.
    #[error("postgresql: {what}: {}", postgres::describe(source))]
    Postgres {
        /// What failed (connecting, copying, reading rows...).
        what: &'static str,
        /// The client's error (the server's message when it answered).
        #[source]
        source: ::postgres::Error,
    },
    /// A `--state-db` URL is malformed.
    #[error("{backend}: bad URL: {message}")]
    BadUrl {
        /// The backend the URL was meant for.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The database was made by another layout of this backend's schema.
    #[error(
        "{backend}: database schema version {found}, this build reads and writes only {supported}"
    )]
    SchemaVersion {
        /// The backend.
        backend: &'static str,
        /// Layout found.
        found: i64,
        /// Layout of this build.
        supported: i64,
    },
    /// The backend cannot do this.
    #[error("{backend}: {what} is not supported")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
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
    /// Rows the writer keeps while the database cannot be written (default 262 144: 45
    /// minutes of 8 VMs at 100 ms); past it the oldest are dropped and counted.
    pub buffer: usize,
    /// This host's id in a PostgreSQL repository (`None`: the host name).
    pub host_id: Option<String>,
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
            buffer: 262_144,
            host_id: None,
            max_age: None,
            max_rows: None,
            retention_interval: Duration::from_secs(10),
            anomaly: Some(AnomalyConfig::default()),
        }
    }
}

impl RepoConfig {
    fn check(&self) -> Result<(), RepoError> {
        if self.commit_interval.is_zero() || self.retention_interval.is_zero() {
            return Err(RepoError::InvalidConfig(
                "commit and retention intervals must be positive".into(),
            ));
        }
        if self.max_batch == 0 || self.queue == 0 || self.buffer == 0 {
            return Err(RepoError::InvalidConfig(
                "max_batch, queue and buffer must be at least 1".into(),
            ));
        }
        if let Some(a) = &self.anomaly {
            AnomalyDetector::new(a.clone()).map_err(|e| RepoError::InvalidConfig(e.to_string()))?;
        }
        Ok(())
    }
}

/// This host's name (`gethostname`), the default host id; `unknown` when unreadable.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The reading side: open, or (PostgreSQL opened for writing) connected on first use, so
/// that a monitor whose database is down at start still runs.
enum ReaderSlot {
    Open(Box<dyn Reader>),
    Lazy(PgUrl),
}

/// The state repository: owns the writer thread and a reader connection.
pub struct StateRepo {
    location: Location,
    writer: RepoWriter,
    handle: Option<JoinHandle<()>>,
    reader: Mutex<ReaderSlot>,
}

impl std::fmt::Debug for StateRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateRepo")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl StateRepo {
    /// Opens (creating if needed) the SQLite repository at `path` and starts its writer
    /// thread.
    pub fn open(path: impl AsRef<Path>, config: RepoConfig) -> Result<StateRepo, RepoError> {
        Self::open_at(&Location::Sqlite(path.as_ref().to_path_buf()), config)
    }

    /// Opens the repository at `location` for writing (creating or migrating its schema)
    /// and starts its writer thread. A PostgreSQL server that cannot be reached is not an
    /// error: the repository starts degraded ([`WriterStats::degraded`]) and its rows wait
    /// in the writer's buffer; one that answers and refuses (authentication, missing
    /// database, another schema version) is.
    pub fn open_at(location: &Location, config: RepoConfig) -> Result<StateRepo, RepoError> {
        config.check()?;
        let (store, reader): (Box<dyn backend::Store>, ReaderSlot) = match location {
            Location::Sqlite(path) => {
                let (store, reader) = sqlite::open_for_writing(path)?;
                (Box::new(store), ReaderSlot::Open(Box::new(reader)))
            }
            Location::Postgres(url) => {
                let host = config.host_id.clone().unwrap_or_else(host_name);
                let store = postgres::open_for_writing(url, host)?;
                (Box::new(store), ReaderSlot::Lazy(url.clone()))
            }
        };
        let (writer, handle) = writer::spawn(store, config)?;
        log::info!(
            "state repository opened at {location} ({})",
            location.backend()
        );
        Ok(StateRepo {
            location: location.clone(),
            writer,
            handle: Some(handle),
            reader: Mutex::new(reader),
        })
    }

    /// Opens an existing SQLite repository for reading only (`vmm state export`, `vmm ab
    /// report`): SQLite's read-only mode, no journal-mode change, no tables created, no
    /// writer thread. A file that is not a regular file, not SQLite, or a SQLite database
    /// without the repository's layout is refused and left untouched.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<StateRepo, RepoError> {
        Self::open_read_only_at(&Location::Sqlite(path.as_ref().to_path_buf()))
    }

    /// Opens an existing repository at `location` for reading only (no writer thread, no
    /// schema change). A PostgreSQL database must hold this build's schema layout.
    pub fn open_read_only_at(location: &Location) -> Result<StateRepo, RepoError> {
        let reader: Box<dyn Reader> = match location {
            Location::Sqlite(path) => Box::new(sqlite::open_read_only(path)?),
            Location::Postgres(url) => Box::new(postgres::open_reader(url)?),
        };
        Ok(StateRepo {
            location: location.clone(),
            writer: writer::closed(),
            handle: None,
            reader: Mutex::new(ReaderSlot::Open(reader)),
        })
    }

    /// Commits what is queued, unless the repository was opened read-only.
    fn flush_if_writing(&self) -> Result<(), RepoError> {
        if self.handle.is_some() {
            self.flush()?;
        }
        Ok(())
    }

    /// Where the repository is.
    pub fn location(&self) -> &Location {
        &self.location
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

    /// Runs `f` on the reader, connecting it first if it is not yet; a PostgreSQL reader
    /// whose server went away since its last read reconnects and `f` runs once more.
    fn read<T>(
        &self,
        mut f: impl FnMut(&mut dyn Reader) -> Result<T, RepoError>,
    ) -> Result<T, RepoError> {
        let mut slot = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        let mut retried = false;
        loop {
            if let ReaderSlot::Lazy(url) = &*slot {
                let reader = postgres::open_reader(url)?;
                *slot = ReaderSlot::Open(Box::new(reader));
            }
            let ReaderSlot::Open(r) = &mut *slot else {
                return Err(RepoError::Closed);
            };
            let result = f(r.as_mut());
            match (&self.location, result) {
                (Location::Postgres(url), Err(e)) if !retried && r.lost() => {
                    log::info!("state repository (postgresql): reconnecting the reader ({e})");
                    *slot = ReaderSlot::Lazy(url.clone());
                    retried = true;
                }
                (_, result) => return result,
            }
        }
    }

    /// Committed rows of `vm_id` with `ts_ns >= since_ns`, oldest first.
    pub fn rows(&self, vm_id: &str, since_ns: u64) -> Result<Vec<Row>, RepoError> {
        self.select(&RowFilter::vm(Some(vm_id), since_ns))
    }

    /// The rows of every VM from `since_ns` on, VM by VM, each in time order (for reports
    /// over several VMs sharing one repository).
    pub fn rows_of_all_vms(&self, since_ns: u64) -> Result<Vec<Row>, RepoError> {
        self.select(&RowFilter::vm(None, since_ns))
    }

    /// The rows matching `filter`, VM by VM, each in time order.
    pub fn select(&self, filter: &RowFilter) -> Result<Vec<Row>, RepoError> {
        Ok(self
            .select_stored(filter)?
            .into_iter()
            .map(|s| s.row)
            .collect())
    }

    /// The rows matching `filter` with their storage metadata.
    pub fn select_stored(&self, filter: &RowFilter) -> Result<Vec<StoredRow>, RepoError> {
        self.read(|r| r.rows(filter))
    }

    /// Committed events with `ts_ns >= since_ns`, of one VM or of all, oldest first.
    pub fn events(&self, vm_id: Option<&str>, since_ns: u64) -> Result<Vec<Event>, RepoError> {
        Ok(self
            .read(|r| r.events(vm_id, since_ns))?
            .into_iter()
            .map(|s| s.event)
            .collect())
    }

    /// Number of committed sample rows.
    pub fn count(&self) -> Result<u64, RepoError> {
        self.read(|r| r.count())
    }

    /// Exports every row (after committing what is queued) as CSV with a header: the
    /// storage columns, then `v_<feature>` (normalised) and `raw_<feature>` columns in
    /// schema order. Returns the number of rows written.
    pub fn export_csv(&self, path: impl AsRef<Path>) -> Result<u64, RepoError> {
        self.flush_if_writing()?;
        let mut out = BufWriter::new(File::create(path.as_ref())?);
        writeln!(out, "{}", export::export_columns().join(","))?;
        let n = self
            .read(|r| r.for_each_chunk(4096, &mut |rows| export::write_csv_rows(&mut out, rows)))?;
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
            let mut out = export::parquet_export::ParquetOut::create(path.as_ref())?;
            let n = self.read(|r| r.for_each_chunk(65_536, &mut |rows| out.write_group(rows)))?;
            out.close()?;
            Ok(n)
        }
        #[cfg(not(feature = "parquet"))]
        {
            let _ = path;
            Err(RepoError::ParquetUnsupported)
        }
    }

    /// Copies every row and event of this repository into `target` (another backend or
    /// file, opened for writing), keeping their VM ids, times and verdicts, and waits for
    /// the commit. Returns the rows and events copied.
    pub fn copy_to(&self, target: &StateRepo) -> Result<(u64, u64), RepoError> {
        self.flush_if_writing()?;
        let w = target.writer();
        let rows = self.read(|r| {
            r.for_each_chunk(4096, &mut |rows| {
                rows.iter().try_for_each(|s| w.insert_copied(s.clone()))
            })
        })?;
        let events = self.read(|r| r.events(None, 0))?;
        let n_events = events.len() as u64;
        for e in events {
            w.record_copied_event(e)?;
        }
        target.flush()?;
        Ok((rows, n_events))
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
        let _ = self.writer.tx.send(writer::Command::Shutdown);
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

#[cfg(test)]
mod tests;
