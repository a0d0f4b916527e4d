//! The tuner's actions: a documented, versioned list.
//!
//! # Actions (version [`ACTIONS_VERSION`] = 1)
//!
//! | action | name | effect |
//! | --- | --- | --- |
//! | [`Action::NoOp`] | `noop` | nothing |
//! | [`Action::VcpuDelta`]`(d)` | `vcpu-2`, `vcpu-1`, `vcpu+1`, `vcpu+2` | vCPU allocation (host cores given to vCPU threads and vCPUs the guest is asked to use) changes by `d` |
//! | [`Action::Priority`] | `prio:DEV:low`, `prio:DEV:medium`, `prio:DEV:high` | I/O priority of device `DEV` in the queue scheduler |
//! | [`Action::RateLimit`] | `rl:DEV:L` | rate limiter of drive `DEV` set to level `L` of [`RATE_LADDER`] |
//! | [`Action::NetQos`] | `qos:net:L` | every network device's limiter set to level `L` of [`NET_QOS_LADDER`] |
//!
//! # Devices
//!
//! Devices are named by position, not by the VM's device ids, so that a policy transfers
//! between VMs of the same shape: drives are `blk0`, `blk1`, ... in the order of the VM's
//! configuration, network devices `net0`, `net1`, .... An [`ActionSpace`] covers the
//! first `max_devices_in_space` devices, drives first, then network devices (the others
//! keep their static configuration). The `device` field of [`Action::Priority`] and
//! [`Action::RateLimit`] is the index into [`ActionSpace::devices`]. Priority actions
//! exist for every device of the space, rate-limit actions for drives only (network
//! bandwidth is the VM-wide [`Action::NetQos`], present when the VM has a network
//! device).
//!
//! # Order
//!
//! The action list of a space (the Q-network's output order, written into model cards) is:
//! `noop`; `vcpu-2`, `vcpu-1`, `vcpu+1`, `vcpu+2`; then per device of the space in order:
//! `prio:DEV:low`, `prio:DEV:medium`, `prio:DEV:high`, and for a drive `rl:DEV:0` ...
//! `rl:DEV:4`; then, when the VM has a network device, `qos:net:0` ... `qos:net:3`. For a
//! VM with one drive and no network device that is 13 actions.
//!
//! Any change to this list (names, order, ladders) bumps [`ACTIONS_VERSION`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manager::{Bounds, KnobState};

/// Version of the action list and ladders. Bump on any change to names, order or ladders.
pub const ACTIONS_VERSION: u32 = 1;

/// The vCPU deltas an [`Action::VcpuDelta`] may carry, in action-list order.
pub const VCPU_DELTAS: [i8; 4] = [-2, -1, 1, 2];

/// Errors about actions and action lists.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActionError {
    /// A name that is not an action of this space.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    /// A vCPU delta outside {-2, -1, 1, 2}.
    #[error("vCPU delta {0} is not one of -2, -1, +1, +2")]
    BadVcpuDelta(i8),
    /// A device index beyond the space's devices (or a rate limit on a network device).
    #[error("device {0} has no such knob in this action space")]
    NoSuchDevice(usize),
    /// A ladder level beyond the ladder.
    #[error("level {level} is beyond the {ladder} ladder ({len} levels)")]
    LevelOutOfRange {
        /// Which ladder.
        ladder: &'static str,
        /// The level asked for.
        level: usize,
        /// Levels in the ladder.
        len: usize,
    },
    /// The space has no network device, so no network QoS actions.
    #[error("this VM has no network device")]
    NoNetwork,
    /// An action list of another length.
    #[error("action list has {got} actions, this VM's space has {expected}")]
    LengthMismatch {
        /// Actions in this space.
        expected: usize,
        /// Actions in the list checked.
        got: usize,
    },
    /// An action list that differs at some index.
    #[error("action {index} is {got:?}, this VM's space has {expected:?}")]
    NameMismatch {
        /// First differing index.
        index: usize,
        /// This space's action at that index.
        expected: String,
        /// The checked list's action.
        got: String,
    },
}

/// An I/O priority level (the weight is the device scheduler's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorityLevel {
    /// Low priority.
    Low,
    /// Medium priority (the default).
    #[default]
    Medium,
    /// High priority.
    High,
}

impl PriorityLevel {
    /// Every level, in action-list order.
    pub const ALL: [PriorityLevel; 3] = [
        PriorityLevel::Low,
        PriorityLevel::Medium,
        PriorityLevel::High,
    ];

