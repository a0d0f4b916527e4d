//! Policies: what maps a performance vector to one Q-value per action, and the
//! epsilon-greedy choice among the valid actions.
//!
//! - [`QNetwork`]: a Q-network's interface (one Q-value per action); [`OnnxPolicy`] runs
//!   one exported to ONNX with tract. [`Baseline`]: a baseline's interface (an action,
//!   no Q-values): [`StaticPolicy`] (always `noop`) and [`ThresholdPolicy`] (scale up
//!   above 80% CPU utilisation, down below 30%, with hysteresis; raise the priority of
//!   the busiest device). [`Policy`] is either; the tuner's loop masks, explores and
//!   selects, forecasts for a network that asks for it and applies a network's start
//!   configuration (from its card).
//! - [`ModelCard`]: the JSON file beside a model (`NAME.onnx` -> `NAME.card.json`) naming
//!   the schema version, the input and output sizes, the action list, the reward weights
//!   it was trained for, what it was trained on and its evaluation (a reference input and
//!   the Q-values expected for it). [`ModelCard::validate`] checks it against the running
//!   monitor; errors name the field.
//! - [`select`]: epsilon-greedy over the Q-values with invalid actions masked, driven by a
//!   tiny deterministic PRNG ([`XorShift64`]) and an [`EpsilonSchedule`] (linear decay;
//!   0 for production).
//!
//! # Inputs
//!
//! A policy's input is the normalised performance vector of [`crate::schema`]
//! (`Schema::len()` features); a policy whose [`QNetwork::input_size`] is twice that gets
//! the vector followed by its one-step forecast ([`crate::forecast`]).
//!
//! # Loading an ONNX policy
//!
//! [`OnnxPolicy::load`] reads the card, validates it, reads the model, checks that the
//! graph has one input accepting `[1, input_size]` `f32` and one output of shape
//! `[1, output_size]`, optimises it, and runs it once on zeros and once on the card's
//! reference input (if any): non-finite outputs, or outputs further than 1e-4 (relative
//! to the magnitude, at least absolute) from the card's reference Q-values, are errors.
//! Every failure is a [`PolicyError`]; nothing panics on a bad file (tract panics are
//! caught where the build unwinds).

use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tract_onnx::prelude::{
    tvec, Datum, DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, Tensor,
    TypedFact, TypedOp,
};
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};
use tract_onnx::tract_hir::infer::Factoid;

use crate::actions::{
    Action, ActionSpace, PriorityLevel, VmShape, ACTIONS_VERSION, DRIVE_SLOTS, MAX_VCPUS, NET_SLOTS,
};
use crate::forecast::ForecastConfig;
use crate::manager::KnobState;
use crate::reward::{RewardWeights, REWARD_VERSION};
use crate::sandbox::panic_message;
use crate::schema::{FeatureId, Schema, SchemaSpec, SCHEMA_VERSION};

/// Largest difference between a model's output and the card's reference Q-values,
/// relative to the reference's magnitude (absolute below 1).
pub const REFERENCE_TOLERANCE: f32 = 1e-4;

/// A field of a model card that does not match the running monitor.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("field `{field}`: expected {expected}, found {got}")]
pub struct CardError {
    /// The field (e.g. `schema_version`, `actions[3]`, `reward_weights.cost`).
    pub field: String,
    /// What the running monitor needs.
    pub expected: String,
    /// What the card says.
    pub got: String,
}

