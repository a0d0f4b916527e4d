//! The tuner's actions: one fixed, versioned layout for every VM shape.
//!
//! # Layout (version [`ACTIONS_VERSION`] = 2)
//!
//! | action | names | effect |
//! | --- | --- | --- |
//! | [`Action::NoOp`] | `noop` | nothing |
//! | [`Action::VcpuDelta`]`(d)` | `vcpu-2`, `vcpu-1`, `vcpu+1`, `vcpu+2` | vCPU allocation (host cores given to vCPU threads and vCPUs the guest is asked to use) changes by `d`, within the VM's own bounds |
//! | [`Action::Priority`] | `prio:blkD:low`, `prio:blkD:medium`, `prio:blkD:high` | I/O priority of drive slot `D` in the queue scheduler |
//! | [`Action::RateLimit`] | `rl:blkD:L` | rate limiter of drive slot `D` set to level `L` of [`RATE_LADDER`] |
//! | [`Action::NetQos`] | `qos:netN:L` | limiter of network slot `N` set to level `L` of [`NET_QOS_LADDER`] |
//!
//! The list is the same for every VM: `noop`; `vcpu-2`, `vcpu-1`, `vcpu+1`, `vcpu+2`;
//! then per drive slot `blk0` .. `blk3` ([`DRIVE_SLOTS`]): `prio:blkD:low|medium|high`,
//! `rl:blkD:0` .. `rl:blkD:4`; then per network slot `net0`, `net1` ([`NET_SLOTS`]):
//! `qos:netN:0` .. `qos:netN:3`. That is [`LAYOUT_LEN`] = 45 actions, the Q-network's
//! output order, written into model cards. One network serves VMs of any [`VmShape`]
//! (1 to [`MAX_VCPUS`] vCPUs, 0 to 4 drives, 0 to 2 network devices).
//!
//! # Slots and shapes
//!
//! Devices are named by position, not by the VM's device ids: drive `i` of the VM's
//! configuration fills slot `blki`, network device `i` slot `neti`; devices beyond the
//! slots keep their static configuration. An action on a slot the VM has no device in
//! is well-formed but *absent*: [`ActionSpace::mask`] masks it and the manager refuses
//! it, so it is never applied. The vCPU actions are relative (`+1`, `-2`, ...) and
//! masked at the VM's own `[min_vcpus, max_vcpus]`.
//!
//! History: v1 had a list per VM shape (only the devices present, priorities for network
//! devices too, one VM-wide `qos:net:L`), so a policy served one shape only.
//!
//! Any change to the layout (names, order, slots, ladders) bumps [`ACTIONS_VERSION`].

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manager::{Bounds, KnobState};
pub use crate::schema::{DRIVE_SLOTS, MAX_VCPUS};

/// Version of the action layout and ladders. Bump on any change to names, order, slots
/// or ladders.
pub const ACTIONS_VERSION: u32 = 2;

/// Network device slots of the layout.
pub const NET_SLOTS: usize = 2;

/// The vCPU deltas an [`Action::VcpuDelta`] may carry, in action-list order.
pub const VCPU_DELTAS: [i8; 4] = [-2, -1, 1, 2];

/// Number of actions of the layout (the Q-network's output size).
pub const LAYOUT_LEN: usize = 1
    + VCPU_DELTAS.len()
    + DRIVE_SLOTS * (PriorityLevel::ALL.len() + RATE_LADDER.len())
    + NET_SLOTS * NET_QOS_LADDER.len();

