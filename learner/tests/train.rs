//! Offline training end to end: state repository -> DQN -> ONNX + card -> tract.

mod common;

use common::{best_action, episode, exec, state, write_db};
use learner::dataset::{load, DatasetOptions};
use learner::{train, Dqn, DqnConfig, TrainOptions};
use tuner::actions::ActionSpace;
use tuner::policy::{ModelCard, OnnxPolicy, QNetwork, XorShift64, REFERENCE_TOLERANCE};
use tuner::reward::RewardWeights;
use tuner::schema::Schema;

fn greedy(q: &[f32]) -> usize {
    learner::dqn::argmax(q).0
}

#[test]
fn trains_exports_and_tract_agrees_and_prefers_the_paying_action() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("runs.db");
    let mut rows = episode("train-a", 1200, 11, 1, 1_000_000_000);
    rows.extend(episode("train-b", 1200, 12, 1, 1_000_000_000));
    rows.extend(episode("holdout-c", 50, 13, 1, 1_000_000_000));
    write_db(&db, rows);
    let out = dir.path().join("models").join("dqn.onnx");
    let mut opts = TrainOptions::new(&db, &out);
    opts.steps = 600;
    opts.dqn = DqnConfig {
        hidden: 32,
        batch: 32,
        lr: 3e-3,
        gamma: 0.5,
        target_every: 100,
        seed: 7,
        ..DqnConfig::default()
    };
    opts.dataset.exclude_prefixes = vec!["holdout".into()];
    opts.name = Some("synthetic".into());
    let report = train(&opts).expect("training");
    println!(
        "{} | tract max |dq| {:e}, relative {:e} on {} states; {} bytes; {:?} of DQN",
        report.summary_line(),
        report.agreement.max_abs,
        report.agreement.max_rel,
        report.agreement.states,
        report.model_bytes,
        report.training_time
    );
    assert_eq!(report.transitions, 2 * 1199);
    assert_eq!(report.steps, 600);
    assert!(report.agreement.max_abs < 1e-4, "{:?}", report.agreement);
    assert!(report.agreement.max_rel <= REFERENCE_TOLERANCE);
    assert_eq!(report.agreement.states, 256);
    assert!(report.summary_line().starts_with("train: wrote "));
    assert!(
        report.model_bytes < 300 * 1024,
        "{} bytes",
        report.model_bytes
    );

    // The card: what the tuner validates, plus the data summary and figures.
    let card_path = ModelCard::path_for(&out);
    assert_eq!(report.card, card_path);
    let card = ModelCard::from_json(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    let space = ActionSpace::new(tuner::actions::VmShape::new(2, 1, 0));
    card.validate(&space, Some(&RewardWeights::default()))
        .unwrap();
    assert_eq!(card.name, "synthetic");
    assert_eq!(card.actions, space.names());
    assert!(card.schema.is_some());
    assert!(
        card.trained_on.contains("2398 transitions"),
        "{}",
        card.trained_on
    );
    assert!(card.trained_on.contains("holdout"), "{}", card.trained_on);
    let extra = &card.evaluation.extra;
    for key in [
        "steps",
        "final_loss",
        "mean_td_error",
        "mean_max_q",
        "training_time_s",
        "seed",
        "hyper_parameters",
        "data",
        "tract_check",
    ] {
        assert!(extra.contains_key(key), "card lacks evaluation.{key}");
    }
    assert_eq!(extra["data"]["excluded_vm_ids"][0], "holdout-c");
    assert_eq!(extra["hyper_parameters"]["hidden"], 32);
    assert_eq!(card.evaluation.reference_input.len(), Schema::len());
    assert_eq!(card.evaluation.reference_q.len(), space.len());
    assert!(
        std::fs::read_dir(out.parent().unwrap()).unwrap().count() == 2,
        "exactly the model and its card, no temporaries"
    );

    // The tuner's loader accepts it, and its greedy action is the paying one in most
    // fresh states.
    let mut policy = OnnxPolicy::load(&out, &space, Some(&RewardWeights::default())).unwrap();
    let mut rng = XorShift64::new(99);
    let trials = 200;
    let hits = (0..trials)
        .filter(|_| {
            let s = state(&mut rng);
            let q = policy.q_values(&s).unwrap();
            space.name(greedy(&q)) == Some(best_action(&s))
        })
        .count();
    println!("greedy action is the paying one in {hits}/{trials} fresh states");
    // Misses sit near the boundary (utilisation close to one half); 181 to 192 of 200
    // over seeds 1 to 4 and 7.
    assert!(hits >= trials * 85 / 100, "{hits}/{trials}");

    // Refreshing the start from the same data rewrites the card as training wrote it
    // (tract's Q-values walk where the trainer's did); a card whose start was changed
    // gets it back, and nothing else of the card moves.
    let written = std::fs::read(&card_path).unwrap();
    assert_eq!(learner::train::refresh_start(&opts).unwrap(), report.start);
    assert_eq!(std::fs::read(&card_path).unwrap(), written);
    let mut card: serde_json::Value = serde_json::from_slice(&written).unwrap();
    card["start"] = serde_json::json!({
        "active_vcpus": 3,
        "drives": [{"rate_level": 1, "priority": "high"}],
        "basis": "edited by hand"
    });
    std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
    assert_eq!(learner::train::refresh_start(&opts).unwrap(), report.start);
    assert_eq!(std::fs::read(&card_path).unwrap(), written);
    // No model at --out: an error that names it, and no card written.
    let mut missing = opts.clone();
    missing.out = dir.path().join("nowhere.onnx");
    let e = learner::train::refresh_start(&missing).unwrap_err();
    assert_eq!(e.option(), "out", "{e}");
    assert!(e.to_string().contains("nowhere.onnx"), "{e}");
    assert!(!ModelCard::path_for(&missing.out).exists());
}