impl CardError {
    fn new(field: impl Into<String>, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

/// Errors of policies: loading, validation, inference, selection.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The model file does not exist.
    #[error("policy model {path} not found")]
    ModelMissing {
        /// The model's path.
        path: PathBuf,
    },
    /// The model card beside the model does not exist.
    #[error("model card {path} not found (every policy needs NAME.card.json beside NAME.onnx)")]
    CardMissing {
        /// The card's expected path.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A model or card file was refused (not a regular file, too large).
    #[error("policy file refused: {0}")]
    File(#[source] crate::files::FileError),
    /// The model card is not valid JSON of the card's shape.
    #[error("model card {path} is malformed: {source}")]
    CardJson {
        /// The card.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The model card does not match the running monitor.
    #[error("model card {path} does not match this monitor: {source}")]
    Card {
        /// The card.
        path: PathBuf,
        /// The mismatching field.
        #[source]
        source: CardError,
    },
    /// The ONNX graph could not be parsed, typed or optimised.
    #[error("ONNX model {path} is malformed: {message}")]
    Onnx {
        /// The model.
        path: PathBuf,
        /// tract's explanation.
        message: String,
    },
    /// The graph's inputs or outputs do not have the shape the card announces.
    #[error("ONNX model {path}: {what} is {got}, the card needs {expected}")]
    Shape {
        /// The model.
        path: PathBuf,
        /// What (e.g. `input shape`, `output count`).
        what: &'static str,
        /// What the card needs.
        expected: String,
        /// What the graph has.
        got: String,
    },
    /// An input of the wrong length.
    #[error("policy input has {got} values, the policy takes {expected}")]
    InputLength {
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// Q-values of the wrong length.
    #[error("policy produced {got} Q-values for {expected} actions")]
    OutputLength {
        /// Number of actions.
        expected: usize,
        /// Number produced.
        got: usize,
    },
    /// A NaN or infinite Q-value.
    #[error("policy produced a non-finite Q-value {value} for action {index}")]
    NonFinite {
        /// The action index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The model's output for the card's reference input differs from the card's.
    #[error("Q-value {index} for the card's reference input is {got}, the card says {expected}")]
    Reference {
        /// The action index.
        index: usize,
        /// The card's value.
        expected: f32,
        /// The model's value.
        got: f32,
    },
    /// tract failed while running the model.
    #[error("inference failed: {0}")]
    Inference(String),
    /// tract panicked (caught).
    #[error("tract panicked while {0}")]
    Panicked(String),
    /// Q-values and mask of different lengths.
    #[error("{q} Q-values but {mask} mask entries")]
    MaskLength {
        /// Q-values.
        q: usize,
        /// Mask entries.
        mask: usize,
    },
    /// Every action is masked (cannot happen with a space's mask: `noop` is always valid).
    #[error("every action is masked")]
    NoValidAction,
    /// An epsilon outside `[0, 1]`.
    #[error("epsilon {0} is outside [0, 1]")]
    BadEpsilon(f64),
}

/// What a policy may know besides the vector: the knob settings and per-device load.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyContext {
    /// The knobs as currently set.
    pub knobs: Option<KnobState>,
    /// Completed requests per second per device of the action space (empty if unknown).
    pub device_load: Vec<f64>,
}

/// A Q-network: maps the input vector to one Q-value per action of the space. The
/// tuner's loop masks them, explores epsilon-greedily and picks; it reads the network's
/// forecast factors and start configuration from its card.
pub trait QNetwork: Send {
    /// Identifies the network (model name) in logs and the state repository.
    fn id(&self) -> &str;

    /// One Q-value per action (higher is better). Errors on a wrong input length and on
    /// non-finite outputs.
    fn q_values(&mut self, input: &[f32]) -> Result<Vec<f32>, PolicyError>;

    /// Length of the input: `Schema::len()` (the vector) or twice that (the vector
    /// followed by its one-step forecast).
    fn input_size(&self) -> usize {
        Schema::len()
    }

    /// The network's model card (its forecast factors, its start configuration), when it
    /// has one.
    fn model_card(&self) -> Option<&ModelCard> {
        None
    }
}

/// A baseline: chooses an action from the input vector and the knobs in force (no
/// Q-values). The tuner's loop applies it when the mask allows it, else `noop`.
pub trait Baseline: Send {
    /// Identifies the baseline (`static`, `threshold`) in logs and the state repository.
    fn id(&self) -> &str;

    /// Length of the input it reads (as [`QNetwork::input_size`]).
    fn input_size(&self) -> usize {
        Schema::len()
    }

    /// The action for this interval, knowing the knobs in force and the devices' load.
    fn choose(&mut self, input: &[f32], ctx: &PolicyContext) -> Action;
}

/// What decides for the tuner: a Q-network or a baseline.
pub enum Policy {
    /// A Q-network (ONNX through tract, or a test's).
    Network(Box<dyn QNetwork>),
    /// A baseline.
    Baseline(Box<dyn Baseline>),
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Policy({})", self.id())
    }
}

/// One decision's proposal: Q-values to select from, or a baseline's action.
#[derive(Debug, Clone, PartialEq)]
pub enum Proposal {
    /// One Q-value per action.
    QValues(Vec<f32>),
    /// The action a baseline chose.
    Action(Action),
}

impl Policy {
    /// A Q-network as a policy.
    pub fn network(n: impl QNetwork + 'static) -> Policy {
        Policy::Network(Box::new(n))
    }

    /// A baseline as a policy.
    pub fn baseline(b: impl Baseline + 'static) -> Policy {
        Policy::Baseline(Box::new(b))
    }

    /// The static configuration (always `noop`).
    pub fn static_for(space: &ActionSpace) -> Policy {
        Policy::baseline(StaticPolicy::new(space))
    }

    /// The id of the network or baseline.
    pub fn id(&self) -> &str {
        match self {
            Policy::Network(n) => n.id(),
            Policy::Baseline(b) => b.id(),
        }
    }

    /// The input length it reads.
    pub fn input_size(&self) -> usize {
        match self {
            Policy::Network(n) => n.input_size(),
            Policy::Baseline(b) => b.input_size(),
        }
    }

    /// The network's model card, if a network with one.
    pub fn model_card(&self) -> Option<&ModelCard> {
        match self {
            Policy::Network(n) => n.model_card(),
            Policy::Baseline(_) => None,
        }
    }

    /// Its proposal for `input` (`ctx`: the knobs in force and the devices' load, which
    /// only baselines read).
    pub fn propose(&mut self, input: &[f32], ctx: &PolicyContext) -> Result<Proposal, PolicyError> {
        match self {
            Policy::Network(n) => n.q_values(input).map(Proposal::QValues),
            Policy::Baseline(b) => {
                if input.len() != b.input_size() {
                    return Err(PolicyError::InputLength {
                        expected: b.input_size(),
                        got: input.len(),
                    });
                }
                Ok(Proposal::Action(b.choose(input, ctx)))
            }
        }
    }
}

/// The reference evaluation recorded in a model card.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// A reference input (`input_size` values), or empty.
    #[serde(default)]
    pub reference_input: Vec<f32>,
    /// The Q-values the network gives for `reference_input` (`output_size` values), or
    /// empty.
    #[serde(default)]
    pub reference_q: Vec<f32>,
    /// Anything else (rewards reached in evaluation, notes).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The model card of an ONNX policy (`NAME.card.json` beside `NAME.onnx`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// Policy name (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// [`SCHEMA_VERSION`] of the vector the network was trained on.
    pub schema_version: u32,
    /// Input length: `Schema::len()`, or twice that with the forecast appended.
    pub input_size: usize,
    /// Output length: the number of actions.
    pub output_size: usize,
    /// [`ACTIONS_VERSION`] of the action layout.
    pub actions_version: u32,
    /// The action names in output order (see [`crate::actions`]).
    pub actions: Vec<String>,
    /// The VM shapes the policy serves (required since actions v2); a VM outside them
    /// is refused.
    #[serde(default)]
    pub serves: Option<ShapeRange>,
    /// [`REWARD_VERSION`] of the reward it was trained for (cards written before reward
    /// v3 have none: 2).
    #[serde(default = "legacy_reward_version")]
    pub reward_version: u32,
    /// The reward weights it was trained for.
    pub reward_weights: RewardWeights,
    /// What it was trained on (workloads, VM shapes, episodes).
    #[serde(default)]
    pub trained_on: String,
    /// Its evaluation, including the reference input and Q-values checked at load.
    #[serde(default)]
    pub evaluation: Evaluation,
    /// Holt factors of the forecast it was trained with (when `input_size` is twice the
    /// schema's length); defaults when absent.
    #[serde(default)]
    pub forecast: Option<ForecastConfig>,
    /// The full schema description ([`Schema::to_json`]), checked when present.
    #[serde(default)]
    pub schema: Option<SchemaSpec>,
    /// The configuration the policy starts a VM in (absent: the VM's own configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartConfig>,
}

/// The VM shapes a policy serves: inclusive `[lowest, highest]` ranges of vCPUs, drives
/// and network devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeRange {
    /// vCPUs the VM was created with.
    pub vcpus: [u32; 2],
    /// Drives.
    pub drives: [usize; 2],
    /// Network devices.
    pub nets: [usize; 2],
}

impl ShapeRange {
    /// Every shape the action layout covers: 1 to [`MAX_VCPUS`] vCPUs (the vector's
    /// scale), 0 to [`DRIVE_SLOTS`] drives, 0 to [`NET_SLOTS`] network devices.
    pub const LAYOUT: ShapeRange = ShapeRange {
        vcpus: [1, MAX_VCPUS],
        drives: [0, DRIVE_SLOTS],
        nets: [0, NET_SLOTS],
    };

    /// Checks the ranges: ordered, at least one vCPU, within [`ShapeRange::LAYOUT`].
    fn validate(&self) -> Result<(), CardError> {
        fn one<T: PartialOrd + Copy + fmt::Display>(
            field: &str,
            [lo, hi]: [T; 2],
            [min, max]: [T; 2],
        ) -> Result<(), CardError> {
            if lo > hi || lo < min || hi > max {
                return Err(CardError::new(
                    format!("serves.{field}"),
                    format!("an ordered range within [{min}, {max}] (the action layout's)"),
                    format!("[{lo}, {hi}]"),
                ));
            }
            Ok(())
        }
        one("vcpus", self.vcpus, Self::LAYOUT.vcpus)?;
        one("drives", self.drives, Self::LAYOUT.drives)?;
        one("nets", self.nets, Self::LAYOUT.nets)
    }

    /// Whether `shape` is within the ranges; the error names the first that is not.
    pub fn check(&self, shape: &VmShape) -> Result<(), CardError> {
        fn one<T: PartialOrd + Copy + fmt::Display>(
            field: &str,
            what: &str,
            [lo, hi]: [T; 2],
            have: T,
        ) -> Result<(), CardError> {
            if have < lo || have > hi {
                return Err(CardError::new(
                    format!("serves.{field}"),
                    format!("a range that includes this VM's {have} {what}"),
                    format!("[{lo}, {hi}] (the policy serves VMs of {lo} to {hi} {what})"),
                ));
            }
            Ok(())
        }
        one("vcpus", "vCPUs", self.vcpus, shape.vcpus)?;
        one("drives", "drives", self.drives, shape.drives)?;
        one("nets", "network devices", self.nets, shape.nets)
    }
}

fn legacy_reward_version() -> u32 {
    2
}

/// The versions a card declares, read before the rest of it, so that a card of another
/// schema or reward version is refused by name rather than as malformed.
#[derive(Deserialize)]
struct CardVersions {
    schema_version: Option<u32>,
    #[serde(default = "legacy_reward_version")]
    reward_version: u32,
}

/// The knobs a policy sets before the guest's first interval: the configuration it holds
/// on an idle guest, found by the trainer (see `learner::start`). Starting there instead
/// of walking one knob per interval from the VM's configuration saves the first
/// intervals of every run. Knobs the user sets explicitly are left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartConfig {
    /// vCPUs the guest starts with (clamped to the VM's bounds).
    pub active_vcpus: u32,
    /// Per drive slot, in order (at most [`DRIVE_SLOTS`]); applied to the drives the
    /// VM has, the others ignored.
    pub drives: Vec<DriveStart>,
    /// How the trainer chose it (for people reading the card).
    #[serde(default)]
    pub basis: String,
}

/// One drive's start setting in a [`StartConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveStart {
    /// Level of [`crate::actions::RATE_LADDER`] (0 unlimited .. 4 tightest).
    pub rate_level: usize,
    /// I/O priority.
    pub priority: PriorityLevel,
}

