//! virtio-blk throughput and IOPS seen from the guest: the `blk-io` test kernel's timed
//! modes under `vmm` (and QEMU `microvm` with its virtio-blk on virtio-mmio, when it can
//! be driven), against a loop in this process doing the same reads or writes on the same
//! image file with `pread`/`pwrite`; the sides are interleaved.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::child::run_timed;
use crate::error::BenchError;
use crate::pvh::CmdlineSource;
use crate::qemu::{self, Qemu};
use crate::report::{ratio, Meta};
use crate::stats::{summarize, Summary};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;

/// A timed mode of `blk-io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Sequential reads.
    SeqRead,
    /// Sequential writes.
    SeqWrite,
    /// Reads at random block offsets.
    RandRead,
    /// Writes at random block offsets.
    RandWrite,
}

impl Mode {
    /// The `mode=` value.
    pub fn name(self) -> &'static str {
        match self {
            Mode::SeqRead => "seqread",
            Mode::SeqWrite => "seqwrite",
            Mode::RandRead => "randread",
            Mode::RandWrite => "randwrite",
        }
    }

    /// Whether the mode writes.
    pub fn writes(self) -> bool {
        matches!(self, Mode::SeqWrite | Mode::RandWrite)
    }

    /// Whether the offsets are random.
    pub fn random(self) -> bool {
        matches!(self, Mode::RandRead | Mode::RandWrite)
    }
}

/// One workload: a mode, a request size and the requests the guest keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The mode.
    pub mode: Mode,
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight in the guest.
    pub depth: u32,
}

impl Workload {
    /// `seqread bs=65536 depth=8`.
    pub fn label(&self) -> String {
        format!("{} bs={} depth={}", self.mode.name(), self.bs, self.depth)
    }

    /// The `blk-io` command line: this workload for `ms` over `span` sectors, with the
    /// metrics-device reports off (QEMU has no such device; both guests do the same work).
    pub fn cmdline(&self, ms: u64, span_sectors: u64) -> String {
        format!(
            "mode={} bs={} depth={} ms={ms} span={span_sectors} report_ms=0",
            self.mode.name(),
            self.bs,
            self.depth
        )
    }
}

/// The workloads of the benchmark: 64 KiB sequential at depth 8, 4 KiB random at depths
/// 1 and 16.
pub const WORKLOADS: [Workload; 6] = [
    Workload {
        mode: Mode::SeqRead,
        bs: 65536,
        depth: 8,
    },
    Workload {
        mode: Mode::SeqWrite,
        bs: 65536,
        depth: 8,
    },
    Workload {
        mode: Mode::RandRead,
        bs: 4096,
        depth: 1,
    },
    Workload {
        mode: Mode::RandRead,
        bs: 4096,
        depth: 16,
    },
    Workload {
        mode: Mode::RandWrite,
        bs: 4096,
        depth: 1,
    },
    Workload {
        mode: Mode::RandWrite,
        bs: 4096,
        depth: 16,
    },
];

/// The result line of a `blk-io` timed mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlkLine {
    /// `mode=`.
    pub mode: String,
    /// `bs=`.
    pub bs: u64,
    /// `depth=`.
    pub depth: u64,
    /// `ms=`: time to the last completion.
    pub ms: u64,
    /// `ops=`: requests completed OK.
    pub ops: u64,
    /// `bytes=`.
    pub bytes: u64,
    /// `ops_per_sec=`.
    pub ops_per_sec: u64,
    /// `bytes_per_sec=`.
    pub bytes_per_sec: u64,
    /// `errors=`.
    pub errors: u64,
}

fn words(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|w| w.split_once('='))
}

