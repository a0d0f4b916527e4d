//! The tuner: one decision per sampled interval, the decide-and-apply step of the
//! control loop ([`crate::agent::Agent::start_loop`]: snapshot, sample, decide, apply,
//! record on one thread, with no queue in front of the decision).
//!
//! For every [`Sample`] the [`Tuner`]:
//!
//! 1. beats the watchdog's [`Heartbeat`]; if the watchdog fired meanwhile (the static
//!    configuration was restored behind the tuner's back), resets the manager's view;
//!    reads the knobs in force from the monitor's knob controller
//!    ([`ConfigManager::observe`]): a change made by another writer (the control API,
//!    the host's grant) is what the masks and the reward see, and ends a watched change;
//!    at an A/B block's start ([`AbSchedule`]) restores the static configuration;
//! 2. scores the interval that ended ([`crate::reward`]) under the knobs in force during
//!    it, and stores `(action, reward)` on the previous interval's row
//!    ([`RepoWriter::record_outcome`]);
//! 3. lets the [`ConfigManager`] evaluate the change being watched (which may roll it
//!    back);
//! 4. updates the Holt forecaster ([`crate::forecast`], with the factors of the
//!    network's card) and builds the policy's input (the vector, or the vector and its
//!    one-step forecast);
//! 5. asks the policy for its proposal (timed): a Q-network's Q-values or a baseline's
//!    action; masks the actions the manager would refuse; selects (epsilon-greedy over
//!    Q-values, [`crate::policy::select`]; a baseline's action when the mask allows it,
//!    else `noop`) and applies the choice through the manager and the monitor's
//!    [`Knobs`]; counts the decision for the A/B schedule (at a block's end the other
//!    arm takes the policy slot).
//!
//! A policy error (NaN output, wrong length, tract failure) restores the static
//! configuration and replaces the policy by [`StaticPolicy`]. Refusals, rollbacks,
//! fallbacks and policy load failures are logged and stored as events.
//!
//! Hot reload: [`PolicyHandle`] (cloneable, for the control API) swaps the policy
//! atomically between two decisions: the tuner holds the policy's lock for the whole
//! inference, and a swap takes it only to exchange the box. Loading happens outside the
//! lock; a failed load keeps the old policy.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ab::AbSchedule;
use crate::actions::{Action, ActionSpace};
use crate::agent::{Sample, Sink};
use crate::forecast::{ForecastConfig, ForecastError, HoltForecaster};
use crate::manager::{ConfigManager, Decision, Heartbeat, Knobs};
use crate::policy::{
    check_q, select_explained, EpsilonSchedule, OnnxPolicy, Policy, PolicyContext, PolicyError,
    Proposal, QNetwork, Selection, XorShift64,
};
use crate::reward::{reward, RewardError, RewardWeights};
use crate::schema::{FeatureId, Schema};
use crate::state_repo::{event_kind, Event, RepoWriter};

/// A baseline's choice (`chosen`: its index in the space) under the mask, with the
/// loop's exploration: with probability `epsilon` a uniformly random valid action;
/// otherwise the choice when the mask allows it, else `noop` (index 0, always valid).
fn select_baseline(
    chosen: Option<usize>,
    mask: &[bool],
    epsilon: f64,
    rng: &mut XorShift64,
) -> Result<Selection, PolicyError> {
    if let (_, Some(index)) = crate::policy::valid_or_explore(mask, epsilon, rng)? {
        return Ok(Selection {
            index,
            explored: true,
        });
    }
    let index = chosen
        .filter(|i| mask.get(*i).copied().unwrap_or(false))
        .unwrap_or(0);
    Ok(Selection {
        index,
        explored: false,
    })
}

/// Event kind stored when a new policy was swapped in.
pub const POLICY_SWAP: &str = "policy_swap";

/// Errors of the tuner's setup.
#[derive(Debug, Error)]
pub enum TunerError {
    /// Bad reward weights.
    #[error(transparent)]
    Reward(#[from] RewardError),
    /// Bad forecaster factors.
    #[error(transparent)]
    Forecast(#[from] ForecastError),
    /// Bad exploration schedule.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Configuration of the tuner loop (part of the VM's configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunerConfig {
    /// The VM, as written into the state repository.
    pub vm_id: String,
    /// Reward weights.
    pub weights: RewardWeights,
    /// Exploration (default: 0, greedy).
    pub epsilon: EpsilonSchedule,
    /// Seed of the exploration PRNG.
    pub seed: u64,
    /// Forecaster factors.
    pub forecast: ForecastConfig,
    /// Mask, before selection, the actions the manager would refuse now (cooldown, a
    /// change being evaluated); without it such choices are refused and logged. Bounds and
    /// no-change actions are always masked. Default true.
    pub mask_safeguards: bool,
}

impl Default for TunerConfig {
    fn default() -> Self {
        Self {
            vm_id: "vm0".to_string(),
            weights: RewardWeights::default(),
            epsilon: EpsilonSchedule::default(),
            seed: 1,
            forecast: ForecastConfig::default(),
            mask_safeguards: true,
        }
    }
}

/// Counts and timings of the tuner.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TunerStats {
    /// Samples handled (decisions taken, `noop` included).
    pub decisions: u64,
    /// Actions applied.
    pub applied: u64,
    /// Actions refused by a safeguard or by the monitor.
    pub refused: u64,
    /// Changes rolled back.
    pub rollbacks: u64,
    /// Returns to the static configuration (policy error, watchdog, failed rollback).
    pub fallbacks: u64,
    /// Policy errors.
    pub policy_errors: u64,
    /// Random exploration steps.
    pub explored: u64,
    /// Policies swapped in.
    pub policy_swaps: u64,
    /// Policy loads that failed.
    pub load_failures: u64,
    /// Policy in charge.
    pub policy_id: String,
    /// Reward of the last interval.
    pub last_reward: Option<f64>,
    /// Action of the last decision (as stored).
    pub last_action: Option<String>,
    /// Duration of the last inference, ns.
    pub inference_ns_last: u64,
    /// Longest inference, ns.
    pub inference_ns_max: u64,
    /// Sum of inference durations, ns (mean = total / inferences).
    pub inference_ns_total: u64,
    /// Inferences timed.
    pub inferences: u64,
    /// Largest share of an interval spent in inference.
    pub inference_fraction_max: f64,
    /// Generation of the monitor's knob state the last decision was made on (see
    /// [`crate::knob_state::VmKnobs::generation`]).
    pub knob_generation: Option<u64>,
    /// The knob levels the last decision was made on (vCPUs, per drive rate level and
    /// priority, per network device QoS level), as read from the monitor.
    pub knobs_seen: Option<crate::manager::KnobState>,
    /// Names of the actions the last decision's mask allowed.
    pub allowed_last: Vec<String>,
    /// Age of the sample the last decision was made on, from its snapshot to the
    /// decision's action applied, ns.
    pub sample_age_ns_last: u64,
    /// Oldest sample a decision was made on, ns.
    pub sample_age_ns_max: u64,
    /// Duration of the last decision, ns: from the sample handed to the tuner to its
    /// action applied (observed knobs, reward, forecast, inference, mask, selection,
    /// apply, records). The sample age adds the snapshot and the vector before it.
    pub decision_ns_last: u64,
    /// Knob changes seen that this tuner did not make (API, host grant).
    pub outside_changes: u64,
}

impl TunerStats {
    /// Mean inference time in nanoseconds.
    pub fn inference_ns_mean(&self) -> f64 {
        if self.inferences == 0 {
            0.0
        } else {
            self.inference_ns_total as f64 / self.inferences as f64
        }
    }
}

struct Shared {
    vm_id: String,
    space: ActionSpace,
    weights: RewardWeights,
    policy: Mutex<Policy>,
    stats: Mutex<TunerStats>,
    repo: Mutex<Option<RepoWriter>>,
    id_slots: Mutex<Vec<Arc<Mutex<String>>>>,
    last_ts: AtomicU64,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn event(&self, ts_ns: u64, kind: &str, detail: String) {
        if let Some(repo) = lock(&self.repo).as_ref() {
            let event = Event {
                ts_ns,
                vm_id: self.vm_id.clone(),
                kind: kind.to_string(),
                detail,
            };
            if let Err(e) = repo.record_event(event) {
                log::warn!("tuner event {kind} not stored: {e}");
            }
        }
    }

