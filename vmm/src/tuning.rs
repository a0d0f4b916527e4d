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
use tuner::actions::{
    Action, ActionSpace, PriorityLevel, RateLevel, VmShape, NET_QOS_LADDER, RATE_LADDER,
};
use tuner::control::{Tuner, TunerConfig};
use tuner::manager::{
    Bounds, ConfigManager, KnobState, Knobs, ManagerConfig, Watchdog, WatchdogHandle,
};
use tuner::policy::{
    load_or_static, EpsilonSchedule, Pinned, PinnedDrive, Policy, StaticPolicy, ThresholdConfig,
    ThresholdPolicy,
};
use tuner::state_repo::{event_kind, Event, RepoWriter};

use crate::config::{ConfigError, VmConfig};
use crate::runtime::VmRuntime;

/// The monitor's knobs as the configuration manager sees them.
pub struct RuntimeKnobs {
    rt: Arc<VmRuntime>,
    space: ActionSpace,
    drive_ids: Vec<String>,
    static_vcpus: u32,
    max_vcpus: u32,
    static_priorities: Vec<Priority>,
    static_limits: Vec<RateLimiterConfig>,
    static_net_limits: Vec<RateLimiterConfig>,
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

/// The level of `ladder` that `config` is, or the nearest one when it was set off the
/// ladder (through the API or a drive's explicit limits): unlimited is level 0; otherwise
/// the level whose per-second rates are closest in log space to the configured ones
/// (bandwidth and operations compared where both sides limit them). This is what the
/// performance vector reports as the rate level in force.
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
    /// Knobs over `rt`, with the VM's configuration as the static state.
    pub fn new(
        rt: Arc<VmRuntime>,
        space: ActionSpace,
        cfg: &VmConfig,
    ) -> Result<Self, ConfigError> {
        let drive_ids = rt.drive_ids();
        let mut static_priorities = Vec::new();
        let mut static_limits = Vec::new();
        for d in &cfg.drives {
            static_priorities.push(match &d.priority {
                Some(p) => p
                    .parse()
                    .map_err(|e: devices::io_scheduler::SchedulerError| {
                        ConfigError::new("drives.priority", e.to_string())
                    })?,
                None => Priority::Medium,
            });
            static_limits.push(match d.start_limits()? {
                Some(l) => l.to_limiter("drives.rate_limiter")?,
                None => RateLimiterConfig::default(),
            });
        }
        let mut static_net_limits = Vec::new();
        for n in &cfg.network {
            static_net_limits.push(match n.rate_limiter {
                Some(l) => l.to_limiter("network.rate_limiter")?,
                None => RateLimiterConfig::default(),
            });
        }
        Ok(Self {
            static_net_limits,
            rt,
            space,
            drive_ids,
            static_vcpus: cfg.start_vcpus(),
            max_vcpus: cfg.vcpus,
            static_priorities,
            static_limits,
        })
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
        if let Err(e) = self.rt.set_host_cores(cores) {
            log::warn!("vCPU threads not confined to {cores} host core(s): {e}");
        }
    }

    fn drive(&self, device: usize) -> Result<&str, String> {
        let slot = self
            .space
            .devices()
            .get(device)
            .ok_or_else(|| format!("no device {device} in the action space"))?;
        if !slot.name.starts_with("blk") {
            return Err(format!("{} is not a drive", slot.name));
        }
        self.drive_ids
            .get(device)
            .map(String::as_str)
            .ok_or_else(|| format!("no drive {device}"))
    }
}

