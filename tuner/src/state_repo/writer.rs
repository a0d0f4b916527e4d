//! The writer: [`RepoWriter`] hands rows over a bounded channel to one writer thread per
//! repository, which keeps them in a bounded buffer and commits them in batches through
//! the backend's [`Store`]. The caller (the sampling agent, the tuner) never waits for
//! the database: when the channel is full a row is dropped and counted. When the
//! database is unreachable (PostgreSQL down, network gone) the thread keeps the rows in
//! its buffer ([`RepoConfig::buffer`] rows), reconnects with exponential backoff
//! (100 ms doubling to 5 s) and writes them when the database is back; past the buffer
//! the oldest rows are dropped, counted ([`WriterStats::rows_dropped`]) and warned of at
//! most every 10 s. [`WriterStats::degraded`] is true while it cannot write.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::agent::{Sample, Sink};
use crate::anomaly::AnomalyDetector;
use crate::schema::SCHEMA_VERSION;

use super::backend::Store;
use super::row::{wall_now_ns, Event, Row, StoredEvent, StoredRow};
use super::{RepoConfig, RepoError};

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
    /// Rows waiting in the writer's buffer for the database.
    pub rows_buffered: u64,
    /// Successful reconnections after the connection was lost.
    pub reconnects: u64,
    /// The repository cannot write now (database unreachable); rows wait in the buffer.
    pub degraded: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    rows_written: AtomicU64,
    pub(crate) rows_dropped: AtomicU64,
    events_written: AtomicU64,
    events_dropped: AtomicU64,
    commits: AtomicU64,
    commit_errors: AtomicU64,
    deleted: AtomicU64,
    anomalies: AtomicU64,
    rows_buffered: AtomicU64,
    reconnects: AtomicU64,
    pub(crate) degraded: AtomicBool,
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
            rows_buffered: l(&self.rows_buffered),
            reconnects: l(&self.reconnects),
            degraded: self.degraded.load(Ordering::Relaxed),
        }
    }
}

type Reply<T> = SyncSender<Result<T, String>>;

/// What the writer thread is asked to do, in order.
pub(crate) enum Command {
    /// A new row (received now).
    Row(Box<Row>),
    /// A row copied from another repository, with its receipt time.
    Copied(Box<StoredRow>),
    /// A new event.
    Event(Event),
    /// An event copied from another repository.
    CopiedEvent(StoredEvent),
    /// The action and reward of an earlier row.
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

impl Command {
    pub(crate) fn is_row(&self) -> bool {
        matches!(self, Command::Row(_) | Command::Copied(_))
    }

    fn is_event(&self) -> bool {
        matches!(self, Command::Event(_) | Command::CopiedEvent(_))
    }
}

/// A cheap, cloneable handle that queues rows and events for the writer thread.
#[derive(Clone)]
pub struct RepoWriter {
    pub(crate) tx: SyncSender<Command>,
    pub(crate) counters: Arc<Counters>,
}

impl std::fmt::Debug for RepoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWriter").finish_non_exhaustive()
    }
}

impl RepoWriter {
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
    /// Queues a row copied from another repository (keeps its receipt time and anomaly
    /// verdict), waiting for room in the queue.
    pub fn insert_copied(&self, row: StoredRow) -> Result<(), RepoError> {
        self.tx
            .send(Command::Copied(Box::new(row)))
            .map_err(|_| RepoError::Closed)
    }

