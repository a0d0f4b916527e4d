//! The PostgreSQL backend: one database for a fleet of hosts, each row with its host's
//! and its VM's id.
//!
//! # Schema (layout [`PG_LAYOUT_VERSION`])
//!
//! - `repo_version (version)`: the layout, one row. A database of another layout is
//!   refused with [`RepoError::SchemaVersion`]; a database without it is migrated on first
//!   use (under an advisory lock, so monitors starting together migrate once).
//! - `samples`: the SQLite table's columns (same meaning; `vector` BYTEA, `anomaly` and
//!   `slo_met` BOOLEAN) plus `host_id`, **partitioned by range of `wall_ns`**, one
//!   partition per UTC day (`samples_d<days since 1970>`), created by the writer when a
//!   batch needs it: a time-range query reads only its days' partitions, and retention
//!   by age could drop whole days.
//! - `events`: as in SQLite plus `host_id`. `meta (key, value)`: the vector schema.
//!
//! Rows go in with binary `COPY` in one transaction per batch; outcomes are `UPDATE`s of
//! the host's own rows.
//!
//! The client is the `postgres` crate (synchronous; it runs tokio-postgres on a
//! current-thread runtime on the calling thread: no extra threads). Host names are
//! resolved once, when the repository is opened, so that reconnections on the writer
//! thread (under its seccomp filter) need no resolver.

use std::collections::HashSet;
use std::net::ToSocketAddrs;
use std::time::Duration;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls};

use super::backend::{Reader, Store};
use super::location::PgUrl;
use super::row::{
    decode_vector, encode_vector, raw_from_json, raw_json, slo_columns, to_i64, to_u64,
    wall_now_ns, Event, Row, RowFilter, StoredEvent, StoredRow,
};
use super::writer::Command;
use super::RepoError;
use crate::schema::{Schema, SCHEMA_VERSION};

/// Layout version of a PostgreSQL repository (`repo_version`).
pub const PG_LAYOUT_VERSION: i32 = 1;

/// The advisory lock key under which the schema is migrated and partitions created.
const MIGRATION_LOCK: i64 = 0x766d_6d5f_7265_706f; // "vmm_repo"

/// One day in nanoseconds: the partitions' width.
const DAY_NS: i64 = 86_400_000_000_000;

const CREATE_SQL: &str = "
CREATE SEQUENCE IF NOT EXISTS samples_id_seq;
CREATE TABLE IF NOT EXISTS samples (
    id             BIGINT  NOT NULL DEFAULT nextval('samples_id_seq'),
    host_id        TEXT    NOT NULL,
    vm_id          TEXT    NOT NULL,
    ts_ns          BIGINT  NOT NULL,
    wall_ns        BIGINT  NOT NULL,
    interval_ns    BIGINT  NOT NULL,
    schema_version INTEGER NOT NULL,
    vector         BYTEA   NOT NULL,
    raw            TEXT    NOT NULL,
    action         TEXT,
    reward         DOUBLE PRECISION,
    policy_id      TEXT    NOT NULL,
    config         TEXT    NOT NULL,
    anomaly        BOOLEAN,
    anomaly_score  DOUBLE PRECISION,
    slo_class      TEXT,
    slo_met        BOOLEAN,
    slo_p99_margin DOUBLE PRECISION,
    slo_ops_margin DOUBLE PRECISION
) PARTITION BY RANGE (wall_ns);
CREATE INDEX IF NOT EXISTS samples_vm_ts ON samples (vm_id, ts_ns);
CREATE INDEX IF NOT EXISTS samples_host_vm_ts ON samples (host_id, vm_id, ts_ns);
CREATE INDEX IF NOT EXISTS samples_id ON samples (id);
CREATE TABLE IF NOT EXISTS events (
    id      BIGSERIAL PRIMARY KEY,
    host_id TEXT   NOT NULL,
    ts_ns   BIGINT NOT NULL,
    wall_ns BIGINT NOT NULL,
    vm_id   TEXT   NOT NULL,
    kind    TEXT   NOT NULL,
    detail  TEXT   NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm_ts ON events (vm_id, ts_ns);
CREATE INDEX IF NOT EXISTS events_wall ON events (wall_ns);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const COPY_SQL: &str = "COPY samples (host_id, vm_id, ts_ns, wall_ns, interval_ns, \
     schema_version, vector, raw, action, reward, policy_id, config, anomaly, anomaly_score, \
     slo_class, slo_met, slo_p99_margin, slo_ops_margin) FROM STDIN BINARY";

const COPY_TYPES: [Type; 18] = [
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::FLOAT8,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::FLOAT8,
    Type::TEXT,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT8,
];

const SELECT_COLUMNS: &str = "id, wall_ns, vm_id, ts_ns, interval_ns, schema_version, vector, \
     raw, action, reward, policy_id, config, anomaly, anomaly_score, slo_class, slo_met, \
     slo_p99_margin, slo_ops_margin";

/// The client's error with the server's message when it answered (the client's own
/// `Display` says only "db error").
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// `what` failed with `e`, as a [`RepoError`] naming the backend.
fn pg(what: &'static str) -> impl Fn(postgres::Error) -> RepoError {
    move |source| RepoError::Postgres { what, source }
}

/// Whether `e` means the connection is gone (the server went away or shut down) rather
/// than a refused statement.
fn connection_lost(client: &Client, e: &postgres::Error) -> bool {
    if client.is_closed() || e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08 (connection exception), 57P01..57P03 (shutdown, crash, cannot connect now).
        Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
        // No server error: an I/O error on the socket.
        None => e.as_db_error().is_none() && std::error::Error::source(e).is_some(),
    }
}

