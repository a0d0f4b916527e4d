//! The physical limit of a port-I/O exit round trip here: a bare kvm-ioctls loop.
//!
//! One VM, one vCPU, the kernel loaded with the `vmm` library's own boot functions (so the
//! guest starts in exactly the state `vmm` gives it, with the same CPUID table), and a run
//! loop with nothing in it but a `match` on the exit: bytes written to the serial port are
//! collected, a write to the debug-exit port ends the run, everything else is ignored. No
//! device bus, no locks, no event loop, no seccomp: what is left is KVM's own cost of going
//! out to user space and back.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit};
use vmm::boot::long_mode;
use vmm::cpuid::{self, VcpuTopology};
use vmm::VmConfig;

/// Address of the TSS pages KVM needs on Intel hosts (as `vmm` uses).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// COM1's data register: the test kernels print through it, one exit per byte.
const SERIAL_PORT: u16 = 0x3f8;
/// Debug-exit port: a write ends the run with the written value as the status.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// POST port: the exits being measured.
const POST_PORT: u16 = 0x80;
/// Signal that interrupts `KVM_RUN` when the run overruns its time.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

/// Errors of the bare loop.
#[derive(Debug, thiserror::Error)]
pub enum BareError {
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's reason.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The VM could not be set up with the `vmm` library.
    #[error("set-up: {0}")]
    Setup(String),
    /// The guest stopped in a way a benchmark kernel should not.
    #[error("the guest stopped unexpectedly: {0}")]
    Guest(String),
    /// The run overran its time.
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    /// The vCPU thread could not be started or died.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

/// What one bare run gave.
#[derive(Debug, Clone)]
pub struct BareRun {
    /// The bytes the guest wrote to the serial port.
    pub serial: Vec<u8>,
    /// The value the guest wrote to the debug-exit port.
    pub exit_code: u32,
    /// Port writes to 0x80 (the measured exits).
    pub post_exits: u64,
    /// All exits to this loop.
    pub exits: u64,
    /// Wall time from VM creation to the debug exit.
    pub wall: Duration,
    /// Time `KVM_SET_USER_MEMORY_REGION` took for guest RAM.
    pub register_memory: Duration,
    /// From VM creation to the first serial byte.
    pub first_serial: Option<Duration>,
    /// From VM creation to the VM's teardown (vCPU, VM and guest memory released).
    pub end: Duration,
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs a do-nothing handler for [`KICK_SIGNAL`] without `SA_RESTART`, so that the
/// signal makes `KVM_RUN` return `EINTR`.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler address and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut());
        }
    });
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BareError {
    move |source| BareError::Kvm { what, source }
}

