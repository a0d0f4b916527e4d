//! The tuner inside the monitor: the [`Knobs`] the configuration manager turns (vCPUs the
//! guest uses, I/O priorities, rate-limit levels), built over [`VmRuntime`], and the
//! assembly of policy, manager, watchdog and tuner from the VM's configuration.
//!
//! A policy that cannot be loaded never stops the VM: the monitor runs on with the static
//! policy, logs why and stores a `policy_load_failure` event.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devices::io_scheduler::Priority;
use devices::rate_limiter::{BucketConfig, RateLimiterConfig};
use tuner::actions::{Action, ActionSpace, PriorityLevel, RateLevel, VmShape};
use tuner::control::{Tuner, TunerConfig};
use tuner::knob_state::VmKnobs;
use tuner::manager::{
    Bounds, ConfigManager, KnobState, Knobs, ManagerConfig, Watchdog, WatchdogHandle,
};
use tuner::policy::{
    load_or_static, EpsilonSchedule, Pinned, PinnedDrive, Policy, ThresholdConfig, ThresholdPolicy,
};
use tuner::state_repo::{event_kind, Event, RepoWriter};

use crate::config::{ConfigError, VmConfig};
use crate::knobs::KnobWrite;
use crate::runtime::VmRuntime;

/// The monitor's knobs as the configuration manager sees them: every write goes through
/// the runtime's knob controller ([`VmRuntime::control`]), every read is its state.
pub struct RuntimeKnobs {
    rt: Arc<VmRuntime>,
    space: ActionSpace,
    max_vcpus: u32,
    /// The VM's static configuration: the knob state it started with.
    static_knobs: VmKnobs,
}

/// The limiter of one ladder level ([`RATE_LADDER`], [`NET_QOS_LADDER`]): each per-second
/// rate as a bucket refilled every 100 ms (small bursts). The one place that shape is
/// defined: the tuner's actions and a drive's `level=` both use it.
pub fn ladder_limits(level: &RateLevel) -> RateLimiterConfig {
    let bucket = |per_sec: Option<u64>| {
        per_sec.map(|r| BucketConfig {
            size: (r / 10).max(1),
            one_time_burst: 0,
            refill_time_ms: 100,
        })
    };
    RateLimiterConfig {
        bandwidth: bucket(level.bytes_per_sec),
        ops: bucket(level.ops_per_sec),
    }
}

/// The level of `ladder` that `config` is, or the nearest one when it was given off the
/// ladder by a user (`PATCH /drives`, a drive's or network device's explicit limits):
/// unlimited is level 0; otherwise the level whose per-second rates are closest in log
/// space to the given ones (bandwidth and operations compared where both sides limit
/// them). Computed once, when such a limit is set, and stored by the knob controller
/// ([`crate::knobs`]); levels are never recovered from a limiter in force.
pub fn nearest_ladder_level(config: &RateLimiterConfig, ladder: &[RateLevel]) -> u8 {
    let per_sec = |b: &Option<BucketConfig>| {
        b.as_ref()
            .filter(|b| b.size > 0)
            .map(|b| b.size as f64 * 1000.0 / b.refill_time_ms.max(1) as f64)
    };
    let (bw, ops) = (per_sec(&config.bandwidth), per_sec(&config.ops));
    if bw.is_none() && ops.is_none() {
        return 0;
    }
    let distance = |level: &RateLevel| {
        let mut d = 0.0f64;
        let mut compared = false;
        for (have, want) in [(bw, level.bytes_per_sec), (ops, level.ops_per_sec)] {
            match (have, want) {
                (Some(h), Some(w)) => {
                    d += (h.max(1.0).ln() - (w.max(1) as f64).ln()).abs();
                    compared = true;
                }
                (Some(_), None) | (None, Some(_)) => d += 10.0,
                (None, None) => {}
            }
        }
        if compared {
            d
        } else {
            f64::INFINITY
        }
    };
    ladder
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, l)| (i, distance(l)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, d)| d.is_finite())
        .map_or(0, |(i, _)| u8::try_from(i).unwrap_or(u8::MAX))
}

/// The I/O scheduler's priority for the tuner's named level.
pub fn device_priority(level: PriorityLevel) -> Priority {
    match level {
        PriorityLevel::Low => Priority::Low,
        PriorityLevel::Medium => Priority::Medium,
        PriorityLevel::High => Priority::High,
    }
}

