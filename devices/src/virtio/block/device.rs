//! The virtio-blk device: features, config space, and queue processing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{self, Disk};
use super::{QUEUE_SIZE, SECTOR_SIZE};
use crate::rate_limiter::{
    BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterError, TokenType,
};
use crate::virtio::io_engine::{MAX_BYTES_PER_WAKE, MAX_REQUESTS_PER_WAKE};
use crate::virtio::ring_check;
use crate::virtio::{
    ActivateError, ArrivalStamps, QueueMetrics, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Settings of one drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Name used in logs, metrics and the control API (e.g. `blk0`).
    pub id: String,
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backing file is not a regular file or is empty.
    #[error("{path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter settings are invalid or its timer failed.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device backed by a raw file.
pub struct Block {
    config: BlockConfig,
    file: File,
    capacity: u64,
    serial: Vec<u8>,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    active: Option<Active>,
    broken: Arc<AtomicBool>,
    metrics: Arc<QueueMetrics>,
    limiter: RateLimiter,
    throttled_since: Option<Instant>,
    /// When each available request was first seen: its latency starts there.
    arrivals: ArrivalStamps,
    used_in_batch: bool,
}

impl Block {
    /// Opens the backing file and creates the device.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: config.path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::BadFile {
                path: config.path.clone(),
                problem: "not a regular file".into(),
            });
        }
        let capacity = meta.len() / SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::BadFile {
                path: config.path.clone(),
                problem: "smaller than one 512-byte sector".into(),
            });
        }
        if meta.len() % SECTOR_SIZE != 0 {
            crate::guest_warn!(
                "{}: size is not a multiple of 512; the last {} bytes are not visible to the guest",
                config.path.display(),
                meta.len() % SECTOR_SIZE
            );
        }
        let serial = serial_for(&config.id, &config.path);
        Ok(Self {
            config,
            file,
            capacity,
            serial,
            acked_features: 0,
            queue_events: vec![EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
            broken: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(QueueMetrics::default()),
            limiter: RateLimiter::unlimited()?,
            throttled_since: None,
            arrivals: ArrivalStamps::new(QUEUE_SIZE),
            used_in_batch: false,
        })
    }

    /// The rate limiter (its fd goes into the event loop).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The limits in force.
    pub fn rate_limit(&self) -> RateLimiterConfig {
        self.limiter.config()
    }

    /// Changes the limits while the guest runs. Tokens already spent stay spent (no free
    /// burst); `None` for a bucket removes that limit. No request is lost: throttled
    /// requests stay in the queue and are retried under the new limits.
    pub fn set_rate_limit(&mut self, config: RateLimiterConfig) -> Result<(), BlockError> {
        config.validate()?;
        let update = |b: Option<crate::rate_limiter::BucketConfig>| match b {
            Some(c) if !c.is_unlimited() => BucketUpdate::Update(c),
            _ => BucketUpdate::Disabled,
        };
        self.limiter
            .update_buckets(update(config.bandwidth), update(config.ops))?;
        crate::guest_log!(
            log::Level::Info,
            "virtio-blk {}: rate limit set to {config:?}",
            self.config.id
        );
        Ok(())
    }

    /// Called when the limiter's timer fires: retries the throttled queue.
    pub fn on_rate_limiter_event(&mut self) {
        if self.clear_rate_limiter_event() {
            self.process_queue();
        }
    }

    /// Clears the limiter's timer event; true if requests may flow again.
    pub fn clear_rate_limiter_event(&mut self) -> bool {
        match self.limiter.event_handler() {
            Ok(()) => true,
            Err(RateLimiterError::SpuriousEvent) => false,
            Err(e) => {
                crate::guest_warn!("virtio-blk {}: rate limiter timer: {e}", self.config.id);
                false
            }
        }
    }

    /// The drive's settings.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Counters of the request queue.
    pub fn metrics(&self) -> Arc<QueueMetrics> {
        self.metrics.clone()
    }

    /// Whether the device stopped because the guest broke the protocol.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn mark_broken(&mut self, why: &str) {
        crate::guest_warn!(
            "virtio-blk {}: {why}; device stopped until the driver resets it",
            self.config.id
        );
        self.broken.store(true, Ordering::Relaxed);
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
    }

    /// Processes every available request of the queue (the single-device path; with
    /// several devices the [`crate::virtio::io_engine::IoEngine`] interleaves them by
    /// priority through [`Block::begin_batch`], [`Block::process_one`] and
    /// [`Block::finish_batch`]).
    ///
    /// Serves at most [`MAX_REQUESTS_PER_WAKE`] requests and [`MAX_BYTES_PER_WAKE`] bytes;
    /// if requests remain, the queue's eventfd is raised so the event loop comes back
    /// after its other work.
    pub fn process_queue(&mut self) {
        if !self.begin_batch() {
            return;
        }
        let (mut requests, mut bytes) = (0usize, 0u64);
        let mut more = false;
        while let Step::Served(b) = self.process_one() {
            requests += 1;
            bytes = bytes.saturating_add(b);
            if requests >= MAX_REQUESTS_PER_WAKE || bytes >= MAX_BYTES_PER_WAKE {
                more = self.has_pending();
                break;
            }
        }
        self.finish_batch();
        if more {
            self.kick_event_loop();
        }
    }

    /// Raises the queue's eventfd: the event loop (never a vCPU) serves what waits.
    pub fn kick_event_loop(&self) {
        if let Some(evt) = self.queue_events.first() {
            if let Err(e) = evt.write(1) {
                crate::guest_warn!(
                    "virtio-blk {}: cannot signal the event loop: {e}",
                    self.config.id
                );
            }
        }
    }

    /// Stamps the requests the driver made available since the last look with the
    /// current time: each request's latency runs from here to its used-ring write. Called
    /// on every event-loop wake that read the queue's notification, and before each
    /// request is taken (so a request made available during a wake is stamped when the
    /// device first sees it).
    pub fn note_available(&mut self) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if let Ok(avail) = active.queue.avail_idx(&active.mem, Ordering::Acquire) {
            self.arrivals
                .note(active.queue.next_avail(), avail.0, Instant::now);
        }
    }

    /// Starts a batch after a notification: samples the queue depth and checks the
    /// available index. Returns false if there is nothing to do (inactive or broken).
    pub fn begin_batch(&mut self) -> bool {
        if self.is_broken() {
            return false;
        }
        self.note_available();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        // Queue depth: requests the driver made available and the device has not taken.
        match ring_check::pending(&active.queue, &active.mem) {
            Ok(depth) => {
                self.metrics.sample_depth(u64::from(depth));
                // While the device drains the queue the driver need not notify it (each
                // notify is a VM exit); `finish_batch` turns notifications back on.
                if let Err(e) = active.queue.disable_notification(&active.mem) {
                    self.mark_broken(&format!("cannot suppress notifications: {e}"));
                    return false;
                }
                true
            }
            Err(e) => {
                self.mark_broken(&e.to_string());
                false
            }
        }
    }

    /// Whether [`Block::process_one`] has work: requests wait in the queue (or its state
    /// is invalid, which `process_one` turns into a stopped device) and the rate limiter
    /// would let one through. Both use [`ring_check::pending`], so they always agree.
    pub fn has_pending(&self) -> bool {
        if self.is_broken() || self.limiter.is_blocked() {
            return false;
        }
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        !matches!(ring_check::pending(&active.queue, &active.mem), Ok(0))
    }

    /// Serves at most one request.
    pub fn process_one(&mut self) -> Step {
        if self.is_broken() {
            return Step::Stopped;
        }
        self.note_available();
        let Some(active) = self.active.as_mut() else {
            return Step::Stopped;
        };
        let mem = active.mem.clone();
        // The available index of the request about to be taken (its arrival stamp).
        let index = active.queue.next_avail();
        // An invalid queue stops the device: answering "empty" while `has_pending` says
        // "requests wait" made callers ask again forever.
        let chain = match ring_check::pop(&mut active.queue, &mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return Step::Empty,
            Err(e) => {
                self.mark_broken(&e.to_string());
                return Step::Stopped;
            }
        };
        let head = chain.head_index();
        // Throttled requests wait in the queue (never fail) until the timer fires. The
        // chain's length is only worked out when a bandwidth bucket needs it.
        let bytes = if self.limiter.bandwidth().is_some() {
            request::data_len(&chain, &mem)
        } else {
            0
        };
        if !self.limiter.consume(1, TokenType::Ops) {
            active.queue.go_to_previous_position();
            self.throttled_since.get_or_insert_with(Instant::now);
            return Step::Throttled;
        }
        if !self.limiter.consume(bytes, TokenType::Bytes) {
            self.limiter.manual_replenish(1, TokenType::Ops);
            active.queue.go_to_previous_position();
            self.throttled_since.get_or_insert_with(Instant::now);
            return Step::Throttled;
        }
        if let Some(since) = self.throttled_since.take() {
            self.metrics.add_throttled(since.elapsed());
        }
        let mut disk = Disk {
            file: &self.file,
            capacity: self.capacity,
            read_only: self.config.read_only,
            id: &self.serial,
        };
        let outcome = request::handle(chain, &mem, &mut disk);
        if let Some(e) = &outcome.error {
            crate::guest_warn!("virtio-blk {}: request {head} failed: {e}", self.config.id);
        }
        let arrived = self.arrivals.take(index);
        if let Err(e) = active.queue.add_used(&mem, head, outcome.used_len) {
            self.mark_broken(&format!("cannot update the used ring: {e}"));
            return Step::Stopped;
        }
        // Never without a stamp (noted above); a missing one counts from now.
        let latency = arrived.map_or(std::time::Duration::ZERO, |t| t.elapsed());
        self.metrics
            .record_request(outcome.data_bytes, outcome.error.is_some(), latency);
        self.used_in_batch = true;
        Step::Served(outcome.data_bytes)
    }

    /// Ends a batch: interrupts the guest if it asked to be told of used buffers.
    pub fn finish_batch(&mut self) {
        let used = std::mem::take(&mut self.used_in_batch);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // Notifications back on; requests the driver added meanwhile (it was told not to
        // notify) are picked up through the event loop, unless the queue is throttled
        // (its timer brings the device back) or stopped.
        let added = match active.queue.enable_notification(&active.mem) {
            Ok(added) => added,
            Err(e) => {
                crate::guest_warn!(
                    "virtio-blk {}: cannot re-enable notifications: {e}",
                    self.config.id
                );
                false
            }
        };
        if used {
            match active.queue.needs_notification(&active.mem) {
                Ok(true) => active.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => {
                    crate::guest_warn!("virtio-blk {}: cannot read used event: {e}", self.config.id)
                }
            }
        }
        if added && self.has_pending() {
            self.kick_event_loop();
        }
    }
}

