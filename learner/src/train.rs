//! Offline training (`vmm train`): a state repository in, a checked ONNX policy and its
//! model card out.
//!
//! 1. [`crate::dataset::load`] reads and checks the rows and pairs them into transitions;
//! 2. [`Dqn::train`] runs `steps` DQN steps on minibatches drawn from all of them;
//! 3. the network is exported to ONNX in memory, the card is written (reference input:
//!    a state from the data; reference Q-values: the trainer's), and
//!    [`crate::export::write_verified`] loads both back through tract and compares the
//!    Q-values on a batch of the data's states before putting them in place.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tuner::policy::{ModelCard, OnnxPolicy, PolicyError, QNetwork, StartConfig};
use tuner::reward::RewardWeights;
use tuner::state_repo::Location;

use crate::dataset::{self, DatasetOptions};
use crate::dqn::{Dqn, DqnConfig};
use crate::error::LearnError;
use crate::export::{self, Agreement};

/// Default number of DQN steps of `vmm train` (about 20 s on this project's 2-core
/// machines in a release build, whatever the size of the data).
pub const DEFAULT_STEPS: u64 = 20_000;

/// Default number of the data's states on which tract's Q-values are compared.
pub const DEFAULT_CHECK_STATES: usize = 256;

/// Everything `vmm train` takes.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The state repository to learn from: a SQLite file or a PostgreSQL database.
    pub state_db: Location,
    /// Where the model goes (`NAME.onnx`; the card goes beside it as `NAME.card.json`).
    pub out: PathBuf,
    /// DQN steps.
    pub steps: u64,
    /// Hyper-parameters.
    pub dqn: DqnConfig,
    /// Which rows to use.
    pub dataset: DatasetOptions,
    /// The policy's name (default: the file stem of `out`).
    pub name: Option<String>,
    /// Free text for the card.
    pub description: Option<String>,
    /// Reward weights for the card when the data does not record them (they must match
    /// when it does).
    pub reward_weights: Option<RewardWeights>,
    /// Data states compared between the trainer and tract.
    pub check_states: usize,
}

impl TrainOptions {
    /// Defaults for everything but the input and output.
    pub fn new(state_db: impl Into<Location>, out: impl Into<PathBuf>) -> TrainOptions {
        TrainOptions {
            state_db: state_db.into(),
            out: out.into(),
            steps: DEFAULT_STEPS,
            dqn: DqnConfig::default(),
            dataset: DatasetOptions::default(),
            name: None,
            description: None,
            reward_weights: None,
            check_states: DEFAULT_CHECK_STATES,
        }
    }

    /// Checks the options that do not need the data.
    pub fn validate(&self) -> Result<(), LearnError> {
        self.dqn.validate()?;
        if self.steps == 0 {
            return Err(LearnError::bad_option("steps", "at least 1 step is needed"));
        }
        if self.out.extension().and_then(|e| e.to_str()) != Some("onnx") {
            return Err(LearnError::bad_option(
                "out",
                format!(
                    "{} must end in .onnx (the card goes beside it as NAME.card.json)",
                    self.out.display()
                ),
            ));
        }
        if self.out.is_dir() {
            return Err(LearnError::bad_option(
                "out",
                format!("{} is a directory", self.out.display()),
            ));
        }
        if let Some(w) = &self.reward_weights {
            w.validate()
                .map_err(|e| LearnError::bad_option("reward_weights", e.to_string()))?;
        }
        if let Some(p) = self.dataset.exclude_prefixes.iter().find(|p| p.is_empty()) {
            return Err(LearnError::bad_option(
                "exclude_prefix",
                format!("an empty prefix {p:?} would exclude every VM"),
            ));
        }
        if !(self.dataset.max_gap_factor.is_finite() && self.dataset.max_gap_factor >= 1.0) {
            return Err(LearnError::bad_option(
                "max_gap_factor",
                format!(
                    "episode gap factor {} must be at least 1",
                    self.dataset.max_gap_factor
                ),
            ));
        }
        Ok(())
    }
}

