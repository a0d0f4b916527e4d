//! Unit tests of the tuner benchmark's analysis.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tuner::actions::PriorityLevel;
use tuner::schema::FeatureId;
use tuner::state_repo::Row;

use crate::report::Meta;

use super::jobs::*;
use super::*;

#[test]
fn sweep_has_150_configurations() {
    let all = StaticConfig::all();
    assert_eq!(all.len(), 150);
    let uniq: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(uniq.len(), 150);
    assert_eq!(StaticConfig::quick().len(), 12);
    let c = StaticConfig {
        active_vcpus: 1,
        levels: [0, 4],
        priorities: [PriorityLevel::High, PriorityLevel::Low],
    };
    assert_eq!(c.label(), "v1 L0/4 high/low");
    assert_eq!(drive_alloc(&c.levels), 0.5);
    let flags = static_flags(&c, &[PathBuf::from("/a"), PathBuf::from("/b")]);
    assert_eq!(flags[..2], ["--active-vcpus", "1"]);
    assert_eq!(flags[3], "path=/a,id=blk0,level=0,priority=high");
    assert_eq!(flags[5], "path=/b,id=blk1,level=4,priority=low");
}

#[test]
fn kernel_lines_parse() {
    let text = "boot\nphased: scenario=mixed seed=3 phases=2\n\
                phased: phase 0 cpu at_ms=0 ms=1500\n\
                phased: phase 1 io at_ms=1502 ms=900\nnoise\n\
                phased: done ops=12345 ms=2410\n";
    let k = parse_kernel_output(text);
    assert_eq!(k.phases.len(), 2);
    assert_eq!(
        k.phases[1],
        PhaseSpan {
            kind: "io".into(),
            at_ms: 1502,
            ms: 900
        }
    );
    assert_eq!((k.done_ops, k.done_ms), (Some(12345), Some(2410)));
    let m = kind_ms(&k.phases);
    assert_eq!(m.get("cpu"), Some(&1500));
    assert_eq!(
        phase_at(&k.phases, 1600.0).map(|p| p.kind.as_str()),
        Some("io")
    );
    assert_eq!(phase_at(&k.phases, 1501.0), None);
}

#[test]
fn labels_move_rate_levels() {
    let mut l = [0, 0];
    apply_label("rl:blk1:3", &mut l, &[0, 0]);
    assert_eq!(l, [0, 3]);
    apply_label("refused:rl:blk0:4", &mut l, &[0, 0]);
    apply_label("prio:blk0:high", &mut l, &[0, 0]);
    apply_label("vcpu-1", &mut l, &[0, 0]);
    assert_eq!(l, [0, 3]);
    apply_label("rollback:rl:blk1:1", &mut l, &[0, 0]);
    assert_eq!(l, [0, 1]);
    apply_label("static", &mut l, &[2, 2]);
    assert_eq!(l, [2, 2]);
}

#[test]
fn intervals_take_the_levels_the_rows_report() {
    let row = |ts_ms: u64, levels: Option<[f64; 2]>, action: Option<&str>| {
        let mut raw = vec![0.0; tuner::schema::Schema::len()];
        match levels {
            Some([a, b]) => {
                raw[FeatureId::Drive0RateLevel.index()] = a;
                raw[FeatureId::Drive1RateLevel.index()] = b;
            }
            None => {
                raw[FeatureId::Drive0RateLevel.index()] = f64::NAN;
                raw[FeatureId::Drive1RateLevel.index()] = f64::NAN;
            }
        }
        Row {
            vm_id: "vm0".into(),
            ts_ns: ts_ms * 1_000_000,
            interval_ns: 100_000_000,
            schema_version: tuner::schema::SCHEMA_VERSION,
            vector: Vec::new(),
            raw,
            action: action.map(str::to_string),
            reward: Some(0.0),
            policy_id: "p".into(),
            config: String::new(),
            anomaly: None,
            anomaly_score: None,
            slo: None,
        }
    };
    // A start configuration (both drives at 4) set before the first interval: the
    // rows say so although the run's static configuration is [0, 0].
    let rows = vec![
        row(100, Some([4.0, 4.0]), Some("rl:blk0:0")),
        row(200, Some([0.0, 4.0]), None),
        // A row without the knobs falls back to replaying the labels.
        row(300, None, Some("rl:blk1:2")),
        row(400, None, None),
    ];
    let iv = intervals_from_rows(&rows, &StaticConfig::DEFAULT, &[]);
    let levels: Vec<[usize; 2]> = iv.iter().map(|i| i.levels).collect();
    assert_eq!(levels, vec![[4, 4], [0, 4], [0, 4], [0, 2]]);
}

