//! Online learning: the learner `vmm-learn online` drives beside a running VM.
//!
//! Transitions are handed over as they happen ([`OnlineLearner::push`], or
//! [`OnlineLearner::push_labelled`] with the tuner's action label, as the state repository
//! stores it; see [`crate::live`]); the driver ([`crate::beside`]) calls
//! [`OnlineLearner::train`] for a few steps at a time and, now and then,
//! [`OnlineLearner::export_bytes`] to get a new ONNX model and card, which it writes and
//! pushes to the VM (`PUT /policy`). [`OnlineLearner::warm_started`] starts from a trained
//! model's weights instead of random ones.
//!
//! Exploration: [`OnlineLearner::act`] is epsilon-greedy over the learner's own network
//! with the decaying [`EpsilonSchedule`] of [`OnlineConfig::epsilon`]; a monitor that lets
//! the tuner choose (with the exported model) can read [`OnlineLearner::epsilon`] instead.
//!
//! Nothing here touches the file system: the exported bytes are checked through tract in
//! memory before they are returned.

use std::path::Path;

use serde_json::json;
use tuner::actions::{ActionSpace, VmShape};
use tuner::policy::{
    select_explained, EpsilonSchedule, ModelCard, Selection, XorShift64, REFERENCE_TOLERANCE,
};
use tuner::reward::RewardWeights;
use tuner::schema::Schema;

use crate::dataset::{parse_label, Label, Transition};
use crate::dqn::{Dqn, DqnConfig, TrainStats};
use crate::error::LearnError;
use crate::export::{self, Agreement};
use crate::replay::ReplayBuffer;
use crate::warm::StartWeights;

/// Settings of online learning.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineConfig {
    /// DQN hyper-parameters.
    pub dqn: DqnConfig,
    /// Exploration of [`OnlineLearner::act`] over its decisions (default 1.0 down to 0.05
    /// over 2000 decisions).
    pub epsilon: EpsilonSchedule,
    /// Transitions the replay buffer keeps (default 50 000; the oldest go first).
    pub replay_capacity: usize,
    /// Transitions needed before [`OnlineLearner::train`] takes steps (default 256).
    pub min_transitions: usize,
    /// Name written into exported cards (default `online`).
    pub name: String,
    /// Description written into exported cards.
    pub description: String,
    /// States compared between the trainer and tract at each export (default 32).
    pub check_states: usize,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        Self {
            dqn: DqnConfig::default(),
            epsilon: EpsilonSchedule {
                start: 1.0,
                end: 0.05,
                decay_steps: 2000,
            },
            replay_capacity: 50_000,
            min_transitions: 256,
            name: "online".into(),
            description: "DQN Q-network learned online by vmm-learn beside the VM".into(),
            check_states: 32,
        }
    }
}

/// Counts of an online learner.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OnlineStats {
    /// Transitions accepted.
    pub pushed: u64,
    /// Transitions refused (NaN, wrong length, unknown action).
    pub rejected: u64,
    /// Transitions skipped on purpose (`static` resets).
    pub skipped: u64,
    /// Transitions held in the replay buffer.
    pub held: usize,
    /// DQN steps taken.
    pub steps: u64,
    /// Decisions taken through [`OnlineLearner::act`].
    pub decisions: u64,
    /// Mean loss of the last [`OnlineLearner::train`] call that took steps.
    pub last_loss: Option<f32>,
    /// Models exported.
    pub exports: u64,
}

/// A DQN learner fed one transition at a time.
#[derive(Debug)]
pub struct OnlineLearner {
    shape: VmShape,
    space: ActionSpace,
    weights: RewardWeights,
    config: OnlineConfig,
    dqn: Dqn,
    replay: ReplayBuffer,
    rng: XorShift64,
    stats: OnlineStats,
    last_state: Option<Vec<f32>>,
}

