//! Which actions the configuration manager could take in the state a vector describes.
//!
//! The vector carries the knobs in force (active vCPUs, each drive slot's rate level and
//! priority, the network QoS level), so the learner can tell, from a next state and the
//! VM's [`VmShape`] alone, which actions the manager would refuse there: actions on a
//! slot the VM has no device in (the fixed layout of actions v2 serves every shape, see
//! [`tuner::actions`]), actions outside the VM's own vCPU bounds ("vCPU+1" at the
//! maximum) and no-ops ("rl:blk0:4" when blk0 is already at level 4). The DQN targets
//! bootstrap only from those actions: their Q-values are never fitted to any reward (the
//! tuner masks them too), and letting the target's max pick them feeds the extrapolated
//! values of actions never taken back into every estimate, which made offline training
//! diverge (measured: mean max Q 77 000 on rewards in [-9, 6]).
//!
//! Network slots: the vector has one `net_qos_level` (the monitor mirrors the level last
//! set on any network device), so every network slot the VM has reads that level.
//!
//! Cooldowns and the one-change-per-watch rule are not visible in a vector, so actions
//! they would refuse still count as valid here.

use tuner::actions::{ActionSpace, PriorityLevel, VmShape, NET_QOS_LADDER, RATE_LADDER};
use tuner::manager::{Bounds, KnobState};
use tuner::schema::{FeatureId, Normalisation};

/// The knob state a normalised vector reports, for the devices of `space`.
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
    for (i, (rl, p)) in state
        .rate_level
        .iter_mut()
        .zip(state.priority.iter_mut())
        .enumerate()
    {
        let Some([_, rate, prio]) = FeatureId::drive_slot(i) else {
            continue;
        };
        *rl = level(rate).min(RATE_LADDER.len() - 1);
        *p = u8::try_from(level(prio))
            .ok()
            .and_then(PriorityLevel::from_code)
            .unwrap_or_default();
    }
    let qos = level(FeatureId::NetQosLevel).min(NET_QOS_LADDER.len() - 1);
    for slot in &mut state.net_qos {
        *slot = qos;
    }
    state
}

/// Writes `state`'s knobs into a normalised `vector` (the inverse of [`knobs_of`]):
/// active vCPUs, each drive slot's rate level and priority, and the first network
/// slot's QoS level.
pub fn set_knobs(vector: &mut [f32], state: &KnobState) {
    let mut put = |id: FeatureId, raw: f64| {
        if let Some(x) = vector.get_mut(id.index()) {
            *x = id.feature().normalisation.apply(raw);
        }
    };
    put(FeatureId::ActiveVcpus, f64::from(state.vcpus));
    for (i, (level, p)) in state.rate_level.iter().zip(&state.priority).enumerate() {
        let Some([_, rate, prio]) = FeatureId::drive_slot(i) else {
            continue;
        };
        put(rate, *level as f64);
        put(prio, f64::from(p.code()));
    }
    if let Some(level) = state.net_qos.first() {
        put(FeatureId::NetQosLevel, *level as f64);
    }
}

/// Per action of the layout: whether the manager's bounds (1..=`shape.vcpus` vCPUs,
/// the devices the VM has, the whole ladders) allow it in the state `vector` reports
/// and it changes something. `noop` is always valid. With `shape.vcpus` 0 (unknown)
/// every action on a device the VM has is valid.
pub fn valid_actions(shape: &VmShape, vector: &[f32]) -> Vec<bool> {
    let space = ActionSpace::new(*shape);
    if shape.vcpus == 0 {
        return space.actions().iter().map(|a| space.present(a)).collect();
    }
    let bounds = Bounds::for_space(&space, 1, shape.vcpus);
    let mut state = knobs_of(&space, vector);
    state.vcpus = state.vcpus.clamp(1, shape.vcpus);
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
    fn the_vector_s_knobs_and_the_shape_decide_what_is_valid() {
        let shape = VmShape::new(2, 2, 0);
        let space = ActionSpace::new(shape);
        let mut v = vec![0.0f32; Schema::len()];
        v[FeatureId::ActiveVcpus.index()] = 2.0 / MAX_VCPUS as f32;
        v[FeatureId::Drive0RateLevel.index()] = 1.0; // level 4
        v[FeatureId::Drive0Priority.index()] = 1.0; // high
        v[FeatureId::Drive1RateLevel.index()] = 0.0; // unlimited
        v[FeatureId::Drive1Priority.index()] = 2.0 / 3.0; // medium
        let k = knobs_of(&space, &v);
        assert_eq!(k.vcpus, 2);
        assert_eq!(k.rate_level, vec![4, 0]);
        assert_eq!(k.priority, vec![PriorityLevel::High, PriorityLevel::Medium]);
        let mask = valid_actions(&shape, &v);
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
        assert!(!ok("rl:blk2:3") && !ok("prio:blk3:low"), "absent drives");
        assert!(!ok("qos:net0:1"), "no network device");
        // A bigger VM of the same vector: its bounds and slots.
        let big = VmShape::new(8, 4, 2);
        let mask = valid_actions(&big, &v);
        assert!(mask[space.names().iter().position(|n| n == "vcpu+2").unwrap()]);
        assert!(mask[space.names().iter().position(|n| n == "rl:blk3:2").unwrap()]);
        assert!(
            mask[space
                .names()
                .iter()
                .position(|n| n == "qos:net1:3")
                .unwrap()]
        );
        assert!(
            !mask[space
                .names()
                .iter()
                .position(|n| n == "qos:net1:0")
                .unwrap()]
        );
        // Unknown vCPUs: every action on a present device.
        let unknown = valid_actions(&VmShape::new(0, 1, 0), &v);
        assert_eq!(
            unknown.iter().filter(|x| **x).count(),
            1 + 4 + 8,
            "noop, the vCPU steps and blk0's eight"
        );
    }

    #[test]
    fn set_knobs_writes_back_what_knobs_of_reads() {
        let space = ActionSpace::new(VmShape::new(4, 2, 1));
        let mut v = vec![0.5f32; Schema::len()];
        let mut k = KnobState::initial(&space, 3);
        k.rate_level[0] = 4;
        k.rate_level[1] = 1;
        k.priority[1] = PriorityLevel::Low;
        k.net_qos = vec![2];
        set_knobs(&mut v, &k);
        assert_eq!(knobs_of(&space, &v), k);
        assert_eq!(v[FeatureId::CpuUtilisation.index()], 0.5, "load left alone");
    }
}