/// What [`Block::process_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Served one request that moved this many data bytes.
    Served(u64),
    /// The queue is empty.
    Empty,
    /// The rate limiter holds the next request back until its timer fires.
    Throttled,
    /// The device is inactive or stopped.
    Stopped,
}

/// The GET_ID serial: the drive id, then the file name, cut to 20 bytes.
fn serial_for(id: &str, path: &Path) -> Vec<u8> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s = format!("{id}:{name}").into_bytes();
    s.truncate(20);
    s
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if self.config.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity (u64, sectors) at 0; everything else reads as 0.
        let cap = self.capacity.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = if at < 8 { cap[at as usize] } else { 0 };
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_debug!(
            "virtio-blk {}: ignored {}-byte config write at {offset:#x}",
            self.config.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let mut queue = queues.remove(0);
        queue.set_event_idx(self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.arrivals.reset(queue.next_avail());
        if let Err(e) = ring_check::check_layout(&queue, &mem) {
            crate::guest_warn!("virtio-blk {}: queue refused: {e}", self.config.id);
            return Err(ActivateError::InvalidQueue(0));
        }
        crate::guest_log!(
            log::Level::Info,
            "virtio-blk {}: activated ({} sectors, {})",
            self.config.id,
            self.capacity,
            if self.config.read_only {
                "read-only"
            } else {
                "read-write"
            }
        );
        self.broken.store(false, Ordering::Relaxed);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        // Requests made available before activation are served by the event loop, never
        // here: activation runs on a vCPU thread (inside the MMIO exit), whose seccomp
        // filter has no file I/O, and must not hold the device while a guest keeps the
        // ring full.
        self.kick_event_loop();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.arrivals.reset(0);
        self.acked_features = 0;
        self.broken.store(false, Ordering::Relaxed);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.is_broken()
    }
}