/// The tuner's named level nearest to the scheduler's priority `p` (the inverse of
/// [`device_priority`]; an explicit weight maps by its weight: below medium's is low,
/// above it high).
pub fn nearest_priority_level(p: Priority) -> PriorityLevel {
    let medium = Priority::Medium.weight();
    match p.weight() {
        w if w < medium => PriorityLevel::Low,
        w if w == medium => PriorityLevel::Medium,
        _ => PriorityLevel::High,
    }
}

impl RuntimeKnobs {
    /// Knobs over `rt`, with the knob state the VM started with as the static state.
    pub fn new(rt: Arc<VmRuntime>, space: ActionSpace, cfg: &VmConfig) -> Self {
        let mut static_knobs = rt.knob_state();
        static_knobs.active_vcpus = cfg.start_vcpus();
        Self {
            rt,
            space,
            max_vcpus: cfg.vcpus,
            static_knobs,
        }
    }

    /// The host side of the vCPU knob: the vCPU threads get as many host cores (affinity
    /// and, where cgroups allow, a CPU quota) as the guest is asked to use vCPUs, or all
    /// of them when the VM's vCPUs are at least the host's cores. Best effort: the guest
    /// side already changed, so a failure here is logged, not returned.
    fn follow_vcpus(&self, vcpus: u32) {
        let total = self.rt.host_cores_total();
        let cores = if vcpus >= self.max_vcpus {
            total
        } else {
            vcpus.clamp(1, total)
        };
        if cores == self.rt.host_cores_given() {
            return;
        }
        if let Err(e) = self.rt.control(KnobWrite::HostCores(cores)) {
            log::warn!("vCPU threads not confined to {cores} host core(s): {e}");
        }
    }

    fn drive(&self, device: usize) -> Result<usize, String> {
        let slot = self
            .space
            .devices()
            .get(device)
            .ok_or_else(|| format!("no device {device} in the action space"))?;
        if !slot.name.starts_with("blk") {
            return Err(format!("{} is not a drive", slot.name));
        }
        Ok(device)
    }
}

