//! Deep Q-learning (Mnih et al. 2015), with Double DQN targets (van Hasselt et al. 2016)
//! by default:
//!
//! ```text
//! for each step:
//!     draw a minibatch of transitions (s, a, r, s') uniformly from the replay data
//!     a* = argmax_a' Q_online(s', a')            (Double DQN; plain DQN: max of Q_target)
//!     y  = r + gamma * Q_target(s', a*)          (just r when s' is terminal)
//!     loss = mean Huber(Q_online(s, a) - y)      (or squared error)
//!     one Adam step on the online network's parameters
//!     every `target_every` steps: Q_target <- Q_online
//! ```
//!
//! The networks run on burn's ndarray CPU backend, single-threaded. The initial weights
//! and the minibatches come from the learner's own seeded generator, so a run is a pure
//! function of its data and [`DqnConfig`] (bit for bit on one machine).
//!
//! A loss or target that stops being finite stops training with
//! [`LearnError::Diverged`]; transitions are checked before they enter the data, so NaN
//! never reaches the optimiser.

#![allow(deprecated)] // burn 0.22 deprecates the ndarray backend in favour of `flex`.

use std::time::{Duration, Instant};

use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_onnx::export::OnnxExporter;
use serde::{Deserialize, Serialize};
use tuner::policy::XorShift64;

use crate::dataset::Transition;
use crate::error::LearnError;
use crate::net::QNet;
use crate::replay;
use crate::valid_actions::valid_actions;

/// The loss on the temporal-difference error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Huber: quadratic within `delta` of zero, linear beyond.
    Huber {
        /// Where the loss turns linear.
        delta: f32,
    },
    /// Squared error.
    Mse,
}

/// Hyper-parameters of DQN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DqnConfig {
    /// Width of both hidden layers (default 64).
    pub hidden: usize,
    /// Discount factor in `[0, 1)` (default 0.8: about five intervals ahead, the time a
    /// change takes to be judged and corrected; 0.9 fitted noisier Q-values on the suite).
    pub gamma: f64,
    /// Adam's learning rate (default 1e-3).
    pub lr: f64,
    /// Minibatch size (default 64).
    pub batch: usize,
    /// Steps between copies of the online network into the target network (default 250).
    pub target_every: u64,
    /// Double DQN targets (default true).
    pub double: bool,
    /// The TD loss (default Huber with delta 1).
    pub loss: Loss,
    /// Clip the gradient's norm to this (default 10; `None` does not clip).
    pub grad_clip_norm: Option<f32>,
    /// Seed of the initial weights and of the minibatches (default 1).
    pub seed: u64,
    /// Subtracted from the reward of every transition whose action was not `noop`
    /// (action 0) when the targets are built (default 0.25). A change is not free: it
    /// disturbs the guest and holds the configuration manager's watch window, during
    /// which a needed change waits. Without the penalty, actions that do nothing useful
    /// score like `noop` up to noise, and a greedy policy takes them at random.
    pub change_penalty: f32,
}

impl Default for DqnConfig {
    fn default() -> Self {
        Self {
            hidden: 64,
            gamma: 0.8,
            lr: 1e-3,
            batch: 64,
            target_every: 250,
            double: true,
            loss: Loss::Huber { delta: 1.0 },
            grad_clip_norm: Some(10.0),
            seed: 1,
            change_penalty: 0.25,
        }
    }
}

impl DqnConfig {
    /// Checks every value's range; the error names the option.
    pub fn validate(&self) -> Result<(), LearnError> {
        if !(self.change_penalty.is_finite() && self.change_penalty >= 0.0) {
            return Err(LearnError::bad_option(
                "change_penalty",
                format!(
                    "change penalty {} must be finite and non-negative",
                    self.change_penalty
                ),
            ));
        }
        if !(1..=4096).contains(&self.hidden) {
            return Err(LearnError::bad_option(
                "hidden",
                format!("hidden width {} is outside 1..=4096", self.hidden),
            ));
        }
        if !(self.gamma.is_finite() && (0.0..1.0).contains(&self.gamma)) {
            return Err(LearnError::bad_option(
                "gamma",
                format!("discount {} is outside [0, 1)", self.gamma),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return Err(LearnError::bad_option(
                "lr",
                format!("learning rate {} is outside (0, 1]", self.lr),
            ));
        }
        if !(1..=65_536).contains(&self.batch) {
            return Err(LearnError::bad_option(
                "batch",
                format!("batch size {} is outside 1..=65536", self.batch),
            ));
        }
        if self.target_every == 0 {
            return Err(LearnError::bad_option(
                "target_every",
                "the target network update period must be at least 1 step",
            ));
        }
        if let Loss::Huber { delta } = self.loss {
            if !(delta.is_finite() && delta > 0.0) {
                return Err(LearnError::bad_option(
                    "loss",
                    format!("Huber delta {delta} must be positive"),
                ));
            }
        }
        if let Some(c) = self.grad_clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(LearnError::bad_option(
                    "grad_clip_norm",
                    format!("gradient clipping norm {c} must be positive"),
                ));
            }
        }
        Ok(())
    }
}