/// Errors about actions and action lists.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActionError {
    /// A name that is not an action of the layout.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    /// A vCPU delta outside {-2, -1, 1, 2}.
    #[error("vCPU delta {0} is not one of -2, -1, +1, +2")]
    BadVcpuDelta(i8),
    /// A slot index beyond the layout's slots of that kind.
    #[error("slot {0} is beyond the layout's slots")]
    NoSuchDevice(usize),
    /// A slot of the layout in which this VM has no device.
    #[error("{0} is absent in this VM (no device in that slot)")]
    AbsentDevice(String),
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
    /// An action list of another length.
    #[error("action list has {got} actions, the layout v{ACTIONS_VERSION} has {expected}")]
    LengthMismatch {
        /// Actions in the layout.
        expected: usize,
        /// Actions in the list checked.
        got: usize,
    },
    /// An action list that differs at some index.
    #[error("action {index} is {got:?}, the layout v{ACTIONS_VERSION} has {expected:?}")]
    NameMismatch {
        /// First differing index.
        index: usize,
        /// The layout's action at that index.
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

/// The network QoS ladder of each network slot, from unlimited (level 0) to the
/// tightest: bandwidth and packets per second.
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
    /// Set the I/O priority of a drive.
    Priority {
        /// Drive slot (`0` .. [`DRIVE_SLOTS`]).
        device: usize,
        /// New level.
        level: PriorityLevel,
    },
    /// Set the rate limiter of a drive to a level of [`RATE_LADDER`].
    RateLimit {
        /// Drive slot (`0` .. [`DRIVE_SLOTS`]).
        device: usize,
        /// Index into [`RATE_LADDER`].
        level: usize,
    },
    /// Set the limiter of a network device to a level of [`NET_QOS_LADDER`].
    NetQos {
        /// Network slot (`0` .. [`NET_SLOTS`]).
        device: usize,
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
            Action::NetQos { device, .. } => Some(Knob::NetQos(device)),
        }
    }

    /// The device slot this action targets (`None` for `noop` and vCPU actions).
    pub fn slot(&self) -> Option<(DeviceKind, usize)> {
        match *self {
            Action::NoOp | Action::VcpuDelta(_) => None,
            Action::Priority { device, .. } | Action::RateLimit { device, .. } => {
                Some((DeviceKind::Drive, device))
            }
            Action::NetQos { device, .. } => Some((DeviceKind::Net, device)),
        }
    }

    /// The action's name in the layout (`noop`, `vcpu+1`, `rl:blk0:3`, `qos:net1:2`).
    pub fn name(&self) -> String {
        match *self {
            Action::NoOp => "noop".to_string(),
            Action::VcpuDelta(d) => format!("vcpu{d:+}"),
            Action::Priority { device, level } => format!("prio:blk{device}:{level}"),
            Action::RateLimit { device, level } => format!("rl:blk{device}:{level}"),
            Action::NetQos { device, level } => format!("qos:net{device}:{level}"),
        }
    }
}

/// A knob the tuner turns (the unit of cooldown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Knob {
    /// The vCPU allocation.
    Vcpus,
    /// The I/O priority of a drive slot.
    Priority(usize),
    /// The rate limiter of a drive slot.
    RateLimit(usize),
    /// The QoS level of a network slot.
    NetQos(usize),
}

/// Kind of a device slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// A virtio-blk drive.
    Drive,
    /// A virtio-net device.
    Net,
}

/// One device of a VM, in its slot of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Positional name (`blk0`, `net1`).
    pub name: String,
    /// Drive or network device.
    pub kind: DeviceKind,
    /// Slot index among the slots of that kind (the `0` of `blk0`).
    pub index: usize,
}

/// What a VM is made of, as far as the tuner's actions are concerned.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct VmShape {
    /// vCPUs the VM was created with (its most).
    pub vcpus: u32,
    /// Drives in its configuration.
    pub drives: usize,
    /// Network devices in its configuration.
    pub nets: usize,
}

impl VmShape {
    /// A VM of `vcpus` vCPUs, `drives` drives and `nets` network devices.
    pub fn new(vcpus: u32, drives: usize, nets: usize) -> VmShape {
        VmShape {
            vcpus,
            drives,
            nets,
        }
    }

    /// Drives in a slot of the layout (the first [`DRIVE_SLOTS`]).
    pub fn tuned_drives(&self) -> usize {
        self.drives.min(DRIVE_SLOTS)
    }

    /// Network devices in a slot of the layout (the first [`NET_SLOTS`]).
    pub fn tuned_nets(&self) -> usize {
        self.nets.min(NET_SLOTS)
    }

    /// Whether slot `index` of `kind` holds a device of this VM.
    pub fn has(&self, kind: DeviceKind, index: usize) -> bool {
        match kind {
            DeviceKind::Drive => index < self.tuned_drives(),
            DeviceKind::Net => index < self.tuned_nets(),
        }
    }
}

