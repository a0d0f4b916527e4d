//! The I/O engine: services the request queues of every virtio-blk device of a VM on the
//! event-loop thread, in the order the weighted [`IoScheduler`] chooses, so that under load
//! each queue gets its share of bytes by priority (low, medium, high, or a weight).
//!
//! A notification (or a rate limiter's timer) marks a queue ready; the engine then serves
//! one request at a time from the queue the scheduler names, charging its bytes. A queue
//! that is empty or throttled goes idle until its next event. To keep the event loop
//! responsive, one wake-up serves at most [`MAX_REQUESTS_PER_WAKE`] requests; queues still
//! ready then re-arm their own eventfd so the loop comes straight back.

use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::block::{Block, Step};
use super::VirtioDevice;
use crate::io_scheduler::{IoScheduler, Priority, QueueId, SchedulerError, SharedIoScheduler};

/// Requests served per event-loop wake-up before yielding to other events.
pub const MAX_REQUESTS_PER_WAKE: usize = 256;

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

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
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

    fn drain(&mut self) {
        let mut sched = lock(&self.scheduler);
        // Every queue with requests waiting competes in this wake-up, not only the one
        // whose notification woke us: otherwise each wake would serve a single queue and
        // the weights would never meet.
        for (i, block) in self.blocks.iter().enumerate() {
            if lock(block).has_pending() {
                let _ = sched.mark_ready(QueueId(i as u32));
            }
        }
        let mut touched = vec![false; self.blocks.len()];
        let mut served = 0usize;
        let mut per_queue = vec![0u32; self.blocks.len()];
        while served < MAX_REQUESTS_PER_WAKE {
            let Some(id) = sched.next() else { break };
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
            match b.process_one() {
                Step::Served(bytes) => {
                    served += 1;
                    per_queue[id.0 as usize] += 1;
                    let _ = sched.charge(id, bytes);
                }
                Step::Empty | Step::Throttled | Step::Stopped => {
                    let _ = sched.mark_idle(id);
                }
            }
        }
        for (i, t) in touched.iter().enumerate() {
            if *t {
                lock(&self.blocks[i]).finish_batch();
            }
        }
        log::trace!("io engine: served {per_queue:?} this wake");
        // Budget used up: come back through the event loop for the queues still ready.
        if served >= MAX_REQUESTS_PER_WAKE {
            for id in sched.queue_ids() {
                if sched.stats(id).map(|s| s.ready).unwrap_or(false) {
                    if let Some(evt) = lock(&self.blocks[id.0 as usize]).queue_events().first() {
                        let _ = evt.write(1);
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for IoEngine {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        let index = (data / 2) as usize;
        let Some(block) = self.blocks.get(index) else {
            log::warn!("io engine: event for unknown device {index}");
            return;
        };
        let runnable = {
            let mut b = lock(block);
            if data.is_multiple_of(2) {
                if let Some(evt) = b.queue_events().first() {
                    let _ = evt.read();
                }
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
