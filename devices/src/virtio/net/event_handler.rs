//! The network device in the event loop: receive-queue notifications (new buffers),
//! transmit-queue notifications (frames to send) and the TAP becoming readable. While a
//! frame waits for a receive buffer the TAP is taken out of the loop, so a full guest
//! cannot make the loop spin.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::VirtioDevice;

const RX_EVENT: u32 = 0;
const TX_EVENT: u32 = 1;
const TAP_EVENT: u32 = 2;
const TX_LIMITER_EVENT: u32 = 3;
const RX_LIMITER_EVENT: u32 = 4;

impl Net {
    fn watch_tap(&self, ops: &mut EventOps, on: bool) {
        let ev = Events::with_data(self.tap(), TAP_EVENT, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if let Err(e) = r {
            crate::guest_debug!("virtio-net {}: TAP watch {on}: {e}", self.config().id);
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let was_blocked = self.rx_blocked();
        match events.data() {
            RX_EVENT => {
                if let Some(e) = self.queue_events().get(RX_QUEUE) {
                    let _ = e.read();
                }
            }
            TX_EVENT => {
                if let Some(e) = self.queue_events().get(TX_QUEUE) {
                    let _ = e.read();
                }
                self.process_tx();
            }
            TAP_EVENT => {}
            TX_LIMITER_EVENT => {
                if self.clear_tx_limiter_event() {
                    self.process_tx();
                }
            }
            RX_LIMITER_EVENT => {
                self.clear_rx_limiter_event();
            }
            other => crate::guest_warn!(
                "virtio-net {}: unknown event data {other}",
                self.config().id
            ),
        }
        let blocked = self.process_rx();
        if blocked && !was_blocked {
            self.watch_tap(ops, false);
        } else if !blocked && was_blocked {
            self.watch_tap(ops, true);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (q, data) in [(RX_QUEUE, RX_EVENT), (TX_QUEUE, TX_EVENT)] {
            if let Some(evt) = self.queue_events().get(q) {
                if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                    log::error!(
                        "virtio-net {}: cannot watch queue {q}: {e}",
                        self.config().id
                    );
                }
            }
        }
        let (tx, rx) = self.limiters();
        for (l, data) in [(tx, TX_LIMITER_EVENT), (rx, RX_LIMITER_EVENT)] {
            if let Err(e) = ops.add(Events::with_data(l, data, EventSet::IN)) {
                log::error!(
                    "virtio-net {}: cannot watch a rate limiter: {e}",
                    self.config().id
                );
            }
        }
        self.watch_tap(ops, true);
    }
}