impl fmt::Display for VmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} vCPU{}, {} drive{}, {} network device{}",
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.drives,
            s(self.drives),
            self.nets,
            s(self.nets)
        )
    }
}

/// The layout's actions and names, built once.
fn layout() -> &'static (Vec<Action>, Vec<String>) {
    static LAYOUT: OnceLock<(Vec<Action>, Vec<String>)> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let mut actions = vec![Action::NoOp];
        actions.extend(VCPU_DELTAS.iter().map(|d| Action::VcpuDelta(*d)));
        for device in 0..DRIVE_SLOTS {
            actions.extend(PriorityLevel::ALL.iter().map(|level| Action::Priority {
                device,
                level: *level,
            }));
            actions.extend((0..RATE_LADDER.len()).map(|level| Action::RateLimit { device, level }));
        }
        for device in 0..NET_SLOTS {
            actions.extend((0..NET_QOS_LADDER.len()).map(|level| Action::NetQos { device, level }));
        }
        let names = actions.iter().map(Action::name).collect();
        (actions, names)
    })
}

/// The layout's actions for one VM: which slots hold a device, and the rules that mask
/// the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionSpace {
    shape: VmShape,
    devices: Vec<DeviceSlot>,
}

impl ActionSpace {
    /// The layout for a VM of `shape`: its first [`DRIVE_SLOTS`] drives and first
    /// [`NET_SLOTS`] network devices fill the slots, in configuration order.
    pub fn new(shape: VmShape) -> ActionSpace {
        let devices = (0..shape.tuned_drives())
            .map(|index| DeviceSlot {
                name: format!("blk{index}"),
                kind: DeviceKind::Drive,
                index,
            })
            .chain((0..shape.tuned_nets()).map(|index| DeviceSlot {
                name: format!("net{index}"),
                kind: DeviceKind::Net,
                index,
            }))
            .collect();
        ActionSpace { shape, devices }
    }

    /// The VM's shape.
    pub fn shape(&self) -> VmShape {
        self.shape
    }

    /// Number of actions (the Q-network's output size): always [`LAYOUT_LEN`].
    pub fn len(&self) -> usize {
        layout().0.len()
    }

    /// Always false: the layout has at least `noop` and the vCPU actions.
    pub fn is_empty(&self) -> bool {
        layout().0.is_empty()
    }

