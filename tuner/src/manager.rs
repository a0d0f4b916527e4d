//! The configuration manager: applies the policy's actions to the monitor with safeguards.
//!
//! The monitor is reached only through the [`Knobs`] trait (apply one action, restore the
//! static configuration), so the manager can be tested against a fake monitor.
//!
//! Safeguards of [`ConfigManager`]:
//!
//! - **Hard bounds** ([`Bounds`], from the VM's configuration): vCPUs within
//!   `[min_vcpus, max_vcpus]`, only allowed devices, ladder levels no tighter than
//!   allowed. Actions that would leave them, that change nothing, or that target a slot
//!   of the layout in which the VM has no device, are refused (and masked before
//!   selection, see [`ActionSpace::mask`]): an absent device is never touched.
//! - **One change per interval**, and **at most one change per knob per cooldown**
//!   ([`ManagerConfig::cooldown_intervals`]).
//! - **Rollback**: the baseline of a change is the mean reward of the
//!   [`ManagerConfig::baseline_window`] (M) intervals before it. The change is then
//!   watched for [`ManagerConfig::rollback_after`] (K) intervals; if the reward of every
//!   one of them stays below `baseline - rollback_tolerance`, the change is undone (its
//!   inverse action is applied) and the knob's cooldown restarts. While a change is
//!   watched, no other change is made, so the reward is attributable to it; the watch
//!   ends early, the change kept, at the first reward at or above the threshold (it could
//!   no longer be rolled back). A change
//!   made with no reward history yet has no baseline and is kept.
//! - **Tightened limits settle first** ([`ManagerConfig::settle_after_tightening`]): the
//!   first interval after a drive's rate limit or the network QoS moves to a tighter
//!   level still runs on tokens banked under the looser one and scores as if nothing had
//!   changed, so it neither keeps nor judges the change; the watch is that much longer.
//! - **No retrying a rolled-back change** ([`ManagerConfig::retry_after_rollback`]):
//!   the same action is refused for a while after its rollback, unless the workload
//!   shifts first.
//! - **Workload shifts** ([`ConfigManager::workload_shifted`], called by the tuner when
//!   the kind of work the guest reports changes, e.g. from computing to idle): rewards
//!   before a shift are no baseline for the rewards after it (an idle phase scores below
//!   a busy one whatever the knobs), so the history is cleared and a change being watched
//!   is kept rather than judged across the shift (the tuner also keeps the reward of the
//!   interval in which the kind changed out of the history: it mixes both kinds). Without
//!   this, a change made at a phase edge (fewer vCPUs as the guest goes idle, a lifted
//!   limit as I/O starts) was undone because the new phase scored lower than the old one.
//!   The knobs' cooldowns are lifted too, so a step taken at the edge can be corrected in
//!   the new phase's first interval.
//! - **Watchdog** ([`Watchdog`]): the tuner thread beats a [`Heartbeat`] every interval;
//!   a checker thread calls back (to restore the static configuration) when no beat came
//!   for N intervals, once per stall; the tuner then finds [`Heartbeat::take_fired`] set
//!   and resets its view of the knobs ([`ConfigManager::reset_to_static`]).
//!
//! Every refusal, failure, rollback and fallback comes back as a [`Decision`] with its
//! reason; [`Decision::event_kind`] and [`Decision::detail`] are what the caller logs and
//! stores in the state repository.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::actions::{
    Action, ActionError, ActionSpace, Invalid, Knob, PriorityLevel, NET_QOS_LADDER, RATE_LADDER,
};
use crate::state_repo::event_kind;

/// Errors of the configuration manager's setup.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// Bounds that contradict themselves or the action space.
    #[error("invalid bounds: {0}")]
    InvalidBounds(String),
    /// A knob state that does not fit the action space or the bounds.
    #[error("invalid knob state: {0}")]
    InvalidState(String),
    /// A configuration value out of range.
    #[error("invalid manager configuration: {0}")]
    InvalidConfig(String),
    /// The watchdog thread could not be spawned.
    #[error("cannot spawn the watchdog thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The VM's hard bounds on the knobs (from its configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    /// Fewest vCPUs (at least 1).
    pub min_vcpus: u32,
    /// Most vCPUs (at most the vCPUs the VM was created with).
    pub max_vcpus: u32,
    /// Per device of [`ActionSpace::devices`] (the VM's devices in a slot, drives
    /// first): whether the tuner may change it.
    pub allowed_devices: Vec<bool>,
    /// Tightest [`RATE_LADDER`] level allowed.
    pub max_rate_level: usize,
    /// Tightest [`NET_QOS_LADDER`] level allowed.
    pub max_net_qos_level: usize,
}

impl Bounds {
    /// Bounds allowing `[min_vcpus, max_vcpus]`, every device of `space` and every level.
    pub fn for_space(space: &ActionSpace, min_vcpus: u32, max_vcpus: u32) -> Bounds {
        Bounds {
            min_vcpus,
            max_vcpus,
            allowed_devices: vec![true; space.devices().len()],
            max_rate_level: RATE_LADDER.len() - 1,
            max_net_qos_level: NET_QOS_LADDER.len() - 1,
        }
    }

    /// Checks the bounds against themselves and `space`.
    pub fn validate(&self, space: &ActionSpace) -> Result<(), ManagerError> {
        let bad = |m: String| Err(ManagerError::InvalidBounds(m));
        if self.min_vcpus == 0 {
            return bad("min_vcpus must be at least 1".into());
        }
        if self.min_vcpus > self.max_vcpus {
            return bad(format!(
                "min_vcpus {} exceeds max_vcpus {}",
                self.min_vcpus, self.max_vcpus
            ));
        }
        if self.allowed_devices.len() != space.devices().len() {
            return bad(format!(
                "allowed_devices has {} entries, the action space {} devices",
                self.allowed_devices.len(),
                space.devices().len()
            ));
        }
        if self.max_rate_level >= RATE_LADDER.len() {
            return bad(format!(
                "max_rate_level {} is beyond the ladder's {} levels",
                self.max_rate_level,
                RATE_LADDER.len()
            ));
        }
        if self.max_net_qos_level >= NET_QOS_LADDER.len() {
            return bad(format!(
                "max_net_qos_level {} is beyond the ladder's {} levels",
                self.max_net_qos_level,
                NET_QOS_LADDER.len()
            ));
        }
        Ok(())
    }
}

/// The current setting of every knob the tuner controls, for the VM's devices in a slot
/// of the layout (the vector index is the slot: `priority[1]` is `blk1`'s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnobState {
    /// vCPUs allocated.
    pub vcpus: u32,
    /// I/O priority per drive slot the VM fills.
    pub priority: Vec<PriorityLevel>,
    /// [`RATE_LADDER`] level per drive slot the VM fills.
    pub rate_level: Vec<usize>,
    /// [`NET_QOS_LADDER`] level per network slot the VM fills.
    pub net_qos: Vec<usize>,
}

impl KnobState {
    /// `vcpus` vCPUs, medium priority, unlimited rates and network: the usual static
    /// configuration (the lead maps the VM's own configuration onto it).
    pub fn initial(space: &ActionSpace, vcpus: u32) -> KnobState {
        let shape = space.shape();
        KnobState {
            vcpus,
            priority: vec![PriorityLevel::Medium; shape.tuned_drives()],
            rate_level: vec![0; shape.tuned_drives()],
            net_qos: vec![0; shape.tuned_nets()],
        }
    }

    /// Checks that the state fits `space` (one entry per device in a slot, levels in
    /// range).
    pub fn validate(&self, space: &ActionSpace) -> Result<(), ManagerError> {
        let bad = |m: String| Err(ManagerError::InvalidState(m));
        let (drives, nets) = (space.shape().tuned_drives(), space.shape().tuned_nets());
        if self.priority.len() != drives || self.rate_level.len() != drives {
            return bad(format!(
                "{} priorities and {} rate levels for {drives} drives",
                self.priority.len(),
                self.rate_level.len()
            ));
        }
        if self.net_qos.len() != nets {
            return bad(format!(
                "{} network QoS levels for {nets} network devices",
                self.net_qos.len()
            ));
        }
        if let Some((i, l)) = self
            .rate_level
            .iter()
            .enumerate()
            .find(|(_, l)| **l >= RATE_LADDER.len())
        {
            return bad(format!("rate level {l} of blk{i}"));
        }
        if let Some((i, l)) = self
            .net_qos
            .iter()
            .enumerate()
            .find(|(_, l)| **l >= NET_QOS_LADDER.len())
        {
            return bad(format!("network QoS level {l} of net{i}"));
        }
        Ok(())
    }

