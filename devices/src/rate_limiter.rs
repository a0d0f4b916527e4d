//! Token-bucket rate limiting of virtio queues (bytes and operations per device).
//!
//! The model follows Firecracker's rate limiter: a [`TokenBucket`] holds up to `size`
//! tokens and refills at `size` tokens per `refill_time_ms`; it starts full and may carry a
//! one-time burst that is spent before the regular budget and never refills. A
//! [`RateLimiter`] combines an optional bandwidth bucket (tokens are bytes) and an optional
//! operations bucket (tokens are requests) with a `timerfd` that wakes the device when a
//! throttled request can proceed: throttled requests wait, they never fail.
//!
//! Two differences from Firecracker, on purpose:
//!
//! * [`RateLimiter::update_buckets`] keeps the tokens already spent: a changed bucket starts
//!   at the current level of the bucket it replaces (clamped to its new size), and keeps at
//!   most the remaining one-time burst. Refilling on every update would hand the guest a
//!   free burst at each step of the tuner.
//! * Refill periods below [`MIN_REFILL_TIME_MS`] are refused: with refill periods close to
//!   the timer and event-loop granularity, the achieved rate falls far below the
//!   configured one.
//!
//! Token accounting is exact integer arithmetic: a bucket keeps its budget in sub-token
//! units where one token is `refill_time` nanoseconds' worth and every elapsed nanosecond
//! adds `size` units, so no rounding error accumulates at any rate. A request larger than
//! the bucket is admitted when the bucket is full and leaves the bucket in debt (negative
//! budget) that later refills pay off, so huge requests never starve.
//!
//! Time is injected through the [`Clock`] trait ([`MonotonicClock`] in production,
//! [`ManualClock`] in tests); [`TokenBucket`] itself takes the current time as an argument.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use vmm_sys_util::errno;
use vmm_sys_util::timerfd::TimerFd;

/// Smallest accepted refill period, in milliseconds.
///
/// Shorter periods are refused: the timer that wakes throttled queues and the event loop
/// that services them have a granularity of the order of a millisecond, so a bucket that
/// refills every few milliseconds achieves a rate far below the configured one.
pub const MIN_REFILL_TIME_MS: u64 = 100;

/// Largest accepted refill period, in milliseconds (one day).
///
/// The bound keeps every intermediate value of the exact integer accounting in range.
pub const MAX_REFILL_TIME_MS: u64 = 24 * 60 * 60 * 1000;

const NANOS_PER_MILLI: u64 = 1_000_000;

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A refill period is below [`MIN_REFILL_TIME_MS`].
    #[error(
        "{field} = {value_ms} ms is below the minimum of {MIN_REFILL_TIME_MS} ms: timer \
         granularity would make the achieved rate fall far below the configured one"
    )]
    RefillTimeTooShort {
        /// Name of the offending configuration field, e.g. `bandwidth.refill_time_ms`.
        field: &'static str,
        /// The refused value, in milliseconds.
        value_ms: u64,
    },
    /// A refill period is above [`MAX_REFILL_TIME_MS`].
    #[error("{field} = {value_ms} ms is above the maximum of {MAX_REFILL_TIME_MS} ms (one day)")]
    RefillTimeTooLong {
        /// Name of the offending configuration field, e.g. `ops.refill_time_ms`.
        field: &'static str,
        /// The refused value, in milliseconds.
        value_ms: u64,
    },
    /// Creating, arming or reading the rate limiter's timerfd failed.
    #[error("rate limiter timerfd operation failed: {0}")]
    Timer(#[source] errno::Error),
    /// [`RateLimiter::event_handler`] was called but the timer had not fired (benign).
    #[error("rate limiter event handled but its timer had not fired")]
    SpuriousEvent,
}

/// Result of [`TokenBucket::reduce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BucketReduction {
    /// The tokens were available and have been taken.
    Success,
    /// Not enough tokens: nothing was taken, the request must wait.
    Failure,
    /// The request was larger than the bucket and was admitted because the bucket was
    /// full; the bucket is now in debt. The value is the debt in units of the bucket size,
    /// i.e. how many refill periods pass before the bucket is back at zero tokens.
    OverConsumption(f64),
}

/// Which bucket of a [`RateLimiter`] a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Bytes transferred (the bandwidth bucket).
    Bytes,
    /// Requests (the operations bucket).
    Ops,
}

/// Parameters of one token bucket (plain data; validated by [`BucketConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketConfig {
    /// Capacity of the bucket in tokens, and tokens added per refill period.
    /// Zero means unlimited: no bucket.
    pub size: u64,
    /// Extra tokens available once, spent before the regular budget and never refilled.
    pub one_time_burst: u64,
    /// Time to refill a whole bucket from empty, in milliseconds
    /// ([`MIN_REFILL_TIME_MS`]..=[`MAX_REFILL_TIME_MS`]; ignored when `size` is zero).
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// Checks the refill period; a zero-sized (unlimited) bucket is always valid.
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        self.validate_named("refill_time_ms")
    }

    /// Returns true when the configuration means "no limit" (`size` is zero).
    pub fn is_unlimited(&self) -> bool {
        self.size == 0
    }

    fn validate_named(&self, field: &'static str) -> Result<(), RateLimiterError> {
        if self.size == 0 {
            return Ok(());
        }
        if self.refill_time_ms < MIN_REFILL_TIME_MS {
            return Err(RateLimiterError::RefillTimeTooShort {
                field,
                value_ms: self.refill_time_ms,
            });
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterError::RefillTimeTooLong {
                field,
                value_ms: self.refill_time_ms,
            });
        }
        Ok(())
    }
}

