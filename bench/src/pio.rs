//! Port-I/O exit round trip: the `pio-bench` kernel times N `out`s to port 0x80 itself
//! (TSC) under `vmm`, under the bare kvm-ioctls loop of [`crate::bare`] (the physical limit
//! on this host), and under QEMU `microvm` when it is installed; the sides are interleaved.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::bare;
use crate::child::run_timed;
use crate::error::BenchError;
use crate::qemu::{self, Qemu};
use crate::report::{ms, ratio, Meta};
use crate::stats::{summarize, Summary};

/// Settings of the port-I/O benchmark.
#[derive(Debug, Clone)]
pub struct PioSettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `pio-bench` kernel.
    pub kernel: PathBuf,
    /// Exits per run.
    pub count: u64,
    /// Runs of each side.
    pub runs: usize,
    /// Guest memory of the bare VM in MiB (as `vmm`'s default).
    pub mem_mib: u64,
    /// QEMU as a third side, or why not.
    pub qemu: Result<Qemu, String>,
    /// Where the PVH-wrapped kernel is written.
    pub out_dir: PathBuf,
}

/// What `pio-bench` printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PioLine {
    /// Exits timed.
    pub count: u64,
    /// Total guest time in ns.
    pub ns: u64,
    /// Average per exit in ns.
    pub ns_per_exit: u64,
}

/// Parses `pio-bench: count=<N> ns=<total> ns_per_exit=<avg>` out of a kernel's output.
pub fn parse_pio_line(output: &str) -> Option<PioLine> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("pio-bench:"))?;
    let mut count = None;
    let mut ns = None;
    let mut per = None;
    for word in line.split_whitespace() {
        let (k, v) = word.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "count" => count = Some(v),
            "ns" => ns = Some(v),
            "ns_per_exit" => per = Some(v),
            _ => {}
        }
    }
    Some(PioLine {
        count: count?,
        ns: ns?,
        ns_per_exit: per?,
    })
}

/// One run of one side.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PioSample {
    /// The guest's own figures.
    #[serde(flatten)]
    pub line: PioLine,
    /// Wall time of the whole run (process or VM), for orientation.
    pub wall_ms: f64,
}

/// One side's results.
#[derive(Debug, Clone, Serialize)]
pub struct PioSide {
    /// What ran.
    pub what: String,
    /// Guest-measured ns per exit.
    pub ns_per_exit: Summary,
    /// Every run, in order.
    pub samples: Vec<PioSample>,
}

/// The port-I/O benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct PioReport {
    /// When and where.
    pub meta: Meta,
    /// Exits per run.
    pub count: u64,
    /// Runs per side.
    pub runs: usize,
    /// How the sides were ordered.
    pub order: String,
    /// `vmm run --kernel pio-bench`.
    pub vmm: PioSide,
    /// The bare kvm-ioctls loop in this process.
    pub bare: PioSide,
    /// QEMU microvm, if installed.
    pub qemu: Option<PioSide>,
    /// Why QEMU was not run, if it was not.
    pub qemu_unavailable: Option<String>,
    /// Median `vmm` ns/exit over median bare ns/exit.
    pub ratio_vmm_over_bare: Option<f64>,
    /// Median of the per-round `vmm`/bare ratios (each pair ran back to back).
    pub ratio_vmm_over_bare_paired_median: Option<f64>,
    /// Fastest `vmm` run over fastest bare run: on a loaded machine the least disturbed
    /// runs are the closest to the true cost.
    pub ratio_vmm_over_bare_min: Option<f64>,
    /// Median QEMU ns/exit over median bare ns/exit.
    pub ratio_qemu_over_bare: Option<f64>,
    /// Fastest QEMU run over fastest bare run.
    pub ratio_qemu_over_bare_min: Option<f64>,
    /// Median `vmm` ns/exit minus median bare ns/exit: the monitor's own cost per exit.
    pub vmm_overhead_ns: Option<f64>,
}

fn check_count(what: &str, line: PioLine, count: u64) -> Result<PioLine, BenchError> {
    if line.count != count {
        return Err(BenchError::Unexpected(format!(
            "{what}: pio-bench reported count={} instead of {count}",
            line.count
        )));
    }
    Ok(line)
}

fn run_child(
    what: &str,
    mut cmd: Command,
    expected_status: i32,
    count: u64,
    timeout: Duration,
) -> Result<PioSample, BenchError> {
    let t = run_timed(&mut cmd, timeout)?;
    let out = String::from_utf8_lossy(&t.stdout);
    let status = t.status.code().unwrap_or(-1);
    let line = parse_pio_line(&out).filter(|_| status == expected_status);
    match line {
        Some(line) => Ok(PioSample {
            line: check_count(what, line, count)?,
            wall_ms: ms(t.exit),
        }),
        None => Err(BenchError::Unexpected(format!(
            "{what}: status {status} (expected {expected_status}), stdout {out:?}, stderr {:?}",
            t.stderr.trim()
        ))),
    }
}

fn side(what: String, samples: Vec<PioSample>) -> Result<PioSide, BenchError> {
    let per: Vec<f64> = samples.iter().map(|s| s.line.ns_per_exit as f64).collect();
    let ns_per_exit =
        summarize(&per).ok_or_else(|| BenchError::Unexpected(format!("{what}: no samples")))?;
    Ok(PioSide {
        what,
        ns_per_exit,
        samples,
    })
}