/// Parses `blk-io: mode=<m> bs=.. depth=.. ms=.. ops=.. bytes=.. ops_per_sec=..
/// bytes_per_sec=.. errors=..` out of a guest's output.
pub fn parse_blk_line(output: &str) -> Option<BlkLine> {
    let line = output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("blk-io:"))
        .find(|l| l.trim_start().starts_with("mode="))?;
    let mut mode = None;
    let mut v = [None; 8];
    const KEYS: [&str; 8] = [
        "bs",
        "depth",
        "ms",
        "ops",
        "bytes",
        "ops_per_sec",
        "bytes_per_sec",
        "errors",
    ];
    for (k, val) in words(line) {
        if k == "mode" {
            mode = Some(val.to_string());
        } else if let Some(i) = KEYS.iter().position(|x| *x == k) {
            v[i] = Some(val.parse::<u64>().ok()?);
        }
    }
    Some(BlkLine {
        mode: mode?,
        bs: v[0]?,
        depth: v[1]?,
        ms: v[2]?,
        ops: v[3]?,
        bytes: v[4]?,
        ops_per_sec: v[5]?,
        bytes_per_sec: v[6]?,
        errors: v[7]?,
    })
}

/// One `blk-io: progress t_ms=<t> ops=<n> bytes=<b>` line (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Time since the start of the timed part, ms.
    pub t_ms: u64,
    /// Requests completed so far.
    pub ops: u64,
    /// Bytes so far.
    pub bytes: u64,
}

/// The progress lines of a guest's output, in order.
pub fn parse_progress(output: &str) -> Vec<Progress> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("blk-io:"))
        .filter(|l| l.trim_start().starts_with("progress "))
        .filter_map(|l| {
            let (mut t, mut o, mut b) = (None, None, None);
            for (k, v) in words(l) {
                let v = v.parse::<u64>().ok();
                match k {
                    "t_ms" => t = v,
                    "ops" => o = v,
                    "bytes" => b = v,
                    _ => {}
                }
            }
            Some(Progress {
                t_ms: t?,
                ops: o?,
                bytes: b?,
            })
        })
        .collect()
}

/// What one guest run printed.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The result line.
    pub line: BlkLine,
    /// Progress lines, if asked for.
    pub progress: Vec<Progress>,
}

/// Runs `cmd` (a guest running `blk-io`), checks its exit status and that the result
/// line reports no errors.
pub fn run_guest(
    what: &str,
    cmd: &mut Command,
    expected_status: i32,
    timeout: Duration,
) -> Result<GuestRun, BenchError> {
    let t = run_timed(cmd, timeout)?;
    let out = String::from_utf8_lossy(&t.stdout);
    let status = t.status.code().unwrap_or(-1);
    match parse_blk_line(&out) {
        Some(line) if status == expected_status && line.errors == 0 => Ok(GuestRun {
            line,
            progress: parse_progress(&out),
        }),
        _ => Err(BenchError::Unexpected(format!(
            "{what}: status {status} (expected {expected_status}), stdout {out:?}, stderr {:?}",
            t.stderr.trim()
        ))),
    }
}

/// The `vmm run` arguments for `blk-io` on one drive.
pub fn vmm_args(kernel: &Path, drive: &str, cmdline: &str, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--mem-mib".into(),
        "128".into(),
        "--drive".into(),
        drive.into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    a.extend(extra.iter().cloned());
    a
}

/// Writes `mib` MiB of pseudo-random data to `path` (replacing it), then syncs it: the
/// file's pages are then in the page cache and clean, as after any fresh write.
pub fn prepare_image(path: &Path, mib: u64) -> Result<(), BenchError> {
    let err = |e| BenchError::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::File::create(path).map_err(err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..mib {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&xorshift(&mut x).to_le_bytes());
        }
        f.write_all(&buf).map_err(err)?;
    }
    f.sync_all().map_err(err)?;
    Ok(())
}

/// Makes sure `path` holds `mib` MiB; writes it if it does not.
pub fn ensure_image(path: &Path, mib: u64) -> Result<(), BenchError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == mib << 20 => Ok(()),
        _ => prepare_image(path, mib),
    }
}

/// One step of xorshift64 (state must be non-zero).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One run of any side, in the guest's terms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BlkSample {
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Elapsed time, ms.
    pub ms: f64,
    /// Requests per second.
    pub ops_per_sec: f64,
    /// Bytes per second.
    pub bytes_per_sec: f64,
}