impl StartConfig {
    /// The knob state `base` takes under this start configuration within `bounds`, for
    /// the knobs `pinned` does not hold (the user set them explicitly): vCPUs clamped to
    /// the bounds, each drive's rate level and priority.
    pub fn apply_to(
        &self,
        base: &KnobState,
        bounds: &crate::manager::Bounds,
        pinned: &Pinned,
    ) -> KnobState {
        let mut s = base.clone();
        if !pinned.vcpus {
            s.vcpus = self.active_vcpus.clamp(bounds.min_vcpus, bounds.max_vcpus);
        }
        for (i, d) in self.drives.iter().enumerate() {
            let pin = pinned.drives.get(i).copied().unwrap_or_default();
            if let (false, Some(level)) = (pin.rate_level, s.rate_level.get_mut(i)) {
                *level = d.rate_level;
            }
            if let (false, Some(p)) = (pin.priority, s.priority.get_mut(i)) {
                *p = d.priority;
            }
        }
        s
    }

    fn validate(&self) -> Result<(), CardError> {
        if self.active_vcpus == 0 {
            return Err(CardError::new(
                "start.active_vcpus",
                "at least 1",
                self.active_vcpus,
            ));
        }
        if self.drives.len() > DRIVE_SLOTS {
            return Err(CardError::new(
                "start.drives",
                format!("at most {DRIVE_SLOTS} entries (the drive slots)"),
                format!("{} entries", self.drives.len()),
            ));
        }
        let top = crate::actions::RATE_LADDER.len() - 1;
        for (i, d) in self.drives.iter().enumerate() {
            if d.rate_level > top {
                return Err(CardError::new(
                    format!("start.drives[{i}].rate_level"),
                    format!("a level in 0..={top}"),
                    d.rate_level,
                ));
            }
        }
        Ok(())
    }
}

/// Knobs the user set explicitly, which a policy's [`StartConfig`] leaves alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    /// `active_vcpus` was given.
    pub vcpus: bool,
    /// Per drive of the action space.
    pub drives: Vec<PinnedDrive>,
}

/// One drive's explicitly set knobs (see [`Pinned`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinnedDrive {
    /// A rate limit or level was given.
    pub rate_level: bool,
    /// A priority was given.
    pub priority: bool,
}

impl ModelCard {
    /// Parses a card.
    pub fn from_json(text: &str) -> Result<ModelCard, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Checks the schema and reward versions a card's text declares, before parsing the
    /// rest (whose fields differ between versions). Text that is not a JSON object with
    /// them passes: the full parse reports it.
    pub fn check_versions(text: &[u8]) -> Result<(), CardError> {
        let Ok(v) = serde_json::from_slice::<CardVersions>(text) else {
            return Ok(());
        };
        if let Some(schema) = v.schema_version.filter(|s| *s != SCHEMA_VERSION) {
            return Err(CardError::new(
                "schema_version",
                format!("{SCHEMA_VERSION} (this monitor's performance vector; retrain the policy)"),
                schema,
            ));
        }
        if v.reward_version != REWARD_VERSION {
            return Err(CardError::new(
                "reward_version",
                format!("{REWARD_VERSION} (this monitor's reward: SLOs and resources left to others; retrain the policy)"),
                v.reward_version,
            ));
        }
        Ok(())
    }

    /// The card path of a model: `dir/NAME.onnx` -> `dir/NAME.card.json`.
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("card.json")
    }

    /// Checks the card against the running monitor: schema version (and schema, when
    /// given), input size, actions version, output size, action layout, the VM shapes it
    /// serves (this VM's, `space.shape()`, must be within them), reward weights (against
    /// `weights` when given; always finite and non-negative), forecast factors and the
    /// shape of the reference evaluation. The error names the first bad field.
    pub fn validate(
        &self,
        space: &ActionSpace,
        weights: Option<&RewardWeights>,
    ) -> Result<(), CardError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(CardError::new(
                "schema_version",
                SCHEMA_VERSION,
                self.schema_version,
            ));
        }
        if self.reward_version != REWARD_VERSION {
            return Err(CardError::new(
                "reward_version",
                REWARD_VERSION,
                self.reward_version,
            ));
        }
        if let Some(spec) = &self.schema {
            Schema::check_spec(spec)
                .map_err(|e| CardError::new("schema", "this monitor's schema", e))?;
        }
        let n = Schema::len();
        if self.input_size != n && self.input_size != 2 * n {
            return Err(CardError::new(
                "input_size",
                format!("{n} (vector) or {} (vector + forecast)", 2 * n),
                self.input_size,
            ));
        }
        if self.actions_version != ACTIONS_VERSION {
            return Err(CardError::new(
                "actions_version",
                format!(
                    "{ACTIONS_VERSION} (one action layout for every VM shape; a policy of \
                     layout {} must be retrained)",
                    self.actions_version
                ),
                self.actions_version,
            ));
        }
        if self.output_size != space.len() {
            return Err(CardError::new(
                "output_size",
                format!("{} (the actions of layout v{ACTIONS_VERSION})", space.len()),
                self.output_size,
            ));
        }
        space.check_names(&self.actions).map_err(|e| match e {
            crate::actions::ActionError::NameMismatch {
                index,
                expected,
                got,
            } => CardError::new(format!("actions[{index}]"), expected, got),
            other => CardError::new("actions", format!("{} actions", space.len()), other),
        })?;
        let serves = self.serves.as_ref().ok_or_else(|| {
            CardError::new(
                "serves",
                "the VM shapes the policy serves (vcpus, drives, nets ranges)",
                "nothing",
            )
        })?;
        serves.validate()?;
        serves.check(&space.shape())?;
        for (name, value) in self.reward_weights.named() {
            if !value.is_finite() || value < 0.0 {
                return Err(CardError::new(
                    format!("reward_weights.{name}"),
                    "a finite, non-negative weight",
                    value,
                ));
            }
        }
        if let Some(w) = weights {
            for ((name, want), (_, got)) in w.named().into_iter().zip(self.reward_weights.named()) {
                if (want - got).abs() > 1e-9 * want.abs().max(1.0) {
                    return Err(CardError::new(
                        format!("reward_weights.{name}"),
                        format!("{want} (this VM's configuration)"),
                        got,
                    ));
                }
            }
        }
        if let Some(f) = &self.forecast {
            f.validate()
                .map_err(|e| CardError::new("forecast", "valid Holt factors", e))?;
        }
        if let Some(start) = &self.start {
            start.validate()?;
        }
        let ev = &self.evaluation;
        if !ev.reference_input.is_empty() || !ev.reference_q.is_empty() {
            if ev.reference_input.len() != self.input_size {
                return Err(CardError::new(
                    "evaluation.reference_input",
                    format!("{} values", self.input_size),
                    format!("{} values", ev.reference_input.len()),
                ));
            }
            if ev.reference_q.len() != self.output_size {
                return Err(CardError::new(
                    "evaluation.reference_q",
                    format!("{} values", self.output_size),
                    format!("{} values", ev.reference_q.len()),
                ));
            }
            if let Some(i) = ev
                .reference_input
                .iter()
                .chain(&ev.reference_q)
                .position(|v| !v.is_finite())
            {
                return Err(CardError::new(
                    "evaluation",
                    "finite reference values",
                    format!("a non-finite value at position {i}"),
                ));
            }
        }
        Ok(())
    }
}