impl OnlineLearner {
    /// A learner for a VM of `shape` (its targets skip the actions the VM's bounds and
    /// devices do not allow, [`crate::valid_actions`]), whose rewards are computed with
    /// `weights`, from random weights (or, warm, from a trained network's).
    pub fn new(
        shape: VmShape,
        weights: RewardWeights,
        config: OnlineConfig,
    ) -> Result<OnlineLearner, LearnError> {
        Self::build(shape, weights, config, None)
    }

    /// A learner that starts from a trained model (the warm start of `vmm-learn online
    /// --policy`): `start` are its layers ([`crate::warm::read`]), `card` its model card,
    /// `path` names it in errors. The card must fit the VM (`shape`'s action space and
    /// the reward `weights`), the hidden width comes from the model, and the learner's
    /// Q-values on the card's reference input must equal the card's reference Q-values
    /// (within `tuner::policy::REFERENCE_TOLERANCE`): the weights were read right.
    pub fn warm_started(
        shape: VmShape,
        weights: RewardWeights,
        mut config: OnlineConfig,
        start: &StartWeights,
        card: &ModelCard,
        path: &Path,
    ) -> Result<OnlineLearner, LearnError> {
        let bad = |message: String| LearnError::StartModel {
            path: path.to_path_buf(),
            message,
        };
        card.validate(&ActionSpace::new(shape), Some(&weights))
            .map_err(|e| bad(format!("its card does not fit this VM: {e}")))?;
        config.dqn.hidden = start.hidden();
        let mut learner = Self::build(shape, weights, config, Some(start))?;
        let ev = &card.evaluation;
        if !ev.reference_input.is_empty() {
            let q = learner.q_values(&ev.reference_input)?;
            if q.len() != ev.reference_q.len() {
                return Err(bad(format!(
                    "{} reference Q-values in the card, the network has {} outputs",
                    ev.reference_q.len(),
                    q.len()
                )));
            }
            for (i, (got, want)) in q.iter().zip(&ev.reference_q).enumerate() {
                let diff = (got - want).abs();
                // A NaN difference fails too.
                if diff.is_nan() || diff > REFERENCE_TOLERANCE * want.abs().max(1.0) {
                    return Err(bad(format!(
                        "the weights read give Q-value {got} for action {i} on the card's \
                         reference input, the card says {want}"
                    )));
                }
            }
            learner.last_state = Some(ev.reference_input.clone());
        }
        Ok(learner)
    }

    fn build(
        shape: VmShape,
        weights: RewardWeights,
        config: OnlineConfig,
        start: Option<&StartWeights>,
    ) -> Result<OnlineLearner, LearnError> {
        config
            .epsilon
            .validate()
            .map_err(|e| LearnError::bad_option("epsilon", e.to_string()))?;
        weights
            .validate()
            .map_err(|e| LearnError::bad_option("reward_weights", e.to_string()))?;
        if config.min_transitions == 0 || config.replay_capacity < config.min_transitions {
            return Err(LearnError::bad_option(
                "replay_capacity",
                format!(
                    "replay capacity {} must hold at least min_transitions {} (>= 1)",
                    config.replay_capacity, config.min_transitions
                ),
            ));
        }
        let space = ActionSpace::new(shape);
        let mut dqn = Dqn::new(Schema::len(), space.len(), config.dqn)?.with_valid_actions();
        if let Some(w) = start {
            dqn = dqn.with_start_weights(w)?;
        }
        Ok(OnlineLearner {
            shape,
            space,
            weights,
            replay: ReplayBuffer::new(config.replay_capacity),
            rng: XorShift64::new(config.dqn.seed.wrapping_add(0x0E95_110E)),
            config,
            dqn,
            stats: OnlineStats::default(),
            last_state: None,
        })
    }

    /// The action space (the network's output order).
    pub fn space(&self) -> &ActionSpace {
        &self.space
    }

    /// The VM shape.
    pub fn shape(&self) -> VmShape {
        self.shape
    }

    /// Counts so far.
    pub fn stats(&self) -> OnlineStats {
        OnlineStats {
            held: self.replay.len(),
            steps: self.dqn.steps(),
            ..self.stats
        }
    }