/// What a call to [`Dqn::train`] did.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct TrainStats {
    /// Steps taken in this call.
    pub steps: u64,
    /// Steps taken since the network was created.
    pub total_steps: u64,
    /// Mean loss over the last (up to) 100 steps of this call.
    pub final_loss: f32,
    /// Mean loss over the whole call.
    pub mean_loss: f32,
    /// Wall-clock time of the call.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// How well the network fits a set of transitions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    /// Mean |Q(s, a) - y| with the targets used in training.
    pub mean_abs_td: f32,
    /// Mean of max_a Q(s, a) over the states (over the valid actions when masking).
    pub mean_max_q: f32,
    /// How often each action is the greedy one over the transitions' states (by index;
    /// among the valid actions when masking).
    pub greedy: Vec<u64>,
}

/// A DQN learner: online and target networks, the optimiser and the sampling generator.
pub struct Dqn {
    config: DqnConfig,
    input: usize,
    n_actions: usize,
    device: Device,
    ad_device: Device,
    online: QNet,
    target: QNet,
    optim: ModuleOptimizer,
    rng: XorShift64,
    steps: u64,
    /// Whether targets bootstrap only from the actions each transition's next state
    /// allows on its VM's shape ([`crate::valid_actions`]); otherwise from every action.
    valid: bool,
}

impl std::fmt::Debug for Dqn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dqn")
            .field("config", &self.config)
            .field("input", &self.input)
            .field("n_actions", &self.n_actions)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Debug) -> LearnError {
    LearnError::Backend(format!("{e:?}"))
}

impl Dqn {
    /// A new learner for `input` features and `n_actions` actions.
    pub fn new(input: usize, n_actions: usize, config: DqnConfig) -> Result<Dqn, LearnError> {
        config.validate()?;
        if input == 0 || n_actions == 0 {
            return Err(LearnError::bad_option(
                "shape",
                format!("a network needs inputs and actions (got {input} and {n_actions})"),
            ));
        }
        let device = Device::ndarray();
        let ad_device = device.clone().autodiff();
        // Two generators from the seed: weights, then minibatches.
        let mut init_rng = XorShift64::new(config.seed ^ 0x5EED_0FDE_E900_0001);
        let online = QNet::new(input, config.hidden, n_actions, &mut init_rng, &ad_device);
        let target = online.valid();
        let mut adam = AdamConfig::new().with_epsilon(1e-8);
        if let Some(norm) = config.grad_clip_norm {
            adam = adam.with_grad_clipping(Some(GradientClippingConfig::Norm(norm)));
        }
        Ok(Dqn {
            config,
            input,
            n_actions,
            device,
            ad_device,
            online,
            target,
            optim: adam.init(),
            rng: XorShift64::new(config.seed),
            steps: 0,
            valid: false,
        })
    }

    /// Starts both networks from the weights of a trained model instead of random ones
    /// (online learning's warm start). The layers must fit this learner: `input`
    /// features, the configured hidden width, `n_actions` outputs.
    pub fn with_start_weights(mut self, w: &crate::warm::StartWeights) -> Result<Dqn, LearnError> {
        let fits = w.fc1.fan_in == self.input
            && w.hidden() == self.config.hidden
            && w.fc2.fan_in == self.config.hidden
            && w.fc2.fan_out == self.config.hidden
            && w.out.fan_in == self.config.hidden
            && w.out.fan_out == self.n_actions;
        if !fits {
            return Err(LearnError::bad_option(
                "policy",
                format!(
                    "start weights {}x{}, {}x{}, {}x{} do not fit a {}-{}-{}-{} network",
                    w.fc1.fan_in,
                    w.fc1.fan_out,
                    w.fc2.fan_in,
                    w.fc2.fan_out,
                    w.out.fan_in,
                    w.out.fan_out,
                    self.input,
                    self.config.hidden,
                    self.config.hidden,
                    self.n_actions
                ),
            ));
        }
        self.online = QNet::from_weights(w, &self.ad_device);
        self.target = self.online.valid();
        Ok(self)
    }

