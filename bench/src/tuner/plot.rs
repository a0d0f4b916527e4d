//! PNG plots of the tuner benchmark (plotters, bitmap backend). Text needs a TrueType
//! font: DejaVu Sans (Debian's fonts-dejavu-core) or the file named by
//! `VMM_BENCH_FONT`; without one the plots are drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::{PhaseSpan, PolicyKind, RunRecord, TunerReport};

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters failed on a file.
    #[error("drawing {path}: {reason}")]
    Draw {
        /// The PNG.
        path: PathBuf,
        /// plotters' reason.
        reason: String,
    },
}

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for plotters once; whether text can be drawn.
pub fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let mut paths: Vec<String> = FONT_PATHS.iter().map(|p| p.to_string()).collect();
        if let Ok(p) = std::env::var("VMM_BENCH_FONT") {
            paths.insert(0, p);
        }
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
                log::warn!("{p} is not a usable font");
            }
        }
        log::warn!("no TrueType font found (install fonts-dejavu-core): plots have no text");
        false
    })
}

fn phase_color(kind: &str) -> RGBColor {
    match kind {
        "cpu" => RGBColor(255, 160, 60),
        "io" => RGBColor(80, 140, 230),
        _ => RGBColor(170, 170, 170),
    }
}

fn policy_color(p: PolicyKind) -> RGBColor {
    match p {
        PolicyKind::BestStatic => RGBColor(0, 0, 0),
        PolicyKind::Threshold => RGBColor(200, 40, 40),
        PolicyKind::Random => RGBColor(150, 150, 150),
        PolicyKind::Learned => RGBColor(30, 140, 60),
        PolicyKind::Online => RGBColor(140, 60, 200),
    }
}

/// The run of `policy` on `scenario` with the smallest seed (best-static: the chosen
/// configuration's).
fn first_run<'a>(r: &'a TunerReport, scenario: &str, policy: PolicyKind) -> Option<&'a RunRecord> {
    let chosen = r.chosen.get(scenario).copied();
    r.runs
        .iter()
        .filter(|x| x.scenario == scenario && x.policy == policy && !x.intervals.is_empty())
        .filter(|x| policy != PolicyKind::BestStatic || x.config == chosen)
        .min_by_key(|x| x.seed)
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |reason| PlotError::Draw {
        path: path.to_path_buf(),
        reason,
    }
}

/// A chart drawn (for `'b`) on a bitmap of a file path (`'a`).
type Chart<'b, 'a> = ChartContext<
    'b,
    BitMapBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A chart over `root` for time `0..xmax` (s) and `y`, on white, with the caption and the