    /// The level's number in the performance vector's `drive{i}_priority` features: 1 low,
    /// 2 medium, 3 high (0 stands for an absent drive).
    pub fn code(self) -> u8 {
        match self {
            PriorityLevel::Low => 1,
            PriorityLevel::Medium => 2,
            PriorityLevel::High => 3,
        }
    }

    /// The level of [`PriorityLevel::code`] `code`, `None` for any other number.
    pub fn from_code(code: u8) -> Option<PriorityLevel> {
        PriorityLevel::ALL.into_iter().find(|p| p.code() == code)
    }

    /// `low`, `medium` or `high`.
    pub fn name(self) -> &'static str {
        match self {
            PriorityLevel::Low => "low",
            PriorityLevel::Medium => "medium",
            PriorityLevel::High => "high",
        }
    }
}

impl fmt::Display for PriorityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PriorityLevel {
    type Err = ActionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PriorityLevel::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ActionError::UnknownAction(s.to_string()))
    }
}

/// One level of a rate-limit ladder: a bandwidth and an operations limit (`None` is
/// unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLevel {
    /// Human-readable name.
    pub name: &'static str,
    /// Bytes per second, `None` for no limit.
    pub bytes_per_sec: Option<u64>,
    /// Operations (drive requests, network packets) per second, `None` for no limit.
    pub ops_per_sec: Option<u64>,
}

/// The drive rate-limit ladder, from unlimited (level 0) to the tightest (MB = 10^6 bytes).
pub const RATE_LADDER: [RateLevel; 5] = [
    RateLevel {
        name: "unlimited",
        bytes_per_sec: None,
        ops_per_sec: None,
    },
    RateLevel {
        name: "200MB/s+20kiops",
        bytes_per_sec: Some(200_000_000),
        ops_per_sec: Some(20_000),
    },
    RateLevel {
        name: "50MB/s+5kiops",
        bytes_per_sec: Some(50_000_000),
        ops_per_sec: Some(5_000),
    },
    RateLevel {
        name: "10MB/s+1kiops",
        bytes_per_sec: Some(10_000_000),
        ops_per_sec: Some(1_000),
    },
    RateLevel {
        name: "2MB/s+200iops",
        bytes_per_sec: Some(2_000_000),
        ops_per_sec: Some(200),
    },
];

/// The network QoS ladder (applies to every network device of the VM), from unlimited
/// (level 0) to the tightest: bandwidth and packets per second.
pub const NET_QOS_LADDER: [RateLevel; 4] = [
    RateLevel {
        name: "unlimited",
        bytes_per_sec: None,
        ops_per_sec: None,
    },
    RateLevel {
        name: "1Gbit/s+100kpps",
        bytes_per_sec: Some(125_000_000),
        ops_per_sec: Some(100_000),
    },
    RateLevel {
        name: "100Mbit/s+10kpps",
        bytes_per_sec: Some(12_500_000),
        ops_per_sec: Some(10_000),
    },
    RateLevel {
        name: "10Mbit/s+1kpps",
        bytes_per_sec: Some(1_250_000),
        ops_per_sec: Some(1_000),
    },
];

/// One action of the tuner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Change nothing.
    NoOp,
    /// Change the vCPU allocation by -2, -1, +1 or +2.
    VcpuDelta(i8),
    /// Set the I/O priority of a device.
    Priority {
        /// Index into [`ActionSpace::devices`].
        device: usize,
        /// New level.
        level: PriorityLevel,
    },
    /// Set the rate limiter of a drive to a level of [`RATE_LADDER`].
    RateLimit {
        /// Index into [`ActionSpace::devices`] (a drive).
        device: usize,
        /// Index into [`RATE_LADDER`].
        level: usize,
    },
    /// Set the network QoS level (index into [`NET_QOS_LADDER`]) of every network device.
    NetQos {
        /// Index into [`NET_QOS_LADDER`].
        level: usize,
    },
}

impl Action {
    /// The knob this action turns (`None` for [`Action::NoOp`]).
    pub fn knob(&self) -> Option<Knob> {
        match *self {
            Action::NoOp => None,
            Action::VcpuDelta(_) => Some(Knob::Vcpus),
            Action::Priority { device, .. } => Some(Knob::Priority(device)),
            Action::RateLimit { device, .. } => Some(Knob::RateLimit(device)),
            Action::NetQos { .. } => Some(Knob::NetQos),
        }
    }
}