    /// The state after `action` (no bounds check; see [`ActionSpace::allowed`]).
    pub fn after(&self, action: &Action) -> Result<KnobState, ActionError> {
        let mut next = self.clone();
        match *action {
            Action::NoOp => {}
            Action::VcpuDelta(d) => {
                let v = i64::from(self.vcpus) + i64::from(d);
                next.vcpus = u32::try_from(v).map_err(|_| ActionError::BadVcpuDelta(d))?;
            }
            Action::Priority { device, level } => {
                *next
                    .priority
                    .get_mut(device)
                    .ok_or(ActionError::NoSuchDevice(device))? = level;
            }
            Action::RateLimit { device, level } => {
                *next
                    .rate_level
                    .get_mut(device)
                    .ok_or(ActionError::NoSuchDevice(device))? = level;
            }
            Action::NetQos { device, level } => {
                *next
                    .net_qos
                    .get_mut(device)
                    .ok_or(ActionError::NoSuchDevice(device))? = level;
            }
        }
        Ok(next)
    }

    /// The action that brings `self`'s setting of `action`'s knob back, applied after
    /// `action` (e.g. `vcpu-1` after `vcpu+1`, `prio:blk0:medium` after
    /// `prio:blk0:high` from medium).
    pub fn inverse(&self, action: &Action) -> Result<Action, ActionError> {
        Ok(match *action {
            Action::NoOp => Action::NoOp,
            Action::VcpuDelta(d) => Action::VcpuDelta(-d),
            Action::Priority { device, .. } => Action::Priority {
                device,
                level: *self
                    .priority
                    .get(device)
                    .ok_or(ActionError::NoSuchDevice(device))?,
            },
            Action::RateLimit { device, .. } => Action::RateLimit {
                device,
                level: *self
                    .rate_level
                    .get(device)
                    .ok_or(ActionError::NoSuchDevice(device))?,
            },
            Action::NetQos { device, .. } => Action::NetQos {
                device,
                level: *self
                    .net_qos
                    .get(device)
                    .ok_or(ActionError::NoSuchDevice(device))?,
            },
        })
    }
}

/// The narrow path through which the tuner changes the monitor. The monitor implements
/// it; tests implement it with a fake.
pub trait Knobs: Send {
    /// Applies one action (vCPU allocation, a drive's priority or rate limiter, a network
    /// device's QoS level; slots and levels as in [`crate::actions`]). The manager only
    /// passes actions on devices the VM has. An error says why the monitor could not,
    /// and leaves the knob unchanged.
    fn apply(&mut self, action: &Action) -> Result<(), String>;
    /// Puts every knob back to the VM's static configuration. Must not fail.
    fn restore_static(&mut self);
    /// Cumulative completed requests per device of the action space (for the threshold
    /// policy's "busiest device"); empty when the monitor does not provide it.
    fn device_activity(&self) -> Vec<u64> {
        Vec::new()
    }
    /// What the host's arbiter grants (`vmm host`); everything without one.
    fn host_grant(&self) -> HostGrant {
        HostGrant::default()
    }
    /// The knobs in force as the monitor's knob controller holds them, with their
    /// generation (see [`crate::knob_state::VmKnobs`]); `None` when the monitor keeps no
    /// such state (test fakes): the manager then tracks the knobs it set itself.
    fn observed(&self) -> Option<(u64, KnobState)> {
        None
    }
}

/// Tunables of the safeguards.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Intervals after a change of a knob before it may change again (default 3, the
    /// length of the watch: a wrong step can be corrected as soon as it is judged).
    pub cooldown_intervals: u64,
    /// K: intervals a change is watched; undone if the reward stayed below the baseline
    /// in every one of them (default 3; 0 disables rollback).
    pub rollback_after: u32,
    /// M: intervals before a change whose mean reward is its baseline (default 5).
    pub baseline_window: usize,
    /// How far below the baseline a reward must be to count as below (default 0.01).
    pub rollback_tolerance: f64,
    /// Whether [`ConfigManager::workload_shifted`] re-baselines (default true; false
    /// judges every change against the rewards before it, across shifts too).
    pub rebaseline_on_shift: bool,
    /// Intervals after a tightened limit (a drive's rate limit or the network QoS moved
    /// to a tighter level) whose rewards do not judge it (default 1): the limiter's
    /// buckets still hold tokens banked under the looser limit, so the first interval
    /// scores as if nothing had changed and would keep the change at once. The watch of
    /// a tightening lasts this much longer.
    pub settle_after_tightening: u32,
    /// Intervals during which a change that was rolled back is refused again (default
    /// 20), unless the workload shifts first: under the same workload it would fail the
    /// same way, and retrying it every cooldown costs the guest each time. 0: no memory.
    pub retry_after_rollback: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            cooldown_intervals: 3,
            rollback_after: 3,
            baseline_window: 5,
            rollback_tolerance: 0.01,
            rebaseline_on_shift: true,
            settle_after_tightening: 1,
            retry_after_rollback: 20,
        }
    }
}

impl ManagerConfig {
    /// Checks the values (window at least 1, tolerance finite and non-negative).
    pub fn validate(&self) -> Result<(), ManagerError> {
        if self.baseline_window == 0 {
            return Err(ManagerError::InvalidConfig(
                "baseline_window must be at least 1".into(),
            ));
        }
        if !self.rollback_tolerance.is_finite() || self.rollback_tolerance < 0.0 {
            return Err(ManagerError::InvalidConfig(format!(
                "rollback_tolerance {} must be finite and non-negative",
                self.rollback_tolerance
            )));
        }
        Ok(())
    }
}

/// Why the manager refused an action.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// Bounds, device not allowed, no change, or not an action of the space.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The knob changed less than a cooldown ago.
    #[error("{knob} is cooling down for {remaining} more interval(s)")]
    Cooldown {
        /// The knob.
        knob: String,
        /// Intervals left.
        remaining: u64,
    },
    /// The same change was rolled back a short while ago, under the same workload.
    #[error("{name} was rolled back {since} interval(s) ago under the same workload")]
    RolledBackRecently {
        /// The change.
        name: String,
        /// Intervals since the rollback.
        since: u64,
    },
    /// Another change is being watched for rollback.
    #[error("{pending} is being evaluated for {remaining} more interval(s)")]
    Evaluating {
        /// The change being watched.
        pending: String,
        /// Intervals left.
        remaining: u32,
    },
    /// A change was made in this interval already.
    #[error("one change per interval: already changed in this one")]
    OncePerInterval,
    /// More than the host's arbiter grants.
    #[error("{name} would take more than the host grants ({granted})")]
    NotGranted {
        /// The change.
        name: String,
        /// What is granted.
        granted: String,
    },
}

/// What the manager did with an action or an interval: returned so the caller logs and
/// stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do.
    NoOp,
    /// The action was applied.
    Applied {
        /// The action.
        action: Action,
        /// Its name.
        name: String,
        /// Its baseline reward (None without reward history: kept unconditionally).
        baseline: Option<f64>,
    },
    /// The action was refused by a safeguard.
    Refused {
        /// The action.
        action: Action,
        /// Its name.
        name: String,
        /// Why.
        reason: Refusal,
    },
    /// The monitor could not apply the action.
    Failed {
        /// The action.
        action: Action,
        /// Its name.
        name: String,
        /// The monitor's reason.
        error: String,
    },
    /// A watched change passed its evaluation and is kept.
    Kept {
        /// The change.
        name: String,
        /// Its baseline.
        baseline: f64,
        /// Mean reward while watched.
        mean: f64,
    },
    /// A watched change was undone: the reward stayed below its baseline.
    RolledBack {
        /// The change undone.
        action: Action,
        /// Its name.
        name: String,
        /// The inverse applied.
        inverse: Action,
        /// The inverse's name.
        inverse_name: String,
        /// The baseline.
        baseline: f64,
        /// Rewards observed while watched.
        rewards: Vec<f64>,
    },
    /// Every knob went back to the static configuration.
    RestoredStatic {
        /// Why.
        reason: String,
    },
}

