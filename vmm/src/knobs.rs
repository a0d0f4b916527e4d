//! The knob controller: the one owner of a VM's knob state ([`VmKnobs`]) and the one
//! path by which anything changes a knob.
//!
//! Every writer - the control API's `PATCH /vm` and `PATCH /drives`, the tuner (its
//! actions, the start configuration, rollbacks), the watchdog and A/B's return to the
//! static configuration, the host arbiter's grant (`PUT /grant`) - sends a [`KnobWrite`]
//! to [`VmRuntime::control`]. The controller holds its state's lock for the whole write
//! (writers are serialised), sets the device, stores what is now in force (levels as
//! set, never inferred from a limiter afterwards) and returns the new state with its
//! generation one higher. Readers (the sampler's snapshot, the tuner's manager, masks
//! and reward, `GET /vm`) read [`VmRuntime::knob_state`].

use std::sync::Mutex;

use devices::io_scheduler::Priority;
use devices::lock;
use devices::rate_limiter::RateLimiterConfig;
use tuner::actions::{NET_QOS_LADDER, RATE_LADDER};
use tuner::knob_state::VmKnobs;

use crate::grant::Grant;
use crate::runtime::{ControlError, VmRuntime};
use crate::tuning::{ladder_limits, nearest_ladder_level, nearest_priority_level};

/// One write of the knobs.
#[derive(Debug, Clone, PartialEq)]
pub enum KnobWrite {
    /// The guest is asked to use this many vCPUs.
    Vcpus(u32),
    /// The vCPU threads get this many host cores (capped by the grant).
    HostCores(u32),
    /// The vCPU threads' CPU quota in cores (capped by the grant).
    CpuQuota(f64),
    /// A drive's limits as a user gave them (`PATCH /drives`): stored with the nearest
    /// [`RATE_LADDER`] level, computed once, here.
    DriveLimits {
        /// The drive's id.
        id: String,
        /// The limits asked.
        limits: RateLimiterConfig,
    },
    /// A drive's [`RATE_LADDER`] level (the tuner).
    DriveLevel {
        /// The drive's slot.
        index: usize,
        /// The level.
        level: usize,
    },
    /// A drive's I/O priority.
    DrivePriority {
        /// The drive's id.
        id: String,
        /// The priority.
        priority: Priority,
    },
    /// A network device's [`NET_QOS_LADDER`] level (the tuner).
    NetLevel {
        /// The device's slot.
        index: usize,
        /// The level.
        level: usize,
    },
    /// Every knob to a target (the static configuration): vCPUs, each drive's limits,
    /// level and priority, each network device's limits and level. One generation.
    Target(Box<VmKnobs>),
    /// The host arbiter's grant: the caps are applied at once to what was asked.
    Grant(Grant),
}

/// The controller's state (the one copy of the knob state).
#[derive(Debug, Default)]
pub struct KnobController {
    state: Mutex<VmKnobs>,
}

impl KnobController {
    /// A controller starting from `initial` (generation 0).
    pub fn new(initial: VmKnobs) -> Self {
        Self {
            state: Mutex::new(VmKnobs {
                generation: 0,
                ..initial
            }),
        }
    }

    /// The state in force.
    pub fn state(&self) -> VmKnobs {
        lock(&self.state).clone()
    }

    /// Applies `write` to `rt`'s devices and returns the new state. A refused write
    /// changes nothing (a target stops at its first refusal; what it set before stays
    /// set and is recorded).
    pub fn write(&self, rt: &VmRuntime, write: KnobWrite) -> Result<VmKnobs, ControlError> {
        let mut s = lock(&self.state);
        let before = s.clone();
        let result = apply(rt, &mut s, write);
        // A refused write that changed nothing leaves the generation as it was.
        if result.is_ok() || *s != before {
            s.generation += 1;
        }
        let now = s.clone();
        drop(s);
        result.map(|()| now)
    }
}

fn drive_index(s: &VmKnobs, id: &str) -> Result<usize, ControlError> {
    s.drives
        .iter()
        .position(|d| d.id == id)
        .ok_or_else(|| ControlError::UnknownDrive(id.to_string()))
}

