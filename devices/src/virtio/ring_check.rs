//! Checks of a split virtqueue's state that `virtio-queue` leaves to the device: ring
//! layout at activation, and the available index before each pop.
//!
//! A queue passes [`check_layout`] only if its three areas (descriptor table, available
//! ring, used ring, each with its event field) are non-empty, start above guest address 0,
//! lie inside guest memory, are aligned as the specification says and do not overlap.
//! Overlapping rings would let the device's own used-ring writes move the available
//! index, and `virtio-queue` treats an available ring at address 0 as "not ready"; both
//! made the device loop forever before these checks.
//!
//! [`pending`] is the one answer to "does the queue hold requests?" used both to decide
//! whether to serve a queue and, right before `pop_descriptor_chain`, to tell an empty
//! queue from a broken one, so the two can never disagree.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Why a queue's state cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// The driver did not mark the queue ready.
    #[error("queue is not ready")]
    NotReady,
    /// An area starts at guest address 0.
    #[error("{0} at guest address 0")]
    AtZero(&'static str),
    /// An area is misaligned.
    #[error("{area} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which area.
        area: &'static str,
        /// Its address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// An area runs outside guest memory.
    #[error("{area} [{addr:#x}, +{len:#x}) is not in guest memory")]
    OutsideMemory {
        /// Which area.
        area: &'static str,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Two areas share bytes.
    #[error("{0} and {1} overlap")]
    Overlap(&'static str, &'static str),
    /// The available ring cannot be read.
    #[error("cannot read the available index")]
    Unreadable,
    /// Requests were counted but the queue could not give one.
    #[error("the available ring holds requests the queue cannot pop")]
    Vanished,
    /// A ring entry names a descriptor outside the table.
    #[error("available ring entry names descriptor {head} of a {size}-entry table")]
    BadHead {
        /// The index the driver wrote.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The driver moved the available index further than the queue holds.
    #[error("available index runs {depth} entries ahead of a {size}-entry queue")]
    IndexRunaway {
        /// Entries between the device's position and the driver's index.
        depth: u16,
        /// The queue size.
        size: u16,
    },
}

/// The three areas of a split queue: (name, address, length, alignment).
fn areas(q: &Queue) -> [(&'static str, u64, u64, u64); 3] {
    let n = u64::from(q.size());
    [
        ("descriptor table", q.desc_table(), 16 * n, 16),
        ("available ring", q.avail_ring(), 6 + 2 * n, 2),
        ("used ring", q.used_ring(), 6 + 8 * n, 4),
    ]
}

/// Checks a queue the driver set up, before the device uses it (see the module docs).
pub fn check_layout(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), RingError> {
    if !q.ready() {
        return Err(RingError::NotReady);
    }
    let areas = areas(q);
    for (area, addr, len, align) in areas {
        if addr == 0 {
            return Err(RingError::AtZero(area));
        }
        if addr % align != 0 {
            return Err(RingError::Misaligned { area, addr, align });
        }
        let fits = usize::try_from(len)
            .map(|l| l > 0 && mem.check_range(GuestAddress(addr), l, Permissions::ReadWrite))
            .unwrap_or(false);
        if !fits {
            return Err(RingError::OutsideMemory { area, addr, len });
        }
    }
    for (i, a) in areas.iter().enumerate() {
        for b in &areas[i + 1..] {
            // Both ranges are inside guest memory, so the ends cannot overflow.
            if a.1 < b.1 + b.2 && b.1 < a.1 + a.2 {
                return Err(RingError::Overlap(a.0, b.0));
            }
        }
    }
    Ok(())
}

/// Requests the driver made available and the device has not taken yet, or why the
/// queue's state is invalid (the device must then stop until the driver resets it).
pub fn pending(q: &Queue, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| RingError::Unreadable)?;
    let depth = avail.0.wrapping_sub(q.next_avail());
    if depth > q.size() {
        return Err(RingError::IndexRunaway {
            depth,
            size: q.size(),
        });
    }
    Ok(depth)
}

/// Takes the next request off the queue: `Ok(None)` when it is empty, an error when its
/// state is invalid. Unlike `pop_descriptor_chain` it never logs (through the
/// `virtio_queue` target, without a rate limit) and never answers "empty" for a queue
/// that [`pending`] says holds requests.
pub fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, RingError> {
    if pending(q, mem)? == 0 {
        return Ok(None);
    }
    let size = q.size();
    let chain = q
        .iter(mem)
        .map_err(|_| RingError::Vanished)?
        .next()
        .ok_or(RingError::Vanished)?;
    let head = chain.head_index();
    if head >= size {
        return Err(RingError::BadHead { head, size });
    }
    Ok(Some(chain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn queue(desc: u64, avail: u64, used: u64) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        q
    }

    #[test]
    fn a_sane_layout_passes() {
        assert_eq!(check_layout(&queue(0x1000, 0x2000, 0x3000), &mem()), Ok(()));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let m = mem();
        assert_eq!(
            check_layout(&queue(0x1000, 0, 0x3000), &m),
            Err(RingError::AtZero("available ring"))
        );
        assert_eq!(
            check_layout(&queue(0x1000, 0x2000, 0x2000), &m),
            Err(RingError::Overlap("available ring", "used ring"))
        );
        // The used ring's first element's length field lands on avail.idx.
        assert_eq!(
            check_layout(&queue(0x1000, 0x3006, 0x3000), &m),
            Err(RingError::Overlap("available ring", "used ring"))
        );
        assert_eq!(
            check_layout(&queue(0x1000, 0x1080, 0x3000), &m),
            Err(RingError::Overlap("descriptor table", "available ring"))
        );
        assert!(matches!(
            check_layout(&queue(0x1000, 0x2000, (1 << 20) - 8), &m),
            Err(RingError::OutsideMemory { .. })
        ));
        let mut q = queue(0x1000, 0x2000, 0x3000);
        q.set_ready(false);
        assert_eq!(check_layout(&q, &m), Err(RingError::NotReady));
    }

    #[test]
    fn pending_counts_and_refuses_a_runaway_index() {
        let m = mem();
        let q = queue(0x1000, 0x2000, 0x3000);
        m.write_obj(5u16, GuestAddress(0x2002)).unwrap();
        assert_eq!(pending(&q, &m), Ok(5));
        m.write_obj(17u16, GuestAddress(0x2002)).unwrap();
        assert_eq!(
            pending(&q, &m),
            Err(RingError::IndexRunaway {
                depth: 17,
                size: 16
            })
        );
    }
}