impl Decision {
    /// The state-repository event kind of this decision ([`event_kind`]), for the ones
    /// worth an event: refusals and monitor failures (`refusal`), rollbacks (`rollback`),
    /// fallbacks to the static configuration (`fallback`).
    pub fn event_kind(&self) -> Option<&'static str> {
        match self {
            Decision::Refused { .. } | Decision::Failed { .. } => Some(event_kind::REFUSAL),
            Decision::RolledBack { .. } => Some(event_kind::ROLLBACK),
            Decision::RestoredStatic { .. } => Some(event_kind::FALLBACK),
            Decision::NoOp | Decision::Applied { .. } | Decision::Kept { .. } => None,
        }
    }

    /// A one-line description with the reason (the event's detail).
    pub fn detail(&self) -> String {
        self.to_string()
    }

    /// Whether a knob changed.
    pub fn changed(&self) -> bool {
        matches!(
            self,
            Decision::Applied { .. }
                | Decision::RolledBack { .. }
                | Decision::RestoredStatic { .. }
        )
    }

    /// The name of the action in force after this decision, as stored in the state
    /// repository (`noop`, the action's name, `rollback:INVERSE`, `static`), if any.
    pub fn action_label(&self) -> String {
        match self {
            Decision::NoOp | Decision::Kept { .. } => "noop".to_string(),
            Decision::Applied { name, .. } => name.clone(),
            Decision::Refused { name, .. } => format!("refused:{name}"),
            Decision::Failed { name, .. } => format!("failed:{name}"),
            Decision::RolledBack { inverse_name, .. } => format!("rollback:{inverse_name}"),
            Decision::RestoredStatic { .. } => "static".to_string(),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::NoOp => f.write_str("noop"),
            Decision::Applied { name, baseline, .. } => match baseline {
                Some(b) => write!(f, "applied {name} (baseline reward {b:.4})"),
                None => write!(f, "applied {name} (no baseline yet)"),
            },
            Decision::Refused { name, reason, .. } => write!(f, "refused {name}: {reason}"),
            Decision::Failed { name, error, .. } => {
                write!(f, "monitor could not apply {name}: {error}")
            }
            Decision::Kept {
                name,
                baseline,
                mean,
            } => write!(f, "kept {name}: mean reward {mean:.4} vs baseline {baseline:.4}"),
            Decision::RolledBack {
                name,
                inverse_name,
                baseline,
                rewards,
                ..
            } => write!(
                f,
                "rolled back {name} with {inverse_name}: rewards {rewards:.4?} stayed below baseline {baseline:.4}"
            ),
            Decision::RestoredStatic { reason } => {
                write!(f, "restored the static configuration: {reason}")
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    action: Action,
    name: String,
    inverse: Action,
    before: KnobState,
    baseline: f64,
    rewards: Vec<f64>,
    /// Leading rewards that do not judge the change (a tightened limit's bucket draining).
    settle: usize,
}

impl Pending {
    /// The rewards that judge the change.
    fn judged(&self) -> &[f64] {
        &self.rewards[self.settle.min(self.rewards.len())..]
    }
}

/// Applies actions with the safeguards described in the module documentation.
#[derive(Debug)]
pub struct ConfigManager {
    space: ActionSpace,
    bounds: Bounds,
    config: ManagerConfig,
    static_state: KnobState,
    state: KnobState,
    interval: u64,
    last_change: HashMap<Knob, u64>,
    changed_this_interval: bool,
    history: VecDeque<f64>,
    pending: Option<Pending>,
    /// Changes rolled back, with the interval of the rollback; cleared on a workload shift.
    rolled_back: HashMap<Action, u64>,
    /// What the host's arbiter grants this VM (`vmm host`); a step above it is refused
    /// and masked.
    grant: HostGrant,
    /// Generation of the knob state last read from the monitor ([`Knobs::observed`]).
    generation: Option<u64>,
}

/// The host arbiter's grant as the tuner sees it (`vmm host`); the default grants all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostGrant {
    /// The most vCPUs (host cores) the VM may use; `None`: no cap.
    pub vcpus: Option<u32>,
    /// Per device of the action space, the most bytes per second; a missing entry or
    /// `None`: no cap.
    pub bytes_per_sec: Vec<Option<u64>>,
}

impl HostGrant {
    /// Why `action` from `state` would take more than the grant (`None`: it would not).
    fn exceeded_by(&self, action: &Action, state: &KnobState) -> Option<String> {
        match *action {
            Action::VcpuDelta(d) => {
                let granted = self.vcpus?;
                (d > 0 && i64::from(state.vcpus) + i64::from(d) > i64::from(granted))
                    .then(|| format!("{granted} host core(s)"))
            }
            Action::RateLimit { device, level } => {
                let cap = (*self.bytes_per_sec.get(device)?)?;
                let bw = RATE_LADDER.get(level)?.bytes_per_sec;
                bw.is_none_or(|b| b > cap)
                    .then(|| format!("{cap} bytes/s on device {device}"))
            }
            _ => None,
        }
    }
}

impl ConfigManager {
    /// A manager for `space` within `bounds`, starting from (and restoring to)
    /// `static_state`, which must fit the space and lie within the bounds.
    pub fn new(
        space: ActionSpace,
        bounds: Bounds,
        static_state: KnobState,
        config: ManagerConfig,
    ) -> Result<ConfigManager, ManagerError> {
        config.validate()?;
        bounds.validate(&space)?;
        static_state.validate(&space)?;
        if !(bounds.min_vcpus..=bounds.max_vcpus).contains(&static_state.vcpus) {
            return Err(ManagerError::InvalidState(format!(
                "static vCPUs {} outside the bounds [{}, {}]",
                static_state.vcpus, bounds.min_vcpus, bounds.max_vcpus
            )));
        }
        Ok(ConfigManager {
            space,
            bounds,
            config,
            state: static_state.clone(),
            static_state,
            interval: 0,
            last_change: HashMap::new(),
            changed_this_interval: false,
            history: VecDeque::new(),
            pending: None,
            rolled_back: HashMap::new(),
            grant: HostGrant::default(),
            generation: None,
        })
    }

    /// Sets the host arbiter's grant: steps that would take more vCPUs or a looser
    /// drive limit than it allows are refused ([`Refusal::NotGranted`]) and so masked;
    /// steps down stay allowed.
    pub fn set_grant(&mut self, grant: HostGrant) {
        self.grant = grant;
    }

    /// The action space.
    pub fn space(&self) -> &ActionSpace {
        &self.space
    }

    /// The hard bounds.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// The safeguards' configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The knobs as the manager last set them.
    pub fn state(&self) -> &KnobState {
        &self.state
    }

    /// Generation of the monitor's knob state the manager last read (`None` before the
    /// first read, or with a monitor that keeps none).
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Reads the knobs in force from the monitor ([`Knobs::observed`]): they become the
    /// state the masks, the bounds checks and the reward's cost term see. When a writer
    /// other than this manager changed a knob it turns (the control API, the host's
    /// grant), a change being watched is no longer attributable and its inverse would
    /// undo the other writer's setting: the watch ends (the change is kept) and the
    /// reward history, taken under other knobs, is cleared. Returns a description of
    /// such an outside change.
    pub fn observe(&mut self, knobs: &dyn Knobs) -> Option<String> {
        let (generation, observed) = knobs.observed()?;
        if self.generation == Some(generation) {
            return None;
        }
        self.generation = Some(generation);
        if observed == self.state {
            return None;
        }
        let detail = format!(
            "knobs changed outside the tuner (generation {generation}): {:?} -> {:?}",
            self.state, observed
        );
        self.state = observed;
        if let Some(p) = self.pending.take() {
            log::info!("tuner: watch of {} ends: {detail}", p.name);
        }
        self.history.clear();
        Some(detail)
    }

    /// After a write of this manager: the state is what the monitor now holds.
    fn sync(&mut self, knobs: &dyn Knobs) {
        if let Some((generation, observed)) = knobs.observed() {
            self.generation = Some(generation);
            self.state = observed;
        }
    }

    /// The static configuration.
    pub fn static_state(&self) -> &KnobState {
        &self.static_state
    }

    /// Intervals started so far.
    pub fn interval(&self) -> u64 {
        self.interval
    }

    /// The change being watched for rollback, by name.
    pub fn pending(&self) -> Option<&str> {
        self.pending.as_ref().map(|p| p.name.as_str())
    }

    /// Mean reward of the last M intervals (the baseline a change made now would get).
    pub fn baseline(&self) -> Option<f64> {
        if self.history.is_empty() {
            None
        } else {
            Some(self.history.iter().sum::<f64>() / self.history.len() as f64)
        }
    }

    /// Starts the next interval, with the reward of the one that ended (`None` or a
    /// non-finite value when unknown). Evaluates the change being watched and may roll it
    /// back through `knobs` (returned as [`Decision::RolledBack`], or
    /// [`Decision::RestoredStatic`] when the monitor refused the rollback), or report it
    /// kept.
    pub fn next_interval(
        &mut self,
        reward: Option<f64>,
        knobs: &mut dyn Knobs,
    ) -> Option<Decision> {
        self.interval += 1;
        self.changed_this_interval = false;
        let reward = reward.filter(|r| r.is_finite());
        let mut decision = None;
        if let (Some(r), Some(p)) = (reward, self.pending.as_mut()) {
            p.rewards.push(r);
            let threshold = p.baseline - self.config.rollback_tolerance;
            let judged = p.judged();
            // One judging reward at or above the threshold decides it: the change can no
            // longer be rolled back, so the watch ends now and frees the next change.
            let decided = !judged.is_empty() && r >= threshold;
            if decided || judged.len() >= self.config.rollback_after as usize {
                let all_below = judged.iter().all(|x| *x < threshold);
                if let Some(p) = self.pending.take() {
                    decision = Some(if all_below {
                        self.roll_back(p, knobs)
                    } else {
                        Decision::Kept {
                            mean: p.rewards.iter().sum::<f64>() / p.rewards.len() as f64,
                            name: p.name,
                            baseline: p.baseline,
                        }
                    });
                }
            }
        }
        if let Some(r) = reward {
            self.history.push_back(r);
            while self.history.len() > self.config.baseline_window {
                self.history.pop_front();
            }
        }
        decision
    }

    /// The guest's workload changed kind at the start of this interval: forget the reward
    /// history, lift the knobs' cooldowns and keep the change being watched (reported as
    /// [`Decision::Kept`], with the mean of the rewards it had so far, or its baseline when
    /// it had none). Nothing happens when [`ManagerConfig::rebaseline_on_shift`] is off.
    ///
    /// The cooldowns go because they guard against flapping under one workload; a step
    /// taken at the edge (a limit half lifted as I/O starts) must be correctable in the
    /// new phase's first interval, not three intervals into it.
    pub fn workload_shifted(&mut self) -> Option<Decision> {
        if !self.config.rebaseline_on_shift {
            return None;
        }
        self.history.clear();
        self.last_change.clear();
        self.rolled_back.clear();
        self.pending.take().map(|p| Decision::Kept {
            mean: if p.rewards.is_empty() {
                p.baseline
            } else {
                p.rewards.iter().sum::<f64>() / p.rewards.len() as f64
            },
            name: p.name,
            baseline: p.baseline,
        })
    }

    fn roll_back(&mut self, p: Pending, knobs: &mut dyn Knobs) -> Decision {
        let inverse_name = self.space.name_of(&p.inverse);
        match knobs.apply(&p.inverse) {
            Ok(()) => {
                self.state = p.before;
                self.sync(knobs);
                if let Some(k) = p.action.knob() {
                    self.last_change.insert(k, self.interval);
                }
                self.changed_this_interval = true;
                self.rolled_back.insert(p.action, self.interval);
                // Rewards seen under the undone change are no baseline for the next one.
                self.history.clear();
                Decision::RolledBack {
                    action: p.action,
                    name: p.name,
                    inverse: p.inverse,
                    inverse_name,
                    baseline: p.baseline,
                    rewards: p.rewards,
                }
            }
            Err(e) => self.restore_static(
                knobs,
                &format!(
                    "the monitor refused the rollback {inverse_name} of {}: {e}",
                    p.name
                ),
            ),
        }
    }

    /// Why `action` would be refused now (`Ok` when it would be applied). An action on a
    /// slot without a device is refused first ([`Invalid::Absent`]), whatever else holds.
    pub fn check(&self, action: &Action) -> Result<(), Refusal> {
        if *action == Action::NoOp {
            return Ok(());
        }
        if self.space.index_of(action).is_none() {
            return Err(Refusal::Invalid(Invalid::Malformed(
                ActionError::UnknownAction(self.space.name_of(action)),
            )));
        }
        self.space.allowed(action, &self.state, &self.bounds)?;
        if let Some(granted) = self.grant.exceeded_by(action, &self.state) {
            return Err(Refusal::NotGranted {
                name: self.space.name_of(action),
                granted,
            });
        }
        if self.changed_this_interval {
            return Err(Refusal::OncePerInterval);
        }
        if let Some(p) = &self.pending {
            return Err(Refusal::Evaluating {
                pending: p.name.clone(),
                remaining: (self.config.rollback_after as usize + p.settle)
                    .saturating_sub(p.rewards.len()) as u32,
            });
        }
        if let Some(at) = self.rolled_back.get(action) {
            let since = self.interval.saturating_sub(*at);
            if since < self.config.retry_after_rollback {
                return Err(Refusal::RolledBackRecently {
                    name: self.space.name_of(action),
                    since,
                });
            }
        }
        if let Some(knob) = action.knob() {
            if let Some(at) = self.last_change.get(&knob) {
                let since = self.interval.saturating_sub(*at);
                if since < self.config.cooldown_intervals {
                    return Err(Refusal::Cooldown {
                        knob: knob_name(knob),
                        remaining: self.config.cooldown_intervals - since,
                    });
                }
            }
        }
        Ok(())
    }

    /// Per action of the space: whether [`ConfigManager::check`] would let it through now
    /// (bounds, no-change, cooldown, evaluation, one change per interval). `noop` is
    /// always allowed.
    pub fn mask(&self) -> Vec<bool> {
        self.space
            .actions()
            .iter()
            .map(|a| self.check(a).is_ok())
            .collect()
    }

    /// Applies `action` through `knobs` unless a safeguard refuses it.
    pub fn apply(&mut self, action: Action, knobs: &mut dyn Knobs) -> Decision {
        if action == Action::NoOp {
            return Decision::NoOp;
        }
        let name = self.space.name_of(&action);
        if let Err(reason) = self.check(&action) {
            return Decision::Refused {
                action,
                name,
                reason,
            };
        }
        let (next, inverse) = match (self.state.after(&action), self.state.inverse(&action)) {
            (Ok(n), Ok(i)) => (n, i),
            (Err(e), _) | (_, Err(e)) => {
                return Decision::Refused {
                    action,
                    name,
                    reason: Refusal::Invalid(Invalid::Malformed(e)),
                }
            }
        };
        if let Err(error) = knobs.apply(&action) {
            return Decision::Failed {
                action,
                name,
                error,
            };
        }
        let before = std::mem::replace(&mut self.state, next);
        self.sync(knobs);
        if let Some(k) = action.knob() {
            self.last_change.insert(k, self.interval);
        }
        self.changed_this_interval = true;
        let baseline = self.baseline();
        if let (Some(baseline), true) = (baseline, self.config.rollback_after > 0) {
            let settle = if tightens(&before, &action) {
                self.config.settle_after_tightening as usize
            } else {
                0
            };
            self.pending = Some(Pending {
                action,
                name: name.clone(),
                inverse,
                before,
                baseline,
                rewards: Vec::new(),
                settle,
            });
        }
        Decision::Applied {
            action,
            name,
            baseline,
        }
    }

    /// Moves the knobs to `target` before the guest's first interval (a policy's start
    /// configuration, see [`crate::policy::StartConfig`]): every knob that differs is set
    /// through `knobs`, vCPUs in steps the action space has; a step the bounds do not
    /// allow is skipped. No cooldown, watch or rollback follows, and the static
    /// configuration (what the watchdog restores) stays the VM's own. Returns the names
    /// of the actions applied; an error says which one the monitor refused (the knobs set
    /// before it stay set).
    pub fn start_in(
        &mut self,
        target: &KnobState,
        knobs: &mut dyn Knobs,
    ) -> Result<Vec<String>, String> {
        let mut steps = Vec::new();
        let mut vcpus = i64::from(self.state.vcpus);
        let want = i64::from(target.vcpus);
        while vcpus != want {
            let d = (want - vcpus).clamp(-2, 2);
            // In -2..=2 by the clamp.
            steps.push(Action::VcpuDelta(d as i8));
            vcpus += d;
        }
        for (device, level) in target.rate_level.iter().enumerate() {
            if self.state.rate_level.get(device) != Some(level) {
                steps.push(Action::RateLimit {
                    device,
                    level: *level,
                });
            }
        }
        for (device, level) in target.priority.iter().enumerate() {
            if self.state.priority.get(device) != Some(level) {
                steps.push(Action::Priority {
                    device,
                    level: *level,
                });
            }
        }
        let mut applied = Vec::new();
        for action in steps {
            let name = self.space.name_of(&action);
            if let Err(why) = self.space.allowed(&action, &self.state, &self.bounds) {
                log::info!("start configuration: {name} skipped ({why})");
                continue;
            }
            let next = self
                .state
                .after(&action)
                .map_err(|e| format!("{name}: {e}"))?;
            knobs.apply(&action).map_err(|e| format!("{name}: {e}"))?;
            self.state = next;
            self.sync(knobs);
            applied.push(name);
        }
        Ok(applied)
    }

    /// Restores the static configuration through `knobs` and forgets the reward history.
    pub fn restore_static(&mut self, knobs: &mut dyn Knobs, reason: &str) -> Decision {
        knobs.restore_static();
        self.reset_to_static();
        self.sync(knobs);
        Decision::RestoredStatic {
            reason: reason.to_string(),
        }
    }

    /// Records that the static configuration was restored elsewhere (e.g. by the
    /// watchdog): the knobs are static again, nothing is watched, the history is reset,
    /// and every knob starts a cooldown.
    pub fn reset_to_static(&mut self) {
        self.state = self.static_state.clone();
        self.pending = None;
        self.rolled_back.clear();
        self.history.clear();
        self.changed_this_interval = true;
        let knobs: Vec<Knob> = self
            .space
            .actions()
            .iter()
            .filter(|a| self.space.present(a))
            .filter_map(Action::knob)
            .collect();
        for k in knobs {
            self.last_change.insert(k, self.interval);
        }
    }
}

/// Whether `action` moves a limit of `before` to a tighter level (higher on its ladder).
fn tightens(before: &KnobState, action: &Action) -> bool {
    match *action {
        Action::RateLimit { device, level } => before
            .rate_level
            .get(device)
            .is_some_and(|old| level > *old),
        Action::NetQos { device, level } => {
            before.net_qos.get(device).is_some_and(|old| level > *old)
        }
        Action::NoOp | Action::VcpuDelta(_) | Action::Priority { .. } => false,
    }
}

fn knob_name(knob: Knob) -> String {
    match knob {
        Knob::Vcpus => "vcpus".to_string(),
        Knob::Priority(d) => format!("priority of blk{d}"),
        Knob::RateLimit(d) => format!("rate limit of blk{d}"),
        Knob::NetQos(n) => format!("network QoS of net{n}"),
    }
}

#[derive(Debug)]
struct WatchdogShared {
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last beat, plus one (0: never beat).
    last_beat: AtomicU64,
    /// Set when the watchdog fired, cleared by [`Heartbeat::take_fired`].
    fired: AtomicBool,
    /// Times the watchdog fired.
    fires: AtomicU64,
}

/// The tuner thread's side of the watchdog: beat once per interval (cheap, lock-free).
#[derive(Debug, Clone)]
pub struct Heartbeat(Arc<WatchdogShared>);

impl Heartbeat {
    /// Records that the tuner thread is alive now.
    pub fn beat(&self) {
        let ns = u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.0.last_beat.store(ns + 1, Ordering::Release);
    }

    /// Whether the watchdog fired since the last call (and clears the flag): the
    /// static configuration was restored behind the tuner's back.
    pub fn take_fired(&self) -> bool {
        self.0.fired.swap(false, Ordering::AcqRel)
    }

    /// Times the watchdog fired so far.
    pub fn fires(&self) -> u64 {
        self.0.fires.load(Ordering::Relaxed)
    }
}

/// Detects a stalled tuner thread: no [`Heartbeat::beat`] for `missed_intervals`
/// intervals. Armed by the first beat; fires once per stall (a new beat re-arms it).
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<WatchdogShared>,
    timeout: Duration,
    interval: Duration,
    fired_at_beat: u64,
}