fn level_limits(
    ladder: &[tuner::actions::RateLevel],
    level: usize,
) -> Result<RateLimiterConfig, ControlError> {
    ladder
        .get(level)
        .map(ladder_limits)
        .ok_or_else(|| ControlError::Refused(format!("no level {level} on the ladder")))
}

/// The write itself, under the controller's lock.
fn apply(rt: &VmRuntime, s: &mut VmKnobs, write: KnobWrite) -> Result<(), ControlError> {
    match write {
        KnobWrite::Vcpus(n) => {
            rt.device_set_vcpus(n)?;
            s.active_vcpus = rt.active_vcpus();
        }
        KnobWrite::HostCores(n) => {
            let r = rt.device_set_host_cores(n);
            s.host_cores = rt.host_cores_given();
            r?;
        }
        KnobWrite::CpuQuota(c) => {
            rt.device_set_cpu_quota(c)?;
            s.cpu_quota = Some(c);
        }
        KnobWrite::DriveLimits { id, limits } => {
            let i = drive_index(s, &id)?;
            let in_force = rt.device_set_rate_limit(&id, limits)?;
            if let Some(d) = s.drives.get_mut(i) {
                d.limits = in_force;
                d.rate_level = usize::from(nearest_ladder_level(&limits, &RATE_LADDER));
            }
        }
        KnobWrite::DriveLevel { index, level } => {
            let id = s
                .drives
                .get(index)
                .map(|d| d.id.clone())
                .ok_or_else(|| ControlError::UnknownDrive(format!("blk{index}")))?;
            let in_force = rt.device_set_rate_limit(&id, level_limits(&RATE_LADDER, level)?)?;
            if let Some(d) = s.drives.get_mut(index) {
                d.limits = in_force;
                d.rate_level = level;
            }
        }
        KnobWrite::DrivePriority { id, priority } => {
            let i = drive_index(s, &id)?;
            rt.device_set_priority(&id, priority)?;
            if let Some(d) = s.drives.get_mut(i) {
                d.priority = priority;
                d.priority_level = nearest_priority_level(priority);
            }
        }
        KnobWrite::NetLevel { index, level } => {
            let id = s
                .nets
                .get(index)
                .map(|n| n.id.clone())
                .ok_or_else(|| ControlError::UnknownDrive(format!("net{index}")))?;
            let limits = level_limits(&NET_QOS_LADDER, level)?;
            rt.device_set_net_rate_limit(&id, limits)?;
            if let Some(n) = s.nets.get_mut(index) {
                n.limits = limits;
                n.qos_level = level;
            }
        }
        KnobWrite::Target(t) => {
            rt.device_set_vcpus(t.active_vcpus)?;
            s.active_vcpus = rt.active_vcpus();
            for (want, d) in t.drives.iter().zip(s.drives.iter_mut()) {
                rt.device_set_priority(&d.id, want.priority)?;
                d.priority = want.priority;
                d.priority_level = want.priority_level;
                d.limits = rt.device_set_rate_limit(&d.id, want.limits)?;
                d.rate_level = want.rate_level;
            }
            for (want, n) in t.nets.iter().zip(s.nets.iter_mut()) {
                rt.device_set_net_rate_limit(&n.id, want.limits)?;
                n.limits = want.limits;
                n.qos_level = want.qos_level;
            }
        }
        KnobWrite::Grant(g) => {
            let r = rt.device_set_grant(g);
            // The caps may have lowered host cores and limits (levels stay as asked: the
            // tuner's masks keep looser levels out while the grant holds).
            s.host_cores = rt.host_cores_given();
            for d in s.drives.iter_mut() {
                if let Ok(l) = rt.rate_limit(&d.id) {
                    d.limits = l;
                }
            }
            r?;
        }
    }
    Ok(())
}

impl VmRuntime {
    /// Applies `write` through the knob controller (the only way to change a knob) and
    /// returns the new knob state.
    pub fn control(&self, write: KnobWrite) -> Result<VmKnobs, ControlError> {
        self.knob_controller().write(self, write)
    }

    /// The knob state in force, with its generation.
    pub fn knob_state(&self) -> VmKnobs {
        self.knob_controller().state()
    }
}
