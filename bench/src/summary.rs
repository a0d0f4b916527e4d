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
    Ok(s)
}
