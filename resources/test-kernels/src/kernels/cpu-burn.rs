//! `cpu-burn`: parameter `ms=N` (default 1000). All vCPUs meet at a barrier, then each
//! spins for N ms on a cheap integer loop body, counting iterations, and prints
//! `cpu <i> iterations <k>`. vCPU 0 waits for all, prints
//! `cpu-burn: cpus=<count> ms=<N> iterations=<total>` and exits 0.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

static ITERATIONS: [AtomicU64; rt::MAX_CPUS] = [const { AtomicU64::new(0) }; rt::MAX_CPUS];

/// Loop iterations between two TSC reads.
const BATCH: u64 = 1024;

fn kmain(cpu: usize) -> ! {
    let ms = rt::arg_u64("ms", 1000);
    rt::barrier();
    let iterations = burn(ms);
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

/// Runs the loop body for `ms` milliseconds of TSC time; returns the iteration count.
fn burn(ms: u64) -> u64 {
    let deadline = rt::rdtsc().saturating_add(ms.saturating_mul(rt::tsc_khz()));
    let mut x: u64 = 1;
    let mut iterations = 0;
    loop {
        for _ in 0..BATCH {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        iterations += BATCH;
        if rt::rdtsc() >= deadline {
            return iterations;
        }
    }
}
