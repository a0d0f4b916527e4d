//! Loading a guest kernel and the data it boots with.
//!
//! Kernels are 64-bit ELF files (the project's test kernels, or Linux's vmlinux) or Linux
//! bzImages, loaded with linux-loader. The monitor writes the Linux zero page (boot
//! parameters with the e820 map, command line, initrd) for every kernel, and enters it in
//! 64-bit mode (see [`long_mode`]). Test kernels carry an ELF note that asks for every vCPU
//! to start at the entry point; the contract is in `resources/test-kernels/BOOT.md`.

pub mod elf_note;
pub mod long_mode;
pub mod mptable;

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{ConfigError, KernelFormat, VmConfig};
use crate::memory::{
    low_ram_end, CMDLINE_CAPACITY, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END,
    MMIO_GAP_START, ZERO_PAGE_START,
};

/// Where and how the vCPUs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest-physical address of the 64-bit entry point.
    pub entry: u64,
    /// Every vCPU starts at `entry` (test kernels) rather than only the boot vCPU (Linux).
    pub multi_entry: bool,
    /// Highest guest-physical address the kernel image occupies (exclusive).
    pub kernel_end: u64,
}

/// Errors while loading the kernel, initrd and boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A user setting is wrong (file not loadable, memory too small, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The boot parameters could not be written.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(String),
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot-protocol signature "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` value meaning "undefined boot loader".
const LOADER_UNDEFINED: u8 = 0xff;
/// Default kernel alignment for relocatable kernels (16 MiB), as Linux's own default.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Loads the kernel, command line and initrd into `mem` and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    format: KernelFormat,
) -> Result<BootInfo, BootError> {
    let mem_bytes = cfg.mem_mib << 20;
    let low_end = low_ram_end(mem_bytes);
    let open = |p: &Path, field: &str| {
        tuner::files::open_regular(p).map_err(|e| ConfigError::new(field, e.to_string()))
    };
    let mut file = open(&cfg.kernel, "kernel")?;
    let too_small = |needed: u64| {
        ConfigError::new(
            "mem_mib",
            format!(
                "{} MiB is too small for the kernel, which needs at least {} MiB",
                cfg.mem_mib,
                needed.div_ceil(1 << 20)
            ),
        )
    };

    let (info, setup_header) = match format {
        KernelFormat::Elf => {
            let facts = elf_note::inspect(&mut file).map_err(|e| {
                ConfigError::new("kernel", format!("{}: {e}", cfg.kernel.display()))
            })?;
            if facts.load_end > low_end {
                return Err(too_small(facts.load_end).into());
            }
            let res =
                Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
                    ConfigError::new(
                        "kernel",
                        format!("{}: cannot load ELF: {e}", cfg.kernel.display()),
                    )
                })?;
            (
                BootInfo {
                    entry: res.kernel_load.0,
                    multi_entry: facts.multi_entry,
                    kernel_end: res.kernel_end,
                },
                None,
            )
        }
        KernelFormat::BzImage => {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if HIMEM_START + size > low_end {
                return Err(too_small(HIMEM_START + size).into());
            }
            let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| {
                    ConfigError::new(
                        "kernel",
                        format!("{}: cannot load bzImage: {e}", cfg.kernel.display()),
                    )
                })?;
            (
                BootInfo {
                    entry: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    multi_entry: false,
                    kernel_end: res.kernel_end,
                },
                res.setup_header,
            )
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = HDRS_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }

    // Command line.
    let mut cmdline =
        Cmdline::new(CMDLINE_CAPACITY).map_err(|e| ConfigError::new("cmdline", format!("{e}")))?;
    if !cfg.cmdline.is_empty() {
        cmdline
            .insert_str(&cfg.cmdline)
            .map_err(|e| ConfigError::new("cmdline", format!("{e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| {
        ConfigError::new("cmdline", format!("cannot place it in guest memory: {e}"))
    })?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cfg.cmdline.len() as u32 + 1;

    // Initrd: as high as possible in low RAM, page aligned, above the kernel.
    if let Some(path) = &cfg.initrd {
        let mut f = open(path, "initrd")?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let max_addr = match params.hdr.initrd_addr_max {
            0 => low_end,
            m => low_end.min(u64::from(m) + 1),
        };
        let start = max_addr
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= info.kernel_end)
            .ok_or_else(|| {
                ConfigError::new(
                    "initrd",
                    format!(
                        "{} ({size} bytes) does not fit in guest memory beside the kernel; raise mem_mib",
                        path.display()
                    ),
                )
            })?;
        mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
            .map_err(|e| ConfigError::new("initrd", format!("{}: {e}", path.display())))?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820 map: low RAM below the EBDA, RAM from 1 MiB up to the MMIO hole, RAM above 4 GiB.
    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if mem_bytes > MMIO_GAP_START {
        e820.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))?;
    let _: u32 = mem
        .read_obj(GuestAddress(ZERO_PAGE_START + 0x228))
        .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(info)
}