/// What a training run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The model written.
    pub out: PathBuf,
    /// Its card.
    pub card: PathBuf,
    /// Transitions learned from.
    pub transitions: u64,
    /// DQN steps taken.
    pub steps: u64,
    /// Mean loss over the last 100 steps.
    pub final_loss: f32,
    /// Mean |TD error| over the data after training.
    pub mean_td_error: f32,
    /// Trainer against tract.
    pub agreement: Agreement,
    /// Size of the ONNX file.
    pub model_bytes: usize,
    /// Time spent in DQN steps.
    pub training_time: Duration,
    /// Greedy action per data state, by name (nonzero counts).
    pub greedy: BTreeMap<String, u64>,
    /// The start configuration written into the card (see [`crate::start`]).
    pub start: Option<StartConfig>,
}

impl TrainReport {
    /// The one-line summary `vmm train` prints.
    pub fn summary_line(&self) -> String {
        format!(
            "train: wrote {} ({} transitions, {} steps, loss {:.5}, max |dq| {:.2e})",
            self.out.display(),
            self.transitions,
            self.steps,
            self.final_loss,
            self.agreement.max_abs
        )
    }

    /// The line `vmm train` prints about the start configuration.
    pub fn start_line(&self) -> String {
        start_line(self.start.as_ref())
    }
}

/// The line `vmm train` prints about a start configuration (`None`: none chosen).
pub fn start_line(start: Option<&StartConfig>) -> String {
    match start {
        Some(s) => {
            let drives: Vec<String> = s
                .drives
                .iter()
                .enumerate()
                .map(|(i, d)| format!("blk{i} level {} {}", d.rate_level, d.priority.name()))
                .collect();
            format!(
                "train: start configuration {} vCPU(s), {}",
                s.active_vcpus,
                drives.join(", ")
            )
        }
        None => "train: no start configuration (the tuner starts from the VM's own)".into(),
    }
}

/// The reward weights a card for `data` records: the data's, or the given ones when the
/// data does not record any (given ones that differ from recorded ones are an error).
fn card_weights(opts: &TrainOptions, data: &dataset::Dataset) -> Result<RewardWeights, LearnError> {
    let weights = match (&opts.reward_weights, data.summary.weights_recorded) {
        (Some(given), true) if *given != data.reward_weights => {
            return Err(LearnError::RewardWeightsMismatch {
                data: format!("{:?}", data.reward_weights),
                given: format!("{given:?}"),
            })
        }
        (Some(given), _) => *given,
        (None, _) => data.reward_weights,
    };
    if !data.summary.weights_recorded && opts.reward_weights.is_none() {
        log::warn!(
            "the data does not record reward weights; the card says the monitor's defaults \
             ({:?}): give --reward-weights if the VMs ran with others",
            weights.named()
        );
    }
    Ok(weights)
}