/// axis descriptions (`y_axis`: label area width and description) when `text` can be
/// drawn. Both plots share this frame.
fn frame<'b, 'a>(
    root: &'b DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    y_axis: (u32, &str),
    xmax: f64,
    y: (f64, f64),
    text: bool,
) -> Result<Chart<'b, 'a>, String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut b = ChartBuilder::on(root);
    b.margin(12);
    if text {
        b.caption(caption, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(y_axis.0);
    }
    let mut chart = b
        .build_cartesian_2d(0.0..xmax, y.0..y.1)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh().light_line_style(TRANSPARENT);
    if text {
        mesh.x_desc("time (s); shading: cpu orange, io blue, idle grey")
            .y_desc(y_axis.1);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    Ok(chart)
}

fn bands(chart: &mut Chart<'_, '_>, phases: &[PhaseSpan], y: (f64, f64)) -> Result<(), String> {
    chart
        .draw_series(phases.iter().map(|p| {
            let (x0, x1) = (p.at_ms as f64 / 1e3, (p.at_ms + p.ms) as f64 / 1e3);
            Rectangle::new(
                [(x0, y.0), (x1, y.1)],
                phase_color(&p.kind).mix(0.18).filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Reward over time of each policy (smallest seed) on `scenario`, phases shaded.
pub fn reward_plot(r: &TunerReport, scenario: &str, path: &Path) -> Result<bool, PlotError> {
    let runs: Vec<(PolicyKind, &RunRecord)> = PolicyKind::ALL
        .iter()
        .filter_map(|p| first_run(r, scenario, *p).map(|x| (*p, x)))
        .collect();
    if runs.is_empty() {
        return Ok(false);
    }
    let pts = |x: &RunRecord| -> Vec<(f64, f64)> {
        x.intervals
            .iter()
            .filter_map(|i| i.reward.map(|v| (i.t_ms / 1e3, v)))
            .collect()
    };
    let all: Vec<(f64, f64)> = runs.iter().flat_map(|(_, x)| pts(x)).collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let (mut ymin, mut ymax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if ymin > ymax {
        (ymin, ymax) = (-1.0, 1.0);
    }
    let pad = ((ymax - ymin) * 0.08).max(0.05);
    let y = (ymin - pad, ymax + pad);
    let text = font_available();
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (1100, 500)).into_drawing_area();
    let caption = format!("{scenario}: reward per interval (seed {})", runs[0].1.seed);
    let mut chart = frame(&root, &caption, (60, "reward"), xmax, y, text).map_err(&err)?;
    if let Some((_, x)) = runs.iter().find(|(_, x)| !x.kernel.phases.is_empty()) {
        bands(&mut chart, &x.kernel.phases, y).map_err(&err)?;
    }
    for (p, x) in &runs {
        let c = policy_color(*p);
        let s = chart
            .draw_series(LineSeries::new(pts(x), c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
        let name = match (p, x.config) {
            (PolicyKind::BestStatic, Some(cfg)) => format!("best-static ({})", cfg.label()),
            _ => p.name().to_string(),
        };
        s.label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// The learned policy's (else threshold's) knobs over time on `scenario`: active vCPUs
/// and both drives' rate levels as steps, a marker at every applied action, phases shaded.
pub fn action_plot(r: &TunerReport, scenario: &str, path: &Path) -> Result<bool, PlotError> {
    let Some((policy, run)) = [PolicyKind::Learned, PolicyKind::Threshold]
        .iter()
        .find_map(|p| first_run(r, scenario, *p).map(|x| (*p, x)))
    else {
        return Ok(false);
    };
    let xmax = run
        .intervals
        .iter()
        .map(|i| i.t_ms / 1e3)
        .fold(1.0, f64::max)
        * 1.02;
    let y = (-0.3, 5.0);
    let text = font_available();
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (1100, 450)).into_drawing_area();
    let caption = format!(
        "{scenario}: actions of {} (seed {})",
        policy.name(),
        run.seed
    );
    let mut chart =
        frame(&root, &caption, (50, "vCPUs / rate level"), xmax, y, text).map_err(&err)?;
    bands(&mut chart, &run.kernel.phases, y).map_err(&err)?;
    type Pick = fn(&super::Interval) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("active vCPUs", RGBColor(30, 140, 60), |i| i.active_vcpus),
        ("blk0 rate level", RGBColor(40, 80, 200), |i| {
            i.levels[0] as f64
        }),
        ("blk1 rate level", RGBColor(200, 40, 40), |i| {
            i.levels[1] as f64 + 0.06
        }),
    ];
    for (name, c, f) in series {
        let mut pts = Vec::new();
        for (k, i) in run.intervals.iter().enumerate() {
            if k > 0 {
                pts.push((i.t_ms / 1e3, f(&run.intervals[k - 1])));
            }
            pts.push((i.t_ms / 1e3, f(i)));
        }
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    let marks: Vec<(f64, f64)> = run
        .intervals
        .iter()
        .filter(|i| {
            i.action.as_deref().is_some_and(|a| {
                a != "noop" && !a.starts_with("refused:") && !a.starts_with("failed:")
            })
        })
        .map(|i| (i.t_ms / 1e3, 4.7))
        .collect();
    chart
        .draw_series(
            marks
                .into_iter()
                .map(|p| TriangleMarker::new(p, 5, BLACK.filled())),
        )
        .map_err(|e| err(e.to_string()))?
        .label("action applied")
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 5, BLACK.filled()));
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// Draws both plots of every scenario into `out_dir`; returns their file names.
pub fn write_all(r: &TunerReport, out_dir: &Path) -> Result<Vec<String>, PlotError> {
    let mut names = Vec::new();
    for sc in &r.settings.scenarios {
        let name = format!("{sc}-reward.png");
        if reward_plot(r, sc, &out_dir.join(&name))? {
            names.push(name);
        }
        let name = format!("{sc}-actions.png");
        if action_plot(r, sc, &out_dir.join(&name))? {
            names.push(name);
        }
    }
    Ok(names)
}
