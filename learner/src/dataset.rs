//! Transitions from a state repository (`vmm run --state-db`).
//!
//! # What a row means
//!
//! The tuner ([`tuner::control`]) stores one row per interval and VM: the normalised
//! vector `s_t` observed at the end of interval `t`, the `action` it chose after seeing it
//! (`a_t`), and, one interval later, the `reward` of the interval that followed the action
//! (`r_t`, NULL for the last decision, whose outcome was never observed). So consecutive
//! rows `t`, `t+1` of one VM give the transition `(s_t, a_t, r_t, s_{t+1})`.
//!
//! # Episodes
//!
//! Rows of one `vm_id` ordered by `ts_ns` form episodes: the next row belongs to the same
//! episode when it comes after at most [`DatasetOptions::max_gap_factor`] (2.5) times the
//! row's `interval_ns`; otherwise the episode broke (the run ended, rows were lost) and no
//! transition crosses the gap. `vm_id`s are assumed unique among VMs running at the same
//! time.
//!
//! # VM shapes
//!
//! Actions v2 are one fixed layout for every VM ([`tuner::actions`]), so VMs of any
//! shape (vCPUs, drives, network devices, read from each row's configuration) train one
//! network. Each [`Transition`] keeps its VM's [`VmShape`]: the DQN's targets only
//! bootstrap from actions on devices that VM has, within its own vCPU bounds
//! ([`crate::valid_actions`]).
//!
//! # Action labels
//!
//! Besides the action names of [`ActionSpace::names`], the tuner stores what happened to
//! its choice ([`tuner::manager::Decision::action_label`]). The learner takes the action
//! that was in force: `refused:X` and `failed:X` (the knobs did not change) count as
//! `noop`; `rollback:INV` counts as `INV` (the inverse the manager applied); `static`
//! (everything reset to the static configuration, not one action) is skipped. `X` and
//! `INV` must be actions of the layout on a device the VM has. Any other name is an
//! error.
//!
//! Labels of actions v1 (the per-shape lists, before v2) keep their meaning where v2 has
//! the same name (`noop`, `vcpu±N`, `prio:blkD:L`, `rl:blkD:L`: drive `D` in
//! configuration order then and now). The two v1-only names map by one rule:
//! `qos:net:L` set every network device to level `L`, which is v2's `qos:net0:L` on a
//! VM with one network device, and no single v2 action on a VM with more (those
//! transitions are skipped and counted); `prio:netN:L` never took effect (the v1 monitor
//! refused it: a network device has no I/O priority), so only its `refused:`/`failed:`
//! forms are valid, as `noop`. A `refused:`/`failed:` of a v1 `qos:net:L` is `noop` too.
//!
//! # Checks
//!
//! Every row (after `--exclude-prefix`) is checked, whether or not it ends up in a
//! transition: schema version, vector length, finite vector and reward, a known action,
//! a readable configuration and one set of reward weights for all VMs.
//! Each failure is a [`LearnError`] naming the row id. A row whose reward or action is
//! NULL (the last of a run, or an outcome the writer dropped) only ends its transition.
//! SQLite stores a NaN `REAL` as NULL, so a NaN reward reads as a missing one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode};
use serde::Serialize;
use tuner::actions::{Action, ActionSpace, VmShape};
use tuner::reward::RewardWeights;
use tuner::schema::{Schema, SCHEMA_VERSION};
use tuner::state_repo::{Location, RowFilter};

use crate::error::LearnError;

/// One transition `(s, a, r, s')`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state (normalised vector) the action was chosen in.
    pub state: Vec<f32>,
    /// Index of the action in the space.
    pub action: usize,
    /// The reward of the interval that followed.
    pub reward: f32,
    /// The state at the end of that interval.
    pub next_state: Vec<f32>,
    /// True when `next_state` is terminal (no bootstrapping from it). The tuner's task
    /// never ends, so transitions from a state repository are never terminal.
    pub done: bool,
    /// The shape of the VM it came from (which slots hold a device, its vCPUs; vCPUs 0
    /// when unknown).
    pub shape: VmShape,
}