/// Configuration of a [`RateLimiter`]: an optional bandwidth and an optional ops bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    /// Bytes bucket; `None` (or a zero size) means unlimited bandwidth.
    pub bandwidth: Option<BucketConfig>,
    /// Operations bucket; `None` (or a zero size) means unlimited operations.
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Checks both buckets; errors name the field (`bandwidth.refill_time_ms`, ...).
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.validate_named("bandwidth.refill_time_ms")?;
        }
        if let Some(o) = &self.ops {
            o.validate_named("ops.refill_time_ms")?;
        }
        Ok(())
    }

    /// Returns true when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none_or(|b| b.is_unlimited()) && self.ops.is_none_or(|o| o.is_unlimited())
    }

    /// One operation per `refill_time_ms`, no burst, unlimited bytes: the tests' way to
    /// make a second request wait.
    #[cfg(test)]
    pub(crate) fn one_op_per(refill_time_ms: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms,
            }),
        }
    }
}

/// A token bucket with exact integer accounting.
///
/// The bucket starts full (`size` tokens plus the one-time burst). Every method that
/// depends on time takes `now_ns`, a monotonic timestamp in nanoseconds from any fixed
/// origin (see [`Clock::now_ns`]); a timestamp earlier than the last one seen is treated as
/// no time passing. A bucket of size zero is unlimited: every reduction succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    initial_one_time_burst: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
    /// Sub-token units per token: the refill period in nanoseconds.
    refill_ns: i128,
    /// Current budget in sub-token units; negative when in debt, never below
    /// `-(u64::MAX * refill_ns)`.
    budget: i128,
    /// Full budget in sub-token units: `size * refill_ns`.
    capacity: i128,
    last_update_ns: u64,
}

