//! One vCPU: its KVM run loop on its own thread, the dispatch of its exits to the device
//! buses, and the crash report when the guest does something KVM cannot go on from.

use std::sync::Arc;
use std::time::Instant;

use devices::{ExitReason, ExitSignal};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tuner::counters::ExitKind;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::profiler::SampleSlot;
use crate::vcpu_stats::VcpuStats;

/// Unhandled accesses logged in full per vCPU before the log thins out.
const UNHANDLED_LOG_FIRST: u64 = 10;
/// After the first few, one unhandled access in this many is logged.
const UNHANDLED_LOG_EVERY: u64 = 10_000;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Why a vCPU cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    Triple,
    InternalError,
    FailEntry(u64),
    Unexpected(String),
}

/// A vCPU ready to run: its KVM fd and what its exits reach.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    io: Arc<IoManager>,
    exit: ExitSignal,
    unhandled: u64,
    stats: Arc<VcpuStats>,
    count: bool,
    /// The guest profiler's hand-off, when the VM has a profiler.
    sample: Option<Arc<SampleSlot>>,
}

impl Vcpu {
    /// Wraps a configured vCPU fd.
    pub fn new(index: u32, fd: VcpuFd, io: Arc<IoManager>, exit: ExitSignal) -> Self {
        Self {
            index,
            fd,
            io,
            exit,
            unhandled: 0,
            stats: Arc::new(VcpuStats::default()),
            count: true,
            sample: None,
        }
    }

    /// This vCPU's live counters.
    pub fn stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// Turns the run-loop counters off (only to measure what they cost).
    pub fn set_counting(&mut self, on: bool) {
        self.count = on;
    }

    /// Connects the vCPU to the guest profiler (`crate::profiler`).
    pub fn set_sample_slot(&mut self, slot: Option<Arc<SampleSlot>>) {
        self.sample = slot;
    }

    /// This vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Runs the guest until the VM is asked to stop or this vCPU faults.
    pub fn run(&mut self) {
        if self.sample.is_some() {
            // The profiler's signal handler sets this byte so that KVM_RUN returns at once.
            let byte: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
            crate::profiler::set_immediate_exit_target(byte);
        }
        while !self.exit.is_requested() {
            if let Err(fault) = self.run_once() {
                let report = self.crash_report(&fault);
                self.exit.request(ExitReason::Crash(report));
                break;
            }
        }
        // The kvm_run mapping goes with the vCPU fd: a profiler signal arriving after
        // this must not write to it.
        crate::profiler::set_immediate_exit_target(std::ptr::null_mut());
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Result<(), Fault> {
        let io = &self.io;
        let index = self.index;
        let unhandled = &mut self.unhandled;
        let mut note_unhandled = |what: &str, addr: u64, len: usize| {
            *unhandled += 1;
            let n = *unhandled;
            if n <= UNHANDLED_LOG_FIRST || n.is_multiple_of(UNHANDLED_LOG_EVERY) {
                log::warn!(
                    "vCPU {index}: guest {what} at {addr:#x} ({len} bytes) has no device; ignored ({n} so far)"
                );
            }
        };
        let count = self.count;
        let stats = &self.stats;
        let entered = if count { Some(Instant::now()) } else { None };
        let mut kind = ExitKind::Other;
        let mut left = None;
        let result = match self.fd.run() {
            Ok(exit) => {
                if let Some(t) = entered {
                    left = Some((Instant::now(), t));
                }
                match exit {
                    VcpuExit::IoOut(port, data) => {
                        kind = ExitKind::IoOut;
                        if io.pio_write(PioAddress(port), data).is_err() {
                            note_unhandled("port write", u64::from(port), data.len());
                        }
                        Ok(())
                    }
                    VcpuExit::IoIn(port, data) => {
                        kind = ExitKind::IoIn;
                        if io.pio_read(PioAddress(port), data).is_err() {
                            data.fill(0xff);
                            note_unhandled("port read", u64::from(port), data.len());
                        }
                        Ok(())
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        kind = ExitKind::MmioWrite;
                        if io.mmio_write(MmioAddress(addr), data).is_err() {
                            note_unhandled("MMIO write", addr, data.len());
                        }
                        Ok(())
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        kind = ExitKind::MmioRead;
                        if io.mmio_read(MmioAddress(addr), data).is_err() {
                            data.fill(0xff);
                            note_unhandled("MMIO read", addr, data.len());
                        }
                        Ok(())
                    }
                    VcpuExit::Shutdown => {
                        kind = ExitKind::Shutdown;
                        Err(Fault::Triple)
                    }
                    VcpuExit::InternalError => {
                        kind = ExitKind::InternalError;
                        Err(Fault::InternalError)
                    }
                    VcpuExit::FailEntry(reason, _cpu) => Err(Fault::FailEntry(reason)),
                    VcpuExit::SystemEvent(kind, _) => {
                        match kind {
                            KVM_SYSTEM_EVENT_RESET => self.exit.request(ExitReason::Reset),
                            KVM_SYSTEM_EVENT_SHUTDOWN => {
                                self.exit.request(ExitReason::GuestExit(0))
                            }
                            other => {
                                return Err(Fault::Unexpected(format!("system event {other}")));
                            }
                        }
                        Ok(())
                    }
                    VcpuExit::Hlt => {
                        kind = ExitKind::Hlt;
                        // With the in-kernel irqchip KVM handles HLT itself; if it comes here the
                        // vCPU would spin, so park it.
                        log::info!("vCPU {index}: halted");
                        self.exit.request(ExitReason::GuestExit(0));
                        Ok(())
                    }
                    VcpuExit::Intr => {
                        kind = ExitKind::Interrupted;
                        Ok(())
                    }
                    other => Err(Fault::Unexpected(format!("{other:?}"))),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                kind = ExitKind::Interrupted;
                Ok(())
            }
            Err(e) => Err(Fault::Unexpected(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(slot) = &self.sample {
            // Cleared before the check: a signal landing after it forces one more
            // (harmless) exit; one landing before it is seen here.
            self.fd.set_kvm_immediate_exit(0);
            if slot.wanted() {
                match self.fd.get_regs() {
                    Ok(regs) => slot.record(regs.rip),
                    Err(e) => log::debug!("vCPU {index}: no registers for a sample: {e}"),
                }
            }
        }
        if count {
            stats.count_exit(kind);
            if let Some((left, entered)) = left {
                let guest = left.duration_since(entered).as_nanos() as u64;
                // Time blocked in a park or idle request is neither guest nor monitor work.
                let monitor = (left.elapsed().as_nanos() as u64)
                    .saturating_sub(devices::vcpu_control::take_blocked_ns());
                stats.add_times(guest, monitor);
            }
        }
        result
    }

    /// One line naming the vCPU, the reason and the registers.
    fn crash_report(&mut self, fault: &Fault) -> String {
        let reason = match fault {
            Fault::Triple => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Fault::FailEntry(r) => format!("VM entry failed (hardware reason {r:#x})"),
            Fault::Unexpected(s) => format!("unexpected exit: {s}"),
            Fault::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union for this exit.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let words: Vec<String> = internal.data[..n]
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect();
                format!(
                    "KVM internal error, suberror {} ({}), data [{}]",
                    internal.suberror,
                    match internal.suberror {
                        1 => "emulation failure",
                        2 => "simultaneous exception",
                        3 => "delivery event",
                        _ => "other",
                    },
                    words.join(" ")
                )
            }
        };
        let regs = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi,
                s.cs.selector, s.cs.dpl, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        };
        format!("vCPU {}: {reason}; {regs}", self.index)
    }
}