impl Transition {
    /// Checks lengths, the action index and finiteness: `Err` with the reason otherwise.
    pub fn check(&self, input_size: usize, n_actions: usize) -> Result<(), String> {
        for (what, v) in [("state", &self.state), ("next state", &self.next_state)] {
            if v.len() != input_size {
                return Err(format!(
                    "{what} has {} values, the network takes {input_size}",
                    v.len()
                ));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("{what}[{i}] is {}", v[i]));
            }
        }
        if self.action >= n_actions {
            return Err(format!(
                "action index {} is beyond the {n_actions} actions",
                self.action
            ));
        }
        if !self.reward.is_finite() {
            return Err(format!("reward is {}", self.reward));
        }
        Ok(())
    }
}

/// What a stored action label means for learning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// The action in force, as an index into the layout.
    Action(usize),
    /// Not one action of the layout (`static`): the transition is skipped.
    Skip,
    /// A v1 `qos:net:L` on a VM with several network devices: it moved them all, which
    /// no one v2 action does, so the transition is skipped.
    V1Unmappable,
}

/// The v2 name of a v1-only action name on a VM of `shape` (see the module
/// documentation): `Some(Some(name))` when it maps, `Some(None)` when it is a v1 name no
/// one v2 action matches, `None` when it is no v1-only name of a VM with a network
/// device.
fn v1_name(shape: &VmShape, name: &str) -> Option<Option<String>> {
    let level = name.strip_prefix("qos:net:")?;
    match shape.nets {
        0 => None,
        1 => Some(Some(format!("qos:net0:{level}"))),
        _ => Some(None),
    }
}

/// Interprets a stored action label (see the module documentation); `None` when it is
/// not an action of the layout on a device of `space`'s VM.
pub fn parse_label(space: &ActionSpace, label: &str) -> Option<Label> {
    if label == "static" {
        return Some(Label::Skip);
    }
    let present = |name: &str| -> Option<usize> {
        let i = space.effective_index(name)?;
        space.action(i).filter(|a| space.present(a)).map(|_| i)
    };
    // A refused or failed choice changed nothing, but must still name an action on a
    // device the VM has (anything else means the label is not this VM's): a v2 name, or
    // one of the two v1-only names.
    if let Some(inner) = label
        .strip_prefix("refused:")
        .or_else(|| label.strip_prefix("failed:"))
    {
        let v1 = space.shape().nets > 0
            && (inner.starts_with("qos:net:") || inner.starts_with("prio:net"));
        if !v1 {
            present(inner)?;
        }
        return space.index_of(&Action::NoOp).map(Label::Action);
    }
    let name = label.strip_prefix("rollback:").unwrap_or(label);
    match v1_name(&space.shape(), name) {
        Some(Some(v2)) => present(&v2).map(Label::Action),
        Some(None) => Some(Label::V1Unmappable),
        None => present(name).map(Label::Action),
    }
}

/// How to read a state repository.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetOptions {
    /// Leave out VMs whose `vm_id` starts with any of these (to hold a scenario out).
    pub exclude_prefixes: Vec<String>,
    /// The next row continues the episode when it comes within this many intervals.
    pub max_gap_factor: f64,
    /// Which rows to read: host (PostgreSQL only), VM, scenario label (VM id prefix) and
    /// time range; every row by default.
    pub filter: RowFilter,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            exclude_prefixes: Vec::new(),
            max_gap_factor: 2.5,
            filter: RowFilter::default(),
        }
    }
}

