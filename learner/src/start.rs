//! The configuration a trained policy starts a VM in (the card's `start`).
//!
//! A guest shows no load before it runs, and the tuner changes one knob per interval:
//! from the VM's configuration (all vCPUs, unlimited drives, medium priorities) a policy
//! that scales an idle guest down spends its first intervals walking there, paying for
//! resources it does not want, in every run. So the trainer asks the trained network
//! where it takes an idle guest: from idle states of the data (no guest operations, no
//! I/O or network requests, CPU under 5%) with the knobs reset to the VM's configuration,
//! it follows the greedy valid action, writing each action's knob change into the
//! vector, until the network picks `noop`. The configuration most walks end in becomes
//! the card's [`StartConfig`] when at least half of them end there; the tuner sets it
//! before the guest's first interval (see `ConfigManager::start_in`).
//!
//! The walks start from idle states the data recorded under the VM's own configuration
//! when it holds at least [`MIN_IDLE_STATES`] of them: their other features (exits,
//! halts, interrupts of every active vCPU) agree with the knobs. Only without enough of
//! them are the knobs of other idle states reset, and such a vector mixes two
//! configurations: one recorded at 1 vCPU but saying 2 shows one idle vCPU's exits, and
//! the shipped policy walked 90% of those to 2 vCPUs where all 40 consistent ones went to
//! 1 (it leaves an idle guest at 1 vCPU when it runs).
//!
//! One network serves every VM shape (actions v2), but a start configuration is walked
//! for one: the trainer walks the idle states of the shape with the most data, with that
//! shape's vCPUs as the VM's own, and the card's start applies to any VM (vCPUs clamped
//! to its bounds, one entry per drive slot, for the drives it has).

use tuner::actions::ActionSpace;
use tuner::manager::KnobState;
use tuner::policy::{DriveStart, StartConfig};
use tuner::schema::FeatureId;

use crate::error::LearnError;
use crate::valid_actions::{knobs_of, set_knobs, valid_actions};

/// Fewest idle states the data must hold for a start configuration.
pub const MIN_IDLE_STATES: usize = 20;
/// Most idle states walked (evenly spaced over the data's).
pub const MAX_IDLE_STATES: usize = 2000;
/// CPU utilisation (the vector's value) below which a state with no requests is idle.
pub const IDLE_CPU: f32 = 0.05;

/// Whether a normalised vector shows an idle guest: no guest operations, no I/O or
/// network requests, CPU utilisation under [`IDLE_CPU`].
pub fn is_idle(vector: &[f32]) -> bool {
    let at = |id: FeatureId| vector.get(id.index()).copied().unwrap_or(f32::NAN);
    at(FeatureId::GuestOpsRate) == 0.0
        && at(FeatureId::IoRequestRate) == 0.0
        && at(FeatureId::NetPacketRate) == 0.0
        && at(FeatureId::CpuUtilisation) < IDLE_CPU
}

/// Why no start configuration was chosen, or the one chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum StartChoice {
    /// The configuration most walks end in, with how many did of how many.
    Chosen(StartConfig),
    /// No start configuration (the tuner starts from the VM's own), and why.
    None(String),
}

