//! The block device in the monitor's event loop: a guest notification on the queue's
//! ioeventfd wakes the loop, which processes the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::virtio::VirtioDevice;

/// Event data of the queue notification.
const QUEUE_EVENT: u32 = 0;
/// Event data of the rate limiter's timer.
const LIMITER_EVENT: u32 = 1;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set() != EventSet::IN {
            crate::guest_warn!(
                "virtio-blk {}: unexpected event {:?}",
                self.config().id,
                events.event_set()
            );
        }
        match events.data() {
            QUEUE_EVENT => {
                if let Some(evt) = self.queue_events().first() {
                    // Reading clears the counter; notifications coalesce, which is fine.
                    let _ = evt.read();
                }
                self.note_available();
                self.process_queue();
            }
            LIMITER_EVENT => self.on_rate_limiter_event(),
            other => crate::guest_warn!(
                "virtio-blk {}: unknown event data {other}",
                self.config().id
            ),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.queue_events().first() {
            if let Err(e) = ops.add(Events::with_data(evt, QUEUE_EVENT, EventSet::IN)) {
                log::error!(
                    "virtio-blk {}: cannot watch the queue event: {e}",
                    self.config().id
                );
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            self.rate_limiter(),
            LIMITER_EVENT,
            EventSet::IN,
        )) {
            log::error!(
                "virtio-blk {}: cannot watch the rate limiter: {e}",
                self.config().id
            );
        }
    }
}
