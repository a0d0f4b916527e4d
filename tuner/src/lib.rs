//! The built-in tuner of the `vmm` monitor.
//!
//! - [`counters`]: plain snapshots of the monitor's counters and the [`counters::CounterSource`]
//!   trait through which the monitor exposes them.
//!
//! The policy, configuration manager and state repository land with later issues; the
//! monitor reaches the tuner only through narrow traits, so everything here can be tested
//! against a fake monitor.

pub mod counters;
