//! The built-in tuner of the `vmm` monitor.
//!
//! - [`counters`]: plain snapshots of the monitor's counters and the [`counters::CounterSource`]
//!   trait through which the monitor exposes them.
//! - [`schema`]: the versioned performance vector schema (feature names, units,
//!   normalisation), printable and serialisable for model cards.
//! - [`agent`]: the sampling agent turning counter snapshots into performance vectors every
//!   interval and feeding them to sinks.
//! - [`state_repo`]: the state repository (SQLite, WAL) of vectors, actions, rewards and
//!   events, with retention and CSV/Parquet export.
//! - [`anomaly`]: a rolling EWMA z-score anomaly detector over the vector.
//! - [`prometheus`]: the counters in the Prometheus text format and a tiny `/metrics`
//!   HTTP server.
//! - [`actions`]: the versioned action list, rate-limit ladders and action masks.
//! - [`reward`]: the reward formula and its weights.
//! - [`slo`]: a VM's service level objectives and their attainment per interval.
//! - [`forecast`]: Holt's linear-trend one-step forecast of the vector.
//! - [`guest_profile`]: the guest profiler's counts and per-interval shares (idle, I/O, compute, hottest).
//! - [`policy`]: ONNX Q-network policies (tract) with model cards, the static and
//!   threshold baselines, epsilon-greedy selection.
//! - [`knob_state`]: the one typed state of a VM's knobs, with its generation, as the
//!   monitor's knob controller keeps it.
//! - [`manager`]: the configuration manager's safeguards (bounds, cooldown, rollback,
//!   watchdog) and the [`manager::Knobs`] trait the monitor implements.
//! - [`control`]: the tuner loop tying them together as an agent sink, with hot reload.
//! - [`files`]: opening user-named files safely (regular files only, size caps).
//! - [`sandbox`]: the hook each of the tuner's threads runs first (the monitor confines
//!   them there).
//!
//! The monitor reaches the tuner only through narrow traits, so everything here can be
//! tested against a fake monitor.

#![warn(missing_docs)]

pub mod ab;
pub mod actions;
pub mod agent;
pub mod anomaly;
pub mod control;
pub mod counters;
pub mod files;
pub mod forecast;
pub mod guest_profile;
pub mod knob_state;
pub mod manager;
pub mod policy;
pub mod prometheus;
pub mod reward;
pub mod sandbox;
pub mod schema;
pub mod slo;
pub mod state_repo;