    /// Puts `policy` in charge; returns the one it replaces.
    fn swap(&self, policy: Policy) -> Policy {
        let new_id = policy.id().to_string();
        let old = std::mem::replace(&mut *lock(&self.policy), policy);
        for slot in lock(&self.id_slots).iter() {
            *lock(slot) = new_id.clone();
        }
        let mut stats = lock(&self.stats);
        stats.policy_id = new_id;
        old
    }
}

/// A handle on the tuner's policy slot, for hot reload from another thread (cloneable).
#[derive(Clone)]
pub struct PolicyHandle(Arc<Shared>);

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHandle")
            .field("policy", &self.current_id())
            .finish()
    }
}

impl PolicyHandle {
    /// Replaces the policy between two decisions; returns the old policy's id. Stored
    /// as a `policy_swap` event.
    /// In an A/B run it replaces the arm in charge.
    pub fn swap(&self, policy: Policy) -> String {
        let new_id = policy.id().to_string();
        let old = self.0.swap(policy).id().to_string();
        lock(&self.0.stats).policy_swaps += 1;
        log::info!("tuner policy {old} replaced by {new_id}");
        self.0.event(
            self.0.last_ts.load(Ordering::Relaxed),
            POLICY_SWAP,
            format!("{old} -> {new_id}"),
        );
        old
    }

    /// Loads an ONNX policy (validated against the VM's action space and reward
    /// weights) and swaps it in. On failure the old policy stays, and the error is
    /// logged, stored as a `policy_load_failure` event and returned.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<String, PolicyError> {
        let path = path.as_ref();
        match OnnxPolicy::load(path, &self.0.space, Some(&self.0.weights)) {
            Ok(policy) => {
                let id = policy.id().to_string();
                self.swap(Policy::network(policy));
                Ok(id)
            }
            Err(e) => {
                lock(&self.0.stats).load_failures += 1;
                log::error!(
                    "policy {} not loaded, keeping the current one: {e}",
                    path.display()
                );
                self.0.event(
                    self.0.last_ts.load(Ordering::Relaxed),
                    event_kind::POLICY_LOAD_FAILURE,
                    format!("{}: {e}", path.display()),
                );
                Err(e)
            }
        }
    }

    /// The id of the policy in charge.
    pub fn current_id(&self) -> String {
        lock(&self.0.policy).id().to_string()
    }

    /// The tuner's counts so far.
    pub fn stats(&self) -> TunerStats {
        lock(&self.0.stats).clone()
    }
}

/// What one decision did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Reward of the interval that ended.
    pub reward: f64,
    /// Decisions of the manager in this step (rollback, fallback, the action's fate).
    pub decisions: Vec<Decision>,
    /// Index of the selected action, if the policy was consulted.
    pub selected: Option<usize>,
    /// Whether the selection explored.
    pub explored: bool,
    /// Inference time, ns.
    pub inference_ns: u64,
    /// The action label stored for this interval.
    pub label: String,
    /// Names of the actions the mask allowed (empty when the policy was not consulted).
    pub allowed: Vec<String>,
    /// Generation of the monitor's knob state the decision was made on.
    pub knob_generation: Option<u64>,
    /// The knob levels the decision was made on.
    pub knobs_seen: crate::manager::KnobState,
}

/// The kind of work the guest reported through the metrics device in one interval: the
/// tuner tells the configuration manager when it changes
/// ([`ConfigManager::workload_shifted`]), since rewards of one kind are no baseline for
/// another. It does not depend on the knobs: fewer vCPUs or a tighter limit change how
/// much work is done, not whether operations (and their latencies) are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// No operations reported.
    Idle,
    /// Operations with latency samples (e.g. I/O requests).
    Timed,
    /// Operations without latency samples (e.g. computation).
    Untimed,
}

impl WorkloadKind {
    /// The kind of `sample`'s interval.
    pub fn of(sample: &Sample) -> WorkloadKind {
        if sample.raw_of(FeatureId::GuestOpsRate) <= 0.0 {
            WorkloadKind::Idle
        } else if sample.raw_of(FeatureId::GuestLatencyMean) > 0.0 {
            WorkloadKind::Timed
        } else {
            WorkloadKind::Untimed
        }
    }
}

