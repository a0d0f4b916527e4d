//! A human-readable table of the latest result files.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::error::BenchError;

fn load(dir: &Path, name: &str) -> Result<Option<Value>, BenchError> {
    let path = dir.join(format!("{name}.json"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BenchError::io(format!("reading {}", path.display()), e)),
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or("?")
}

fn f(x: Option<f64>, digits: usize) -> String {
    x.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

/// Median [p10, p90] of a summary object at `path`.
fn spread(v: &Value, path: &[&str], digits: usize) -> String {
    let get = |k: &str| {
        let mut p = path.to_vec();
        p.push(k);
        num(v, &p)
    };
    format!(
        "{} [{} - {}]",
        f(get("median"), digits),
        f(get("p10"), digits),
        f(get("p90"), digits)
    )
}

/// The summary of the result files in `dir`.
pub fn render(dir: &Path) -> Result<String, BenchError> {
    let mut s = String::new();
    let _ = writeln!(s, "vmm benchmarks (result files in {})", dir.display());
    if let Some(b) = load(dir, "boot")? {
        let _ = writeln!(
            s,
            "\nBoot latency, {} ({}, {} runs/side, median [p10 - p90] ms)",
            text(&b, &["kernel"]).rsplit('/').next().unwrap_or("?"),
            text(&b, &["meta", "date_utc"]),
            f(num(&b, &["runs"]), 0)
        );
        let _ = writeln!(
            s,
            "  vmm   first byte {:<26} exit {}",
            spread(&b, &["vmm", "first_byte_ms"], 1),
            spread(&b, &["vmm", "exit_ms"], 1)
        );
        if text(&b, &["qemu", "status"]) == "measured" {
            let _ = writeln!(
                s,
                "  qemu  first byte {:<26} exit {}",
                spread(&b, &["qemu", "first_byte_ms"], 1),
                spread(&b, &["qemu", "exit_ms"], 1)
            );
            let _ = writeln!(
                s,
                "  vmm is {}x faster to the first byte, {}x to exit (QEMU median / vmm median)",
                f(num(&b, &["speedup_first_byte"]), 1),
                f(num(&b, &["speedup_exit"]), 1)
            );
        } else {
            let _ = writeln!(s, "  qemu  not measured: {}", text(&b, &["qemu", "reason"]));
        }
        let _ = writeln!(
            s,
            "  floor (bare KVM loop in-process, from VM creation): first byte {}, torn down {}",
            spread(&b, &["bare_floor", "first_byte_ms"], 1),
            spread(&b, &["bare_floor", "end_ms"], 1)
        );
        let _ = writeln!(
            s,
            "        of which registering 128 MiB with KVM {} and teardown {}",
            spread(&b, &["bare_floor", "register_memory_ms"], 1),
            spread(&b, &["bare_floor", "teardown_ms"], 1)
        );
    }
    if let Some(p) = load(dir, "pio")? {
        let _ = writeln!(
            s,
            "\nPort-I/O exit round trip, pio-bench count={} ({}, {} runs/side, ns per exit, median [p10 - p90])",
            f(num(&p, &["count"]), 0),
            text(&p, &["meta", "date_utc"]),
            f(num(&p, &["runs"]), 0)
        );
        let _ = writeln!(
            s,
            "  vmm   {:<24} fastest {}",
            spread(&p, &["vmm", "ns_per_exit"], 0),
            f(num(&p, &["vmm", "ns_per_exit", "min"]), 0)
        );
        let _ = writeln!(
            s,
            "  bare  {:<24} fastest {}",
            spread(&p, &["bare", "ns_per_exit"], 0),
            f(num(&p, &["bare", "ns_per_exit", "min"]), 0)
        );
        if p.get("qemu").is_some_and(|q| !q.is_null()) {
            let _ = writeln!(
                s,
                "  qemu  {:<24} fastest {}",
                spread(&p, &["qemu", "ns_per_exit"], 0),
                f(num(&p, &["qemu", "ns_per_exit", "min"]), 0)
            );
        }
        let _ = writeln!(
            s,
            "  vmm/bare: medians {}, paired rounds {}, fastest runs {}; monitor's own cost {} ns per exit (medians)",
            f(num(&p, &["ratio_vmm_over_bare"]), 3),
            f(num(&p, &["ratio_vmm_over_bare_paired_median"]), 3),
            f(num(&p, &["ratio_vmm_over_bare_min"]), 3),
            f(num(&p, &["vmm_overhead_ns"]), 0),
        );
        if p.get("qemu").is_some_and(|q| !q.is_null()) {
            let _ = writeln!(
                s,
                "  qemu/bare: medians {}, fastest runs {}",
                f(num(&p, &["ratio_qemu_over_bare"]), 3),
                f(num(&p, &["ratio_qemu_over_bare_min"]), 3)
            );
        }
    }
    if let Some(m) = load(dir, "memory")? {
        let under = m.get("under_anchor").and_then(Value::as_bool);
        let _ = writeln!(
            s,
            "\nMonitor memory, bad-loop with {} MiB of guest RAM ({})",
            f(num(&m, &["mem_mib"]), 0),
            text(&m, &["meta", "date_utc"])
        );
        let _ = writeln!(
            s,
            "  monitor RSS without guest RAM {} MiB (PSS {} MiB); Firecracker's anchor < {} MiB: {}",
            f(num(&m, &["monitor_rss_mib"]), 2),
            f(num(&m, &["monitor_pss_mib"]), 2),
            f(num(&m, &["anchor_mib"]), 0),
            match under {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "?",
            }
        );
        let _ = writeln!(
            s,
            "  whole process RSS {} MiB, of which guest RAM touched {} MiB",
            f(num(&m, &["process_rss_mib"]), 2),
            f(num(&m, &["guest_rss_mib"]), 2)
        );
    }
    if let Some(b) = load(dir, "blk")? {
        render_blk(&mut s, &b);
    }
    if let Some(r) = load(dir, "ratelimit")? {
        render_ratelimit(&mut s, &r);
    }
    if let Some(t) = load(dir, "telemetry")? {
        render_telemetry(&mut s, &t);
    }
    Ok(s)
}

fn render_blk(s: &mut String, b: &Value) {
    let qemu = text(b, &["qemu", "status"]) == "measured";
    let _ = writeln!(
        s,
        "\nvirtio-blk, blk-io on a {} MiB image, ms={} ({}, {} runs/side, medians; ratios of ops/s)",
        f(num(b, &["image_mib"]), 0),
        f(num(b, &["ms"]), 0),
        text(b, &["meta", "date_utc"]),
        f(num(b, &["runs"]), 0)
    );
    let _ = writeln!(
        s,
        "  {:<26} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "workload",
        "vmm op/s",
        "host op/s",
        "qemu op/s",
        "vmm MiB/s",
        "vmm/host",
        "paired",
        "vmm/qemu"
    );
    let empty = Vec::new();
    let results = b.get("results").and_then(Value::as_array).unwrap_or(&empty);
    for r in results {
        let _ = writeln!(
            s,
            "  {:<26} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
            text(r, &["label"]),
            f(num(r, &["vmm", "ops_per_sec", "median"]), 0),
            f(num(r, &["host", "ops_per_sec", "median"]), 0),
            f(num(r, &["qemu", "ops_per_sec", "median"]), 0),
            f(num(r, &["vmm", "mib_per_sec", "median"]), 1),
            f(num(r, &["ratio_vmm_over_host"]), 3),
            f(num(r, &["ratio_vmm_over_host_paired_median"]), 3),
            f(num(r, &["ratio_vmm_over_qemu"]), 3),
        );
    }
    if !qemu {
        let _ = writeln!(s, "  qemu not measured: {}", text(b, &["qemu", "reason"]));
    }
}

fn render_ratelimit(s: &mut String, r: &Value) {
    let _ = writeln!(
        s,
        "\nRate limiter, blk-io ms={} under vmm ({}, {} runs/setting; achieved / configured, median [min - max])",
        f(num(r, &["ms"]), 0),
        text(r, &["meta", "date_utc"]),
        f(num(r, &["runs"]), 0)
    );
    let empty = Vec::new();
    for x in r.get("results").and_then(Value::as_array).unwrap_or(&empty) {
        let limit = x
            .get("setting")
            .and_then(|st| st.get("limit"))
            .and_then(Value::as_object)
            .and_then(|o| o.iter().next())
            .map(|(k, v)| {
                let n = v.as_f64().unwrap_or(0.0);
                match k.as_str() {
                    "bytes_per_sec" => format!("bw={n:.0}"),
                    _ => format!("iops={n:.0}"),
                }
            })
            .unwrap_or_else(|| "?".into());
        let range = |k: &str| {
            format!(
                "{} [{} - {}]",
                f(num(x, &[k, "median"]), 3),
                f(num(x, &[k, "min"]), 3),
                f(num(x, &[k, "max"]), 3)
            )
        };
        let _ = writeln!(
            s,
            "  {:<12} whole run {:<24} past the first progress line {}",
            limit,
            range("accuracy"),
            range("steady_accuracy")
        );
    }
}

fn render_telemetry(s: &mut String, t: &Value) {
    let _ = writeln!(
        s,
        "\nTelemetry ({}, {} runs/side; medians, ratio to no telemetry: of medians / paired)",
        text(t, &["meta", "date_utc"]),
        f(num(t, &["runs"]), 0)
    );
    let empty = Vec::new();
    for (part, unit, digits) in [
        ("exit_round_trip", "ns/exit", 0),
        ("compute", "iterations", 0),
    ] {
        let p = t.get(part).cloned().unwrap_or(Value::Null);
        let _ = writeln!(
            s,
            "  {} ({})",
            text(&p, &["measures"]),
            text(&p, &["cmdline"])
        );
        for side in p.get("sides").and_then(Value::as_array).unwrap_or(&empty) {
            let rows = side
                .get("samples")
                .and_then(Value::as_array)
                .and_then(|v| v.last())
                .and_then(|x| x.get("rows"))
                .and_then(Value::as_u64)
                .map(|r| format!(", {r} rows in the last run"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "    {:<16} {} {unit}; ratio {} / {}{rows}",
                text(side, &["label"]),
                spread(side, &["value"], digits),
                f(num(side, &["ratio_to_off"]), 3),
                f(num(side, &["ratio_to_off_paired_median"]), 3),
            );
        }
    }
    let _ = writeln!(
        s,
        "  state repository: {} rows/s, median [min - max] {} - {} ({} runs of {} rows)",
        f(num(t, &["state_repo", "rows_per_sec", "median"]), 0),
        f(num(t, &["state_repo", "rows_per_sec", "min"]), 0),
        f(num(t, &["state_repo", "rows_per_sec", "max"]), 0),
        f(num(t, &["state_repo", "rows_per_sec", "n"]), 0),
        f(num(t, &["state_repo", "rows"]), 0)
    );
}