/// The client configuration with every TCP host name resolved (once, here, on the
/// opening thread), a connect timeout and TCP keepalives.
fn resolved_config(url: &PgUrl) -> Result<postgres::Config, RepoError> {
    let mut config = url.config()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name("vmm");
    }
    if config.get_options().is_none() {
        // "relation ... already exists, skipping" notices of every migration check.
        config.options("-c client_min_messages=warning");
    }
    if config.get_hostaddrs().is_empty() {
        let ports = config.get_ports().to_vec();
        let mut addrs = Vec::new();
        for (i, host) in config.get_hosts().iter().enumerate() {
            let postgres::config::Host::Tcp(name) = host else {
                // A socket directory needs no address; hostaddr must still line up.
                addrs.push(None);
                continue;
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let ip = (name.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| RepoError::BadUrl {
                    backend: "postgresql",
                    message: format!("cannot resolve host {name}: {e}"),
                })?
                .next()
                .map(|a| a.ip())
                .ok_or_else(|| RepoError::BadUrl {
                    backend: "postgresql",
                    message: format!("host {name} has no address"),
                })?;
            addrs.push(Some(ip));
        }
        // hostaddr applies to every host or none: only when every host is TCP.
        if addrs.iter().all(Option::is_some) {
            for ip in addrs.into_iter().flatten() {
                config.hostaddr(ip);
            }
        }
    }
    Ok(config)
}

/// Connects, creates or checks the schema; the errors name what failed.
fn connect_and_migrate(config: &postgres::Config) -> Result<Client, RepoError> {
    let mut client = config.connect(NoTls).map_err(pg("cannot connect"))?;
    migrate(&mut client)?;
    Ok(client)
}