/// Why rows did not become transitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Rows with no action stored.
    pub no_action: u64,
    /// Rows with an action but no reward (the last decision of a run, a dropped outcome).
    pub no_reward: u64,
    /// Rows whose label was `static` (a reset to the static configuration).
    pub static_reset: u64,
    /// Rows with action and reward but no next row in the same episode.
    pub episode_end: u64,
    /// Rows whose label was a v1 `qos:net:L` on a VM with several network devices.
    pub v1_unmappable: u64,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} without action, {} without reward, {} static resets, {} at an episode's end, \
             {} v1 network labels with no v2 action",
            self.no_action, self.no_reward, self.static_reset, self.episode_end, self.v1_unmappable
        )
    }
}

/// What a dataset was built from (written into the model card).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSummary {
    /// The database file.
    pub db: PathBuf,
    /// Rows in the `samples` table.
    pub rows_total: u64,
    /// Rows left out by `exclude_prefixes`.
    pub rows_excluded: u64,
    /// Rows read and checked.
    pub rows: u64,
    /// Transitions made.
    pub transitions: u64,
    /// Episodes (unbroken runs of rows of one VM).
    pub episodes: u64,
    /// VMs whose rows were used.
    pub vm_ids: Vec<String>,
    /// VMs left out.
    pub excluded_vm_ids: Vec<String>,
    /// The prefixes that excluded them.
    pub exclude_prefixes: Vec<String>,
    /// Rows that ended a transition short.
    pub skipped: Skipped,
    /// `refused:`/`failed:` labels learned as `noop`.
    pub refused_as_noop: u64,
    /// `rollback:` labels learned as the inverse action.
    pub rollbacks: u64,
    /// Transitions per action name (in layout order; zero counts left out).
    pub actions: BTreeMap<String, u64>,
    /// Transitions per VM shape.
    pub shapes: BTreeMap<String, u64>,
    /// Whether the rows' configurations recorded reward weights (otherwise the monitor's
    /// defaults are assumed).
    pub weights_recorded: bool,
}

impl DataSummary {
    /// One line for the model card's `trained_on`.
    pub fn describe(&self) -> String {
        let shapes: Vec<String> = self
            .shapes
            .iter()
            .map(|(shape, n)| format!("{shape}: {n}"))
            .collect();
        let mut s = format!(
            "{} transitions from {} rows of {} ({} episodes; VM shapes: {}; VMs: {})",
            self.transitions,
            self.rows,
            self.db.display(),
            self.episodes,
            shapes.join("; "),
            self.vm_ids.join(", ")
        );
        if !self.exclude_prefixes.is_empty() {
            s.push_str(&format!(
                "; held out by prefix {:?}: {} rows of {}",
                self.exclude_prefixes,
                self.rows_excluded,
                if self.excluded_vm_ids.is_empty() {
                    "no VM".to_string()
                } else {
                    self.excluded_vm_ids.join(", ")
                }
            ));
        }
        s
    }
}

/// Transitions of VMs of any shape, read from a state repository.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The transitions, by VM and time (each with its VM's shape).
    pub transitions: Vec<Transition>,
    /// The reward weights the rewards were computed with (recorded, or the defaults).
    pub reward_weights: RewardWeights,
    /// Where they came from.
    pub summary: DataSummary,
}

impl Dataset {
    /// The VM shape with the most transitions (the larger shape on a tie).
    pub fn main_shape(&self) -> VmShape {
        let mut counts: BTreeMap<VmShape, u64> = BTreeMap::new();
        for t in &self.transitions {
            *counts.entry(t.shape).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(shape, n)| (*n, *shape))
            .map_or_else(VmShape::default, |(shape, _)| shape)
    }

    /// The action space of [`Dataset::main_shape`] (the layout is the same for every
    /// shape; the space also says which devices that shape has).
    pub fn space(&self) -> ActionSpace {
        ActionSpace::new(self.main_shape())
    }

    /// The states of the transitions of VMs of `shape`.
    pub fn states_of(&self, shape: &VmShape) -> Vec<&[f32]> {
        self.transitions
            .iter()
            .filter(|t| t.shape == *shape)
            .map(|t| t.state.as_slice())
            .collect()
    }
}