/// A knob the tuner turns (the unit of cooldown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Knob {
    /// The vCPU allocation.
    Vcpus,
    /// The I/O priority of a device (index into [`ActionSpace::devices`]).
    Priority(usize),
    /// The rate limiter of a drive (index into [`ActionSpace::devices`]).
    RateLimit(usize),
    /// The network QoS level.
    NetQos,
}

/// Kind of a device in the action space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio-blk drive.
    Drive,
    /// A virtio-net device.
    Net,
}

/// One device of an action space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Positional name (`blk0`, `net1`).
    pub name: String,
    /// Drive or network device.
    pub kind: DeviceKind,
    /// Index among the VM's devices of that kind (the `0` of `blk0`).
    pub index: usize,
}

/// The ordered actions available for a VM of a given shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionSpace {
    devices: Vec<DeviceSlot>,
    has_net: bool,
    actions: Vec<Action>,
    names: Vec<String>,
}

impl ActionSpace {
    /// The space of a VM with `n_drives` drives and `n_nets` network devices, covering its
    /// first `max_devices_in_space` devices (drives first). See the module documentation
    /// for the order.
    pub fn new(n_drives: usize, n_nets: usize, max_devices_in_space: usize) -> ActionSpace {
        let devices: Vec<DeviceSlot> = (0..n_drives)
            .map(|index| DeviceSlot {
                name: format!("blk{index}"),
                kind: DeviceKind::Drive,
                index,
            })
            .chain((0..n_nets).map(|index| DeviceSlot {
                name: format!("net{index}"),
                kind: DeviceKind::Net,
                index,
            }))
            .take(max_devices_in_space)
            .collect();
        let mut actions = vec![Action::NoOp];
        actions.extend(VCPU_DELTAS.iter().map(|d| Action::VcpuDelta(*d)));
        for (device, slot) in devices.iter().enumerate() {
            actions.extend(PriorityLevel::ALL.iter().map(|level| Action::Priority {
                device,
                level: *level,
            }));
            if slot.kind == DeviceKind::Drive {
                actions.extend(
                    (0..RATE_LADDER.len()).map(|level| Action::RateLimit { device, level }),
                );
            }
        }
        let has_net = n_nets > 0;
        if has_net {
            actions.extend((0..NET_QOS_LADDER.len()).map(|level| Action::NetQos { level }));
        }
        let mut space = ActionSpace {
            devices,
            has_net,
            actions,
            names: Vec::new(),
        };
        space.names = space.actions.iter().map(|a| space.render(a)).collect();
        space
    }

    fn render(&self, action: &Action) -> String {
        let dev = |i: usize| {
            self.devices
                .get(i)
                .map_or_else(|| format!("dev{i}"), |d| d.name.clone())
        };
        match *action {
            Action::NoOp => "noop".to_string(),
            Action::VcpuDelta(d) => format!("vcpu{d:+}"),
            Action::Priority { device, level } => format!("prio:{}:{level}", dev(device)),
            Action::RateLimit { device, level } => format!("rl:{}:{level}", dev(device)),
            Action::NetQos { level } => format!("qos:net:{level}"),
        }
    }

    /// Number of actions (the Q-network's output size).
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Always false: every space has at least `noop` and the vCPU actions.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The devices the space covers, in order.
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// Whether the VM has a network device (and so [`Action::NetQos`] actions).
    pub fn has_net(&self) -> bool {
        self.has_net
    }

    /// The actions in order.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// The action names in order (as written into model cards).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The action at `index`.
    pub fn action(&self, index: usize) -> Option<Action> {
        self.actions.get(index).copied()
    }

    /// The name of the action at `index`.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    /// Index of `action` in the list, if it belongs to this space.
    pub fn index_of(&self, action: &Action) -> Option<usize> {
        self.actions.iter().position(|a| a == action)
    }

    /// The name of any action (also one outside the space, e.g. a rollback's inverse).
    pub fn name_of(&self, action: &Action) -> String {
        self.render(action)
    }

    /// What a decision label (the state repository's `action` column, written by
    /// [`crate::manager::Decision::action_label`]) did to the knobs, as an index of this
    /// space: `noop`, `refused:X` and `failed:X` changed nothing (the `noop` index);
    /// `rollback:X` and a plain action name applied that action. `static` (a reset to the
    /// static configuration) and names outside the space give `None`: such intervals are
    /// not experience of any one action.
    pub fn effective_index(&self, label: &str) -> Option<usize> {
        let noop = || self.index_of(&Action::NoOp);
        if label == "noop" || label.starts_with("refused:") || label.starts_with("failed:") {
            return noop();
        }
        let name = label.strip_prefix("rollback:").unwrap_or(label);
        self.names.iter().position(|n| n == name)
    }