/// The tuner: policy, configuration manager and monitor knobs, one decision per sample.
pub struct Tuner {
    config: TunerConfig,
    shared: Arc<Shared>,
    manager: ConfigManager,
    knobs: Box<dyn Knobs>,
    forecaster: HoltForecaster,
    rng: XorShift64,
    steps: u64,
    heartbeat: Option<Heartbeat>,
    last: Option<(u64, String)>,
    prev_activity: Option<(u64, Vec<u64>)>,
    /// The kind of work the guest reported in the previous interval.
    last_kind: Option<WorkloadKind>,
    experience: Option<SyncSender<Transition>>,
    /// The vector of the last decision and the action that took effect after it.
    pending: Option<(Vec<f32>, usize)>,
    /// The A/B schedule (the arm waiting), in an A/B run.
    ab: Option<AbSchedule>,
    /// An A/B block ended: restore the static configuration before the next decision.
    ab_reset: bool,
}

/// One step of live experience, for online learning: the vector the tuner decided on,
/// the action that took effect (see [`ActionSpace::effective_index`]), the reward of the
/// interval that followed and that interval's vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Normalised performance vector before the action.
    pub state: Vec<f32>,
    /// Index of the action in the tuner's action space.
    pub action: usize,
    /// Reward of the next interval.
    pub reward: f64,
    /// Normalised performance vector of the next interval.
    pub next_state: Vec<f32>,
}