impl From<&BlkLine> for BlkSample {
    fn from(l: &BlkLine) -> Self {
        Self {
            ops: l.ops,
            bytes: l.bytes,
            ms: l.ms as f64,
            ops_per_sec: l.ops_per_sec as f64,
            bytes_per_sec: l.bytes_per_sec as f64,
        }
    }
}

/// The host side: one thread doing `w`'s requests on `path` with `pread`/`pwrite` (one at
/// a time) for `duration`, over the first `span_bytes` of the file: sequential blocks
/// from 0 wrapping around, or blocks drawn by xorshift64, as the guest does.
pub fn host_run(
    path: &Path,
    w: &Workload,
    span_bytes: u64,
    duration: Duration,
    seed: u64,
) -> Result<BlkSample, BenchError> {
    let file = OpenOptions::new()
        .read(true)
        .write(w.mode.writes())
        .open(path)
        .map_err(|e| BenchError::io(format!("opening {}", path.display()), e))?;
    let blocks = (span_bytes / w.bs).max(1);
    let mut buf = vec![0u8; w.bs as usize];
    let mut rng = seed | 1;
    if w.mode.writes() {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&xorshift(&mut rng).to_le_bytes());
        }
    }
    let (mut next, mut ops) = (0u64, 0u64);
    let t0 = Instant::now();
    let elapsed = loop {
        let block = if w.mode.random() {
            xorshift(&mut rng) % blocks
        } else {
            let b = next;
            next = (next + 1) % blocks;
            b
        };
        let offset = block * w.bs;
        let r = if w.mode.writes() {
            // Stamp the buffer as the guest stamps its sectors, so no two writes match.
            buf[..8].copy_from_slice(&ops.to_le_bytes());
            file.write_all_at(&buf, offset)
        } else {
            file.read_exact_at(&mut buf, offset)
        };
        r.map_err(|e| BenchError::io(format!("host {} at {offset}", w.mode.name()), e))?;
        ops += 1;
        let e = t0.elapsed();
        if e >= duration {
            break e;
        }
    };
    let secs = elapsed.as_secs_f64();
    Ok(BlkSample {
        ops,
        bytes: ops * w.bs,
        ms: secs * 1e3,
        ops_per_sec: ops as f64 / secs,
        bytes_per_sec: (ops * w.bs) as f64 / secs,
    })
}

/// Settings of the virtio-blk benchmark.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `blk-io` kernel.
    pub kernel: PathBuf,
    /// The image file (written afresh).
    pub image: PathBuf,
    /// Its size in MiB.
    pub image_mib: u64,
    /// Duration of every run, ms.
    pub ms: u64,
    /// Runs of each side of each workload.
    pub runs: usize,
    /// The workloads.
    pub workloads: Vec<Workload>,
    /// QEMU as a third side, or why not.
    pub qemu: Result<Qemu, String>,
    /// Where the PVH-wrapped kernel is written.
    pub out_dir: PathBuf,
}

/// One side of one workload.
#[derive(Debug, Clone, Serialize)]
pub struct BlkSide {
    /// What ran.
    pub what: String,
    /// Requests per second.
    pub ops_per_sec: Summary,
    /// MiB per second.
    pub mib_per_sec: Summary,
    /// Every run, in order.
    pub samples: Vec<BlkSample>,
}

fn side(what: String, samples: Vec<BlkSample>) -> Result<BlkSide, BenchError> {
    let none = || BenchError::Unexpected(format!("{what}: no samples"));
    let ops: Vec<f64> = samples.iter().map(|s| s.ops_per_sec).collect();
    let mib: Vec<f64> = samples
        .iter()
        .map(|s| s.bytes_per_sec / 1048576.0)
        .collect();
    Ok(BlkSide {
        ops_per_sec: summarize(&ops).ok_or_else(none)?,
        mib_per_sec: summarize(&mib).ok_or_else(none)?,
        what,
        samples,
    })
}

/// Median of the ratios of runs made in the same round.
fn paired(a: &[BlkSample], b: &[BlkSample]) -> Option<f64> {
    let r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| ratio(x.ops_per_sec, y.ops_per_sec))
        .collect();
    summarize(&r).map(|s| s.median)
}