    /// Adds a transition to the replay buffer; an invalid one (wrong length, NaN or
    /// infinite values, action out of range) is refused and counted, never learned from.
    pub fn push(&mut self, t: Transition) -> Result<(), LearnError> {
        if let Err(reason) = t.check(Schema::len(), self.space.len()) {
            self.stats.rejected += 1;
            return Err(LearnError::InvalidTransition(reason));
        }
        self.last_state = Some(t.next_state.clone());
        self.replay.push(t);
        self.stats.pushed += 1;
        Ok(())
    }

    /// Adds a transition given the tuner's action label (`vcpu+1`, `refused:...`,
    /// `rollback:...`, `static`; see [`crate::dataset`]). Returns whether it was kept
    /// (`static` is skipped); an unknown label is refused like an invalid transition.
    pub fn push_labelled(
        &mut self,
        state: Vec<f32>,
        label: &str,
        reward: f64,
        next_state: Vec<f32>,
    ) -> Result<bool, LearnError> {
        match parse_label(&self.space, label) {
            Some(Label::Action(action)) => {
                self.push(Transition {
                    state,
                    action,
                    reward: reward as f32,
                    next_state,
                    done: false,
                    shape: self.shape,
                })?;
                Ok(true)
            }
            Some(Label::Skip | Label::V1Unmappable) => {
                self.stats.skipped += 1;
                Ok(false)
            }
            None => {
                self.stats.rejected += 1;
                Err(LearnError::InvalidTransition(format!(
                    "unknown action {label:?} for {}",
                    self.shape
                )))
            }
        }
    }

    /// Transitions held.
    pub fn len(&self) -> usize {
        self.replay.len()
    }

    /// Whether no transition is held.
    pub fn is_empty(&self) -> bool {
        self.replay.is_empty()
    }

    /// Whether enough transitions are held to train.
    pub fn ready(&self) -> bool {
        self.replay.len() >= self.config.min_transitions
    }

    /// Up to `steps` DQN steps on the replay buffer (none before
    /// [`OnlineConfig::min_transitions`] are held). Runs on the caller's thread. After a
    /// [`LearnError::Diverged`] the network is not to be trusted: keep serving the last
    /// exported model and start a new learner.
    pub fn train(&mut self, steps: u64) -> Result<TrainStats, LearnError> {
        if !self.ready() || steps == 0 {
            return Ok(TrainStats {
                total_steps: self.dqn.steps(),
                ..TrainStats::default()
            });
        }
        let stats = self.dqn.train(self.replay.as_slice(), steps)?;
        self.stats.last_loss = Some(stats.mean_loss);
        Ok(stats)
    }

    /// Epsilon at the current decision.
    pub fn epsilon(&self) -> f64 {
        self.config.epsilon.value(self.stats.decisions)
    }

    /// The learner's Q-values for `state`.
    pub fn q_values(&self, state: &[f32]) -> Result<Vec<f32>, LearnError> {
        Ok(self.dqn.q_values(&[state])?.pop().unwrap_or_default())
    }

    /// Epsilon-greedy choice among the actions `mask` allows, with the decaying epsilon.
    pub fn act(&mut self, state: &[f32], mask: &[bool]) -> Result<Selection, LearnError> {
        let q = self.q_values(state)?;
        let epsilon = self.epsilon();
        let s = select_explained(&q, mask, epsilon, &mut self.rng).map_err(LearnError::Policy)?;
        self.stats.decisions += 1;
        Ok(s)
    }

    /// The current network as ONNX bytes and its model card, checked through tract in
    /// memory (Q-values on up to [`OnlineConfig::check_states`] held states within
    /// `tuner::policy::REFERENCE_TOLERANCE`). Load it with
    /// `OnnxPolicy::from_parts(path, &bytes, card)`.
    pub fn export_bytes(&mut self) -> Result<(Vec<u8>, ModelCard), LearnError> {
        let (bytes, card, _) = self.export_checked()?;
        Ok((bytes, card))
    }