impl std::fmt::Debug for Tuner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuner")
            .field("vm_id", &self.config.vm_id)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Tuner {
    /// A tuner driving `knobs` through `manager` with `policy` (e.g. from
    /// [`crate::policy::load_or_static`]).
    pub fn new(
        config: TunerConfig,
        manager: ConfigManager,
        knobs: Box<dyn Knobs>,
        policy: Policy,
    ) -> Result<Tuner, TunerError> {
        config.weights.validate()?;
        config.epsilon.validate()?;
        let forecaster = HoltForecaster::new(Schema::len(), config.forecast)?;
        let stats = TunerStats {
            policy_id: policy.id().to_string(),
            ..TunerStats::default()
        };
        let shared = Arc::new(Shared {
            vm_id: config.vm_id.clone(),
            space: manager.space().clone(),
            weights: config.weights,
            policy: Mutex::new(policy),
            stats: Mutex::new(stats),
            repo: Mutex::new(None),
            id_slots: Mutex::new(Vec::new()),
            last_ts: AtomicU64::new(0),
        });
        Ok(Tuner {
            rng: XorShift64::new(config.seed),
            config,
            shared,
            manager,
            knobs,
            forecaster,
            steps: 0,
            heartbeat: None,
            last: None,
            prev_activity: None,
            last_kind: None,
            experience: None,
            pending: None,
            ab: None,
            ab_reset: false,
        })
    }

    /// Runs an A/B test: `schedule` holds the arm waiting, the policy given to
    /// [`Tuner::new`] is the first arm (see [`AbSchedule`]).
    pub fn with_ab(mut self, schedule: AbSchedule) -> Self {
        self.ab = Some(schedule);
        self
    }

    /// Stores outcomes and events through `writer`.
    pub fn with_repo(self, writer: RepoWriter) -> Self {
        *lock(&self.shared.repo) = Some(writer);
        self
    }

    /// Beats `heartbeat` every decision (see [`crate::manager::Watchdog`]).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// Keeps `slot` (e.g. [`crate::state_repo::RepoSink::policy_handle`]) set to the id of
    /// the policy in charge.
    pub fn with_policy_id_slot(self, slot: Arc<Mutex<String>>) -> Self {
        *lock(&slot) = lock(&self.shared.policy).id().to_string();
        lock(&self.shared.id_slots).push(slot);
        self
    }

    /// Sends every completed [`Transition`] to `tx` (without blocking: when the receiver
    /// lags, transitions are dropped rather than delaying a decision).
    pub fn with_experience(mut self, tx: SyncSender<Transition>) -> Self {
        self.experience = Some(tx);
        self
    }

    /// A handle for hot reload and statistics.
    pub fn policy_handle(&self) -> PolicyHandle {
        PolicyHandle(Arc::clone(&self.shared))
    }

    /// The configuration manager.
    pub fn manager(&self) -> &ConfigManager {
        &self.manager
    }

    /// The tuner's counts so far.
    pub fn stats(&self) -> TunerStats {
        lock(&self.shared.stats).clone()
    }

    fn device_load(&mut self, at_ns: u64) -> Vec<f64> {
        let now = self.knobs.device_activity();
        let load = match &self.prev_activity {
            Some((t, prev)) if prev.len() == now.len() && at_ns > *t => {
                let secs = (at_ns - t) as f64 / 1e9;
                now.iter()
                    .zip(prev)
                    .map(|(c, p)| c.saturating_sub(*p) as f64 / secs)
                    .collect()
            }
            _ => Vec::new(),
        };
        self.prev_activity = Some((at_ns, now));
        load
    }

    fn record(&self, ts_ns: u64, d: &Decision) {
        match d.event_kind() {
            Some(kind) => {
                log::warn!("tuner {}: {d}", self.config.vm_id);
                self.shared.event(ts_ns, kind, d.detail());
            }
            None if d.changed() => log::info!("tuner {}: {d}", self.config.vm_id),
            None => log::debug!("tuner {}: {d}", self.config.vm_id),
        }
    }

    fn fall_back(&mut self, reason: String) -> Decision {
        let d = self.manager.restore_static(&mut *self.knobs, &reason);
        self.shared.swap(Policy::static_for(self.manager.space()));
        // The static configuration stays in charge: an A/B run ends here.
        self.ab = None;
        self.ab_reset = false;
        d
    }

    /// Takes one decision for `sample` (see the module documentation).
    pub fn step(&mut self, sample: &Sample) -> StepReport {
        let started = Instant::now();
        if let Some(hb) = &self.heartbeat {
            hb.beat();
        }
        self.shared.last_ts.store(sample.at_ns, Ordering::Relaxed);
        let mut decisions = Vec::new();
        if self.heartbeat.as_ref().is_some_and(Heartbeat::take_fired) {
            self.manager.reset_to_static();
            decisions.push(Decision::RestoredStatic {
                reason: "watchdog: the tuner thread stalled".to_string(),
            });
        }

        // The knobs in force, as the monitor's controller holds them: another writer
        // (the control API, the host's grant) may have changed them since the last step.
        let outside = self.manager.observe(&*self.knobs);
        if let Some(detail) = &outside {
            log::info!("tuner {}: {detail}", self.config.vm_id);
        }

        // A/B: the other arm's block starts from the static configuration.
        if std::mem::take(&mut self.ab_reset) {
            decisions.push(self.manager.restore_static(
                &mut *self.knobs,
                "A/B block boundary: each arm starts from the static configuration",
            ));
        }
        let r = reward(
            sample,
            self.manager.state(),
            self.manager.bounds(),
            &self.config.weights,
        );
        if let Some((ts, label)) = self.last.take() {
            self.store_outcome(ts, label, Some(r));
        }
        if let (Some(tx), Some((state, action))) = (&self.experience, self.pending.take()) {
            let t = Transition {
                state,
                action,
                reward: r,
                next_state: sample.vector.clone(),
            };
            if let Err(TrySendError::Disconnected(_)) = tx.try_send(t) {
                self.experience = None;
            }
        }
        let kind = WorkloadKind::of(sample);
        let shifted = self.last_kind.is_some_and(|k| k != kind);
        if shifted {
            log::debug!("tuner: workload kind {:?} -> {kind:?}", self.last_kind);
            if let Some(d) = self.manager.workload_shifted() {
                decisions.push(d);
            }
        }
        self.last_kind = Some(kind);
        // The interval in which the kind changed mixes both kinds: no baseline either.
        let judged = (!shifted || !self.manager.config().rebaseline_on_shift).then_some(r);
        if let Some(d) = self.manager.next_interval(judged, &mut *self.knobs) {
            decisions.push(d);
        }
        if let Err(e) = self.forecaster.observe(&sample.vector) {
            log::warn!("tuner: {e}");
        }

        let mut report = StepReport {
            reward: r,
            decisions: Vec::new(),
            selected: None,
            explored: false,
            inference_ns: 0,
            label: "noop".to_string(),
            allowed: Vec::new(),
            knob_generation: self.manager.generation(),
            knobs_seen: self.manager.state().clone(),
        };
        // The host arbiter's grant is part of the mask.
        let grant = self.knobs.host_grant();
        self.manager.set_grant(grant);
        // A rollback or fallback already changed the knobs in this interval.
        if !decisions.iter().any(Decision::changed) {
            let device_load = self.device_load(sample.at_ns);
            match self.propose(sample, device_load) {
                Ok((proposal, ns)) => {
                    report.inference_ns = ns;
                    let mask = if self.config.mask_safeguards {
                        self.manager.mask()
                    } else {
                        let space = self.manager.space();
                        space.mask(self.manager.state(), self.manager.bounds())
                    };
                    report.allowed = self
                        .manager
                        .space()
                        .actions()
                        .iter()
                        .zip(&mask)
                        .filter(|(_, ok)| **ok)
                        .map(|(a, _)| self.manager.space().name_of(a))
                        .collect();
                    let epsilon = self.config.epsilon.value(self.steps);
                    let selection = match &proposal {
                        Proposal::QValues(q) => select_explained(q, &mask, epsilon, &mut self.rng),
                        Proposal::Action(a) => select_baseline(
                            self.manager.space().index_of(a),
                            &mask,
                            epsilon,
                            &mut self.rng,
                        ),
                    };
                    match selection {
                        Ok(sel) => {
                            report.selected = Some(sel.index);
                            report.explored = sel.explored;
                            let action = self.manager.space().action(sel.index);
                            let d = self
                                .manager
                                .apply(action.unwrap_or(Action::NoOp), &mut *self.knobs);
                            decisions.push(d);
                        }
                        Err(e) => log::error!("tuner: selection failed: {e}"),
                    }
                    // A/B: the arm in charge made one more decision; at the end of its
                    // block the other arm takes the slot (and starts from the static
                    // configuration at the next decision).
                    if let Some(ab) = self.ab.as_mut() {
                        if ab.after_decision() {
                            let waiting = ab.exchange(Policy::static_for(self.manager.space()));
                            let ended = self.shared.swap(waiting);
                            ab.exchange(ended);
                            self.ab_reset = true;
                        }
                    }
                }
                Err(e) => {
                    lock(&self.shared.stats).policy_errors += 1;
                    let id = lock(&self.shared.policy).id().to_string();
                    decisions.push(self.fall_back(format!("policy {id} failed: {e}")));
                }
            }
        }

        for d in &decisions {
            self.record(sample.at_ns, d);
        }
        report.label = decisions
            .iter()
            .rev()
            .find(|d| !matches!(d, Decision::NoOp | Decision::Kept { .. }))
            .map_or_else(|| "noop".to_string(), Decision::action_label);
        let age_ns = sample.taken.map_or(0, |t| {
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        });
        {
            let mut s = lock(&self.shared.stats);
            s.decisions += 1;
            s.outside_changes += u64::from(outside.is_some());
            s.knob_generation = report.knob_generation;
            s.knobs_seen = Some(report.knobs_seen.clone());
            s.allowed_last = report.allowed.clone();
            s.sample_age_ns_last = age_ns;
            s.decision_ns_last = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            s.sample_age_ns_max = s.sample_age_ns_max.max(age_ns);
            s.explored += u64::from(report.explored);
            s.last_reward = Some(r);
            s.last_action = Some(report.label.clone());
            for d in &decisions {
                match d {
                    Decision::Applied { .. } => s.applied += 1,
                    Decision::Refused { .. } | Decision::Failed { .. } => s.refused += 1,
                    Decision::RolledBack { .. } => s.rollbacks += 1,
                    Decision::RestoredStatic { .. } => s.fallbacks += 1,
                    Decision::NoOp | Decision::Kept { .. } => {}
                }
            }
            if report.selected.is_some() {
                s.inferences += 1;
                s.inference_ns_last = report.inference_ns;
                s.inference_ns_max = s.inference_ns_max.max(report.inference_ns);
                s.inference_ns_total = s.inference_ns_total.saturating_add(report.inference_ns);
                if sample.interval_ns > 0 {
                    let frac = report.inference_ns as f64 / sample.interval_ns as f64;
                    s.inference_fraction_max = s.inference_fraction_max.max(frac);
                }
            }
        }
        if self.experience.is_some() {
            // A reset to the static configuration is no one action's experience.
            self.pending = if decisions
                .iter()
                .any(|d| matches!(d, Decision::RestoredStatic { .. }))
            {
                None
            } else {
                self.manager
                    .space()
                    .effective_index(&report.label)
                    .map(|a| (sample.vector.clone(), a))
            };
        }
        self.last = Some((sample.at_ns, report.label.clone()));
        self.steps += 1;
        report.decisions = decisions;
        report
    }

    /// Runs the policy on the sample (with the forecast appended when it asks for it):
    /// a network's Q-values (checked) or a baseline's action, and the time it took.
    fn propose(
        &mut self,
        sample: &Sample,
        device_load: Vec<f64>,
    ) -> Result<(Proposal, u64), PolicyError> {
        let ctx = PolicyContext {
            knobs: Some(self.manager.state().clone()),
            device_load,
        };
        let n = Schema::len();
        let mut policy = lock(&self.shared.policy);
        let size = policy.input_size();
        let mut input = Vec::with_capacity(size);
        input.extend_from_slice(&sample.vector);
        if size == 2 * n {
            // The forecast step: as the network was trained to see it (its card's
            // factors; the history restarts when they change).
            if let Some(fc) = policy.model_card().and_then(|c| c.forecast) {
                if fc != self.forecaster.config() {
                    if let Ok(mut f) = HoltForecaster::new(n, fc) {
                        if f.observe(&sample.vector).is_ok() {
                            self.forecaster = f;
                        }
                    }
                }
            }
            input.extend(self.forecaster.next());
        }
        if input.len() != size {
            return Err(PolicyError::InputLength {
                expected: size,
                got: input.len(),
            });
        }
        let t0 = Instant::now();
        let proposal = policy.propose(&input, &ctx)?;
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        drop(policy);
        if let Proposal::QValues(q) = &proposal {
            check_q(q, self.manager.space().len())?;
        }
        Ok((proposal, ns))
    }

    fn store_outcome(&self, ts_ns: u64, label: String, reward: Option<f64>) {
        if let Some(repo) = lock(&self.shared.repo).as_ref() {
            if let Err(e) = repo.record_outcome(&self.config.vm_id, ts_ns, Some(label), reward) {
                log::debug!("tuner outcome not stored: {e}");
            }
        }
    }
}