#[test]
fn prediction_weights_by_phase_mix() {
    let per_kind: BTreeMap<String, f64> = [
        ("cpu".into(), 2.0),
        ("io".into(), -1.0),
        ("idle".into(), 0.0),
    ]
    .into();
    let mix: BTreeMap<String, u64> = [("cpu".into(), 3000), ("io".into(), 1000)].into();
    assert_eq!(predict(&per_kind, &mix), Some(1.25));
    let unknown: BTreeMap<String, u64> = [("net".into(), 10)].into();
    assert_eq!(predict(&per_kind, &unknown), None);
}

#[test]
fn p99_interpolates() {
    let xs: Vec<f64> = (1..=101).map(f64::from).collect();
    assert!((p99(&xs).expect("p99") - 100.0).abs() < 1e-9);
    assert_eq!(p99(&[]), None);
}

fn synthetic_run(
    sc: &str,
    seed: u64,
    policy: PolicyKind,
    config: Option<StaticConfig>,
    base: f64,
) -> RunRecord {
    let phases = vec![
        PhaseSpan {
            kind: "cpu".into(),
            at_ms: 0,
            ms: 1000,
        },
        PhaseSpan {
            kind: "io".into(),
            at_ms: 1000,
            ms: 1000,
        },
        PhaseSpan {
            kind: "idle".into(),
            at_ms: 2000,
            ms: 1000,
        },
    ];
    let intervals: Vec<Interval> = (0..30)
        .map(|k| {
            let t_ms = k as f64 * 100.0 + 50.0;
            let phase = phase_at(&phases, t_ms).map(|p| p.kind.clone());
            let io = phase.as_deref() == Some("io");
            Interval {
                t_ms,
                reward: (k > 0).then_some(base + 0.01 * seed as f64 + 0.001 * k as f64),
                ops_rate: 1000.0 + k as f64,
                latency_us: if io { 100.0 + k as f64 } else { 0.0 },
                active_vcpus: if k % 7 == 0 { 1.0 } else { 2.0 },
                levels: [0, (k / 10) % 5],
                action: Some(if k % 7 == 0 {
                    "rl:blk1:2".into()
                } else {
                    "noop".into()
                }),
                phase,
            }
        })
        .collect();
    let rewards: Vec<f64> = intervals.iter().filter_map(|i| i.reward).collect();
    RunRecord {
        scenario: sc.into(),
        seed,
        policy,
        config,
        cmdline: format!("scenario={sc} seed={seed}"),
        wall_s: 3.5,
        exit_code: Some(0),
        error: None,
        serial_log: None,
        kernel: KernelOutput {
            phases,
            done_ops: Some(1),
            done_ms: Some(3000),
        },
        metrics: metrics(&rewards, &intervals),
        intervals,
    }
}

#[test]
fn the_hindsight_ceiling_takes_the_best_run_of_each_interval() {
    let mut a = synthetic_run("cpu-idle", 1, PolicyKind::Learned, None, 1.0);
    let mut b = synthetic_run("cpu-idle", 1, PolicyKind::Threshold, None, 1.0);
    // a is 1 better in the first half of the intervals, b in the second half.
    for (i, (x, y)) in a.intervals.iter_mut().zip(&mut b.intervals).enumerate() {
        let (ra, rb) = if i < 15 { (2.0, 1.0) } else { (0.0, 1.0) };
        x.reward = (i > 0).then_some(ra);
        y.reward = (i > 0).then_some(rb);
    }
    let one = vec![a.clone(), b.clone()];
    // Intervals 1..=14 score 2 (a), 15..=29 score 1 (b): (14 * 2 + 15 * 1) / 29.
    let c = hindsight_ceiling(&one, "cpu-idle").expect("ceiling");
    assert!((c - 43.0 / 29.0).abs() < 1e-9, "{c}");
    // Above both runs' own means (a: 28/29, b: 1): the ceiling switches between them.
    assert!(c > 1.0, "{c}");
    assert_eq!(
        hindsight_ceiling(&one, "mixed"),
        None,
        "no runs of the scenario"
    );
    assert_eq!(
        hindsight_ceiling(&one[..1], "cpu-idle"),
        None,
        "one run per seed"
    );
    // Seeds are averaged: a second seed whose runs all score 1.
    let mut two = one;
    for base in [a, b] {
        let mut r = base;
        r.seed = 2;
        for iv in r.intervals.iter_mut().skip(1) {
            iv.reward = Some(1.0);
        }
        two.push(r);
    }
    let c2 = hindsight_ceiling(&two, "cpu-idle").expect("ceiling");
    assert!((c2 - (43.0 / 29.0 + 1.0) / 2.0).abs() < 1e-9, "{c2}");
}

