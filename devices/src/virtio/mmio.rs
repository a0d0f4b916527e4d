//! The virtio-mmio transport (virtio 1.x, section 4.2, version 2 registers only).
//!
//! Every register write from the guest is checked: accesses must be 32 bits wide (config
//! space excepted), queue set-up is only accepted before the queue is ready and before
//! DRIVER_OK, feature bits outside what the device offers are dropped, and a status that
//! skips steps is refused. A driver that breaks the rules gets FAILED/NEEDS_RESET in the
//! status register and a log line, never a panic.

use crate::lock;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{ring_check, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// `old` with the half that register `offset` holds replaced by `v` (the `_LOW` registers
/// hold bits 0-31, the `_HIGH` ones bits 32-63).
fn with_half(old: u64, offset: u32, v: u32) -> GuestAddress {
    let high = matches!(
        offset,
        VIRTIO_MMIO_QUEUE_DESC_HIGH | VIRTIO_MMIO_QUEUE_AVAIL_HIGH | VIRTIO_MMIO_QUEUE_USED_HIGH
    );
    GuestAddress(if high {
        (old & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(v)
    })
}

/// "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
const MMIO_VERSION: u32 = 2;
/// Offset of QueueNotify: the monitor backs it with an ioeventfd per queue.
pub const QUEUE_NOTIFY_OFFSET: u32 = VIRTIO_MMIO_QUEUE_NOTIFY;
/// Vendor id reported to drivers ("TVMM").
const VENDOR_ID: u32 = 0x4d4d_5654;

/// The MMIO register file of one virtio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    name: String,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the device's line into the irqchip.
    pub fn new(
        name: impl Into<String>,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let queues = sizes.iter().filter_map(|&s| Queue::new(s).ok()).collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            name: name.into(),
        }
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn fail(&mut self, why: &str) {
        crate::guest_warn!("virtio-mmio {}: {why}; device needs reset", self.name);
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the specification gives.
        let old = self.status;
        if new & old != old {
            self.fail("driver cleared status bits without a reset");
            return;
        }
        let added = new & !old;
        let order_ok = (added & VIRTIO_CONFIG_S_DRIVER == 0
            || new & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0)
            && (added & VIRTIO_CONFIG_S_FEATURES_OK == 0 || new & VIRTIO_CONFIG_S_DRIVER != 0)
            && (added & VIRTIO_CONFIG_S_DRIVER_OK == 0 || new & VIRTIO_CONFIG_S_FEATURES_OK != 0);
        if !order_ok {
            self.fail("driver set status bits out of order");
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            if self.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                // Legacy drivers are not supported: leave FEATURES_OK unset, as the
                // specification says, so the driver sees the refusal.
                crate::guest_warn!(
                    "virtio-mmio {}: driver did not accept VIRTIO_F_VERSION_1",
                    self.name
                );
                self.status = new & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(self.driver_features & offered);
        }
        self.status = new;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            crate::guest_log!(
                log::Level::Info,
                "virtio-mmio {}: driver gave up on the device (FAILED)",
                self.name
            );
        }
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            // Our own check: stricter than `Queue::is_valid` (no ring at 0, no overlap)
            // and it does not log through `virtio-queue` on every refusal.
            if let Err(e) = ring_check::check_layout(q, &self.mem) {
                self.fail(&format!("queue {i} is not valid: {e}"));
                return;
            }
        }
        // The device gets its own copies; the transport keeps its view for register reads.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    self.fail(&format!("queue {i} cannot be copied: {e}"));
                    return;
                }
            }
        }
        let result = lock(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone());
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(&format!("activation failed: {e}")),
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = lock(&self.device).features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => {
                if lock(&self.device).needs_reset() {
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                }
                self.status
            }
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_debug!(
                    "virtio-mmio {}: read of unknown register {offset:#x}",
                    self.name
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let allowed = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if !allowed {
                    self.fail("driver features written outside the DRIVER stage");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !setup {
                    self.fail("queue set-up outside the FEATURES_OK stage");
                    return;
                }
                let name = self.name.clone();
                let Some(q) = self.selected_queue() else {
                    crate::guest_warn!("virtio-mmio {name}: set-up of a queue that does not exist");
                    return;
                };
                if q.ready() && offset != VIRTIO_MMIO_QUEUE_READY {
                    crate::guest_warn!(
                        "virtio-mmio {name}: set-up of a queue that is already ready"
                    );
                    return;
                }
                match offset {
                    VIRTIO_MMIO_QUEUE_NUM => {
                        if u16::try_from(v)
                            .map(|s| q.try_set_size(s).is_err())
                            .unwrap_or(true)
                        {
                            crate::guest_warn!("virtio-mmio {name}: invalid queue size {v}");
                        }
                    }
                    VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
                    VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        let a = with_half(q.desc_table(), offset, v);
                        if q.try_set_desc_table_address(a).is_err() {
                            crate::guest_warn!(
                                "virtio-mmio {name}: misaligned descriptor table {:#x}",
                                a.0
                            );
                        }
                    }
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        let a = with_half(q.avail_ring(), offset, v);
                        if q.try_set_avail_ring_address(a).is_err() {
                            crate::guest_warn!(
                                "virtio-mmio {name}: misaligned available ring {:#x}",
                                a.0
                            );
                        }
                    }
                    _ => {
                        let a = with_half(q.used_ring(), offset, v);
                        if q.try_set_used_ring_address(a).is_err() {
                            crate::guest_warn!(
                                "virtio-mmio {name}: misaligned used ring {:#x}",
                                a.0
                            );
                        }
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd in the kernel; if it reaches us, forward.
                let dev = lock(&self.device);
                match dev.queue_events().get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            crate::guest_warn!(
                                "virtio-mmio {}: cannot forward notify: {e}",
                                self.name
                            );
                        }
                    }
                    None => crate::guest_warn!(
                        "virtio-mmio {}: notify for unknown queue {v}",
                        self.name
                    ),
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => crate::guest_debug!(
                "virtio-mmio {}: write to unknown register {offset:#x}",
                self.name
            ),
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_warn!(
                "virtio-mmio {}: {}-byte read at {offset:#x} ignored",
                self.name,
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_register(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_warn!(
                "virtio-mmio {}: {}-byte write at {offset:#x} ignored",
                self.name,
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset as u32, v);
    }
}
