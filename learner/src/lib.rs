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
//!   `NAME.card.json` (the `vmm train` command).
//! - [`online`]: [`online::OnlineLearner`], fed one transition at a time, for the
//!   monitor's online learning.
//! - [`error`]: [`LearnError`], the one error type.
//!
//! The learner depends on the tuner (schema, actions, reward weights, model card, tract
//! loader) but not on the monitor.

#![warn(missing_docs)]

pub mod dataset;
pub mod dqn;
pub mod error;
pub mod export;
pub mod net;
pub mod online;
pub mod replay;
pub mod start;
pub mod train;
pub mod valid_actions;

pub use dataset::{Dataset, DatasetOptions, Transition};
pub use dqn::{Dqn, DqnConfig, Loss, TrainStats};
pub use error::LearnError;
pub use online::{OnlineConfig, OnlineLearner};
pub use train::{train, TrainOptions, TrainReport};
