//! Boot latency: from spawning the monitor to the guest's first serial byte on stdout, and
//! to the monitor's exit; `vmm` against QEMU `microvm` on the same kernel, interleaved.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::bare;
use crate::child::{run_timed, Timed};
use crate::error::BenchError;
use crate::qemu::{self, Qemu};
use crate::report::{ms, ratio, Meta};
use crate::stats::{summarize, Summary};

/// What the `hello` kernel prints.
pub const HELLO_OUTPUT: &str = "Hello from test kernel\n";

/// Settings of the boot benchmark.
#[derive(Debug, Clone)]
pub struct BootSettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The kernel (normally `hello`).
    pub kernel: PathBuf,
    /// The exact stdout the kernel should produce.
    pub expected_output: String,
    /// Measured runs of each side.
    pub runs: usize,
    /// Unmeasured runs of each side first (page cache, dynamic loader).
    pub warmup: usize,
    /// QEMU, or why it is not compared.
    pub qemu: Result<Qemu, String>,
    /// Where the PVH-wrapped kernel is written.
    pub out_dir: PathBuf,
    /// Per-run limit.
    pub timeout: Duration,
}

/// One run's times in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BootSample {
    /// Spawn to the first byte on stdout.
    pub first_byte_ms: f64,
    /// Spawn to the process's exit.
    pub exit_ms: f64,
}

/// One side's results.
#[derive(Debug, Clone, Serialize)]
pub struct SideResult {
    /// The command that was timed.
    pub command: String,
    /// The exit status every run had.
    pub exit_status: i32,
    /// Spawn to first serial byte.
    pub first_byte_ms: Summary,
    /// Spawn to exit.
    pub exit_ms: Summary,
    /// Every measured run, in order.
    pub samples: Vec<BootSample>,
}

/// QEMU's side: its results, or why there are none.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum QemuSide {
    /// Measured.
    Measured {
        /// QEMU's version line.
        version: String,
        /// How the kernel reached QEMU.
        loading: String,
        /// The results.
        #[serde(flatten)]
        result: SideResult,
    },
    /// Not measured.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// The floor on this host: the same kernel booted in-process by the bare kvm-ioctls loop
/// (no process to spawn, no dynamic loading, no devices), times from VM creation.
#[derive(Debug, Clone, Serialize)]
pub struct BareFloor {
    /// What this is.
    pub what: String,
    /// VM creation to the first serial byte.
    pub first_byte_ms: Summary,
    /// VM creation to the VM torn down (vCPU, VM fd and guest memory released).
    pub end_ms: Summary,
    /// Of which `KVM_SET_USER_MEMORY_REGION` for 128 MiB of guest RAM.
    pub register_memory_ms: Summary,
    /// Of which the teardown after the guest's debug exit.
    pub teardown_ms: Summary,
}

/// The boot benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// When and where.
    pub meta: Meta,
    /// The kernel booted.
    pub kernel: String,
    /// Measured runs per side.
    pub runs: usize,
    /// Unmeasured warm-up runs per side.
    pub warmup: usize,
    /// How the sides were ordered.
    pub order: String,
    /// `vmm`'s results.
    pub vmm: SideResult,
    /// QEMU's results.
    pub qemu: QemuSide,
    /// The in-process floor.
    pub bare_floor: BareFloor,
    /// Median QEMU time over median `vmm` time, to the first byte (how many times faster).
    pub speedup_first_byte: Option<f64>,
    /// Median QEMU time over median `vmm` time, to exit.
    pub speedup_exit: Option<f64>,
}

/// One side of the comparison while it runs.
struct Side {
    name: &'static str,
    command: Box<dyn Fn() -> Command>,
    line: String,
    expected_status: i32,
    samples: Vec<BootSample>,
}

impl Side {
    fn run_once(&self, expected: &str, timeout: Duration) -> Result<BootSample, BenchError> {
        let t: Timed = run_timed(&mut (self.command)(), timeout)?;
        let out = String::from_utf8_lossy(&t.stdout);
        let status = t.status.code().unwrap_or(-1);
        if out != expected || status != self.expected_status {
            return Err(BenchError::Unexpected(format!(
                "{}: `{}` gave status {status} (expected {}) and stdout {out:?} (expected {expected:?}); stderr: {}",
                self.name,
                self.line,
                self.expected_status,
                t.stderr.trim()
            )));
        }
        let first = t.first_byte.ok_or_else(|| {
            BenchError::Unexpected(format!("{}: no output from `{}`", self.name, self.line))
        })?;
        Ok(BootSample {
            first_byte_ms: ms(first),
            exit_ms: ms(t.exit),
        })
    }

    fn result(&self) -> Result<SideResult, BenchError> {
        let pick = |f: fn(&BootSample) -> f64| {
            summarize(&self.samples.iter().map(f).collect::<Vec<_>>())
                .ok_or_else(|| BenchError::Unexpected(format!("{}: no samples", self.name)))
        };
        Ok(SideResult {
            command: self.line.clone(),
            exit_status: self.expected_status,
            first_byte_ms: pick(|s| s.first_byte_ms)?,
            exit_ms: pick(|s| s.exit_ms)?,
            samples: self.samples.clone(),
        })
    }
}

