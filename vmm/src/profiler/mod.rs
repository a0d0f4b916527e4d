//! The guest profiler: samples each vCPU's instruction pointer at a rate set at start
//! (`--profile-hz`) or at run time (`PUT /profile`), and counts the samples per function
//! of the guest kernel's own symbols ([`symbols`]). Needs nothing from the guest.
//!
//! How a sample is taken, and why this way: the `vmm-profiler` thread, every 1/hz
//! seconds, marks each vCPU's [`SampleSlot`] as wanted and sends the vCPU thread a
//! real-time signal (`tgkill`). The signal's handler only sets the thread's `kvm_run`
//! `immediate_exit` byte, so `KVM_RUN` returns `EINTR` at once whether the signal lands
//! inside the ioctl or just before it (no lost wake-up). At its next exit of any kind
//! (the forced one, or one the guest took anyway) the vCPU thread sees the mark, reads
//! `rip` with `KVM_GET_REGS` and stores it in its slot: one atomic store, no lock, no
//! allocation, no device work. The profiler thread then symbolizes the stored
//! addresses (a binary search) and counts them, off the vCPU threads. This costs one
//! forced exit and one ioctl per vCPU per sample (no hardware performance counters on
//! these hosts, so no PMU overflow interrupts to ride on); each vCPU holds at most one
//! sample in flight, so memory is bounded by the symbol table and one counter per
//! function.
//!
//! Outputs: `GET /profile` (per-function counts, JSON), `vmm profile` (folded stacks
//! and an SVG flame graph through `inferno`, [`flame`]), and per-interval shares of
//! idle, I/O, compute and the hottest function in every sample of the tuner's agent
//! (`tuner::guest_profile`).

pub mod flame;
pub mod symbols;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tuner::guest_profile::{CodeClass, FunctionCount, ProfileCounters};

pub use symbols::{SymbolError, SymbolTable};

/// Highest sampling rate per vCPU (each sample is a forced exit, ~30 us here).
pub const MAX_HZ: u32 = 10_000;
/// Slot value meaning "no sample stored".
const EMPTY: u64 = u64::MAX;
/// Name of the profiler thread (its seccomp role is `profiler`).
pub const THREAD_NAME: &str = "vmm-profiler";

/// Why a profiler setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfilerError {
    /// The rate is outside 1..=[`MAX_HZ`] (0 is "off" only where allowed).
    #[error("{0} Hz is outside 1..={MAX_HZ} (0 turns the profiler off)")]
    BadRate(u64),
    /// The signal handler could not be installed.
    #[error("cannot install the profiler's signal handler: {0}")]
    Signal(String),
}

/// Checks a rate: 0 (off) or 1..=[`MAX_HZ`].
pub fn check_hz(hz: u64) -> Result<u32, ProfilerError> {
    if hz > u64::from(MAX_HZ) {
        return Err(ProfilerError::BadRate(hz));
    }
    Ok(hz as u32)
}

/// One vCPU's hand-off with the profiler: a request flag and the last address.
#[derive(Debug)]
pub struct SampleSlot {
    wanted: AtomicBool,
    rip: AtomicU64,
}

impl Default for SampleSlot {
    fn default() -> Self {
        Self {
            wanted: AtomicBool::new(false),
            rip: AtomicU64::new(EMPTY),
        }
    }
}

impl SampleSlot {
    /// Whether the profiler asked for a sample (a relaxed load: checked after every exit).
    #[inline]
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// Stores the vCPU's instruction pointer and clears the request (vCPU thread).
    pub fn record(&self, rip: u64) {
        self.rip.store(rip, Ordering::Release);
        self.wanted.store(false, Ordering::Relaxed);
    }

    fn take(&self) -> Option<u64> {
        let rip = self.rip.swap(EMPTY, Ordering::Acquire);
        (rip != EMPTY).then_some(rip)
    }
}

/// Counts kept by the profiler thread and read by the API and the sampler.
#[derive(Debug, Default)]
struct Counts {
    /// Per symbol index, then one last slot for addresses no symbol covers.
    per_function: Vec<u64>,
    /// Symbol indices in order of first sample (so earlier lists are prefixes).
    order: Vec<u32>,
    /// Samples in total.
    samples: u64,
}

/// The profiler's shared state.
#[derive(Debug)]
pub struct Profiler {
    hz: AtomicU32,
    wake: Condvar,
    gate: Mutex<()>,
    slots: Vec<Arc<SampleSlot>>,
    symbols: SymbolTable,
    counts: Mutex<Counts>,
    /// Samples asked for that no vCPU delivered before the next tick (a parked vCPU, or
    /// one the host did not schedule in time).
    missed: AtomicU64,
    /// Where the symbols came from.
    source: String,
}

