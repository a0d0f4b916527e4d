//! CPU work for the kernels that burn cycles (`cpu-burn`, `phased`): a cheap integer loop
//! body whose iterations the caller counts.

use core::hint::black_box;

/// Loop iterations in one [`burn_batch`] (kernels read the TSC between batches).
pub const BATCH: u64 = 1024;

/// Runs [`BATCH`] iterations of the loop body (a `black_box`ed LCG step, so the compiler
/// can neither fold nor vectorise it) from state `x`; returns the new state.
#[inline(always)]
pub fn burn_batch(mut x: u64) -> u64 {
    for _ in 0..BATCH {
        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
    x
}