/// A row as read, before interpretation.
struct RawRow {
    id: i64,
    wall_ns: i64,
    vm_id: String,
    ts_ns: i64,
    interval_ns: i64,
    schema_version: i64,
    vector: Vec<u8>,
    action: Option<String>,
    reward: Option<f64>,
    config: String,
}

/// The previous row of the VM being read, waiting for its successor.
struct Pending {
    vm_id: String,
    ts_ns: i64,
    interval_ns: i64,
    state: Vec<f32>,
    label: Option<Label>,
    reward: Option<f64>,
    shape: VmShape,
}

/// The transition starting at `p` when its episode continues to `next`, or why not
/// (counted in `skipped`).
fn close(p: Pending, next: Option<&Vec<f32>>, skipped: &mut Skipped) -> Option<Transition> {
    match (p.label, p.reward, next) {
        (None, _, _) => skipped.no_action += 1,
        (Some(Label::Skip), _, _) => skipped.static_reset += 1,
        (Some(Label::V1Unmappable), _, _) => skipped.v1_unmappable += 1,
        (Some(Label::Action(_)), None, _) => skipped.no_reward += 1,
        (Some(Label::Action(action)), Some(reward), Some(next)) => {
            return Some(Transition {
                state: p.state,
                action,
                reward: reward as f32,
                next_state: next.clone(),
                done: false,
                shape: p.shape,
            })
        }
        (Some(Label::Action(_)), Some(_), None) => skipped.episode_end += 1,
    }
    None
}

fn sqlite_error(path: &Path, e: rusqlite::Error) -> LearnError {
    let code = e.sqlite_error_code();
    let message = e.to_string();
    if matches!(
        code,
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    ) {
        LearnError::NotADatabase {
            path: path.to_path_buf(),
            message,
        }
    } else {
        LearnError::Sqlite {
            path: path.to_path_buf(),
            message,
        }
    }
}

/// VM shape (vCPUs 0 when not recorded) and recorded reward weights of a row's
/// configuration JSON.
pub(crate) fn parse_config(text: &str) -> Result<(VmShape, Option<RewardWeights>), String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let count = |key: &str| -> Result<usize, String> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(serde_json::Value::Array(a)) => Ok(a.len()),
            Some(other) => Err(format!("`{key}` is {other}, not a list")),
        }
    };
    let vcpus = match obj.get("vcpus") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("`vcpus` is {v}, not a vCPU count"))?,
    };
    let shape = VmShape::new(vcpus, count("drives")?, count("network")?);
    let weights = match obj.get("reward_weights") {
        None | Some(serde_json::Value::Null) => None,
        Some(w) => {
            let w: RewardWeights =
                serde_json::from_value(w.clone()).map_err(|e| format!("`reward_weights`: {e}"))?;
            w.validate().map_err(|e| format!("`reward_weights`: {e}"))?;
            Some(w)
        }
    };
    Ok((shape, weights))
}

fn weights_text(w: &RewardWeights) -> String {
    w.named()
        .iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens the database read-only, telling a missing file and a non-database apart.
fn open(path: &Path) -> Result<Connection, LearnError> {
    if !path.exists() {
        return Err(LearnError::DbMissing {
            path: path.to_path_buf(),
        });
    }
    // A regular file only: SQLite's own open would block on a FIFO (issue 14).
    if let Err(e) = tuner::files::open_regular(path) {
        let message = match e {
            tuner::files::FileError::NotRegular { kind, .. } => format!("it is {kind}"),
            other => other.to_string(),
        };
        return Err(LearnError::NotADatabase {
            path: path.to_path_buf(),
            message,
        });
    }
    let conn = tuner::state_repo::open_sqlite_read_only(path).map_err(|e| sqlite_error(path, e))?;
    // The first read of the schema is where SQLite notices a file that is not a database.
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'samples'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| sqlite_error(path, e))?;
    if tables == 0 {
        return Err(LearnError::NoSamplesTable {
            path: path.to_path_buf(),
        });
    }
    Ok(conn)
}