/// One function's count in a profile report.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionReport {
    /// Function name (`[unknown]` for addresses no symbol covers).
    pub name: String,
    /// Its class.
    pub class: CodeClass,
    /// Samples in it.
    pub count: u64,
}

/// Name used for addresses outside every symbol.
pub const UNKNOWN: &str = "[unknown]";

impl Profiler {
    /// A profiler for `vcpus` vCPUs with `symbols` (from `source`), sampling at `hz`
    /// (0: off until `set_hz`).
    pub fn new(vcpus: u32, symbols: SymbolTable, source: String, hz: u32) -> Self {
        let n = symbols.len();
        Self {
            hz: AtomicU32::new(hz),
            wake: Condvar::new(),
            gate: Mutex::new(()),
            slots: (0..vcpus)
                .map(|_| Arc::new(SampleSlot::default()))
                .collect(),
            symbols,
            counts: Mutex::new(Counts {
                per_function: vec![0; n + 1],
                ..Counts::default()
            }),
            missed: AtomicU64::new(0),
            source,
        }
    }

    /// The slot of vCPU `index`.
    pub fn slot(&self, index: u32) -> Option<Arc<SampleSlot>> {
        self.slots.get(index as usize).cloned()
    }

    /// The rate in force (0: off).
    pub fn hz(&self) -> u32 {
        self.hz.load(Ordering::Relaxed)
    }

    /// Changes the rate (0 stops sampling); wakes the profiler thread.
    pub fn set_hz(&self, hz: u64) -> Result<u32, ProfilerError> {
        let hz = check_hz(hz)?;
        self.hz.store(hz, Ordering::Relaxed);
        let _g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
        Ok(hz)
    }

    /// Where the symbols came from and how many there are.
    pub fn symbol_source(&self) -> (&str, usize) {
        (&self.source, self.symbols.len())
    }

    /// Samples asked for and not delivered before the next tick.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn name_and_class(&self, index: usize) -> (String, CodeClass) {
        match self.symbols.get(index) {
            Some(s) => (s.name.clone(), s.class),
            None => (UNKNOWN.to_string(), CodeClass::Compute),
        }
    }

    /// Counts one sampled address.
    fn count(&self, rip: u64) {
        let index = self.symbols.lookup(rip).unwrap_or(self.symbols.len());
        let mut c = self.counts();
        if let Some(n) = c.per_function.get_mut(index) {
            if *n == 0 {
                c.order.push(index as u32);
            }
            if let Some(n) = c.per_function.get_mut(index) {
                *n += 1;
            }
            c.samples += 1;
        }
    }

    /// Total samples and every sampled function, most samples first.
    pub fn report(&self) -> (u64, Vec<FunctionReport>) {
        let (samples, pairs): (u64, Vec<(usize, u64)>) = {
            let c = self.counts();
            (
                c.samples,
                c.order
                    .iter()
                    .map(|&i| (i as usize, c.per_function[i as usize]))
                    .collect(),
            )
        };
        let mut out: Vec<FunctionReport> = pairs
            .into_iter()
            .map(|(i, count)| {
                let (name, class) = self.name_and_class(i);
                FunctionReport { name, class, count }
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
        (samples, out)
    }

    /// The cumulative counts for the tuner's snapshot.
    pub fn counters(&self) -> ProfileCounters {
        let c = self.counts();
        let functions = c
            .order
            .iter()
            .map(|&i| FunctionCount {
                class: self
                    .symbols
                    .get(i as usize)
                    .map_or(CodeClass::Compute, |s| s.class),
                count: c.per_function[i as usize],
            })
            .collect();
        ProfileCounters {
            hz: self.hz(),
            functions,
        }
    }

    /// The profiler thread's body: until `stop`, one tick every 1/hz s (asleep while
    /// off).
    fn run(&self, tids: &[AtomicI32], stop: &AtomicBool) {
        let pid = std::process::id() as libc::pid_t;
        let signal = profile_signal();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let hz = self.hz();
            if hz == 0 {
                // Off: collect what the last tick asked for, then sleep until a rate is
                // set (checked every second for the stop flag).
                self.collect(false);
                let g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = self
                    .wake
                    .wait_timeout_while(g, Duration::from_secs(1), |_| {
                        self.hz() == 0 && !stop.load(Ordering::Relaxed)
                    });
                next = Instant::now();
                continue;
            }
            // The previous tick's samples first, then ask for the next ones.
            self.collect(true);
            for (slot, tid) in self.slots.iter().zip(tids) {
                let tid = tid.load(Ordering::Acquire);
                if tid <= 0 {
                    continue;
                }
                slot.wanted.store(true, Ordering::Relaxed);
                // SAFETY: tgkill to a thread of this process with a signal whose handler
                // is installed ([`install_signal_handler`]); no memory is passed.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
            }
            let period = Duration::from_nanos(1_000_000_000 / u64::from(hz));
            next += period;
            let now = Instant::now();
            if next <= now {
                // Fell behind (host busy): restart the schedule rather than burst.
                next = now + period;
            }
            let g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = self.wake.wait_timeout_while(
                g,
                next.saturating_duration_since(Instant::now()),
                |_| self.hz() == hz && !stop.load(Ordering::Relaxed),
            );
        }
    }

    /// Counts the samples the vCPUs stored; `count_missed`: a slot still wanted is a miss.
    fn collect(&self, count_missed: bool) {
        for slot in &self.slots {
            match slot.take() {
                Some(rip) => self.count(rip),
                None if count_missed && slot.wanted() => {
                    self.missed.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
    }
}

/// Stops the profiler thread when dropped.
pub struct ProfilerGuard {
    stop: Arc<AtomicBool>,
    profiler: Arc<Profiler>,
}

impl Drop for ProfilerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _g = self
            .profiler
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.profiler.wake.notify_all();
    }
}

/// Starts the `vmm-profiler` thread (its seccomp filter through `tuner::sandbox`).
pub fn spawn(profiler: Arc<Profiler>, tids: Arc<Vec<AtomicI32>>) -> std::io::Result<ProfilerGuard> {
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s) = (profiler.clone(), stop.clone());
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            tuner::sandbox::run_helper(THREAD_NAME, || p.run(&tids, &s));
        })?;
    Ok(ProfilerGuard { stop, profiler })
}