    /// The action called `name`.
    pub fn parse(&self, name: &str) -> Result<Action, ActionError> {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.action(i))
            .ok_or_else(|| ActionError::UnknownAction(name.to_string()))
    }

    /// Checks that `action` is well-formed for this space (device and level in range).
    /// Inverses of actions (e.g. `Priority` back to a level) are valid too.
    pub fn validate(&self, action: &Action) -> Result<(), ActionError> {
        match *action {
            Action::NoOp => Ok(()),
            Action::VcpuDelta(d) if VCPU_DELTAS.contains(&d) => Ok(()),
            Action::VcpuDelta(d) => Err(ActionError::BadVcpuDelta(d)),
            Action::Priority { device, .. } => {
                if device < self.devices.len() {
                    Ok(())
                } else {
                    Err(ActionError::NoSuchDevice(device))
                }
            }
            Action::RateLimit { device, level } => {
                match self.devices.get(device) {
                    Some(d) if d.kind == DeviceKind::Drive => {}
                    _ => return Err(ActionError::NoSuchDevice(device)),
                }
                if level < RATE_LADDER.len() {
                    Ok(())
                } else {
                    Err(ActionError::LevelOutOfRange {
                        ladder: "rate limit",
                        level,
                        len: RATE_LADDER.len(),
                    })
                }
            }
            Action::NetQos { level } => {
                if !self.has_net {
                    Err(ActionError::NoNetwork)
                } else if level < NET_QOS_LADDER.len() {
                    Ok(())
                } else {
                    Err(ActionError::LevelOutOfRange {
                        ladder: "network QoS",
                        level,
                        len: NET_QOS_LADDER.len(),
                    })
                }
            }
        }
    }

    /// Checks an action list (e.g. a model card's) against this space: same length, same
    /// names in the same order. The error names the first difference.
    pub fn check_names(&self, names: &[String]) -> Result<(), ActionError> {
        if let Some((index, (expected, got))) = self
            .names
            .iter()
            .zip(names.iter())
            .enumerate()
            .find(|(_, (a, b))| a != b)
        {
            return Err(ActionError::NameMismatch {
                index,
                expected: expected.clone(),
                got: got.clone(),
            });
        }
        if names.len() != self.names.len() {
            return Err(ActionError::LengthMismatch {
                expected: self.names.len(),
                got: names.len(),
            });
        }
        Ok(())
    }

    /// Which actions are valid now: `true` where the action stays within `bounds` and
    /// changes something. `noop` is always valid. A vCPU delta must keep the vCPU count
    /// within `[min_vcpus, max_vcpus]`; a priority, rate-limit or QoS action must target
    /// an allowed device, stay within the allowed ladder levels and differ from the
    /// current setting.
    pub fn mask(&self, state: &KnobState, bounds: &Bounds) -> Vec<bool> {
        self.actions
            .iter()
            .map(|a| self.allowed(a, state, bounds).is_ok())
            .collect()
    }

    /// Why `action` is invalid now (`Ok` when it is valid); the rules of
    /// [`ActionSpace::mask`].
    pub fn allowed(
        &self,
        action: &Action,
        state: &KnobState,
        bounds: &Bounds,
    ) -> Result<(), Invalid> {
        self.validate(action).map_err(Invalid::Malformed)?;
        let device_allowed =
            |device: usize| bounds.allowed_devices.get(device).copied() == Some(true);
        match *action {
            Action::NoOp => Ok(()),
            Action::VcpuDelta(d) => {
                let target = i64::from(state.vcpus) + i64::from(d);
                if target < i64::from(bounds.min_vcpus) || target > i64::from(bounds.max_vcpus) {
                    Err(Invalid::OutOfBounds(format!(
                        "{} vCPUs is outside [{}, {}]",
                        target, bounds.min_vcpus, bounds.max_vcpus
                    )))
                } else {
                    Ok(())
                }
            }
            Action::Priority { device, level } => {
                if !device_allowed(device) {
                    return Err(Invalid::DeviceNotAllowed(device));
                }
                match state.priority.get(device) {
                    Some(cur) if *cur == level => Err(Invalid::NoChange),
                    Some(_) => Ok(()),
                    None => Err(Invalid::Malformed(ActionError::NoSuchDevice(device))),
                }
            }
            Action::RateLimit { device, level } => {
                if !device_allowed(device) {
                    return Err(Invalid::DeviceNotAllowed(device));
                }
                if level > bounds.max_rate_level {
                    return Err(Invalid::OutOfBounds(format!(
                        "rate-limit level {level} is tighter than the allowed {}",
                        bounds.max_rate_level
                    )));
                }
                match state.rate_level.get(device) {
                    Some(Some(cur)) if *cur == level => Err(Invalid::NoChange),
                    Some(Some(_)) => Ok(()),
                    _ => Err(Invalid::Malformed(ActionError::NoSuchDevice(device))),
                }
            }
            Action::NetQos { level } => {
                if level > bounds.max_net_qos_level {
                    Err(Invalid::OutOfBounds(format!(
                        "network QoS level {level} is tighter than the allowed {}",
                        bounds.max_net_qos_level
                    )))
                } else {
                    match state.net_qos {
                        Some(cur) if cur == level => Err(Invalid::NoChange),
                        Some(_) => Ok(()),
                        None => Err(Invalid::Malformed(ActionError::NoNetwork)),
                    }
                }
            }
        }
    }
}