/// Boots `kernel` with `cmdline` in `mem_mib` MiB and runs it to its debug exit on the
/// calling thread. `stop` is checked whenever `KVM_RUN` is interrupted.
fn run_here(
    kernel: &Path,
    cmdline: &str,
    mem_mib: u64,
    stop: &AtomicBool,
) -> Result<BareRun, BareError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    // `setup_vcpu` programs the local APIC, which needs the in-kernel irqchip.
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;

    let mut cfg = VmConfig::new(kernel);
    cfg.cmdline = cmdline.to_string();
    cfg.mem_mib = mem_mib;
    let format = cfg
        .validate(kvm.get_max_vcpus() as u32, vmm::config::host_mem_mib())
        .map_err(|e| BareError::Setup(e.to_string()))?;
    let mem =
        vmm::memory::create_guest_memory(mem_mib).map_err(|e| BareError::Setup(e.to_string()))?;
    let t_reg = Instant::now();
    vmm::memory::register_with_kvm(&vm, &mem, false)
        .map_err(|e| BareError::Setup(e.to_string()))?;
    let register_memory = t_reg.elapsed();
    let info = vmm::boot::load(&mem, &cfg, format).map_err(|e| BareError::Setup(e.to_string()))?;
    long_mode::write_boot_tables(&mem).map_err(|e| BareError::Setup(e.to_string()))?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its supported CPUID"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let table = cpuid::filter(
        &supported,
        VcpuTopology {
            index: 0,
            count: 1,
            tsc_khz,
        },
    )
    .map_err(|e| BareError::Setup(e.to_string()))?;
    vcpu.set_cpuid2(&table)
        .map_err(kvm_err("set the vCPU's CPUID"))?;
    long_mode::setup_vcpu(&vcpu, info.entry, 0).map_err(|e| BareError::Setup(e.to_string()))?;

    let mut serial = Vec::new();
    let mut first_serial = None;
    let mut post_exits = 0u64;
    let mut exits = 0u64;
    let exit_code = loop {
        match vcpu.run() {
            Ok(exit) => {
                exits += 1;
                match exit {
                    VcpuExit::IoOut(POST_PORT, _) => post_exits += 1,
                    VcpuExit::IoOut(SERIAL_PORT, data) => {
                        if first_serial.is_none() {
                            first_serial = Some(started.elapsed());
                        }
                        serial.extend_from_slice(data)
                    }
                    VcpuExit::IoOut(DEBUG_EXIT_PORT, data) => {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        break u32::from_le_bytes(v);
                    }
                    VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::Intr => {}
                    VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => data.fill(0xff),
                    other => return Err(BareError::Guest(format!("{other:?}"))),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if stop.load(Ordering::SeqCst) {
                    return Err(BareError::Timeout(started.elapsed()));
                }
            }
            Err(e) => return Err(BareError::Guest(format!("KVM_RUN failed: {e}"))),
        }
    };
    let wall = started.elapsed();
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(BareRun {
        serial,
        exit_code,
        post_exits,
        exits,
        wall,
        register_memory,
        first_serial,
        end: started.elapsed(),
    })
}

/// Boots `kernel` with `cmdline` in a bare VM of `mem_mib` MiB and runs it to its debug
/// exit on a fresh thread; gives up after `timeout`.
pub fn run(
    kernel: &Path,
    cmdline: &str,
    mem_mib: u64,
    timeout: Duration,
) -> Result<BareRun, BareError> {
    install_kick_handler();
    let stop = Arc::new(AtomicBool::new(false));
    // Holds the vCPU thread's pthread id while it may be signalled; None once it is done.
    let target: Arc<Mutex<Option<libc::pthread_t>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::channel();
    let kernel = kernel.to_path_buf();
    let cmdline = cmdline.to_string();
    let (stop2, target2) = (stop.clone(), target.clone());
    let handle = std::thread::Builder::new()
        .name("bare-vcpu".into())
        .spawn(move || {
            if let Ok(mut t) = target2.lock() {
                // SAFETY: pthread_self has no preconditions.
                *t = Some(unsafe { libc::pthread_self() });
            }
            let result = run_here(&kernel, &cmdline, mem_mib, &stop2);
            if let Ok(mut t) = target2.lock() {
                *t = None;
            }
            let _ = tx.send(result);
        })
        .map_err(|e| BareError::Thread(e.to_string()))?;

    let deadline = Instant::now() + timeout;
    let result = loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50));
        match rx.recv_timeout(wait) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(BareError::Thread("the vCPU thread died".into()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Kick until the thread notices (a signal between two KVM_RUNs is lost).
                stop.store(true, Ordering::SeqCst);
                if let Ok(t) = target.lock() {
                    if let Some(tid) = *t {
                        // SAFETY: the thread is alive while `target` holds its id.
                        unsafe { libc::pthread_kill(tid, KICK_SIGNAL) };
                    }
                }
            }
        }
    };
    let _ = handle.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_hello_in_the_bare_loop() {
        let kernel = test_kernels::kernel_path("hello");
        let r = run(&kernel, "", 128, Duration::from_secs(60)).expect("bare run");
        assert_eq!(
            String::from_utf8_lossy(&r.serial),
            "Hello from test kernel\n"
        );
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.post_exits, 0);
        assert!(r.exits > 23);
    }

    #[test]
    fn gives_up_on_a_spinning_guest() {
        let kernel = test_kernels::kernel_path("bad-loop");
        let r = run(&kernel, "", 128, Duration::from_millis(300));
        assert!(matches!(r, Err(BareError::Timeout(_))), "{r:?}");
    }
}