    /// Queues an event copied from another repository, waiting for room in the queue.
    pub fn record_copied_event(&self, event: StoredEvent) -> Result<(), RepoError> {
        self.tx
            .send(Command::CopiedEvent(event))
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

    pub(crate) fn retention(&self, now_wall_ns: Option<i64>) -> Result<u64, RepoError> {
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

/// First wait before reconnecting; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between two reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most one warning about dropped rows or a lost database per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The writer thread's state.
pub(crate) struct WriterThread {
    store: Box<dyn Store>,
    config: RepoConfig,
    counters: Arc<Counters>,
    /// Commands received and not yet committed, in order (the bounded buffer).
    pending: VecDeque<Command>,
    pending_rows: usize,
    first_pending: Option<Instant>,
    last_retention: Instant,
    detectors: HashMap<String, AnomalyDetector>,
    /// When to try connecting again (while not connected).
    reconnect_at: Instant,
    backoff: Duration,
    /// Rows dropped since the last warning, and when it was.
    unwarned_drops: u64,
    last_warning: Option<Instant>,
}

impl WriterThread {
    pub(crate) fn new(store: Box<dyn Store>, config: RepoConfig, counters: Arc<Counters>) -> Self {
        counters
            .degraded
            .store(!store.connected(), Ordering::Relaxed);
        Self {
            store,
            config,
            counters,
            pending: VecDeque::new(),
            pending_rows: 0,
            first_pending: None,
            last_retention: Instant::now(),
            detectors: HashMap::new(),
            reconnect_at: Instant::now(),
            backoff: BACKOFF_START,
            unwarned_drops: 0,
            last_warning: None,
        }
    }

    pub(crate) fn run(&mut self, rx: Receiver<Command>) {
        loop {
            let now = Instant::now();
            let connected = self.store.connected();
            let commit_due = if connected {
                self.first_pending.map(|t| t + self.config.commit_interval)
            } else {
                Some(self.reconnect_at)
            };
            let retention_due = (connected
                && (self.config.max_age.is_some() || self.config.max_rows.is_some()))
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
                    if self.pending_rows > 0 {
                        log::error!(
                            "state repository ({}): {} rows never reached the database",
                            self.store.backend(),
                            self.pending_rows
                        );
                    }
                    break;
                }
                Ok(cmd) => self.enqueue(cmd),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if !self.store.connected() && now >= self.reconnect_at {
                self.reconnect();
            }
            if self.store.connected()
                && (self.pending_rows >= self.config.max_batch
                    || self
                        .first_pending
                        .is_some_and(|t| now >= t + self.config.commit_interval))
            {
                if let Err(e) = self.commit() {
                    self.warn(&format!("commit failed: {e}"));
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

    /// One attempt to connect; on failure the next one waits twice as long.
    fn reconnect(&mut self) {
        match self.store.connect() {
            Ok(()) => {
                self.backoff = BACKOFF_START;
                self.counters.degraded.store(false, Ordering::Relaxed);
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "state repository ({}): connected; writing {} buffered rows",
                    self.store.backend(),
                    self.pending_rows
                );
            }
            Err(e) => {
                self.reconnect_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.warn(&format!(
                    "cannot reach the database ({e}); {} rows buffered",
                    self.pending_rows
                ));
            }
        }
    }

    /// Logs `what` as a warning at most every [`WARN_EVERY`].
    fn warn(&mut self, what: &str) {
        let now = Instant::now();
        if self.last_warning.is_some_and(|t| now < t + WARN_EVERY) {
            return;
        }
        self.last_warning = Some(now);
        let dropped = std::mem::take(&mut self.unwarned_drops);
        if dropped > 0 {
            log::warn!(
                "state repository ({}): {what}; {dropped} rows dropped (buffer full) since the \
                 last warning",
                self.store.backend()
            );
        } else {
            log::warn!("state repository ({}): {what}", self.store.backend());
        }
    }

    fn enqueue(&mut self, cmd: Command) {
        let cmd = match cmd {
            Command::Row(mut row) => {
                self.judge(&mut row);
                Command::Row(row)
            }
            other => other,
        };
        if cmd.is_row() {
            self.pending_rows += 1;
        }
        self.pending.push_back(cmd);
        if self.first_pending.is_none() {
            self.first_pending = Some(Instant::now());
        }
        // The bounded buffer: past it the oldest rows (and what came before them) go.
        while self.pending_rows > self.config.buffer {
            match self.pending.pop_front() {
                Some(c) if c.is_row() => {
                    self.pending_rows -= 1;
                    self.unwarned_drops += 1;
                    self.counters.rows_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Some(c) if c.is_event() => {
                    self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None => break,
            }
        }
        if self.unwarned_drops > 0 {
            self.warn("the writer's buffer is full");
        }
        self.counters
            .rows_buffered
            .store(self.pending_rows as u64, Ordering::Relaxed);
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

    /// Commits the buffer in transactions of at most `max_batch` rows. While the database
    /// is unreachable the buffer stays and the error says so.
    fn commit(&mut self) -> Result<(), String> {
        if !self.store.connected() && Instant::now() >= self.reconnect_at {
            self.reconnect();
        }
        while !self.pending.is_empty() {
            if !self.store.connected() {
                self.counters.degraded.store(true, Ordering::Relaxed);
                return Err(format!(
                    "{}: not connected; {} rows buffered",
                    self.store.backend(),
                    self.pending_rows
                ));
            }
            // The longest prefix holding at most max_batch rows.
            let mut end = 0;
            let mut rows = 0usize;
            let mut events = 0u64;
            for c in self.pending.iter() {
                if c.is_row() {
                    if rows == self.config.max_batch {
                        break;
                    }
                    rows += 1;
                } else if c.is_event() {
                    events += 1;
                }
                end += 1;
            }
            let batch = self.pending.make_contiguous();
            let result = self.store.write_batch(&batch[..end]);
            let c = &self.counters;
            match result {
                Ok(()) => {
                    self.pending.drain(..end);
                    self.pending_rows -= rows;
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
                    c.events_written.fetch_add(events, Ordering::Relaxed);
                }
                Err(e) if !self.store.connected() => {
                    // Connection lost: the batch stays for after the reconnect.
                    c.commit_errors.fetch_add(1, Ordering::Relaxed);
                    c.degraded.store(true, Ordering::Relaxed);
                    self.reconnect_at = Instant::now() + self.backoff;
                    c.rows_buffered
                        .store(self.pending_rows as u64, Ordering::Relaxed);
                    return Err(e.to_string());
                }
                Err(e) => {
                    // The batch itself failed: it is dropped and counted.
                    self.pending.drain(..end);
                    self.pending_rows -= rows;
                    c.commit_errors.fetch_add(1, Ordering::Relaxed);
                    c.rows_dropped.fetch_add(rows as u64, Ordering::Relaxed);
                    c.events_dropped.fetch_add(events, Ordering::Relaxed);
                    c.rows_buffered
                        .store(self.pending_rows as u64, Ordering::Relaxed);
                    if self.pending.is_empty() {
                        self.first_pending = None;
                    }
                    return Err(e.to_string());
                }
            }
        }
        self.first_pending = None;
        self.counters.rows_buffered.store(0, Ordering::Relaxed);
        Ok(())
    }

    fn retention(&mut self, now_wall_ns: i64) -> Result<u64, String> {
        self.last_retention = Instant::now();
        let r = self
            .store
            .retention(now_wall_ns, self.config.max_age, self.config.max_rows);
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

/// Starts the writer thread of `store`; returns its handle and the queue's sending end.
pub(crate) fn spawn(
    store: Box<dyn Store>,
    config: RepoConfig,
) -> Result<(RepoWriter, std::thread::JoinHandle<()>), RepoError> {
    let (tx, rx) = mpsc::sync_channel(config.queue);
    let counters = Arc::new(Counters::default());
    counters
        .degraded
        .store(!store.connected(), Ordering::Relaxed);
    let thread_counters = Arc::clone(&counters);
    let handle = std::thread::Builder::new()
        .name("tuner-state-repo".to_string())
        .spawn(move || {
            crate::sandbox::run_helper("tuner-state-repo", move || {
                let mut w = WriterThread::new(store, config, thread_counters);
                w.run(rx);
            });
        })
        .map_err(RepoError::Spawn)?;
    Ok((RepoWriter { tx, counters }, handle))
}

/// A writer whose thread does not exist (read-only repositories): every write is
/// [`RepoError::Closed`].
pub(crate) fn closed() -> RepoWriter {
    let (tx, _) = mpsc::sync_channel(1);
    RepoWriter {
        tx,
        counters: Arc::new(Counters::default()),
    }
}