/// One workload's results. Ratios are of requests per second (the same as of bytes per
/// second, the request size being fixed).
#[derive(Debug, Clone, Serialize)]
pub struct BlkResult {
    /// The workload.
    pub workload: Workload,
    /// `seqread bs=65536 depth=8`.
    pub label: String,
    /// `vmm run --kernel blk-io`.
    pub vmm: BlkSide,
    /// The pread/pwrite loop in this process.
    pub host: BlkSide,
    /// QEMU microvm, if it could drive the device.
    pub qemu: Option<BlkSide>,
    /// Median `vmm` over median host.
    pub ratio_vmm_over_host: Option<f64>,
    /// Median of the per-round `vmm`/host ratios.
    pub ratio_vmm_over_host_paired_median: Option<f64>,
    /// Median QEMU over median host.
    pub ratio_qemu_over_host: Option<f64>,
    /// Median `vmm` over median QEMU.
    pub ratio_vmm_over_qemu: Option<f64>,
    /// Median of the per-round `vmm`/QEMU ratios.
    pub ratio_vmm_over_qemu_paired_median: Option<f64>,
}

/// Whether QEMU's side ran.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum QemuBlk {
    /// It ran; how it was set up.
    Measured {
        /// `--version`.
        version: String,
        /// How the device and the kernel command line were given.
        setup: String,
    },
    /// It did not run.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// The virtio-blk benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct BlkReport {
    /// When and where.
    pub meta: Meta,
    /// The image file.
    pub image: String,
    /// Its size in MiB.
    pub image_mib: u64,
    /// Duration of every run, ms.
    pub ms: u64,
    /// Runs per side and workload.
    pub runs: usize,
    /// How the runs were ordered.
    pub order: String,
    /// What the host side does.
    pub host_loop: String,
    /// QEMU's status.
    pub qemu: QemuBlk,
    /// One entry per workload.
    pub results: Vec<BlkResult>,
}

