//! The I/O engine: services the request queues of every virtio-blk device of a VM on the
//! event-loop thread, in the order the weighted [`IoScheduler`] chooses, so that under load
//! each queue gets its share of bytes by priority (low, medium, high, or a weight).
//!
//! A notification (or a rate limiter's timer) marks a queue ready; the engine then serves
//! one request at a time from the queue the scheduler names, charging its bytes. A queue
//! that is empty or throttled goes idle until its next event. To keep the event loop
//! responsive, one wake-up serves at most [`MAX_REQUESTS_PER_WAKE`] requests and about
//! [`MAX_BYTES_PER_WAKE`] bytes; queues still ready then re-arm their own eventfd so the
//! loop comes straight back. The loop itself is also capped in steps
//! ([`steps_cap`]), a bound no guest state can move: a queue whose state turns invalid
//! is stopped by the device (needs reset) rather than offered again.

use crate::lock;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::block::{Block, Step};
use super::VirtioDevice;
use crate::io_scheduler::{IoScheduler, Priority, QueueId, SchedulerError, SharedIoScheduler};

/// Requests served per event-loop wake-up before yielding to other events.
pub const MAX_REQUESTS_PER_WAKE: usize = 256;

/// Data bytes served per event-loop wake-up before yielding (checked after each request,
/// so one wake moves at most this plus one request's worth).
pub const MAX_BYTES_PER_WAKE: u64 = 16 << 20;

/// Most scheduler steps one [`IoEngine::serve`] takes. A step serves a request, idles a
/// queue or refreshes the ready set; the costliest honest pattern (a depth-1 guest that
/// refills at once) takes three per request: serve it, find the queue empty, look again.
/// Hitting the cap only ends the wake early (the queues still pending are re-armed).
pub fn steps_cap(budget: usize, queues: usize) -> usize {
    budget
        .saturating_mul(3)
        .saturating_add(queues.saturating_mul(4))
        .saturating_add(16)
}

/// Requests served between two looks at every queue for new requests. A queue that went
/// idle (its guest had one request in flight) and was refilled meanwhile rejoins the
/// competition within this many requests, instead of waiting behind a busy queue the
/// guest keeps topped up for the whole wake-up (measured before: a depth-1 foreground
/// reader behind a background writer saw 2-4 ms latencies whatever its priority).
pub const RECHECK_EVERY: usize = 4;

/// Errors of the engine's control operations.
#[derive(Debug, thiserror::Error)]
pub enum IoEngineError {
    /// The scheduler refused the change.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
}

/// Every block device of a VM plus the scheduler that orders them.
pub struct IoEngine {
    blocks: Vec<Arc<Mutex<Block>>>,
    scheduler: SharedIoScheduler,
}

impl IoEngine {
    /// Creates the engine; every device starts at [`Priority::Medium`].
    pub fn new(blocks: Vec<Arc<Mutex<Block>>>) -> Result<Self, IoEngineError> {
        let mut scheduler = IoScheduler::default();
        for i in 0..blocks.len() {
            scheduler.register(QueueId(i as u32), Priority::Medium)?;
        }
        Ok(Self {
            blocks,
            scheduler: Arc::new(Mutex::new(scheduler)),
        })
    }

    /// The scheduler, shared with the control path.
    pub fn scheduler(&self) -> SharedIoScheduler {
        self.scheduler.clone()
    }

    /// Marks every queue with requests waiting as ready; returns how many there are.
    fn mark_pending(&self, sched: &mut IoScheduler) -> usize {
        let mut n = 0;
        for (i, block) in self.blocks.iter().enumerate() {
            if lock(block).has_pending() {
                let _ = sched.mark_ready(QueueId(i as u32));
                n += 1;
            }
        }
        n
    }

    fn drain(&mut self) {
        let report = self.serve_bounded(MAX_REQUESTS_PER_WAKE, MAX_BYTES_PER_WAKE);
        log::trace!("io engine: served {:?} this wake", report.per_queue);
        // Budget used up: come back through the event loop for the queues still ready.
        if report.budget_exhausted {
            for block in &self.blocks {
                let b = lock(block);
                if b.has_pending() {
                    b.kick_event_loop();
                }
            }
        }
    }

    /// Serves up to `budget` requests across the drives in the scheduler's order; returns
    /// how many each drive got.
    pub fn serve(&mut self, budget: usize) -> Vec<u32> {
        self.serve_bounded(budget, u64::MAX).per_queue
    }

    /// Serves up to `budget` requests and about `byte_budget` data bytes across the
    /// drives in the scheduler's order, in at most [`steps_cap`] steps.
    pub fn serve_bounded(&mut self, budget: usize, byte_budget: u64) -> ServeReport {
        let mut sched = lock(&self.scheduler);
        let mut touched = vec![false; self.blocks.len()];
        let mut served = 0usize;
        let mut bytes = 0u64;
        let mut per_queue = vec![0u32; self.blocks.len()];
        let max_steps = steps_cap(budget, self.blocks.len());
        let mut steps = 0usize;
        let mut budget_exhausted = false;
        while served < budget {
            if bytes >= byte_budget || steps >= max_steps {
                budget_exhausted = true;
                break;
            }
            steps += 1;
            let id = match sched.next() {
                Some(id) => id,
                None => {
                    // Every queue with requests waiting competes, not only the one whose
                    // notification woke us, and a queue the guest refilled during this
                    // wake-up rejoins: otherwise the weights would never meet.
                    if self.mark_pending(&mut sched) == 0 {
                        break;
                    }
                    continue;
                }
            };
            let Some(block) = self.blocks.get(id.0 as usize) else {
                let _ = sched.unregister(id);
                continue;
            };
            let mut b = lock(block);
            if !touched[id.0 as usize] {
                touched[id.0 as usize] = true;
                if !b.begin_batch() {
                    let _ = sched.mark_idle(id);
                    continue;
                }
            }
            let recheck = match b.process_one() {
                Step::Served(n) => {
                    served += 1;
                    bytes = bytes.saturating_add(n);
                    per_queue[id.0 as usize] += 1;
                    let _ = sched.charge(id, n);
                    served.is_multiple_of(RECHECK_EVERY)
                }
                Step::Empty | Step::Throttled | Step::Stopped => {
                    let _ = sched.mark_idle(id);
                    false
                }
            };
            drop(b);
            if recheck {
                self.mark_pending(&mut sched);
            }
        }
        for (i, t) in touched.iter().enumerate() {
            if *t {
                lock(&self.blocks[i]).finish_batch();
            }
        }
        ServeReport {
            per_queue,
            budget_exhausted: budget_exhausted || served >= budget,
            steps,
        }
    }
}