fn read_row(r: &rusqlite::Row<'_>) -> Result<RawRow, (i64, &'static str, rusqlite::Error)> {
    let id: i64 = r.get(0).map_err(|e| (0, "id", e))?;
    let col = |c: &'static str| move |e| (id, c, e);
    Ok(RawRow {
        id,
        wall_ns: r.get(9).map_err(col("wall_ns"))?,
        vm_id: r.get(1).map_err(col("vm_id"))?,
        ts_ns: r.get(2).map_err(col("ts_ns"))?,
        interval_ns: r.get(3).map_err(col("interval_ns"))?,
        schema_version: r.get(4).map_err(col("schema_version"))?,
        vector: r.get(5).map_err(col("vector"))?,
        action: r.get(6).map_err(col("action"))?,
        reward: r.get(7).map_err(col("reward"))?,
        config: r.get(8).map_err(col("config"))?,
    })
}

/// Whether `row` passes `filter` (the host is filtered by the PostgreSQL query; a SQLite
/// file has no host column).
fn keep(filter: &RowFilter, row: &RawRow) -> bool {
    filter.vm_id.as_ref().is_none_or(|v| *v == row.vm_id)
        && filter
            .scenario
            .as_ref()
            .is_none_or(|s| row.vm_id.starts_with(s.as_str()))
        && u64::try_from(row.ts_ns).unwrap_or(0) >= filter.since_ns
        && filter.from_wall_ns.is_none_or(|t| row.wall_ns >= t)
        && filter.to_wall_ns.is_none_or(|t| row.wall_ns < t)
}

/// Reads, checks and pairs the rows of the repository at `location`: a SQLite file (as
/// [`load`]) or a PostgreSQL database (the rows of `options.filter`, across hosts and VMs).
pub fn load_from(location: &Location, options: &DatasetOptions) -> Result<Dataset, LearnError> {
    let url = match location {
        Location::Sqlite(path) => return load(path, options),
        Location::Postgres(url) => url,
    };
    let repo = tuner::state_repo::StateRepo::open_read_only_at(location)?;
    let rows_total = repo.count()?;
    let stored = repo.select_stored(&options.filter)?;
    let rows = stored.into_iter().map(|s| {
        Ok(RawRow {
            id: s.id,
            wall_ns: s.wall_ns,
            vm_id: s.row.vm_id,
            ts_ns: i64::try_from(s.row.ts_ns).unwrap_or(i64::MAX),
            interval_ns: i64::try_from(s.row.interval_ns).unwrap_or(i64::MAX),
            schema_version: i64::from(s.row.schema_version),
            vector: tuner::state_repo::encode_vector(&s.row.vector),
            action: s.row.action,
            reward: s.row.reward,
            config: s.row.config,
        })
    });
    // The summary and errors name the database by its URL without the password.
    load_rows(Path::new(&url.to_string()), rows_total, rows, options)
}

/// Reads, checks and pairs the rows of `path` (see the module documentation).
pub fn load(path: impl AsRef<Path>, options: &DatasetOptions) -> Result<Dataset, LearnError> {
    let path = path.as_ref();
    if options.filter.host_id.is_some() {
        return Err(tuner::state_repo::RepoError::Unsupported {
            backend: "sqlite",
            what: "a host filter (a SQLite repository is one host's; no host column)",
        }
        .into());
    }
    let conn = open(path)?;
    let rows_total: i64 = conn
        .query_row("SELECT count(*) FROM samples", [], |r| r.get(0))
        .map_err(|e| sqlite_error(path, e))?;
    let mut stmt = conn
        .prepare(
            "SELECT id, vm_id, ts_ns, interval_ns, schema_version, vector, action, reward, \
             config, wall_ns FROM samples ORDER BY vm_id, ts_ns, id",
        )
        .map_err(|e| sqlite_error(path, e))?;
    let rows = stmt
        .query_map([], |r| Ok(read_row(r)))
        .map_err(|e| sqlite_error(path, e))?
        .map(|r| match r {
            Ok(Ok(row)) => Ok(row),
            Ok(Err((row_id, column, e))) => Err(match e {
                rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..) => LearnError::BadColumn {
                    row_id,
                    column,
                    message: e.to_string(),
                },
                other => sqlite_error(path, other),
            }),
            Err(e) => Err(sqlite_error(path, e)),
        });
    load_rows(path, u64::try_from(rows_total).unwrap_or(0), rows, options)
}