impl TokenBucket {
    /// Creates a full bucket of `size` tokens refilled every `refill_time_ms`, with
    /// `one_time_burst` extra tokens available once.
    ///
    /// `size == 0` gives an unlimited bucket (the other values are then ignored). Fails
    /// when `refill_time_ms` is outside [`MIN_REFILL_TIME_MS`]..=[`MAX_REFILL_TIME_MS`].
    pub fn new(
        size: u64,
        one_time_burst: u64,
        refill_time_ms: u64,
    ) -> Result<Self, RateLimiterError> {
        Self::from_config(&BucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        })
    }

    /// Creates a full bucket from `config` (see [`TokenBucket::new`]).
    pub fn from_config(config: &BucketConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        Ok(Self::from_valid(config, 0))
    }

    fn from_valid(config: &BucketConfig, now_ns: u64) -> Self {
        if config.size == 0 {
            return Self {
                size: 0,
                initial_one_time_burst: 0,
                one_time_burst: 0,
                refill_time_ms: config.refill_time_ms,
                refill_ns: 1,
                budget: 0,
                capacity: 0,
                last_update_ns: now_ns,
            };
        }
        // Validated: refill_time_ms <= MAX_REFILL_TIME_MS, so refill_ns < 2^47 and
        // capacity < 2^111, far inside i128.
        let refill_ns = i128::from(config.refill_time_ms) * i128::from(NANOS_PER_MILLI);
        let capacity = i128::from(config.size) * refill_ns;
        Self {
            size: config.size,
            initial_one_time_burst: config.one_time_burst,
            one_time_burst: config.one_time_burst,
            refill_time_ms: config.refill_time_ms,
            refill_ns,
            budget: capacity,
            capacity,
            last_update_ns: now_ns,
        }
    }

    /// Capacity in tokens (zero: unlimited).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Remaining one-time burst, in tokens.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// One-time burst the bucket was configured with, in tokens.
    pub fn initial_one_time_burst(&self) -> u64 {
        self.initial_one_time_burst
    }

    /// Refill period in milliseconds.
    pub fn refill_time_ms(&self) -> u64 {
        self.refill_time_ms
    }

    /// Returns true for a zero-sized bucket, which never limits.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0
    }

    /// The configuration of this bucket (with its initial one-time burst).
    pub fn config(&self) -> BucketConfig {
        BucketConfig {
            size: self.size,
            one_time_burst: self.initial_one_time_burst,
            refill_time_ms: self.refill_time_ms,
        }
    }

    /// Whole tokens in the regular budget at `now_ns` (zero while in debt; the one-time
    /// burst is not included).
    pub fn available(&mut self, now_ns: u64) -> u64 {
        self.replenish(now_ns);
        if self.budget <= 0 {
            return 0;
        }
        u64::try_from(self.budget / self.refill_ns).unwrap_or(u64::MAX)
    }

    /// Whole tokens of debt at `now_ns` (rounded up; zero when not in debt).
    pub fn debt(&mut self, now_ns: u64) -> u64 {
        self.replenish(now_ns);
        if self.budget >= 0 {
            return 0;
        }
        let debt = (-self.budget + self.refill_ns - 1) / self.refill_ns;
        u64::try_from(debt).unwrap_or(u64::MAX)
    }

    /// Adds the tokens refilled since the last update, up to the capacity.
    fn replenish(&mut self, now_ns: u64) {
        if now_ns <= self.last_update_ns {
            return;
        }
        let elapsed = now_ns - self.last_update_ns;
        self.last_update_ns = now_ns;
        if self.size == 0 || self.budget >= self.capacity {
            return;
        }
        // u64 * u64 always fits in u128.
        let added = u128::from(elapsed) * u128::from(self.size);
        let added = i128::try_from(added).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(added).min(self.capacity);
    }

    /// Takes `tokens` from the bucket at `now_ns`, the one-time burst first.
    ///
    /// * [`BucketReduction::Success`]: the tokens were available and are taken.
    /// * [`BucketReduction::Failure`]: not enough tokens; nothing is taken.
    /// * [`BucketReduction::OverConsumption`]: `tokens` exceeds what the bucket can ever
    ///   hold and the bucket was full: the request is admitted and the bucket goes into
    ///   debt, so huge requests never starve.
    pub fn reduce(&mut self, tokens: u64, now_ns: u64) -> BucketReduction {
        if self.size == 0 || tokens == 0 {
            return BucketReduction::Success;
        }
        self.replenish(now_ns);
        let from_burst = self.one_time_burst.min(tokens);
        let rest = tokens - from_burst;
        let needed = i128::from(rest) * self.refill_ns;
        if needed <= self.budget {
            self.one_time_burst -= from_burst;
            self.budget -= needed;
            return BucketReduction::Success;
        }
        if rest > self.size && self.budget >= self.capacity {
            self.one_time_burst -= from_burst;
            self.budget -= needed;
            let ratio = (rest - self.size) as f64 / self.size as f64;
            crate::guest_warn!(
                "request of {tokens} tokens exceeds the bucket size {}: admitted, bucket in debt",
                self.size
            );
            return BucketReduction::OverConsumption(ratio);
        }
        BucketReduction::Failure
    }

    /// Takes `tokens` unconditionally (the burst first), going into debt if needed.
    fn force_reduce(&mut self, tokens: u64, now_ns: u64) {
        if self.size == 0 {
            return;
        }
        self.replenish(now_ns);
        let from_burst = self.one_time_burst.min(tokens);
        self.one_time_burst -= from_burst;
        let needed = i128::from(tokens - from_burst) * self.refill_ns;
        // Debt stays within u64::MAX tokens so that every later computation fits in i128.
        let floor = -(i128::from(u64::MAX) * self.refill_ns);
        self.budget = self.budget.saturating_sub(needed).max(floor);
    }

    /// Gives back `tokens` (e.g. taken for a request that could not be processed after
    /// all): they go to the regular budget up to its capacity, any excess back to the
    /// one-time burst up to its configured value.
    pub fn force_replenish(&mut self, tokens: u64) {
        if self.size == 0 {
            return;
        }
        let added = i128::from(tokens) * self.refill_ns;
        let room = (self.capacity - self.budget).max(0);
        if added <= room {
            self.budget += added;
            return;
        }
        self.budget = self.capacity;
        let excess = u64::try_from((added - room) / self.refill_ns).unwrap_or(u64::MAX);
        self.one_time_burst = self
            .one_time_burst
            .saturating_add(excess)
            .min(self.initial_one_time_burst);
    }

    /// Nanoseconds from `now_ns` until a [`TokenBucket::reduce`] of `tokens` would not
    /// fail (zero if it would succeed now). For a request larger than the bucket this is
    /// the time until the bucket is full.
    pub fn time_until_ns(&mut self, tokens: u64, now_ns: u64) -> u64 {
        if self.size == 0 {
            return 0;
        }
        self.replenish(now_ns);
        let rest = tokens.saturating_sub(self.one_time_burst);
        let target = if rest > self.size {
            self.capacity
        } else {
            i128::from(rest) * self.refill_ns
        };
        let missing = target - self.budget;
        if missing <= 0 {
            return 0;
        }
        let size = i128::from(self.size);
        let ns = (missing + size - 1) / size;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Makes this (new) bucket continue from `old`: same token level (debt included),
    /// converted exactly to this bucket's units and rounded down, clamped to this bucket's
    /// capacity; the one-time burst is at most what `old` had left.
    fn carry_over_from(&mut self, old: &mut TokenBucket, now_ns: u64) {
        old.replenish(now_ns);
        self.last_update_ns = now_ns;
        if self.size == 0 {
            return;
        }
        self.one_time_burst = self.one_time_burst.min(old.one_time_burst);
        if old.size == 0 {
            // Nothing was being counted: start full, as a newly added bucket does.
            return;
        }
        // budget = whole * old.refill_ns + frac, with 0 <= frac < old.refill_ns; whole is
        // within +-2^64 and frac below 2^47, so the products below stay within i128.
        let whole = old.budget.div_euclid(old.refill_ns);
        let frac = old.budget.rem_euclid(old.refill_ns);
        let scaled = whole * self.refill_ns + (frac * self.refill_ns) / old.refill_ns;
        self.budget = scaled.min(self.capacity);
    }
}

/// A monotonic time source in nanoseconds, injectable for tests.
pub trait Clock: Send {
    /// Nanoseconds since an arbitrary fixed origin; never decreases.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock (`CLOCK_MONOTONIC`, the clock of the timerfd).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// Creates a clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to; clones share the same time. For tests.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// Creates a clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let now = self.now.load(Ordering::SeqCst);
        self.now.store(now.saturating_add(by), Ordering::SeqCst);
    }

    /// Sets the clock to `ns`; values below the current time are ignored.
    pub fn set_ns(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// How [`RateLimiter::update_buckets`] changes one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BucketUpdate {
    /// Keep the bucket as it is.
    #[default]
    None,
    /// Remove the bucket: no limit any more.
    Disabled,
    /// Install a bucket with these parameters (a zero size means [`BucketUpdate::Disabled`]).
    /// An existing bucket's token level and remaining burst carry over; a bucket added
    /// where there was none starts full.
    Update(BucketConfig),
}