/// Why an action is invalid in the current state (see [`ActionSpace::allowed`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Invalid {
    /// The action does not fit the space.
    #[error("malformed action: {0}")]
    Malformed(ActionError),
    /// The action would leave the VM's hard bounds.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The VM's configuration does not let the tuner touch this device.
    #[error("device {0} is not tunable in this VM's configuration")]
    DeviceNotAllowed(usize),
    /// The knob is already at that setting.
    #[error("the knob is already at that setting")]
    NoChange,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_drive_no_net_has_thirteen_named_actions() {
        let space = ActionSpace::new(1, 0, 4);
        let expected = strings(&[
            "noop",
            "vcpu-2",
            "vcpu-1",
            "vcpu+1",
            "vcpu+2",
            "prio:blk0:low",
            "prio:blk0:medium",
            "prio:blk0:high",
            "rl:blk0:0",
            "rl:blk0:1",
            "rl:blk0:2",
            "rl:blk0:3",
            "rl:blk0:4",
        ]);
        assert_eq!(space.names(), expected.as_slice());
        assert_eq!(space.len(), 13);
        assert!(!space.has_net());
        assert_eq!(space.action(3), Some(Action::VcpuDelta(1)));
        assert_eq!(
            space.parse("rl:blk0:2"),
            Ok(Action::RateLimit {
                device: 0,
                level: 2
            })
        );
        assert_eq!(
            space.parse("prio:blk0:high"),
            Ok(Action::Priority {
                device: 0,
                level: PriorityLevel::High
            })
        );
        assert!(matches!(
            space.parse("prio:blk1:high"),
            Err(ActionError::UnknownAction(_))
        ));
        for (i, a) in space.actions().iter().enumerate() {
            assert_eq!(space.index_of(a), Some(i));
            assert_eq!(space.name_of(a), space.names()[i]);
            space.validate(a).expect("own actions are valid");
        }
    }

    #[test]
    fn devices_are_capped_drives_first_and_net_adds_qos() {
        let space = ActionSpace::new(2, 1, 2);
        let names: Vec<_> = space.devices().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["blk0", "blk1"]);
        // 5 + 2 drives * (3 + 5) + 4 qos levels.
        assert_eq!(space.len(), 5 + 16 + 4);
        assert_eq!(space.names().last().map(String::as_str), Some("qos:net:3"));
        let space = ActionSpace::new(1, 1, 8);
        assert_eq!(space.devices()[1].name, "net0");
        assert_eq!(space.devices()[1].kind, DeviceKind::Net);
        // A network device gets priorities but no drive rate limits.
        assert!(space.names().iter().any(|n| n == "prio:net0:high"));
        assert!(!space.names().iter().any(|n| n.starts_with("rl:net0")));
        assert_eq!(
            space.validate(&Action::RateLimit {
                device: 1,
                level: 0
            }),
            Err(ActionError::NoSuchDevice(1))
        );
        assert_eq!(
            ActionSpace::new(1, 0, 1).validate(&Action::NetQos { level: 0 }),
            Err(ActionError::NoNetwork)
        );
        assert_eq!(
            space.validate(&Action::VcpuDelta(3)),
            Err(ActionError::BadVcpuDelta(3))
        );
        // No device at all: noop and vCPU actions only.
        assert_eq!(ActionSpace::new(3, 2, 0).len(), 5 + 4);
    }

    #[test]
    fn check_names_reports_the_first_difference() {
        let space = ActionSpace::new(1, 0, 1);
        let mut names = space.names().to_vec();
        assert_eq!(space.check_names(&names), Ok(()));
        names.swap(1, 2);
        assert_eq!(
            space.check_names(&names),
            Err(ActionError::NameMismatch {
                index: 1,
                expected: "vcpu-2".into(),
                got: "vcpu-1".into()
            })
        );
        let mut names = space.names().to_vec();
        names.push("qos:net:0".into());
        assert_eq!(
            space.check_names(&names),
            Err(ActionError::LengthMismatch {
                expected: 13,
                got: 14
            })
        );
        assert!(space.check_names(&names[..5]).is_err());
    }

    #[test]
    fn mask_respects_bounds_and_current_settings() {
        let space = ActionSpace::new(1, 1, 2);
        let mut bounds = Bounds::for_space(&space, 1, 4);
        let mut state = KnobState::initial(&space, 4);
        let mask = space.mask(&state, &bounds);
        let valid = |name: &str| mask[space.names().iter().position(|n| n == name).unwrap()];
        assert!(valid("noop"));
        // At the maximum: no scaling up.
        assert!(!valid("vcpu+1") && !valid("vcpu+2"));
        assert!(valid("vcpu-1") && valid("vcpu-2"));
        // Current settings are masked (medium priority, unlimited rate, qos 0).
        assert!(!valid("prio:blk0:medium") && valid("prio:blk0:high"));
        assert!(!valid("rl:blk0:0") && valid("rl:blk0:4"));
        assert!(!valid("qos:net:0") && valid("qos:net:3"));

        state.vcpus = 1;
        bounds.allowed_devices[0] = false;
        bounds.max_rate_level = 2;
        bounds.max_net_qos_level = 1;
        let mask = space.mask(&state, &bounds);
        let valid = |name: &str| mask[space.names().iter().position(|n| n == name).unwrap()];
        assert!(!valid("vcpu-1") && valid("vcpu+1") && valid("vcpu+2"));
        assert!(!valid("prio:blk0:high") && !valid("rl:blk0:1"));
        assert!(valid("prio:net0:high"));
        assert!(valid("qos:net:1") && !valid("qos:net:2"));
        assert_eq!(
            space.allowed(
                &Action::Priority {
                    device: 0,
                    level: PriorityLevel::High
                },
                &state,
                &bounds
            ),
            Err(Invalid::DeviceNotAllowed(0))
        );
        state.vcpus = 2;
        assert!(matches!(
            space.allowed(&Action::VcpuDelta(-2), &state, &bounds),
            Err(Invalid::OutOfBounds(_))
        ));
    }

    #[test]
    fn ladders_go_from_unlimited_to_tighter() {
        for ladder in [&RATE_LADDER[..], &NET_QOS_LADDER[..]] {
            assert_eq!(ladder[0].bytes_per_sec, None);
            assert_eq!(ladder[0].ops_per_sec, None);
            for w in ladder[1..].windows(2) {
                assert!(w[0].bytes_per_sec > w[1].bytes_per_sec);
                assert!(w[0].ops_per_sec > w[1].ops_per_sec);
            }
        }
        assert_eq!(RATE_LADDER[2].bytes_per_sec, Some(50_000_000));
        assert_eq!(RATE_LADDER[4].ops_per_sec, Some(200));
        assert_eq!("high".parse::<PriorityLevel>(), Ok(PriorityLevel::High));
        assert!("urgent".parse::<PriorityLevel>().is_err());
        assert_eq!(Action::VcpuDelta(-1).knob(), Some(Knob::Vcpus));
        assert_eq!(Action::NoOp.knob(), None);
    }

    #[test]
    fn decision_labels_map_to_the_action_that_took_effect() {
        let space = ActionSpace::new(1, 0, 4);
        let idx = |n: &str| space.names().iter().position(|x| x == n);
        assert_eq!(space.effective_index("noop"), idx("noop"));
        assert_eq!(space.effective_index("refused:vcpu+1"), idx("noop"));
        assert_eq!(space.effective_index("failed:rl:blk0:2"), idx("noop"));
        assert_eq!(
            space.effective_index("rollback:rl:blk0:0"),
            idx("rl:blk0:0")
        );
        assert_eq!(
            space.effective_index("prio:blk0:high"),
            idx("prio:blk0:high")
        );
        assert_eq!(space.effective_index("static"), None);
        assert_eq!(space.effective_index("rl:blk7:1"), None);
    }
}