type Plan = SimplePlan<TypedFact, Box<dyn TypedOp>>;
type PlanState = SimpleState<TypedFact, Box<dyn TypedOp>>;

/// A Q-network exported to ONNX, run with tract.
pub struct OnnxPolicy {
    id: String,
    card: ModelCard,
    state: PlanState,
    input_size: usize,
    output_size: usize,
}

impl fmt::Debug for OnnxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxPolicy")
            .field("id", &self.id)
            .field("input_size", &self.input_size)
            .field("output_size", &self.output_size)
            .finish_non_exhaustive()
    }
}

/// Reads a model or card file: a regular file only (a FIFO or `/dev/zero` is refused
/// without blocking), at most `cap` bytes.
fn read(
    path: &Path,
    cap: u64,
    missing: impl FnOnce(PathBuf) -> PolicyError,
) -> Result<Vec<u8>, PolicyError> {
    crate::files::read_capped(path, cap).map_err(|e| {
        if e.is_not_found() {
            missing(path.to_path_buf())
        } else {
            PolicyError::File(e)
        }
    })
}

/// Runs the inference library's one-time, process-wide set-up now: its probe of the CPU's
/// instruction sets, which on a CPU with AMX also asks the kernel for the AMX register
/// state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). The monitor calls this before it installs
/// its seccomp filters, so that a policy first loaded later (`PUT /policy` on the
/// filtered event-loop thread) does not make a system call the filter kills the process
/// for. Cheap, and idempotent.
pub fn prepare_inference() {
    let isa = tract_onnx::prelude::tract_linalg::isa::native();
    log::debug!("inference instruction sets: {isa:?}");
}

impl OnnxPolicy {
    /// Loads `path` (an `.onnx` file) and its card (`NAME.card.json` beside it), validates
    /// both against `space`, the running schema and, when given, the VM's reward
    /// `weights`, and probes the network (see the module documentation).
    pub fn load(
        path: impl AsRef<Path>,
        space: &ActionSpace,
        weights: Option<&RewardWeights>,
    ) -> Result<OnnxPolicy, PolicyError> {
        let path = path.as_ref();
        let card_path = ModelCard::path_for(path);
        let card_text = read(&card_path, crate::files::TEXT_CAP, |path| {
            PolicyError::CardMissing { path }
        })?;
        ModelCard::check_versions(&card_text).map_err(|source| PolicyError::Card {
            path: card_path.clone(),
            source,
        })?;
        let card: ModelCard =
            serde_json::from_slice(&card_text).map_err(|source| PolicyError::CardJson {
                path: card_path.clone(),
                source,
            })?;
        card.validate(space, weights)
            .map_err(|source| PolicyError::Card {
                path: card_path.clone(),
                source,
            })?;
        let bytes = read(path, crate::files::MODEL_CAP, |path| {
            PolicyError::ModelMissing { path }
        })?;
        let mut card = card;
        if card.name.is_empty() {
            card.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "onnx".to_string());
        }
        Self::from_parts(path, &bytes, card)
    }

    /// Builds a policy from model bytes and an already validated card (`path` only
    /// names the model in errors).
    pub fn from_parts(
        path: &Path,
        bytes: &[u8],
        card: ModelCard,
    ) -> Result<OnnxPolicy, PolicyError> {
        let plan = panic::catch_unwind(AssertUnwindSafe(|| {
            Self::build(path, bytes, card.input_size, card.output_size)
        }))
        .map_err(|p| {
            PolicyError::Panicked(format!(
                "loading {}: {}",
                path.display(),
                panic_message(&*p)
            ))
        })??;
        let state = plan
            .spawn()
            .map_err(|e| PolicyError::Inference(format!("{e:#}")))?;
        let mut policy = OnnxPolicy {
            id: card.name.clone(),
            input_size: card.input_size,
            output_size: card.output_size,
            card,
            state,
        };
        policy.q_values(&vec![0.0; policy.input_size])?;
        let ev = policy.card.evaluation.clone();
        if !ev.reference_input.is_empty() {
            let q = policy.q_values(&ev.reference_input)?;
            for (index, (got, expected)) in q.iter().zip(&ev.reference_q).enumerate() {
                if (got - expected).abs() > REFERENCE_TOLERANCE * expected.abs().max(1.0) {
                    return Err(PolicyError::Reference {
                        index,
                        expected: *expected,
                        got: *got,
                    });
                }
            }
        }
        Ok(policy)
    }

    fn build(
        path: &Path,
        bytes: &[u8],
        input_size: usize,
        output_size: usize,
    ) -> Result<Arc<Plan>, PolicyError> {
        let onnx_err = |stage: &str, e: tract_onnx::prelude::TractError| PolicyError::Onnx {
            path: path.to_path_buf(),
            message: format!("{stage}: {e:#}"),
        };
        let shape_err = |what: &'static str, expected: String, got: String| PolicyError::Shape {
            path: path.to_path_buf(),
            what,
            expected,
            got,
        };
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| onnx_err("parsing", e))?;
        let inputs = model.input_outlets().map(|o| o.len()).unwrap_or(0);
        if inputs != 1 {
            return Err(shape_err("input count", "1".into(), inputs.to_string()));
        }
        let outputs = model.output_outlets().map(|o| o.len()).unwrap_or(0);
        if outputs != 1 {
            return Err(shape_err("output count", "1".into(), outputs.to_string()));
        }
        let want = format!("[1, {input_size}]");
        if let Ok(fact) = model.input_fact(0) {
            if let Ok(Some(dims)) = fact.shape.as_concrete_finite() {
                if dims.as_slice() != [1, input_size] {
                    return Err(shape_err("input shape", want, format!("{dims:?}")));
                }
            }
            if let Some(dt) = fact.datum_type.concretize() {
                if dt != f32::datum_type() {
                    return Err(shape_err("input type", "f32".into(), format!("{dt:?}")));
                }
            }
        }
        let typed = model
            .with_input_fact(
                0,
                InferenceFact::dt_shape(f32::datum_type(), tvec!(1usize, input_size)),
            )
            .map_err(|e| onnx_err("setting the input", e))?
            .into_typed()
            .map_err(|e| onnx_err(&format!("typing with input {want}"), e))?;
        let out = typed
            .output_fact(0)
            .map_err(|e| onnx_err("reading the output", e))?;
        let got_shape = out
            .shape
            .as_concrete()
            .map_or_else(|| format!("{:?}", out.shape), |s| format!("{s:?}"));
        if out.shape.as_concrete() != Some(&[1, output_size][..]) {
            return Err(shape_err(
                "output shape",
                format!("[1, {output_size}]"),
                got_shape,
            ));
        }
        if out.datum_type != DatumType::F32 {
            return Err(shape_err(
                "output type",
                "f32".into(),
                format!("{:?}", out.datum_type),
            ));
        }
        typed
            .into_optimized()
            .map_err(|e| onnx_err("optimising", e))?
            .into_runnable()
            .map_err(|e| onnx_err("planning", e))
    }

    /// The policy's model card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, PolicyError> {
        let tensor = Tensor::from_shape(&[1, input.len()], input)
            .map_err(|e| PolicyError::Inference(format!("{e:#}")))?;
        let out = self
            .state
            .run(tvec!(tensor.into()))
            .map_err(|e| PolicyError::Inference(format!("{e:#}")))?;
        let first = out
            .first()
            .ok_or_else(|| PolicyError::Inference("the model produced no output".into()))?;
        let view = first
            .to_plain_array_view::<f32>()
            .map_err(|e| PolicyError::Inference(format!("{e:#}")))?;
        Ok(view.iter().copied().collect())
    }
}

