//! Weighted scheduling of the VM's virtio queues (I/O priorities).
//!
//! The scheduler is a byte-based Deficit Round Robin (DRR) over every virtio queue of the
//! VM, each identified by a [`QueueId`]. Queues with pending work ("ready") take turns in
//! round-robin order; at the start of its turn a queue receives `quantum * weight` bytes
//! of credit (its deficit counter) and is serviced while its deficit is positive; every
//! serviced request is charged its size in bytes (at least [`MIN_CHARGE_BYTES`]). Under
//! saturation the bytes served therefore split in proportion to the weights, whatever the
//! request sizes; a queue that asks for less than its share gets what it asks and the rest
//! goes to the others (the scheduler is work-conserving).
//!
//! Because the size of a request is known only once it is serviced, a turn may end with a
//! negative deficit (the last request was larger than the remaining credit); that debt is
//! kept and paid off in the following turns, so long-run shares stay exact. Positive
//! credit is dropped when a queue goes idle, so idle queues never accumulate credit; debt
//! is kept, so going idle cannot be used to escape it.
//!
//! Weights: [`Priority::Low`] = 1, [`Priority::Medium`] = 4, [`Priority::High`] = 16,
//! [`Priority::Weight`]`(n)` = n for n in 1..=[`MAX_WEIGHT`]. Priorities can be changed at
//! any time and take effect from the queue's next turn.
//!
//! Concurrency: [`IoScheduler`] is a plain `&mut self` structure. All devices of a VM share
//! one instance behind a single `Mutex` ([`SharedIoScheduler`]), held by the worker thread
//! that services the queues while it picks the next queue and charges it, and briefly by
//! the control path to change a priority.
//!
//! Device-side loop:
//!
//! ```
//! use devices::io_scheduler::{IoScheduler, Priority, QueueId};
//!
//! let mut sched = IoScheduler::new(4096).unwrap();
//! let disk0 = QueueId(0);
//! sched.register(disk0, Priority::High).unwrap();
//! sched.mark_ready(disk0).unwrap(); // the guest notified the queue
//! let mut pending = 3;
//! while let Some(id) = sched.next() {
//!     // Pop and service one request of queue `id`, then charge its size.
//!     pending -= 1;
//!     sched.charge(id, 4096).unwrap();
//!     if pending == 0 {
//!         sched.mark_idle(id).unwrap(); // queue empty (or throttled by its rate limiter)
//!     }
//! }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// Default quantum: credit per unit of weight per round, in bytes (one page).
pub const DEFAULT_QUANTUM_BYTES: u32 = 4096;

/// Smallest charge of one request, in bytes (one sector), so that zero-length requests
/// such as flushes still use up their queue's turn.
pub const MIN_CHARGE_BYTES: u64 = 512;

/// Largest weight accepted by [`Priority::Weight`].
pub const MAX_WEIGHT: u32 = 1000;

/// Deepest debt a queue can carry, in bytes; keeps the arithmetic far from overflow.
const MAX_DEBT: i64 = 1 << 62;

/// The scheduler shared by the devices of one VM and its control path.
pub type SharedIoScheduler = Arc<Mutex<IoScheduler>>;

/// Errors of the I/O scheduler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The queue id was never registered (or was unregistered).
    #[error("unknown I/O queue {0}")]
    UnknownQueue(QueueId),
    /// The queue id is registered already.
    #[error("I/O queue {0} is registered already")]
    AlreadyRegistered(QueueId),
    /// A numeric weight outside 1..=[`MAX_WEIGHT`].
    #[error("I/O priority weight {0} is outside 1..={MAX_WEIGHT}")]
    InvalidWeight(u32),
    /// A quantum of zero bytes.
    #[error("I/O scheduler quantum must be at least 1 byte")]
    InvalidQuantum,
    /// A priority string that is neither `low`, `medium`, `high` nor a number.
    #[error("invalid I/O priority {0:?}: expected low, medium, high or a weight 1..={MAX_WEIGHT}")]
    InvalidPriority(String),
}

