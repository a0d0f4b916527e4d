//! A minimal polling virtio-mmio (version 2, "modern") driver that runs at CPL 3, with a
//! virtio-blk request layer ([`Blk`]) and a virtio-net packet layer ([`Net`]) on top of
//! it. Written from the virtio 1.x specification: section 4.2 (virtio over MMIO), 2.7
//! (split virtqueues), 3.1 (device initialisation), 5.2 (block device) and 5.1 (network
//! device).
//!
//! # Discovery
//! The monitor appends one word `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` per device
//! to the kernel command line (Linux's format, e.g. `virtio_mmio.device=4K@0xd0000000:5`),
//! in slot order: drives first, then network devices (see `BOOT.md`). [`slots`] parses
//! those words; [`MmioDevice::probe`] checks MagicValue (`"virt"`), Version (2) and reads
//! DeviceID (2 = block, 1 = net, 0 = placeholder, skipped).
//!
//! # Memory: the DMA region [8 MiB, 16 MiB)
//! Queue memory, request headers and data buffers come from a fixed guest-physical region
//! [`DMA_BASE`]..[`DMA_END`] (identity mapped and user accessible, between the kernel
//! image, which stays below 3 MiB, and the 16 MiB where `mem-touch` starts), handed out by
//! a bump allocator ([`dma_alloc`]) that never frees, so nothing lands in `.bss`. Guests
//! using it need at least 32 MiB of RAM (`--mem-mib 32`); [`dma_region_is_ram`] checks the
//! e820 map in the zero page.
//!
//! # Polling, not interrupts
//! Kernels run with IF = 0 and no IDT. The driver never waits for an interrupt: it polls
//! `used.idx` in guest memory (no VM exit). It sets `VIRTQ_AVAIL_F_NO_INTERRUPT` in every
//! queue it sets up (a hint the device may ignore) and never needs to touch
//! InterruptStatus/InterruptACK ([`MmioDevice::ack_interrupts`] exists for kernels that
//! want to). A notification is one 32-bit write of the queue index to QueueNotify, which the
//! monitor backs with an ioeventfd (~2.6 us instead of a ~26 us exit); [`Virtqueue::kick`]
//! publishes a whole batch of requests with one notification.
//!
//! # Costs
//! Every register access is an MMIO VM exit (~26 us): the init sequence costs a few
//! dozen; the request path touches no register except QueueNotify.
//!
//! # Ordering
//! The device is another thread (the monitor) reading and writing guest memory. The
//! driver writes descriptors and ring entries with volatile stores, then a `Release` fence,
//! then the volatile store of `avail.idx`; then a `SeqCst` fence (`mfence`) before reading
//! `used.flags` to decide whether to notify (spec 2.7.13). It reads `used.idx` with a
//! volatile load followed by an `Acquire` fence before reading used elements or any data
//! the device wrote (spec 2.7.14).

use core::fmt;
use core::hint::spin_loop;
use core::ptr::{read_volatile, write_bytes, write_volatile};
use core::sync::atomic::{fence, AtomicU64, Ordering};

use super::cmdline::{cmdline, parse_u64, zero_page};
use super::io::{mmio_read32, mmio_write32};
use super::time::{ns_to_ticks, rdtsc};

// ---------------------------------------------------------------------------------------
// The DMA region and its bump allocator.

/// First byte of the region the driver allocates queues and buffers from (8 MiB).
pub const DMA_BASE: u64 = 8 << 20;
/// End (exclusive) of that region (16 MiB).
pub const DMA_END: u64 = 16 << 20;

/// Next free byte of the DMA region.
static DMA_NEXT: AtomicU64 = AtomicU64::new(DMA_BASE);

/// Allocates `size` zeroed bytes aligned to `align` (a power of two) from
/// [`DMA_BASE`, `DMA_END`), or `None` if the region is exhausted. Never freed.
pub fn dma_alloc(size: u64, align: u64) -> Option<u64> {
    assert!(
        align.is_power_of_two(),
        "dma_alloc: align not a power of two"
    );
    let mut cur = DMA_NEXT.load(Ordering::Relaxed);
    loop {
        let start = cur.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > DMA_END {
            return None;
        }
        match DMA_NEXT.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [start, end) lies in the DMA region, identity mapped RAM that only
                // this allocator hands out, and nobody else owns it yet.
                unsafe { write_bytes(start as usize as *mut u8, 0, size as usize) };
                return Some(start);
            }
            Err(now) => cur = now,
        }
    }
}

/// Bytes still free in the DMA region (ignoring alignment).
pub fn dma_free_bytes() -> u64 {
    DMA_END - DMA_NEXT.load(Ordering::Relaxed)
}

/// Offset of `e820_entries` (u8) in the zero page.
const ZP_E820_ENTRIES: u64 = 0x1e8;
/// Offset of `e820_table` (up to 128 entries of {addr u64, size u64, type u32}, packed).
const ZP_E820_TABLE: u64 = 0x2d0;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// True if one e820 RAM entry of the zero page covers [`DMA_BASE`, `DMA_END`) (also true
/// if there is no zero page or no e820 map, when nothing can be checked).
pub fn dma_region_is_ram() -> bool {
    let zp = zero_page();
    if zp == 0 {
        return true;
    }
    // SAFETY: the zero page is valid guest memory the monitor filled in (BOOT.md).
    let count = unsafe { read_volatile((zp + ZP_E820_ENTRIES) as usize as *const u8) };
    if count == 0 {
        return true;
    }
    (0..u64::from(count.min(128))).any(|i| {
        let e = zp + ZP_E820_TABLE + i * 20;
        // SAFETY: as above; entries are packed, hence the unaligned reads.
        let (addr, size, ty) = unsafe {
            (
                core::ptr::read_unaligned(e as usize as *const u64),
                core::ptr::read_unaligned((e + 8) as usize as *const u64),
                core::ptr::read_unaligned((e + 16) as usize as *const u32),
            )
        };
        ty == E820_RAM && addr <= DMA_BASE && addr.saturating_add(size) >= DMA_END
    })
}

