//! Building a VM from a [`VmConfig`] and running it to its end: KVM VM with in-kernel
//! irqchip (and PIT for Linux guests), guest memory, kernel, legacy devices, one thread per vCPU, and the
//! event loop on the calling thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::guest_metrics::{GuestMetricsDevice, GUEST_METRICS_ADDR, GUEST_METRICS_SIZE};
use devices::io_scheduler::{Priority, QueueId, SchedulerError};
use devices::legacy::{
    serial::{COM1_IRQ, COM1_PORT_COUNT},
    DebugExit, PostPort, SerialConsole, SerialInput, COM1_PORT, DEBUG_EXIT_PORT, I8042,
    I8042_COMMAND_PORT, I8042_DATA_PORT, POST_PORT,
};
use devices::vcpu_control::{set_current_vcpu, VcpuControl, VCPU_CONTROL_ADDR, VCPU_CONTROL_SIZE};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::io_engine::IoEngine;
use devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::{MmioTransport, VirtioDevice, VirtioInterrupt, MMIO_WINDOW_SIZE};
use devices::{ExitReason, ExitSignal};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

use crate::api::ApiSocket;
use crate::boot::{self, long_mode, BootError};
use crate::config::{host_mem_mib, ConfigError, VmConfig};
use crate::cpuid::{self, VcpuTopology};
use crate::kvm_stats::KvmStats;
use crate::memory::{self, MemoryError};
use crate::profiler::{Profiler, SymbolTable};
use crate::runtime::{DirtyLog, DriveHandle, RuntimeParts, VmRuntime};
use crate::seccomp::{self, SeccompError};
use crate::telemetry::Telemetry;
use crate::vcpu::Vcpu;

/// Address of the TSS pages KVM needs on Intel hosts (just below the BIOS area at 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest (or a vCPU fault, or the monitor) stopped the VM.
    Stopped(ExitReason),
    /// `timeout_ms` passed first.
    TimedOut(u64),
    /// SIGTERM or SIGINT (the number) stopped the run.
    Signalled(i32),
}

impl RunOutcome {
    /// The `vmm` process exit status for this outcome.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunOutcome::Stopped(ExitReason::GuestExit(code)) => i32::from(*code),
            RunOutcome::Stopped(ExitReason::Reset) => 0,
            RunOutcome::Stopped(ExitReason::Crash(_)) => EXIT_GUEST_CRASH,
            RunOutcome::Stopped(ExitReason::MonitorError(_)) => 1,
            RunOutcome::TimedOut(_) => EXIT_TIMEOUT,
            // As a shell reports a process a signal ended: 143 for SIGTERM, 130 for SIGINT.
            RunOutcome::Signalled(sig) => 128 + sig,
        }
    }
}

/// Exit status when `timeout_ms` ends the run (as `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the guest crashed (triple fault, internal or emulation error).
pub const EXIT_GUEST_CRASH: i32 = 125;

/// Errors that stop a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A user setting is wrong: exit status 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// /dev/kvm is missing or unusable.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl during set-up failed.
    #[error("KVM refused to {what}: {source}")]
    KvmSetup {
        /// What the monitor was doing.
        what: &'static str,
        /// KVM's reason.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel could not be loaded.
    #[error("boot: {0}")]
    Boot(String),
    /// A vCPU could not be put in its boot state.
    #[error("vCPU {index}: {source}")]
    VcpuSetup {
        /// Which vCPU.
        index: u32,
        /// What failed.
        #[source]
        source: long_mode::LongModeError,
    },
    /// The CPUID table could not be built.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// A device could not be created or registered.
    #[error("device {device}: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
    /// seccomp set-up failed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
}

impl VmError {
    /// Whether the error is the user's (exit status 2) rather than the host's.
    pub fn is_config_error(&self) -> bool {
        matches!(self, VmError::Config(_))
    }
}

impl From<BootError> for VmError {
    fn from(e: BootError) -> Self {
        match e {
            BootError::Config(c) => VmError::Config(c),
            other => VmError::Boot(other.to_string()),
        }
    }
}

/// Watches the exit eventfd for the event loop.
struct ExitWatcher {
    exit: ExitSignal,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Draining the counter is enough: the loop checks the signal after each wake-up.
        let _ = self.exit.event_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event_fd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e}");
        }
    }
}

/// Puts stdin in raw mode for the guest console while alive, if stdin is a terminal.
struct RawStdin {
    active: bool,
}