/// Identifies one virtio queue of the VM; the numbering is the caller's choice (for
/// example `device_index << 16 | queue_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u32);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Priority of a queue, i.e. its weight in the round robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Weight 1.
    Low,
    /// Weight 4 (the default).
    #[default]
    Medium,
    /// Weight 16.
    High,
    /// An explicit weight in 1..=[`MAX_WEIGHT`].
    Weight(u32),
}

impl Priority {
    /// The weight of this priority (unvalidated for [`Priority::Weight`]).
    pub const fn weight(self) -> u32 {
        match self {
            Priority::Low => 1,
            Priority::Medium => 4,
            Priority::High => 16,
            Priority::Weight(n) => n,
        }
    }

    /// Returns the weight, or an error for a [`Priority::Weight`] outside 1..=[`MAX_WEIGHT`].
    pub fn validated_weight(self) -> Result<u32, SchedulerError> {
        let w = self.weight();
        if (1..=MAX_WEIGHT).contains(&w) {
            Ok(w)
        } else {
            Err(SchedulerError::InvalidWeight(w))
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Priority::Low => f.write_str("low"),
            Priority::Medium => f.write_str("medium"),
            Priority::High => f.write_str("high"),
            Priority::Weight(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Priority {
    type Err = SchedulerError;

    /// Parses `low`, `medium`, `high` (any case) or a weight in 1..=[`MAX_WEIGHT`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let p = match t.to_ascii_lowercase().as_str() {
            "low" => Priority::Low,
            "medium" => Priority::Medium,
            "high" => Priority::High,
            _ => match t.parse::<u32>() {
                Ok(n) => Priority::Weight(n),
                Err(_) => return Err(SchedulerError::InvalidPriority(s.to_string())),
            },
        };
        p.validated_weight()?;
        Ok(p)
    }
}

/// Counters and state of one queue, as seen by the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Current priority.
    pub priority: Priority,
    /// Whether the queue has pending work.
    pub ready: bool,
    /// Credit left in bytes (negative: debt from a request larger than its credit).
    pub deficit: i64,
    /// Bytes charged since registration (actual sizes, without the minimum charge).
    pub served_bytes: u64,
    /// Requests charged since registration.
    pub served_requests: u64,
}

#[derive(Debug)]
struct QueueState {
    priority: Priority,
    weight: u32,
    deficit: i64,
    ready: bool,
    turn_started: bool,
    served_bytes: u64,
    served_requests: u64,
}

/// Byte-based Deficit Round Robin over the VM's queues (see the module documentation).
#[derive(Debug)]
pub struct IoScheduler {
    quantum: u32,
    queues: HashMap<QueueId, QueueState>,
    /// Ready queues in round-robin order; the front one has the turn.
    active: VecDeque<QueueId>,
}

impl Default for IoScheduler {
    fn default() -> Self {
        Self {
            quantum: DEFAULT_QUANTUM_BYTES,
            queues: HashMap::new(),
            active: VecDeque::new(),
        }
    }
}

impl IoScheduler {
    /// Creates a scheduler granting `quantum_bytes * weight` bytes per turn (at least 1).
    pub fn new(quantum_bytes: u32) -> Result<Self, SchedulerError> {
        if quantum_bytes == 0 {
            return Err(SchedulerError::InvalidQuantum);
        }
        Ok(Self {
            quantum: quantum_bytes,
            ..Self::default()
        })
    }

    /// The quantum in bytes per unit of weight.
    pub fn quantum(&self) -> u32 {
        self.quantum
    }

    /// Adds queue `id` with `priority`; it starts idle (call [`IoScheduler::mark_ready`]).
    pub fn register(&mut self, id: QueueId, priority: Priority) -> Result<(), SchedulerError> {
        let weight = priority.validated_weight()?;
        if self.queues.contains_key(&id) {
            return Err(SchedulerError::AlreadyRegistered(id));
        }
        self.queues.insert(
            id,
            QueueState {
                priority,
                weight,
                deficit: 0,
                ready: false,
                turn_started: false,
                served_bytes: 0,
                served_requests: 0,
            },
        );
        Ok(())
    }