/// The QEMU arguments (after the common ones) that add the drive and pass `cmdline`.
fn qemu_extra(image: &Path, cmdline: &str) -> Vec<String> {
    vec![
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-drive".into(),
        format!(
            "id=d0,file={},format=raw,if=none,cache=writeback,aio=threads",
            image.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
        "-append".into(),
        cmdline.into(),
    ]
}

/// QEMU's `-M`: no ACPI, so that microvm appends the `virtio_mmio.device=` words.
pub const QEMU_MACHINE: &str = "microvm,acpi=off,auto-kernel-cmdline=on";

/// Boots `blk-io mode=capacity` under QEMU: `Ok(())` if the kernel found and drove the
/// device, else why not.
fn probe_qemu(q: &Qemu, kernel: &Path, image: &Path, span: u64) -> Result<(), String> {
    let mut cmd = q.command_with(kernel, QEMU_MACHINE, &qemu_extra(image, "mode=capacity"));
    let t = run_timed(&mut cmd, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let out = String::from_utf8_lossy(&t.stdout);
    let want = format!("blk-io: capacity={span} ro=0");
    if t.status.code() == Some(qemu::debug_exit_status(0)) && out.contains(&want) {
        Ok(())
    } else {
        Err(format!(
            "blk-io mode=capacity under QEMU gave status {:?} and output {:?} (stderr {:?})",
            t.status.code(),
            out.trim(),
            t.stderr.trim()
        ))
    }
}

/// Runs the virtio-blk benchmark.
pub fn run(s: &BlkSettings) -> Result<BlkReport, BenchError> {
    let meta = Meta::now("blk");
    eprintln!("blk: writing {} ({} MiB)", s.image.display(), s.image_mib);
    prepare_image(&s.image, s.image_mib)?;
    let span_bytes = s.image_mib << 20;
    let span = span_bytes / SECTOR;
    let timeout = Duration::from_millis(s.ms + 30_000);
    let duration = Duration::from_millis(s.ms);

    let (qemu, qemu_kernel) = match &s.qemu {
        Ok(q) => {
            let k = qemu::wrap_kernel_with(
                &s.kernel,
                "",
                CmdlineSource::PvhStartInfo,
                &s.out_dir,
                "loader-cmdline",
            )?;
            match probe_qemu(q, &k, &s.image, span) {
                Ok(()) => (
                    QemuBlk::Measured {
                        version: q.version.clone(),
                        setup: format!(
                            "-M {QEMU_MACHINE}, virtio-blk-device on a modern virtio-mmio \
                             transport (-global virtio-mmio.force-legacy=false), raw image \
                             with cache=writeback,aio=threads (QEMU's defaults: page cache, \
                             a thread pool); the kernel wrapped for PVH takes its command \
                             line from the PVH start info, i.e. -append plus the \
                             virtio_mmio.device= word QEMU appends"
                        ),
                    },
                    Some((q.clone(), k)),
                ),
                Err(reason) => {
                    eprintln!("blk: QEMU left out: {reason}");
                    (QemuBlk::Unavailable { reason }, None)
                }
            }
        }
        Err(reason) => (
            QemuBlk::Unavailable {
                reason: reason.clone(),
            },
            None,
        ),
    };

    let n = s.workloads.len();
    let mut vmm_s: Vec<Vec<BlkSample>> = vec![Vec::new(); n];
    let mut host_s: Vec<Vec<BlkSample>> = vec![Vec::new(); n];
    let mut qemu_s: Vec<Vec<BlkSample>> = vec![Vec::new(); n];
    let sides = if qemu_kernel.is_some() { 3 } else { 2 };
    let drive = format!("path={}", s.image.display());
    for round in 0..s.runs {
        for (wi, w) in s.workloads.iter().enumerate() {
            let cmdline = w.cmdline(s.ms, span);
            for k in 0..sides {
                match (round + wi + k) % sides {
                    0 => {
                        let mut c = Command::new(&s.vmm);
                        c.args(vmm_args(&s.kernel, &drive, &cmdline, &[]));
                        let r = run_guest("vmm blk-io", &mut c, 0, timeout)?;
                        vmm_s[wi].push(BlkSample::from(&r.line));
                    }
                    1 => {
                        let seed = (round * n + wi) as u64 + 1;
                        host_s[wi].push(host_run(&s.image, w, span_bytes, duration, seed)?);
                    }
                    _ => {
                        if let Some((q, k)) = &qemu_kernel {
                            let mut c =
                                q.command_with(k, QEMU_MACHINE, &qemu_extra(&s.image, &cmdline));
                            let st = qemu::debug_exit_status(0);
                            let r = run_guest("qemu blk-io", &mut c, st, timeout)?;
                            qemu_s[wi].push(BlkSample::from(&r.line));
                        }
                    }
                }
            }
            let show = |v: &Vec<BlkSample>| {
                v.last()
                    .map(|x| format!("{:.0}", x.ops_per_sec))
                    .unwrap_or_else(|| "-".into())
            };
            eprintln!(
                "blk: round {}/{} {:<28} ops/s: vmm {}, host {}, qemu {}",
                round + 1,
                s.runs,
                w.label(),
                show(&vmm_s[wi]),
                show(&host_s[wi]),
                show(&qemu_s[wi])
            );
        }
    }

    let mut results = Vec::new();
    for (wi, w) in s.workloads.iter().enumerate() {
        let cmdline = w.cmdline(s.ms, span);
        let vmm_what = format!(
            "{} {}",
            s.vmm.display(),
            vmm_args(&s.kernel, &drive, &format!("'{cmdline}'"), &[]).join(" ")
        );
        let host_what = format!(
            "one thread in vmm-bench: {} {}s of {} bytes, one at a time, on {} ({} over \
             {} MiB), for {} ms",
            if w.mode.random() {
                "random"
            } else {
                "sequential"
            },
            if w.mode.writes() { "pwrite" } else { "pread" },
            w.bs,
            s.image.display(),
            if w.mode.random() {
                "block offsets from xorshift64"
            } else {
                "blocks in order, wrapping"
            },
            s.image_mib,
            s.ms
        );
        let paired_vh = paired(&vmm_s[wi], &host_s[wi]);
        let paired_vq = paired(&vmm_s[wi], &qemu_s[wi]);
        let vmm = side(vmm_what, std::mem::take(&mut vmm_s[wi]))?;
        let host = side(host_what, std::mem::take(&mut host_s[wi]))?;
        let qemu_side = match &qemu_kernel {
            Some((q, k)) if !qemu_s[wi].is_empty() => Some(side(
                q.command_line_with(k, QEMU_MACHINE, &qemu_extra(&s.image, &cmdline)),
                std::mem::take(&mut qemu_s[wi]),
            )?),
            _ => None,
        };
        let med = |x: &BlkSide| x.ops_per_sec.median;
        results.push(BlkResult {
            workload: *w,
            label: w.label(),
            ratio_vmm_over_host: ratio(med(&vmm), med(&host)),
            ratio_vmm_over_host_paired_median: paired_vh,
            ratio_qemu_over_host: qemu_side.as_ref().and_then(|q| ratio(med(q), med(&host))),
            ratio_vmm_over_qemu: qemu_side.as_ref().and_then(|q| ratio(med(&vmm), med(q))),
            ratio_vmm_over_qemu_paired_median: qemu_side.as_ref().and(paired_vq),
            vmm,
            host,
            qemu: qemu_side,
        });
    }
    Ok(BlkReport {
        meta,
        image: s.image.display().to_string(),
        image_mib: s.image_mib,
        ms: s.ms,
        runs: s.runs,
        order: "rounds over the workloads; in each, the sides in an order rotating with the \
                round and the workload"
            .into(),
        host_loop: "one thread, one request at a time (pread/pwrite of the same size at the \
                    same kind of offsets), same file, same page cache (neither side uses \
                    O_DIRECT), timed with the monotonic clock; the guests time themselves \
                    with the TSC"
            .into(),
        qemu,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_and_progress_lines() {
        let out = "blk-io: progress t_ms=500 ops=10 bytes=655360\n\
                   blk-io: progress t_ms=1000 ops=20 bytes=1310720\n\
                   blk-io: mode=seqread bs=65536 depth=4 ms=3029 ops=382 bytes=25034752 \
                   ops_per_sec=126 bytes_per_sec=8263453 errors=0\n";
        let l = parse_blk_line(out).expect("result line");
        assert_eq!(l.mode, "seqread");
        assert_eq!((l.bs, l.depth, l.ms, l.ops), (65536, 4, 3029, 382));
        assert_eq!((l.bytes, l.ops_per_sec), (25_034_752, 126));
        assert_eq!((l.bytes_per_sec, l.errors), (8_263_453, 0));
        let p = parse_progress(out);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[1],
            Progress {
                t_ms: 1000,
                ops: 20,
                bytes: 1_310_720
            }
        );
        assert_eq!(parse_blk_line("blk-io: capacity=8 ro=0\n"), None);
        assert_eq!(parse_blk_line("blk-io: mode=seqread bs=x\n"), None);
    }

    #[test]
    fn host_loop_moves_whole_blocks() {
        let dir = std::env::temp_dir().join(format!("vmm-bench-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let img = dir.join("t.img");
        prepare_image(&img, 1).expect("image");
        for mode in [Mode::SeqRead, Mode::RandWrite] {
            let w = Workload {
                mode,
                bs: 4096,
                depth: 1,
            };
            let s = host_run(&img, &w, 1 << 20, Duration::from_millis(20), 7).expect("run");
            assert!(s.ops > 0);
            assert_eq!(s.bytes, s.ops * 4096);
            assert!(s.ms >= 20.0);
        }
        assert_eq!(std::fs::metadata(&img).map(|m| m.len()).ok(), Some(1 << 20));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cmdlines_name_every_parameter() {
        let w = WORKLOADS[3];
        assert_eq!(
            w.cmdline(2000, 524_288),
            "mode=randread bs=4096 depth=16 ms=2000 span=524288 report_ms=0"
        );
        assert_eq!(w.label(), "randread bs=4096 depth=16");
    }
}