/// Checks a Q-vector's length and finiteness.
pub fn check_q(q: &[f32], n_actions: usize) -> Result<(), PolicyError> {
    if q.len() != n_actions {
        return Err(PolicyError::OutputLength {
            expected: n_actions,
            got: q.len(),
        });
    }
    if let Some((index, value)) = q.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(PolicyError::NonFinite {
            index,
            value: *value,
        });
    }
    Ok(())
}

impl QNetwork for OnnxPolicy {
    fn id(&self) -> &str {
        &self.id
    }

    fn q_values(&mut self, input: &[f32]) -> Result<Vec<f32>, PolicyError> {
        if input.len() != self.input_size {
            return Err(PolicyError::InputLength {
                expected: self.input_size,
                got: input.len(),
            });
        }
        let q = panic::catch_unwind(AssertUnwindSafe(|| self.run(input)))
            .map_err(|p| PolicyError::Panicked(format!("running: {}", panic_message(&*p))))??;
        check_q(&q, self.output_size)?;
        Ok(q)
    }

    fn input_size(&self) -> usize {
        self.input_size
    }

    fn model_card(&self) -> Option<&ModelCard> {
        Some(&self.card)
    }
}

/// Loads an ONNX policy, or falls back to [`StaticPolicy`] when anything is wrong (the
/// monitor then runs on its static configuration). The error, if any, is returned for
/// logging and storing.
pub fn load_or_static(
    path: impl AsRef<Path>,
    space: &ActionSpace,
    weights: Option<&RewardWeights>,
) -> (Policy, Option<PolicyError>) {
    match OnnxPolicy::load(path.as_ref(), space, weights) {
        Ok(p) => (Policy::network(p), None),
        Err(e) => {
            log::error!("policy not loaded, running on the static configuration: {e}");
            (Policy::static_for(space), Some(e))
        }
    }
}

/// The static configuration as a baseline: always `noop`.
#[derive(Debug, Clone)]
pub struct StaticPolicy;

impl StaticPolicy {
    /// The static policy (for any action space: `noop` is in every one).
    pub fn new(_space: &ActionSpace) -> StaticPolicy {
        StaticPolicy
    }
}

impl Baseline for StaticPolicy {
    fn id(&self) -> &str {
        "static"
    }

    fn choose(&mut self, _input: &[f32], _ctx: &PolicyContext) -> Action {
        Action::NoOp
    }
}

/// Thresholds of [`ThresholdPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThresholdConfig {
    /// Scale up when CPU utilisation is above this (default 0.8).
    pub up: f32,
    /// Scale down when CPU utilisation is below this (default 0.3).
    pub down: f32,
    /// Consecutive intervals beyond a threshold before acting (default 2).
    pub hold: u32,
    /// Act on the larger of the current and the forecast utilisation (input twice the
    /// schema's length; default false).
    pub predictive: bool,
}

impl Default for ThresholdConfig {
    fn default() -> Self {
        Self {
            up: 0.8,
            down: 0.3,
            hold: 2,
            predictive: false,
        }
    }
}

/// The threshold heuristic (Kubernetes-HPA style), a baseline:
///
/// 1. CPU utilisation above `up` for `hold` consecutive intervals: `vcpu+1`; below
///    `down` for `hold` intervals: `vcpu-1` (the band between is the hysteresis; the
///    count restarts after each action). In predictive mode the utilisation is the
///    larger of the current one and the one-step forecast.
/// 2. Otherwise, if the busiest device (highest request rate, from the context) is not
///    at high priority: `prio:DEV:high`; else if another device is at high priority:
///    back to `medium`.
/// 3. Otherwise `noop`.
#[derive(Debug, Clone)]
pub struct ThresholdPolicy {
    config: ThresholdConfig,
    space: ActionSpace,
    above: u32,
    below: u32,
    ctx: PolicyContext,
}

impl ThresholdPolicy {
    /// The heuristic for `space`.
    pub fn new(space: &ActionSpace, config: ThresholdConfig) -> ThresholdPolicy {
        ThresholdPolicy {
            config,
            space: space.clone(),
            above: 0,
            below: 0,
            ctx: PolicyContext::default(),
        }
    }

    fn pick(&mut self, input: &[f32]) -> Action {
        let n = Schema::len();
        let at = FeatureId::CpuUtilisation.index();
        let current = input.get(at).copied().unwrap_or(0.0);
        let util = if self.config.predictive {
            current.max(input.get(n + at).copied().unwrap_or(0.0))
        } else {
            current
        };
        if util > self.config.up {
            self.above += 1;
        } else {
            self.above = 0;
        }
        if util < self.config.down {
            self.below += 1;
        } else {
            self.below = 0;
        }
        let hold = self.config.hold.max(1);
        if self.above >= hold {
            self.above = 0;
            return Action::VcpuDelta(1);
        }
        if self.below >= hold {
            self.below = 0;
            return Action::VcpuDelta(-1);
        }
        let Some(knobs) = &self.ctx.knobs else {
            return Action::NoOp;
        };
        let busiest = self
            .ctx
            .device_load
            .iter()
            .enumerate()
            .take(self.space.shape().tuned_drives())
            .filter(|(_, l)| l.is_finite() && **l > 0.0)
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        if let Some(device) = busiest {
            if knobs.priority.get(device) != Some(&PriorityLevel::High) {
                return Action::Priority {
                    device,
                    level: PriorityLevel::High,
                };
            }
            if let Some(other) = knobs
                .priority
                .iter()
                .enumerate()
                .position(|(i, p)| i != device && *p == PriorityLevel::High)
            {
                return Action::Priority {
                    device: other,
                    level: PriorityLevel::Medium,
                };
            }
        }
        Action::NoOp
    }
}