    /// Removes queue `id` (e.g. when its device is reset or removed).
    pub fn unregister(&mut self, id: QueueId) -> Result<(), SchedulerError> {
        self.queues
            .remove(&id)
            .ok_or(SchedulerError::UnknownQueue(id))?;
        self.active.retain(|q| *q != id);
        Ok(())
    }

    /// Changes the priority of queue `id`; it takes effect from the queue's next turn (a
    /// turn in progress keeps at most the new turn's credit).
    pub fn set_priority(&mut self, id: QueueId, priority: Priority) -> Result<(), SchedulerError> {
        let weight = priority.validated_weight()?;
        let quantum = i64::from(self.quantum);
        let q = self.state_mut(id)?;
        q.priority = priority;
        q.weight = weight;
        q.deficit = q.deficit.min(quantum * i64::from(weight));
        Ok(())
    }

    /// The priority of queue `id`.
    pub fn priority(&self, id: QueueId) -> Result<Priority, SchedulerError> {
        Ok(self.state(id)?.priority)
    }

    /// Counters and state of queue `id`.
    pub fn stats(&self, id: QueueId) -> Result<QueueStats, SchedulerError> {
        let q = self.state(id)?;
        Ok(QueueStats {
            priority: q.priority,
            ready: q.ready,
            deficit: q.deficit,
            served_bytes: q.served_bytes,
            served_requests: q.served_requests,
        })
    }

    /// The registered queue ids, in ascending order.
    pub fn queue_ids(&self) -> Vec<QueueId> {
        let mut ids: Vec<QueueId> = self.queues.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Returns true when some queue is ready.
    pub fn has_ready(&self) -> bool {
        !self.active.is_empty()
    }

    /// Marks queue `id` as having pending work (idempotent); it joins the end of the round.
    pub fn mark_ready(&mut self, id: QueueId) -> Result<(), SchedulerError> {
        let q = self.state_mut(id)?;
        if !q.ready {
            q.ready = true;
            q.turn_started = false;
            self.active.push_back(id);
        }
        Ok(())
    }

    /// Marks queue `id` as having no work it can do now (empty, or throttled by its rate
    /// limiter); idempotent. Its remaining credit is dropped, its debt kept.
    pub fn mark_idle(&mut self, id: QueueId) -> Result<(), SchedulerError> {
        let q = self.state_mut(id)?;
        if q.ready {
            q.ready = false;
            q.turn_started = false;
            q.deficit = q.deficit.min(0);
            self.active.retain(|a| *a != id);
        }
        Ok(())
    }

    /// Charges queue `id` for one serviced request of `bytes` bytes (at least
    /// [`MIN_CHARGE_BYTES`] are taken from its credit).
    pub fn charge(&mut self, id: QueueId, bytes: u64) -> Result<(), SchedulerError> {
        let q = self.state_mut(id)?;
        let cost = i64::try_from(bytes.max(MIN_CHARGE_BYTES)).unwrap_or(i64::MAX);
        q.deficit = q.deficit.saturating_sub(cost).max(-MAX_DEBT);
        q.served_bytes = q.served_bytes.saturating_add(bytes);
        q.served_requests = q.served_requests.saturating_add(1);
        Ok(())
    }

    /// The queue to service next, or `None` when no queue is ready.
    ///
    /// The same queue is returned until its credit is used up by [`IoScheduler::charge`]
    /// or it is marked idle; then the turn passes to the next ready queue.
    // Not an `Iterator`: the answer only changes through `charge`, `mark_idle`, etc.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<QueueId> {
        let n = self.active.len();
        // Bounded: one pass over the queues, a fast-forward if nobody had credit, and a
        // second pass in which at least one queue has credit.
        for step in 0..(2 * n + 2) {
            let id = *self.active.front()?;
            let quantum = i64::from(self.quantum);
            let Some(q) = self.queues.get_mut(&id) else {
                // Cannot happen (unregister removes from both); repair and go on.
                self.active.pop_front();
                continue;
            };
            if !q.turn_started {
                q.turn_started = true;
                q.deficit = q.deficit.saturating_add(quantum * i64::from(q.weight));
            }
            if q.deficit > 0 {
                return Some(id);
            }
            q.turn_started = false;
            self.active.rotate_left(1);
            if step + 1 == n {
                self.fast_forward();
            }
        }
        self.active.front().copied()
    }