/// Rate limiter of one device: an optional bandwidth bucket, an optional ops bucket and a
/// timerfd that fires when a throttled request can proceed.
///
/// Device side: call [`RateLimiter::consume`] before processing each request, once with
/// [`TokenType::Ops`] and 1 and once with [`TokenType::Bytes`] and its length. When it
/// returns false, put the request back and stop processing the queue; if the first call
/// succeeded and the second failed, give the first tokens back with
/// [`RateLimiter::manual_replenish`]. Register [`AsRawFd::as_raw_fd`] with the event loop;
/// when it is readable call [`RateLimiter::event_handler`] and process the queue again.
///
/// The limiter is a plain `&mut self` structure owned by the thread that services the
/// device's queues; the control path changes it through [`RateLimiter::update_buckets`]
/// on that thread (or behind the device's lock).
#[derive(Debug)]
pub struct RateLimiter<C: Clock = MonotonicClock> {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer_fd: TimerFd,
    timer_active: bool,
    clock: C,
    blocked_since_ns: Option<u64>,
    throttled_ns: u64,
    throttle_events: u64,
}

impl RateLimiter<MonotonicClock> {
    /// Creates a limiter from `config` on the host's monotonic clock.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::with_clock(config, MonotonicClock::new())
    }

    /// Creates a limiter that never limits (both buckets absent).
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(&RateLimiterConfig::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    /// Creates a limiter from `config` that reads time from `clock`.
    pub fn with_clock(config: &RateLimiterConfig, clock: C) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let now = clock.now_ns();
        let make = |c: &Option<BucketConfig>| {
            c.filter(|c| !c.is_unlimited())
                .map(|c| TokenBucket::from_valid(&c, now))
        };
        let timer_fd = TimerFd::new().map_err(RateLimiterError::Timer)?;
        set_nonblocking(timer_fd.as_raw_fd()).map_err(RateLimiterError::Timer)?;
        Ok(Self {
            bandwidth: make(&config.bandwidth),
            ops: make(&config.ops),
            timer_fd,
            timer_active: false,
            clock,
            blocked_since_ns: None,
            throttled_ns: 0,
            throttle_events: 0,
        })
    }

    /// Takes `tokens` of `token_type`; returns false when the request must wait.
    ///
    /// A false return arms the timer (the limiter is then blocked: every call returns
    /// false until [`RateLimiter::event_handler`] runs after the timer fires). A request
    /// larger than its bucket is admitted once the bucket is full, leaving it in debt.
    /// A type without a bucket is never limited.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        if self.timer_active {
            return false;
        }
        let now = self.clock.now_ns();
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.reduce(tokens, now) {
            BucketReduction::Success | BucketReduction::OverConsumption(_) => true,
            BucketReduction::Failure => {
                let wait_ns = bucket.time_until_ns(tokens, now).max(1);
                match self.timer_fd.reset(Duration::from_nanos(wait_ns), None) {
                    Ok(()) => {
                        self.timer_active = true;
                        self.blocked_since_ns = Some(now);
                        self.throttle_events += 1;
                        false
                    }
                    Err(e) => {
                        // Without a timer nothing would wake the queue: let the request
                        // through (charged, possibly into debt) rather than stall it.
                        crate::guest_log!(
                            log::Level::Error,
                            "rate limiter cannot arm its timer, not throttling: {e}"
                        );
                        bucket.force_reduce(tokens, now);
                        true
                    }
                }
            }
        }
    }

    /// Gives back `tokens` of `token_type` taken by a [`RateLimiter::consume`] whose
    /// request was not processed after all.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(bucket) = bucket {
            bucket.force_replenish(tokens);
        }
    }

    /// Returns true while throttled: requests wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.timer_active
    }

    /// Handles the timer's event: reads the timerfd and unblocks the limiter.
    ///
    /// Returns [`RateLimiterError::SpuriousEvent`] (benign, nothing changes) when the timer
    /// had not fired, e.g. because it was re-armed after the event was queued.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer_fd.wait() {
            Ok(_) => {
                self.unblock();
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => Err(RateLimiterError::SpuriousEvent),
            Err(e) => Err(RateLimiterError::Timer(e)),
        }
    }

    /// Changes or removes the buckets while the device runs; no request is lost.
    ///
    /// Both updates are validated before either is applied. A changed bucket keeps the
    /// tokens already spent (its level carries over, clamped to the new size) and at most
    /// its remaining one-time burst: an update never hands out a free burst. If the
    /// limiter was blocked, it is unblocked and its timer fires at once, so the device
    /// retries its queue under the new limits (and blocks again if still throttled).
    pub fn update_buckets(
        &mut self,
        bytes: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), RateLimiterError> {
        for (update, field) in [
            (&bytes, "bandwidth.refill_time_ms"),
            (&ops, "ops.refill_time_ms"),
        ] {
            if let BucketUpdate::Update(c) = update {
                c.validate_named(field)?;
            }
        }
        let now = self.clock.now_ns();
        apply_update(&mut self.bandwidth, bytes, now);
        apply_update(&mut self.ops, ops, now);
        if self.timer_active {
            self.unblock();
            // Wake the device now; the timerfd disarms on a zero duration, hence 1 ns.
            if let Err(e) = self.timer_fd.reset(Duration::from_nanos(1), None) {
                return Err(RateLimiterError::Timer(e));
            }
            debug!("rate limiter updated while blocked: waking the device");
        }
        Ok(())
    }

    /// The bandwidth bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// The current configuration (with each bucket's initial one-time burst).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// How many times a request was throttled (a [`RateLimiter::consume`] returned false
    /// and armed the timer).
    pub fn throttle_events(&self) -> u64 {
        self.throttle_events
    }

    /// Total time spent blocked, including the current block if any.
    pub fn throttled_time(&self) -> Duration {
        let current = self
            .blocked_since_ns
            .map_or(0, |since| self.clock.now_ns().saturating_sub(since));
        Duration::from_nanos(self.throttled_ns.saturating_add(current))
    }

    fn unblock(&mut self) {
        self.timer_active = false;
        if let Some(since) = self.blocked_since_ns.take() {
            let blocked = self.clock.now_ns().saturating_sub(since);
            self.throttled_ns = self.throttled_ns.saturating_add(blocked);
        }
    }
}