    /// The VM's devices that fill a slot: drives first, then network devices.
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// Position in [`ActionSpace::devices`] of slot `index` of `kind`, when the VM has
    /// a device there (the index of [`Bounds::allowed_devices`]).
    pub fn device_position(&self, kind: DeviceKind, index: usize) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.kind == kind && d.index == index)
    }

    /// Whether `action` targets a device the VM has (always true for `noop` and vCPU
    /// actions).
    pub fn present(&self, action: &Action) -> bool {
        action
            .slot()
            .is_none_or(|(kind, index)| self.shape.has(kind, index))
    }

    /// The actions in order.
    pub fn actions(&self) -> &[Action] {
        &layout().0
    }

    /// The action names in order (as written into model cards).
    pub fn names(&self) -> &[String] {
        &layout().1
    }

    /// The action at `index`.
    pub fn action(&self, index: usize) -> Option<Action> {
        self.actions().get(index).copied()
    }

    /// The name of the action at `index`.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.names().get(index).map(String::as_str)
    }

    /// Index of `action` in the layout.
    pub fn index_of(&self, action: &Action) -> Option<usize> {
        self.actions().iter().position(|a| a == action)
    }

    /// The name of any action (also one outside the layout, e.g. a rollback's inverse).
    pub fn name_of(&self, action: &Action) -> String {
        action.name()
    }

    /// What a decision label (the state repository's `action` column, written by
    /// [`crate::manager::Decision::action_label`]) did to the knobs, as an index of the
    /// layout: `noop`, `refused:X` and `failed:X` changed nothing (the `noop` index);
    /// `rollback:X` and a plain action name applied that action. `static` (a reset to the
    /// static configuration) and names outside the layout give `None`: such intervals
    /// are not experience of any one action.
    pub fn effective_index(&self, label: &str) -> Option<usize> {
        if label == "noop" || label.starts_with("refused:") || label.starts_with("failed:") {
            return self.index_of(&Action::NoOp);
        }
        let name = label.strip_prefix("rollback:").unwrap_or(label);
        self.names().iter().position(|n| n == name)
    }

    /// The action called `name` (whether or not the VM has its device).
    pub fn parse(&self, name: &str) -> Result<Action, ActionError> {
        self.names()
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.action(i))
            .ok_or_else(|| ActionError::UnknownAction(name.to_string()))
    }

    /// Checks that `action` is well-formed (slot and level in range) and targets a
    /// device this VM has. Inverses of actions (e.g. `Priority` back to a level) are
    /// valid too.
    pub fn validate(&self, action: &Action) -> Result<(), ActionError> {
        let ladder = |name: &'static str, level: usize, len: usize| {
            if level < len {
                Ok(())
            } else {
                Err(ActionError::LevelOutOfRange {
                    ladder: name,
                    level,
                    len,
                })
            }
        };
        let (slots, level) = match *action {
            Action::NoOp => return Ok(()),
            Action::VcpuDelta(d) if VCPU_DELTAS.contains(&d) => return Ok(()),
            Action::VcpuDelta(d) => return Err(ActionError::BadVcpuDelta(d)),
            Action::Priority { .. } => (DRIVE_SLOTS, Ok(())),
            Action::RateLimit { level, .. } => {
                (DRIVE_SLOTS, ladder("rate limit", level, RATE_LADDER.len()))
            }
            Action::NetQos { level, .. } => (
                NET_SLOTS,
                ladder("network QoS", level, NET_QOS_LADDER.len()),
            ),
        };
        let Some((kind, index)) = action.slot() else {
            return Ok(());
        };
        if index >= slots {
            return Err(ActionError::NoSuchDevice(index));
        }
        level?;
        if !self.shape.has(kind, index) {
            let prefix = if kind == DeviceKind::Drive {
                "blk"
            } else {
                "net"
            };
            return Err(ActionError::AbsentDevice(format!("{prefix}{index}")));
        }
        Ok(())
    }

    /// Checks an action list (e.g. a model card's) against the layout: same length, same
    /// names in the same order. The error names the first difference.
    pub fn check_names(&self, names: &[String]) -> Result<(), ActionError> {
        if let Some((index, (expected, got))) = self
            .names()
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
        if names.len() != self.len() {
            return Err(ActionError::LengthMismatch {
                expected: self.len(),
                got: names.len(),
            });
        }
        Ok(())
    }

    /// Which actions are valid now: `true` where the action targets a device the VM has,
    /// stays within `bounds` and changes something. `noop` is always valid. A vCPU delta
    /// must keep the vCPU count within `[min_vcpus, max_vcpus]`; a priority, rate-limit
    /// or QoS action must target a present, allowed device, stay within the allowed
    /// ladder levels and differ from the current setting.
    pub fn mask(&self, state: &KnobState, bounds: &Bounds) -> Vec<bool> {
        self.actions()
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
        self.validate(action).map_err(|e| match e {
            ActionError::AbsentDevice(name) => Invalid::Absent(name),
            other => Invalid::Malformed(other),
        })?;
        let device_allowed = |kind: DeviceKind, index: usize| {
            self.device_position(kind, index)
                .and_then(|p| bounds.allowed_devices.get(p).copied())
                == Some(true)
        };
        let missing = |index: usize| Invalid::Malformed(ActionError::NoSuchDevice(index));
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
                if !device_allowed(DeviceKind::Drive, device) {
                    return Err(Invalid::DeviceNotAllowed(format!("blk{device}")));
                }
                match state.priority.get(device) {
                    Some(cur) if *cur == level => Err(Invalid::NoChange),
                    Some(_) => Ok(()),
                    None => Err(missing(device)),
                }
            }
            Action::RateLimit { device, level } => {
                if !device_allowed(DeviceKind::Drive, device) {
                    return Err(Invalid::DeviceNotAllowed(format!("blk{device}")));
                }
                if level > bounds.max_rate_level {
                    return Err(Invalid::OutOfBounds(format!(
                        "rate-limit level {level} is tighter than the allowed {}",
                        bounds.max_rate_level
                    )));
                }
                match state.rate_level.get(device) {
                    Some(cur) if *cur == level => Err(Invalid::NoChange),
                    Some(_) => Ok(()),
                    None => Err(missing(device)),
                }
            }
            Action::NetQos { device, level } => {
                if !device_allowed(DeviceKind::Net, device) {
                    return Err(Invalid::DeviceNotAllowed(format!("net{device}")));
                }
                if level > bounds.max_net_qos_level {
                    return Err(Invalid::OutOfBounds(format!(
                        "network QoS level {level} is tighter than the allowed {}",
                        bounds.max_net_qos_level
                    )));
                }
                match state.net_qos.get(device) {
                    Some(cur) if *cur == level => Err(Invalid::NoChange),
                    Some(_) => Ok(()),
                    None => Err(missing(device)),
                }
            }
        }
    }
}