impl RawStdin {
    fn enter() -> Self {
        let stdin = io::stdin();
        let lock = stdin.lock();
        // SAFETY: isatty on fd 0 only inspects it.
        let is_tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        let active = is_tty && lock.set_raw_mode().is_ok();
        Self { active }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.active {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

fn register_pio(
    io: &mut IoManager,
    device: &'static str,
    base: u16,
    len: u16,
    dev: Arc<dyn DevicePio + Send + Sync>,
) -> Result<(), VmError> {
    let range = PioRange::new(PioAddress(base), len).map_err(|e| VmError::Device {
        device,
        reason: format!("{e:?}"),
    })?;
    io.register_pio(range, dev).map_err(|e| VmError::Device {
        device,
        reason: format!("{e:?}"),
    })
}

fn serial_writer(cfg: &VmConfig) -> Result<Box<dyn Write + Send>, VmError> {
    match &cfg.serial_out {
        Some(path) => {
            // Never blocks (a FIFO without a reader fails with ENXIO); the kind is checked
            // again on the open file: a regular file (truncated now) or a character device.
            let err =
                |e: String| ConfigError::new("serial_out", format!("{}: {e}", path.display()));
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
            let kind = f.metadata().map_err(|e| err(e.to_string()))?.file_type();
            crate::config::serial_out_kind(path, kind)?;
            if kind.is_file() {
                f.set_len(0).map_err(|e| err(e.to_string()))?;
            }
            // Back to blocking writes (a terminal would otherwise drop output).
            // SAFETY: F_SETFL on an fd this function owns.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
            Ok(Box::new(f))
        }
        // Unbuffered: every byte the guest prints is visible at once.
        None => Ok(Box::new(stdout_file()?)),
    }
}

/// A `File` on a duplicate of fd 1, so writes bypass Rust's line buffer.
fn stdout_file() -> Result<File, VmError> {
    let fd = io::stdout().as_raw_fd();
    // SAFETY: dup of a valid fd; the new fd is owned by the returned File.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(VmError::Device {
            device: "serial",
            reason: format!("cannot duplicate stdout: {}", io::Error::last_os_error()),
        });
    }
    // SAFETY: `dup` is a fresh fd nobody else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

fn register_mmio(
    io: &mut IoManager,
    device: &'static str,
    base: u64,
    len: u64,
    dev: Arc<dyn DeviceMmio + Send + Sync>,
) -> Result<(), VmError> {
    let err = |e: String| VmError::Device { device, reason: e };
    let range = MmioRange::new(MmioAddress(base), len).map_err(|e| err(format!("{e:?}")))?;
    io.register_mmio(range, dev)
        .map_err(|e| err(format!("{e:?}")))
}

/// Puts a virtio device on the MMIO bus at `base` with interrupt `irq`: its register
/// window, an irqfd for its interrupt and an ioeventfd per queue on QueueNotify.
fn attach_virtio<D: VirtioDevice + 'static>(
    vm: &VmFd,
    io: &mut IoManager,
    mem: &vm_memory::GuestMemoryMmap,
    id: &str,
    device: Arc<Mutex<D>>,
    base: u64,
    irq: u32,
) -> Result<(), VmError> {
    let dev_err = |reason: String| VmError::Device {
        device: "virtio",
        reason,
    };
    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| dev_err(e.to_string()))?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(|e| dev_err(format!("{id}: irqfd for IRQ {irq}: {e}")))?;
    let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
    {
        let d = device
            .lock()
            .map_err(|_| dev_err(format!("{id}: lock poisoned")))?;
        for (q, evt) in d.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(base + u64::from(QUEUE_NOTIFY_OFFSET));
            vm.register_ioevent(evt, &notify, q as u32)
                .map_err(|e| dev_err(format!("{id}: ioeventfd for queue {q}: {e}")))?;
        }
    }
    let transport = MmioTransport::new(id, device, mem.clone(), interrupt);
    register_mmio(
        io,
        "virtio",
        base,
        MMIO_WINDOW_SIZE,
        Arc::new(Mutex::new(transport)),
    )?;
    log::info!("{id}: virtio-mmio at {base:#x}, IRQ {irq}");
    Ok(())
}

/// Whether epoll can watch `f`: a terminal, a pipe or a socket.
fn stdin_is_pollable(f: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(kind) = f.metadata().map(|m| m.file_type()) else {
        return false;
    };
    // SAFETY: isatty only inspects the descriptor.
    kind.is_fifo() || kind.is_socket() || unsafe { libc::isatty(f.as_raw_fd()) } == 1
}

