//! The online-learning API: transitions in, checked ONNX bytes out, no file system.

mod common;

use std::path::Path;

use common::{best_action, reward, state};
use learner::{DqnConfig, LearnError, OnlineConfig, OnlineLearner, Transition};
use tuner::actions::VmShape;
use tuner::policy::{EpsilonSchedule, OnnxPolicy, QNetwork, XorShift64};
use tuner::reward::RewardWeights;
use tuner::schema::Schema;

fn assert_send<T: Send + 'static>() {}

fn shape() -> VmShape {
    VmShape::new(2, 1, 0)
}

fn config() -> OnlineConfig {
    OnlineConfig {
        dqn: DqnConfig {
            hidden: 16,
            batch: 16,
            lr: 3e-3,
            gamma: 0.5,
            target_every: 50,
            seed: 5,
            ..DqnConfig::default()
        },
        min_transitions: 64,
        replay_capacity: 2_000,
        epsilon: EpsilonSchedule {
            start: 1.0,
            end: 0.2,
            decay_steps: 400,
        },
        ..OnlineConfig::default()
    }
}

#[test]
fn learns_online_and_exports_bytes_tract_runs() {
    assert_send::<OnlineLearner>();
    let mut l = OnlineLearner::new(shape(), RewardWeights::default(), config()).unwrap();
    let space = l.space().clone();

    // Invalid transitions never get in.
    let mut bad = vec![0.5; Schema::len()];
    bad[2] = f32::NAN;
    let nan = Transition {
        state: bad,
        action: 0,
        reward: 1.0,
        next_state: vec![0.5; Schema::len()],
        done: false,
        shape: shape(),
    };
    assert!(matches!(l.push(nan), Err(LearnError::InvalidTransition(_))));
    let short = Transition {
        state: vec![0.5; 3],
        action: 0,
        reward: 1.0,
        next_state: vec![0.5; Schema::len()],
        done: false,
        shape: shape(),
    };
    assert!(l.push(short).is_err());
    let s = vec![0.5; Schema::len()];
    assert!(l
        .push_labelled(s.clone(), "qos:net:2", 0.0, s.clone())
        .is_err());
    assert!(!l
        .push_labelled(s.clone(), "static", 0.0, s.clone())
        .unwrap());
    assert_eq!(l.stats().rejected, 3);
    assert_eq!(l.stats().skipped, 1);
    assert!(l.is_empty());

    // Before enough transitions are held, training takes no step.
    assert_eq!(l.train(10).unwrap().steps, 0);

    // Play: act epsilon-greedily (every action on a device the VM has), observe the
    // synthetic reward.
    let mut rng = XorShift64::new(8);
    let mask: Vec<bool> = space.actions().iter().map(|a| space.present(a)).collect();
    let mut s = state(&mut rng);
    assert_eq!(l.epsilon(), 1.0);
    for i in 0..800 {
        let sel = l.act(&s, &mask).unwrap();
        let name = space.name(sel.index).unwrap().to_string();
        let next = state(&mut rng);
        let r = reward(&s, &name);
        assert!(l.push_labelled(s.clone(), &name, r, next.clone()).unwrap());
        if i % 20 == 19 {
            l.train(20).unwrap();
        }
        s = next;
    }
    assert_eq!(l.epsilon(), 0.2, "epsilon decayed");
    let stats = l.stats();
    assert_eq!(stats.pushed, 800);
    assert_eq!(stats.decisions, 800);
    assert!(stats.steps >= 700, "{stats:?}");
    assert!(stats.last_loss.is_some_and(f32::is_finite));
    // act honours the mask.
    let mut only = vec![false; space.len()];
    only[3] = true;
    assert_eq!(l.act(&s, &only).unwrap().index, 3);

    // Export in memory; the tuner's loader takes the bytes as they are.
    let (bytes, card) = l.export_bytes().unwrap();
    assert_eq!(card.actions, space.names());
    assert!(card.evaluation.extra.contains_key("tract_check"));
    let mut policy = OnnxPolicy::from_parts(Path::new("online.onnx"), &bytes, card).unwrap();
    let mut hits = 0;
    for _ in 0..100 {
        let s = state(&mut rng);
        let tract_q = policy.q_values(&s).unwrap();
        let ours = l.q_values(&s).unwrap();
        for (a, b) in tract_q.iter().zip(&ours) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        if space.name(learner::dqn::argmax(&tract_q).0) == Some(best_action(&s)) {
            hits += 1;
        }
    }
    println!("online: greedy action is the paying one in {hits}/100 fresh states");
    assert!(hits >= 80, "{hits}/100");
}

#[test]
fn bad_online_settings_are_refused() {
    let mut c = config();
    c.epsilon.start = 2.0;
    assert!(matches!(
        OnlineLearner::new(shape(), RewardWeights::default(), c),
        Err(LearnError::BadOption {
            option: "epsilon",
            ..
        })
    ));
    let mut c = config();
    c.replay_capacity = 10;
    assert!(OnlineLearner::new(shape(), RewardWeights::default(), c).is_err());
    let w = RewardWeights {
        free: -1.0,
        ..RewardWeights::default()
    };
    assert!(OnlineLearner::new(shape(), w, config()).is_err());
    let mut c = config();
    c.dqn.hidden = 0;
    assert!(matches!(
        OnlineLearner::new(shape(), RewardWeights::default(), c),
        Err(LearnError::BadOption {
            option: "hidden",
            ..
        })
    ));
}
