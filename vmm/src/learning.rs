//! Online learning (`vmm run --learn`): a background thread trains a DQN Q-network from
//! the tuner's live transitions and hot-swaps the refreshed network into the tuner's
//! tract runtime every few intervals.
//!
//! Data flow: the tuner (an agent sink) sends each decision's transition
//! ([`tuner::control::Transition`]) down a bounded channel without ever blocking (a full
//! channel drops the transition); this thread owns a [`learner::OnlineLearner`], feeds it
//! the transitions, and after every [`LearnSettings::every`] new ones (once it holds
//! enough) takes [`LearnSettings::steps`] DQN steps, exports the network to ONNX in
//! memory (checked against tract), loads it with [`OnnxPolicy::from_parts`] and swaps it
//! in through the [`PolicyHandle`]: atomic between two decisions, stored as a
//! `policy_swap` event, with the safeguards of the configuration manager unchanged. The
//! guest never waits for any of it. The thread ends when the tuner goes away (the channel
//! closes) at the end of the run.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use learner::dataset::Transition as LearnerTransition;
use learner::online::{OnlineConfig, OnlineLearner};
use tuner::actions::VmShape;
use tuner::control::{PolicyHandle, Transition};
use tuner::policy::OnnxPolicy;
use tuner::reward::RewardWeights;

/// Transitions that may wait for the learner thread before new ones are dropped.
const CHANNEL_DEPTH: usize = 1024;

/// Errors of starting online learning.
#[derive(Debug, thiserror::Error)]
pub enum LearningError {
    /// The learner refused its settings.
    #[error("online learner: {0}")]
    Learner(#[from] learner::LearnError),
    /// The thread could not be started.
    #[error("cannot start the learner thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// How online learning runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnSettings {
    /// New transitions between two refreshes of the served network.
    pub every: u64,
    /// DQN steps per refresh.
    pub steps: u64,
    /// Transitions held before the first refresh.
    pub min_transitions: usize,
    /// Seed of the network's initialisation and minibatch sampling.
    pub seed: u64,
}

impl Default for LearnSettings {
    fn default() -> Self {
        Self {
            every: 20,
            steps: 100,
            min_transitions: 32,
            seed: 1,
        }
    }
}

/// A running learner thread.
pub struct Learning {
    /// Where the tuner sends its transitions ([`tuner::control::Tuner::with_experience`]).
    pub sender: SyncSender<Transition>,
    /// The thread (ends when every sender is dropped).
    pub thread: JoinHandle<()>,
}

/// Starts the learner thread for a VM of `shape` whose tuner's policy slot is `handle`.
pub fn start(
    shape: VmShape,
    weights: RewardWeights,
    settings: LearnSettings,
    handle: PolicyHandle,
) -> Result<Learning, LearningError> {
    let mut config = OnlineConfig {
        min_transitions: settings.min_transitions.max(1),
        ..OnlineConfig::default()
    };
    config.dqn.seed = settings.seed;
    let learner = OnlineLearner::new(shape, weights, config)?;
    let (sender, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
    let thread = std::thread::Builder::new()
        .name("learner".into())
        .spawn(move || {
            // A panic of the learner stops online learning; the served policy stays.
            tuner::sandbox::run_helper("learner", || run(learner, rx, settings, handle));
        })?;
    log::info!(
        "online learning on: refresh every {} transitions, {} DQN steps each",
        settings.every,
        settings.steps
    );
    Ok(Learning { sender, thread })
}

fn run(
    mut learner: OnlineLearner,
    rx: Receiver<Transition>,
    settings: LearnSettings,
    handle: PolicyHandle,
) {
    let mut since_refresh = 0u64;
    let mut generation = 0u64;
    while let Ok(t) = rx.recv() {
        let t = LearnerTransition {
            state: t.state,
            action: t.action,
            reward: t.reward as f32,
            next_state: t.next_state,
            done: false,
            shape: learner.shape(),
        };
        if let Err(e) = learner.push(t) {
            log::debug!("learner: transition refused: {e}");
            continue;
        }
        since_refresh += 1;
        if since_refresh < settings.every.max(1) || !learner.ready() {
            continue;
        }
        since_refresh = 0;
        match refresh(&mut learner, settings.steps, generation + 1) {
            Ok(policy) => {
                generation += 1;
                handle.swap(Box::new(policy));
            }
            Err(e) => {
                // The served policy stays; a diverged network is never swapped in.
                log::warn!("learner: refresh {} skipped: {e}", generation + 1);
            }
        }
    }
    let s = learner.stats();
    log::info!(
        "learner stopped: {} transitions, {} DQN steps, {} network(s) served",
        s.pushed,
        s.steps,
        generation
    );
}

/// Trains, exports and loads the next network (named `online-<generation>`).
fn refresh(learner: &mut OnlineLearner, steps: u64, generation: u64) -> Result<OnnxPolicy, String> {
    let stats = learner.train(steps).map_err(|e| e.to_string())?;
    let (bytes, mut card) = learner.export_bytes().map_err(|e| e.to_string())?;
    card.name = format!("online-{generation}");
    log::debug!(
        "learner: network {generation} after {} steps (loss {:.4})",
        stats.total_steps,
        stats.mean_loss
    );
    OnnxPolicy::from_parts(Path::new("online"), &bytes, card).map_err(|e| e.to_string())
}