/// The guest profiler of `cfg`, if it wants one: its symbols from `symbols` (a
/// `System.map`; a bad one is the user's error) or else from the kernel's ELF symbol
/// table (a kernel without one is profiled by address: every sample `[unknown]`).
fn build_profiler(
    cfg: &VmConfig,
    format: crate::config::KernelFormat,
) -> Result<Option<Arc<Profiler>>, VmError> {
    if !cfg.profiler_wanted() {
        return Ok(None);
    }
    let (symbols, source) = match &cfg.symbols {
        Some(path) => (
            SymbolTable::from_system_map(path)
                .map_err(|e| ConfigError::new("symbols", e.to_string()))?,
            path.display().to_string(),
        ),
        None if format == crate::config::KernelFormat::Elf => {
            match SymbolTable::from_elf(&cfg.kernel) {
                Ok(t) => (t, cfg.kernel.display().to_string()),
                Err(e) => {
                    log::warn!("profiler: no symbols ({e}); samples are counted as [unknown]");
                    (SymbolTable::default(), "none".to_string())
                }
            }
        }
        None => {
            log::info!("profiler: a bzImage has no symbol table; give --symbols System.map");
            (SymbolTable::default(), "none".to_string())
        }
    };
    let hz = match cfg.profile_hz {
        Some(hz) => crate::profiler::check_hz(hz)
            .map_err(|e| ConfigError::new("profile_hz", e.to_string()))?,
        None => 0,
    };
    crate::profiler::install_signal_handler().map_err(|e| VmError::Device {
        device: "profiler",
        reason: e.to_string(),
    })?;
    log::info!(
        "profiler: {} function symbols from {source}, {hz} Hz",
        symbols.len()
    );
    Ok(Some(Arc::new(Profiler::new(
        cfg.vcpus, symbols, source, hz,
    ))))
}