#[test]
fn synthetic_runs_make_report_and_plots() {
    let out = std::env::temp_dir().join(format!("vmm-bench-tuner-test-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("out dir");
    let scenarios: Vec<String> = vec!["mixed".into(), "bursty".into()];
    let best = StaticConfig {
        active_vcpus: 1,
        ..StaticConfig::DEFAULT
    };
    let other = StaticConfig::DEFAULT;
    let mut runs = Vec::new();
    for sc in &scenarios {
        let learned = if sc == "mixed" { 2.0 } else { 1.05 };
        for seed in 1..=3 {
            runs.push(synthetic_run(
                sc,
                seed,
                PolicyKind::BestStatic,
                Some(best),
                1.0,
            ));
            runs.push(synthetic_run(
                sc,
                seed,
                PolicyKind::BestStatic,
                Some(other),
                0.5,
            ));
            runs.push(synthetic_run(sc, seed, PolicyKind::Threshold, None, 0.8));
            runs.push(synthetic_run(sc, seed, PolicyKind::Learned, None, learned));
        }
    }
    let chosen: BTreeMap<String, StaticConfig> =
        scenarios.iter().map(|s| (s.clone(), best)).collect();
    let arms = [PolicyKind::Threshold, PolicyKind::Learned];
    let (aggregates, comparisons, goal) = analyse(&scenarios, &runs, &chosen, &arms);
    let bs = aggregates
        .iter()
        .find(|a| a.scenario == "mixed" && a.policy == PolicyKind::BestStatic)
        .expect("best-static aggregate");
    assert_eq!(bs.runs, 3, "only the chosen configuration's runs");
    assert_eq!(bs.config, Some(best));
    assert!(!aggregates.iter().any(|a| a.policy == PolicyKind::Random));
    assert_eq!(goal[0].verdict, "PASS", "{:?}", goal[0]);
    assert_eq!(goal[1].verdict, "FAIL", "{:?}", goal[1]);
    // The learned runs are the best in every interval, so they are the ceiling: on
    // mixed it clears the target, on bursty (learned 0.05 above best-static) it does not.
    assert_eq!(goal[0].reachable, Some(true), "{:?}", goal[0]);
    assert_eq!(goal[1].reachable, Some(false), "{:?}", goal[1]);
    assert!(
        goal[1].detail.contains("out of reach"),
        "{}",
        goal[1].detail
    );
    let c = comparisons
        .iter()
        .find(|c| c.scenario == "mixed" && c.baseline == PolicyKind::BestStatic)
        .expect("comparison");
    let pct = c.improvement_pct.expect("pct");
    // Rewards are base + 0.01 seed + 0.001 k (k = 1..29): best-static's mean is 1.035
    // and learned is 1.0 above it on every seed.
    assert!((pct - 100.0 / 1.035).abs() < 1e-6, "{pct}");
    assert!(c.welch.expect("welch").significant);
    let p = c.paired.expect("paired over the three seeds");
    assert_eq!(p.n, 3);
    assert!((p.mean_diff - 1.0).abs() < 1e-6, "{p:?}");
    assert!(p.significant, "{p:?}");
    let calibration = vec![Calibration {
        config: best,
        per_kind: reward_per_kind(&runs[0].intervals),
        wall_s: 3.4,
        error: None,
    }];
    assert_eq!(calibration[0].per_kind.len(), 3);
    let mut rep = TunerReport {
        meta: Meta::now("tuner"),
        settings: TunerSettings {
            vmm: "vmm".into(),
            kernel: "phased".into(),
            out_dir: out.clone(),
            scenarios: scenarios.clone(),
            seeds: 3,
            phase_ms: 1000,
            phases: 3,
            calib_ms: 1000,
            sweep: vec![best],
            top_k: 2,
            policy: "models/general.onnx".into(),
            quick: false,
        },
        loadavg_before: loadavg(),
        loadavg_after: None,
        notes: vec!["online: not available (synthetic)".into()],
        calibration,
        candidates: scenarios
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    vec![Candidate {
                        config: best,
                        predicted: 1.1,
                        measured: Some(1.02),
                    }],
                )
            })
            .collect(),
        chosen,
        runs,
        aggregates,
        comparisons,
        goal,
        total_s: 100.0,
        calibration_s: 10.0,
        full_run_estimate_s: 1800.0,
        plots: Vec::new(),
    };
    rep.plots = plot::write_all(&rep, &out).expect("plots");
    assert_eq!(rep.plots.len(), 4, "{:?}", rep.plots);
    report::write(&rep, &out).expect("report");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for want in [
        "## Goal check",
        "| mixed | **PASS** |",
        "| bursty | **FAIL** |",
        "## mixed",
        "## bursty (held out)",
        "| policy | runs | reward |",
        "| best-static (v1 L0/0 medium/medium) | 3 |",
        "| threshold | 3 |",
        "learned vs best-static: +96.6% of |best-static|",
        "## How best-static was found",
        "| hindsight ceiling (measured) |",
        "hindsight ceiling 1.0",
        "## Machine load",
        "online: not available",
        "![mixed-reward.png](mixed-reward.png)",
        "![bursty-actions.png](bursty-actions.png)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    for p in &rep.plots {
        let bytes = std::fs::read(out.join(p)).expect("png");
        assert!(bytes.len() > 1000, "{p} is {} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p} is not a PNG");
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("valid JSON");
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(24));
    assert_eq!(json["goal"][0]["verdict"], "PASS");
    // Re-analysis from results.json alone gives the same analysis and report.
    std::fs::remove_file(out.join("report.md")).expect("rm report.md");
    let again = reanalyse(&out).expect("reanalyse");
    assert_eq!(again.goal, rep.goal);
    assert_eq!(again.comparisons, rep.comparisons);
    assert_eq!(again.aggregates, rep.aggregates);
    assert_eq!(again.plots, rep.plots);
    let md2 = std::fs::read_to_string(out.join("report.md")).expect("report.md again");
    assert_eq!(md2, md);
    std::fs::write(out.join("results.json"), "{\"runs\": 3}").expect("corrupt");
    let err = reanalyse(&out).expect_err("not a results.json").to_string();
    assert!(err.contains("not the results.json"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A tiny real run (needs /dev/kvm and `cargo build -p vmm -p vmm-bench`): too slow
/// for CI; run with `cargo test -p vmm-bench -- --ignored tuner_smoke`.
#[test]
#[ignore]
fn tuner_smoke() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm: skipped");
        return;
    }
    let target = Path::new(test_kernels::KERNELS_DIR)
        .parent()
        .expect("target dir")
        .to_path_buf();
    let vmm = target.join("debug/vmm");
    assert!(vmm.is_file(), "build vmm first: {}", vmm.display());
    let out = std::env::temp_dir().join(format!("vmm-bench-tuner-smoke-{}", std::process::id()));
    let s = TunerSettings {
        vmm,
        kernel: test_kernels::kernel_path("phased"),
        out_dir: out.clone(),
        scenarios: vec!["mixed".into()],
        seeds: 1,
        phase_ms: 500,
        phases: 3,
        calib_ms: 400,
        sweep: StaticConfig::quick().into_iter().take(2).collect(),
        top_k: 1,
        policy: out.join("no-such-model.onnx"),
        quick: true,
    };
    let r = run(&s).expect("tuner bench");
    assert_eq!(r.calibration.len(), 2);
    assert!(
        r.calibration.iter().all(|c| c.per_kind.len() == 3),
        "{:?}",
        r.calibration
    );
    assert!(r.chosen.contains_key("mixed"));
    let thr = r
        .runs
        .iter()
        .find(|x| x.policy == PolicyKind::Threshold)
        .expect("threshold run");
    assert_eq!(thr.error, None);
    assert_eq!(thr.kernel.phases.len(), 3);
    assert!(thr.metrics.is_some());
    assert!(out.join("report.md").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn full_run_estimate_counts_every_run() {
    // 150 x (3 + 1) + 4 x 5 x (4 + 2) x (9 + 1) = 600 + 1200.
    assert!((estimate_full_s(1.0, 4, 2, 1000, 9000.0) - 1800.0).abs() < 1e-9);
}