impl Sink for Tuner {
    fn name(&self) -> &str {
        "tuner"
    }

    fn accept(&mut self, sample: &Arc<Sample>) {
        self.step(sample);
    }

    fn panicked(&mut self, message: &str) {
        // The step that panicked may have left a change half-made: back to the static
        // configuration, with the static policy in charge (what `GET /policy` reports).
        let d = self.fall_back(format!("the tuner panicked: {message}"));
        lock(&self.shared.stats).fallbacks += 1;
        self.record(self.shared.last_ts.load(Ordering::Relaxed), &d);
    }

    fn finish(&mut self) {
        // The last decision's reward is never observed; store its action alone.
        if let Some((ts, label)) = self.last.take() {
            self.store_outcome(ts, label, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::PriorityLevel;
    use crate::manager::tests::FakeKnobs;
    use crate::manager::{Bounds, KnobState, ManagerConfig, Watchdog};
    use crate::policy::{ModelCard, ThresholdConfig, ThresholdPolicy};
    use crate::schema::FEATURES;
    use crate::state_repo::{RepoConfig, Row, StateRepo};
    use std::time::Duration;

    fn sample(t: u64, util: f64, ops: f64) -> Sample {
        let mut raw = vec![0.0; FEATURES.len()];
        raw[FeatureId::CpuUtilisation.index()] = util;
        raw[FeatureId::GuestOpsRate.index()] = ops;
        raw[FeatureId::GuestLatencyMean.index()] = 100.0;
        let vector = Schema::normalise(&raw).expect("length");
        Sample {
            at_ns: t * 100_000_000,
            interval_ns: 100_000_000,
            raw,
            vector,
            ..Sample::default()
        }
    }

    fn manager(config: ManagerConfig) -> ConfigManager {
        let space = ActionSpace::new(crate::actions::VmShape::new(4, 1, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let state = KnobState::initial(&space, 2);
        ConfigManager::new(space, bounds, state, config).expect("manager")
    }

    /// A policy always preferring one action (by name), or failing with NaN.
    struct Scripted {
        id: String,
        q: Vec<f32>,
    }

    impl Scripted {
        fn prefer(space: &ActionSpace, name: &str) -> Self {
            let mut q = vec![0.0; space.len()];
            if let Some(i) = space.names().iter().position(|n| n == name) {
                q[i] = 1.0;
            }
            Scripted {
                id: format!("prefer-{name}"),
                q,
            }
        }
    }

    impl QNetwork for Scripted {
        fn id(&self) -> &str {
            &self.id
        }
        fn q_values(&mut self, _input: &[f32]) -> Result<Vec<f32>, PolicyError> {
            Ok(self.q.clone())
        }
    }

    #[test]
    fn a_baseline_s_masked_choice_becomes_noop_and_exploration_stays_in_the_mask() {
        let mut rng = XorShift64::new(7);
        let mask = [true, false, true, true];
        let pick = |c, e, rng: &mut XorShift64| select_baseline(c, &mask, e, rng).unwrap();
        assert_eq!(pick(Some(2), 0.0, &mut rng).index, 2);
        assert_eq!(pick(Some(1), 0.0, &mut rng).index, 0, "masked: noop");
        assert_eq!(pick(None, 0.0, &mut rng).index, 0);
        for _ in 0..50 {
            let s = pick(Some(2), 1.0, &mut rng);
            assert!(s.explored && mask[s.index], "{s:?}");
        }
        assert!(select_baseline(Some(0), &mask, 1.5, &mut rng).is_err());
        assert!(select_baseline(Some(0), &[false; 3], 0.0, &mut rng).is_err());
    }

    #[test]
    fn workload_kind_follows_the_guest_reports_not_their_size() {
        let mut raw = vec![0.0; FEATURES.len()];
        let kind = |raw: &Vec<f64>| {
            WorkloadKind::of(&Sample {
                at_ns: 0,
                interval_ns: 1,
                raw: raw.clone(),
                vector: Schema::normalise(raw).expect("length"),
                ..Sample::default()
            })
        };
        assert_eq!(kind(&raw), WorkloadKind::Idle);
        raw[FeatureId::GuestOpsRate.index()] = 5.0;
        assert_eq!(kind(&raw), WorkloadKind::Untimed);
        raw[FeatureId::GuestOpsRate.index()] = 5e6;
        assert_eq!(kind(&raw), WorkloadKind::Untimed);
        raw[FeatureId::GuestLatencyMean.index()] = 20.0;
        assert_eq!(kind(&raw), WorkloadKind::Timed);
    }

    #[test]
    fn threshold_policy_drives_the_knobs() {
        let m = manager(ManagerConfig::default());
        let knobs = FakeKnobs::default();
        let policy = ThresholdPolicy::new(m.space(), ThresholdConfig::default());
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs.clone()),
            Policy::baseline(policy),
        )
        .unwrap();
        let r1 = t.step(&sample(1, 0.95, 1e4));
        assert_eq!(r1.label, "noop");
        let r2 = t.step(&sample(2, 0.95, 1e4));
        assert_eq!(r2.label, "vcpu+1");
        assert_eq!(knobs.entries(), vec!["VcpuDelta(1)"]);
        assert_eq!(t.manager().state().vcpus, 3);
        let s = t.stats();
        assert_eq!((s.decisions, s.applied, s.inferences), (2, 1, 2));
        assert_eq!(s.policy_id, "threshold");
        assert!(s.inference_ns_max > 0);
        assert!(s.inference_fraction_max < 0.01, "{s:?}");
    }

    #[test]
    fn transitions_pair_each_decision_with_the_next_interval() {
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(FakeKnobs::default()),
            Policy::network(Scripted::prefer(&space, "vcpu+1")),
        )
        .unwrap()
        .with_experience(tx);
        let samples: Vec<Sample> = (1..=3u64).map(|i| sample(i, 0.5, 1e3 * i as f64)).collect();
        let reports: Vec<StepReport> = samples.iter().map(|s| t.step(s)).collect();
        let got: Vec<Transition> = rx.try_iter().collect();
        assert_eq!(got.len(), 2, "the last decision has no outcome yet");
        for (k, tr) in got.iter().enumerate() {
            assert_eq!(tr.state, samples[k].vector);
            assert_eq!(tr.next_state, samples[k + 1].vector);
            assert_eq!(Some(tr.action), space.effective_index(&reports[k].label));
            assert!((tr.reward - reports[k + 1].reward).abs() < 1e-12);
        }
        // The first decision applied vcpu+1; the second was refused (cooldown) = noop.
        assert_eq!(space.name(got[0].action), Some("vcpu+1"));
        assert_eq!(space.name(got[1].action), Some("noop"));
    }

    #[test]
    fn outcomes_and_events_reach_the_state_repository() {
        let dir = tempfile::tempdir().unwrap();
        let repo = StateRepo::open(dir.path().join("t.db"), RepoConfig::default()).unwrap();
        let writer = repo.writer();
        let m = manager(ManagerConfig {
            rollback_tolerance: 0.0,
            ..ManagerConfig::default()
        });
        let space = m.space().clone();
        let knobs = FakeKnobs::default();
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs.clone()),
            Policy::network(Scripted::prefer(&space, "vcpu+2")),
        )
        .unwrap()
        .with_repo(writer.clone());
        let mut labels = Vec::new();
        // Steady reward, then the scripted vcpu+2 makes it worse for 3 intervals.
        for i in 1..=6u64 {
            let s = sample(i, 0.5, if i <= 2 { 1e4 } else { 1e2 });
            writer
                .insert(Row::from_sample("vm0", &s, "p", "{}"))
                .unwrap();
            labels.push(t.step(&s).label);
        }
        t.finish();
        repo.flush().unwrap();
        // vcpu+2 (baseline: the first interval's reward), watched for 3 intervals under a
        // lower reward (more cost, then less throughput), rolled back; in between the
        // favourite is masked (evaluation, then cooldown) and the greedy choice is noop.
        assert_eq!(
            labels,
            ["vcpu+2", "noop", "noop", "rollback:vcpu-2", "noop", "noop"]
        );
        assert_eq!(knobs.entries(), vec!["VcpuDelta(2)", "VcpuDelta(-2)"]);
        let rows = repo.rows("vm0", 0).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].action.as_deref(), Some("vcpu+2"));
        let r = rows[0].reward.expect("reward of the first decision");
        assert!(r.is_finite());
        assert_eq!(rows[3].action.as_deref(), Some("rollback:vcpu-2"));
        assert_eq!(rows[5].action.as_deref(), Some("noop"));
        assert_eq!(rows[5].reward, None, "last reward never observed");

        // Now a rollback: baseline exists, the change makes things worse.
        let m = manager(ManagerConfig {
            rollback_tolerance: 0.0,
            cooldown_intervals: 10,
            ..ManagerConfig::default()
        });
        let mut t = Tuner::new(
            TunerConfig {
                vm_id: "vm1".into(),
                ..TunerConfig::default()
            },
            m,
            Box::new(knobs.clone()),
            Policy::network(Scripted::prefer(&space, "noop")),
        )
        .unwrap()
        .with_repo(writer.clone());
        let handle = t.policy_handle();
        t.step(&sample(1, 0.5, 1e6));
        t.step(&sample(2, 0.5, 1e6));
        handle.swap(Policy::network(Scripted::prefer(&space, "rl:blk0:4")));
        assert_eq!(t.step(&sample(3, 0.5, 1e6)).label, "rl:blk0:4");
        // A tightening: its first interval settles, the next three judge it.
        t.step(&sample(4, 0.5, 1e1));
        t.step(&sample(5, 0.5, 1e1));
        t.step(&sample(6, 0.5, 1e1));
        let report = t.step(&sample(7, 0.5, 1e1));
        assert_eq!(report.label, "rollback:rl:blk0:0", "{report:?}");
        assert_eq!(t.stats().rollbacks, 1);
        assert_eq!(t.manager().state().rate_level[0], 0);
        // Cooling down: the policy's favourite is masked now.
        assert_eq!(t.step(&sample(8, 0.5, 1e1)).label, "noop");
        repo.flush().unwrap();
        let events = repo.events(Some("vm1"), 0).unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec![POLICY_SWAP, event_kind::ROLLBACK], "{events:?}");
        assert!(events[1].detail.contains("stayed below baseline"));
        assert_eq!(events[1].ts_ns, 700_000_000);
        drop(t);
        repo.close().unwrap();
    }

    #[test]
    fn policy_errors_fall_back_to_static() {
        let dir = tempfile::tempdir().unwrap();
        let repo = StateRepo::open(dir.path().join("t.db"), RepoConfig::default()).unwrap();
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let knobs = FakeKnobs::default();
        let mut nan = Scripted::prefer(&space, "noop");
        nan.q[3] = f32::NAN;
        nan.id = "nan".into();
        let slot = Arc::new(Mutex::new(String::new()));
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs.clone()),
            Policy::network(nan),
        )
        .unwrap()
        .with_repo(repo.writer())
        .with_policy_id_slot(Arc::clone(&slot));
        assert_eq!(*slot.lock().unwrap(), "nan");
        let report = t.step(&sample(1, 0.5, 1e3));
        assert_eq!(report.label, "static");
        assert!(matches!(
            &report.decisions[0],
            Decision::RestoredStatic { reason } if reason.contains("non-finite")
        ));
        assert_eq!(knobs.entries(), vec!["static"]);
        assert_eq!(t.policy_handle().current_id(), "static");
        assert_eq!(*slot.lock().unwrap(), "static");
        let s = t.stats();
        assert_eq!((s.policy_errors, s.fallbacks), (1, 1));
        // The static policy runs on.
        assert_eq!(t.step(&sample(2, 0.5, 1e3)).label, "noop");
        repo.flush().unwrap();
        let events = repo.events(None, 0).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, event_kind::FALLBACK);
        assert!(events[0].detail.contains("policy nan failed"));
    }

    #[test]
    fn hot_reload_keeps_the_old_policy_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let repo = StateRepo::open(dir.path().join("t.db"), RepoConfig::default()).unwrap();
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(FakeKnobs::default()),
            Policy::static_for(&space),
        )
        .unwrap()
        .with_repo(repo.writer());
        let handle = t.policy_handle();
        t.step(&sample(1, 0.5, 1e3));
        let bad = dir.path().join("missing.onnx");
        let h2 = handle.clone();
        let err = std::thread::spawn(move || h2.load(&bad))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, PolicyError::CardMissing { .. }));
        assert_eq!(handle.current_id(), "static");
        assert_eq!(handle.stats().load_failures, 1);
        // A good one, loaded from another thread while decisions go on.
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/test-policy.onnx");
        let h3 = handle.clone();
        let loader = std::thread::spawn(move || h3.load(&model));
        for i in 2..5 {
            t.step(&sample(i, 0.5, 1e3));
        }
        assert_eq!(loader.join().unwrap().unwrap(), "test-policy");
        assert_eq!(handle.current_id(), "test-policy");
        let r = t.step(&sample(6, 0.5, 1e3));
        assert!(r.selected.is_some());
        assert_eq!(t.stats().policy_id, "test-policy");
        repo.flush().unwrap();
        let kinds: Vec<String> = repo
            .events(None, 0)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec![event_kind::POLICY_LOAD_FAILURE, POLICY_SWAP]);
    }

    #[test]
    fn predictive_input_appends_the_forecast() {
        let m = manager(ManagerConfig::default());
        let policy = ThresholdPolicy::new(
            m.space(),
            ThresholdConfig {
                hold: 1,
                predictive: true,
                ..ThresholdConfig::default()
            },
        );
        let knobs = FakeKnobs::default();
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs.clone()),
            Policy::baseline(policy),
        )
        .unwrap();
        // Utilisation rising 0.5, 0.65, 0.75, 0.79: the forecast crosses 0.8 before the value.
        let mut labels = Vec::new();
        for (i, u) in [0.5, 0.65, 0.75, 0.79].iter().enumerate() {
            labels.push(t.step(&sample(i as u64 + 1, *u, 1e3)).label);
        }
        assert_eq!(
            labels.last().map(String::as_str),
            Some("vcpu+1"),
            "{labels:?}"
        );
        assert!(labels[..3].iter().all(|l| l == "noop"), "{labels:?}");
    }

    #[test]
    fn a_policy_brings_its_own_forecast_factors() {
        struct Wide(Vec<usize>, ModelCard);
        fn wide_card() -> ModelCard {
            let mut card =
                ModelCard::from_json(include_str!("../../models/test-policy.card.json")).unwrap();
            card.forecast = Some(ForecastConfig {
                alpha: 1.0,
                beta: 1.0,
            });
            card
        }
        impl QNetwork for Wide {
            fn id(&self) -> &str {
                "wide"
            }
            fn q_values(&mut self, input: &[f32]) -> Result<Vec<f32>, PolicyError> {
                self.0.push(input.len());
                Ok(vec![0.0; 13])
            }
            fn input_size(&self) -> usize {
                2 * Schema::len()
            }
            fn model_card(&self) -> Option<&ModelCard> {
                Some(&self.1)
            }
        }
        let mut t = Tuner::new(
            TunerConfig::default(),
            manager(ManagerConfig::default()),
            Box::new(FakeKnobs::default()),
            Policy::network(Wide(Vec::new(), wide_card())),
        )
        .unwrap();
        t.step(&sample(1, 0.5, 1e3));
        assert_eq!(t.forecaster.config().alpha, 1.0);
        t.step(&sample(2, 0.6, 1e3));
        // alpha = beta = 1: the forecast extrapolates the last step exactly.
        let next = t.forecaster.next()[FeatureId::CpuUtilisation.index()];
        assert!((next - 0.7).abs() < 1e-5, "{next}");
    }

    #[test]
    fn exploration_and_busiest_device_context() {
        let space = ActionSpace::new(crate::actions::VmShape::new(4, 2, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let m = ConfigManager::new(
            space.clone(),
            bounds,
            KnobState::initial(&space, 2),
            ManagerConfig::default(),
        )
        .unwrap();
        let knobs = FakeKnobs {
            activity: vec![100, 5_000],
            ..FakeKnobs::default()
        };
        let policy = ThresholdPolicy::new(&space, ThresholdConfig::default());
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs),
            Policy::baseline(policy),
        )
        .unwrap();
        // First step has no activity delta yet; the constant counters give zero load then.
        assert_eq!(t.step(&sample(1, 0.5, 1e3)).label, "noop");
        assert_eq!(t.step(&sample(2, 0.5, 1e3)).label, "noop");
        // Exploration with epsilon 1: every decision random among the valid actions.
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let config = TunerConfig {
            epsilon: EpsilonSchedule::constant(1.0),
            seed: 9,
            ..TunerConfig::default()
        };
        let mut t = Tuner::new(
            config,
            m,
            Box::new(FakeKnobs::default()),
            Policy::static_for(&space),
        )
        .unwrap();
        for i in 1..=20 {
            t.step(&sample(i, 0.5, 1e3));
        }
        let s = t.stats();
        // Every consulted decision explored (steps taken by a rollback consult no one).
        assert_eq!(s.explored, s.inferences, "{s:?}");
        assert!(s.explored >= 10 && s.applied >= 1, "{s:?}");
    }

    #[test]
    fn busiest_device_gets_high_priority() {
        #[derive(Clone)]
        struct Growing(Arc<AtomicU64>, FakeKnobs);
        impl Knobs for Growing {
            fn apply(&mut self, a: &Action) -> Result<(), String> {
                self.1.apply(a)
            }
            fn restore_static(&mut self) {
                self.1.restore_static()
            }
            fn device_activity(&self) -> Vec<u64> {
                let t = self.0.fetch_add(1, Ordering::Relaxed);
                vec![10 * t, 1000 * t]
            }
        }
        let space = ActionSpace::new(crate::actions::VmShape::new(4, 2, 0));
        let bounds = Bounds::for_space(&space, 1, 4);
        let m = ConfigManager::new(
            space.clone(),
            bounds,
            KnobState::initial(&space, 2),
            ManagerConfig::default(),
        )
        .unwrap();
        let fake = FakeKnobs::default();
        let knobs = Growing(Arc::new(AtomicU64::new(0)), fake.clone());
        let policy = ThresholdPolicy::new(&space, ThresholdConfig::default());
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs),
            Policy::baseline(policy),
        )
        .unwrap();
        assert_eq!(t.step(&sample(1, 0.5, 1e3)).label, "noop");
        assert_eq!(t.step(&sample(2, 0.5, 1e3)).label, "prio:blk1:high");
        assert_eq!(
            t.manager().state().priority,
            vec![PriorityLevel::Medium, PriorityLevel::High]
        );
    }

    #[test]
    fn watchdog_restore_resets_the_manager() {
        let mut w = Watchdog::new(Duration::from_millis(2), 2).unwrap();
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let knobs = FakeKnobs::default();
        let mut t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(knobs.clone()),
            Policy::network(Scripted::prefer(&space, "vcpu+1")),
        )
        .unwrap()
        .with_heartbeat(w.heartbeat());
        assert_eq!(t.step(&sample(1, 0.5, 1e3)).label, "vcpu+1");
        assert_eq!(t.manager().state().vcpus, 3);
        std::thread::sleep(Duration::from_millis(20));
        assert!(w.poll().is_some(), "stalled");
        // (The watchdog's callback restored the monitor.) The next step notices.
        let r = t.step(&sample(2, 0.5, 1e3));
        assert!(
            matches!(&r.decisions[0], Decision::RestoredStatic { reason } if reason.contains("watchdog"))
        );
        assert_eq!(r.label, "static");
        assert_eq!(t.manager().state().vcpus, 2);
        assert_eq!(t.stats().fallbacks, 1);
    }

    /// A counter source whose clock moves 5 ms per snapshot, with 2 vCPUs in use.
    struct Source(AtomicU64);

    impl crate::counters::CounterSource for Source {
        fn snapshot(&self) -> crate::counters::CounterSnapshot {
            let t = self.0.fetch_add(1, Ordering::Relaxed) + 1;
            crate::counters::CounterSnapshot {
                at_ns: t * 5_000_000,
                active_vcpus: 2,
                ..Default::default()
            }
        }
    }

    #[test]
    fn tuner_runs_as_an_agent_sink() {
        use crate::agent::{Agent, AgentConfig};
        let m = manager(ManagerConfig::default());
        let space = m.space().clone();
        let t = Tuner::new(
            TunerConfig::default(),
            m,
            Box::new(FakeKnobs::default()),
            Policy::static_for(&space),
        )
        .unwrap();
        let handle = t.policy_handle();
        let agent = Agent::start(
            Arc::new(Source(AtomicU64::new(0))),
            AgentConfig {
                interval: Duration::from_millis(5),
                sink_queue: 4,
            },
            vec![Box::new(t)],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.stats().decisions < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.stop().unwrap();
        let s = handle.stats();
        assert!(s.decisions >= 5, "{s:?}");
        assert_eq!(s.last_action.as_deref(), Some("noop"));
    }

    #[test]
    fn a_panicking_policy_ends_in_the_static_configuration() {
        use crate::agent::{Agent, AgentConfig};
        struct Panics;
        impl QNetwork for Panics {
            fn id(&self) -> &str {
                "panics"
            }
            fn q_values(&mut self, _input: &[f32]) -> Result<Vec<f32>, PolicyError> {
                panic!("index out of range in a hostile model");
            }
        }
        let knobs = FakeKnobs::default();
        let t = Tuner::new(
            TunerConfig::default(),
            manager(ManagerConfig::default()),
            Box::new(knobs.clone()),
            Policy::network(Panics),
        )
        .unwrap();
        let handle = t.policy_handle();
        let agent = Agent::start(
            Arc::new(Source(AtomicU64::new(0))),
            AgentConfig {
                interval: Duration::from_millis(5),
                sink_queue: 4,
            },
            vec![Box::new(t)],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.current_id() != "static" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The policy's lock was held by the panicking inference: poisoned, not fatal.
        assert_eq!(handle.current_id(), "static");
        assert_eq!(handle.stats().fallbacks, 1);
        assert!(
            knobs.entries().iter().any(|e| e == "static"),
            "{:?}",
            knobs.entries()
        );
        // The agent stops cleanly (the dead sink's samples count as dropped).
        agent.stop().unwrap();
    }

    #[test]
    fn bad_config_is_rejected() {
        let m = || manager(ManagerConfig::default());
        let p = || -> Policy {
            Policy::static_for(&ActionSpace::new(crate::actions::VmShape::new(4, 1, 0)))
        };
        let k = || -> Box<dyn Knobs> { Box::new(FakeKnobs::default()) };
        let mut c = TunerConfig::default();
        c.epsilon.start = 2.0;
        assert!(matches!(
            Tuner::new(c, m(), k(), p()),
            Err(TunerError::Policy(_))
        ));
        let mut c = TunerConfig::default();
        c.weights.free = f64::NAN;
        assert!(matches!(
            Tuner::new(c, m(), k(), p()),
            Err(TunerError::Reward(_))
        ));
        let mut c = TunerConfig::default();
        c.forecast.alpha = 0.0;
        assert!(matches!(
            Tuner::new(c, m(), k(), p()),
            Err(TunerError::Forecast(_))
        ));
        let c: TunerConfig = serde_json::from_str(
            r#"{"vm_id": "a", "epsilon": {"start": 0.3, "end": 0.05, "decay_steps": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.epsilon.value(1000), 0.05);
        assert!(c.mask_safeguards);
    }
}