/// Why an action is invalid in the current state (see [`ActionSpace::allowed`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Invalid {
    /// The action does not fit the layout.
    #[error("malformed action: {0}")]
    Malformed(ActionError),
    /// The action's slot holds no device of this VM.
    #[error("{0} is absent in this VM: its actions are masked, never applied")]
    Absent(String),
    /// The action would leave the VM's hard bounds.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The VM's configuration does not let the tuner touch this device.
    #[error("{0} is not tunable in this VM's configuration")]
    DeviceNotAllowed(String),
    /// The knob is already at that setting.
    #[error("the knob is already at that setting")]
    NoChange,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(vcpus: u32, drives: usize, nets: usize) -> ActionSpace {
        ActionSpace::new(VmShape::new(vcpus, drives, nets))
    }

    fn valid(space: &ActionSpace, mask: &[bool], name: &str) -> bool {
        let i = space
            .names()
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} is not in the layout"));
        mask[i]
    }

    #[test]
    fn the_layout_is_one_fixed_list_for_every_shape() {
        let s = space(1, 1, 0);
        assert_eq!(s.len(), LAYOUT_LEN);
        assert_eq!(LAYOUT_LEN, 45);
        let names = s.names();
        assert_eq!(
            &names[..13],
            &[
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
            ]
        );
        assert_eq!(names[13], "prio:blk1:low");
        assert_eq!(names[37], "qos:net0:0");
        assert_eq!(names[44], "qos:net1:3");
        // Same list, whatever the VM.
        for (v, d, n) in [(1, 0, 0), (8, 4, 2), (3, 7, 5)] {
            assert_eq!(space(v, d, n).names(), names);
        }
        for (i, a) in s.actions().iter().enumerate() {
            assert_eq!(s.index_of(a), Some(i));
            assert_eq!(s.name_of(a), names[i]);
            assert_eq!(s.parse(&names[i]), Ok(*a));
        }
        assert_eq!(
            s.parse("qos:net1:2"),
            Ok(Action::NetQos {
                device: 1,
                level: 2
            })
        );
        assert!(matches!(
            s.parse("qos:net:1"),
            Err(ActionError::UnknownAction(_))
        ));
        assert!(matches!(
            s.parse("prio:net0:high"),
            Err(ActionError::UnknownAction(_))
        ));
    }

    #[test]
    fn devices_fill_slots_drives_first_and_extra_devices_stay_static() {
        let s = space(2, 6, 3);
        let names: Vec<_> = s.devices().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["blk0", "blk1", "blk2", "blk3", "net0", "net1"]);
        assert_eq!(s.device_position(DeviceKind::Net, 1), Some(5));
        assert_eq!(space(2, 1, 1).device_position(DeviceKind::Net, 0), Some(1));
        assert_eq!(space(2, 1, 1).device_position(DeviceKind::Drive, 1), None);
        assert_eq!(VmShape::new(2, 6, 3).tuned_drives(), 4);
        assert_eq!(VmShape::new(2, 6, 3).tuned_nets(), 2);
        assert_eq!(
            VmShape::new(1, 1, 0).to_string(),
            "1 vCPU, 1 drive, 0 network devices"
        );
    }

    #[test]
    fn validate_tells_absent_slots_from_malformed_actions() {
        let s = space(4, 1, 0);
        assert_eq!(
            s.validate(&Action::RateLimit {
                device: 1,
                level: 0
            }),
            Err(ActionError::AbsentDevice("blk1".into()))
        );
        assert_eq!(
            s.validate(&Action::NetQos {
                device: 0,
                level: 0
            }),
            Err(ActionError::AbsentDevice("net0".into()))
        );
        assert_eq!(
            s.validate(&Action::RateLimit {
                device: 4,
                level: 0
            }),
            Err(ActionError::NoSuchDevice(4))
        );
        assert!(matches!(
            s.validate(&Action::RateLimit {
                device: 0,
                level: 5
            }),
            Err(ActionError::LevelOutOfRange { .. })
        ));
        assert!(matches!(
            space(1, 0, 2).validate(&Action::NetQos {
                device: 1,
                level: 4
            }),
            Err(ActionError::LevelOutOfRange { .. })
        ));
        assert_eq!(
            s.validate(&Action::VcpuDelta(3)),
            Err(ActionError::BadVcpuDelta(3))
        );
        assert!(s.present(&Action::VcpuDelta(1)));
        assert!(!s.present(&Action::Priority {
            device: 2,
            level: PriorityLevel::High
        }));
    }

    #[test]
    fn check_names_reports_the_first_difference() {
        let s = space(2, 1, 0);
        let mut names = s.names().to_vec();
        assert_eq!(s.check_names(&names), Ok(()));
        names.swap(1, 2);
        assert_eq!(
            s.check_names(&names),
            Err(ActionError::NameMismatch {
                index: 1,
                expected: "vcpu-2".into(),
                got: "vcpu-1".into()
            })
        );
        let mut names = s.names().to_vec();
        names.push("qos:net2:0".into());
        assert_eq!(
            s.check_names(&names),
            Err(ActionError::LengthMismatch {
                expected: 45,
                got: 46
            })
        );
        assert!(s.check_names(&names[..13]).is_err());
    }

    /// Every action on an absent slot is masked, whatever the knobs and bounds.
    fn assert_absent_masked(s: &ActionSpace, mask: &[bool]) {
        for (a, ok) in s.actions().iter().zip(mask) {
            if !s.present(a) {
                assert!(!ok, "{} is on an absent device but valid", a.name());
            }
        }
    }

    #[test]
    fn one_vcpu_no_device_allows_only_scaling_up_and_noop() {
        let s = space(1, 0, 0);
        let bounds = Bounds::for_space(&s, 1, 1);
        let state = KnobState::initial(&s, 1);
        let mask = s.mask(&state, &bounds);
        assert_eq!(mask.iter().filter(|x| **x).count(), 1, "only noop");
        assert!(mask[0]);
        assert_absent_masked(&s, &mask);
        // With room above, only the vCPU actions that fit.
        let bounds = Bounds::for_space(&s, 1, 2);
        let mask = s.mask(&state, &bounds);
        assert!(valid(&s, &mask, "vcpu+1"));
        assert!(!valid(&s, &mask, "vcpu+2") && !valid(&s, &mask, "vcpu-1"));
        assert_eq!(mask.iter().filter(|x| **x).count(), 2);
        assert_eq!(
            s.allowed(
                &Action::RateLimit {
                    device: 0,
                    level: 3
                },
                &state,
                &bounds
            ),
            Err(Invalid::Absent("blk0".into()))
        );
    }

    #[test]
    fn a_full_vm_has_every_slot_and_its_bounds_mask_the_vcpus() {
        let s = space(8, 4, 2);
        let bounds = Bounds::for_space(&s, 1, 8);
        let state = KnobState::initial(&s, 8);
        let mask = s.mask(&state, &bounds);
        assert!(!valid(&s, &mask, "vcpu+1") && !valid(&s, &mask, "vcpu+2"));
        assert!(valid(&s, &mask, "vcpu-1") && valid(&s, &mask, "vcpu-2"));
        for d in 0..4 {
            assert!(valid(&s, &mask, &format!("prio:blk{d}:high")));
            assert!(
                !valid(&s, &mask, &format!("prio:blk{d}:medium")),
                "no change"
            );
            assert!(valid(&s, &mask, &format!("rl:blk{d}:4")));
            assert!(!valid(&s, &mask, &format!("rl:blk{d}:0")), "no change");
        }
        for n in 0..2 {
            assert!(!valid(&s, &mask, &format!("qos:net{n}:0")));
            assert!(valid(&s, &mask, &format!("qos:net{n}:3")));
        }
        // noop, two vCPU steps down, and every slot action but the settings in force.
        assert_eq!(
            mask.iter().filter(|x| **x).count(),
            1 + 2 + 4 * (2 + 4) + 2 * 3
        );
    }

    #[test]
    fn partial_shapes_mask_the_missing_slots() {
        for (v, d, n) in [(4, 1, 0), (2, 2, 0), (3, 4, 1), (1, 0, 2), (5, 3, 1)] {
            let s = space(v, d, n);
            let bounds = Bounds::for_space(&s, 1, v);
            let mut state = KnobState::initial(&s, v);
            let mask = s.mask(&state, &bounds);
            assert_absent_masked(&s, &mask);
            for slot in 0..DRIVE_SLOTS {
                let name = format!("rl:blk{slot}:4");
                assert_eq!(valid(&s, &mask, &name), slot < d, "{name} for {v}/{d}/{n}");
            }
            for slot in 0..NET_SLOTS {
                let name = format!("qos:net{slot}:2");
                assert_eq!(valid(&s, &mask, &name), slot < n, "{name} for {v}/{d}/{n}");
            }
            // Relative vCPU actions at the VM's own maximum and minimum.
            assert!(!valid(&s, &mask, "vcpu+1"));
            assert_eq!(valid(&s, &mask, "vcpu-1"), v > 1);
            assert_eq!(valid(&s, &mask, "vcpu-2"), v > 2);
            state.vcpus = 1;
            let mask = s.mask(&state, &bounds);
            assert_eq!(valid(&s, &mask, "vcpu+2"), v >= 3);
            assert!(!valid(&s, &mask, "vcpu-1"));
            assert_absent_masked(&s, &mask);
        }
    }

    #[test]
    fn mask_respects_bounds_and_current_settings() {
        let s = space(4, 1, 1);
        let mut bounds = Bounds::for_space(&s, 1, 4);
        let mut state = KnobState::initial(&s, 4);
        state.vcpus = 1;
        bounds.allowed_devices[0] = false;
        bounds.max_rate_level = 2;
        bounds.max_net_qos_level = 1;
        let mask = s.mask(&state, &bounds);
        assert!(!valid(&s, &mask, "vcpu-1") && valid(&s, &mask, "vcpu+1"));
        assert!(!valid(&s, &mask, "prio:blk0:high") && !valid(&s, &mask, "rl:blk0:1"));
        assert!(valid(&s, &mask, "qos:net0:1") && !valid(&s, &mask, "qos:net0:2"));
        assert_eq!(
            s.allowed(
                &Action::Priority {
                    device: 0,
                    level: PriorityLevel::High
                },
                &state,
                &bounds
            ),
            Err(Invalid::DeviceNotAllowed("blk0".into()))
        );
        bounds.allowed_devices[1] = false;
        assert!(
            !s.mask(&state, &bounds)[s
                .index_of(&Action::NetQos {
                    device: 0,
                    level: 1
                })
                .unwrap()]
        );
        state.vcpus = 2;
        assert!(matches!(
            s.allowed(&Action::VcpuDelta(-2), &state, &bounds),
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
        assert_eq!(
            Action::NetQos {
                device: 1,
                level: 0
            }
            .knob(),
            Some(Knob::NetQos(1))
        );
        assert_eq!(Action::NoOp.knob(), None);
    }

    #[test]
    fn decision_labels_map_to_the_action_that_took_effect() {
        let s = space(2, 1, 0);
        let idx = |n: &str| s.names().iter().position(|x| x == n);
        assert_eq!(s.effective_index("noop"), idx("noop"));
        assert_eq!(s.effective_index("refused:vcpu+1"), idx("noop"));
        assert_eq!(s.effective_index("failed:rl:blk0:2"), idx("noop"));
        assert_eq!(s.effective_index("rollback:rl:blk0:0"), idx("rl:blk0:0"));
        assert_eq!(s.effective_index("prio:blk0:high"), idx("prio:blk0:high"));
        assert_eq!(s.effective_index("qos:net1:3"), idx("qos:net1:3"));
        assert_eq!(s.effective_index("static"), None);
        assert_eq!(s.effective_index("rl:blk7:1"), None);
        assert_eq!(s.effective_index("qos:net:1"), None, "a v1 name");
    }
}