    /// Called after a whole round in which no ready queue had credit: adds the credit of
    /// the rounds that would pass before the first queue gets credit, minus one.
    fn fast_forward(&mut self) {
        let quantum = i64::from(self.quantum);
        let rounds = self
            .active
            .iter()
            .filter_map(|id| self.queues.get(id))
            .map(|q| {
                let per_turn = quantum * i64::from(q.weight);
                // deficit <= 0 here: turns needed to reach a positive deficit.
                let needed = 1 - q.deficit.min(0);
                ((needed + per_turn - 1) / per_turn).max(1)
            })
            .min()
            .unwrap_or(1);
        if rounds <= 1 {
            return;
        }
        for id in &self.active {
            if let Some(q) = self.queues.get_mut(id) {
                let add = (rounds - 1).saturating_mul(quantum * i64::from(q.weight));
                q.deficit = q.deficit.saturating_add(add);
            }
        }
    }

    fn state(&self, id: QueueId) -> Result<&QueueState, SchedulerError> {
        self.queues.get(&id).ok_or(SchedulerError::UnknownQueue(id))
    }

    fn state_mut(&mut self, id: QueueId) -> Result<&mut QueueState, SchedulerError> {
        self.queues
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownQueue(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: QueueId = QueueId(1);
    const B: QueueId = QueueId(2);

    /// Runs `requests` requests over always-ready queues; `size(id)` gives request sizes.
    /// Returns the bytes served per queue during this run.
    fn run(
        s: &mut IoScheduler,
        requests: usize,
        size: impl Fn(QueueId) -> u64,
    ) -> HashMap<QueueId, u64> {
        let mut served = HashMap::new();
        for _ in 0..requests {
            let id = s.next().expect("a ready queue");
            let bytes = size(id);
            s.charge(id, bytes).unwrap();
            *served.entry(id).or_insert(0) += bytes;
        }
        served
    }

    fn ratio(served: &HashMap<QueueId, u64>, a: QueueId, b: QueueId) -> f64 {
        served[&a] as f64 / served[&b] as f64
    }

    fn two_ready(pa: Priority, pb: Priority) -> IoScheduler {
        let mut s = IoScheduler::default();
        s.register(A, pa).unwrap();
        s.register(B, pb).unwrap();
        s.mark_ready(A).unwrap();
        s.mark_ready(B).unwrap();
        s
    }

    #[test]
    fn high_vs_low_splits_sixteen_to_one() {
        let mut s = two_ready(Priority::High, Priority::Low);
        let served = run(&mut s, 100_000, |_| 4096);
        let r = ratio(&served, A, B);
        assert!((r - 16.0).abs() / 16.0 < 0.02, "ratio {r}");
        assert_eq!(s.stats(A).unwrap().served_bytes, served[&A]);
        assert_eq!(
            s.stats(A).unwrap().served_requests + s.stats(B).unwrap().served_requests,
            100_000
        );
    }

    #[test]
    fn shares_are_by_bytes_with_mixed_sizes() {
        // High issues 512-byte requests, Low 128 KiB ones: bytes still split 16:1.
        let mut s = two_ready(Priority::High, Priority::Low);
        let served = run(&mut s, 200_000, |id| if id == A { 512 } else { 128 * 1024 });
        let r = ratio(&served, A, B);
        assert!((r - 16.0).abs() / 16.0 < 0.02, "ratio {r}");
        // Reversed sizes.
        let mut s = two_ready(Priority::High, Priority::Low);
        let served = run(&mut s, 200_000, |id| if id == A { 128 * 1024 } else { 512 });
        let r = ratio(&served, A, B);
        assert!((r - 16.0).abs() / 16.0 < 0.02, "ratio {r}");
    }

    #[test]
    fn medium_vs_medium_is_even() {
        let mut s = two_ready(Priority::Medium, Priority::Medium);
        let served = run(&mut s, 100_000, |_| 4096);
        let r = ratio(&served, A, B);
        assert!((r - 1.0).abs() < 0.02, "ratio {r}");
        // Numeric weights.
        let mut s = two_ready(Priority::Weight(3), Priority::Weight(1000));
        let served = run(&mut s, 100_000, |_| 65536);
        let r = ratio(&served, B, A);
        assert!(
            (r - 1000.0 / 3.0).abs() / (1000.0 / 3.0) < 0.02,
            "ratio {r}"
        );
    }

    #[test]
    fn changing_priority_mid_run_changes_the_split() {
        let mut s = two_ready(Priority::High, Priority::Low);
        let first = run(&mut s, 50_000, |_| 4096);
        assert!((ratio(&first, A, B) - 16.0).abs() < 0.32);
        s.set_priority(A, Priority::Low).unwrap();
        s.set_priority(B, Priority::High).unwrap();
        assert_eq!(s.priority(B).unwrap(), Priority::High);
        let second = run(&mut s, 50_000, |_| 4096);
        let r = ratio(&second, B, A);
        assert!((r - 16.0).abs() / 16.0 < 0.02, "ratio {r}");
        s.set_priority(A, Priority::Medium).unwrap();
        s.set_priority(B, Priority::Medium).unwrap();
        let third = run(&mut s, 50_000, |_| 4096);
        assert!((ratio(&third, A, B) - 1.0).abs() < 0.02);
    }

    #[test]
    fn idle_queues_do_not_accumulate_credit() {
        let mut s = two_ready(Priority::High, Priority::Low);
        s.mark_idle(A).unwrap();
        // Only B runs for a long time.
        let served = run(&mut s, 10_000, |_| 4096);
        assert_eq!(served.get(&A), None);
        assert_eq!(s.stats(A).unwrap().deficit, 0);
        // A comes back: at most one turn of credit (16 * 4096 bytes) before B is served.
        s.mark_ready(A).unwrap();
        let mut a_run = 0;
        loop {
            let id = s.next().unwrap();
            s.charge(id, 4096).unwrap();
            if id == B && a_run > 0 {
                break;
            }
            if id == A {
                a_run += 1;
            }
        }
        assert_eq!(a_run, 16);
        // Credit left at mark_idle is dropped; debt is kept.
        assert_eq!(s.next(), Some(A));
        assert!(s.stats(A).unwrap().deficit > 0);
        s.mark_idle(A).unwrap();
        assert_eq!(s.stats(A).unwrap().deficit, 0);
        s.mark_ready(A).unwrap();
        s.mark_idle(B).unwrap();
        assert_eq!(s.next(), Some(A));
        s.charge(A, 1 << 30).unwrap();
        s.mark_idle(A).unwrap();
        assert!(s.stats(A).unwrap().deficit < -(1 << 29));
        for _ in 0..1000 {
            s.mark_ready(A).unwrap();
            s.mark_idle(A).unwrap();
        }
        assert!(s.stats(A).unwrap().deficit < -(1 << 29));
        assert!(s.stats(A).unwrap().deficit <= 16 * 4096);
    }

    #[test]
    fn all_queues_in_debt_still_progress() {
        let mut s = two_ready(Priority::Low, Priority::Low);
        s.charge(A, u64::MAX).unwrap();
        s.charge(B, 1 << 40).unwrap();
        // Fast-forwarded: B (smaller debt) is served without 2^28 empty rounds.
        assert_eq!(s.next(), Some(B));
        s.charge(B, 4096).unwrap();
        assert_eq!(s.next(), Some(B));
        // A single queue deep in debt is served anyway when it is the only one ready.
        s.mark_idle(B).unwrap();
        assert_eq!(s.next(), Some(A));
    }

    #[test]
    fn zero_byte_requests_use_up_the_turn() {
        let mut s = two_ready(Priority::Low, Priority::Low);
        let mut seen_b = false;
        // 4096 bytes of credit per turn, 512 per request: 8 requests per turn.
        for _ in 0..96 {
            let id = s.next().unwrap();
            seen_b |= id == B;
            s.charge(id, 0).unwrap();
        }
        assert!(seen_b);
        assert_eq!(s.stats(A).unwrap().served_bytes, 0);
        assert_eq!(s.stats(A).unwrap().served_requests, 48);
        assert_eq!(s.stats(B).unwrap().served_requests, 48);
    }

    #[test]
    fn unknown_ids_and_bad_values_are_errors() {
        let mut s = IoScheduler::default();
        let x = QueueId(42);
        assert_eq!(s.next(), None);
        assert_eq!(s.charge(x, 1), Err(SchedulerError::UnknownQueue(x)));
        assert_eq!(s.mark_ready(x), Err(SchedulerError::UnknownQueue(x)));
        assert_eq!(s.mark_idle(x), Err(SchedulerError::UnknownQueue(x)));
        assert_eq!(
            s.set_priority(x, Priority::High),
            Err(SchedulerError::UnknownQueue(x))
        );
        assert_eq!(s.unregister(x), Err(SchedulerError::UnknownQueue(x)));
        assert!(s.priority(x).is_err());
        assert!(s.stats(x).is_err());
        assert_eq!(
            s.register(x, Priority::Weight(0)),
            Err(SchedulerError::InvalidWeight(0))
        );
        assert_eq!(
            s.register(x, Priority::Weight(1001)),
            Err(SchedulerError::InvalidWeight(1001))
        );
        s.register(x, Priority::Weight(1000)).unwrap();
        assert_eq!(
            s.register(x, Priority::Low),
            Err(SchedulerError::AlreadyRegistered(x))
        );
        assert_eq!(
            s.set_priority(x, Priority::Weight(0)),
            Err(SchedulerError::InvalidWeight(0))
        );
        assert_eq!(s.priority(x).unwrap(), Priority::Weight(1000));
        assert!(IoScheduler::new(0).is_err());
        s.mark_ready(x).unwrap();
        s.mark_ready(x).unwrap();
        assert_eq!(s.next(), Some(x));
        s.unregister(x).unwrap();
        assert_eq!(s.next(), None);
        assert!(!s.has_ready());
        assert!(s.queue_ids().is_empty());
    }

    #[test]
    fn priorities_parse_and_print() {
        assert_eq!("low".parse::<Priority>().unwrap(), Priority::Low);
        assert_eq!(" HIGH ".parse::<Priority>().unwrap(), Priority::High);
        assert_eq!("Medium".parse::<Priority>().unwrap(), Priority::Medium);
        assert_eq!("250".parse::<Priority>().unwrap(), Priority::Weight(250));
        assert_eq!(
            "0".parse::<Priority>(),
            Err(SchedulerError::InvalidWeight(0))
        );
        assert!(matches!(
            "urgent".parse::<Priority>(),
            Err(SchedulerError::InvalidPriority(_))
        ));
        assert!("-1".parse::<Priority>().is_err());
        for p in [
            Priority::Low,
            Priority::Medium,
            Priority::High,
            Priority::Weight(7),
        ] {
            assert_eq!(p.to_string().parse::<Priority>().unwrap(), p);
        }
        assert_eq!(Priority::default().weight(), 4);
    }

    #[test]
    fn round_robin_with_many_queues() {
        let mut s = IoScheduler::new(1024).unwrap();
        for i in 0..10u32 {
            s.register(QueueId(i), Priority::Weight(i + 1)).unwrap();
            s.mark_ready(QueueId(i)).unwrap();
        }
        let served = run(&mut s, 200_000, |_| 1000);
        let total: u64 = served.values().sum();
        for i in 0..10u32 {
            let share = served[&QueueId(i)] as f64 / total as f64;
            let expected = f64::from(i + 1) / 55.0;
            assert!(
                (share - expected).abs() / expected < 0.02,
                "queue {i}: {share}"
            );
        }
        assert_eq!(s.queue_ids().len(), 10);
    }
}