/// What one [`IoEngine::serve_bounded`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeReport {
    /// Requests each drive got.
    pub per_queue: Vec<u32>,
    /// Whether a budget (requests, bytes or steps) ended the service rather than empty
    /// queues: the queues still ready must be looked at again.
    pub budget_exhausted: bool,
    /// Scheduler steps taken (at most [`steps_cap`]).
    pub steps: usize,
}

impl MutEventSubscriber for IoEngine {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        let index = (data / 2) as usize;
        let Some(block) = self.blocks.get(index) else {
            crate::guest_warn!("io engine: event for unknown device {index}");
            return;
        };
        let runnable = {
            let mut b = lock(block);
            if data.is_multiple_of(2) {
                if let Some(evt) = b.queue_events().first() {
                    let _ = evt.read();
                }
                // The requests' latency starts at this wake, before they wait for the
                // scheduler to pick this drive.
                b.note_available();
                true
            } else {
                b.clear_rate_limiter_event()
            }
        };
        if runnable {
            let _ = lock(&self.scheduler).mark_ready(QueueId(index as u32));
        }
        self.drain();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, block) in self.blocks.iter().enumerate() {
            let b = lock(block);
            let id = b.config().id.clone();
            if let Some(evt) = b.queue_events().first() {
                if let Err(e) = ops.add(Events::with_data(evt, 2 * i as u32, EventSet::IN)) {
                    log::error!("io engine: cannot watch {id}'s queue: {e}");
                }
            }
            if let Err(e) = ops.add(Events::with_data(
                b.rate_limiter(),
                2 * i as u32 + 1,
                EventSet::IN,
            )) {
                log::error!("io engine: cannot watch {id}'s rate limiter: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::tests::{harness, SharedHarness, DATA, HDR, STATUS};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

    /// A drive with `n` 4 KiB reads waiting (one chain made available `n` times: the
    /// device treats every ring entry as its own request).
    fn backlogged(name: &str, n: u16) -> SharedHarness {
        let mut h = harness(name, 64, false);
        h.header(VIRTIO_BLK_T_IN, 0);
        h.desc(0, HDR, 16, 1, 1);
        h.desc(1, DATA, 4096, 1 | 2, 2);
        h.desc(2, STATUS, 1, 2, 0);
        for _ in 0..n {
            h.make_available(0);
        }
        h.into_shared()
    }

    /// Requests each drive got over `rounds` single-request services, both drives kept
    /// backlogged (the "guest" refills what was served).
    fn split(a: Priority, b: Priority, rounds: usize) -> (u32, u32) {
        let mut drives = [backlogged("engine-a", 12), backlogged("engine-b", 12)];
        let blocks = drives.iter().map(|d| d.block.clone()).collect();
        let mut engine = IoEngine::new(blocks).unwrap();
        {
            let mut s = engine.scheduler.lock().unwrap();
            s.set_priority(QueueId(0), a).unwrap();
            s.set_priority(QueueId(1), b).unwrap();
        }
        let mut total = (0, 0);
        for _ in 0..rounds {
            let got = engine.serve(1);
            total.0 += got[0];
            total.1 += got[1];
            for (g, d) in got.iter().zip(drives.iter_mut()) {
                for _ in 0..*g {
                    d.make_available(0);
                }
            }
        }
        total
    }

    #[test]
    fn a_wake_says_whether_its_budget_ended_it() {
        let d = backlogged("engine-budget", 12);
        let mut engine = IoEngine::new(vec![d.block.clone()]).unwrap();
        let first = engine.serve_bounded(4, u64::MAX);
        assert_eq!((first.per_queue, first.budget_exhausted), (vec![4], true));
        // 4 KiB each: a 10 KiB byte budget stops after the third.
        let second = engine.serve_bounded(256, 10 << 10);
        assert_eq!((second.per_queue, second.budget_exhausted), (vec![3], true));
        let rest = engine.serve_bounded(256, u64::MAX);
        assert_eq!((rest.per_queue, rest.budget_exhausted), (vec![5], false));
        assert!(rest.steps <= steps_cap(256, 1));
    }

    #[test]
    fn backlogged_drives_split_by_weight_within_15_percent() {
        for (a, b) in [
            (Priority::High, Priority::Low),
            (Priority::Medium, Priority::Low),
            (Priority::High, Priority::Medium),
            (Priority::Medium, Priority::Medium),
        ] {
            let (x, y) = split(a, b, 2000);
            let want = f64::from(a.weight()) / f64::from(b.weight());
            let got = f64::from(x) / f64::from(y.max(1));
            assert!(
                (got / want - 1.0).abs() <= 0.15,
                "{a} vs {b}: served {x}:{y} = {got:.2}, weights say {want:.2}"
            );
        }
    }
}
