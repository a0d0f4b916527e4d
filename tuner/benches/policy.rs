//! Cost of a tuner decision: loading the shipped test policy, ONNX inference with tract,
//! the threshold baseline, epsilon-greedy selection, and a whole `Tuner::step` (reward,
//! forecast, inference, mask, selection, manager) against a fake monitor.
//!
//! Run with `cargo bench -p tuner --bench policy`; prints one JSON object and fails when
//! the median inference is not well under 1% of the default 100 ms interval (100 us) or
//! its 99th percentile exceeds 1 ms. `POLICY_BENCH_ITERS` sets the iterations (default
//! 20 000).

use std::path::Path;
use std::time::Instant;

use tuner::actions::{Action, ActionSpace};
use tuner::agent::Sample;
use tuner::control::{Tuner, TunerConfig};
use tuner::manager::{Bounds, ConfigManager, KnobState, Knobs, ManagerConfig};
use tuner::policy::{
    select, Baseline, OnnxPolicy, Policy, PolicyContext, QNetwork, ThresholdConfig,
    ThresholdPolicy, XorShift64,
};
use tuner::schema::Schema;

/// Interval the tuner decides at by default (the agent's default).
const INTERVAL_NS: f64 = 100e6;

struct Nothing;

impl Knobs for Nothing {
    fn apply(&mut self, _: &Action) -> Result<(), String> {
        Ok(())
    }
    fn restore_static(&mut self) {}
}

/// Runs `f` `iters` times and returns (mean, p50, p99, max) in microseconds.
fn time(iters: usize, mut f: impl FnMut(usize)) -> (f64, f64, f64, f64) {
    for i in 0..iters.min(100) {
        f(i);
    }
    let mut ns: Vec<u64> = (0..iters)
        .map(|i| {
            let t = Instant::now();
            f(i);
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    let mean = ns.iter().map(|x| *x as f64).sum::<f64>() / ns.len() as f64 / 1e3;
    (mean, at(0.5), at(0.99), at(1.0))
}

fn stats_json(t: (f64, f64, f64, f64)) -> serde_json::Value {
    serde_json::json!({
        "mean_us": (t.0 * 100.0).round() / 100.0,
        "p50_us": (t.1 * 100.0).round() / 100.0,
        "p99_us": (t.2 * 100.0).round() / 100.0,
        "max_us": (t.3 * 100.0).round() / 100.0,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::var("POLICY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
        .max(100);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/test-policy.onnx");
    let space = ActionSpace::new(tuner::actions::VmShape::new(2, 1, 0));
    let n = Schema::len();
    let inputs: Vec<Vec<f32>> = (0..64)
        .map(|k| {
            (0..n)
                .map(|i| ((i * 7 + k * 13) % 100) as f32 / 100.0)
                .collect()
        })
        .collect();

    let t0 = Instant::now();
    let mut onnx = OnnxPolicy::load(&model, &space, None)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut failed = None;
    let inference = time(iters, |i| {
        if let Err(e) = onnx.q_values(&inputs[i % inputs.len()]) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }

    let mut threshold = ThresholdPolicy::new(&space, ThresholdConfig::default());
    let ctx = PolicyContext::default();
    let threshold_t = time(iters, |i| {
        let _ = threshold.choose(&inputs[i % inputs.len()], &ctx);
    });

    let q: Vec<f32> = (0..space.len()).map(|i| i as f32 * 0.1).collect();
    let mask = vec![true; space.len()];
    let mut rng = XorShift64::new(1);
    let select_t = time(iters, |_| {
        let _ = select(&q, &mask, 0.1, &mut rng);
    });

    let bounds = Bounds::for_space(&space, 1, 2);
    let manager = ConfigManager::new(
        space.clone(),
        bounds,
        KnobState::initial(&space, 1),
        ManagerConfig::default(),
    )?;
    let mut tuner = Tuner::new(
        TunerConfig::default(),
        manager,
        Box::new(Nothing),
        Policy::network(OnnxPolicy::load(&model, &space, None)?),
    )?;
    let samples: Vec<Sample> = inputs
        .iter()
        .map(|v| Sample {
            at_ns: 0,
            interval_ns: INTERVAL_NS as u64,
            raw: vec![0.0; n],
            vector: v.clone(),
            ..Sample::default()
        })
        .collect();
    let mut step_no = 0u64;
    let step_t = time(iters, |i| {
        let mut s = samples[i % samples.len()].clone();
        step_no += 1;
        s.at_ns = step_no * INTERVAL_NS as u64;
        tuner.step(&s);
    });

    let fraction = inference.1 * 1e3 / INTERVAL_NS;
    let out = serde_json::json!({
        "model": "models/test-policy.onnx",
        "features": n,
        "actions": space.len(),
        "iterations": iters,
        "load_ms": (load_ms * 100.0).round() / 100.0,
        "onnx_inference": stats_json(inference),
        "threshold_policy": stats_json(threshold_t),
        "select": stats_json(select_t),
        "tuner_step": stats_json(step_t),
        "interval_ms": INTERVAL_NS / 1e6,
        "inference_fraction_of_interval_p50": fraction,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if inference.1 >= 100.0 || inference.2 >= 1_000.0 {
        return Err(format!(
            "inference too slow: p50 {:.1} us, p99 {:.1} us (limits 100 us, 1000 us)",
            inference.1, inference.2
        )
        .into());
    }
    Ok(())
}