impl Knobs for RuntimeKnobs {
    fn apply(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::NoOp => Ok(()),
            Action::VcpuDelta(d) => {
                let now = i64::from(self.rt.active_vcpus());
                let want = now + i64::from(*d);
                let want = u32::try_from(want).map_err(|_| format!("vCPUs would be {want}"))?;
                self.rt.set_vcpus(want).map_err(|e| e.to_string())?;
                self.follow_vcpus(want);
                Ok(())
            }
            Action::Priority { device, level } => {
                let id = self.drive(*device)?.to_string();
                self.rt
                    .set_priority(&id, device_priority(*level))
                    .map_err(|e| e.to_string())
            }
            Action::RateLimit { device, level } => {
                let id = self.drive(*device)?.to_string();
                let l = RATE_LADDER
                    .get(*level)
                    .ok_or_else(|| format!("no rate level {level}"))?;
                self.rt
                    .set_rate_limit(&id, ladder_limits(l))
                    .map_err(|e| e.to_string())
            }
            Action::NetQos { device, level } => {
                let l = NET_QOS_LADDER
                    .get(*level)
                    .ok_or_else(|| format!("no network QoS level {level}"))?;
                let id = self
                    .rt
                    .net_ids()
                    .get(*device)
                    .cloned()
                    .ok_or_else(|| format!("no network device net{device}"))?;
                self.rt
                    .set_net_rate_limit(&id, ladder_limits(l))
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn restore_static(&mut self) {
        if let Err(e) = self.rt.set_vcpus(self.static_vcpus) {
            log::warn!("restore static vCPUs: {e}");
        }
        self.follow_vcpus(self.static_vcpus);
        for (i, id) in self.drive_ids.iter().enumerate() {
            if let Some(p) = self.static_priorities.get(i) {
                if let Err(e) = self.rt.set_priority(id, *p) {
                    log::warn!("restore static priority of {id}: {e}");
                }
            }
            if let Some(l) = self.static_limits.get(i) {
                if let Err(e) = self.rt.set_rate_limit(id, *l) {
                    log::warn!("restore static rate limit of {id}: {e}");
                }
            }
        }
        for (id, l) in self.rt.net_ids().iter().zip(&self.static_net_limits) {
            if let Err(e) = self.rt.set_net_rate_limit(id, *l) {
                log::warn!("restore static rate limit of {id}: {e}");
            }
        }
        log::info!("tuner: static configuration restored");
    }

    fn device_activity(&self) -> Vec<u64> {
        self.rt.drive_requests()
    }

    fn host_grant(&self) -> tuner::manager::HostGrant {
        let g = self.rt.grant();
        tuner::manager::HostGrant {
            vcpus: g.cores.map(|_| self.rt.granted_core_cap()),
            bytes_per_sec: (0..self.space.devices().len())
                .map(|i| {
                    self.drive(i)
                        .ok()
                        .and_then(|id| g.drive_bps.get(id).copied())
                })
                .collect(),
        }
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
    let mut static_state = KnobState::initial(&space, cfg.start_vcpus());
    // Drives come first in the space: their configured levels and named priorities are the
    // static state (the reward's cost term counts the levels).
    for (i, d) in cfg.drives.iter().enumerate().take(space.devices().len()) {
        if let (Some(level), Some(slot)) = (d.rate_level, static_state.rate_level.get_mut(i)) {
            *slot = level;
        }
        if let (Some(p), Some(slot)) = (&d.priority, static_state.priority.get_mut(i)) {
            if let Ok(p) = p.parse::<PriorityLevel>() {
                *slot = p;
            }
        }
    }
    let mut manager = ConfigManager::new(
        space.clone(),
        bounds.clone(),
        static_state.clone(),
        ManagerConfig::default(),
    )
    .map_err(|e| ConfigError::new("tuner", e.to_string()))?;
    let weights = cfg.reward_weights.unwrap_or_default();
    let arm = |name: &str| -> Box<dyn Policy> {
        match name {
            "static" => Box::new(StaticPolicy::new(&space)),
            "threshold" => Box::new(ThresholdPolicy::new(&space, ThresholdConfig::default())),
            path => {
                let (p, error) = load_or_static(path, &space, Some(&weights));
                if let Some(e) = error {
                    log::error!("A/B arm {path}: {e}; this arm runs the static configuration");
                }
                p
            }
        }
    };
    let mut ab_mode = false;
    let policy: Box<dyn Policy> = match (&cfg.policy, cfg.tuner.as_deref()) {
        (None, None) if cfg.ab.is_some() => {
            let spec = cfg.ab.clone().unwrap_or_default();
            let (a, b) = spec.split_once(',').unwrap_or((spec.as_str(), ""));
            ab_mode = true;
            Box::new(
                tuner::ab::AbPolicy::new(arm(a), arm(b), cfg.ab_block, policy_slot.clone())
                    .map_err(|e| ConfigError::new("ab", e.to_string()))?,
            )
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
            Box::new(ThresholdPolicy::new(&space, ThresholdConfig::default()))
        }
        (None, Some("static")) => Box::new(StaticPolicy::new(&space)),
        (None, Some(other)) => {
            return Err(ConfigError::new(
                "tuner",
                format!("{other:?} is not static or threshold"),
            ))
        }
        (None, None) => return Ok(None),
    };
    let mut knobs = RuntimeKnobs::new(rt.clone(), space.clone(), cfg)?;
    // A policy's start configuration (a single loaded model, not A/B), for the knobs the
    // user did not set.
    if let (Some(start), false) = (policy.start_config(), ab_mode) {
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
    let mut watchdog_knobs = RuntimeKnobs::new(rt.clone(), space, cfg)?;
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
    // In A/B mode the A/B policy labels each row with the arm in charge.
    if let (Some(slot), false) = (policy_slot, ab_mode) {
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
