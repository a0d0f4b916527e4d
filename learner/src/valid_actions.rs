//! Which actions the configuration manager could take in the state a vector describes.
//!
//! Schema v2 carries the knobs in force (active vCPUs, each drive slot's rate level and
//! priority, the network QoS level), so the learner can tell, from a next state alone,
//! which actions the manager would refuse there for the bounds or as no-ops ("vCPU+1" at
//! the maximum, "rl:blk0:4" when blk0 is already at level 4). The DQN targets bootstrap
//! only from those actions: their Q-values are never fitted to any reward (the tuner
//! masks them too), and letting the target's max pick them feeds the extrapolated values
//! of actions never taken back into every estimate, which made offline training diverge
//! (measured: mean max Q 77 000 on rewards in [-9, 6]).
//!
//! Cooldowns and the one-change-per-watch rule are not visible in a vector, so actions
//! they would refuse still count as valid here.

use tuner::actions::{ActionSpace, DeviceKind, PriorityLevel, NET_QOS_LADDER, RATE_LADDER};
use tuner::manager::{Bounds, KnobState};
use tuner::schema::{FeatureId, Normalisation};

/// The knob state a normalised vector reports, for `space` (priorities of network
/// devices, which the vector does not carry, read as medium).
pub fn knobs_of(space: &ActionSpace, vector: &[f32]) -> KnobState {
    // A count feature back in its own units: the schema normalises them linearly.
    let level = |id: FeatureId| {
        let x = f64::from(vector.get(id.index()).copied().unwrap_or(0.0));
        let raw = match id.feature().normalisation {
            Normalisation::Linear { scale } => x * scale,
            Normalisation::Clamp | Normalisation::Log { .. } => x,
            Normalisation::Signed { scale } => (x - 0.5) * 2.0 * scale,
        };
        raw.round().max(0.0) as usize
    };
    let mut state = KnobState::initial(space, 1);
    state.vcpus = u32::try_from(level(FeatureId::ActiveVcpus).max(1)).unwrap_or(u32::MAX);
    for (i, d) in space.devices().iter().enumerate() {
        if d.kind != DeviceKind::Drive {
            continue;
        }
        let Some([_, rate, prio]) = FeatureId::drive_slot(i) else {
            continue;
        };
        if let Some(slot) = state.rate_level.get_mut(i) {
            *slot = Some(level(rate).min(RATE_LADDER.len() - 1));
        }
        if let Some(slot) = state.priority.get_mut(i) {
            *slot = u8::try_from(level(prio))
                .ok()
                .and_then(PriorityLevel::from_code)
                .unwrap_or_default();
        }
    }
    if space.has_net() {
        state.net_qos = Some(level(FeatureId::NetQosLevel).min(NET_QOS_LADDER.len() - 1));
    }
    state
}

/// Writes `state`'s knobs into a normalised `vector` (the inverse of [`knobs_of`]):
/// active vCPUs, each drive slot's rate level and priority, the network QoS level.
pub fn set_knobs(space: &ActionSpace, vector: &mut [f32], state: &KnobState) {
    let mut put = |id: FeatureId, raw: f64| {
        if let Some(x) = vector.get_mut(id.index()) {
            *x = id.feature().normalisation.apply(raw);
        }
    };
    put(FeatureId::ActiveVcpus, f64::from(state.vcpus));
    for (i, d) in space.devices().iter().enumerate() {
        if d.kind != DeviceKind::Drive {
            continue;
        }
        let Some([_, rate, prio]) = FeatureId::drive_slot(i) else {
            continue;
        };
        if let Some(Some(level)) = state.rate_level.get(i) {
            put(rate, *level as f64);
        }
        if let Some(p) = state.priority.get(i) {
            put(prio, f64::from(p.code()));
        }
    }
    if let Some(level) = state.net_qos {
        put(FeatureId::NetQosLevel, level as f64);
    }
}

/// Per action of `space`: whether the manager's bounds (1..=`max_vcpus` vCPUs, every
/// device, the whole ladders) allow it in the state `vector` reports and it changes
/// something. `noop` is always valid. With `max_vcpus` 0 (unknown) every action is valid.
pub fn valid_actions(space: &ActionSpace, max_vcpus: u32, vector: &[f32]) -> Vec<bool> {
    if max_vcpus == 0 {
        return vec![true; space.len()];
    }
    let bounds = Bounds::for_space(space, 1, max_vcpus);
    let mut state = knobs_of(space, vector);
    state.vcpus = state.vcpus.clamp(1, max_vcpus);
    let mut mask = space.mask(&state, &bounds);
    if let Some(noop) = mask.first_mut() {
        *noop = true;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuner::schema::{Schema, MAX_VCPUS};

    #[test]
    fn the_vector_s_knobs_decide_what_is_valid() {
        let space = ActionSpace::new(2, 0, 4);
        let mut v = vec![0.0f32; Schema::len()];
        v[FeatureId::ActiveVcpus.index()] = 2.0 / MAX_VCPUS as f32;
        v[FeatureId::Drive0RateLevel.index()] = 1.0; // level 4
        v[FeatureId::Drive0Priority.index()] = 1.0; // high
        v[FeatureId::Drive1RateLevel.index()] = 0.0; // unlimited
        v[FeatureId::Drive1Priority.index()] = 2.0 / 3.0; // medium
        let k = knobs_of(&space, &v);
        assert_eq!(k.vcpus, 2);
        assert_eq!(k.rate_level, vec![Some(4), Some(0)]);
        assert_eq!(k.priority, vec![PriorityLevel::High, PriorityLevel::Medium]);
        let mask = valid_actions(&space, 2, &v);
        let ok = |name: &str| mask[space.names().iter().position(|n| n == name).unwrap()];
        assert!(ok("noop"));
        assert!(!ok("vcpu+1"), "at the maximum");
        assert!(ok("vcpu-1"));
        assert!(!ok("vcpu-2"), "below one vCPU");
        assert!(!ok("rl:blk0:4"), "changes nothing");
        assert!(ok("rl:blk0:0"));
        assert!(!ok("prio:blk0:high"));
        assert!(ok("prio:blk1:high"));
        assert!(!ok("rl:blk1:0"));
        assert!(valid_actions(&space, 0, &v).iter().all(|x| *x));
    }

    #[test]
    fn set_knobs_writes_back_what_knobs_of_reads() {
        let space = ActionSpace::new(2, 1, 4);
        let mut v = vec![0.5f32; Schema::len()];
        let mut k = KnobState::initial(&space, 3);
        k.rate_level[0] = Some(4);
        k.rate_level[1] = Some(1);
        k.priority[1] = PriorityLevel::Low;
        k.net_qos = Some(2);
        set_knobs(&space, &mut v, &k);
        assert_eq!(knobs_of(&space, &v), k);
        assert_eq!(v[FeatureId::CpuUtilisation.index()], 0.5, "load left alone");
    }
}