// ---------------------------------------------------------------------------------------
// Errors.

/// What can go wrong talking to a virtio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No device of the wanted type (at the wanted index) on the command line.
    NoDevice,
    /// MagicValue was not `"virt"` (0x74726976).
    BadMagic(u32),
    /// Version was not 2 (modern virtio-mmio).
    BadVersion(u32),
    /// DeviceID 0: a placeholder slot without a device.
    Placeholder,
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device cleared FEATURES_OK: it rejected the features the driver accepted.
    FeaturesRejected,
    /// Status did not read back 0 after a reset.
    ResetTimeout,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// QueueReady was already 1 before setup.
    QueueInUse(u32),
    /// QueueNumMax was 0: the queue does not exist.
    QueueUnavailable(u32),
    /// The DMA region is exhausted.
    OutOfMemory,
    /// Not enough free descriptors for the chain.
    QueueFull,
    /// No completion arrived within the timeout.
    Timeout,
    /// The used ring returned a head that is not an in-flight chain.
    BadUsedId(u32),
    /// `used.idx` moved past the number of chains in flight.
    UsedIdxRunaway(u16),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::NoDevice => write!(f, "no device"),
            Error::BadMagic(v) => write!(f, "bad magic value {:#x}", v),
            Error::BadVersion(v) => write!(f, "unsupported virtio-mmio version {}", v),
            Error::Placeholder => write!(f, "placeholder device (id 0)"),
            Error::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            Error::FeaturesRejected => write!(f, "device rejected the features (no FEATURES_OK)"),
            Error::ResetTimeout => write!(f, "device did not reset"),
            Error::NeedsReset => write!(f, "device needs reset"),
            Error::QueueInUse(q) => write!(f, "queue {} already ready", q),
            Error::QueueUnavailable(q) => write!(f, "queue {} unavailable", q),
            Error::OutOfMemory => write!(f, "DMA region [8 MiB, 16 MiB) exhausted"),
            Error::QueueFull => write!(f, "virtqueue full"),
            Error::Timeout => write!(f, "timeout waiting for the device"),
            Error::BadUsedId(id) => write!(f, "used ring returned id {} not in flight", id),
            Error::UsedIdxRunaway(n) => write!(f, "used.idx ran {} entries ahead", n),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Discovery from the command line.

/// The command-line word prefix announcing a device.
pub const CMDLINE_PREFIX: &[u8] = b"virtio_mmio.device=";

/// Where the monitor puts device slot `i`: `SLOT_BASE + i * SLOT_SIZE` (informative;
/// the driver only trusts the command line).
pub const SLOT_BASE: u64 = 0xd000_0000;
/// Size of one device slot's register window.
pub const SLOT_SIZE: u64 = 0x1000;

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// Interrupt line (unused by the polling driver).
    pub irq: u32,
}

/// Parses one command-line word; `None` if it is not a well-formed device word.
pub fn parse_slot(word: &[u8]) -> Option<Slot> {
    let rest = word.strip_prefix(CMDLINE_PREFIX)?;
    let at = rest.iter().position(|&b| b == b'@')?;
    let (size_str, rest) = (&rest[..at], &rest[at + 1..]);
    let colon = rest.iter().position(|&b| b == b':')?;
    let (base_str, rest) = (&rest[..colon], &rest[colon + 1..]);
    let irq_str = match rest.iter().position(|&b| b == b':') {
        Some(i) => &rest[..i],
        None => rest,
    };
    let size = parse_size(size_str)?;
    let base = parse_u64(base_str)?;
    let irq = u32::try_from(parse_u64(irq_str)?).ok()?;
    (size >= 0x100 && base.is_multiple_of(4)).then_some(Slot { base, size, irq })
}

/// A number with an optional K/M/G suffix (binary multiples), as Linux's `memparse`.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(digits)?.checked_mul(1 << shift)
}

/// The device slots announced on the command line, in order.
pub fn slots() -> impl Iterator<Item = Slot> {
    cmdline()
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .filter_map(parse_slot)
}

// ---------------------------------------------------------------------------------------
// The virtio-mmio transport.

/// MagicValue: "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const VERSION: u32 = 2;
/// DeviceID of a network card.
pub const ID_NET: u32 = 1;
/// DeviceID of a block device.
pub const ID_BLOCK: u32 = 2;

/// Register offsets (all 32-bit).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: the device is modern; a driver of this kind must accept it.
pub const F_VERSION_1: u64 = 1 << 32;

/// Reads of Status after a reset before giving up (each is an exit, ~26 us).
const RESET_POLLS: u32 = 10_000;

/// One virtio-mmio device (a register window).
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    base: u64,
    irq: u32,
    device_id: u32,
    features: u64,
}

impl MmioDevice {
    /// Checks MagicValue and Version at `slot` and reads DeviceID.
    pub fn probe(slot: &Slot) -> Result<MmioDevice, Error> {
        let mut dev = MmioDevice {
            base: slot.base,
            irq: slot.irq,
            device_id: 0,
            features: 0,
        };
        let magic = dev.read(reg::MAGIC_VALUE);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = dev.read(reg::VERSION);
        if version != VERSION {
            return Err(Error::BadVersion(version));
        }
        dev.device_id = dev.read(reg::DEVICE_ID);
        if dev.device_id == 0 {
            return Err(Error::Placeholder);
        }
        Ok(dev)
    }

