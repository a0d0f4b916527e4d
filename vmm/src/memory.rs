//! Guest physical memory: its layout on x86-64 (where the monitor puts boot data, where the
//! MMIO hole is), its allocation with vm-memory and its registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Boot GDT (4 entries: null, code, data, TSS).
pub const GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const IDT_START: u64 = 0x520;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) mapping the first 4 GiB.
pub const PD_START: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Capacity reserved for the command line, NUL included.
pub const CMDLINE_CAPACITY: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where kernels are loaded ("high memory" in Linux's boot protocol).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the hole below 4 GiB reserved for MMIO devices.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot; slot `i` is at `VIRTIO_MMIO_BASE + i * 0x1000`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// IRQ of virtio slot 0; slot `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Where the local APIC lives (inside the MMIO hole).
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Errors while building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the allocation.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// vm-memory's reason.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    Register {
        /// Slot number.
        slot: u32,
        /// KVM's reason.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The region's host address is unknown (cannot happen for mmap-backed memory).
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
}

// The boot structures must not overlap; checked at compile time.
const _: () = assert!(GDT_START + 32 <= IDT_START);
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PD_START + PD_COUNT * 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_CAPACITY as u64 <= EBDA_START);

/// The RAM ranges of a guest with `mem_bytes` of memory: up to the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO_GAP_START {
        ranges.push((
            GuestAddress(MMIO_GAP_END),
            (mem_bytes - MMIO_GAP_START) as usize,
        ));
    }
    ranges
}

/// End of the RAM below the MMIO hole (exclusive).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Allocates `mib` MiB of anonymous guest memory (not yet touched, so not yet resident).
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mib << 20;
    GuestMemoryMmap::from_ranges(&ram_ranges(bytes))
        .map_err(|source| MemoryError::Allocate { mib, source })
}

/// Tells KVM about every region of `mem`, one slot each; with `dirty_log`, KVM tracks the
/// pages the guest writes (read with `KVM_GET_DIRTY_LOG`, see [`dirty_pages`]).
pub fn register_with_kvm(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    dirty_log: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::NoHostAddress(region.start_addr().raw_value()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: if dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (the
        // monitor keeps it until the process exits), and slots do not overlap.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
            slot: slot as u32,
            source,
        })?;
    }
    Ok(())
}

/// Pages dirtied since the last call, summed over `slots` (slot number, size in bytes).
/// Reading the log clears it, so each call covers one interval.
pub fn dirty_pages(vm: &VmFd, slots: &[(u32, usize)]) -> Result<u64, kvm_ioctls::Error> {
    let mut total = 0u64;
    for &(slot, size) in slots {
        let bitmap = vm.get_dirty_log(slot, size)?;
        total += bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
    }
    Ok(total)
}

/// The (slot, size) of every region, in registration order.
pub fn slots(mem: &GuestMemoryMmap) -> Vec<(u32, usize)> {
    mem.iter()
        .enumerate()
        .map(|(i, r)| (i as u32, r.len() as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1usize << 30)));
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }
}