impl Baseline for ThresholdPolicy {
    fn id(&self) -> &str {
        if self.config.predictive {
            "threshold-predictive"
        } else {
            "threshold"
        }
    }

    fn input_size(&self) -> usize {
        if self.config.predictive {
            2 * Schema::len()
        } else {
            Schema::len()
        }
    }

    fn choose(&mut self, input: &[f32], ctx: &PolicyContext) -> Action {
        self.ctx = ctx.clone();
        self.pick(input)
    }
}

/// xorshift64* : a tiny deterministic PRNG for exploration (not for cryptography).
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator seeded with `seed` (0 is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
        }
    }
}

/// Exploration rate over decisions: linear from `start` to `end` over `decay_steps`
/// decisions, then `end`. The default is 0 throughout (greedy: production).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpsilonSchedule {
    /// Epsilon at the first decision.
    pub start: f64,
    /// Epsilon from `decay_steps` on.
    pub end: f64,
    /// Decisions over which epsilon goes from `start` to `end` (0: `end` at once).
    pub decay_steps: u64,
}

impl EpsilonSchedule {
    /// A constant epsilon.
    pub fn constant(epsilon: f64) -> EpsilonSchedule {
        EpsilonSchedule {
            start: epsilon,
            end: epsilon,
            decay_steps: 0,
        }
    }

    /// Checks that both ends are in `[0, 1]`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for e in [self.start, self.end] {
            if !(0.0..=1.0).contains(&e) {
                return Err(PolicyError::BadEpsilon(e));
            }
        }
        Ok(())
    }

    /// Epsilon at decision `step` (0-based).
    pub fn value(&self, step: u64) -> f64 {
        if step >= self.decay_steps {
            return self.end;
        }
        let frac = step as f64 / self.decay_steps as f64;
        self.start + (self.end - self.start) * frac
    }
}

/// An action choice and how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// Index of the chosen action.
    pub index: usize,
    /// Whether it was a random exploration step.
    pub explored: bool,
}

/// Epsilon-greedy choice among the valid actions: with probability `epsilon` a uniformly
/// random valid action, else the valid action of highest Q-value (NaN counts as lowest;
/// ties go to the lowest index). Returns the action's index.
pub fn select(
    q: &[f32],
    mask: &[bool],
    epsilon: f64,
    rng: &mut XorShift64,
) -> Result<usize, PolicyError> {
    select_explained(q, mask, epsilon, rng).map(|s| s.index)
}

/// The actions `mask` allows (in order), and, when the epsilon draw says to explore, one
/// of them drawn uniformly. Errors on an epsilon outside 0..=1 or a mask allowing nothing.
pub(crate) fn valid_or_explore(
    mask: &[bool],
    epsilon: f64,
    rng: &mut XorShift64,
) -> Result<(Vec<usize>, Option<usize>), PolicyError> {
    if !(0.0..=1.0).contains(&epsilon) {
        return Err(PolicyError::BadEpsilon(epsilon));
    }
    let valid: Vec<usize> = mask
        .iter()
        .enumerate()
        .filter_map(|(i, ok)| ok.then_some(i))
        .collect();
    if valid.is_empty() {
        return Err(PolicyError::NoValidAction);
    }
    let explore =
        (epsilon > 0.0 && rng.next_f64() < epsilon).then(|| valid[rng.below(valid.len())]);
    Ok((valid, explore))
}