    /// [`OnlineLearner::export_bytes`], also returning how closely tract agreed.
    pub fn export_checked(&mut self) -> Result<(Vec<u8>, ModelCard, Agreement), LearnError> {
        let held = self.replay.as_slice();
        let reference_input = self
            .last_state
            .clone()
            .unwrap_or_else(|| vec![0.0; Schema::len()]);
        let mut states = vec![reference_input.clone()];
        if !held.is_empty() {
            let k = self.config.check_states.clamp(1, held.len());
            states.extend((0..k).map(|i| held[i * held.len() / k].state.clone()));
        }
        let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
        let ours = self.dqn.q_values(&refs)?;
        let bytes = self.dqn.export_onnx()?;
        let trained_on = format!(
            "online: {} transitions seen ({} held), {} DQN steps",
            self.stats.pushed,
            self.replay.len(),
            self.dqn.steps()
        );
        let mut card = export::card(
            &self.config.name,
            &self.config.description,
            &self.space,
            self.weights,
            trained_on,
        );
        card.evaluation.reference_input = reference_input;
        card.evaluation.reference_q = ours.first().cloned().unwrap_or_default();
        let agreement = export::verify_bytes(&bytes, &card, &self.space, &states, &ours)?;
        let extra = json!({
            "trainer": format!("learner {} online DQN (burn 0.22)", env!("CARGO_PKG_VERSION")),
            "steps": self.dqn.steps(),
            "last_loss": self.stats.last_loss,
            "seed": self.config.dqn.seed,
            "hyper_parameters": self.config.dqn,
            "epsilon": self.config.epsilon,
            "transitions_seen": self.stats.pushed,
            "tract_check": {
                "states": agreement.states,
                "max_abs_diff": agreement.max_abs,
                "max_rel_diff": agreement.max_rel,
            },
        });
        if let serde_json::Value::Object(map) = extra {
            card.evaluation.extra = map;
        }
        self.stats.exports += 1;
        Ok((bytes, card, agreement))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn general() -> (std::path::PathBuf, ModelCard, StartWeights) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/general.onnx");
        let card: ModelCard =
            serde_json::from_slice(&std::fs::read(ModelCard::path_for(&path)).unwrap()).unwrap();
        let w = crate::warm::read(&path, &std::fs::read(&path).unwrap(), &card).unwrap();
        (path, card, w)
    }

    #[test]
    fn a_warm_start_computes_the_start_models_q_values_and_exports_them() {
        let (path, card, w) = general();
        let shape = VmShape::new(2, 2, 0);
        let mut l = OnlineLearner::warm_started(
            shape,
            card.reward_weights,
            OnlineConfig::default(),
            &w,
            &card,
            &path,
        )
        .unwrap();
        let q = l.q_values(&card.evaluation.reference_input).unwrap();
        for (a, b) in q.iter().zip(&card.evaluation.reference_q) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{q:?}");
        }
        // Exported before any step, tract computes the same on the same input.
        let (_, exported) = l.export_bytes().unwrap();
        assert_eq!(
            exported.evaluation.reference_input,
            card.evaluation.reference_input
        );
        for (a, b) in exported
            .evaluation
            .reference_q
            .iter()
            .zip(&card.evaluation.reference_q)
        {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0));
        }
        // A VM the card does not serve, or other reward weights, are refused, naming the
        // model.
        let other = tuner::reward::RewardWeights {
            free: card.reward_weights.free + 1.0,
            ..card.reward_weights
        };
        let e =
            OnlineLearner::warm_started(shape, other, OnlineConfig::default(), &w, &card, &path)
                .unwrap_err();
        assert!(matches!(e, LearnError::StartModel { .. }), "{e}");
        // Weights that do not give the card's reference Q-values are refused.
        let mut off = w.clone();
        off.out.bias[0] += 1.0;
        let e = OnlineLearner::warm_started(
            shape,
            card.reward_weights,
            OnlineConfig::default(),
            &off,
            &card,
            &path,
        )
        .unwrap_err();
        assert!(e.to_string().contains("reference input"), "{e}");
    }
}