#[test]
fn same_seed_same_network_and_labels_and_episodes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let mut rows = episode("vm0", 40, 3, 2, 1_000_000_000);
    // A gap of 1 s (10 intervals) after row 20 breaks the episode.
    for r in rows.iter_mut().skip(20) {
        r.ts_ns += 1_000_000_000;
    }
    write_db(&db, rows);
    // ids are 1-based in insertion order: rows 3, 4, 5 get tuner labels.
    exec(
        &db,
        "UPDATE samples SET action = 'refused:vcpu+2' WHERE id = 3; \
         UPDATE samples SET action = 'rollback:rl:blk1:0' WHERE id = 4; \
         UPDATE samples SET action = 'static' WHERE id = 5;",
    );
    let data = load(&db, &DatasetOptions::default()).unwrap();
    let s = &data.summary;
    assert_eq!(s.episodes, 2);
    assert_eq!(s.skipped.episode_end, 1);
    assert_eq!(s.skipped.no_reward, 1);
    assert_eq!(s.skipped.static_reset, 1);
    assert_eq!(s.refused_as_noop, 1);
    assert_eq!(s.rollbacks, 1);
    assert_eq!(data.transitions.len(), 39 - 1 - 1);
    let space = data.space();
    assert_eq!(data.transitions[2].action, 0, "refused counts as noop");
    assert_eq!(
        space.name(data.transitions[3].action),
        Some("rl:blk1:0"),
        "a rollback counts as the inverse applied"
    );
    assert_eq!(data.transitions[4].state.len(), Schema::len());
    assert!(!s.weights_recorded);

    let config = DqnConfig {
        hidden: 16,
        batch: 8,
        seed: 42,
        ..DqnConfig::default()
    };
    let run = |config: DqnConfig| {
        let mut dqn = Dqn::new(Schema::len(), space.len(), config).unwrap();
        let stats = dqn.train(&data.transitions, 30).unwrap();
        let states: Vec<&[f32]> = data
            .transitions
            .iter()
            .map(|t| t.state.as_slice())
            .collect();
        (stats.final_loss, dqn.q_values(&states).unwrap())
    };
    let (loss_a, q_a) = run(config);
    let (loss_b, q_b) = run(config);
    assert_eq!(loss_a.to_bits(), loss_b.to_bits());
    assert_eq!(q_a, q_b, "same seed and data, same network bit for bit");
    let (_, q_c) = run(DqnConfig { seed: 43, ..config });
    assert_ne!(q_a, q_c);
}
