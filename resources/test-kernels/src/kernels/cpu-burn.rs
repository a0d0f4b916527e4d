//! `cpu-burn`: parameter `ms=N` (default 1000). All vCPUs meet at a barrier, then each
//! spins for N ms on a cheap integer loop body, counting iterations, and prints
//! `cpu <i> iterations <k>`. vCPU 0 waits for all, prints
//! `cpu-burn: cpus=<count> ms=<N> iterations=<total>` and exits 0.
//!
//! vCPU control: every `ctl_ms=N` ms (default 10, 0 = never) each vCPU reads how many
//! vCPUs the monitor asks the guest to use (`rt::vcpu_control`); a vCPU at or above that
//! count parks (its thread blocks in the monitor) until it is wanted again. The burn
//! deadline is wall-clock TSC time, so parked time does no work: iterations per second
//! follow the active vCPU count.
//!
//! Metrics: each vCPU reports its iterations as ops (bytes 0, no latency samples) to its
//! own slot of the metrics device (`rt::metrics`) every `report_ms=N` ms (default 50,
//! 0 = never), and once more with the final count before printing its line.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::sync::atomic::{AtomicU64, Ordering};

use rt::metrics::Reporter;
use rt::work::{burn_batch, BATCH};

static ITERATIONS: [AtomicU64; rt::MAX_CPUS] = [const { AtomicU64::new(0) }; rt::MAX_CPUS];

fn kmain(cpu: usize) -> ! {
    let ms = rt::arg_u64("ms", 1000);
    // Probes the metrics device (first vCPU only) before the timed part starts.
    let mut reporter = Reporter::from_cmdline(cpu, rt::rdtsc());
    rt::barrier();
    let iterations = burn(cpu, ms, &mut reporter);
    if cpu == 0 && rt::arg_u64("ctl_ms", 10) != 0 {
        // Workers still parked past the deadline must come back to finish.
        rt::vcpu_control::release_all();
    }
    reporter.report(iterations, 0, 0, 0);
    ITERATIONS[cpu].store(iterations, Ordering::Relaxed);
    println!("cpu {} iterations {}", cpu, iterations);
    rt::set_done(cpu);
    if cpu != 0 {
        rt::park();
    }
    rt::wait_all_done();
    let total: u64 = (0..rt::cpu_count())
        .map(|c| ITERATIONS[c].load(Ordering::Relaxed))
        .sum();
    println!(
        "cpu-burn: cpus={} ms={} iterations={}",
        rt::cpu_count(),
        ms,
        total
    );
    rt::exit(0)
}

/// Runs the loop body for `ms` milliseconds of TSC time, reporting the running count
/// through `reporter` when due; returns the iteration count.
// Not inlined, so that the profiler names the loop (`cpu_burn::burn`) rather than `kmain`.
#[inline(never)]
fn burn(cpu: usize, ms: u64, reporter: &mut Reporter) -> u64 {
    let start = rt::rdtsc();
    reporter.last = start;
    let deadline = start.saturating_add(ms.saturating_mul(rt::tsc_khz()));
    let ctl_every = rt::arg_u64("ctl_ms", 10).saturating_mul(rt::tsc_khz());
    let mut next_ctl = start.saturating_add(ctl_every);
    let mut x: u64 = 1;
    let mut iterations = 0;
    loop {
        x = burn_batch(x);
        iterations += BATCH;
        let now = rt::rdtsc();
        if now >= deadline {
            return iterations;
        }
        reporter.maybe_report(now, iterations, 0, 0, 0);
        if ctl_every != 0 && now >= next_ctl {
            while (cpu as u64) >= u64::from(rt::vcpu_control::active()) && rt::rdtsc() < deadline {
                // Report before sleeping so the monitor sees an up-to-date count.
                reporter.report(iterations, 0, 0, 0);
                rt::vcpu_control::park(cpu);
            }
            next_ctl = rt::rdtsc().saturating_add(ctl_every);
        }
    }
}
