//! The suite's fixed shape: scenarios, the policies compared, the static configurations
//! swept, the VM every run boots.

use serde::{Deserialize, Serialize};
use tuner::actions::{PriorityLevel, RATE_LADDER};

/// Every scenario of the suite, training ones first.
pub const SCENARIOS: [&str; 4] = ["cpu-idle", "io-contention", "mixed", "bursty"];
/// Scenarios the learned policy never saw in training.
pub const HELD_OUT: [&str; 1] = ["bursty"];
/// Phase kinds of the `phased` kernel.
pub const KINDS: [&str; 3] = ["cpu", "io", "idle"];
/// vCPUs of the suite's VM (the maximum; `--active-vcpus` picks how many the guest uses).
pub const VCPUS: u32 = 2;
/// Guest memory of the suite's VM in MiB.
pub const MEM_MIB: u64 = 64;
/// Size of each drive's backing file in MiB.
pub const DRIVE_MIB: u64 = 64;
/// Sampling (and tuning) interval in ms.
pub const INTERVAL_MS: u64 = 100;
/// Goal: the learned policy's mean reward exceeds best-static's by at least this share of
/// |best-static mean| ("1.15 x best-static", read so that it also holds for negative means).
pub const GOAL_IMPROVEMENT: f64 = 0.15;

/// The policies compared, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// The best static configuration in hindsight.
    BestStatic,
    /// `--tuner threshold`.
    Threshold,
    /// `--tuner static --epsilon 1`: uniform over the allowed actions.
    Random,
    /// `--policy models/general.onnx`.
    Learned,
    /// `vmm-learn online` from scratch beside the VM (the VM: `--tuner static` with
    /// exploration [`ONLINE_EPSILON`]).
    Online,
}

impl PolicyKind {
    /// Every policy, in report order.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::BestStatic,
        PolicyKind::Threshold,
        PolicyKind::Random,
        PolicyKind::Learned,
        PolicyKind::Online,
    ];

    /// The name in reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::BestStatic => "best-static",
            PolicyKind::Threshold => "threshold",
            PolicyKind::Random => "random",
            PolicyKind::Learned => "learned",
            PolicyKind::Online => "online",
        }
    }
}

/// One static configuration of the action space: active vCPUs, each drive's
/// [`RATE_LADDER`] level and I/O priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StaticConfig {
    /// vCPUs the guest uses (1 or 2).
    pub active_vcpus: u32,
    /// Rate level of blk0 (foreground) and blk1 (background).
    pub levels: [usize; 2],
    /// I/O priority of blk0 and blk1.
    pub priorities: [PriorityLevel; 2],
}

/// The priority pairs of the sweep: (blk0, blk1).
pub const PRIORITY_PAIRS: [[PriorityLevel; 2]; 3] = [
    [PriorityLevel::Medium, PriorityLevel::Medium],
    [PriorityLevel::High, PriorityLevel::Low],
    [PriorityLevel::Low, PriorityLevel::High],
];

impl StaticConfig {
    /// The monitor's default: every vCPU, unlimited drives, medium priorities.
    pub const DEFAULT: StaticConfig = StaticConfig {
        active_vcpus: VCPUS,
        levels: [0, 0],
        priorities: [PriorityLevel::Medium, PriorityLevel::Medium],
    };

    /// All 150 static configurations: vCPUs {1,2} x blk0 level 0..4 x blk1 level 0..4 x
    /// [`PRIORITY_PAIRS`].
    pub fn all() -> Vec<StaticConfig> {
        let mut v = Vec::new();
        for active_vcpus in 1..=VCPUS {
            for l0 in 0..RATE_LADDER.len() {
                for l1 in 0..RATE_LADDER.len() {
                    for priorities in PRIORITY_PAIRS {
                        v.push(StaticConfig {
                            active_vcpus,
                            levels: [l0, l1],
                            priorities,
                        });
                    }
                }
            }
        }
        v
    }

    /// The 12 configurations of a quick sweep: vCPUs {1,2} x blk1 level {0,2,4} x
    /// priorities (medium,medium) and (high,low), blk0 unlimited.
    pub fn quick() -> Vec<StaticConfig> {
        Self::all()
            .into_iter()
            .filter(|c| {
                c.levels[0] == 0 && c.levels[1] % 2 == 0 && c.priorities[1] != PriorityLevel::High
            })
            .collect()
    }

    /// A short label: `v1 L0/4 high/low`.
    pub fn label(&self) -> String {
        format!(
            "v{} L{}/{} {}/{}",
            self.active_vcpus,
            self.levels[0],
            self.levels[1],
            self.priorities[0].name(),
            self.priorities[1].name()
        )
    }

    /// The file-name form: `v1-l0-4-high-low`.
    pub fn slug(&self) -> String {
        format!(
            "v{}-l{}-{}-{}-{}",
            self.active_vcpus,
            self.levels[0],
            self.levels[1],
            self.priorities[0].name(),
            self.priorities[1].name()
        )
    }
}

/// Mean allocation of drives at `levels` (`1 - level / 4`, as in tuner::reward::cost).
pub fn drive_alloc(levels: &[usize]) -> f64 {
    if levels.is_empty() {
        return 0.0;
    }
    let tightest = (RATE_LADDER.len() - 1) as f64;
    levels
        .iter()
        .map(|l| (1.0 - *l as f64 / tightest).clamp(0.0, 1.0))
        .sum::<f64>()
        / levels.len() as f64
}