impl Watchdog {
    /// A watchdog for a tuner deciding every `interval`, firing after `missed_intervals`
    /// intervals without a beat (at least 2).
    pub fn new(interval: Duration, missed_intervals: u32) -> Result<Watchdog, ManagerError> {
        if interval.is_zero() || missed_intervals < 2 {
            return Err(ManagerError::InvalidConfig(format!(
                "watchdog needs a non-zero interval and at least 2 missed intervals (got {interval:?}, {missed_intervals})"
            )));
        }
        Ok(Watchdog {
            shared: Arc::new(WatchdogShared {
                epoch: Instant::now(),
                last_beat: AtomicU64::new(0),
                fired: AtomicBool::new(false),
                fires: AtomicU64::new(0),
            }),
            timeout: interval.saturating_mul(missed_intervals),
            interval,
            fired_at_beat: 0,
        })
    }

    /// The handle the tuner thread beats.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat(Arc::clone(&self.shared))
    }

    /// Checks once: returns how long the tuner has been silent when the watchdog fires
    /// now (then [`Heartbeat::take_fired`] reports it), `None` otherwise.
    pub fn poll(&mut self) -> Option<Duration> {
        let beat = self.shared.last_beat.load(Ordering::Acquire);
        if beat == 0 || beat == self.fired_at_beat {
            return None;
        }
        let now = u64::try_from(self.shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let silent = Duration::from_nanos(now.saturating_sub(beat - 1));
        if silent <= self.timeout {
            return None;
        }
        self.fired_at_beat = beat;
        self.shared.fires.fetch_add(1, Ordering::Relaxed);
        self.shared.fired.store(true, Ordering::Release);
        Some(silent)
    }

    /// Runs the checker on its own thread, polling every half interval and calling
    /// `on_stall` (which restores the static configuration through the monitor's own
    /// control path, never through the stalled tuner) each time it fires.
    pub fn spawn(
        mut self,
        mut on_stall: impl FnMut(Duration) + Send + 'static,
    ) -> Result<WatchdogHandle, ManagerError> {
        let heartbeat = self.heartbeat();
        let (stop_tx, stop_rx) = mpsc::sync_channel::<()>(1);
        let period = (self.interval / 2).max(Duration::from_millis(1));
        let thread = thread::Builder::new()
            .name("tuner-watchdog".to_string())
            .spawn(move || {
                crate::sandbox::run_helper("tuner-watchdog", move || {
                    // Until stopped (or the handle dropped), poll every half interval.
                    while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(period) {
                        if let Some(silent) = self.poll() {
                            log::error!(
                                "tuner watchdog: no heartbeat for {silent:?}; restoring the static configuration"
                            );
                            on_stall(silent);
                        }
                    }
                });
            })
            .map_err(ManagerError::Spawn)?;
        Ok(WatchdogHandle {
            stop_tx: Some(stop_tx),
            thread: Some(thread),
            heartbeat,
        })
    }
}