/// Creates the schema in an empty database, or checks the layout of an existing one.
fn migrate(client: &mut Client) -> Result<(), RepoError> {
    let mut tx = client.transaction().map_err(pg("migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg("migration lock"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS repo_version (version INTEGER NOT NULL)")
        .map_err(pg("migration"))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM repo_version", &[])
        .map_err(pg("reading the schema version"))?
        .and_then(|r| r.get(0));
    match found {
        Some(v) if v == PG_LAYOUT_VERSION => {}
        Some(v) => {
            return Err(RepoError::SchemaVersion {
                backend: "postgresql",
                found: i64::from(v),
                supported: i64::from(PG_LAYOUT_VERSION),
            })
        }
        None => {
            tx.batch_execute(CREATE_SQL)
                .map_err(pg("creating the schema"))?;
            tx.execute(
                "INSERT INTO repo_version (version) VALUES ($1)",
                &[&PG_LAYOUT_VERSION],
            )
            .map_err(pg("creating the schema"))?;
            log::info!("state repository (postgresql): schema layout {PG_LAYOUT_VERSION} created");
        }
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', $1), ('schema', $2) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&SCHEMA_VERSION.to_string(), &Schema::to_json()],
    )
    .map_err(pg("writing the metadata"))?;
    tx.commit().map_err(pg("migration"))?;
    Ok(())
}

/// Opens a PostgreSQL repository for writing. An unreachable server is not an error: the
/// store starts disconnected (the repository degraded) and its writer keeps trying. A
/// server that answers and refuses (authentication, missing database, another schema
/// layout) is an error.
pub(crate) fn open_for_writing(url: &PgUrl, host_id: String) -> Result<PgStore, RepoError> {
    let config = resolved_config(url)?;
    let client = match connect_and_migrate(&config) {
        Ok(c) => Some(c),
        Err(RepoError::Postgres { what, source }) if source.as_db_error().is_none() => {
            log::warn!(
                "state repository (postgresql) {url}: {what}: {source}; running degraded, \
                 rows are buffered until it can be reached"
            );
            None
        }
        Err(e) => return Err(e),
    };
    Ok(PgStore {
        config,
        client,
        host_id,
        partitions: HashSet::new(),
    })
}

/// Opens a PostgreSQL repository for reading; it must exist with this build's layout.
pub(crate) fn open_reader(url: &PgUrl) -> Result<PgReader, RepoError> {
    let config = resolved_config(url)?;
    let mut client = config.connect(NoTls).map_err(pg("cannot connect"))?;
    let has_version: bool = client
        .query_one("SELECT to_regclass('repo_version') IS NOT NULL", &[])
        .map_err(pg("reading the schema version"))?
        .get(0);
    if !has_version {
        return Err(RepoError::NotARepository(format!(
            "postgresql {url}: no repo_version table (no vmm has written to it)"
        )));
    }
    let found: Option<i32> = client
        .query_one("SELECT max(version) FROM repo_version", &[])
        .map_err(pg("reading the schema version"))?
        .get(0);
    if found != Some(PG_LAYOUT_VERSION) {
        return Err(RepoError::SchemaVersion {
            backend: "postgresql",
            found: found.map_or(0, i64::from),
            supported: i64::from(PG_LAYOUT_VERSION),
        });
    }
    Ok(PgReader { client })
}

/// The writer thread's connection (none while the server is unreachable).
pub(crate) struct PgStore {
    config: postgres::Config,
    client: Option<Client>,
    host_id: String,
    /// Days whose partition exists already.
    partitions: HashSet<i64>,
}

impl PgStore {
    /// Creates the day partitions `days` that do not exist yet.
    fn ensure_partitions(&mut self, days: &HashSet<i64>) -> Result<(), RepoError> {
        let missing: Vec<i64> = days
            .iter()
            .copied()
            .filter(|d| !self.partitions.contains(d))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let client = self.client.as_mut().ok_or(RepoError::Closed)?;
        let mut tx = client.transaction().map_err(pg("creating a partition"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(pg("creating a partition"))?;
        for day in &missing {
            let lo = day.saturating_mul(DAY_NS);
            let hi = lo.saturating_add(DAY_NS);
            // Names and bounds are integers computed here, not user text.
            let name = if *day < 0 {
                format!("samples_dm{}", day.unsigned_abs())
            } else {
                format!("samples_d{day}")
            };
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF samples \
                 FOR VALUES FROM ({lo}) TO ({hi})"
            ))
            .map_err(pg("creating a partition"))?;
        }
        tx.commit().map_err(pg("creating a partition"))?;
        self.partitions.extend(missing);
        Ok(())
    }

    fn write(&mut self, batch: &[Command]) -> Result<(), RepoError> {
        let now = wall_now_ns();
        let days: HashSet<i64> = batch
            .iter()
            .filter_map(|c| match c {
                Command::Row(_) => Some(now.div_euclid(DAY_NS)),
                Command::Copied(s) => Some(s.wall_ns.div_euclid(DAY_NS)),
                _ => None,
            })
            .collect();
        self.ensure_partitions(&days)?;
        let host = self.host_id.clone();
        let client = self.client.as_mut().ok_or(RepoError::Closed)?;
        let mut tx = client.transaction().map_err(pg("begin"))?;
        let mut i = 0;
        while i < batch.len() {
            // A run of rows goes in with one COPY.
            let run_end = batch[i..]
                .iter()
                .position(|c| !c.is_row())
                .map_or(batch.len(), |p| i + p);
            if run_end > i {
                copy_rows(&mut tx, &host, &batch[i..run_end], now)?;
                i = run_end;
                continue;
            }
            match &batch[i] {
                Command::Event(e) => {
                    insert_event(&mut tx, &host, e, now)?;
                }
                Command::CopiedEvent(s) => insert_event(&mut tx, &host, &s.event, s.wall_ns)?,
                Command::Outcome {
                    vm_id,
                    ts_ns,
                    action,
                    reward,
                } => {
                    let n = tx
                        .execute(
                            "UPDATE samples SET action = $4, reward = $5 \
                             WHERE host_id = $1 AND vm_id = $2 AND ts_ns = $3",
                            &[&host, vm_id, &to_i64(*ts_ns), action, reward],
                        )
                        .map_err(pg("recording an outcome"))?;
                    if n == 0 {
                        log::warn!("outcome for unknown interval {vm_id}@{ts_ns}");
                    }
                }
                _ => {}
            }
            i += 1;
        }
        tx.commit().map_err(pg("commit"))?;
        Ok(())
    }
}

fn insert_event(
    tx: &mut postgres::Transaction<'_>,
    host: &str,
    e: &Event,
    wall_ns: i64,
) -> Result<(), RepoError> {
    tx.execute(
        "INSERT INTO events (host_id, ts_ns, wall_ns, vm_id, kind, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &host,
            &to_i64(e.ts_ns),
            &wall_ns,
            &e.vm_id,
            &e.kind,
            &e.detail,
        ],
    )
    .map_err(pg("inserting an event"))?;
    Ok(())
}

