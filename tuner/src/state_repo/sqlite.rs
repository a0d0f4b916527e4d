//! The SQLite backend: one file per host, WAL journaling, each writer waiting up to 5 s
//! for another's transaction (SQLite's busy timeout).
//!
//! The layout is versioned by SQLite's `user_version` ([`DB_LAYOUT_VERSION`]): layout 2
//! added the four `slo_*` columns; a layout-1 file is migrated in place when opened for
//! writing (`ALTER TABLE ... ADD COLUMN`, its old rows NULL there), and read as is.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::backend::{Reader, Store};
use super::row::{
    decode_vector, encode_vector, raw_from_json, raw_json, slo_columns, to_i64, to_u64,
    wall_now_ns, Event, Row, RowFilter, StoredEvent, StoredRow,
};
use super::writer::Command;
use super::RepoError;
use crate::schema::{Schema, SCHEMA_VERSION};

/// Layout version of the database (SQLite `user_version`). 2: the `slo_*` columns.
pub const DB_LAYOUT_VERSION: i64 = 2;

pub(crate) const CREATE_SQL: &str = "
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

fn read_stored(r: &rusqlite::Row<'_>) -> Result<StoredRow, RepoError> {
    let blob: Vec<u8> = r.get(6)?;
    let raw_text: String = r.get(7)?;
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
            raw: raw_from_json(&raw_text)?,
            action: r.get(8)?,
            reward: r.get(9)?,
            policy_id: r.get(10)?,
            config: r.get(11)?,
            anomaly: r.get::<_, Option<i64>>(12)?.map(|a| a != 0),
            anomaly_score: r.get(13)?,
            slo: slo_columns(
                r.get(14)?,
                r.get::<_, Option<i64>>(15)?.map(|m| m != 0),
                r.get(16)?,
                r.get(17)?,
            ),
        },
    })
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

/// Opens (creating if needed) the repository file at `path` for writing: WAL mode, the
/// tables, a layout-1 file migrated. Returns the writer's store and a reader.
pub(crate) fn open_for_writing(path: &Path) -> Result<(SqliteStore, SqliteReader), RepoError> {
    // SQLite's own open would block on a FIFO: a regular file (or a new one) only.
    crate::files::check_regular_if_exists(path)
        .map_err(|e| RepoError::NotARepository(e.to_string()))?;
    let conn = Connection::open(path)?;
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
    let reader = Connection::open(path)?;
    reader.busy_timeout(Duration::from_secs(5))?;
    Ok((
        SqliteStore { conn },
        SqliteReader {
            conn: reader,
            slo_columns: SELECT_SLO_COLUMNS,
        },
    ))
}

/// Opens an existing repository file for reading only: SQLite's read-only mode, no
/// journal-mode change, no tables created. A file that is not a regular file, not SQLite,
/// or a SQLite database without the repository's layout is refused and left untouched.
pub(crate) fn open_read_only(path: &Path) -> Result<SqliteReader, RepoError> {
    let not_repo = |why: String| RepoError::NotARepository(format!("{}: {why}", path.display()));
    crate::files::open_regular(path).map_err(|e| not_repo(e.to_string()))?;
    let conn = open_sqlite_read_only(path)?;
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
    Ok(SqliteReader {
        conn,
        slo_columns: if layout >= 2 {
            SELECT_SLO_COLUMNS
        } else {
            SELECT_NO_SLO_COLUMNS
        },
    })
}

/// The writer thread's connection.
pub(crate) struct SqliteStore {
    conn: Connection,
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn connected(&self) -> bool {
        true
    }

    fn connect(&mut self) -> Result<(), RepoError> {
        Ok(())
    }