/// The real-time signal that interrupts a vCPU's `KVM_RUN` for a sample (SIGRTMIN; std
/// and this monitor use no other real-time signal).
pub fn profile_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte (null on threads without a vCPU).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Registers this vCPU thread's `immediate_exit` byte for the signal handler. The
/// pointer is into the vCPU's `kvm_run` mapping, which lives as long as the vCPU fd,
/// which outlives the thread's run loop.
pub fn set_immediate_exit_target(byte: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(byte));
}

extern "C" fn on_profile_signal(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // Async-signal-safe: a const-initialised thread local and one volatile byte store.
    let _ = IMMEDIATE_EXIT.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            // SAFETY: set by this thread's run loop to its own kvm_run byte, valid while
            // the loop runs; the signal only reaches vCPU threads.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Installs the handler of [`profile_signal`] (process-wide; before the threads start
/// and before any seccomp filter). `SA_RESTART`: other calls a vCPU thread makes are
/// restarted; `KVM_RUN` is not restartable and returns `EINTR`.
pub fn install_signal_handler() -> Result<(), ProfilerError> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the right
    // signature; sigemptyset and sigaction get valid pointers.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_profile_signal as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(profile_signal(), &act, std::ptr::null_mut()) != 0 {
            return Err(ProfilerError::Signal(
                std::io::Error::last_os_error().to_string(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_outside_the_range_are_refused() {
        assert_eq!(check_hz(0), Ok(0));
        assert_eq!(check_hz(100), Ok(100));
        assert_eq!(check_hz(u64::from(MAX_HZ)), Ok(MAX_HZ));
        assert_eq!(
            check_hz(u64::from(MAX_HZ) + 1),
            Err(ProfilerError::BadRate(u64::from(MAX_HZ) + 1))
        );
    }

    #[test]
    fn samples_are_counted_per_function_in_order_of_first_sight() {
        let p = Profiler::new(2, SymbolTable::default(), "none".into(), 0);
        let slot = p.slot(0).expect("slot");
        slot.wanted.store(true, Ordering::Relaxed);
        slot.record(0x1234);
        assert!(!slot.wanted());
        p.collect(true);
        p.collect(true);
        let (samples, fns) = p.report();
        assert_eq!(samples, 1);
        assert_eq!(fns.len(), 1);
        assert_eq!(fns[0].name, UNKNOWN);
        assert_eq!(p.counters().functions[0].count, 1);
        // A wanted slot with nothing stored is a miss.
        p.slot(1)
            .expect("slot")
            .wanted
            .store(true, Ordering::Relaxed);
        p.collect(true);
        assert_eq!(p.missed(), 1);
    }
}
