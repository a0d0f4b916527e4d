//! PNG plots of the multi-tenant benchmark (`scripts/bench-host.sh`, which writes
//! `host-all.json`): the critical VM's SLO attainment per scenario and arm (mean and
//! 95% CI over seeds), and the cores granted to each VM over time under each arbiter
//! mode (the smallest seed). The JSON is read as a `serde_json::Value`: the driver is a
//! script, and these plots read a handful of its fields.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

use crate::tuner::plot::font_available;

/// Why the plots could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum HostPlotError {
    /// The results file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// The results file is not the benchmark's JSON.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// plotters failed on a file.
    #[error("drawing {path}: {reason}")]
    Draw {
        /// The PNG.
        path: PathBuf,
        /// plotters' reason.
        reason: String,
    },
}

/// The arms in the order the plots show them.
const ARMS: [&str; 7] = [
    "alone",
    "static",
    "static-w",
    "off",
    "threshold",
    "pi",
    "slo",
];
/// The arbiter modes whose grants are plotted.
const MODES: [&str; 3] = ["threshold", "pi", "slo"];

fn arm_color(arm: &str) -> RGBColor {
    match arm {
        "alone" => RGBColor(150, 150, 150),
        "static" => RGBColor(0, 0, 0),
        "static-w" => RGBColor(120, 60, 160),
        "off" => RGBColor(230, 140, 30),
        "threshold" => RGBColor(200, 40, 40),
        "pi" => RGBColor(40, 90, 200),
        _ => RGBColor(30, 140, 60),
    }
}

fn vm_color(i: usize) -> RGBColor {
    [
        RGBColor(30, 140, 60),
        RGBColor(200, 40, 40),
        RGBColor(40, 90, 200),
        RGBColor(230, 140, 30),
    ][i % 4]
}

