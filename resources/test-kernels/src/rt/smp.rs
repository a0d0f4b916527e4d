//! vCPU facts recorded at CPL 0, per-vCPU done flags, a barrier, a spinlock and `park`.
//!
//! Multi-entry kernels start every vCPU at `_start`; each then runs `kmain(cpu)`
//! concurrently. vCPUs may start at slightly different times, so use [`barrier`] when
//! work must overlap, and [`set_done`] / [`wait_all_done`] to let vCPU 0 wait for the
//! others before it prints a summary and exits.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::boot::{APIC_IDS, MAX_CPUS, STACK_SIZE, VCPU_COUNT};

extern "C" {
    /// Start of the per-vCPU stack array (defined in `boot.rs`).
    static rt_stacks: u8;
}

/// Number of vCPUs (from `cpuid` leaf 1 at CPL 0), clamped to `1..=MAX_CPUS`.
pub fn cpu_count() -> usize {
    (VCPU_COUNT.load(Ordering::Relaxed) as usize).clamp(1, MAX_CPUS)
}

/// Initial APIC id of vCPU `cpu` (from `cpuid` leaf 1 at CPL 0).
pub fn apic_id(cpu: usize) -> u32 {
    APIC_IDS[cpu].load(Ordering::Relaxed)
}

/// Index of the calling vCPU, derived from which per-vCPU stack `RSP` lies in.
pub fn current_cpu() -> usize {
    let sp: usize;
    // SAFETY: reads RSP only.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    let base = core::ptr::addr_of!(rt_stacks) as usize;
    (sp.wrapping_sub(base) / STACK_SIZE).min(MAX_CPUS - 1)
}

/// Spins forever at CPL 3 (`hlt` would fault at CPL 3). For vCPUs with nothing to do.
pub fn park() -> ! {
    loop {
        spin_loop();
    }
}

static DONE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Marks vCPU `cpu` as done (release: its earlier writes are visible to waiters).
pub fn set_done(cpu: usize) {
    DONE[cpu].store(true, Ordering::Release);
}

/// Whether vCPU `cpu` has called [`set_done`].
pub fn is_done(cpu: usize) -> bool {
    DONE[cpu].load(Ordering::Acquire)
}

/// How many of the vCPUs `0..cpu_count()` are done.
pub fn done_count() -> usize {
    (0..cpu_count()).filter(|&c| is_done(c)).count()
}

/// Spins until every vCPU `0..cpu_count()` is done.
pub fn wait_all_done() {
    while done_count() < cpu_count() {
        spin_loop();
    }
}

static BARRIER_COUNT: AtomicU32 = AtomicU32::new(0);
static BARRIER_GEN: AtomicU32 = AtomicU32::new(0);

/// Waits until all `cpu_count()` vCPUs have reached this barrier. Reusable.
pub fn barrier() {
    let generation = BARRIER_GEN.load(Ordering::Acquire);
    if BARRIER_COUNT.fetch_add(1, Ordering::AcqRel) + 1 == cpu_count() as u32 {
        BARRIER_COUNT.store(0, Ordering::Relaxed);
        BARRIER_GEN.fetch_add(1, Ordering::Release);
    } else {
        while BARRIER_GEN.load(Ordering::Acquire) == generation {
            spin_loop();
        }
    }
}

/// A minimal test-and-set spinlock protecting a `T` (for shared driver state).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// Creates an unlocked spinlock holding `value`.
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Spins until the lock is free, then returns a guard giving access to the value.
    pub fn lock(&self) -> SpinLockGuard<'_, T> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spin_loop();
        }
        SpinLockGuard { lock: self }
    }
}

/// Access to a [`SpinLock`]'s value; unlocks when dropped.
pub struct SpinLockGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}