    /// Bootstraps only from the actions the configuration manager could take in each next
    /// state, on the shape of the VM the transition came from ([`crate::valid_actions`]).
    /// The network must have the layout's number of actions.
    pub fn with_valid_actions(mut self) -> Dqn {
        if self.n_actions == tuner::actions::LAYOUT_LEN {
            self.valid = true;
        } else {
            log::warn!(
                "valid-action masking off: the layout has {} actions, the network {}",
                tuner::actions::LAYOUT_LEN,
                self.n_actions
            );
        }
        self
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &DqnConfig {
        &self.config
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Input length.
    pub fn input_size(&self) -> usize {
        self.input
    }

    /// Number of actions.
    pub fn n_actions(&self) -> usize {
        self.n_actions
    }

    /// Flattens states into a `[n, input]` tensor on `device`.
    fn states<'a>(
        &self,
        rows: impl Iterator<Item = &'a [f32]>,
        device: &Device,
    ) -> Result<Tensor<2>, LearnError> {
        let mut flat = Vec::new();
        let mut n = 0;
        for r in rows {
            if r.len() != self.input {
                return Err(LearnError::InvalidTransition(format!(
                    "a state has {} values, the network takes {}",
                    r.len(),
                    self.input
                )));
            }
            flat.extend_from_slice(r);
            n += 1;
        }
        Ok(Tensor::from_data(
            TensorData::new(flat, [n, self.input]),
            device,
        ))
    }

    /// The bootstrapped targets `y` of a minibatch (plain tensors, no gradient). The
    /// next action is chosen among the actions valid in the next state (all of them
    /// without [`Dqn::with_valid_actions`]).
    fn targets(&self, batch: &[&Transition]) -> Result<Vec<f32>, LearnError> {
        let next = self.states(batch.iter().map(|t| t.next_state.as_slice()), &self.device)?;
        let q_target: Vec<f32> = self
            .target
            .forward(next.clone())
            .into_data()
            .to_vec()
            .map_err(backend)?;
        // Double DQN: the online network chooses, the target network values the choice.
        let q_choose: Vec<f32> = if self.config.double {
            self.online
                .valid()
                .forward(next)
                .into_data()
                .to_vec()
                .map_err(backend)?
        } else {
            q_target.clone()
        };
        let n = self.n_actions;
        let gamma = self.config.gamma as f32;
        let penalty = self.config.change_penalty;
        let mut y = Vec::with_capacity(batch.len());
        for (row, t) in batch.iter().enumerate() {
            let r = if t.action == 0 {
                t.reward
            } else {
                t.reward - penalty
            };
            if t.done {
                y.push(r);
                continue;
            }
            let valid = if self.valid {
                valid_actions(&t.shape, &t.next_state)
            } else {
                vec![true; n]
            };
            let choose = &q_choose[row * n..(row + 1) * n];
            let best = (0..n)
                .filter(|a| valid.get(*a).copied().unwrap_or(true))
                .max_by(|a, b| choose[*a].total_cmp(&choose[*b]))
                .unwrap_or(0);
            y.push(r + gamma * q_target[row * n + best]);
        }
        Ok(y)
    }

    /// One optimiser step on `batch`; returns the loss.
    pub fn step(&mut self, batch: &[&Transition]) -> Result<f32, LearnError> {
        if batch.is_empty() {
            return Err(LearnError::InvalidTransition("empty minibatch".into()));
        }
        for t in batch {
            t.check(self.input, self.n_actions)
                .map_err(LearnError::InvalidTransition)?;
        }
        let y = self.targets(batch)?;
        if let Some(v) = y.iter().find(|v| !v.is_finite()) {
            return Err(LearnError::Diverged {
                step: self.steps,
                what: "target Q-value",
                value: *v,
            });
        }
        let n = batch.len();
        let y = Tensor::<2>::from_data(TensorData::new(y, [n, 1]), &self.ad_device);
        let s = self.states(batch.iter().map(|t| t.state.as_slice()), &self.ad_device)?;
        let actions: Vec<i64> = batch.iter().map(|t| t.action as i64).collect();
        let a = Tensor::<2, Int>::from_data(TensorData::new(actions, [n, 1]), &self.ad_device);
        let td = self.online.forward(s).gather(1, a) - y;
        let loss = match self.config.loss {
            Loss::Huber { delta } => {
                // 0.5 m^2 + delta (|d| - m) with m = min(|d|, delta).
                let abs = td.abs();
                let m = abs.clone().clamp_max(delta);
                (m.clone() * m.clone()).mul_scalar(0.5) + (abs - m).mul_scalar(delta)
            }
            Loss::Mse => td.clone() * td,
        }
        .mean();
        let value: f32 = loss.clone().into_scalar();
        if !value.is_finite() {
            return Err(LearnError::Diverged {
                step: self.steps,
                what: "loss",
                value,
            });
        }
        let grads = GradientsParams::from_grads(loss.backward(), &self.online);
        self.online = self.optim.step(self.config.lr, self.online.clone(), grads);
        self.steps += 1;
        if self.steps.is_multiple_of(self.config.target_every) {
            self.target = self.online.valid();
        }
        Ok(value)
    }

    /// `steps` optimiser steps on minibatches drawn uniformly from `data`.
    pub fn train(&mut self, data: &[Transition], steps: u64) -> Result<TrainStats, LearnError> {
        let start = Instant::now();
        if data.is_empty() {
            return Err(LearnError::InvalidTransition(
                "no transitions to learn from".into(),
            ));
        }
        let mut recent = std::collections::VecDeque::with_capacity(100);
        let mut total = 0.0f64;
        for _ in 0..steps {
            let batch = replay::sample(data, self.config.batch, &mut self.rng);
            let loss = self.step(&batch)?;
            total += f64::from(loss);
            if recent.len() == 100 {
                recent.pop_front();
            }
            recent.push_back(loss);
            if self.steps.is_multiple_of(1000) {
                log::info!("DQN step {}: loss {loss:.5}", self.steps);
            }
        }
        let mean = |sum: f64, n: usize| if n == 0 { 0.0 } else { (sum / n as f64) as f32 };
        Ok(TrainStats {
            steps,
            total_steps: self.steps,
            final_loss: mean(recent.iter().map(|l| f64::from(*l)).sum(), recent.len()),
            mean_loss: mean(total, usize::try_from(steps).unwrap_or(usize::MAX)),
            elapsed: start.elapsed(),
        })
    }

    /// Q-values of the online network for each state (no gradient).
    pub fn q_values(&self, states: &[&[f32]]) -> Result<Vec<Vec<f32>>, LearnError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let net = self.online.valid();
        let mut out = Vec::with_capacity(states.len());
        for chunk in states.chunks(1024) {
            let x = self.states(chunk.iter().copied(), &self.device)?;
            let q: Vec<f32> = net.forward(x).into_data().to_vec().map_err(backend)?;
            out.extend(q.chunks(self.n_actions).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// TD error, max-Q and greedy actions of the online network over `data`.
    pub fn fit(&self, data: &[Transition]) -> Result<Fit, LearnError> {
        let mut greedy = vec![0u64; self.n_actions];
        let (mut td_sum, mut max_sum) = (0.0f64, 0.0f64);
        for chunk in data.chunks(1024) {
            let refs: Vec<&Transition> = chunk.iter().collect();
            let y = self.targets(&refs)?;
            let states: Vec<&[f32]> = chunk.iter().map(|t| t.state.as_slice()).collect();
            let q = self.q_values(&states)?;
            for ((t, q), y) in chunk.iter().zip(&q).zip(&y) {
                let qa = q.get(t.action).copied().unwrap_or(f32::NAN);
                td_sum += f64::from((qa - y).abs());
                // Greedy among the actions the state allows (as the tuner masks them).
                let masked: Vec<f32> = if self.valid {
                    valid_actions(&t.shape, &t.state)
                        .iter()
                        .zip(q)
                        .map(|(ok, v)| if *ok { *v } else { f32::NEG_INFINITY })
                        .collect()
                } else {
                    q.clone()
                };
                let (best, max) = argmax(&masked);
                max_sum += f64::from(max);
                if let Some(g) = greedy.get_mut(best) {
                    *g += 1;
                }
            }
        }
        let n = data.len().max(1) as f64;
        Ok(Fit {
            mean_abs_td: (td_sum / n) as f32,
            mean_max_q: (max_sum / n) as f32,
            greedy,
        })
    }

    /// The online network as an ONNX model (input `[1, input]` f32, output
    /// `[1, n_actions]`), in memory.
    pub fn export_onnx(&self) -> Result<Vec<u8>, LearnError> {
        let net = self.online.valid();
        let sample = Tensor::<2>::zeros([1, self.input], &self.device);
        let model = OnnxExporter::new()
            .export(&net, sample, QNet::forward)
            .map_err(|e| LearnError::Export(e.to_string()))?;
        Ok(model.into_bytes())
    }
}

/// Index and value of the largest entry (NaN ranks lowest; ties go to the lowest index).
pub fn argmax(q: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in q.iter().enumerate() {
        if *v > best.1 {
            best = (i, *v);
        }
    }
    best
}