/// Reads the data, trains, exports and checks (see the module documentation).
pub fn train(opts: &TrainOptions) -> Result<TrainReport, LearnError> {
    opts.validate()?;
    let data = dataset::load_from(&opts.state_db, &opts.dataset)?;
    let weights = card_weights(opts, &data)?;
    let space = data.space();
    let mut dqn =
        Dqn::new(tuner::schema::Schema::len(), space.len(), opts.dqn)?.with_valid_actions();
    log::info!(
        "training on {} transitions (VM shapes: {:?}), {} steps",
        data.transitions.len(),
        data.summary.shapes,
        opts.steps
    );
    let stats = dqn.train(&data.transitions, opts.steps)?;
    let fit = dqn.fit(&data.transitions)?;
    let greedy: BTreeMap<String, u64> = fit
        .greedy
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .filter_map(|(i, c)| space.name(i).map(|n| (n.to_string(), *c)))
        .collect();

    // The states to check tract on: evenly spaced over the data; the reference is the
    // middle one.
    let n = data.transitions.len();
    let k = opts.check_states.clamp(1, n);
    let states: Vec<Vec<f32>> = (0..k)
        .map(|i| data.transitions[i * n / k].state.clone())
        .collect();
    let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
    let ours = dqn.q_values(&refs)?;
    let reference_input = data.transitions[n / 2].state.clone();
    let reference_q = dqn
        .q_values(&[reference_input.as_slice()])?
        .pop()
        .unwrap_or_default();

    // Where the network takes an idle guest: the card's start configuration, walked on
    // the states of the shape with the most data.
    let all = data.states_of(&space.shape());
    let start = match crate::start::idle_start(&space, &all, |batch| dqn.q_values(batch))? {
        crate::start::StartChoice::Chosen(s) => Some(s),
        crate::start::StartChoice::None(why) => {
            log::info!("no start configuration: {why}");
            None
        }
    };

    let bytes = dqn.export_onnx()?;
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "policy".into())
    });
    let description = opts.description.clone().unwrap_or_else(|| {
        format!(
            "DQN Q-network trained offline by `vmm train` on {}",
            opts.state_db
        )
    });
    let mut card = export::card(
        &name,
        &description,
        &space,
        weights,
        data.summary.describe(),
    );
    card.start = start.clone();
    card.evaluation.reference_input = reference_input;
    card.evaluation.reference_q = reference_q;
    let extra = json!({
        "trainer": format!(
            "learner {} (DQN, burn 0.22 ndarray backend, burn-onnx export opset 18)",
            env!("CARGO_PKG_VERSION")
        ),
        "steps": stats.total_steps,
        "final_loss": stats.final_loss,
        "mean_loss": stats.mean_loss,
        "mean_td_error": fit.mean_abs_td,
        "mean_max_q": fit.mean_max_q,
        "greedy_actions": greedy,
        "training_time_s": stats.elapsed.as_secs_f64(),
        "seed": opts.dqn.seed,
        "hyper_parameters": opts.dqn,
        "data": data.summary,
    });
    if let serde_json::Value::Object(map) = extra {
        card.evaluation.extra = map;
    }
    let agreement = export::write_verified(&opts.out, &bytes, card, &space, &states, &ours)?;
    Ok(TrainReport {
        out: opts.out.clone(),
        card: tuner::policy::ModelCard::path_for(&opts.out),
        transitions: data.transitions.len() as u64,
        steps: stats.total_steps,
        final_loss: stats.final_loss,
        mean_td_error: fit.mean_abs_td,
        agreement,
        model_bytes: bytes.len(),
        training_time: stats.elapsed,
        greedy,
        start,
    })
}

/// Re-derives the start configuration ([`crate::start`]) of the model already at
/// `opts.out` from the data of `opts.state_db`, without training: the model's own
/// Q-values (through tract) walk the data's idle states, and only the card's `start`
/// changes (removed when no configuration is chosen). The card is rewritten in place
/// after the model and new card load together; on failure the old card is put back. For
/// cards made before a change to the derivation, or to use more data.
pub fn refresh_start(opts: &TrainOptions) -> Result<Option<StartConfig>, LearnError> {
    opts.validate()?;
    let data = dataset::load_from(&opts.state_db, &opts.dataset)?;
    let weights = card_weights(opts, &data)?;
    let space = data.space();
    let bad_model =
        |e: PolicyError| LearnError::bad_option("out", format!("{}: {e}", opts.out.display()));
    let mut policy = OnnxPolicy::load(&opts.out, &space, Some(&weights)).map_err(bad_model)?;
    let states = data.states_of(&space.shape());
    let choice = crate::start::idle_start(&space, &states, |batch| {
        batch
            .iter()
            .map(|v| policy.q_values(v).map_err(LearnError::Policy))
            .collect()
    })?;
    let start = match choice {
        crate::start::StartChoice::Chosen(s) => Some(s),
        crate::start::StartChoice::None(why) => {
            log::info!("no start configuration: {why}");
            None
        }
    };
    let card_path = ModelCard::path_for(&opts.out);
    let io = |source| LearnError::Io {
        path: card_path.clone(),
        source,
    };
    let old = std::fs::read(&card_path).map_err(io)?;
    let mut card: ModelCard = serde_json::from_slice(&old)
        .map_err(|e| LearnError::bad_option("out", format!("{}: {e}", card_path.display())))?;
    card.start = start.clone();
    let text = export::card_json(&card)?;
    std::fs::write(&card_path, &text).map_err(io)?;
    if let Err(e) = OnnxPolicy::load(&opts.out, &space, Some(&weights)) {
        std::fs::write(&card_path, &old).map_err(io)?;
        return Err(LearnError::Reload(e));
    }
    Ok(start)
}
