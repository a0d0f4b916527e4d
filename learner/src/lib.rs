//! The learner: trains the tuner's Q-network with deep Q-learning in Rust (burn) and
//! exports it to ONNX for the tuner's tract runtime, with a model card.
//!
//! - [`dataset`]: transitions `(s, a, r, s')` from a state repository, with every row
//!   checked (schema version, lengths, finite values, known actions), from VMs of any
//!   shape (one action layout, [`tuner::actions`]).
//! - [`net`]: the Q-network, an MLP `23 -> hidden -> hidden -> actions` with ReLU.
//! - [`replay`]: the experience replay buffer and uniform minibatches.
//! - [`dqn`]: DQN with a target network, Double DQN targets, Huber loss and Adam.
//! - [`export`]: ONNX bytes, the model card, and the check through tract that the
//!   exported model computes the trainer's Q-values.
//! - [`start`]: the start configuration in the card: where the trained network takes an
//!   idle guest.
//! - [`train`]: offline training from a state repository to `NAME.onnx` +
//!   `NAME.card.json` (`vmm-learn train`).
//! - [`online`]: [`online::OnlineLearner`], fed one transition at a time.
//! - [`warm`]: a trained policy's weights read back from its ONNX file (warm start).
//! - [`live`]: a running VM's transitions as they arrive in its state repository.
//! - [`beside`]: `vmm-learn online`: learns beside a running VM and pushes each new
//!   network to it (`PUT /policy` on its control socket).
//! - [`error`]: [`LearnError`], the error of data, training and export ([`beside`] wraps it
//!   in its own [`beside::BesideError`] with the VM-side failures).
//!
//! The binary `vmm-learn` (`src/bin/vmm-learn.rs`) is the command line. The learner runs
//! in its own process: the monitor (`vmm`) does not link it. It depends on the tuner
//! (schema, actions, reward weights, model card, tract loader) and the control API's
//! client (`api-client`), but not on the monitor.

#![warn(missing_docs)]

pub mod beside;
pub mod dataset;
pub mod dqn;
pub mod error;
pub mod export;
pub mod live;
pub mod net;
pub mod online;
pub mod replay;
pub mod start;
pub mod train;
pub mod valid_actions;
pub mod warm;

pub use dataset::{Dataset, DatasetOptions, Transition};
pub use dqn::{Dqn, DqnConfig, Loss, TrainStats};
pub use error::LearnError;
pub use online::{OnlineConfig, OnlineLearner};
pub use train::{train, TrainOptions, TrainReport};