    /// Guest-physical base of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The interrupt line from the command line.
    pub fn irq(&self) -> u32 {
        self.irq
    }

    /// DeviceID (1 = net, 2 = block, ...).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The features negotiated by [`MmioDevice::negotiate`] (0 before).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Reads the 32-bit register at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window comes from the monitor's command line; it is device MMIO
        // (or, if the monitor lied, unbacked memory returning all ones).
        unsafe { mmio_read32(self.base + offset) }
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`; the window is not RAM the kernel uses.
        unsafe { mmio_write32(self.base + offset, value) }
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Sets `bits` in Status (read-modify-write).
    pub fn add_status(&self, bits: u32) {
        let s = self.status();
        self.write(reg::STATUS, s | bits);
    }

    /// Resets the device: writes 0 to Status and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), Error> {
        self.write(reg::STATUS, 0);
        for _ in 0..RESET_POLLS {
            if self.status() == 0 {
                return Ok(());
            }
            spin_loop();
        }
        Err(Error::ResetTimeout)
    }

    /// Tells the device the driver gave up on it (sets FAILED).
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Steps 1-6 of the initialisation (spec 3.1.1): reset, ACKNOWLEDGE, DRIVER, accept
    /// the offered features that are also in `supported` (VIRTIO_F_VERSION_1 is required
    /// and always accepted), FEATURES_OK and its read-back check. Returns the accepted
    /// features. On failure the device is marked FAILED (except when the reset fails).
    /// Next: [`MmioDevice::setup_queue`] for each queue, then [`MmioDevice::driver_ok`].
    pub fn negotiate(&mut self, supported: u64) -> Result<u64, Error> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::NoVersion1);
        }
        let accepted = offered & (supported | F_VERSION_1);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected);
        }
        self.features = accepted;
        Ok(accepted)
    }

    /// Sets up virtqueue `index` (spec 4.2.3.2) with the largest power-of-two size not
    /// above `max_size` and QueueNumMax, memory from the DMA region. Call between
    /// [`MmioDevice::negotiate`] and [`MmioDevice::driver_ok`].
    pub fn setup_queue(&self, index: u32, max_size: u16) -> Result<Virtqueue, Error> {
        self.write(reg::QUEUE_SEL, index);
        if self.read(reg::QUEUE_READY) != 0 {
            self.fail();
            return Err(Error::QueueInUse(index));
        }
        let num_max = self.read(reg::QUEUE_NUM_MAX).min(u32::from(max_size));
        if num_max == 0 {
            self.fail();
            return Err(Error::QueueUnavailable(index));
        }
        // Split queue sizes are powers of two (spec 2.7).
        let size = 1u16 << (31 - num_max.leading_zeros());
        let vq = match Virtqueue::allocate(size, self.base + reg::QUEUE_NOTIFY, index) {
            Some(vq) => vq,
            None => {
                self.fail();
                return Err(Error::OutOfMemory);
            }
        };
        self.write(reg::QUEUE_NUM, u32::from(size));
        let (desc, avail, used) = vq.addresses();
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, used as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        // The queue memory (including avail.flags) is complete before the device sees it.
        fence(Ordering::SeqCst);
        self.write(reg::QUEUE_READY, 1);
        Ok(vq)
    }

    /// Sets up virtqueue `index` with `size` entries at the given guest-physical addresses,
    /// unchecked (for hostile-driver tests: rings at 0, overlapping rings) and marks it
    /// ready. Call between [`MmioDevice::negotiate`] and [`MmioDevice::driver_ok`].
    pub fn setup_queue_raw(&self, index: u32, size: u16, desc: u64, avail: u64, used: u64) {
        self.write(reg::QUEUE_SEL, index);
        self.write(reg::QUEUE_NUM, u32::from(size));
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, used as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        fence(Ordering::SeqCst);
        self.write(reg::QUEUE_READY, 1);
    }

    /// Final step of the initialisation: sets DRIVER_OK; checks DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> Result<(), Error> {
        self.add_status(status::DRIVER_OK);
        let s = self.status();
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(Error::NeedsReset);
        }
        Ok(())
    }

    /// Reads InterruptStatus and acknowledges every bit set in it; returns the bits.
    pub fn ack_interrupts(&self) -> u32 {
        let bits = self.read(reg::INTERRUPT_STATUS);
        if bits != 0 {
            self.write(reg::INTERRUPT_ACK, bits);
        }
        bits
    }

    /// Reads a 32-bit word of the device configuration space at `offset`.
    pub fn config_read32(&self, offset: u64) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    /// Reads a 64-bit configuration field as two 32-bit reads, retrying until
    /// ConfigGeneration is the same before and after (spec 4.2.2.2).
    pub fn config_read64(&self, offset: u64) -> u64 {
        loop {
            let gen = self.read(reg::CONFIG_GENERATION);
            let lo = self.config_read32(offset);
            let hi = self.config_read32(offset + 4);
            if self.read(reg::CONFIG_GENERATION) == gen {
                return (u64::from(hi) << 32) | u64::from(lo);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Split virtqueue.

/// Descriptor flag: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// avail.flags: the driver does not want used-buffer notifications (interrupts).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: the device does not want available-buffer notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue size the driver sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True if the device writes the buffer (device-writable), false if it reads it.
    pub device_writes: bool,
}

/// A used-ring element: the head of a finished chain and the bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain (as returned by [`Virtqueue::add`]).
    pub id: u16,
    /// Bytes written into the chain's device-writable buffers.
    pub len: u32,
}

/// A split virtqueue driven by polling.
///
/// Memory (all in the DMA region): descriptor table (16 bytes per entry, 16-aligned),
/// available ring (flags, idx, ring[size], used_event), used ring (flags, idx,
/// ring[size] of {id u32, len u32}, avail_event), each on its own 4 KiB page(s), plus a
/// `u16` per descriptor with the length of the chain it heads (0 = not in flight).
/// Free descriptors are linked through their `next` fields.
pub struct Virtqueue {
    notify: u64,
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    chain_len: u64,
    free_head: u16,
    num_free: u16,
    in_flight: u16,
    avail_idx: u16,
    published_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Allocates and initialises the rings for a queue of `size` (a power of two) whose
    /// notifications go to register `notify` with value `index`.
    fn allocate(size: u16, notify: u64, index: u32) -> Option<Virtqueue> {
        let n = u64::from(size);
        let desc = dma_alloc(16 * n, 4096)?;
        let avail = dma_alloc(6 + 2 * n, 4096)?;
        let used = dma_alloc(6 + 8 * n, 4096)?;
        let chain_len = dma_alloc(2 * n, 64)?;
        let vq = Virtqueue {
            notify,
            index,
            size,
            desc,
            avail,
            used,
            chain_len,
            free_head: 0,
            num_free: size,
            in_flight: 0,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
        };
        for i in 0..size {
            vq.set_desc_next(i, i.wrapping_add(1) % size);
        }
        vq.set_interrupt_suppression(true);
        Some(vq)
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Queue size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains submitted and not yet returned by [`Virtqueue::poll`].
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT (set by default: the driver polls).
    pub fn set_interrupt_suppression(&self, suppress: bool) {
        let flags = if suppress { AVAIL_F_NO_INTERRUPT } else { 0 };
        // SAFETY: avail.flags is in this queue's ring memory, written only by the driver.
        unsafe { write_volatile(self.avail as usize as *mut u16, flags) };
    }

    fn desc_ptr(&self, i: u16) -> u64 {
        self.desc + 16 * u64::from(i)
    }

    fn desc_next(&self, i: u16) -> u16 {
        // SAFETY: i < size; the descriptor table is driver-written memory of this queue.
        unsafe { read_volatile((self.desc_ptr(i) + 14) as usize as *const u16) }
    }

    fn set_desc_next(&self, i: u16, next: u16) {
        // SAFETY: as in `desc_next`.
        unsafe { write_volatile((self.desc_ptr(i) + 14) as usize as *mut u16, next) }
    }

    fn chain_len_ptr(&self, i: u16) -> *mut u16 {
        (self.chain_len + 2 * u64::from(i)) as usize as *mut u16
    }

    /// The head index the next [`Virtqueue::add`] will return, if a descriptor is free
    /// (lets a caller tie per-request memory to the head before adding the chain).
    pub fn peek_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Puts a chain of `bufs` (device-readable ones should come before device-writable
    /// ones, spec 2.7.4.2) into the available ring, unpublished: the device sees it after
    /// [`Virtqueue::kick`]. Returns the head index, or `None` if `bufs` is empty or there
    /// are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buffer]) -> Option<u16> {
        let n = bufs.len();
        if n == 0 || n > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut d = head;
        for (i, b) in bufs.iter().enumerate() {
            let next_free = self.desc_next(d);
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= DESC_F_NEXT;
            }
            let p = self.desc_ptr(d);
            // SAFETY: descriptor d is free (on the free list), so the device does not
            // read it until it is published.
            unsafe {
                write_volatile(p as usize as *mut u64, b.addr);
                write_volatile((p + 8) as usize as *mut u32, b.len);
                write_volatile((p + 12) as usize as *mut u16, flags);
                // For all but the last this is the chain's next element (the free list's
                // next entry); for the last it is ignored by the device (no NEXT flag) and
                // keeps the free list linked.
                write_volatile((p + 14) as usize as *mut u16, next_free);
            }
            d = next_free;
        }
        self.free_head = d;
        self.num_free -= n as u16;
        self.in_flight += 1;
        // SAFETY: head < size; chain_len is driver-private memory of this queue.
        unsafe { write_volatile(self.chain_len_ptr(head), n as u16) };
        let slot = u64::from(self.avail_idx & (self.size - 1));
        // SAFETY: avail.ring[slot] is driver-written ring memory of this queue.
        unsafe { write_volatile((self.avail + 4 + 2 * slot) as usize as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(head)
    }

    /// Publishes the chains added since the last kick (one `avail.idx` store) and, unless
    /// the device set VIRTQ_USED_F_NO_NOTIFY, notifies it (one QueueNotify write). Returns
    /// whether it notified. Does nothing if nothing was added.
    pub fn kick(&mut self) -> bool {
        if self.avail_idx == self.published_idx {
            return false;
        }
        // Descriptors, ring entries and the buffers they point to before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is driver-written ring memory of this queue.
        unsafe { write_volatile((self.avail + 2) as usize as *mut u16, self.avail_idx) };
        self.published_idx = self.avail_idx;
        // The index store before the used.flags load (spec 2.7.13: a full barrier).
        fence(Ordering::SeqCst);
        // SAFETY: used.flags is device-written ring memory of this queue.
        let flags = unsafe { read_volatile(self.used as usize as *const u16) };
        if flags & USED_F_NO_NOTIFY != 0 {
            return false;
        }
        // SAFETY: QueueNotify of this queue's device.
        unsafe { mmio_write32(self.notify, self.index) };
        true
    }

    /// Takes the next element of the used ring, if the device returned one, and frees the
    /// chain's descriptors. Never blocks. Errors if the device returned a head that is not
    /// in flight or moved `used.idx` too far.
    #[inline]
    pub fn poll(&mut self) -> Result<Option<Used>, Error> {
        // SAFETY: used.idx is device-written ring memory of this queue.
        let used_idx = unsafe { read_volatile((self.used + 2) as usize as *const u16) };
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.in_flight {
            return Err(Error::UsedIdxRunaway(pending));
        }
        // The used element and the data the device wrote after the index.
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
        // SAFETY: e is an element of this queue's used ring, written before used.idx.
        let (id, len) = unsafe {
            (
                read_volatile(e as usize as *const u32),
                read_volatile((e + 4) as usize as *const u32),
            )
        };
        if id >= u32::from(self.size) {
            return Err(Error::BadUsedId(id));
        }
        let head = id as u16;
        // SAFETY: head < size.
        let n = unsafe { read_volatile(self.chain_len_ptr(head)) };
        if n == 0 {
            return Err(Error::BadUsedId(id));
        }
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain to the free list: link its last descriptor to the old head.
        let mut last = head;
        for _ in 1..n {
            last = self.desc_next(last);
        }
        self.set_desc_next(last, self.free_head);
        self.free_head = head;
        self.num_free += n;
        self.in_flight -= 1;
        // SAFETY: head < size.
        unsafe { write_volatile(self.chain_len_ptr(head), 0) };
        Ok(Some(Used { id: head, len }))
    }
}

// ---------------------------------------------------------------------------------------
// virtio-blk.

/// Request type: read (device writes the data buffers).
pub const BLK_T_IN: u32 = 0;
/// Request type: write.
pub const BLK_T_OUT: u32 = 1;
/// Request type: flush the device's write cache.
pub const BLK_T_FLUSH: u32 = 4;
/// Request type: get the device id string (20 bytes).
pub const BLK_T_GET_ID: u32 = 8;

/// Request status: success.
pub const BLK_S_OK: u8 = 0;
/// Request status: I/O error (e.g. a write to a read-only drive).
pub const BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const BLK_S_UNSUPP: u8 = 2;
/// What the driver stores in a status byte before submitting (no device writes it).
pub const BLK_S_UNSET: u8 = 0xff;

/// VIRTIO_BLK_F_RO: the device is read-only.
pub const BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device supports FLUSH.
pub const BLK_F_FLUSH: u64 = 1 << 9;

/// Bytes of a GET_ID answer.
pub const BLK_ID_BYTES: u32 = 20;
/// Sector size of virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;

/// Bytes of per-head request memory: the 16-byte header, then the status byte.
const BLK_REQ_BYTES: u64 = 32;

/// A finished block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head index returned by [`Blk::submit`].
    pub head: u16,
    /// Bytes the device reports written (data read + 1 status byte).
    pub len: u32,
    /// Status byte ([`BLK_S_OK`], [`BLK_S_IOERR`], [`BLK_S_UNSUPP`], or
    /// [`BLK_S_UNSET`] if the device did not write it).
    pub status: u8,
}

/// A virtio-blk device with its one request queue (queue 0), driven by polling.
///
/// Each request is a 3-descriptor chain: the 16-byte header {type u32, reserved u32,
/// sector u64} (device-readable), the data buffer (device-writable for IN and GET_ID,
/// device-readable for OUT; absent for FLUSH), and the 1-byte status (device-writable).
/// Headers and status bytes live in a per-head array in the DMA region, so a request
/// needs no memory of its own besides its data buffer.
pub struct Blk {
    dev: MmioDevice,
    vq: Virtqueue,
    reqs: u64,
    capacity: u64,
}

impl Blk {
    /// Number of virtio-blk devices announced on the command line (probes each slot).
    pub fn count() -> usize {
        slots()
            .filter(|s| matches!(MmioDevice::probe(s), Ok(d) if d.device_id() == ID_BLOCK))
            .count()
    }

    /// Finds the `index`-th virtio-blk device (0 = first) on the command line and
    /// initialises it ([`Blk::init`]). [`Error::NoDevice`] if there is none.
    pub fn open(index: usize) -> Result<Blk, Error> {
        let dev = slots()
            .filter_map(|s| MmioDevice::probe(&s).ok())
            .filter(|d| d.device_id() == ID_BLOCK)
            .nth(index)
            .ok_or(Error::NoDevice)?;
        Blk::init(dev)
    }

    /// Initialises a probed block device: features (VERSION_1, RO and FLUSH if offered),
    /// capacity, queue 0 (up to [`MAX_QUEUE_SIZE`] entries), request memory, DRIVER_OK.
    pub fn init(dev: MmioDevice) -> Result<Blk, Error> {
        let blk = Blk::init_without_driver_ok(dev)?;
        blk.dev.driver_ok()?;
        Ok(blk)
    }

    /// [`Blk::init`] without its last step: the queue is set up but DRIVER_OK is not
    /// set, so requests submitted now wait in the ring until the caller sets it with
    /// `device().driver_ok()` (a hostile-driver test: the device must not serve them on
    /// the vCPU thread that sets DRIVER_OK).
    pub fn init_without_driver_ok(mut dev: MmioDevice) -> Result<Blk, Error> {
        dev.negotiate(BLK_F_RO | BLK_F_FLUSH)?;
        let capacity = dev.config_read64(0);
        let vq = dev.setup_queue(0, MAX_QUEUE_SIZE)?;
        let Some(reqs) = dma_alloc(u64::from(vq.size()) * BLK_REQ_BYTES, 64) else {
            dev.fail();
            return Err(Error::OutOfMemory);
        };
        Ok(Blk {
            dev,
            vq,
            reqs,
            capacity,
        })
    }

    /// The transport.
    pub fn device(&self) -> &MmioDevice {
        &self.dev
    }

    /// The request queue.
    pub fn queue(&mut self) -> &mut Virtqueue {
        &mut self.vq
    }

    /// Capacity in 512-byte sectors (read at init).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device offered (and the driver accepted) VIRTIO_BLK_F_RO.
    pub fn read_only(&self) -> bool {
        self.dev.features() & BLK_F_RO != 0
    }

    /// Whether FLUSH was negotiated.
    pub fn has_flush(&self) -> bool {
        self.dev.features() & BLK_F_FLUSH != 0
    }

    /// Most requests that fit in the queue at once (3 descriptors each).
    pub fn max_in_flight(&self) -> usize {
        usize::from(self.vq.size()) / 3
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.vq.in_flight())
    }

    /// Adds a request (unpublished until [`Blk::kick`]): `ty` is one of the `BLK_T_*`
    /// types, `data`/`len` its data buffer (ignored for FLUSH). Returns the head index
    /// that its [`Completion`] will carry, or `None` if the queue is full.
    pub fn submit(&mut self, ty: u32, sector: u64, data: u64, len: u32) -> Option<u16> {
        let head = self.vq.peek_head()?;
        let hdr = self.reqs + u64::from(head) * BLK_REQ_BYTES;
        let status = hdr + 16;
        let header = Buffer {
            addr: hdr,
            len: 16,
            device_writes: false,
        };
        let data_buf = Buffer {
            addr: data,
            len,
            device_writes: ty == BLK_T_IN || ty == BLK_T_GET_ID,
        };
        let status_buf = Buffer {
            addr: status,
            len: 1,
            device_writes: true,
        };
        let with_data = [header, data_buf, status_buf];
        let without = [header, status_buf];
        let chain: &[Buffer] = if ty == BLK_T_FLUSH || len == 0 {
            &without
        } else {
            &with_data
        };
        if chain.len() > usize::from(self.vq.num_free()) {
            return None;
        }
        // SAFETY: the request memory of a free head is not in use by the device.
        unsafe {
            write_volatile(hdr as usize as *mut u32, ty);
            write_volatile((hdr + 4) as usize as *mut u32, 0);
            write_volatile((hdr + 8) as usize as *mut u64, sector);
            write_volatile(status as usize as *mut u8, BLK_S_UNSET);
        }
        let got = self.vq.add(chain);
        debug_assert_eq!(got, Some(head));
        got
    }

    /// Publishes the submitted requests and notifies the device (once for the batch).
    pub fn kick(&mut self) -> bool {
        self.vq.kick()
    }

    /// The next finished request, if any (never blocks).
    ///
    /// Not inlined: a symbol of its own, so that the monitor's profiler shows the
    /// driver's polling apart from its callers (a call costs nanoseconds; a request's
    /// round trip through the device tens of microseconds).
    #[inline(never)]
    pub fn poll(&mut self) -> Result<Option<Completion>, Error> {
        Ok(self.vq.poll()?.map(|u| {
            let status = self.reqs + u64::from(u.id) * BLK_REQ_BYTES + 16;
            Completion {
                head: u.id,
                len: u.len,
                // SAFETY: the device wrote the status byte before the used element, which
                // `poll` read with an Acquire fence after used.idx.
                status: unsafe { read_volatile(status as usize as *const u8) },
            }
        }))
    }

    /// Spins until a request finishes; [`Error::Timeout`] if none does for `timeout_ns`.
    pub fn wait(&mut self, timeout_ns: u64) -> Result<Completion, Error> {
        let start = rdtsc();
        let limit = ns_to_ticks(timeout_ns);
        loop {
            if let Some(c) = self.poll()? {
                return Ok(c);
            }
            if rdtsc().wrapping_sub(start) > limit {
                return Err(Error::Timeout);
            }
            spin_loop();
        }
    }

    /// Runs one request synchronously (submit, kick, wait; nothing else may be in flight)
    /// and returns its status byte.
    pub fn request(
        &mut self,
        ty: u32,
        sector: u64,
        data: u64,
        len: u32,
        timeout_ns: u64,
    ) -> Result<u8, Error> {
        assert!(
            self.in_flight() == 0,
            "Blk::request with requests in flight"
        );
        let head = self.submit(ty, sector, data, len).ok_or(Error::QueueFull)?;
        self.kick();
        let c = self.wait(timeout_ns)?;
        if c.head != head {
            return Err(Error::BadUsedId(u32::from(c.head)));
        }
        Ok(c.status)
    }

    /// Reads `len` bytes (a multiple of 512) from `sector` into `buf` (DMA memory).
    pub fn read(&mut self, sector: u64, buf: u64, len: u32, timeout_ns: u64) -> Result<u8, Error> {
        self.request(BLK_T_IN, sector, buf, len, timeout_ns)
    }

    /// Writes `len` bytes (a multiple of 512) from `buf` (DMA memory) to `sector`.
    pub fn write(&mut self, sector: u64, buf: u64, len: u32, timeout_ns: u64) -> Result<u8, Error> {
        self.request(BLK_T_OUT, sector, buf, len, timeout_ns)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self, timeout_ns: u64) -> Result<u8, Error> {
        self.request(BLK_T_FLUSH, 0, 0, 0, timeout_ns)
    }

    /// Reads the device id string into `buf` ([`BLK_ID_BYTES`] bytes of DMA memory).
    pub fn get_id(&mut self, buf: u64, timeout_ns: u64) -> Result<u8, Error> {
        self.request(BLK_T_GET_ID, 0, buf, BLK_ID_BYTES, timeout_ns)
    }
}

// ---------------------------------------------------------------------------------------
// virtio-net.

/// VIRTIO_NET_F_MAC: the configuration space holds the device's MAC address.
pub const NET_F_MAC: u64 = 1 << 5;
/// The receive queue.
pub const NET_RX_QUEUE: u32 = 0;
/// The transmit queue.
pub const NET_TX_QUEUE: u32 = 1;
/// Bytes of `struct virtio_net_hdr` (virtio 1.x, with `num_buffers`): flags u8,
/// gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16,
/// num_buffers u16. It precedes every frame in both directions.
pub const NET_HDR_LEN: usize = 12;
/// Longest Ethernet frame (without FCS) the driver sends or expects to receive.
pub const NET_MAX_FRAME: usize = 1514;
/// Bytes of one packet buffer (header + frame, one descriptor each).
pub const NET_BUF_SIZE: u64 = 2048;
/// Offset of `num_buffers` (u16) in the header.
pub const NET_HDR_NUM_BUFFERS: usize = 10;
/// MAC used when the device does not offer VIRTIO_NET_F_MAC (locally administered).
pub const NET_DEFAULT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// A virtio-net device: a receive half ([`NetRx`], queue 0) and a transmit half
/// ([`NetTx`], queue 1), separate fields so that a receive callback can transmit
/// (`net.rx.recv_with(|f| net.tx.send_with(...))`).
///
/// Every packet is one descriptor pointing at a [`NET_BUF_SIZE`]-byte buffer holding the
/// 12-byte header followed by the frame; buffer `i` of a queue belongs to descriptor
/// (= head) `i`, so no other bookkeeping is needed. Features: VIRTIO_F_VERSION_1 and,
/// if offered, VIRTIO_NET_F_MAC; no offloads, no mergeable receive buffers.
pub struct Net {
    dev: MmioDevice,
    /// Our MAC address: the configuration space's `mac` if VIRTIO_NET_F_MAC was
    /// negotiated, else [`NET_DEFAULT_MAC`].
    pub mac: [u8; 6],
    /// The receive half (queue 0), kept full of device-writable buffers.
    pub rx: NetRx,
    /// The transmit half (queue 1).
    pub tx: NetTx,
}

impl Net {
    /// Number of virtio-net devices announced on the command line (probes each slot).
    pub fn count() -> usize {
        slots()
            .filter(|s| matches!(MmioDevice::probe(s), Ok(d) if d.device_id() == ID_NET))
            .count()
    }

    /// Finds the `index`-th virtio-net device (0 = first) on the command line and
    /// initialises it ([`Net::init`]). [`Error::NoDevice`] if there is none.
    pub fn open(index: usize) -> Result<Net, Error> {
        let dev = slots()
            .filter_map(|s| MmioDevice::probe(&s).ok())
            .filter(|d| d.device_id() == ID_NET)
            .nth(index)
            .ok_or(Error::NoDevice)?;
        Net::init(dev)
    }

    /// Initialises a probed network device: features (VERSION_1, MAC if offered), the
    /// MAC address, queues 0 and 1 (up to [`MAX_QUEUE_SIZE`] entries each), one buffer
    /// per descriptor, DRIVER_OK; then posts a receive buffer on every descriptor of
    /// queue 0 and notifies the device.
    pub fn init(mut dev: MmioDevice) -> Result<Net, Error> {
        let features = dev.negotiate(NET_F_MAC)?;
        let mac = if features & NET_F_MAC != 0 {
            dev.config_mac()
        } else {
            NET_DEFAULT_MAC
        };
        let rxq = dev.setup_queue(NET_RX_QUEUE, MAX_QUEUE_SIZE)?;
        let txq = dev.setup_queue(NET_TX_QUEUE, MAX_QUEUE_SIZE)?;
        let rx_bufs = dma_alloc(u64::from(rxq.size()) * NET_BUF_SIZE, 4096);
        let tx_bufs = dma_alloc(u64::from(txq.size()) * NET_BUF_SIZE, 4096);
        let (Some(rx_bufs), Some(tx_bufs)) = (rx_bufs, tx_bufs) else {
            dev.fail();
            return Err(Error::OutOfMemory);
        };
        dev.driver_ok()?;
        let mut net = Net {
            dev,
            mac,
            rx: NetRx {
                vq: rxq,
                bufs: rx_bufs,
            },
            tx: NetTx {
                vq: txq,
                bufs: tx_bufs,
            },
        };
        net.rx.fill();
        net.rx.kick();
        Ok(net)
    }

    /// The transport.
    pub fn device(&self) -> &MmioDevice {
        &self.dev
    }

    /// Whether VIRTIO_NET_F_MAC was negotiated (the MAC came from the device).
    pub fn has_mac(&self) -> bool {
        self.dev.features() & NET_F_MAC != 0
    }
}

impl MmioDevice {
    /// Reads `mac[6]` at the start of a network device's configuration space (two
    /// 32-bit reads, retried until ConfigGeneration is stable).
    pub fn config_mac(&self) -> [u8; 6] {
        let v = self.config_read64(0).to_le_bytes();
        [v[0], v[1], v[2], v[3], v[4], v[5]]
    }
}

/// A received frame, as returned by [`NetRx::poll`]: its buffer (= head) and the bytes
/// the device wrote (header + frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// Head (= buffer) index.
    pub head: u16,
    /// Bytes written by the device, header included.
    pub len: u32,
}

impl RxFrame {
    /// Length of the Ethernet frame (0 if the device wrote less than a header).
    pub fn frame_len(&self) -> usize {
        (self.len as usize)
            .min(NET_BUF_SIZE as usize)
            .saturating_sub(NET_HDR_LEN)
    }
}

/// The receive half of a [`Net`]: queue 0 with a device-writable buffer posted on every
/// free descriptor.
pub struct NetRx {
    vq: Virtqueue,
    bufs: u64,
}

impl NetRx {
    /// The queue.
    pub fn queue(&mut self) -> &mut Virtqueue {
        &mut self.vq
    }

    /// Guest-physical address of buffer `head` (header first, then the frame).
    pub fn buf_addr(&self, head: u16) -> u64 {
        self.bufs + u64::from(head) * NET_BUF_SIZE
    }

    /// Posts a buffer on every free descriptor (unpublished until [`NetRx::kick`]);
    /// returns how many.
    pub fn fill(&mut self) -> usize {
        let mut n = 0;
        while let Some(head) = self.vq.peek_head() {
            self.post(head);
            n += 1;
        }
        n
    }

    /// Posts buffer `head` (whose descriptor must be free) for the device to write.
    fn post(&mut self, head: u16) {
        let buf = Buffer {
            addr: self.buf_addr(head),
            len: NET_BUF_SIZE as u32,
            device_writes: true,
        };
        let got = self.vq.add(&[buf]);
        debug_assert_eq!(got, Some(head));
    }

    /// Publishes the buffers posted since the last kick (and notifies the device).
    pub fn kick(&mut self) -> bool {
        self.vq.kick()
    }

    /// The next received frame, if any (never blocks). The caller reads it with
    /// [`NetRx::frame`] and must give the buffer back with [`NetRx::repost`].
    #[inline]
    pub fn poll(&mut self) -> Result<Option<RxFrame>, Error> {
        Ok(self.vq.poll()?.map(|u| RxFrame {
            head: u.id,
            len: u.len,
        }))
    }

    /// The frame bytes (after the header) of a frame returned by [`NetRx::poll`] and not
    /// yet reposted.
    pub fn frame(&mut self, f: &RxFrame) -> &mut [u8] {
        let addr = self.buf_addr(f.head) + NET_HDR_LEN as u64;
        // SAFETY: the buffer belongs to a chain the device returned (poll read used.idx
        // with an Acquire fence), so the device no longer touches it until it is
        // reposted, which needs `&mut self` and so ends this borrow.
        unsafe { core::slice::from_raw_parts_mut(addr as usize as *mut u8, f.frame_len()) }
    }

    /// `num_buffers` of a received frame's header (1 without mergeable buffers).
    pub fn num_buffers(&self, f: &RxFrame) -> u16 {
        let addr = self.buf_addr(f.head) + NET_HDR_NUM_BUFFERS as u64;
        // SAFETY: as in `frame`; an aligned u16 inside the buffer.
        unsafe { read_volatile(addr as usize as *const u16) }
    }

    /// Gives the buffer of a consumed frame back to the device (unpublished until
    /// [`NetRx::kick`]).
    pub fn repost(&mut self, f: RxFrame) {
        self.post(f.head);
    }

    /// Receives one frame if one arrived: calls `f` with the frame bytes, reposts the
    /// buffer (unpublished: call [`NetRx::kick`] after a batch) and returns `f`'s result.
    #[inline]
    pub fn recv_with<R>(&mut self, f: impl FnOnce(&mut [u8]) -> R) -> Result<Option<R>, Error> {
        let Some(frame) = self.poll()? else {
            return Ok(None);
        };
        let r = f(self.frame(&frame));
        self.repost(frame);
        Ok(Some(r))
    }
}

/// The transmit half of a [`Net`]: queue 1 with one device-readable buffer per packet.
pub struct NetTx {
    vq: Virtqueue,
    bufs: u64,
}

impl NetTx {
    /// The queue.
    pub fn queue(&mut self) -> &mut Virtqueue {
        &mut self.vq
    }

    /// Packets submitted and not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        usize::from(self.vq.in_flight())
    }

    /// Whether a descriptor is free (else [`NetTx::reclaim`] first).
    pub fn has_room(&self) -> bool {
        self.vq.num_free() > 0
    }

    /// Takes every packet the device has finished with off the used ring; returns how
    /// many.
    #[inline]
    pub fn reclaim(&mut self) -> Result<usize, Error> {
        let mut n = 0;
        while self.vq.poll()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Queues one frame of `len` bytes (at most [`NET_MAX_FRAME`]; panics above): `fill`
    /// writes it into the packet buffer (whose previous contents are unspecified), the
    /// header is all zeros. Unpublished until [`NetTx::kick`]. Returns `false` (and
    /// does not call `fill`) if no descriptor is free: [`NetTx::reclaim`] and retry.
    #[inline]
    pub fn send_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        assert!(len <= NET_MAX_FRAME, "NetTx::send_with: frame too long");
        let Some(head) = self.vq.peek_head() else {
            return false;
        };
        let addr = self.bufs + u64::from(head) * NET_BUF_SIZE;
        // SAFETY: the descriptor `head` is free, so its buffer is not in use by the device;
        // the buffer is NET_BUF_SIZE >= NET_HDR_LEN + NET_MAX_FRAME bytes of DMA memory.
        unsafe {
            write_bytes(addr as usize as *mut u8, 0, NET_HDR_LEN);
            let frame =
                core::slice::from_raw_parts_mut((addr as usize as *mut u8).add(NET_HDR_LEN), len);
            fill(frame);
        }
        let buf = Buffer {
            addr,
            len: (NET_HDR_LEN + len) as u32,
            device_writes: false,
        };
        let got = self.vq.add(&[buf]);
        debug_assert_eq!(got, Some(head));
        true
    }

    /// Publishes the frames queued since the last kick and notifies the device (once).
    pub fn kick(&mut self) -> bool {
        self.vq.kick()
    }

    /// Kicks, then spins until the device has returned every packet in flight;
    /// [`Error::Timeout`] if none comes back for `timeout_ns`.
    pub fn drain(&mut self, timeout_ns: u64) -> Result<(), Error> {
        self.kick();
        let limit = ns_to_ticks(timeout_ns);
        let mut last = rdtsc();
        while self.in_flight() > 0 {
            if self.reclaim()? > 0 {
                last = rdtsc();
            } else if rdtsc().wrapping_sub(last) > limit {
                return Err(Error::Timeout);
            }
            spin_loop();
        }
        Ok(())
    }
}
