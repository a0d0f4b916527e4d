//! The learner's one error type: bad training input, bad options, a diverging run, and
//! export or verification failures. Every message names the input (file, row id, VM,
//! option) and the problem.

use std::io;
use std::path::PathBuf;

use thiserror::Error;
use tuner::policy::PolicyError;

/// Everything that can go wrong while loading data, training or exporting.
#[derive(Debug, Error)]
pub enum LearnError {
    /// The state repository (e.g. PostgreSQL) could not be read.
    #[error("state repository: {0}")]
    Repository(#[from] tuner::state_repo::RepoError),
    /// The state repository file does not exist.
    #[error("{path} does not exist")]
    DbMissing {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a SQLite database, or is corrupt.
    #[error("{path} is not a SQLite database or is corrupt: {message}")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// SQLite's explanation.
        message: String,
    },
    /// The database has no `samples` table (not a state repository).
    #[error(
        "{path} has no `samples` table: not a state repository written by `vmm run --state-db`"
    )]
    NoSamplesTable {
        /// The file.
        path: PathBuf,
    },
    /// Any other SQLite failure while reading (locked, missing column, I/O).
    #[error("{path}: reading the samples failed: {message}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's explanation.
        message: String,
    },
    /// No rows to learn from.
    #[error("{path} has no sample rows to learn from ({total} rows, {excluded} excluded by --exclude-prefix)")]
    NoRows {
        /// The file.
        path: PathBuf,
        /// Rows in the table.
        total: u64,
        /// Rows excluded by prefix.
        excluded: u64,
    },
    /// Rows, but not a single complete transition.
    #[error("{path} has {rows} usable rows but no complete transition ({detail})")]
    NoTransitions {
        /// The file.
        path: PathBuf,
        /// Rows read (after exclusion).
        rows: u64,
        /// Why rows did not make transitions.
        detail: String,
    },
    /// A row of another schema version.
    #[error(
        "row id {row_id} (VM {vm_id}) has schema version {found}, this build needs {expected}"
    )]
    SchemaVersion {
        /// `samples.id`.
        row_id: i64,
        /// The row's VM.
        vm_id: String,
        /// The row's version.
        found: i64,
        /// [`tuner::schema::SCHEMA_VERSION`].
        expected: u32,
    },
    /// A vector BLOB of the wrong size.
    #[error("row id {row_id} (VM {vm_id}): vector has {got}, the schema has {expected} features")]
    VectorLength {
        /// `samples.id`.
        row_id: i64,
        /// The row's VM.
        vm_id: String,
        /// What the BLOB holds (e.g. `22 values`, `90 bytes`).
        got: String,
        /// `Schema::len()`.
        expected: usize,
    },
    /// A NaN or infinite value in a stored vector or reward.
    #[error("row id {row_id} (VM {vm_id}): {what} is {value}, not a finite number")]
    NonFinite {
        /// `samples.id`.
        row_id: i64,
        /// The row's VM.
        vm_id: String,
        /// Which value (`vector[3]`, `reward`).
        what: String,
        /// The value.
        value: f64,
    },
    /// A column of an unexpected type (e.g. a reward stored as text).
    #[error("row id {row_id}: column `{column}` is unreadable: {message}")]
    BadColumn {
        /// `samples.id`.
        row_id: i64,
        /// The column.
        column: &'static str,
        /// What is wrong.
        message: String,
    },
    /// An action name that is not an action of the layout on a device the VM has.
    #[error("row id {row_id} (VM {vm_id}): unknown action {name:?} for a VM of {shape} (actions layout v{})", tuner::actions::ACTIONS_VERSION)]
    UnknownAction {
        /// `samples.id`.
        row_id: i64,
        /// The row's VM.
        vm_id: String,
        /// The stored name.
        name: String,
        /// The VM's shape.
        shape: String,
    },
    /// The `config` column is not the VM configuration JSON expected.
    #[error("row id {row_id} (VM {vm_id}): configuration JSON unusable: {message}")]
    BadConfig {
        /// `samples.id`.
        row_id: i64,
        /// The row's VM.
        vm_id: String,
        /// What is wrong.
        message: String,
    },
    /// Rows of VMs scored with different reward weights.
    #[error("VM {vm_id} (row id {row_id}) was scored with reward weights {weights}, but VM {first_vm} with {first_weights}")]
    MixedRewardWeights {
        /// The differing VM.
        vm_id: String,
        /// Its first differing row.
        row_id: i64,
        /// Its weights.
        weights: String,
        /// The VM that set the weights.
        first_vm: String,
        /// That VM's weights.
        first_weights: String,
    },
    /// Reward weights given that differ from those the data was scored with.
    #[error("the data was scored with reward weights {data}, not the given {given}")]
    RewardWeightsMismatch {
        /// The data's weights.
        data: String,
        /// The given weights.
        given: String,
    },
    /// A bad option or hyper-parameter.
    #[error("{problem}")]
    BadOption {
        /// The option, spelled as in the configuration (`gamma`, `hidden`, ...).
        option: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A transition handed to the online learner that cannot be learned from.
    #[error("invalid transition: {0}")]
    InvalidTransition(String),
    /// Action selection failed (mask of the wrong length, every action masked).
    #[error("action selection: {0}")]
    Policy(#[source] PolicyError),
    /// The training loss stopped being finite.
    #[error("training diverged at step {step}: {what} is {value} (try a smaller --lr or a smaller --gamma); nothing written")]
    Diverged {
        /// The step (0-based).
        step: u64,
        /// What went non-finite (`loss`, `target Q-value`).
        what: &'static str,
        /// The value.
        value: f32,
    },
    /// The tensor backend failed (a bug, not bad input).
    #[error("tensor backend: {0}")]
    Backend(String),
    /// burn-onnx could not export the network.
    #[error("ONNX export failed: {0}")]
    Export(String),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The model to start online learning from is unusable (not the learner's MLP, a
    /// shape that differs from its card or the VM's action space, weights that do not
    /// reproduce its card's reference Q-values).
    #[error("start model {path}: {message}")]
    StartModel {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// tract refused the exported model.
    #[error("the exported model does not load back through tract: {0}")]
    Reload(#[source] PolicyError),
    /// tract's Q-values differ from the trainer's.
    #[error("tract's Q-value for action {action} of check state {state} is {tract}, the trainer's is {ours} (tolerance {tolerance} relative)")]
    Mismatch {
        /// Index of the state in the check batch.
        state: usize,
        /// Action name.
        action: String,
        /// The trainer's value.
        ours: f32,
        /// tract's value.
        tract: f32,
        /// The relative tolerance.
        tolerance: f32,
    },
}

impl LearnError {
    /// The option or input at fault, spelled as in a configuration (`state_db`, `out`,
    /// `gamma`, ...), for command-line messages.
    pub fn option(&self) -> &'static str {
        match self {
            LearnError::BadOption { option, .. } => option,
            LearnError::Diverged { .. } => "lr",
            LearnError::RewardWeightsMismatch { .. } => "reward_weights",
            LearnError::Export(_)
            | LearnError::Backend(_)
            | LearnError::Io { .. }
            | LearnError::Reload(_)
            | LearnError::Mismatch { .. } => "out",
            LearnError::InvalidTransition(_) | LearnError::Policy(_) => "transition",
            LearnError::StartModel { .. } => "policy",
            _ => "state_db",
        }
    }

    /// Whether the error is the user's input or options (as opposed to a failure of the
    /// export itself).
    pub fn is_input_error(&self) -> bool {
        !matches!(
            self,
            LearnError::Export(_)
                | LearnError::Backend(_)
                | LearnError::Io { .. }
                | LearnError::Reload(_)
                | LearnError::Mismatch { .. }
        )
    }

    pub(crate) fn bad_option(option: &'static str, problem: impl Into<String>) -> LearnError {
        LearnError::BadOption {
            option,
            problem: problem.into(),
        }
    }
}
