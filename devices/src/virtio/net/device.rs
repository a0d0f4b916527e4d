//! The virtio-net device: moves frames between the guest's queues and a TAP interface.
//!
//! Guest input is checked: a transmit chain must be device-readable, hold the 12-byte
//! header and at most [`MAX_FRAME_LEN`] bytes of frame, and lie in guest memory; a receive
//! chain must be device-writable and large enough for the header and the frame. A bad chain
//! is returned to the guest unused (length 0) and counted as an error; a protocol violation
//! of the rings stops the device until the driver resets it.

use std::io;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::{Tap, TapError};

/// Frames sent per call of [`Net::process_tx`] before the device is released (a queue's
/// worth: large enough to keep per-wakeup costs small, small enough that the device lock
/// is never held for more than a fraction of a millisecond).
pub const TX_BUDGET: usize = QUEUE_SIZE as usize;

/// Frames moved from the TAP per call of [`Net::process_rx`] (same reasoning).
pub const RX_BUDGET: usize = QUEUE_SIZE as usize;
use super::{MAX_FRAME_LEN, NET_HDR_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::rate_limiter::{
    BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterError, TokenType,
};
use crate::virtio::ring_check;
use crate::virtio::{
    ActivateError, ArrivalStamps, QueueMetrics, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Settings of one network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name in logs and metrics (e.g. `net0`).
    pub id: String,
    /// TAP interface to attach to (created if absent).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Limits on each direction (bytes and packets), unlimited by default.
    pub rate_limiter: RateLimiterConfig,
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The rate limits are invalid or a timer failed.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device on a TAP interface.
pub struct Net {
    config: NetConfig,
    tap: Tap,
    queue_events: Vec<EventFd>,
    active: Option<Active>,
    broken: Arc<AtomicBool>,
    rx_metrics: Arc<QueueMetrics>,
    tx_metrics: Arc<QueueMetrics>,
    /// A frame read from the TAP that waits for a receive buffer.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// When the frame in `rx_frame` was read from the TAP: a received frame's latency
    /// runs from there to its used-ring write.
    rx_read_at: Option<Instant>,
    /// When each frame the guest queued for transmission was first seen.
    tx_arrivals: ArrivalStamps,
    tx_frame: Vec<u8>,
    tx_limiter: RateLimiter,
    rx_limiter: RateLimiter,
}

impl Net {
    /// Opens the TAP and creates the device.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        Self::with_tap(config, tap)
    }

    /// Creates the device on an already open TAP (or a stand-in, see [`Tap::from_file`]).
    pub fn with_tap(config: NetConfig, tap: Tap) -> Result<Self, NetError> {
        let tx_limiter = RateLimiter::new(&config.rate_limiter)?;
        let rx_limiter = RateLimiter::new(&config.rate_limiter)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            config,
            tap,
            queue_events: vec![evt()?, evt()?],
            active: None,
            broken: Arc::new(AtomicBool::new(false)),
            rx_metrics: Arc::new(QueueMetrics::default()),
            tx_metrics: Arc::new(QueueMetrics::default()),
            rx_frame: vec![0u8; MAX_FRAME_LEN],
            rx_pending: None,
            rx_read_at: None,
            tx_arrivals: ArrivalStamps::new(QUEUE_SIZE),
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            tx_limiter,
            rx_limiter,
        })
    }

    /// The transmit and receive limiters (their fds go into the event loop).
    pub fn limiters(&self) -> (&RateLimiter, &RateLimiter) {
        (&self.tx_limiter, &self.rx_limiter)
    }

    /// The limits in force (the same for both directions).
    pub fn rate_limit(&self) -> RateLimiterConfig {
        self.tx_limiter.config()
    }

    /// Changes the limits of both directions while the guest runs (spent tokens stay
    /// spent; frames waiting on a limit are not lost).
    pub fn set_rate_limit(&mut self, config: RateLimiterConfig) -> Result<(), NetError> {
        config.validate()?;
        let update = |b: Option<crate::rate_limiter::BucketConfig>| match b {
            Some(c) if !c.is_unlimited() => BucketUpdate::Update(c),
            _ => BucketUpdate::Disabled,
        };
        self.tx_limiter
            .update_buckets(update(config.bandwidth), update(config.ops))?;
        self.rx_limiter
            .update_buckets(update(config.bandwidth), update(config.ops))?;
        crate::guest_log!(
            log::Level::Info,
            "virtio-net {}: rate limit set to {config:?}",
            self.config.id
        );
        Ok(())
    }

    /// The transmit limiter's timer fired: clears it; true if frames may flow again.
    pub fn clear_tx_limiter_event(&mut self) -> bool {
        clear(&mut self.tx_limiter, &self.config.id)
    }

    /// The receive limiter's timer fired: clears it; true if frames may flow again.
    pub fn clear_rx_limiter_event(&mut self) -> bool {
        clear(&mut self.rx_limiter, &self.config.id)
    }

    /// The device's settings.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The TAP interface (its fd goes into the event loop).
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Counters of the receive queue.
    pub fn rx_metrics(&self) -> Arc<QueueMetrics> {
        self.rx_metrics.clone()
    }

    /// Counters of the transmit queue.
    pub fn tx_metrics(&self) -> Arc<QueueMetrics> {
        self.tx_metrics.clone()
    }

    /// Whether the device stopped on a protocol violation.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Whether a frame from the TAP is waiting for a receive buffer.
    pub fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    fn mark_broken(&mut self, why: &str) {
        crate::guest_warn!(
            "virtio-net {}: {why}; device stopped until the driver resets it",
            self.config.id
        );
        self.broken.store(true, Ordering::Relaxed);
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
    }

    /// Sends the frames the guest queued for transmission, at most [`TX_BUDGET`] per call:
    /// when more wait, the queue's own notifier is raised again so the event loop comes
    /// back for them after releasing the device (a guest that keeps the queue full cannot
    /// hold the device lock, and so the tuner and the control API, for long).
    pub fn process_tx(&mut self) {
        if self.is_broken() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Ok(avail) = active.tx.avail_idx(&active.mem, Ordering::Acquire) {
            self.tx_arrivals
                .note(active.tx.next_avail(), avail.0, Instant::now);
        }
        let mem = active.mem.clone();
        let mut used = false;
        let mut failure = None;
        let mut sent = 0usize;
        let mut more = false;
        loop {
            let index = active.tx.next_avail();
            let chain = match ring_check::pop(&mut active.tx, &mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(format!("transmit queue: {e}"));
                    break;
                }
            };
            if sent == TX_BUDGET {
                active.tx.go_to_previous_position();
                more = true;
                break;
            }
            sent += 1;
            let head = chain.head_index();
            // Throttled frames wait in the queue until the limiter's timer fires.
            if !self.tx_limiter.consume(1, TokenType::Ops) {
                active.tx.go_to_previous_position();
                break;
            }
            let frame_len = if self.tx_limiter.bandwidth().is_some() {
                Reader::<()>::new(&mem, chain.clone())
                    .map(|r| r.available_bytes().saturating_sub(NET_HDR_LEN))
                    .unwrap_or(0)
            } else {
                0
            };
            if !self.tx_limiter.consume(frame_len as u64, TokenType::Bytes) {
                self.tx_limiter.manual_replenish(1, TokenType::Ops);
                active.tx.go_to_previous_position();
                break;
            }
            let mut error = false;
            let mut bytes = 0u64;
            match Reader::<()>::new(&mem, chain) {
                Ok(mut reader) => {
                    let total = reader.available_bytes();
                    if total < NET_HDR_LEN || total - NET_HDR_LEN > MAX_FRAME_LEN {
                        crate::guest_warn!(
                            "virtio-net {}: transmit chain of {total} bytes refused",
                            self.config.id
                        );
                        error = true;
                    } else {
                        let mut hdr = [0u8; NET_HDR_LEN];
                        self.tx_frame.resize(total - NET_HDR_LEN, 0);
                        if reader.read_exact(&mut hdr).is_err()
                            || reader.read_exact(&mut self.tx_frame).is_err()
                        {
                            error = true;
                        } else {
                            match self.tap.write_frame(&self.tx_frame) {
                                Ok(_) => bytes = self.tx_frame.len() as u64,
                                Err(e) => {
                                    crate::guest_debug!(
                                        "virtio-net {}: TAP write: {e}",
                                        self.config.id
                                    );
                                    error = true;
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    crate::guest_warn!(
                        "virtio-net {}: invalid transmit chain: {e}",
                        self.config.id
                    );
                    error = true;
                }
            }
            let arrived = self.tx_arrivals.take(index);
            if let Err(e) = active.tx.add_used(&mem, head, 0) {
                failure = Some(format!("cannot update the transmit used ring: {e}"));
                break;
            }
            self.tx_metrics.record_request(
                bytes,
                error,
                arrived.map_or(Duration::ZERO, |t| t.elapsed()),
            );
            used = true;
        }
        if let Some(why) = failure {
            self.mark_broken(&why);
            return;
        }
        if used {
            if let Ok(true) = active.tx.needs_notification(&mem) {
                active.interrupt.signal_used_queue();
            }
        }
        if more {
            if let Some(e) = self.queue_events.get(TX_QUEUE) {
                if let Err(e) = e.write(1) {
                    crate::guest_warn!(
                        "virtio-net {}: cannot re-arm transmit: {e}",
                        self.config.id
                    );
                }
            }
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers until either runs out.
    /// Returns true if a frame waits for a buffer (the TAP should not be polled meanwhile).
    pub fn process_rx(&mut self) -> bool {
        if self.is_broken() {
            return false;
        }
        let Some(active) = self.active.as_mut() else {
            // Not started: drop what arrives so the TAP does not stay readable.
            let mut scratch = [0u8; MAX_FRAME_LEN];
            for _ in 0..RX_BUDGET {
                if self.tap.read_frame(&mut scratch).is_err() {
                    break;
                }
            }
            return false;
        };
        let mem = active.mem.clone();
        let mut used = false;
        let mut failure = None;
        let mut received = 0usize;
        loop {
            // A bound the guest cannot move: the TAP stays readable, so the event loop
            // comes back for the rest after its other work.
            if received == RX_BUDGET {
                break;
            }
            received += 1;
            let len = match self.rx_pending {
                Some(l) => l,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(l) => {
                        self.rx_read_at = Some(Instant::now());
                        l
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        crate::guest_warn!("virtio-net {}: TAP read: {e}", self.config.id);
                        break;
                    }
                },
            };
            if !self.rx_limiter.consume(1, TokenType::Ops) {
                self.rx_pending = Some(len);
                break;
            }
            if !self.rx_limiter.consume(len as u64, TokenType::Bytes) {
                self.rx_limiter.manual_replenish(1, TokenType::Ops);
                self.rx_pending = Some(len);
                break;
            }
            let popped = match ring_check::pop(&mut active.rx, &mem) {
                Ok(c) => c,
                Err(e) => {
                    self.rx_pending = Some(len);
                    failure = Some(format!("receive queue: {e}"));
                    break;
                }
            };
            let Some(chain) = popped else {
                // No buffer: give the tokens back, the frame waits.
                self.rx_limiter.manual_replenish(1, TokenType::Ops);
                self.rx_limiter
                    .manual_replenish(len as u64, TokenType::Bytes);
                self.rx_pending = Some(len);
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            let mut written = 0u32;
            let mut error = false;
            match Writer::<()>::new(&mem, chain) {
                Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + len => {
                    let mut hdr = [0u8; NET_HDR_LEN];
                    hdr[10] = 1; // num_buffers
                    if w.write_all(&hdr).is_ok() && w.write_all(&self.rx_frame[..len]).is_ok() {
                        written = (NET_HDR_LEN + len) as u32;
                    } else {
                        error = true;
                    }
                }
                Ok(w) => {
                    crate::guest_warn!(
                        "virtio-net {}: receive buffer of {} bytes too small for a {len}-byte frame",
                        self.config.id,
                        w.available_bytes()
                    );
                    error = true;
                }
                Err(e) => {
                    crate::guest_warn!("virtio-net {}: invalid receive chain: {e}", self.config.id);
                    error = true;
                }
            }
            let read_at = self.rx_read_at.take();
            if let Err(e) = active.rx.add_used(&mem, head, written) {
                failure = Some(format!("cannot update the receive used ring: {e}"));
                break;
            }
            self.rx_metrics.record_request(
                if error { 0 } else { len as u64 },
                error,
                read_at.map_or(Duration::ZERO, |t| t.elapsed()),
            );
            used = true;
        }
        if let Some(why) = failure {
            self.mark_broken(&why);
            return false;
        }
        if used {
            if let Ok(true) = active.rx.needs_notification(&mem) {
                active.interrupt.signal_used_queue();
            }
        }
        self.rx_pending.is_some()
    }
}

fn clear(limiter: &mut RateLimiter, id: &str) -> bool {
    match limiter.event_handler() {
        Ok(()) => true,
        Err(RateLimiterError::SpuriousEvent) => false,
        Err(e) => {
            crate::guest_warn!("virtio-net {id}: rate limiter timer: {e}");
            false
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC)
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = if at < 6 {
                self.config.mac[at as usize]
            } else {
                0
            };
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_debug!(
            "virtio-net {}: ignored {}-byte config write at {offset:#x}",
            self.config.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        for (i, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if let Err(e) = ring_check::check_layout(q, &mem) {
                crate::guest_warn!("virtio-net {}: queue {i} refused: {e}", self.config.id);
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        crate::guest_log!(
            log::Level::Info,
            "virtio-net {}: activated on TAP {}",
            self.config.id,
            self.tap.name()
        );
        self.broken.store(false, Ordering::Relaxed);
        self.rx_pending = None;
        self.rx_read_at = None;
        self.tx_arrivals.reset(tx.next_avail());
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        // Frames and buffers the driver queued before DRIVER_OK are handled by the event
        // loop, never here on the vCPU thread (its seccomp filter and the device lock).
        for (q, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = evt.write(1) {
                crate::guest_warn!(
                    "virtio-net {}: cannot signal queue {q}: {e}",
                    self.config.id
                );
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        self.rx_read_at = None;
        self.tx_arrivals.reset(0);
        self.broken.store(false, Ordering::Relaxed);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.is_broken()
    }
}