    fn write_batch(&mut self, batch: &[Command]) -> Result<(), RepoError> {
        let tx = self.conn.transaction()?;
        {
            let now = wall_now_ns();
            let mut insert = tx.prepare_cached(INSERT_ROW_SQL)?;
            let mut event = tx.prepare_cached(
                "INSERT INTO events (ts_ns, wall_ns, vm_id, kind, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut outcome = tx.prepare_cached(
                "UPDATE samples SET action = ?3, reward = ?4 WHERE vm_id = ?1 AND ts_ns = ?2",
            )?;
            let mut put_row = |r: &Row, wall: i64| -> Result<(), RepoError> {
                insert.execute(params![
                    r.vm_id,
                    to_i64(r.ts_ns),
                    wall,
                    to_i64(r.interval_ns),
                    r.schema_version,
                    encode_vector(&r.vector),
                    raw_json(&r.raw)?,
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
                Ok(())
            };
            for cmd in batch {
                match cmd {
                    Command::Row(r) => put_row(r, now)?,
                    Command::Copied(s) => put_row(&s.row, s.wall_ns)?,
                    Command::Event(e) => {
                        event.execute(params![to_i64(e.ts_ns), now, e.vm_id, e.kind, e.detail])?;
                    }
                    Command::CopiedEvent(s) => {
                        let e = &s.event;
                        event.execute(params![
                            to_i64(e.ts_ns),
                            s.wall_ns,
                            e.vm_id,
                            e.kind,
                            e.detail
                        ])?;
                    }
                    Command::Outcome {
                        vm_id,
                        ts_ns,
                        action,
                        reward,
                    } => {
                        let n = outcome.execute(params![vm_id, to_i64(*ts_ns), action, reward])?;
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

    fn retention(
        &mut self,
        now_wall_ns: i64,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<u64, RepoError> {
        let tx = self.conn.transaction()?;
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
}

/// A reading connection.
pub(crate) struct SqliteReader {
    conn: Connection,
    /// What reads select for the `slo_*` columns (NULLs on a layout-1 file read as is).
    slo_columns: &'static str,
}

impl Reader for SqliteReader {
    fn rows(&mut self, filter: &RowFilter) -> Result<Vec<StoredRow>, RepoError> {
        if filter.host_id.is_some() {
            return Err(RepoError::Unsupported {
                backend: "sqlite",
                what: "a host filter (a SQLite repository is one host's; no host column)",
            });
        }
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SELECT_COLUMNS}, {} FROM samples WHERE (?1 IS NULL OR vm_id = ?1) \
             AND ts_ns >= ?2 AND (?3 IS NULL OR wall_ns >= ?3) AND (?4 IS NULL OR wall_ns < ?4) \
             AND (?5 IS NULL OR substr(vm_id, 1, length(?5)) = ?5) \
             ORDER BY vm_id, ts_ns, id",
            self.slo_columns
        ))?;
        let mut rows = stmt.query(params![
            filter.vm_id,
            to_i64(filter.since_ns),
            filter.from_wall_ns,
            filter.to_wall_ns,
            filter.scenario,
        ])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(read_stored(r)?);
        }
        Ok(out)
    }

    fn events(
        &mut self,
        vm_id: Option<&str>,
        since_ns: u64,
    ) -> Result<Vec<StoredEvent>, RepoError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT ts_ns, vm_id, kind, detail, wall_ns FROM events \
             WHERE (?1 IS NULL OR vm_id = ?1) AND ts_ns >= ?2 ORDER BY ts_ns, id",
        )?;
        let mut rows = stmt.query(params![vm_id, to_i64(since_ns)])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(StoredEvent {
                event: Event {
                    ts_ns: to_u64(r.get(0)?),
                    vm_id: r.get(1)?,
                    kind: r.get(2)?,
                    detail: r.get(3)?,
                },
                wall_ns: r.get(4)?,
            });
        }
        Ok(out)
    }

    fn count(&mut self) -> Result<u64, RepoError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))?;
        Ok(to_u64(n))
    }

    fn for_each_chunk(
        &mut self,
        chunk: usize,
        f: &mut dyn FnMut(&[StoredRow]) -> Result<(), RepoError>,
    ) -> Result<u64, RepoError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SELECT_COLUMNS}, {} FROM samples ORDER BY id",
            self.slo_columns
        ))?;
        let mut rows = stmt.query([])?;
        super::backend::in_chunks(chunk, || rows.next()?.map(read_stored).transpose(), f)
    }
}