fn shell_line(program: &Path, args: &[String]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the boot benchmark.
pub fn run(s: &BootSettings) -> Result<BootReport, BenchError> {
    let meta = Meta::now("boot");
    let vmm_args = vec![
        "run".to_string(),
        "--kernel".to_string(),
        s.kernel.display().to_string(),
    ];
    let vmm_bin = s.vmm.clone();
    let args = vmm_args.clone();
    let mut sides = vec![Side {
        name: "vmm",
        command: Box::new(move || {
            let mut c = Command::new(&vmm_bin);
            c.args(&args);
            c
        }),
        line: shell_line(&s.vmm, &vmm_args),
        expected_status: 0,
        samples: Vec::new(),
    }];
    let mut qemu_unavailable = None;
    let mut qemu_version = String::new();
    match &s.qemu {
        Ok(q) => {
            let wrapped = qemu::wrap_kernel(&s.kernel, "", &s.out_dir, "")?;
            let q2 = q.clone();
            let w2 = wrapped.clone();
            qemu_version = q.version.clone();
            sides.push(Side {
                name: "qemu",
                command: Box::new(move || q2.command(&w2)),
                line: q.command_line(&wrapped),
                expected_status: qemu::debug_exit_status(0),
                samples: Vec::new(),
            });
        }
        Err(reason) => qemu_unavailable = Some(reason.clone()),
    }

    for i in 0..s.warmup {
        for side in &sides {
            eprintln!("boot: warm-up {} of {}: {}", i + 1, s.warmup, side.name);
            side.run_once(&s.expected_output, s.timeout)?;
        }
    }
    // ABBA: alternate which side goes first, so drift on the machine hits both alike.
    let mut floor: Vec<[f64; 4]> = Vec::new();
    for i in 0..s.runs {
        let n = sides.len();
        for k in 0..n {
            let idx = if i % 2 == 0 { k } else { n - 1 - k };
            let sample = sides[idx].run_once(&s.expected_output, s.timeout)?;
            sides[idx].samples.push(sample);
        }
        let r = bare::run(&s.kernel, "", 128, s.timeout)?;
        if String::from_utf8_lossy(&r.serial) != s.expected_output || r.exit_code != 0 {
            return Err(BenchError::Unexpected(format!(
                "bare loop: exit code {} and serial output {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.serial)
            )));
        }
        let first = r.first_serial.unwrap_or(r.wall);
        floor.push([
            ms(first),
            ms(r.end),
            ms(r.register_memory),
            ms(r.end.saturating_sub(r.wall)),
        ]);
        let last: Vec<String> = sides
            .iter()
            .filter_map(|sd| {
                sd.samples
                    .last()
                    .map(|x| format!("{} {:.1}/{:.1} ms", sd.name, x.first_byte_ms, x.exit_ms))
            })
            .collect();
        eprintln!(
            "boot: run {:>2}/{} (first byte/exit): {}",
            i + 1,
            s.runs,
            last.join(", ")
        );
    }

    let col = |k: usize| {
        summarize(&floor.iter().map(|x| x[k]).collect::<Vec<_>>())
            .ok_or_else(|| BenchError::Unexpected("bare loop: no samples".into()))
    };
    let bare_floor = BareFloor {
        what: "the same kernel in the bare kvm-ioctls loop inside vmm-bench, 128 MiB, one \
               run after each vmm/qemu pair; times from VM creation (no spawn, exec or \
               dynamic loading)"
            .into(),
        first_byte_ms: col(0)?,
        end_ms: col(1)?,
        register_memory_ms: col(2)?,
        teardown_ms: col(3)?,
    };
    let vmm = sides[0].result()?;
    let qemu = match (sides.get(1), qemu_unavailable) {
        (Some(side), _) => QemuSide::Measured {
            version: qemu_version,
            loading: "PVH: the test kernel's PT_LOAD segments unchanged, plus a 23-instruction \
                      shim segment (32-bit PVH entry -> 64-bit long mode, the vmm boot state) \
                      named by a Xen PHYS32_ENTRY note; QEMU's microvm firmware (qboot) \
                      loads it from fw_cfg"
                .into(),
            result: side.result()?,
        },
        (None, Some(reason)) => QemuSide::Unavailable { reason },
        (None, None) => QemuSide::Unavailable {
            reason: "not run".into(),
        },
    };
    let (speedup_first_byte, speedup_exit) = match &qemu {
        QemuSide::Measured { result, .. } => (
            ratio(result.first_byte_ms.median, vmm.first_byte_ms.median),
            ratio(result.exit_ms.median, vmm.exit_ms.median),
        ),
        QemuSide::Unavailable { .. } => (None, None),
    };
    Ok(BootReport {
        meta,
        kernel: s.kernel.display().to_string(),
        runs: s.runs,
        warmup: s.warmup,
        order: "interleaved, ABBA (vmm first in even runs, qemu first in odd runs)".into(),
        vmm,
        qemu,
        bare_floor,
        speedup_first_byte,
        speedup_exit,
    })
}