/// Creates the VM and its vCPUs from `cfg`, runs it, and returns how it ended.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let max_vcpus = kvm.get_max_vcpus() as u32;
    let format = cfg.validate(max_vcpus, host_mem_mib())?;
    let profiler = build_profiler(cfg, format)?;
    let started = Instant::now();
    // Before any thread starts, so that every thread inherits the blocked mask.
    let stop_signals = crate::signals::StopSignals::block()
        .map_err(|e| VmError::EventLoop(format!("cannot set up SIGTERM/SIGINT: {e}")))?;
    let signalled = stop_signals.received();

    let vm: Arc<VmFd> = Arc::new(kvm.create_vm().map_err(|source| VmError::KvmSetup {
        what: "create a VM",
        source,
    })?);
    let setup = |what| move |source| VmError::KvmSetup { what, source };
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(setup("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(setup("create the in-kernel irqchip"))?;

    let mem = memory::create_guest_memory(cfg.mem_mib)?;
    // Dirty-page tracking costs write faults in the guest: only when telemetry is on.
    let telemetry_on = cfg.state_db.is_some() || cfg.metrics_addr.is_some();
    memory::register_with_kvm(&vm, &mem, telemetry_on)?;

    // virtio devices: created first so their command-line words reach the kernel.
    let mut io_manager = IoManager::new();
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    let mut virtio_words = Vec::new();
    let mut blocks = Vec::new();
    for (i, drive) in cfg.drives.iter().enumerate() {
        let id = cfg.drive_id(i);
        let block = Block::new(BlockConfig {
            id: id.clone(),
            path: drive.path.clone(),
            read_only: drive.read_only,
        })
        .map_err(|e| ConfigError::new("drives", e.to_string()))?;
        let mut block = block;
        if let Some(spec) = drive.start_limits()? {
            let limits = spec.to_limiter("drives.rate_limiter")?;
            block
                .set_rate_limit(limits)
                .map_err(|e| ConfigError::new("drives.rate_limiter", e.to_string()))?;
        }
        let block = Arc::new(Mutex::new(block));
        let slot = i as u64;
        let (base, irq) = (
            memory::VIRTIO_MMIO_BASE + slot * MMIO_WINDOW_SIZE,
            memory::VIRTIO_IRQ_BASE + slot as u32,
        );
        attach_virtio(&vm, &mut io_manager, &mem, &id, block.clone(), base, irq)?;
        virtio_words.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        blocks.push(block);
    }
    // Network devices take the slots after the drives.
    let mut nets = Vec::new();
    for (i, n) in cfg.network.iter().enumerate() {
        let id = cfg.net_id(i);
        let slot = (cfg.drives.len() + i) as u64;
        let mac = match &n.mac {
            Some(m) => crate::config::parse_mac(m)?,
            None => [0x06, 0, 0, 0, 0, slot as u8],
        };
        let rate_limiter = match n.rate_limiter {
            Some(l) => l.to_limiter("network.rate_limiter")?,
            None => Default::default(),
        };
        let net = Net::new(NetConfig {
            id: id.clone(),
            tap: n.tap.clone(),
            mac,
            rate_limiter,
        })
        .map_err(|e| ConfigError::new("network", e.to_string()))?;
        let net = Arc::new(Mutex::new(net));
        let (base, irq) = (
            memory::VIRTIO_MMIO_BASE + slot * MMIO_WINDOW_SIZE,
            memory::VIRTIO_IRQ_BASE + slot as u32,
        );
        attach_virtio(&vm, &mut io_manager, &mem, &id, net.clone(), base, irq)?;
        virtio_words.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        subscribers.push(net.clone());
        nets.push((id, net));
    }
    // One I/O engine serves every drive's queue in priority order.
    let mut scheduler = None;
    if !blocks.is_empty() {
        let engine = IoEngine::new(blocks.clone()).map_err(|e| VmError::Device {
            device: "io engine",
            reason: e.to_string(),
        })?;
        let sched = engine.scheduler();
        for (i, drive) in cfg.drives.iter().enumerate() {
            if let Some(p) = &drive.priority {
                let prio: Priority = p.parse().map_err(|e: SchedulerError| {
                    ConfigError::new("drives.priority", e.to_string())
                })?;
                sched
                    .lock()
                    .map_err(|_| VmError::Device {
                        device: "io engine",
                        reason: "lock poisoned".into(),
                    })?
                    .set_priority(QueueId(i as u32), prio)
                    .map_err(|e| ConfigError::new("drives.priority", e.to_string()))?;
            }
        }
        scheduler = Some(sched);
        subscribers.push(Arc::new(Mutex::new(engine)));
    }
    // The vCPU control device (how many vCPUs the guest uses; parking) and the guest's
    // metrics device; both are lock-free behind a shared reference.
    let vcpu_control = Arc::new(VcpuControl::new(cfg.vcpus));
    vcpu_control
        .set_active(cfg.start_vcpus())
        .map_err(|e| ConfigError::new("active_vcpus", e.to_string()))?;
    register_mmio(
        &mut io_manager,
        "vcpu control",
        VCPU_CONTROL_ADDR,
        VCPU_CONTROL_SIZE,
        vcpu_control.clone(),
    )?;
    let guest_metrics = Arc::new(GuestMetricsDevice::default());
    register_mmio(
        &mut io_manager,
        "guest metrics",
        GUEST_METRICS_ADDR,
        GUEST_METRICS_SIZE,
        guest_metrics.clone(),
    )?;
    let mut boot_cfg = cfg.clone();
    if !virtio_words.is_empty() {
        let words = virtio_words.join(" ");
        boot_cfg.cmdline = if cfg.cmdline.is_empty() {
            words
        } else {
            format!("{} {words}", cfg.cmdline)
        };
    }
    let boot_info = boot::load(&mem, &boot_cfg, format)?;
    // The PIT is for Linux's timer calibration; test kernels (multi-entry) do not use it,
    // and tearing it down costs ~15 ms at exit on this nested KVM.
    if !boot_info.multi_entry {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(setup("create the in-kernel PIT"))?;
    }
    long_mode::write_boot_tables(&mem).map_err(|e| VmError::Boot(e.to_string()))?;
    // The MP table lists the vCPUs that run: all of a test kernel's, the boot vCPU of a
    // Linux guest (its application processors are not started yet). Linux finds it at
    // once instead of scanning the BIOS area with emulated code (seconds on this KVM).
    let listed = if boot_info.multi_entry { cfg.vcpus } else { 1 };
    if listed <= boot::mptable::MAX_CPUS {
        boot::mptable::write(&mem, listed).map_err(|e| VmError::Boot(e.to_string()))?;
    } else {
        log::info!("no MP table: {listed} vCPUs are more than one can list");
    }
    log::info!(
        "kernel {} loaded: entry {:#x}, end {:#x}, {}",
        cfg.kernel.display(),
        boot_info.entry,
        boot_info.kernel_end,
        if boot_info.multi_entry {
            "all vCPUs start at the entry"
        } else {
            "boot vCPU starts"
        }
    );

    // Devices.
    let exit = ExitSignal::new().map_err(|e| VmError::Device {
        device: "exit signal",
        reason: e.to_string(),
    })?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device {
        device: "serial",
        reason: e.to_string(),
    })?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(setup("register the serial irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        serial_writer(cfg)?,
    )));
    register_pio(
        &mut io_manager,
        "serial",
        COM1_PORT,
        COM1_PORT_COUNT,
        serial.clone(),
    )?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    register_pio(&mut io_manager, "i8042", I8042_DATA_PORT, 1, i8042.clone())?;
    register_pio(&mut io_manager, "i8042", I8042_COMMAND_PORT, 1, i8042)?;
    register_pio(
        &mut io_manager,
        "debug-exit",
        DEBUG_EXIT_PORT,
        devices::legacy::debug_exit::DEBUG_EXIT_PORT_COUNT,
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
    )?;
    register_pio(
        &mut io_manager,
        "post",
        POST_PORT,
        1,
        Arc::new(Mutex::new(PostPort::default())),
    )?;
    let io_manager = Arc::new(io_manager);

    // vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(setup("report its supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    let mut vcpu_stats = Vec::with_capacity(cfg.vcpus as usize);
    let mut kvm_stats = Vec::with_capacity(cfg.vcpus as usize);
    for index in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(setup("create a vCPU"))?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        let table = cpuid::filter(
            &supported,
            VcpuTopology {
                index,
                count: cfg.vcpus,
                tsc_khz,
            },
        )?;
        fd.set_cpuid2(&table).map_err(setup("set a vCPU's CPUID"))?;
        long_mode::setup_vcpu(&fd, boot_info.entry, index)
            .map_err(|source| VmError::VcpuSetup { index, source })?;
        if index > 0 && boot_info.multi_entry {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(setup("make an application processor runnable"))?;
        }
        kvm_stats.push(match KvmStats::open(fd.as_raw_fd()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::debug!("vCPU {index}: no KVM binary stats: {e}");
                None
            }
        });
        let mut vcpu = Vcpu::new(index, fd, io_manager.clone(), exit.clone());
        vcpu.set_counting(cfg.exit_counters);
        if let Some(p) = &profiler {
            vcpu.set_sample_slot(p.slot(index));
        }
        vcpu_stats.push(vcpu.stats());
        vcpus.push(vcpu);
    }
    let vcpu_tids: Arc<Vec<std::sync::atomic::AtomicI32>> = Arc::new(
        (0..cfg.vcpus)
            .map(|_| std::sync::atomic::AtomicI32::new(0))
            .collect(),
    );
    let runtime = Arc::new(VmRuntime::new(RuntimeParts {
        mem_bytes: cfg.mem_mib << 20,
        vcpus: vcpu_stats,
        kvm_stats,
        drives: cfg
            .drives
            .iter()
            .enumerate()
            .map(|(i, d)| DriveHandle {
                id: cfg.drive_id(i),
                block: blocks[i].clone(),
                // The configured level; for explicit limits, the nearest level, computed
                // once here and stored by the knob controller.
                rate_level: d.rate_level.unwrap_or_else(|| {
                    usize::from(crate::tuning::nearest_ladder_level(
                        &devices::lock(&blocks[i]).rate_limit(),
                        &tuner::actions::RATE_LADDER,
                    ))
                }),
            })
            .collect(),
        nets,
        scheduler,
        guest: guest_metrics,
        vcpu_control: vcpu_control.clone(),
        vcpu_tids: vcpu_tids.clone(),
        dirty: telemetry_on.then(|| DirtyLog {
            vm: vm.clone(),
            slots: memory::slots(&mem),
            total: Mutex::new(0),
        }),
        slo: cfg.slo,
        profiler: profiler.clone(),
    }));
    let api_socket = match &cfg.api_sock {
        Some(path) => {
            Some(ApiSocket::bind(path).map_err(|e| ConfigError::new("api_sock", e.to_string()))?)
        }
        None => None,
    };
    if cfg.seccomp {
        if cfg.tuner_on() {
            // tract's one-time CPU probe (on an AMX host it calls `arch_prctl`, which no
            // filter allows) runs now, before any filtered thread may be the first to
            // infer: the tuner thread below, or a policy (re)loaded later
            // on the API thread (`PUT /policy`) under its filter.
            tuner::policy::prepare_inference();
        }
        // Before the helper threads start: each installs its role's filter first thing.
        let helpers = seccomp::HelperFilters::build()?;
        if !tuner::sandbox::set_thread_hook(Box::new(move |name| helpers.install_for(name))) {
            log::debug!("the helper threads' seccomp hook was set by an earlier VM");
        }
    }
    // The API thread installs its filter through the hook set above.
    let _api_guard = match api_socket {
        Some(socket) => {
            let (bridge, guard) = crate::api::server::spawn(socket, runtime.clone())
                .map_err(|e| VmError::EventLoop(e.to_string()))?;
            subscribers.push(Arc::new(Mutex::new(bridge)));
            Some(guard)
        }
        None => None,
    };
    // The profiler thread installs its filter through the hook too; it signals the vCPU
    // threads once their ids are known.
    let _profiler_guard = match &profiler {
        Some(p) => {
            Some(crate::profiler::spawn(p.clone(), vcpu_tids.clone()).map_err(VmError::Thread)?)
        }
        None => None,
    };
    let telemetry = Telemetry::start(cfg, runtime.clone())?;

    let vcpu_filter = if cfg.seccomp {
        Some(seccomp::vcpu_filter()?)
    } else {
        None
    };
    let main_filter = if cfg.seccomp {
        Some(seccomp::main_filter()?)
    } else {
        None
    };

    // Event loop: guest console input and the exit signal.
    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
    events.add_subscriber(Arc::new(Mutex::new(stop_signals)));
    for s in subscribers {
        events.add_subscriber(s);
    }
    let stdin = io::stdin();
    // Guest console input from stdin, when stdin can be watched with epoll (a terminal,
    // pipe or socket; not /dev/null or a regular file, which epoll refuses with EPERM).
    let stdin_file = {
        // SAFETY: dup of fd 0; the File owns the new fd.
        let dup = unsafe { libc::dup(stdin.as_raw_fd()) };
        (dup >= 0)
            .then(|| unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) })
            .filter(stdin_is_pollable)
    };
    if let Some(f) = stdin_file {
        events.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
            serial.clone(),
            Box::new(f),
        ))));
    }
    let _raw = RawStdin::enter();

    let mut threads = Vec::new();
    for mut vcpu in vcpus {
        let filter = vcpu_filter.clone();
        let exit = exit.clone();
        let tids = vcpu_tids.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                let index = vcpu.index();
                set_current_vcpu(index);
                if let Some(slot) = tids.get(index as usize) {
                    // SAFETY: gettid has no side effects.
                    let tid = unsafe { libc::gettid() };
                    slot.store(tid, std::sync::atomic::Ordering::Release);
                }
                if let Some(f) = &filter {
                    if let Err(e) = seccomp::install("vCPU", f) {
                        exit.request(ExitReason::MonitorError(e.to_string()));
                        return;
                    }
                }
                // A panic here ends the run with a message and exit status 1 (the
                // main thread stops the VM), rather than leaving the guest half-alive.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()));
                if let Err(p) = ran {
                    exit.request(ExitReason::MonitorError(format!(
                        "vCPU {index} panicked: {}",
                        tuner::sandbox::panic_message(&*p)
                    )));
                }
            })
            .map_err(VmError::Thread)?;
        threads.push(handle);
    }
    log::info!("VM set up in {:?}", started.elapsed());
    // The vCPU threads' schedstat files (their run delay), opened before the filter.
    runtime.open_vcpu_schedstats(Duration::from_secs(1));
    if let Some(f) = &main_filter {
        seccomp::install("main", f)?;
    }

    let deadline = cfg
        .timeout_ms
        .map(|ms| (ms, started + Duration::from_millis(ms)));
    let outcome = loop {
        if let Some(reason) = exit.reason() {
            break RunOutcome::Stopped(reason);
        }
        let sig = signalled.load(std::sync::atomic::Ordering::Acquire);
        if sig != 0 {
            break RunOutcome::Signalled(sig);
        }
        let wait_ms = match deadline {
            Some((ms, at)) => {
                let now = Instant::now();
                if now >= at {
                    break RunOutcome::TimedOut(ms);
                }
                (at - now).as_millis().min(i32::MAX as u128) as i32 + 1
            }
            None => -1,
        };
        events
            .run_with_timeout(wait_ms)
            .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    };
    if let Ok(mut s) = serial.lock() {
        let _ = s.flush();
    }
    telemetry.stop();
    // The vCPU threads leave their cgroup (which is removed) before the process exits.
    runtime.release_cpu_quota();
    // `_api_guard` stops the API thread and removes the socket (if still ours) on return.
    // vCPU threads still inside KVM_RUN end with the process; the caller exits next.
    drop(threads);
    Ok(outcome)
}
