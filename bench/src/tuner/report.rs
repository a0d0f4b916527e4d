//! `report.md` and `results.json` of the tuner benchmark.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::BenchError;
use crate::stats::MeanCi;

use super::{PolicyKind, TunerReport, HELD_OUT, KINDS};

/// `mean ± ci` with `digits` decimals; `-` when there are no figures.
fn ci(m: &Option<MeanCi>, digits: usize) -> String {
    match m {
        None => "-".into(),
        Some(m) => match m.ci95 {
            Some(h) => format!("{:.digits$} ± {:.digits$}", m.mean, h),
            None => format!("{:.digits$} (n=1)", m.mean),
        },
    }
}

fn secs(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// How a test's verdict reads in the report.
fn significance(significant: bool) -> &'static str {
    if significant {
        "significant (95%)"
    } else {
        "not significant"
    }
}

/// The report as Markdown.
pub fn render(r: &TunerReport) -> String {
    let s = &r.settings;
    let mut md = String::new();
    let all_scenarios = super::SCENARIOS
        .iter()
        .all(|sc| s.scenarios.iter().any(|x| x == sc));
    let kind = if s.quick {
        "A `--quick` smoke run: one seed, not figures to quote".to_string()
    } else if all_scenarios {
        "Full run".to_string()
    } else {
        format!("Run of the scenarios {} only", s.scenarios.join(", "))
    };
    let _ = writeln!(md, "# Tuner policies on the phased workload suite\n");
    let _ = writeln!(
        md,
        "{} on {} ({} CPUs, {}), commit {}{}. {}.\n",
        r.meta.date_utc,
        r.meta.host.cpu_model,
        r.meta.host.cpus,
        r.meta.host.kernel_release,
        r.meta.git_commit.as_deref().unwrap_or("unknown"),
        if r.meta.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        },
        kind
    );
    let _ = writeln!(
        md,
        "VM: {} vCPUs (maximum), {} MiB, two {} MiB drives (blk0 foreground, blk1 background), \
         {} ms sampling and tuning interval. Scenarios: `phased scenario=NAME seed=N phase_ms={} phases={}`, \
         seeds 1..={}. Held out from training: {}. Total wall time {} (sweep {}).\n",
        super::VCPUS,
        super::MEM_MIB,
        super::DRIVE_MIB,
        super::INTERVAL_MS,
        s.phase_ms,
        s.phases,
        s.seeds,
        HELD_OUT.join(", "),
        secs(r.total_s),
        secs(r.calibration_s),
    );
    let _ = writeln!(
        md,
        "Start: each static configuration from its own settings; threshold, random and online \
         from the VM's (2 vCPUs, unlimited drives, medium priorities); learned from its model \
         card's `start` configuration when the card has one (where the network takes an idle \
         guest; `models/README.md`), else from the VM's.\n"
    );
    let _ = writeln!(
        md,
        "Per run: mean reward (the rows' `reward` column), throughput (mean guest ops/s), p99 of \
         the per-interval guest mean latency over io intervals (us), resources (mean active vCPUs, \
         mean drive allocation `1 - level/4` over both drives, and the reward's cost term \
         `0.5 * vCPUs/2 + 0.5 * allocation`). Tables: mean ± 95% confidence interval over seeds \
         (Student's t).\n"
    );
    if !r.notes.is_empty() {
        let _ = writeln!(md, "Notes:\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }

    let _ = writeln!(md, "## Goal check\n");
    let _ = writeln!(
        md,
        "Goal: learned >= 1.15 x best-static on every scenario and above threshold (read as: \
         learned mean >= best-static mean + 15% of |best-static mean|, and learned mean > \
         threshold mean).\n"
    );
    let _ = writeln!(md, "| scenario | verdict | detail |\n|---|---|---|");
    for g in &r.goal {
        let _ = writeln!(md, "| {} | **{}** | {} |", g.scenario, g.verdict, g.detail);
    }
    md.push('\n');

    for sc in &s.scenarios {
        let held = if HELD_OUT.contains(&sc.as_str()) {
            " (held out)"
        } else {
            ""
        };
        let _ = writeln!(md, "## {sc}{held}\n");
        let _ = writeln!(
            md,
            "| policy | runs | reward | throughput (ops/s) | p99 io latency (us) | active vCPUs | drive allocation | cost |\n|---|---|---|---|---|---|---|---|"
        );
        for a in r.aggregates.iter().filter(|a| &a.scenario == sc) {
            let name = match (a.policy, a.config) {
                (PolicyKind::BestStatic, Some(c)) => format!("best-static ({})", c.label()),
                (p, _) => p.name().to_string(),
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                a.runs,
                ci(&a.reward, 4),
                ci(&a.throughput, 0),
                ci(&a.p99_io_latency_us, 0),
                ci(&a.active_vcpus, 2),
                ci(&a.drive_alloc, 2),
                ci(&a.cost, 3),
            );
        }
        md.push('\n');
        let comps: Vec<_> = r.comparisons.iter().filter(|c| &c.scenario == sc).collect();
        if comps.iter().any(|c| c.improvement_pct.is_some()) {
            for c in comps {
                let pct = c
                    .improvement_pct
                    .map(|p| format!("{p:+.1}% of |best-static|"))
                    .unwrap_or_else(|| "-".into());
                let sig = match c.welch {
                    Some(w) => format!(
                        "Welch t = {:.2}, df = {:.1}: {}",
                        w.t,
                        w.df,
                        significance(w.significant)
                    ),
                    None => "no test (fewer than two seeds or no variance)".into(),
                };
                let pair = match c.paired {
                    Some(p) => format!(
                        "; paired over {} seeds: {:+.4} ± {:.4}, t = {:.2}: {}",
                        p.n,
                        p.mean_diff,
                        p.ci95,
                        p.t,
                        significance(p.significant)
                    ),
                    None => String::new(),
                };
                let _ = writeln!(md, "- learned vs {}: {pct}; {sig}{pair}", c.baseline.name());
            }
            md.push('\n');
        }
        for p in &r.plots {
            if p.contains(&format!("{sc}-")) {
                let _ = writeln!(md, "![{p}]({p})");
            }
        }
        md.push('\n');
    }

    let _ = writeln!(md, "## How best-static was found\n");
    let _ = writeln!(
        md,
        "Not every static configuration on every seed (that would be {} runs per scenario and \
         seed). Instead:\n\n\
         1. Sweep: each of the {} static configurations (active vCPUs x blk0 level x blk1 level x \
         priority pair) ran once on the calibration schedule `schedule=cpu:{c},io:{c},idle:{c}` \
         (`--tuner static`, `--active-vcpus`, `--drive ...,level=L,priority=P`); its mean reward \
         per phase kind was recorded (each phase's first interval left out as the change-over).\n\
         2. Prediction: each scenario's mean reward per configuration = the per-kind rewards \
         weighted by the scenario's phase mix (ms per kind from the kernel's phase lines of \
         the same seeds), averaged over the seeds.\n\
         3. The top {} predicted configurations ran on every seed of the scenario; the one \
         with the best measured mean reward is best-static.\n",
        150,
        s.sweep.len(),
        s.top_k,
        c = s.calib_ms,
    );
    let _ = writeln!(
        md,
        "| scenario | rank | configuration | predicted reward | measured reward | chosen |\n|---|---|---|---|---|---|"
    );
    for (sc, cands) in &r.candidates {
        for (i, c) in cands.iter().enumerate().take(s.top_k.max(3)) {
            let _ = writeln!(
                md,
                "| {sc} | {} | {} | {:.4} | {} | {} |",
                i + 1,
                c.config.label(),
                c.predicted,
                c.measured
                    .map(|m| format!("{m:.4}"))
                    .unwrap_or_else(|| "-".into()),
                if r.chosen.get(sc) == Some(&c.config) {
                    "yes"
                } else {
                    ""
                }
            );
        }
    }
    md.push('\n');
    let mut best_per_kind = String::new();
    for k in KINDS {
        if let Some(c) = r
            .calibration
            .iter()
            .filter(|c| c.per_kind.contains_key(k))
            .max_by(|a, b| a.per_kind[k].total_cmp(&b.per_kind[k]))
        {
            let _ = write!(
                best_per_kind,
                "{k}: {} ({:.4}); ",
                c.config.label(),
                c.per_kind[k]
            );
        }
    }
    let failed = r
        .calibration
        .iter()
        .filter(|c| c.per_kind.is_empty())
        .count();
    let _ = writeln!(
        md,
        "Best configuration per phase kind in the sweep: {}{} of {} sweep runs gave no figures.\n",
        best_per_kind,
        failed,
        r.calibration.len()
    );
    let _ = writeln!(
        md,
        "Headroom, two ways. Predicted: a per-phase oracle (the sweep's best configuration \
         for each phase kind, switched for free at every phase edge) on each scenario's phase \
         mix, against the best static configuration's prediction. Measured: the hindsight \
         ceiling, the best reward any run of the same seed (every arm and static candidate) \
         earned in each interval, averaged, against best static's measured mean; noise \
         favours it. No policy that reacts after a phase has started reaches either, and a \
         goal above the ceiling is out of reach of every behaviour measured.\n\n\
         | scenario | best static (predicted) | per-phase oracle (predicted) | oracle gain | best static (measured) | hindsight ceiling (measured) | ceiling gain | goal target |\n|---|---|---|---|---|---|---|---|"
    );
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let gain = |base: Option<f64>, v: Option<f64>| match (base, v) {
        (Some(b), Some(o)) if b != 0.0 => format!("{:+.1}%", 100.0 * (o - b) / b.abs()),
        _ => "-".into(),
    };
    for (sc, cands) in &r.candidates {
        let stat = cands.first().map(|c| c.predicted).filter(|v| v.is_finite());
        let oracle = super::oracle_prediction(&r.calibration, &r.runs, sc);
        let measured = r
            .aggregates
            .iter()
            .find(|a| &a.scenario == sc && a.policy == PolicyKind::BestStatic)
            .and_then(|a| a.reward)
            .map(|m| m.mean);
        let ceiling = r
            .goal
            .iter()
            .find(|g| &g.scenario == sc)
            .and_then(|g| g.ceiling);
        let target = measured.map(super::goal_target);
        let _ = writeln!(
            md,
            "| {sc} | {} | {} | {} | {} | {} | {} | {} |",
            f(stat),
            f(oracle),
            gain(stat, oracle),
            f(measured),
            f(ceiling),
            gain(measured, ceiling),
            f(target)
        );
    }
    md.push('\n');

    let _ = writeln!(md, "## Machine load\n");
    let la = |l: &Option<[f64; 3]>| match l {
        Some(l) => format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2]),
        None => "unknown".into(),
    };
    let _ = writeln!(
        md,
        "Load average (1/5/15 min) before: {}, after: {}. One VM at a time (`--jobs 1`) on a \
         {}-CPU machine that other work may share: a load well above 2 means the figures, \
         especially throughput and latency, are noisier than the intervals suggest.\n",
        la(&r.loadavg_before),
        la(&r.loadavg_after),
        r.meta.host.cpus
    );
    let _ = writeln!(
        md,
        "Estimated wall time of a full run (default settings, 150-configuration sweep, 4 \
         scenarios x 5 seeds) from this run's per-run overhead: {}.\n",
        secs(r.full_run_estimate_s)
    );
    let failed_runs: Vec<_> = r.runs.iter().filter(|x| x.error.is_some()).collect();
    if !failed_runs.is_empty() {
        let _ = writeln!(md, "## Runs with errors\n");
        for f in failed_runs {
            let _ = writeln!(
                md,
                "- {} seed {} {}: {}",
                f.scenario,
                f.seed,
                f.policy.name(),
                f.error.as_deref().unwrap_or("")
            );
        }
        md.push('\n');
    }
    md
}

/// Writes `results.json` and `report.md` into `out_dir`.
pub fn write(r: &TunerReport, out_dir: &Path) -> Result<(), BenchError> {
    crate::report::write_json(out_dir, "results", r)?;
    let path = out_dir.join("report.md");
    std::fs::write(&path, render(r))
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))
}