/// A running watchdog thread; stops when dropped.
#[derive(Debug)]
pub struct WatchdogHandle {
    stop_tx: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    heartbeat: Heartbeat,
}

impl WatchdogHandle {
    /// The handle the tuner thread beats.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Stops the checker thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.try_send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the tuner watchdog thread panicked");
            }
        }
    }
}

impl Drop for WatchdogHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::actions::VmShape;
    use std::sync::Mutex;

    /// A fake monitor recording what it was asked to do.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct FakeKnobs {
        pub log: Arc<Mutex<Vec<String>>>,
        pub fail: Arc<Mutex<Option<String>>>,
        pub activity: Vec<u64>,
    }

    impl FakeKnobs {
        pub fn entries(&self) -> Vec<String> {
            self.log.lock().map(|l| l.clone()).unwrap_or_default()
        }
    }

    impl Knobs for FakeKnobs {
        fn apply(&mut self, action: &Action) -> Result<(), String> {
            if let Some(e) = self.fail.lock().ok().and_then(|f| f.clone()) {
                return Err(e);
            }
            if let Ok(mut l) = self.log.lock() {
                l.push(format!("{action:?}"));
            }
            Ok(())
        }
        fn restore_static(&mut self) {
            if let Ok(mut l) = self.log.lock() {
                l.push("static".to_string());
            }
        }
        fn device_activity(&self) -> Vec<u64> {
            self.activity.clone()
        }
    }

    fn manager(config: ManagerConfig) -> ConfigManager {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let state = KnobState::initial(&space, 2);
        ConfigManager::new(space, bounds, state, config).expect("valid manager")
    }

    #[test]
    fn applies_within_bounds_and_refuses_outside() {
        let mut m = manager(ManagerConfig::default());
        let mut k = FakeKnobs::default();
        assert_eq!(m.apply(Action::NoOp, &mut k), Decision::NoOp);
        let d = m.apply(Action::VcpuDelta(2), &mut k);
        assert!(
            matches!(d, Decision::Applied { ref name, baseline: None, .. } if name == "vcpu+2")
        );
        assert_eq!(m.state().vcpus, 4);
        m.next_interval(Some(0.0), &mut k);
        // 4 + 1 > max 4: refused on bounds even though the cooldown would refuse it too.
        let d = m.apply(Action::VcpuDelta(1), &mut k);
        assert_eq!(d.event_kind(), Some(event_kind::REFUSAL));
        assert!(d.detail().contains("outside [1, 4]"), "{d}");
        assert_eq!(d.action_label(), "refused:vcpu+1");
        let no_change = Action::Priority {
            device: 0,
            level: PriorityLevel::Medium,
        };
        assert!(matches!(
            m.apply(no_change, &mut k),
            Decision::Refused {
                reason: Refusal::Invalid(Invalid::NoChange),
                ..
            }
        ));
        // An absent device: refused with the reason, never applied.
        let d = m.apply(
            Action::NetQos {
                device: 0,
                level: 1,
            },
            &mut k,
        );
        assert!(
            matches!(
                d,
                Decision::Refused {
                    reason: Refusal::Invalid(Invalid::Absent(ref name)),
                    ..
                } if name == "net0"
            ),
            "{d:?}"
        );
        assert!(d.detail().contains("net0 is absent"), "{d}");
        let d = m.apply(
            Action::RateLimit {
                device: 1,
                level: 4,
            },
            &mut k,
        );
        assert!(matches!(d, Decision::Refused { .. }), "{d:?}");
        assert_eq!(k.entries(), vec!["VcpuDelta(2)"]);
    }

    #[test]
    fn the_host_grant_masks_steps_above_it() {
        let mut m = manager(ManagerConfig::default());
        let mut k = FakeKnobs::default();
        let idx = |m: &ConfigManager, a: Action| m.space().index_of(&a).expect("in space");
        // 2 vCPUs; no grant: up steps allowed.
        assert!(m.mask()[idx(&m, Action::VcpuDelta(1))]);
        m.set_grant(HostGrant {
            vcpus: Some(2),
            bytes_per_sec: vec![Some(60_000_000)],
        });
        let mask = m.mask();
        // 50 MB/s and tighter fit a 60 MB/s grant; 200 MB/s and unlimited do not.
        for (level, ok) in [(0, false), (1, false), (2, true), (3, true), (4, true)] {
            let a = Action::RateLimit { device: 0, level };
            if m.state().rate_level.first() == Some(&level) {
                continue;
            }
            assert_eq!(mask[idx(&m, a)], ok, "level {level}");
        }
        assert!(!mask[idx(&m, Action::VcpuDelta(1))]);
        assert!(!mask[idx(&m, Action::VcpuDelta(2))]);
        assert!(mask[idx(&m, Action::VcpuDelta(-1))]);
        let d = m.apply(Action::VcpuDelta(1), &mut k);
        assert!(
            matches!(
                d,
                Decision::Refused {
                    reason: Refusal::NotGranted { .. },
                    ..
                }
            ),
            "{d}"
        );
        assert!(k.entries().is_empty());
        assert!(d.to_string().contains("2 host core(s)"), "{d}");
        m.set_grant(HostGrant {
            vcpus: Some(3),
            bytes_per_sec: Vec::new(),
        });
        assert!(m.mask()[idx(&m, Action::VcpuDelta(1))]);
        assert!(!m.mask()[idx(&m, Action::VcpuDelta(2))]);
        m.set_grant(HostGrant::default());
        assert!(m.mask()[idx(&m, Action::VcpuDelta(2))]);
    }

    #[test]
    fn absent_devices_are_masked_refused_and_never_applied() {
        // Every action of the layout, tried over many intervals on VMs of several shapes:
        // the monitor only ever sees actions on devices the VM has.
        for (v, d, n) in [
            (1, 0, 0),
            (8, 4, 2),
            (4, 1, 0),
            (2, 2, 0),
            (3, 4, 1),
            (2, 0, 2),
        ] {
            let space = ActionSpace::new(VmShape::new(v, d, n));
            let bounds = Bounds::for_space(&space, 1, v);
            let state = KnobState::initial(&space, v);
            let config = ManagerConfig {
                cooldown_intervals: 0,
                rollback_after: 0,
                ..ManagerConfig::default()
            };
            let mut m = ConfigManager::new(space.clone(), bounds, state, config).expect("valid");
            let mut k = FakeKnobs::default();
            let mut applied = 0;
            for round in 0..3 {
                for (i, a) in space.actions().iter().enumerate() {
                    m.next_interval(Some(round as f64), &mut k);
                    let masked = !m.mask()[i];
                    let dec = m.apply(*a, &mut k);
                    if !space.present(a) {
                        assert!(masked, "{} masked on {v}/{d}/{n}", a.name());
                        assert!(
                            matches!(
                                dec,
                                Decision::Refused {
                                    reason: Refusal::Invalid(Invalid::Absent(_)),
                                    ..
                                }
                            ),
                            "{dec:?}"
                        );
                    }
                    assert_eq!(matches!(dec, Decision::Applied { .. }), !masked && i != 0);
                    applied += usize::from(matches!(dec, Decision::Applied { .. }));
                }
            }
            assert_eq!(k.entries().len(), applied);
            for e in k.entries() {
                for slot in d.min(4)..4 {
                    assert!(!e.contains(&format!("RateLimit {{ device: {slot},")), "{e}");
                    assert!(!e.contains(&format!("Priority {{ device: {slot},")), "{e}");
                }
                for slot in n.min(2)..2 {
                    assert!(!e.contains(&format!("NetQos {{ device: {slot},")), "{e}");
                }
            }
            assert!(applied > 0 || v == 1 && d == 0 && n == 0);
        }
    }

    #[test]
    fn start_in_sets_each_differing_knob_without_cooldown_or_watch() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 8);
        let static_state = KnobState::initial(&space, 8);
        let mut m = ConfigManager::new(
            space,
            bounds,
            static_state.clone(),
            ManagerConfig::default(),
        )
        .expect("valid manager");
        let mut k = FakeKnobs::default();
        let mut target = static_state.clone();
        target.vcpus = 3;
        target.rate_level[0] = 4;
        target.priority[0] = PriorityLevel::High;
        let applied = m.start_in(&target, &mut k).expect("applies");
        assert_eq!(
            applied,
            vec!["vcpu-2", "vcpu-2", "vcpu-1", "rl:blk0:4", "prio:blk0:high"]
        );
        assert_eq!(m.state(), &target);
        assert_eq!(
            m.static_state(),
            &static_state,
            "the watchdog still restores the VM's own"
        );
        assert_eq!(m.pending(), None, "nothing watched");
        // No cooldown: the policy may change a knob in the first interval.
        let d = m.apply(
            Action::RateLimit {
                device: 0,
                level: 0,
            },
            &mut k,
        );
        assert!(matches!(d, Decision::Applied { .. }), "{d}");
        // Already there: nothing to do.
        let mut m2 = manager(ManagerConfig::default());
        let same = m2.state().clone();
        assert!(m2.start_in(&same, &mut k).expect("nothing").is_empty());
        // Outside the bounds: skipped, not an error.
        let mut low = same.clone();
        low.vcpus = 0;
        assert!(m2.start_in(&low, &mut k).expect("skips").is_empty());
        assert_eq!(m2.state().vcpus, 2);
        // The monitor refusing a knob stops the start and says which.
        *k.fail.lock().unwrap() = Some("no such drive".into());
        let mut tight = same.clone();
        tight.rate_level[0] = 2;
        let e = m2.start_in(&tight, &mut k).unwrap_err();
        assert!(
            e.contains("rl:blk0:2") && e.contains("no such drive"),
            "{e}"
        );
        assert_eq!(m2.state(), &same);
    }

    #[test]
    fn cooldown_and_one_change_per_interval() {
        let config = ManagerConfig {
            cooldown_intervals: 3,
            rollback_after: 0,
            ..ManagerConfig::default()
        };
        let mut m = manager(config);
        let mut k = FakeKnobs::default();
        assert!(matches!(
            m.apply(Action::VcpuDelta(1), &mut k),
            Decision::Applied { .. }
        ));
        let prio = Action::Priority {
            device: 0,
            level: PriorityLevel::High,
        };
        assert_eq!(
            m.check(&prio),
            Err(Refusal::OncePerInterval),
            "second change in the same interval"
        );
        m.next_interval(Some(1.0), &mut k);
        assert!(matches!(m.apply(prio, &mut k), Decision::Applied { .. }));
        m.next_interval(Some(1.0), &mut k);
        // vcpus changed at interval 0, now 2: 1 more interval of cooldown.
        assert_eq!(
            m.check(&Action::VcpuDelta(-1)),
            Err(Refusal::Cooldown {
                knob: "vcpus".into(),
                remaining: 1
            })
        );
        let mask = m.mask();
        assert!(mask[0], "noop always allowed");
        assert!(!mask[m.space().index_of(&Action::VcpuDelta(-1)).unwrap()]);
        m.next_interval(Some(1.0), &mut k);
        assert_eq!(m.check(&Action::VcpuDelta(-1)), Ok(()));
        assert!(m.mask()[m.space().index_of(&Action::VcpuDelta(-1)).unwrap()]);
    }

    #[test]
    fn rolls_back_when_reward_stays_below_baseline() {
        let config = ManagerConfig {
            cooldown_intervals: 2,
            rollback_after: 3,
            baseline_window: 4,
            rollback_tolerance: 0.0,
            rebaseline_on_shift: true,
            // The plain watch: every reward judges, and a rolled-back change may come
            // again after its cooldown (both have tests of their own).
            settle_after_tightening: 0,
            retry_after_rollback: 0,
        };
        let mut m = manager(config);
        let mut k = FakeKnobs::default();
        for r in [1.0, 2.0, 3.0, 2.0] {
            m.next_interval(Some(r), &mut k);
        }
        assert_eq!(m.baseline(), Some(2.0));
        let rl = Action::RateLimit {
            device: 0,
            level: 3,
        };
        assert!(matches!(
            m.apply(rl, &mut k),
            Decision::Applied { baseline: Some(b), .. } if b == 2.0
        ));
        assert_eq!(m.pending(), Some("rl:blk0:3"));
        m.next_interval(Some(1.5), &mut k);
        // While watched, nothing else changes.
        assert!(matches!(
            m.check(&Action::VcpuDelta(1)),
            Err(Refusal::Evaluating { remaining: 2, .. })
        ));
        assert_eq!(m.next_interval(Some(1.0), &mut k), None);
        let d = m.next_interval(Some(1.9), &mut k).expect("evaluation ends");
        match &d {
            Decision::RolledBack {
                name,
                inverse_name,
                baseline,
                rewards,
                ..
            } => {
                assert_eq!(name, "rl:blk0:3");
                assert_eq!(inverse_name, "rl:blk0:0");
                assert_eq!(*baseline, 2.0);
                assert_eq!(rewards, &vec![1.5, 1.0, 1.9]);
            }
            other => panic!("expected a rollback, got {other:?}"),
        }
        assert_eq!(d.event_kind(), Some(event_kind::ROLLBACK));
        assert!(d.detail().contains("stayed below baseline"));
        assert_eq!(d.action_label(), "rollback:rl:blk0:0");
        assert_eq!(m.state().rate_level[0], 0);
        assert_eq!(m.pending(), None);
        assert_eq!(
            k.entries(),
            vec![
                "RateLimit { device: 0, level: 3 }",
                "RateLimit { device: 0, level: 0 }"
            ]
        );
        // The knob's cooldown restarted with the rollback.
        assert!(matches!(m.check(&rl), Err(Refusal::OncePerInterval)));
        m.next_interval(Some(2.0), &mut k);
        assert!(matches!(m.check(&rl), Err(Refusal::Cooldown { .. })));
    }

    #[test]
    fn a_tightened_limit_is_judged_after_its_bucket_drains_and_not_retried_soon() {
        let config = ManagerConfig {
            cooldown_intervals: 2,
            rollback_after: 2,
            rollback_tolerance: 0.0,
            settle_after_tightening: 1,
            retry_after_rollback: 6,
            ..ManagerConfig::default()
        };
        let mut m = manager(config);
        let mut k = FakeKnobs::default();
        for _ in 0..5 {
            m.next_interval(Some(2.0), &mut k);
        }
        let tighten = Action::RateLimit {
            device: 0,
            level: 3,
        };
        assert!(matches!(m.apply(tighten, &mut k), Decision::Applied { .. }));
        // The first interval still runs on banked tokens and scores above the baseline:
        // it neither keeps the change nor counts against it.
        assert_eq!(m.next_interval(Some(2.5), &mut k), None);
        assert_eq!(m.pending(), Some("rl:blk0:3"));
        assert!(matches!(
            m.check(&Action::VcpuDelta(1)),
            Err(Refusal::Evaluating { remaining: 2, .. })
        ));
        assert_eq!(m.next_interval(Some(1.0), &mut k), None);
        let d = m.next_interval(Some(1.2), &mut k).expect("judged");
        assert!(
            matches!(&d, Decision::RolledBack { rewards, .. } if rewards == &vec![2.5, 1.0, 1.2]),
            "{d:?}"
        );
        assert_eq!(m.state().rate_level[0], 0);
        // Past its cooldown the knob may move again, but not to the step just undone.
        for _ in 0..2 {
            m.next_interval(Some(2.0), &mut k);
        }
        let other = Action::RateLimit {
            device: 0,
            level: 1,
        };
        assert_eq!(m.check(&other), Ok(()));
        assert!(
            matches!(m.check(&tighten), Err(Refusal::RolledBackRecently { ref name, since: 2 }) if name == "rl:blk0:3"),
            "{:?}",
            m.check(&tighten)
        );
        assert!(!m.mask()[m.space().index_of(&tighten).unwrap()]);
        // Until the memory runs out...
        for _ in 0..4 {
            m.next_interval(Some(2.0), &mut k);
        }
        assert_eq!(m.check(&tighten), Ok(()));
        // ... or the workload shifts.
        assert!(matches!(m.apply(tighten, &mut k), Decision::Applied { .. }));
        for r in [2.5, 1.0, 1.0] {
            m.next_interval(Some(r), &mut k);
        }
        assert_eq!(m.state().rate_level[0], 0, "rolled back again");
        m.next_interval(Some(2.0), &mut k);
        assert!(matches!(
            m.check(&tighten),
            Err(Refusal::RolledBackRecently { .. })
        ));
        let _ = m.workload_shifted();
        assert_eq!(m.check(&tighten), Ok(()));

        // A tightening whose reward holds after the bucket drained is kept; a loosening
        // is judged from its first interval.
        let mut m = manager(config);
        let mut k = FakeKnobs::default();
        for _ in 0..5 {
            m.next_interval(Some(2.0), &mut k);
        }
        assert!(matches!(m.apply(tighten, &mut k), Decision::Applied { .. }));
        assert_eq!(m.next_interval(Some(1.0), &mut k), None, "settling");
        assert!(matches!(
            m.next_interval(Some(2.1), &mut k),
            Some(Decision::Kept { .. })
        ));
        for _ in 0..2 {
            m.next_interval(Some(2.0), &mut k);
        }
        let loosen = Action::RateLimit {
            device: 0,
            level: 0,
        };
        assert!(matches!(m.apply(loosen, &mut k), Decision::Applied { .. }));
        assert!(matches!(
            m.next_interval(Some(2.5), &mut k),
            Some(Decision::Kept { .. })
        ));
    }

    #[test]
    fn a_workload_shift_keeps_the_watched_change_and_restarts_the_baseline() {
        let config = ManagerConfig {
            rollback_tolerance: 0.0,
            ..ManagerConfig::default()
        };
        let rl = Action::RateLimit {
            device: 0,
            level: 3,
        };
        let mut m = manager(config);
        let mut k = FakeKnobs::default();
        for _ in 0..5 {
            m.next_interval(Some(5.0), &mut k);
        }
        assert!(matches!(m.apply(rl, &mut k), Decision::Applied { .. }));
        m.next_interval(Some(-1.0), &mut k);
        // The guest went idle: -1 is no sign against the change.
        let d = m
            .workload_shifted()
            .expect("the watched change is reported");
        assert!(
            matches!(&d, Decision::Kept { name, mean, baseline } if name == "rl:blk0:3" && *mean == -1.0 && *baseline == 5.0),
            "{d:?}"
        );
        assert_eq!(m.pending(), None);
        assert_eq!(m.baseline(), None);
        // The cooldown of blk0's limit is lifted: the step can be corrected at once.
        let lift = Action::RateLimit {
            device: 0,
            level: 0,
        };
        assert_eq!(m.next_interval(None, &mut k), None);
        assert_eq!(m.check(&lift), Ok(()));
        for _ in 0..3 {
            assert_eq!(m.next_interval(Some(-1.0), &mut k), None);
        }
        assert_eq!(m.state().rate_level[0], 3);
        assert_eq!(m.baseline(), Some(-1.0));

        // Switched off: the same sequence is judged across the shift and rolled back.
        let mut m = manager(ManagerConfig {
            rebaseline_on_shift: false,
            ..config
        });
        let mut k = FakeKnobs::default();
        for _ in 0..5 {
            m.next_interval(Some(5.0), &mut k);
        }
        assert!(matches!(m.apply(rl, &mut k), Decision::Applied { .. }));
        m.next_interval(Some(-1.0), &mut k);
        assert_eq!(m.workload_shifted(), None);
        assert!(matches!(m.check(&lift), Err(Refusal::Evaluating { .. })));
        // A tightening: its first interval settles, the next three judge it.
        m.next_interval(Some(-1.0), &mut k);
        m.next_interval(Some(-1.0), &mut k);
        let d = m.next_interval(Some(-1.0), &mut k);
        assert!(matches!(d, Some(Decision::RolledBack { .. })), "{d:?}");
    }

    #[test]
    fn keeps_a_change_that_is_not_always_below() {
        let mut m = manager(ManagerConfig {
            rollback_tolerance: 0.0,
            ..ManagerConfig::default()
        });
        let mut k = FakeKnobs::default();
        m.next_interval(Some(1.0), &mut k);
        assert!(matches!(
            m.apply(Action::VcpuDelta(-1), &mut k),
            Decision::Applied { .. }
        ));
        assert_eq!(m.next_interval(Some(0.5), &mut k), None);
        // The first reward at or above the baseline decides it: kept at once, and the
        // manager is free for the next change.
        let d = m.next_interval(Some(1.5), &mut k);
        assert!(
            matches!(&d, Some(Decision::Kept { baseline, mean, .. }) if *baseline == 1.0 && *mean == 1.0),
            "{d:?}"
        );
        assert_eq!(m.pending(), None);
        assert_eq!(m.state().vcpus, 1);
        assert_eq!(d.map(|d| d.event_kind()), Some(None));
        assert_eq!(m.next_interval(Some(0.5), &mut k), None);
    }

    #[test]
    fn failed_apply_and_failed_rollback() {
        let mut m = manager(ManagerConfig {
            rollback_after: 1,
            rollback_tolerance: 0.0,
            ..ManagerConfig::default()
        });
        let mut k = FakeKnobs::default();
        *k.fail.lock().unwrap() = Some("no such core".into());
        let d = m.apply(Action::VcpuDelta(1), &mut k);
        assert!(matches!(d, Decision::Failed { ref error, .. } if error == "no such core"));
        assert_eq!(d.event_kind(), Some(event_kind::REFUSAL));
        assert_eq!(m.state().vcpus, 2);
        *k.fail.lock().unwrap() = None;
        m.next_interval(Some(1.0), &mut k);
        assert!(matches!(
            m.apply(Action::VcpuDelta(1), &mut k),
            Decision::Applied { .. }
        ));
        *k.fail.lock().unwrap() = Some("busy".into());
        let d = m
            .next_interval(Some(0.0), &mut k)
            .expect("rollback attempted");
        assert!(
            matches!(d, Decision::RestoredStatic { ref reason } if reason.contains("refused the rollback")),
            "{d:?}"
        );
        assert_eq!(d.event_kind(), Some(event_kind::FALLBACK));
        assert_eq!(m.state(), m.static_state());
        assert_eq!(k.entries().last().map(String::as_str), Some("static"));
    }

    #[test]
    fn non_finite_rewards_are_ignored() {
        let mut m = manager(ManagerConfig::default());
        let mut k = FakeKnobs::default();
        m.next_interval(Some(f64::NAN), &mut k);
        m.next_interval(None, &mut k);
        assert_eq!(m.baseline(), None);
        m.next_interval(Some(2.0), &mut k);
        m.next_interval(Some(f64::INFINITY), &mut k);
        assert_eq!(m.baseline(), Some(2.0));
        assert_eq!(m.interval(), 4);
    }

    #[test]
    fn setup_is_validated() {
        let space = ActionSpace::new(VmShape::new(4, 1, 0));
        let state = KnobState::initial(&space, 2);
        let cfg = ManagerConfig::default();
        let mut b = Bounds::for_space(&space, 3, 4);
        assert!(matches!(
            ConfigManager::new(space.clone(), b.clone(), state.clone(), cfg),
            Err(ManagerError::InvalidState(_))
        ));
        b.min_vcpus = 0;
        assert!(b.validate(&space).is_err());
        b.min_vcpus = 5;
        assert!(b.validate(&space).is_err());
        let mut b = Bounds::for_space(&space, 1, 4);
        b.allowed_devices.push(true);
        assert!(b.validate(&space).is_err());
        let mut b = Bounds::for_space(&space, 1, 4);
        b.max_rate_level = 9;
        assert!(b.validate(&space).is_err());
        let mut s = state.clone();
        s.net_qos = vec![0];
        assert!(s.validate(&space).is_err());
        let mut s = state.clone();
        s.rate_level[0] = RATE_LADDER.len();
        assert!(s.validate(&space).is_err());
        let mut s = state.clone();
        s.rate_level.push(0);
        assert!(s.validate(&space).is_err());
        let bad = ManagerConfig {
            baseline_window: 0,
            ..cfg
        };
        assert!(bad.validate().is_err());
        let bad: Result<ManagerConfig, _> = serde_json::from_str(r#"{"cooldown": 3}"#);
        assert!(bad.is_err());
        let ok: ManagerConfig = serde_json::from_str(r#"{"cooldown_intervals": 7}"#).unwrap();
        assert_eq!(ok.cooldown_intervals, 7);
        assert_eq!(ok.rollback_after, 3);
    }

    #[test]
    fn inverse_restores_the_previous_setting() {
        let space = ActionSpace::new(VmShape::new(4, 1, 1));
        let s = KnobState::initial(&space, 2);
        let a = Action::NetQos {
            device: 0,
            level: 2,
        };
        let after = s.after(&a).unwrap();
        assert_eq!(after.net_qos[0], 2);
        assert_eq!(after.after(&s.inverse(&a).unwrap()).unwrap(), s);
        for a in space.actions().iter().filter(|a| space.present(a)) {
            let after = s.after(a).unwrap();
            assert_eq!(after.after(&s.inverse(a).unwrap()).unwrap(), s, "{a:?}");
        }
        assert!(s
            .after(&Action::RateLimit {
                device: 1,
                level: 1
            })
            .is_err());
        assert!(s
            .after(&Action::NetQos {
                device: 1,
                level: 1
            })
            .is_err());
        let mut zero = s.clone();
        zero.vcpus = 1;
        assert!(zero.after(&Action::VcpuDelta(-2)).is_err());
    }

    #[test]
    fn watchdog_fires_once_per_stall_and_rearms() {
        let mut w = Watchdog::new(Duration::from_millis(5), 3).expect("valid");
        let hb = w.heartbeat();
        thread::sleep(Duration::from_millis(30));
        assert_eq!(w.poll(), None, "not armed before the first beat");
        hb.beat();
        assert_eq!(w.poll(), None);
        thread::sleep(Duration::from_millis(30));
        let silent = w.poll().expect("stalled");
        assert!(silent >= Duration::from_millis(15));
        assert_eq!(w.poll(), None, "fires once per stall");
        assert!(hb.take_fired());
        assert!(!hb.take_fired());
        hb.beat();
        assert_eq!(w.poll(), None);
        thread::sleep(Duration::from_millis(30));
        assert!(w.poll().is_some());
        assert_eq!(hb.fires(), 2);
        assert!(Watchdog::new(Duration::ZERO, 3).is_err());
        assert!(Watchdog::new(Duration::from_millis(1), 1).is_err());
    }

    #[test]
    fn watchdog_thread_restores_static_on_stall() {
        let w = Watchdog::new(Duration::from_millis(5), 2).expect("valid");
        let hb = w.heartbeat();
        let knobs = FakeKnobs::default();
        let mut k2 = knobs.clone();
        let handle = w.spawn(move |_| k2.restore_static()).expect("spawn");
        // Beating keeps it quiet.
        for _ in 0..10 {
            hb.beat();
            thread::sleep(Duration::from_millis(2));
        }
        assert!(knobs.entries().is_empty());
        // Then the tuner stalls.
        let deadline = Instant::now() + Duration::from_secs(5);
        while knobs.entries().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(knobs.entries(), vec!["static"]);
        assert!(handle.heartbeat().take_fired());
        handle.stop();
    }
}