impl Knobs for RuntimeKnobs {
    fn apply(&mut self, action: &Action) -> Result<(), String> {
        let write = match action {
            Action::NoOp => return Ok(()),
            Action::VcpuDelta(d) => {
                let now = i64::from(self.rt.knob_state().active_vcpus);
                let want = now + i64::from(*d);
                let want = u32::try_from(want).map_err(|_| format!("vCPUs would be {want}"))?;
                self.rt
                    .control(KnobWrite::Vcpus(want))
                    .map_err(|e| e.to_string())?;
                self.follow_vcpus(want);
                return Ok(());
            }
            Action::Priority { device, level } => {
                let index = self.drive(*device)?;
                let id = self
                    .rt
                    .drive_ids()
                    .get(index)
                    .cloned()
                    .ok_or_else(|| format!("no drive {index}"))?;
                KnobWrite::DrivePriority {
                    id,
                    priority: device_priority(*level),
                }
            }
            Action::RateLimit { device, level } => KnobWrite::DriveLevel {
                index: self.drive(*device)?,
                level: *level,
            },
            Action::NetQos { device, level } => KnobWrite::NetLevel {
                index: *device,
                level: *level,
            },
        };
        self.rt
            .control(write)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn restore_static(&mut self) {
        let target = Box::new(self.static_knobs.clone());
        if let Err(e) = self.rt.control(KnobWrite::Target(target)) {
            log::warn!("restore the static configuration: {e}");
        }
        self.follow_vcpus(self.static_knobs.active_vcpus);
        log::info!("tuner: static configuration restored");
    }

    fn device_activity(&self) -> Vec<u64> {
        self.rt.drive_requests()
    }

    fn host_grant(&self) -> tuner::manager::HostGrant {
        let g = self.rt.grant();
        let ids = self.rt.drive_ids();
        tuner::manager::HostGrant {
            vcpus: g.cores.map(|_| self.rt.granted_core_cap()),
            bytes_per_sec: (0..self.space.devices().len())
                .map(|i| {
                    self.drive(i)
                        .ok()
                        .and_then(|i| ids.get(i))
                        .and_then(|id| g.drive_bps.get(id).copied())
                })
                .collect(),
        }
    }

    fn observed(&self) -> Option<(u64, KnobState)> {
        let k = self.rt.knob_state();
        Some((k.generation, k.levels(&self.space)))
    }
}

/// The pieces the telemetry start-up adds when a tuner is configured.
pub struct TunerParts {
    /// The tuner (an agent sink).
    pub tuner: Tuner,
    /// The watchdog that restores the static configuration if the tuner stalls.
    pub watchdog: WatchdogHandle,
}

/// The knobs `cfg` sets explicitly (`active_vcpus`, a drive's rate limit, level or
/// priority), which a policy's start configuration leaves alone.
fn pinned_knobs(cfg: &VmConfig) -> Pinned {
    Pinned {
        vcpus: cfg.active_vcpus.is_some(),
        drives: cfg
            .drives
            .iter()
            .map(|d| PinnedDrive {
                rate_level: d.rate_level.is_some() || d.rate_limiter.is_some(),
                priority: d.priority.is_some(),
            })
            .collect(),
    }
}

/// Builds the tuner `cfg` asks for (`--policy` or `--tuner`), or `None`.
pub fn build(
    cfg: &VmConfig,
    rt: Arc<VmRuntime>,
    repo: Option<RepoWriter>,
    policy_slot: Option<Arc<std::sync::Mutex<String>>>,
) -> Result<Option<TunerParts>, ConfigError> {
    if !cfg.tuner_on() {
        return Ok(None);
    }
    let shape = VmShape::new(cfg.vcpus, cfg.drives.len(), cfg.network.len());
    let space = ActionSpace::new(shape);
    let bounds = Bounds::for_space(&space, cfg.min_vcpus.unwrap_or(1), cfg.vcpus);
    // The static state is the knob state the VM started with (levels as stored by the
    // knob controller: a drive's configured level, or the nearest to its explicit limits).
    let mut static_state = rt.knob_state().levels(&space);
    static_state.vcpus = cfg.start_vcpus();
    let mut manager = ConfigManager::new(
        space.clone(),
        bounds.clone(),
        static_state.clone(),
        ManagerConfig::default(),
    )
    .map_err(|e| ConfigError::new("tuner", e.to_string()))?;
    let weights = cfg.reward_weights.unwrap_or_default();
    let arm = |name: &str| -> Policy {
        match name {
            "static" => Policy::static_for(&space),
            "threshold" => {
                Policy::baseline(ThresholdPolicy::new(&space, ThresholdConfig::default()))
            }
            path => {
                let (p, error) = load_or_static(path, &space, Some(&weights));
                if let Some(e) = error {
                    log::error!("A/B arm {path}: {e}; this arm runs the static configuration");
                }
                p
            }
        }
    };
    let mut ab = None;
    let policy: Policy = match (&cfg.policy, cfg.tuner.as_deref()) {
        (None, None) if cfg.ab.is_some() => {
            let spec = cfg.ab.clone().unwrap_or_default();
            let (a, b) = spec.split_once(',').unwrap_or((spec.as_str(), ""));
            let (schedule, first) = tuner::ab::AbSchedule::new(arm(a), arm(b), cfg.ab_block)
                .map_err(|e| ConfigError::new("ab", e.to_string()))?;
            ab = Some(schedule);
            first
        }
        (Some(path), _) => {
            let (policy, error) = load_or_static(path, &space, Some(&weights));
            if let Some(e) = error {
                log::error!(
                    "policy {}: {e}; running on the static configuration",
                    path.display()
                );
                if let Some(w) = &repo {
                    let _ = w.record_event(Event {
                        ts_ns: 0,
                        vm_id: cfg.vm_id.clone(),
                        kind: event_kind::POLICY_LOAD_FAILURE.to_string(),
                        detail: format!("{}: {e}", path.display()),
                    });
                }
            }
            policy
        }
        (None, Some("threshold")) => {
            Policy::baseline(ThresholdPolicy::new(&space, ThresholdConfig::default()))
        }
        (None, Some("static")) => Policy::static_for(&space),
        (None, Some(other)) => {
            return Err(ConfigError::new(
                "tuner",
                format!("{other:?} is not static or threshold"),
            ))
        }
        (None, None) => return Ok(None),
    };
    let mut knobs = RuntimeKnobs::new(rt.clone(), space.clone(), cfg);
    // A policy's start configuration (a single loaded model, not A/B), for the knobs the
    // user did not set.
    // The start configuration step: a single network's card (not A/B).
    let start = policy.model_card().and_then(|c| c.start.clone());
    if let (Some(start), true) = (start, ab.is_none()) {
        let target = start.apply_to(&static_state, &bounds, &pinned_knobs(cfg));
        let (detail, failed) = match manager.start_in(&target, &mut knobs) {
            Ok(applied) if applied.is_empty() => (None, false),
            Ok(applied) => (Some(applied.join(", ")), false),
            Err(e) => (Some(format!("stopped: {e}")), true),
        };
        if let Some(detail) = detail {
            if failed {
                log::warn!("policy start configuration: {detail}");
            } else {
                log::info!("policy start configuration: {detail}");
            }
            if let Some(w) = &repo {
                let _ = w.record_event(Event {
                    ts_ns: 0,
                    vm_id: cfg.vm_id.clone(),
                    kind: event_kind::POLICY_START.to_string(),
                    detail,
                });
            }
        }
    }
    let mut watchdog_knobs = RuntimeKnobs::new(rt.clone(), space, cfg);
    let interval = Duration::from_millis(cfg.metrics_interval_ms);
    let watchdog =
        Watchdog::new(interval, 20).map_err(|e| ConfigError::new("tuner", e.to_string()))?;
    let heartbeat = watchdog.heartbeat();
    let watchdog = watchdog
        .spawn(move |silent| {
            log::error!("tuner stalled for {silent:?}: restoring the static configuration");
            watchdog_knobs.restore_static();
        })
        .map_err(|e| ConfigError::new("tuner", e.to_string()))?;
    let tconfig = TunerConfig {
        vm_id: cfg.vm_id.clone(),
        weights,
        epsilon: EpsilonSchedule {
            start: cfg.epsilon,
            end: cfg.epsilon,
            decay_steps: 0,
        },
        ..TunerConfig::default()
    };
    let mut tuner = Tuner::new(tconfig, manager, Box::new(knobs), policy)
        .map_err(|e| ConfigError::new("tuner", e.to_string()))?
        .with_heartbeat(heartbeat);
    if let Some(w) = repo {
        tuner = tuner.with_repo(w);
    }
    if let Some(schedule) = ab {
        tuner = tuner.with_ab(schedule);
    }
    // Each row is labelled with the policy in charge (in A/B mode: the arm).
    if let Some(slot) = policy_slot {
        tuner = tuner.with_policy_id_slot(slot);
    }
    rt.set_policy_handle(tuner.policy_handle());
    Ok(Some(TunerParts { tuner, watchdog }))
}

/// Loads a new policy into a running tuner (the control socket's `PUT /policy`).
pub fn reload(rt: &VmRuntime, path: &Path) -> Result<String, String> {
    let handle = rt
        .policy_handle()
        .ok_or("no tuner is running (start with --policy or --tuner)")?;
    handle.load(path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuner::actions::{NET_QOS_LADDER, RATE_LADDER};

    #[test]
    fn ladder_levels_map_back_to_themselves_and_custom_limits_to_the_nearest() {
        for (i, level) in RATE_LADDER.iter().enumerate() {
            assert_eq!(
                nearest_ladder_level(&ladder_limits(level), &RATE_LADDER),
                i as u8
            );
        }
        for (i, level) in NET_QOS_LADDER.iter().enumerate() {
            assert_eq!(
                nearest_ladder_level(&ladder_limits(level), &NET_QOS_LADDER),
                i as u8
            );
        }
        assert_eq!(
            nearest_ladder_level(&RateLimiterConfig::default(), &RATE_LADDER),
            0
        );
        // 180 MB/s of bandwidth only, refilled once a second: nearest is level 1 (200 MB/s).
        let custom = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 180_000_000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            ops: None,
        };
        assert_eq!(nearest_ladder_level(&custom, &RATE_LADDER), 1);
        // A zero-size bucket is no limit.
        let zero = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        };
        assert_eq!(nearest_ladder_level(&zero, &RATE_LADDER), 0);
    }
}