/// Checks and pairs `rows` (ordered by VM, then time) of the repository named `path`.
fn load_rows(
    path: &Path,
    rows_total: u64,
    rows: impl Iterator<Item = Result<RawRow, LearnError>>,
    options: &DatasetOptions,
) -> Result<Dataset, LearnError> {
    let n = Schema::len();
    // Per configuration text: shape and recorded weights.
    let mut configs: HashMap<String, (VmShape, Option<RewardWeights>)> = HashMap::new();
    let mut first: Option<(String, RewardWeights)> = None;
    let mut weights_recorded = false;
    let mut summary = DataSummary {
        db: path.to_path_buf(),
        rows_total,
        rows_excluded: 0,
        rows: 0,
        transitions: 0,
        episodes: 0,
        vm_ids: Vec::new(),
        excluded_vm_ids: Vec::new(),
        exclude_prefixes: options.exclude_prefixes.clone(),
        skipped: Skipped::default(),
        refused_as_noop: 0,
        rollbacks: 0,
        actions: BTreeMap::new(),
        shapes: BTreeMap::new(),
        weights_recorded: false,
    };
    let mut vm_ids = BTreeSet::new();
    let mut excluded_vm_ids = BTreeSet::new();
    let mut action_counts: Vec<u64> = Vec::new();
    // Per shape, its action space (which devices it has).
    let mut spaces: HashMap<VmShape, ActionSpace> = HashMap::new();
    let mut shape_counts: BTreeMap<VmShape, u64> = BTreeMap::new();
    let mut transitions = Vec::new();
    let mut pending: Option<Pending> = None;

    for row in rows {
        let row = row?;
        if !keep(&options.filter, &row) {
            summary.rows_excluded += 1;
            continue;
        }
        if options
            .exclude_prefixes
            .iter()
            .any(|p| row.vm_id.starts_with(p.as_str()))
        {
            summary.rows_excluded += 1;
            excluded_vm_ids.insert(row.vm_id);
            continue;
        }
        summary.rows += 1;

        // Per-row checks.
        if row.schema_version != i64::from(SCHEMA_VERSION) {
            return Err(LearnError::SchemaVersion {
                row_id: row.id,
                vm_id: row.vm_id,
                found: row.schema_version,
                expected: SCHEMA_VERSION,
            });
        }
        let state = tuner::state_repo::decode_vector(&row.vector).map_err(|_| {
            LearnError::VectorLength {
                row_id: row.id,
                vm_id: row.vm_id.clone(),
                got: format!("{} bytes (not whole f32s)", row.vector.len()),
                expected: n,
            }
        })?;
        if state.len() != n {
            return Err(LearnError::VectorLength {
                row_id: row.id,
                vm_id: row.vm_id,
                got: format!("{} values", state.len()),
                expected: n,
            });
        }
        if let Some(i) = state.iter().position(|x| !x.is_finite()) {
            return Err(LearnError::NonFinite {
                row_id: row.id,
                vm_id: row.vm_id,
                what: format!("vector[{i}] ({})", Schema::features()[i].name),
                value: f64::from(state[i]),
            });
        }
        if let Some(r) = row.reward.filter(|r| !r.is_finite()) {
            return Err(LearnError::NonFinite {
                row_id: row.id,
                vm_id: row.vm_id,
                what: "reward".into(),
                value: r,
            });
        }
        let (shape, weights) = match configs.get(&row.config) {
            Some(c) => *c,
            None => {
                let (shape, weights) =
                    parse_config(&row.config).map_err(|message| LearnError::BadConfig {
                        row_id: row.id,
                        vm_id: row.vm_id.clone(),
                        message,
                    })?;
                let c = (shape, weights);
                configs.insert(row.config.clone(), c);
                c
            }
        };
        weights_recorded |= weights.is_some();
        let effective = weights.unwrap_or_default();
        let (first_vm, first_weights) = first
            .get_or_insert_with(|| (row.vm_id.clone(), effective))
            .clone();
        if effective != first_weights {
            return Err(LearnError::MixedRewardWeights {
                vm_id: row.vm_id,
                row_id: row.id,
                weights: weights_text(&effective),
                first_vm,
                first_weights: weights_text(&first_weights),
            });
        }
        let space = spaces
            .entry(shape)
            .or_insert_with(|| ActionSpace::new(shape));
        if action_counts.is_empty() {
            action_counts = vec![0; space.len()];
        }
        let label = match &row.action {
            None => None,
            Some(name) => {
                let label = parse_label(space, name).ok_or_else(|| LearnError::UnknownAction {
                    row_id: row.id,
                    vm_id: row.vm_id.clone(),
                    name: name.clone(),
                    shape: shape.to_string(),
                })?;
                Some(label)
            }
        };

        // Pairing with the previous row of the same episode.
        let continues = pending.as_ref().is_some_and(|p| {
            let gap = row.ts_ns.saturating_sub(p.ts_ns);
            p.vm_id == row.vm_id
                && gap > 0
                && p.interval_ns > 0
                && (gap as f64) <= options.max_gap_factor * p.interval_ns as f64
        });
        if let Some(p) = pending.take() {
            let next = continues.then_some(&state);
            if let Some(t) = close(p, next, &mut summary.skipped) {
                if let Some(c) = action_counts.get_mut(t.action) {
                    *c += 1;
                }
                *shape_counts.entry(t.shape).or_default() += 1;
                transitions.push(t);
            }
        }
        if !continues {
            summary.episodes += 1;
        }
        if let Some(name) = &row.action {
            if name.starts_with("refused:") || name.starts_with("failed:") {
                summary.refused_as_noop += 1;
            } else if name.starts_with("rollback:") {
                summary.rollbacks += 1;
            }
        }
        vm_ids.insert(row.vm_id.clone());
        pending = Some(Pending {
            vm_id: row.vm_id,
            ts_ns: row.ts_ns,
            interval_ns: row.interval_ns,
            state,
            label,
            reward: row.reward,
            shape,
        });
    }
    if let Some(p) = pending {
        close(p, None, &mut summary.skipped);
    }

    let Some((_, reward_weights)) = first else {
        return Err(LearnError::NoRows {
            path: path.to_path_buf(),
            total: summary.rows_total,
            excluded: summary.rows_excluded,
        });
    };
    if transitions.is_empty() {
        return Err(LearnError::NoTransitions {
            path: path.to_path_buf(),
            rows: summary.rows,
            detail: format!("0 usable: {}", summary.skipped),
        });
    }
    let space = ActionSpace::new(VmShape::default());
    summary.transitions = transitions.len() as u64;
    summary.vm_ids = vm_ids.into_iter().collect();
    summary.excluded_vm_ids = excluded_vm_ids.into_iter().collect();
    summary.weights_recorded = weights_recorded;
    summary.actions = action_counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .filter_map(|(i, c)| space.name(i).map(|name| (name.to_string(), *c)))
        .collect();
    summary.shapes = shape_counts
        .into_iter()
        .map(|(shape, n)| (shape.to_string(), n))
        .collect();
    log::info!(
        "{}: {} transitions from {} rows ({})",
        path.display(),
        summary.transitions,
        summary.rows,
        summary.skipped
    );
    Ok(Dataset {
        transitions,
        reward_weights,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_map_to_the_action_in_force() {
        let space = ActionSpace::new(VmShape::new(2, 1, 0));
        let idx = |n: &str| space.index_of(&space.parse(n).unwrap()).unwrap();
        assert_eq!(
            parse_label(&space, "vcpu+1"),
            Some(Label::Action(idx("vcpu+1")))
        );
        assert_eq!(
            parse_label(&space, "refused:vcpu+2"),
            Some(Label::Action(0))
        );
        assert_eq!(
            parse_label(&space, "failed:rl:blk0:3"),
            Some(Label::Action(0))
        );
        assert_eq!(
            parse_label(&space, "rollback:prio:blk0:medium"),
            Some(Label::Action(idx("prio:blk0:medium")))
        );
        assert_eq!(parse_label(&space, "static"), Some(Label::Skip));
        assert_eq!(parse_label(&space, "qos:net:1"), None, "no network device");
        assert_eq!(parse_label(&space, "qos:net0:1"), None, "no network device");
        assert_eq!(parse_label(&space, "refused:rl:blk1:0"), None, "no blk1");
        assert_eq!(parse_label(&space, "rl:blk1:0"), None, "no blk1");
        assert_eq!(parse_label(&space, "jump"), None);
    }

    #[test]
    fn v1_network_labels_map_by_one_rule() {
        let one = ActionSpace::new(VmShape::new(2, 1, 1));
        let idx = |n: &str| one.index_of(&one.parse(n).unwrap()).unwrap();
        // v2 names that v1 had too keep their meaning.
        assert_eq!(
            parse_label(&one, "rl:blk0:2"),
            Some(Label::Action(idx("rl:blk0:2")))
        );
        // One network device: the VM-wide level is net0's.
        assert_eq!(
            parse_label(&one, "qos:net:3"),
            Some(Label::Action(idx("qos:net0:3")))
        );
        assert_eq!(
            parse_label(&one, "rollback:qos:net:0"),
            Some(Label::Action(idx("qos:net0:0")))
        );
        assert_eq!(
            parse_label(&one, "refused:qos:net:2"),
            Some(Label::Action(0))
        );
        // v1 network priorities never took effect.
        assert_eq!(
            parse_label(&one, "failed:prio:net0:high"),
            Some(Label::Action(0))
        );
        assert_eq!(parse_label(&one, "prio:net0:high"), None);
        // Two network devices: a v1 level moved both, no v2 action did that.
        let two = ActionSpace::new(VmShape::new(2, 1, 2));
        assert_eq!(parse_label(&two, "qos:net:1"), Some(Label::V1Unmappable));
        assert_eq!(
            parse_label(&two, "qos:net1:1"),
            Some(Label::Action(idx("qos:net1:1")))
        );
    }

    #[test]
    fn configs_give_shape_and_weights() {
        let (shape, w) = parse_config(r#"{"vcpus":2,"drives":[{},{}]}"#).unwrap();
        assert_eq!(shape, VmShape::new(2, 2, 0));
        assert_eq!(w, None);
        let (shape, w) =
            parse_config(r#"{"drives":[],"network":[{}],"reward_weights":{"free":2.0}}"#).unwrap();
        assert_eq!(shape, VmShape::new(0, 0, 1));
        assert_eq!(w.map(|w| w.free), Some(2.0));
        assert!(parse_config("[]").is_err());
        assert!(parse_config(r#"{"drives": 3}"#).is_err());
        assert!(parse_config(r#"{"vcpus": -1}"#).is_err());
        assert!(parse_config(r#"{"reward_weights":{"free":-1}}"#).is_err());
        assert!(parse_config("{").is_err());
    }
}