/// Walks the idle ones of `states` (of VMs of `space`'s shape) as the module
/// documentation says, with `q` giving the trained network's Q-values for a batch of
/// vectors.
pub fn idle_start(
    space: &ActionSpace,
    states: &[&[f32]],
    mut q: impl FnMut(&[&[f32]]) -> Result<Vec<Vec<f32>>, LearnError>,
) -> Result<StartChoice, LearnError> {
    let shape = space.shape();
    let max_vcpus = shape.vcpus;
    if max_vcpus == 0 {
        return Ok(StartChoice::None(
            "the data does not record the VMs' vCPUs".into(),
        ));
    }
    let idle: Vec<&[f32]> = states.iter().copied().filter(|v| is_idle(v)).collect();
    if idle.len() < MIN_IDLE_STATES {
        return Ok(StartChoice::None(format!(
            "{} idle states in the data, fewer than {MIN_IDLE_STATES}",
            idle.len()
        )));
    }
    let from = KnobState::initial(space, max_vcpus);
    let consistent: Vec<&[f32]> = idle
        .iter()
        .copied()
        .filter(|v| knobs_of(space, v) == from)
        .collect();
    let (idle, kind) = if consistent.len() >= MIN_IDLE_STATES {
        (
            consistent,
            "idle states the data recorded under that configuration",
        )
    } else {
        (
            idle,
            "idle states of the data with their knobs reset to it (too few were recorded under it)",
        )
    };
    let take = idle.len().min(MAX_IDLE_STATES);
    let mut walks: Vec<Vec<f32>> = (0..take)
        .map(|i| {
            let mut v = idle[i * idle.len() / take].to_vec();
            set_knobs(&mut v, &from);
            v
        })
        .collect();
    // Enough steps to move every knob from one end to the other; a walk still moving
    // after that goes round in circles and counts for nothing.
    let drives = shape.tuned_drives();
    let max_steps = max_vcpus as usize + 2 * drives + 4;
    let mut active: Vec<usize> = (0..walks.len()).collect();
    let mut ends: Vec<(KnobState, usize)> = Vec::new();
    for _ in 0..max_steps {
        if active.is_empty() {
            break;
        }
        let batch: Vec<&[f32]> = active.iter().map(|&i| walks[i].as_slice()).collect();
        let qs = q(&batch)?;
        let mut still = Vec::new();
        for (&i, qv) in active.iter().zip(&qs) {
            let mask = valid_actions(&shape, &walks[i]);
            let best = qv
                .iter()
                .zip(&mask)
                .enumerate()
                .filter(|(_, (_, ok))| **ok)
                .max_by(|a, b| a.1 .0.total_cmp(b.1 .0))
                .map(|(k, _)| k)
                .unwrap_or(0);
            let state = knobs_of(space, &walks[i]);
            let next = match space.action(best) {
                Some(a) if best != 0 => state.after(&a).ok(),
                _ => None,
            };
            match next {
                Some(next) => {
                    set_knobs(&mut walks[i], &next);
                    still.push(i);
                }
                None => match ends.iter_mut().find(|(s, _)| *s == state) {
                    Some((_, n)) => *n += 1,
                    None => ends.push((state, 1)),
                },
            }
        }
        active = still;
    }
    let Some((best, count)) = ends.iter().max_by_key(|(_, n)| *n).cloned() else {
        return Ok(StartChoice::None(format!(
            "none of {take} walks from idle states settled"
        )));
    };
    if 2 * count < take {
        return Ok(StartChoice::None(format!(
            "no configuration holds half the walks from idle states ({count} of {take} at most)"
        )));
    }
    let drives = best
        .rate_level
        .iter()
        .zip(&best.priority)
        .map(|(rate_level, priority)| DriveStart {
            rate_level: *rate_level,
            priority: *priority,
        })
        .collect();
    Ok(StartChoice::Chosen(StartConfig {
        active_vcpus: best.vcpus,
        drives,
        basis: format!(
            "where the network takes an idle guest from the VM's own configuration ({shape}; \
             unlimited drives, medium priorities): {count} of {take} walks from {kind} end here"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuner::actions::{PriorityLevel, VmShape};
    use tuner::schema::Schema;

    fn idle_vector() -> Vec<f32> {
        let mut v = vec![0.0; Schema::len()];
        v[FeatureId::CpuUtilisation.index()] = 0.02;
        v
    }

    /// A stand-in network: prefers fewer vCPUs and tighter limits (as the cost term of
    /// the reward would teach on an idle guest), and noop once there.
    fn frugal(space: &ActionSpace) -> impl FnMut(&[&[f32]]) -> Result<Vec<Vec<f32>>, LearnError> {
        let space = space.clone();
        move |batch| {
            Ok(batch
                .iter()
                .map(|_| {
                    space
                        .names()
                        .iter()
                        .map(|n| match n.as_str() {
                            "noop" => 0.0,
                            "vcpu-1" => 3.0,
                            "rl:blk0:4" => 2.0,
                            "rl:blk1:4" => 1.0,
                            _ => -1.0,
                        })
                        .collect()
                })
                .collect())
        }
    }

    #[test]
    fn an_idle_guest_starts_where_the_network_takes_it() {
        let space = ActionSpace::new(VmShape::new(2, 2, 0));
        let states: Vec<Vec<f32>> = (0..30).map(|_| idle_vector()).collect();
        let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
        let StartChoice::Chosen(start) = idle_start(&space, &refs, frugal(&space)).unwrap() else {
            panic!("expected a start configuration");
        };
        assert_eq!(start.active_vcpus, 1);
        assert_eq!(
            start.drives,
            vec![
                DriveStart {
                    rate_level: 4,
                    priority: PriorityLevel::Medium
                };
                2
            ]
        );
        assert!(start.basis.contains("30 of 30"), "{}", start.basis);
    }

    #[test]
    fn walks_start_from_idle_states_recorded_under_the_vms_configuration() {
        use crate::valid_actions::set_knobs;
        let space = ActionSpace::new(VmShape::new(2, 2, 0));
        let own = KnobState::initial(&space, 2);
        let mut scaled_down = own.clone();
        scaled_down.vcpus = 1;
        scaled_down.rate_level = vec![4, 4];
        // 25 idle states recorded under the VM's own configuration (2 idle vCPUs: two
        // vCPUs' worth of exits) and 100 recorded at 1 vCPU (one vCPU's worth).
        let exits = FeatureId::ExitRateHlt.index();
        let mut states = Vec::new();
        for (n, knobs, rate) in [(25, &own, 0.2f32), (100, &scaled_down, 0.1)] {
            for _ in 0..n {
                let mut v = idle_vector();
                v[exits] = rate;
                set_knobs(&mut v, knobs);
                states.push(v);
            }
        }
        let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
        // A network that scales down only where the exits say two vCPUs idle; the reset
        // vectors of the 1-vCPU states say 2 vCPUs but show one vCPU's exits.
        let space2 = space.clone();
        let by_exits = move |batch: &[&[f32]]| -> Result<Vec<Vec<f32>>, LearnError> {
            let mut frugal = frugal(&space2);
            let scaled: Vec<Vec<f32>> = frugal(batch)?;
            Ok(batch
                .iter()
                .zip(scaled)
                .map(|(v, q)| {
                    if v[exits] > 0.15 {
                        q
                    } else {
                        let mut q = vec![-1.0; q.len()];
                        q[0] = 1.0;
                        q
                    }
                })
                .collect())
        };
        let StartChoice::Chosen(start) = idle_start(&space, &refs, by_exits.clone()).unwrap()
        else {
            panic!("expected a start configuration");
        };
        assert_eq!(start.active_vcpus, 1, "{start:?}");
        assert!(start.basis.contains("25 of 25"), "{}", start.basis);
        assert!(start.basis.contains("recorded under"), "{}", start.basis);
        // With too few consistent states, the knobs of every idle state are reset; here
        // most of those walks stop at once, at the VM's own configuration.
        let few: Vec<&[f32]> = refs[15..].to_vec();
        let StartChoice::Chosen(start) = idle_start(&space, &few, by_exits).unwrap() else {
            panic!("expected a start configuration");
        };
        assert_eq!(start.active_vcpus, 2, "{start:?}");
        assert!(start.basis.contains("reset"), "{}", start.basis);
    }

    #[test]
    fn busy_states_do_not_count_and_too_few_idle_ones_give_none() {
        let space = ActionSpace::new(VmShape::new(2, 2, 0));
        let mut busy = idle_vector();
        busy[FeatureId::GuestOpsRate.index()] = 0.5;
        assert!(!is_idle(&busy));
        let states: Vec<Vec<f32>> = (0..100)
            .map(|i| if i < 5 { idle_vector() } else { busy.clone() })
            .collect();
        let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
        let got = idle_start(&space, &refs, frugal(&space)).unwrap();
        assert!(matches!(got, StartChoice::None(ref why) if why.contains("5 idle states")));
        let got = idle_start(
            &ActionSpace::new(VmShape::new(0, 2, 0)),
            &refs,
            frugal(&space),
        )
        .unwrap();
        assert!(matches!(got, StartChoice::None(_)));
    }

    #[test]
    fn a_network_that_never_settles_gives_none() {
        let space = ActionSpace::new(VmShape::new(2, 1, 0));
        let states: Vec<Vec<f32>> = (0..30).map(|_| idle_vector()).collect();
        let refs: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
        // noop is always the worst: the walk alternates forever.
        let restless = |batch: &[&[f32]]| -> Result<Vec<Vec<f32>>, LearnError> {
            Ok(batch
                .iter()
                .map(|v| {
                    let mut q = vec![0.0; space_len()];
                    q[0] = -10.0;
                    let level = v[FeatureId::Drive0RateLevel.index()];
                    // rl:blk0:0 and rl:blk0:4 by turns.
                    let names = ActionSpace::new(VmShape::new(2, 1, 0));
                    let want = if level > 0.5 {
                        "rl:blk0:0"
                    } else {
                        "rl:blk0:4"
                    };
                    let k = names.names().iter().position(|n| n == want).unwrap();
                    q[k] = 5.0;
                    q
                })
                .collect())
        };
        fn space_len() -> usize {
            ActionSpace::new(VmShape::new(2, 1, 0)).len()
        }
        let got = idle_start(&space, &refs, restless).unwrap();
        assert!(
            matches!(got, StartChoice::None(ref why) if why.contains("settled")),
            "{got:?}"
        );
    }
}