/// Draws `host-attainment.png` and `host-grants-<scenario>.png` from `input` into
/// `out_dir`; returns the files written.
pub fn plot(input: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, HostPlotError> {
    let text = std::fs::read_to_string(input).map_err(|source| HostPlotError::Read {
        path: input.to_path_buf(),
        source,
    })?;
    let fmt = |reason: String| HostPlotError::Format {
        path: input.to_path_buf(),
        reason,
    };
    let all: Value = serde_json::from_str(&text).map_err(|e| fmt(e.to_string()))?;
    let summary = all["summary"]
        .as_object()
        .ok_or_else(|| fmt("no summary object".into()))?;
    let runs = all["runs"]
        .as_array()
        .ok_or_else(|| fmt("no runs array".into()))?;
    std::fs::create_dir_all(out_dir).map_err(|source| HostPlotError::Read {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let held_out = all["held_out"].as_str().unwrap_or("");
    let scenarios: Vec<String> = ["noisy", "peaks", "bursty"]
        .iter()
        .filter(|s| summary.contains_key(**s))
        .map(|s| s.to_string())
        .collect();
    let mut written = Vec::new();
    let path = out_dir.join("host-attainment.png");
    attainment(summary, &scenarios, held_out, &path)?;
    written.push(path);
    for s in &scenarios {
        let path = out_dir.join(format!("host-grants-{s}.png"));
        if grants(runs, s, &path)? {
            written.push(path);
        }
    }
    Ok(written)
}

fn draw_err(path: &Path) -> impl Fn(String) -> HostPlotError + '_ {
    move |reason| HostPlotError::Draw {
        path: path.to_path_buf(),
        reason,
    }
}

/// Mean attainment with its 95% CI, one column of points per scenario, one per arm.
fn attainment(
    summary: &serde_json::Map<String, Value>,
    scenarios: &[String],
    held_out: &str,
    path: &Path,
) -> Result<(), HostPlotError> {
    let err = draw_err(path);
    let text = font_available();
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = scenarios.len().max(1) as f64;
    let mut b = ChartBuilder::on(&root);
    b.margin(14);
    if text {
        b.caption(
            "critical VM: share of intervals meeting every SLO target (mean, 95% CI)",
            ("sans-serif", 20),
        )
        .x_label_area_size(40)
        .y_label_area_size(50);
    }
    let mut chart = b
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..1.05)
        .map_err(|e| err(e.to_string()))?;
    let labels: Vec<String> = scenarios
        .iter()
        .map(|s| {
            if s == held_out {
                format!("{s} (held out)")
            } else {
                s.clone()
            }
        })
        .collect();
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_labels(scenarios.len())
            .x_label_formatter(&label_of)
            .y_desc("attainment");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(e.to_string()))?;
    // The goal: 99% of intervals.
    chart
        .draw_series(LineSeries::new(
            vec![(-0.5, 0.99), (n - 0.5, 0.99)],
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(|e| err(e.to_string()))?;
    for (k, arm) in ARMS.iter().enumerate() {
        let c = arm_color(arm);
        let dx = (k as f64 - 3.0) * 0.11;
        let mut pts = Vec::new();
        let mut bars = Vec::new();
        for (i, s) in scenarios.iter().enumerate() {
            let m = &summary[s][*arm]["crit_attainment"];
            let Some(mean) = m["mean"].as_f64() else {
                continue;
            };
            let x = i as f64 + dx;
            pts.push((x, mean));
            if let Some(ci) = m["ci95"].as_f64() {
                bars.push(vec![(x, (mean - ci).max(0.0)), (x, (mean + ci).min(1.05))]);
            }
        }
        for bar in bars {
            chart
                .draw_series(LineSeries::new(bar, c.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 5, c.filled())))
            .map_err(|e| err(e.to_string()))?
            .label(*arm)
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// Cores granted to each VM over time, one panel per arbiter mode (smallest seed).
fn grants(runs: &[Value], scenario: &str, path: &Path) -> Result<bool, HostPlotError> {
    let pick = |mode: &str| {
        runs.iter()
            .filter(|r| r["scenario"] == scenario && r["arm"] == mode)
            .min_by_key(|r| r["seed"].as_u64().unwrap_or(u64::MAX))
    };
    let chosen: Vec<(&str, &Value)> = MODES
        .iter()
        .filter_map(|m| pick(m).map(|r| (*m, r)))
        .collect();
    if chosen.is_empty() {
        return Ok(false);
    }
    let err = draw_err(path);
    let text = font_available();
    let root = BitMapBackend::new(path, (1000, 240 * chosen.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((chosen.len(), 1));
    for ((mode, run), area) in chosen.iter().zip(panels.iter()) {
        let series = run["series"].as_array().cloned().unwrap_or_default();
        let mut ids: Vec<String> = series
            .iter()
            .filter_map(|p| p["grant"].as_object())
            .flat_map(|g| g.keys().cloned())
            .collect();
        ids.sort();
        ids.dedup();
        // The critical VM first.
        ids.sort_by_key(|i| i != "crit");
        let xmax = series
            .iter()
            .filter_map(|p| p["t"].as_f64())
            .fold(1.0, f64::max);
        let mut b = ChartBuilder::on(area);
        b.margin(8);
        if text {
            b.caption(
                format!(
                    "{scenario}, arbiter {mode}, seed {}: cores granted per VM",
                    run["seed"]
                ),
                ("sans-serif", 16),
            )
            .x_label_area_size(28)
            .y_label_area_size(40);
        }
        let mut chart = b
            .build_cartesian_2d(0.0..xmax, 0.0..2.2)
            .map_err(|e| err(e.to_string()))?;
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh();
        if text {
            mesh.x_desc("time since start (s)").y_desc("cores");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| err(e.to_string()))?;
        for (k, id) in ids.iter().enumerate() {
            let c = vm_color(k);
            let pts: Vec<(f64, f64)> = series
                .iter()
                .filter_map(|p| Some((p["t"].as_f64()?, p["grant"][id.as_str()].as_f64()?)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(id.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_drawn_from_a_small_result_file_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("vmm-host-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("host-all.json");
        let ci = |m: f64| serde_json::json!({"crit_attainment": {"mean": m, "ci95": 0.05, "n": 2}});
        let all = serde_json::json!({
            "held_out": "bursty",
            "summary": {"noisy": {"slo": ci(0.9), "static": ci(0.7)}},
            "runs": [{"scenario": "noisy", "arm": "slo", "seed": 1, "series": [
                {"t": 0.0, "grant": {"crit": 1.0, "batch": 1.0}},
                {"t": 0.5, "grant": {"crit": 2.0, "batch": 0.1}}]}]
        });
        std::fs::write(&input, all.to_string()).unwrap();
        let out = plot(&input, &dir).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        for p in &out {
            let bytes = std::fs::read(p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", p.display());
        }
        std::fs::write(&input, "{}").unwrap();
        let e = plot(&input, &dir).unwrap_err().to_string();
        assert!(e.contains("no summary"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
