//! The one typed state of a VM's knobs, as the monitor's knob controller keeps it.
//!
//! Every writer (the control API, the tuner, the watchdog, A/B, the host's grant) goes
//! through the controller (`vmm::knobs`), which applies the write, stores the result
//! here and adds one to [`VmKnobs::generation`]. Readers (the configuration manager, the
//! masks, the reward's cost term, `GET /vm`) read this state; nothing infers a level from
//! a limiter's configuration after the fact: a level is stored when it is set (for a
//! limit given by a user off the ladder, the nearest level is computed once, then).

use devices::io_scheduler::Priority;
use devices::rate_limiter::RateLimiterConfig;

use crate::actions::{ActionSpace, PriorityLevel};
use crate::manager::KnobState;

/// A drive's knobs in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveKnobState {
    /// The drive's id (`blk0`, ...).
    pub id: String,
    /// The rate limiter in force (after the host grant's cap).
    pub limits: RateLimiterConfig,
    /// Its [`crate::actions::RATE_LADDER`] level, stored when set (for a limit given off
    /// the ladder: the nearest level, computed once when it was given).
    pub rate_level: usize,
    /// The I/O scheduler's priority in force (a named level or an explicit weight).
    pub priority: Priority,
    /// The tuner's named level of that priority, stored when set.
    pub priority_level: PriorityLevel,
}

/// A network device's knobs in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetKnobState {
    /// The device's id (`net0`, ...).
    pub id: String,
    /// The rate limiter in force (both directions).
    pub limits: RateLimiterConfig,
    /// Its [`crate::actions::NET_QOS_LADDER`] level, stored when set.
    pub qos_level: usize,
}

/// Every knob of a VM, with the generation of the write that produced it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VmKnobs {
    /// Writes applied so far (0: the state the VM started with).
    pub generation: u64,
    /// vCPUs the guest is asked to use.
    pub active_vcpus: u32,
    /// Host cores the vCPU threads may run on.
    pub host_cores: u32,
    /// The vCPU threads' CPU quota in cores, when one was asked (`PATCH /vm cpu_quota`).
    pub cpu_quota: Option<f64>,
    /// Per drive, in slot order.
    pub drives: Vec<DriveKnobState>,
    /// Per network device, in slot order.
    pub nets: Vec<NetKnobState>,
}

impl VmKnobs {
    /// The part the tuner turns, for the devices of `space` (a projection of this state,
    /// not a copy kept elsewhere): what the manager, the masks and the reward read.
    pub fn levels(&self, space: &ActionSpace) -> KnobState {
        let mut s = KnobState::initial(space, self.active_vcpus);
        for (slot, d) in s.rate_level.iter_mut().zip(&self.drives) {
            *slot = d.rate_level;
        }
        for (slot, d) in s.priority.iter_mut().zip(&self.drives) {
            *slot = d.priority_level;
        }
        for (slot, n) in s.net_qos.iter_mut().zip(&self.nets) {
            *slot = n.qos_level;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::VmShape;

    #[test]
    fn levels_are_the_stored_ones_per_slot() {
        let space = ActionSpace::new(VmShape::new(4, 2, 1));
        let k = VmKnobs {
            generation: 7,
            active_vcpus: 3,
            host_cores: 2,
            cpu_quota: None,
            drives: vec![
                DriveKnobState {
                    id: "blk0".into(),
                    limits: RateLimiterConfig::default(),
                    rate_level: 2,
                    priority: Priority::High,
                    priority_level: PriorityLevel::High,
                },
                DriveKnobState {
                    id: "blk1".into(),
                    limits: RateLimiterConfig::default(),
                    rate_level: 0,
                    priority: Priority::Weight(2),
                    priority_level: PriorityLevel::Low,
                },
            ],
            nets: vec![NetKnobState {
                id: "net0".into(),
                limits: RateLimiterConfig::default(),
                qos_level: 1,
            }],
        };
        let l = k.levels(&space);
        assert_eq!(l.vcpus, 3);
        assert_eq!(l.rate_level, vec![2, 0]);
        assert_eq!(l.priority, vec![PriorityLevel::High, PriorityLevel::Low]);
        assert_eq!(l.net_qos, vec![1]);
    }
}