/// [`select`], also telling whether the choice explored.
pub fn select_explained(
    q: &[f32],
    mask: &[bool],
    epsilon: f64,
    rng: &mut XorShift64,
) -> Result<Selection, PolicyError> {
    if q.len() != mask.len() {
        return Err(PolicyError::MaskLength {
            q: q.len(),
            mask: mask.len(),
        });
    }
    let (valid, explore) = valid_or_explore(mask, epsilon, rng)?;
    if let Some(index) = explore {
        return Ok(Selection {
            index,
            explored: true,
        });
    }
    let key = |i: usize| {
        let v = q[i];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    };
    let mut best = valid[0];
    for &i in &valid[1..] {
        if key(i) > key(best) {
            best = i;
        }
    }
    Ok(Selection {
        index: best,
        explored: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::Bounds;

    fn input_with_util(util: f32) -> Vec<f32> {
        let mut v = vec![0.0; Schema::len()];
        v[FeatureId::CpuUtilisation.index()] = util;
        v
    }

    #[test]
    fn greedy_selection_respects_the_mask() {
        let mut rng = XorShift64::new(7);
        let q = [0.1, 0.9, 0.5, f32::NAN];
        assert_eq!(select(&q, &[true; 4], 0.0, &mut rng).unwrap(), 1);
        assert_eq!(
            select(&q, &[true, false, true, true], 0.0, &mut rng).unwrap(),
            2
        );
        assert_eq!(
            select(&q, &[true, false, false, true], 0.0, &mut rng).unwrap(),
            0,
            "NaN ranks lowest"
        );
        assert_eq!(
            select(&[0.3, 0.3], &[true, true], 0.0, &mut rng).unwrap(),
            0,
            "ties go to the lowest index"
        );
        assert!(matches!(
            select(&q, &[false; 4], 0.0, &mut rng),
            Err(PolicyError::NoValidAction)
        ));
        assert!(matches!(
            select(&q, &[true; 3], 0.0, &mut rng),
            Err(PolicyError::MaskLength { q: 4, mask: 3 })
        ));
        assert!(matches!(
            select(&q, &[true; 4], 1.5, &mut rng),
            Err(PolicyError::BadEpsilon(_))
        ));
    }

    #[test]
    fn exploration_is_uniform_over_valid_actions_and_deterministic() {
        let q = [0.0, 1.0, 0.0, 0.0, 0.0];
        let mask = [true, true, false, true, true];
        let mut rng = XorShift64::new(42);
        let mut counts = [0usize; 5];
        let mut explored = 0;
        for _ in 0..20_000 {
            let s = select_explained(&q, &mask, 1.0, &mut rng).unwrap();
            counts[s.index] += 1;
            explored += usize::from(s.explored);
        }
        assert_eq!(explored, 20_000);
        assert_eq!(counts[2], 0, "masked action never explored");
        for i in [0, 1, 3, 4] {
            assert!((4_500..5_500).contains(&counts[i]), "{counts:?}");
        }
        // epsilon 0.1: about 10% exploration, the rest greedy.
        let mut rng = XorShift64::new(42);
        let greedy = (0..10_000)
            .filter(|_| select(&q, &mask, 0.1, &mut rng).unwrap() == 1)
            .count();
        assert!((9_100..9_400).contains(&greedy), "{greedy}");
        // Same seed, same choices.
        let run = |seed| {
            let mut rng = XorShift64::new(seed);
            (0..50)
                .map(|_| select(&q, &mask, 0.5, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn xorshift_basics() {
        let mut a = XorShift64::new(0);
        let mut b = XorShift64::new(0);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(a.next_u64(), 0);
        for _ in 0..1000 {
            let f = a.next_f64();
            assert!((0.0..1.0).contains(&f));
            assert!(a.below(7) < 7);
        }
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn epsilon_decays_linearly() {
        let s = EpsilonSchedule {
            start: 1.0,
            end: 0.1,
            decay_steps: 10,
        };
        assert_eq!(s.value(0), 1.0);
        assert!((s.value(5) - 0.55).abs() < 1e-12);
        assert_eq!(s.value(10), 0.1);
        assert_eq!(s.value(1_000), 0.1);
        assert_eq!(EpsilonSchedule::default().value(0), 0.0);
        assert_eq!(EpsilonSchedule::constant(0.2).value(99), 0.2);
        s.validate().unwrap();
        assert!(EpsilonSchedule::constant(-0.1).validate().is_err());
        let parsed: EpsilonSchedule =
            serde_json::from_str(r#"{"start": 0.5, "decay_steps": 100}"#).unwrap();
        assert_eq!(parsed.end, 0.0);
    }

    #[test]
    fn static_policy_always_chooses_noop() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let mut p = Policy::static_for(&space);
        let ctx = PolicyContext::default();
        assert_eq!(
            p.propose(&input_with_util(0.99), &ctx).unwrap(),
            Proposal::Action(Action::NoOp)
        );
        assert_eq!(p.id(), "static");
        assert!(p.model_card().is_none());
        assert!(p.propose(&[0.0; 3], &ctx).is_err());
    }

    #[test]
    fn threshold_policy_scales_with_hysteresis() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let mut p = ThresholdPolicy::new(&space, ThresholdConfig::default());
        let ctx = PolicyContext::default();
        let up = Action::VcpuDelta(1);
        let down = Action::VcpuDelta(-1);
        let mut pick = |util: f32| p.choose(&input_with_util(util), &ctx);
        assert_eq!(pick(0.9), Action::NoOp, "one interval above is not enough");
        assert_eq!(pick(0.9), up);
        assert_eq!(pick(0.9), Action::NoOp, "count restarts after acting");
        assert_eq!(pick(0.5), Action::NoOp);
        assert_eq!(pick(0.2), Action::NoOp);
        assert_eq!(pick(0.6), Action::NoOp, "back in the band resets");
        assert_eq!(pick(0.2), Action::NoOp);
        assert_eq!(pick(0.1), down);
        let mut policy = Policy::baseline(ThresholdPolicy::new(&space, ThresholdConfig::default()));
        assert!(matches!(
            policy.propose(&[0.0; 5], &ctx),
            Err(PolicyError::InputLength { .. })
        ));
    }

    #[test]
    fn threshold_policy_predicts_and_prioritises_the_busiest_device() {
        let space = ActionSpace::new(VmShape::new(4, 2, 0));
        let config = ThresholdConfig {
            hold: 1,
            predictive: true,
            ..ThresholdConfig::default()
        };
        let mut p = ThresholdPolicy::new(&space, config);
        assert_eq!(Baseline::input_size(&p), 2 * Schema::len());
        assert_eq!(Baseline::id(&p), "threshold-predictive");
        let n = Schema::len();
        let util = FeatureId::CpuUtilisation.index();
        let mut input = vec![0.5; 2 * n];
        input[util] = 0.7;
        input[n + util] = 0.85; // rising: the forecast crosses the threshold first
        let none = PolicyContext::default();
        assert_eq!(p.choose(&input, &none), Action::VcpuDelta(1));

        let mut knobs = KnobState::initial(&space, 2);
        let ctx = |knobs: &KnobState, load: Vec<f64>| PolicyContext {
            knobs: Some(knobs.clone()),
            device_load: load,
        };
        input[util] = 0.5;
        input[n + util] = 0.5;
        let raise = Action::Priority {
            device: 1,
            level: PriorityLevel::High,
        };
        assert_eq!(p.choose(&input, &ctx(&knobs, vec![10.0, 500.0])), raise);
        // Once blk1 is high and blk0 becomes the busiest: raise blk0, then lower blk1.
        knobs.priority[1] = PriorityLevel::High;
        let raise0 = Action::Priority {
            device: 0,
            level: PriorityLevel::High,
        };
        assert_eq!(p.choose(&input, &ctx(&knobs, vec![900.0, 5.0])), raise0);
        knobs.priority[0] = PriorityLevel::High;
        let lower1 = Action::Priority {
            device: 1,
            level: PriorityLevel::Medium,
        };
        assert_eq!(p.choose(&input, &ctx(&knobs, vec![900.0, 5.0])), lower1);
    }

    fn card(space: &ActionSpace) -> ModelCard {
        ModelCard {
            name: "t".into(),
            description: String::new(),
            schema_version: SCHEMA_VERSION,
            input_size: Schema::len(),
            output_size: space.len(),
            actions_version: ACTIONS_VERSION,
            actions: space.names().to_vec(),
            reward_version: REWARD_VERSION,
            reward_weights: RewardWeights::default(),
            trained_on: String::new(),
            evaluation: Evaluation::default(),
            forecast: None,
            start: None,
            schema: Some(Schema::spec()),
            serves: Some(ShapeRange::LAYOUT),
        }
    }

    #[test]
    fn cards_of_another_version_are_refused_by_name() {
        let v2 = r#"{"schema_version": 2, "reward_weights": {"latency": 10.0}}"#;
        let e = ModelCard::check_versions(v2.as_bytes()).unwrap_err();
        assert_eq!((e.field.as_str(), e.got.as_str()), ("schema_version", "2"));
        let r2 = format!(
            r#"{{"schema_version": {SCHEMA_VERSION}, "reward_weights": {{"latency": 10.0}}}}"#
        );
        let e = ModelCard::check_versions(r2.as_bytes()).unwrap_err();
        assert_eq!((e.field.as_str(), e.got.as_str()), ("reward_version", "2"));
        assert!(e.to_string().contains("retrain"), "{e}");
        let ok = format!(
            r#"{{"schema_version": {SCHEMA_VERSION}, "reward_version": {REWARD_VERSION}}}"#
        );
        ModelCard::check_versions(ok.as_bytes()).unwrap();
        ModelCard::check_versions(b"not json").unwrap();
    }

    #[test]
    fn card_validation_names_the_field() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let good = card(&space);
        good.validate(&space, Some(&RewardWeights::default()))
            .unwrap();
        let field = |c: &ModelCard| {
            c.validate(&space, Some(&RewardWeights::default()))
                .unwrap_err()
                .field
        };
        let mut c = good.clone();
        c.schema_version = 1;
        assert_eq!(field(&c), "schema_version");
        let mut c = good.clone();
        c.reward_version = 2;
        assert_eq!(field(&c), "reward_version");
        let mut c = good.clone();
        c.input_size = 24;
        assert_eq!(field(&c), "input_size");
        let mut c = good.clone();
        c.input_size = 2 * Schema::len();
        c.validate(&space, None).expect("forecast input is fine");
        let mut c = good.clone();
        c.output_size = 13;
        assert_eq!(field(&c), "output_size");
        // A policy of the old per-shape list: the layout version is named first.
        let mut c = good.clone();
        c.actions_version = 1;
        c.output_size = 21;
        let e = c.validate(&space, None).unwrap_err();
        assert_eq!(e.field, "actions_version");
        assert!(e.to_string().contains("retrained"), "{e}");
        // The shapes it serves: required, sane, and including this VM's.
        let mut c = good.clone();
        c.serves = None;
        assert_eq!(field(&c), "serves");
        c.serves = Some(ShapeRange {
            drives: [2, 1],
            ..ShapeRange::LAYOUT
        });
        assert_eq!(field(&c), "serves.drives");
        c.serves = Some(ShapeRange {
            nets: [0, 3],
            ..ShapeRange::LAYOUT
        });
        assert_eq!(field(&c), "serves.nets");
        c.serves = Some(ShapeRange {
            vcpus: [2, 2],
            drives: [2, 2],
            nets: [0, 0],
        });
        let e = c.validate(&space, None).unwrap_err();
        assert_eq!(e.field, "serves.vcpus");
        assert!(e.to_string().contains("this VM's 4 vCPUs"), "{e}");
        assert!(e.to_string().contains("[2, 2]"), "{e}");
        let two_by_two = ActionSpace::new(VmShape::new(2, 2, 0));
        c.validate(&two_by_two, None).expect("a 2/2 VM fits");
        let e = c
            .validate(&ActionSpace::new(VmShape::new(2, 1, 0)), None)
            .unwrap_err();
        assert_eq!(e.field, "serves.drives");
        assert!(e.to_string().contains("this VM's 1 drives"), "{e}");
        // One card for every shape of the layout.
        for (v, d, n) in [(1, 0, 0), (8, 4, 2), (4, 1, 0), (3, 4, 1)] {
            good.validate(&ActionSpace::new(VmShape::new(v, d, n)), None)
                .expect("within the layout");
        }
        for (v, d, n, f) in [(9, 1, 0, "vcpus"), (2, 5, 0, "drives"), (2, 1, 3, "nets")] {
            let e = good
                .validate(&ActionSpace::new(VmShape::new(v, d, n)), None)
                .unwrap_err();
            assert_eq!(e.field, format!("serves.{f}"), "{e}");
        }
        let mut c = good.clone();
        c.actions[4] = "vcpu+3".into();
        assert_eq!(field(&c), "actions[4]");
        let e = c.validate(&space, None).unwrap_err();
        assert!(e.to_string().contains("vcpu+3"), "{e}");
        let mut c = good.clone();
        c.actions.pop();
        assert_eq!(field(&c), "actions");
        let mut c = good.clone();
        c.reward_weights.free = 2.0;
        assert_eq!(field(&c), "reward_weights.free");
        c.validate(&space, None)
            .expect("weights unchecked without a VM's");
        let mut c = good.clone();
        c.reward_weights.miss = -1.0;
        assert_eq!(
            c.validate(&space, None).unwrap_err().field,
            "reward_weights.miss"
        );
        let mut c = good.clone();
        if let Some(s) = c.schema.as_mut() {
            s.features.swap(0, 1);
        }
        assert_eq!(field(&c), "schema");
        let mut c = good.clone();
        c.evaluation.reference_input = vec![0.0; Schema::len()];
        c.evaluation.reference_q = vec![0.0; 3];
        assert_eq!(field(&c), "evaluation.reference_q");
        let mut c = good.clone();
        c.forecast = Some(ForecastConfig {
            alpha: 2.0,
            beta: 0.1,
        });
        assert_eq!(field(&c), "forecast");
        let start = StartConfig {
            active_vcpus: 1,
            drives: vec![DriveStart {
                rate_level: 4,
                priority: PriorityLevel::High,
            }],
            basis: String::new(),
        };
        let mut c = good.clone();
        c.start = Some(start.clone());
        c.validate(&space, None).expect("a valid start");
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""start":{"active_vcpus":1"#), "{text}");
        assert_eq!(
            ModelCard::from_json(&text).unwrap().start,
            Some(start.clone())
        );
        c.start = Some(StartConfig {
            active_vcpus: 0,
            ..start.clone()
        });
        assert_eq!(field(&c), "start.active_vcpus");
        c.start = Some(StartConfig {
            drives: vec![start.drives[0]; 5],
            ..start.clone()
        });
        assert_eq!(field(&c), "start.drives");
        let mut bad = start.clone();
        bad.drives[0].rate_level = 5;
        c.start = Some(bad);
        assert_eq!(field(&c), "start.drives[0].rate_level");
        assert!(ModelCard::from_json(&text.replace("rate_level", "level")).is_err());
        // Missing required fields are JSON errors.
        assert!(ModelCard::from_json(r#"{"schema_version": 1}"#).is_err());
        let json = serde_json::to_string(&good).unwrap();
        let back = ModelCard::from_json(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(
            ModelCard::path_for(Path::new("models/x.onnx")),
            PathBuf::from("models/x.card.json")
        );
    }

    #[test]
    fn a_start_configuration_leaves_pinned_knobs_and_the_bounds_alone() {
        let space = ActionSpace::new(VmShape::new(4, 2, 0));
        let bounds = Bounds::for_space(&space, 2, 4);
        let base = KnobState::initial(&space, 4);
        let start = StartConfig {
            active_vcpus: 1,
            drives: vec![
                DriveStart {
                    rate_level: 4,
                    priority: PriorityLevel::Low,
                };
                2
            ],
            basis: String::new(),
        };
        let free = start.apply_to(&base, &bounds, &Pinned::default());
        assert_eq!(free.vcpus, 2, "clamped to min_vcpus");
        assert_eq!(free.rate_level, vec![4, 4]);
        assert_eq!(free.priority, vec![PriorityLevel::Low; 2]);
        let pinned = Pinned {
            vcpus: true,
            drives: vec![
                PinnedDrive {
                    rate_level: true,
                    priority: false,
                },
                PinnedDrive {
                    rate_level: false,
                    priority: true,
                },
            ],
        };
        let kept = start.apply_to(&base, &bounds, &pinned);
        assert_eq!(kept.vcpus, 4);
        assert_eq!(kept.rate_level, vec![0, 4]);
        assert_eq!(
            kept.priority,
            vec![PriorityLevel::Low, PriorityLevel::Medium]
        );
    }

    #[test]
    fn check_q_rejects_nan_and_wrong_lengths() {
        assert!(check_q(&[0.0, 1.0], 2).is_ok());
        assert!(matches!(
            check_q(&[0.0, f32::NAN], 2),
            Err(PolicyError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            check_q(&[f32::INFINITY], 1),
            Err(PolicyError::NonFinite { index: 0, .. })
        ));
        assert!(matches!(
            check_q(&[0.0], 2),
            Err(PolicyError::OutputLength {
                expected: 2,
                got: 1
            })
        ));
    }
}