/// Writes `rows` (only row commands) with binary COPY.
fn copy_rows(
    tx: &mut postgres::Transaction<'_>,
    host: &str,
    rows: &[Command],
    now: i64,
) -> Result<(), RepoError> {
    let sink = tx.copy_in(COPY_SQL).map_err(pg("copy"))?;
    let mut w = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    for c in rows {
        let (r, wall): (&Row, i64) = match c {
            Command::Row(r) => (r, now),
            Command::Copied(s) => (&s.row, s.wall_ns),
            _ => continue,
        };
        let vector = encode_vector(&r.vector);
        let raw = raw_json(&r.raw)?;
        let schema_version = i32::try_from(r.schema_version).unwrap_or(i32::MAX);
        let slo_class = r.slo.map(|s| s.class.name());
        let slo_met = r.slo.map(|s| s.met);
        let p99 = r.slo.and_then(|s| s.p99_margin);
        let ops = r.slo.and_then(|s| s.ops_margin);
        let values: [&(dyn ToSql + Sync); 18] = [
            &host,
            &r.vm_id,
            &to_i64(r.ts_ns),
            &wall,
            &to_i64(r.interval_ns),
            &schema_version,
            &vector,
            &raw,
            &r.action,
            &r.reward,
            &r.policy_id,
            &r.config,
            &r.anomaly,
            &r.anomaly_score,
            &slo_class,
            &slo_met,
            &p99,
            &ops,
        ];
        w.write(&values).map_err(pg("copy"))?;
    }
    w.finish().map_err(pg("copy"))?;
    Ok(())
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgresql"
    }

    fn connected(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }

    fn connect(&mut self) -> Result<(), RepoError> {
        if self.connected() {
            return Ok(());
        }
        self.client = None;
        self.partitions.clear();
        self.client = Some(connect_and_migrate(&self.config)?);
        Ok(())
    }

    fn write_batch(&mut self, batch: &[Command]) -> Result<(), RepoError> {
        let r = self.write(batch);
        if let Err(RepoError::Postgres { source, .. }) = &r {
            if self
                .client
                .as_ref()
                .is_none_or(|c| connection_lost(c, source))
            {
                self.client = None;
            }
        }
        r
    }

    fn retention(
        &mut self,
        now_wall_ns: i64,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<u64, RepoError> {
        let host = self.host_id.clone();
        let client = self.client.as_mut().ok_or(RepoError::Closed)?;
        let mut tx = client.transaction().map_err(pg("retention"))?;
        let mut deleted = 0u64;
        if let Some(age) = max_age {
            let age_ns = i64::try_from(age.as_nanos()).unwrap_or(i64::MAX);
            let cutoff = now_wall_ns.saturating_sub(age_ns);
            deleted += tx
                .execute(
                    "DELETE FROM samples WHERE host_id = $1 AND wall_ns < $2",
                    &[&host, &cutoff],
                )
                .map_err(pg("retention"))?;
            deleted += tx
                .execute(
                    "DELETE FROM events WHERE host_id = $1 AND wall_ns < $2",
                    &[&host, &cutoff],
                )
                .map_err(pg("retention"))?;
        }
        if let Some(max) = max_rows {
            let cutoff: Option<i64> = tx
                .query_opt(
                    "SELECT id FROM samples WHERE host_id = $1 ORDER BY id DESC \
                     LIMIT 1 OFFSET $2",
                    &[&host, &to_i64(max)],
                )
                .map_err(pg("retention"))?
                .map(|r| r.get(0));
            if let Some(cutoff) = cutoff {
                deleted += tx
                    .execute(
                        "DELETE FROM samples WHERE host_id = $1 AND id <= $2",
                        &[&host, &cutoff],
                    )
                    .map_err(pg("retention"))?;
            }
        }
        tx.commit().map_err(pg("retention"))?;
        Ok(deleted)
    }
}