impl<C: Clock> AsRawFd for RateLimiter<C> {
    /// The timerfd to register with the event loop (readable: call `event_handler`).
    fn as_raw_fd(&self) -> RawFd {
        self.timer_fd.as_raw_fd()
    }
}

fn apply_update(slot: &mut Option<TokenBucket>, update: BucketUpdate, now_ns: u64) {
    match update {
        BucketUpdate::None => {}
        BucketUpdate::Disabled => *slot = None,
        BucketUpdate::Update(c) if c.is_unlimited() => *slot = None,
        BucketUpdate::Update(c) => {
            let mut new = TokenBucket::from_valid(&c, now_ns);
            if let Some(old) = slot.as_mut() {
                new.carry_over_from(old, now_ns);
            }
            *slot = Some(new);
        }
    }
}

fn set_nonblocking(fd: RawFd) -> Result<(), errno::Error> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = NANOS_PER_MILLI;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(size, burst, refill_ms).unwrap()
    }

    fn limiter(config: RateLimiterConfig) -> (RateLimiter<ManualClock>, ManualClock) {
        let clock = ManualClock::new();
        let rl = RateLimiter::with_clock(&config, clock.clone()).unwrap();
        (rl, clock)
    }

    fn bw(size: u64, burst: u64, refill_time_ms: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        })
    }

    /// Waits (a few ms at most) until the limiter's timerfd is readable.
    fn wait_for_timer(rl: &impl AsRawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for at most `timeout_ms`.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        ret == 1
    }

    /// Simulated unblocking for tests on a manual clock (the real timer runs on real time).
    fn simulate_timer(rl: &mut RateLimiter<ManualClock>) {
        rl.timer_fd.clear().unwrap();
        rl.unblock();
    }

    #[test]
    fn refill_below_minimum_is_refused() {
        let err = TokenBucket::new(1000, 0, 99).unwrap_err();
        assert!(matches!(
            err,
            RateLimiterError::RefillTimeTooShort {
                field: "refill_time_ms",
                value_ms: 99
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("refill_time_ms = 99 ms"), "{msg}");
        assert!(msg.contains("100 ms"), "{msg}");
        assert!(msg.contains("timer granularity"), "{msg}");
        assert!(TokenBucket::new(1000, 0, 100).is_ok());

        let cfg = RateLimiterConfig {
            bandwidth: bw(1000, 0, 1000),
            ops: bw(10, 0, 10),
        };
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().starts_with("ops.refill_time_ms = 10 ms"));
        assert!(RateLimiter::new(&cfg).is_err());

        let err = TokenBucket::new(1, 0, MAX_REFILL_TIME_MS + 1).unwrap_err();
        assert!(matches!(err, RateLimiterError::RefillTimeTooLong { .. }));
    }

    #[test]
    fn zero_size_means_unlimited() {
        // Any refill time is accepted for a zero-sized bucket.
        let mut b = bucket(0, 0, 0);
        assert!(b.is_unlimited());
        for t in [1, u64::MAX, 12345] {
            assert_eq!(b.reduce(t, 0), BucketReduction::Success);
        }
        assert_eq!(b.time_until_ns(u64::MAX, 0), 0);

        let cfg = RateLimiterConfig {
            bandwidth: bw(0, 0, 0),
            ops: None,
        };
        assert!(cfg.is_unlimited());
        let (mut rl, _clock) = limiter(cfg);
        assert!(rl.bandwidth().is_none());
        assert!(rl.ops().is_none());
        for _ in 0..1000 {
            assert!(rl.consume(u64::MAX, TokenType::Bytes));
            assert!(rl.consume(1, TokenType::Ops));
        }
        assert!(!rl.is_blocked());

        let mut b = bucket(10, 0, 100);
        assert_eq!(b.reduce(0, 0), BucketReduction::Success);
        assert_eq!(b.available(0), 10);
    }

    #[test]
    fn bucket_starts_full_and_refills_linearly() {
        let mut b = bucket(1000, 0, 1000);
        assert_eq!(b.reduce(1000, 0), BucketReduction::Success);
        assert_eq!(b.reduce(1, 0), BucketReduction::Failure);
        // 1 token per ms.
        assert_eq!(b.time_until_ns(1, 0), MS);
        assert_eq!(b.time_until_ns(250, 0), 250 * MS);
        assert_eq!(b.available(250 * MS), 250);
        assert_eq!(b.reduce(251, 250 * MS), BucketReduction::Failure);
        assert_eq!(b.reduce(250, 250 * MS), BucketReduction::Success);
        // Never above the size.
        assert_eq!(b.available(100_000 * MS), 1000);
        // Time going backwards is no time passing.
        assert_eq!(b.reduce(1000, 100_000 * MS), BucketReduction::Success);
        assert_eq!(b.available(5 * MS), 0);
    }

    #[test]
    fn simulated_rate_matches_configuration() {
        // 1 MB per 100 ms = 10 MB/s, served in 4 KiB requests, 3 s simulated in 50 us steps.
        for (size, refill_ms, chunk) in [
            (1_000_000u64, 100u64, 4096u64),
            (10_000_000_000, 100, 1 << 20), // 100 GB/s
            (7, 1000, 1),                   // 7 ops/s
            (3_333, 250, 100),
        ] {
            let mut b = bucket(size, 0, refill_ms);
            // Start empty so only the refill rate counts.
            assert_eq!(b.reduce(size, 0), BucketReduction::Success);
            let mut consumed = 0u64;
            let end = 3_000 * MS;
            let mut now = 0;
            while now <= end {
                while b.reduce(chunk, now) == BucketReduction::Success {
                    consumed += chunk;
                }
                now += 50_000;
            }
            let expected = size as f64 * 3_000.0 / refill_ms as f64;
            let err = (consumed as f64 - expected).abs() / expected;
            assert!(
                err < 0.01,
                "size {size} refill {refill_ms}: consumed {consumed}, expected {expected}"
            );
        }
    }

    #[test]
    fn no_precision_loss_with_tiny_steps() {
        // 1 GB per 100 ms refilled in 7 ns steps: exactly 10 tokens per ns.
        let mut b = bucket(1_000_000_000, 0, 100);
        assert_eq!(b.reduce(1_000_000_000, 0), BucketReduction::Success);
        let mut now = 0;
        for _ in 0..100_000 {
            now += 7;
            b.replenish(now);
        }
        assert_eq!(b.available(now), 10 * now);
        // 3 tokens per 1000 ms refilled in 1 ns steps: fractions are never lost.
        let mut b = bucket(3, 0, 1000);
        assert_eq!(b.reduce(3, 0), BucketReduction::Success);
        for ns in 1..=1_000_000 {
            b.replenish(ns);
        }
        assert_eq!(b.budget, 3 * 1_000_000);
        assert_eq!(
            b.time_until_ns(1, 1_000_000),
            1_000 * MS / 3 - 1_000_000 + 1
        );
    }

    #[test]
    fn over_consumption_when_full_goes_into_debt() {
        let mut b = bucket(1000, 0, 1000);
        // Bucket not full: a request larger than the bucket waits.
        assert_eq!(b.reduce(1, 0), BucketReduction::Success);
        assert_eq!(b.reduce(2500, 0), BucketReduction::Failure);
        assert_eq!(b.time_until_ns(2500, 0), MS);
        // Full: admitted, 1500 tokens of debt = 1.5 bucket sizes.
        assert_eq!(b.reduce(2500, MS), BucketReduction::OverConsumption(1.5));
        assert_eq!(b.debt(MS), 1500);
        assert_eq!(b.available(MS), 0);
        assert_eq!(b.reduce(1, MS), BucketReduction::Failure);
        // The debt is paid off first: 1 token needs 1501 ms.
        assert_eq!(b.time_until_ns(1, MS), 1501 * MS);
        assert_eq!(b.reduce(1, 1501 * MS), BucketReduction::Failure);
        assert_eq!(b.reduce(1, 1502 * MS), BucketReduction::Success);
    }

    #[test]
    fn huge_requests_never_starve_in_the_limiter() {
        let (mut rl, clock) = limiter(RateLimiterConfig {
            bandwidth: bw(1000, 0, 100),
            ops: None,
        });
        assert!(rl.consume(10_000, TokenType::Bytes));
        assert!(!rl.consume(10_000, TokenType::Bytes));
        assert!(rl.is_blocked());
        // The debt is 9 bucket sizes: the bucket is full again after 10 refill periods.
        clock.advance(Duration::from_millis(999));
        simulate_timer(&mut rl);
        assert!(!rl.consume(10_000, TokenType::Bytes));
        clock.advance(Duration::from_millis(1));
        simulate_timer(&mut rl);
        assert!(rl.consume(10_000, TokenType::Bytes));
    }

    #[test]
    fn one_time_burst_is_used_once() {
        let mut b = bucket(100, 1000, 1000);
        // Burst first, then the regular budget.
        assert_eq!(b.reduce(600, 0), BucketReduction::Success);
        assert_eq!(b.one_time_burst(), 400);
        assert_eq!(b.available(0), 100);
        assert_eq!(b.reduce(450, 0), BucketReduction::Success);
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.available(0), 50);
        // A failing request takes nothing, not even the burst.
        let mut c = bucket(100, 50, 1000);
        c.budget = 40 * c.refill_ns;
        assert_eq!(c.reduce(91, 0), BucketReduction::Failure);
        assert_eq!(c.one_time_burst(), 50);
        assert_eq!(c.available(0), 40);
        assert_eq!(c.reduce(90, 0), BucketReduction::Success);
        assert_eq!(c.one_time_burst(), 0);
        assert_eq!(c.available(0), 0);
        // After a long time only the regular size refills; the burst never comes back.
        assert_eq!(b.available(3_600_000 * MS), 100);
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.reduce(100, 3_600_000 * MS), BucketReduction::Success);
        assert_eq!(b.reduce(1, 3_600_000 * MS), BucketReduction::Failure);
        assert_eq!(b.initial_one_time_burst(), 1000);
    }

    #[test]
    fn manual_replenish_gives_tokens_back() {
        let (mut rl, _clock) = limiter(RateLimiterConfig {
            bandwidth: bw(1000, 0, 1000),
            ops: bw(1, 0, 1000),
        });
        assert!(rl.consume(1, TokenType::Ops));
        assert!(rl.consume(600, TokenType::Bytes));
        rl.manual_replenish(600, TokenType::Bytes);
        rl.manual_replenish(1, TokenType::Ops);
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(rl.consume(1, TokenType::Ops));
        // Never above the capacity (plus the configured burst).
        let mut b = bucket(10, 5, 1000);
        assert_eq!(b.reduce(12, 0), BucketReduction::Success);
        b.force_replenish(u64::MAX);
        assert_eq!(b.available(0), 10);
        assert_eq!(b.one_time_burst(), 5);
    }

    #[test]
    fn update_keeps_spent_tokens() {
        let (mut rl, clock) = limiter(RateLimiterConfig {
            bandwidth: bw(1000, 0, 1000),
            ops: bw(100, 0, 1000),
        });
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(rl.consume(100, TokenType::Ops));
        clock.advance(Duration::from_millis(100)); // 100 bytes, 10 ops back
                                                   // Double the size: no free refill, the level (100) carries over.
        rl.update_buckets(
            BucketUpdate::Update(BucketConfig {
                size: 2000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            BucketUpdate::Update(BucketConfig {
                size: 100,
                one_time_burst: 0,
                refill_time_ms: 500,
            }),
        )
        .unwrap();
        let now = clock.now_ns();
        assert_eq!(rl.bandwidth.as_mut().unwrap().available(now), 100);
        assert_eq!(rl.ops.as_mut().unwrap().available(now), 10);
        assert!(!rl.consume(101, TokenType::Bytes));
        simulate_timer(&mut rl);
        assert!(rl.consume(100, TokenType::Bytes));
        // The new rates apply from the update on: 2 bytes/ms, 0.2 ops/ms.
        clock.advance(Duration::from_millis(50));
        let now = clock.now_ns();
        assert_eq!(rl.bandwidth.as_mut().unwrap().available(now), 100);
        assert_eq!(rl.ops.as_mut().unwrap().available(now), 20);

        // Many tuner steps in a row hand out nothing.
        for step in 0..100u64 {
            let size = 1000 + (step % 7) * 500;
            rl.update_buckets(
                BucketUpdate::Update(BucketConfig {
                    size,
                    one_time_burst: 10_000,
                    refill_time_ms: 100 + step * 10,
                }),
                BucketUpdate::None,
            )
            .unwrap();
        }
        let now = clock.now_ns();
        let b = rl.bandwidth.as_mut().unwrap();
        assert_eq!(b.available(now), 100);
        assert_eq!(b.one_time_burst(), 0, "an update must not grant a burst");

        // Shrinking clamps to the new size; debt carries over.
        let mut old = bucket(1000, 0, 1000);
        let mut new = bucket(10, 0, 100);
        new.carry_over_from(&mut old, 0);
        assert_eq!(new.available(0), 10);
        let mut old = bucket(1000, 0, 1000);
        assert!(matches!(
            old.reduce(3000, 0),
            BucketReduction::OverConsumption(_)
        ));
        let mut new = bucket(500, 0, 200);
        new.carry_over_from(&mut old, 0);
        assert_eq!(new.debt(0), 2000);
        // Fractions of a token are rounded down, never up.
        let mut old = bucket(3, 0, 1000);
        assert_eq!(old.reduce(3, 0), BucketReduction::Success);
        let mut new = bucket(3, 0, 100);
        new.carry_over_from(&mut old, 500 * MS); // 1.5 tokens
        assert_eq!(new.budget, 100 * MS as i128 + 50 * MS as i128);
    }

    #[test]
    fn update_adds_and_removes_buckets() {
        let (mut rl, _clock) = limiter(RateLimiterConfig::default());
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        // A bucket added where there was none starts full, with its burst.
        rl.update_buckets(
            BucketUpdate::None,
            BucketUpdate::Update(bw(2, 3, 1000).unwrap()),
        )
        .unwrap();
        assert_eq!(rl.config().ops, bw(2, 3, 1000));
        assert!(rl.consume(5, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        // Invalid updates change nothing at all.
        simulate_timer(&mut rl);
        let before = rl.config();
        let err = rl
            .update_buckets(
                BucketUpdate::Update(bw(10, 0, 1000).unwrap()),
                BucketUpdate::Update(bw(10, 0, 50).unwrap()),
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("ops.refill_time_ms = 50 ms"));
        assert_eq!(rl.config(), before);
        // Size zero removes.
        rl.update_buckets(
            BucketUpdate::None,
            BucketUpdate::Update(BucketConfig::default()),
        )
        .unwrap();
        assert!(rl.ops().is_none());
    }

    #[test]
    fn disabling_unblocks_waiting_requests() {
        let config = RateLimiterConfig {
            bandwidth: bw(1000, 0, 1000),
            ops: None,
        };
        let mut rl = RateLimiter::new(&config).unwrap();
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(!rl.consume(500, TokenType::Bytes));
        assert!(rl.is_blocked());
        assert_eq!(rl.throttle_events(), 1);
        // Blocked: even requests of other types wait until the timer fires.
        assert!(!rl.consume(1, TokenType::Ops));
        rl.update_buckets(BucketUpdate::Disabled, BucketUpdate::None)
            .unwrap();
        assert!(!rl.is_blocked());
        assert!(rl.bandwidth().is_none());
        // The device is woken through its timerfd at once, and nothing waits any more.
        assert!(wait_for_timer(&rl, 100));
        rl.event_handler().unwrap();
        assert!(rl.consume(500, TokenType::Bytes));
        assert!(!rl.is_blocked());
        // Nothing pending now: a further event is spurious.
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
    }

    #[test]
    fn timer_fires_when_tokens_are_available() {
        // 1000 bytes per 100 ms: 10 bytes need 1 ms.
        let config = RateLimiterConfig {
            bandwidth: bw(1000, 0, 100),
            ops: None,
        };
        let mut rl = RateLimiter::new(&config).unwrap();
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(!rl.consume(10, TokenType::Bytes));
        assert!(rl.is_blocked());
        // Before the timer fires the event is spurious and changes nothing (a loaded
        // machine may already be past the 1 ms, then the event is a real one).
        match rl.event_handler() {
            Err(RateLimiterError::SpuriousEvent) => assert!(rl.is_blocked()),
            Ok(()) => assert!(!rl.is_blocked()),
            Err(e) => panic!("unexpected error {e}"),
        }
        if rl.is_blocked() {
            assert!(wait_for_timer(&rl, 1000));
            rl.event_handler().unwrap();
        }
        assert!(!rl.is_blocked());
        assert!(rl.consume(10, TokenType::Bytes));
        assert!(rl.throttled_time() > Duration::ZERO);
    }

    #[test]
    fn update_while_blocked_rearms_under_new_limits() {
        let (mut rl, clock) = limiter(RateLimiterConfig {
            bandwidth: bw(1000, 0, 1000),
            ops: None,
        });
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(!rl.consume(100, TokenType::Bytes));
        // Raising the rate unblocks at once; the retry waits for the new rate only.
        rl.update_buckets(
            BucketUpdate::Update(bw(10_000, 0, 1000).unwrap()),
            BucketUpdate::None,
        )
        .unwrap();
        assert!(!rl.is_blocked());
        assert!(!rl.consume(100, TokenType::Bytes));
        assert_eq!(
            rl.bandwidth
                .as_mut()
                .unwrap()
                .time_until_ns(100, clock.now_ns()),
            10 * MS
        );
        clock.advance(Duration::from_millis(10));
        simulate_timer(&mut rl);
        assert!(rl.consume(100, TokenType::Bytes));
        assert_eq!(rl.throttle_events(), 2);
        assert_eq!(rl.throttled_time(), Duration::from_millis(10));
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let mut b = bucket(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS);
        assert_eq!(b.reduce(u64::MAX, u64::MAX), BucketReduction::Success);
        assert_eq!(b.reduce(u64::MAX, u64::MAX), BucketReduction::Success);
        assert_eq!(b.reduce(1, u64::MAX), BucketReduction::Failure);
        assert!(b.time_until_ns(u64::MAX, u64::MAX) > 0);
        b.force_replenish(u64::MAX);
        b.force_replenish(u64::MAX);
        assert_eq!(b.available(u64::MAX), u64::MAX);

        let mut b = bucket(1, 0, MAX_REFILL_TIME_MS);
        assert_eq!(
            b.reduce(u64::MAX, 0),
            BucketReduction::OverConsumption((u64::MAX - 1) as f64)
        );
        assert_eq!(b.debt(0), u64::MAX - 1);
        assert_eq!(b.time_until_ns(u64::MAX, 0), u64::MAX);
        for _ in 0..10 {
            b.force_reduce(u64::MAX, 1);
        }
        assert_eq!(b.debt(1), u64::MAX);
        assert_eq!(b.time_until_ns(1, 1), u64::MAX);
        assert_eq!(b.available(u64::MAX), 0);
        let mut new = bucket(u64::MAX, 0, MIN_REFILL_TIME_MS);
        new.carry_over_from(&mut b, u64::MAX);
        assert!(new.debt(u64::MAX) > 0);

        let mut b = bucket(u64::MAX, 0, MIN_REFILL_TIME_MS);
        assert_eq!(b.reduce(u64::MAX, 0), BucketReduction::Success);
        assert_eq!(b.available(u64::MAX), u64::MAX);
        assert_eq!(b.time_until_ns(u64::MAX, u64::MAX), 0);

        let (mut rl, clock) = limiter(RateLimiterConfig {
            bandwidth: bw(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS),
            ops: bw(u64::MAX, 0, MIN_REFILL_TIME_MS),
        });
        clock.set_ns(u64::MAX);
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        assert!(rl.consume(u64::MAX, TokenType::Ops));
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_ns(), u64::MAX);
    }
}