/// Runs the port-I/O benchmark.
pub fn run(s: &PioSettings) -> Result<PioReport, BenchError> {
    let meta = Meta::now("pio");
    let cmdline = format!("count={}", s.count);
    // Generous: 1 ms per exit (30x this host's cost) plus start-up.
    let timeout = Duration::from_millis(s.count.saturating_add(30_000));
    let qemu_kernel = match &s.qemu {
        Ok(_) => Some(qemu::wrap_kernel(
            &s.kernel,
            &cmdline,
            &s.out_dir,
            &format!("count{}", s.count),
        )?),
        Err(_) => None,
    };
    let vmm_what = format!(
        "{} run --kernel {} --cmdline {cmdline}",
        s.vmm.display(),
        s.kernel.display()
    );
    let bare_what = format!(
        "bare kvm-ioctls loop in vmm-bench, {} MiB, kernel {} with {cmdline}",
        s.mem_mib,
        s.kernel.display()
    );
    let qemu_what = match (&s.qemu, &qemu_kernel) {
        (Ok(q), Some(k)) => q.command_line(k),
        _ => String::new(),
    };

    let (mut vmm_s, mut bare_s, mut qemu_s) = (Vec::new(), Vec::new(), Vec::new());
    let sides = if qemu_kernel.is_some() { 3 } else { 2 };
    for round in 0..s.runs {
        // Rotate the order each round: every side goes first, middle and last in turn.
        for k in 0..sides {
            match (round + k) % sides {
                0 => {
                    let mut c = Command::new(&s.vmm);
                    c.arg("run")
                        .arg("--kernel")
                        .arg(&s.kernel)
                        .arg("--cmdline")
                        .arg(&cmdline);
                    vmm_s.push(run_child("vmm", c, 0, s.count, timeout)?);
                }
                1 => {
                    let r = bare::run(&s.kernel, &cmdline, s.mem_mib, timeout)?;
                    let out = String::from_utf8_lossy(&r.serial);
                    let line = parse_pio_line(&out).ok_or_else(|| {
                        BenchError::Unexpected(format!("bare loop: no result line in {out:?}"))
                    })?;
                    if r.exit_code != 0 || r.post_exits != s.count {
                        return Err(BenchError::Unexpected(format!(
                            "bare loop: exit code {}, {} port 0x80 exits of {} (expected 0 and {})",
                            r.exit_code, r.post_exits, r.exits, s.count
                        )));
                    }
                    bare_s.push(PioSample {
                        line: check_count("bare loop", line, s.count)?,
                        wall_ms: ms(r.wall),
                    });
                }
                _ => {
                    if let (Ok(q), Some(k)) = (&s.qemu, &qemu_kernel) {
                        let status = qemu::debug_exit_status(0);
                        qemu_s.push(run_child("qemu", q.command(k), status, s.count, timeout)?);
                    }
                }
            }
        }
        let show = |v: &Vec<PioSample>| {
            v.last()
                .map(|x| format!("{}", x.line.ns_per_exit))
                .unwrap_or_else(|| "-".into())
        };
        eprintln!(
            "pio: round {}/{} ns_per_exit: vmm {}, bare {}, qemu {}",
            round + 1,
            s.runs,
            show(&vmm_s),
            show(&bare_s),
            show(&qemu_s)
        );
    }

    let paired: Vec<f64> = vmm_s
        .iter()
        .zip(&bare_s)
        .filter_map(|(v, b)| ratio(v.line.ns_per_exit as f64, b.line.ns_per_exit as f64))
        .collect();
    let vmm = side(vmm_what, vmm_s)?;
    let bare = side(bare_what, bare_s)?;
    let qemu = if qemu_s.is_empty() {
        None
    } else {
        Some(side(qemu_what, qemu_s)?)
    };
    Ok(PioReport {
        meta,
        count: s.count,
        runs: s.runs,
        order: "interleaved, rotating the order of the sides every round".into(),
        ratio_vmm_over_bare: ratio(vmm.ns_per_exit.median, bare.ns_per_exit.median),
        ratio_vmm_over_bare_paired_median: summarize(&paired).map(|x| x.median),
        ratio_vmm_over_bare_min: ratio(vmm.ns_per_exit.min, bare.ns_per_exit.min),
        ratio_qemu_over_bare: qemu
            .as_ref()
            .and_then(|q| ratio(q.ns_per_exit.median, bare.ns_per_exit.median)),
        ratio_qemu_over_bare_min: qemu
            .as_ref()
            .and_then(|q| ratio(q.ns_per_exit.min, bare.ns_per_exit.min)),
        vmm_overhead_ns: Some(vmm.ns_per_exit.median - bare.ns_per_exit.median),
        qemu_unavailable: s.qemu.as_ref().err().cloned(),
        vmm,
        bare,
        qemu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_result_line() {
        let out = "pio-bench: count=200000 ns=4993332759 ns_per_exit=24966\n";
        assert_eq!(
            parse_pio_line(out),
            Some(PioLine {
                count: 200_000,
                ns: 4_993_332_759,
                ns_per_exit: 24_966
            })
        );
        let warned = format!("warning: TSC kHz unknown, assuming 1 GHz\n{out}");
        assert_eq!(parse_pio_line(&warned).map(|l| l.ns_per_exit), Some(24_966));
        assert_eq!(
            parse_pio_line("pio-bench: count=x ns=1 ns_per_exit=1"),
            None
        );
        assert_eq!(parse_pio_line("Hello"), None);
    }
}