/// A reading connection.
pub(crate) struct PgReader {
    client: Client,
}

fn read_stored(r: &postgres::Row) -> Result<StoredRow, RepoError> {
    let get = |e: postgres::Error| RepoError::Postgres {
        what: "reading a row",
        source: e,
    };
    let blob: Vec<u8> = r.try_get(6).map_err(get)?;
    let raw_text: String = r.try_get(7).map_err(get)?;
    let schema_version: i32 = r.try_get(5).map_err(get)?;
    Ok(StoredRow {
        id: r.try_get(0).map_err(get)?,
        wall_ns: r.try_get(1).map_err(get)?,
        row: Row {
            vm_id: r.try_get(2).map_err(get)?,
            ts_ns: to_u64(r.try_get(3).map_err(get)?),
            interval_ns: to_u64(r.try_get(4).map_err(get)?),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            vector: decode_vector(&blob)?,
            raw: raw_from_json(&raw_text)?,
            action: r.try_get(8).map_err(get)?,
            reward: r.try_get(9).map_err(get)?,
            policy_id: r.try_get(10).map_err(get)?,
            config: r.try_get(11).map_err(get)?,
            anomaly: r.try_get(12).map_err(get)?,
            anomaly_score: r.try_get(13).map_err(get)?,
            slo: slo_columns(
                r.try_get(14).map_err(get)?,
                r.try_get(15).map_err(get)?,
                r.try_get(16).map_err(get)?,
                r.try_get(17).map_err(get)?,
            ),
        },
    })
}

impl Reader for PgReader {
    fn rows(&mut self, filter: &RowFilter) -> Result<Vec<StoredRow>, RepoError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {SELECT_COLUMNS} FROM samples \
                     WHERE ($1::text IS NULL OR vm_id = $1) \
                     AND ($2::text IS NULL OR host_id = $2) AND ts_ns >= $3 \
                     AND ($4::bigint IS NULL OR wall_ns >= $4) \
                     AND ($5::bigint IS NULL OR wall_ns < $5) \
                     AND ($6::text IS NULL OR starts_with(vm_id, $6)) \
                     ORDER BY vm_id, host_id, ts_ns, id"
                ),
                &[
                    &filter.vm_id,
                    &filter.host_id,
                    &to_i64(filter.since_ns),
                    &filter.from_wall_ns,
                    &filter.to_wall_ns,
                    &filter.scenario,
                ],
            )
            .map_err(pg("reading rows"))?;
        rows.iter().map(read_stored).collect()
    }

    fn events(
        &mut self,
        vm_id: Option<&str>,
        since_ns: u64,
    ) -> Result<Vec<StoredEvent>, RepoError> {
        let rows = self
            .client
            .query(
                "SELECT ts_ns, vm_id, kind, detail, wall_ns FROM events \
                 WHERE ($1::text IS NULL OR vm_id = $1) AND ts_ns >= $2 ORDER BY ts_ns, id",
                &[&vm_id, &to_i64(since_ns)],
            )
            .map_err(pg("reading events"))?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    event: Event {
                        ts_ns: to_u64(r.try_get(0).map_err(pg("reading an event"))?),
                        vm_id: r.try_get(1).map_err(pg("reading an event"))?,
                        kind: r.try_get(2).map_err(pg("reading an event"))?,
                        detail: r.try_get(3).map_err(pg("reading an event"))?,
                    },
                    wall_ns: r.try_get(4).map_err(pg("reading an event"))?,
                })
            })
            .collect()
    }

    fn lost(&self) -> bool {
        self.client.is_closed()
    }

    fn count(&mut self) -> Result<u64, RepoError> {
        let n: i64 = self
            .client
            .query_one("SELECT count(*) FROM samples", &[])
            .map_err(pg("counting rows"))?
            .get(0);
        Ok(to_u64(n))
    }

    fn for_each_chunk(
        &mut self,
        chunk: usize,
        f: &mut dyn FnMut(&[StoredRow]) -> Result<(), RepoError>,
    ) -> Result<u64, RepoError> {
        use postgres::fallible_iterator::FallibleIterator;
        let none: [&(dyn ToSql + Sync); 0] = [];
        let mut it = self
            .client
            .query_raw(
                &format!("SELECT {SELECT_COLUMNS} FROM samples ORDER BY id"),
                none.iter().copied(),
            )
            .map_err(pg("reading rows"))?;
        super::backend::in_chunks(
            chunk,
            || {
                it.next()
                    .map_err(pg("reading rows"))?
                    .map(|r| read_stored(&r))
                    .transpose()
            },
            f,
        )
    }
}
