//! The experience replay buffer: a ring of the most recent transitions, sampled uniformly.

use tuner::policy::XorShift64;

use crate::dataset::Transition;

/// A bounded buffer of transitions; when full, a new one replaces the oldest.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    capacity: usize,
    items: Vec<Transition>,
    next: usize,
}

impl ReplayBuffer {
    /// An empty buffer holding at most `capacity` transitions (at least 1).
    pub fn new(capacity: usize) -> ReplayBuffer {
        ReplayBuffer {
            capacity: capacity.max(1),
            items: Vec::new(),
            next: 0,
        }
    }

    /// Adds a transition, evicting the oldest when full.
    pub fn push(&mut self, t: Transition) {
        if self.items.len() < self.capacity {
            self.items.push(t);
        } else {
            self.items[self.next] = t;
        }
        self.next = (self.next + 1) % self.capacity;
    }

    /// Transitions held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most transitions it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The transitions held (in no particular order).
    pub fn as_slice(&self) -> &[Transition] {
        &self.items
    }
}

/// `n` transitions drawn uniformly with replacement from `items` (empty if `items` is).
pub fn sample<'a>(items: &'a [Transition], n: usize, rng: &mut XorShift64) -> Vec<&'a Transition> {
    if items.is_empty() {
        return Vec::new();
    }
    (0..n).map(|_| &items[rng.below(items.len())]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(reward: f32) -> Transition {
        Transition {
            state: vec![0.0],
            action: 0,
            reward,
            next_state: vec![0.0],
            done: false,
            shape: tuner::actions::VmShape::default(),
        }
    }

    #[test]
    fn ring_evicts_the_oldest_and_sampling_is_uniform() {
        let mut b = ReplayBuffer::new(3);
        for r in 0..5 {
            b.push(t(r as f32));
        }
        assert_eq!(b.len(), 3);
        let mut held: Vec<f32> = b.as_slice().iter().map(|t| t.reward).collect();
        held.sort_by(f32::total_cmp);
        assert_eq!(held, [2.0, 3.0, 4.0]);
        let mut rng = XorShift64::new(5);
        let mut counts = [0usize; 3];
        for s in sample(b.as_slice(), 30_000, &mut rng) {
            counts[s.reward as usize - 2] += 1;
        }
        assert!(
            counts.iter().all(|c| (9_000..11_000).contains(c)),
            "{counts:?}"
        );
        assert!(sample(&[], 4, &mut rng).is_empty());
    }
}
