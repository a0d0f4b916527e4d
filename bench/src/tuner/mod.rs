//! `vmm-bench tuner`: tuner policies on the `phased` workload suite.
//!
//! Every scenario (`cpu-idle`, `io-contention`, `mixed` for training, `bursty` held out)
//! runs with N seeds under each policy: the best static configuration in hindsight (found
//! by a calibration sweep, see [`run`]), the `threshold` baseline, uniform `random`
//! actions, the `learned` ONNX policy (`models/general.onnx`, when present) and the
//! `online` learner (`vmm-learn online` beside the VM, when the binary is beside `vmm`). Each run is one `vmm`
//! process with its own state repository; the figures come from its rows and from the
//! kernel's phase lines. Outputs: `results.json`, `report.md` and PNG plots.

mod calibration;
mod compare;
mod intervals;
mod jobs;
mod phases;
pub mod plot;
pub mod report;
mod runner;
mod suite;
#[cfg(test)]
mod tests;

pub use calibration::*;
pub use compare::*;
pub use intervals::*;
pub use phases::*;
pub use runner::*;
pub use suite::*;
