//! `vmm-bench`: the project's benchmarks, each writing JSON to stdout and to
//! `target/bench/<name>.json`.
//!
//! - `boot`: spawn to first serial byte and to exit, `vmm` against QEMU `microvm`.
//! - `pio`: port-I/O exit round trip, `vmm` against a bare kvm-ioctls loop (and QEMU).
//! - `memory`: the monitor's resident memory beyond guest RAM.
//! - `blk`: virtio-blk throughput and IOPS from the guest, `vmm` against the host's own
//!   pread/pwrite loop on the same file (and QEMU microvm's virtio-blk).
//! - `ratelimit`: achieved over configured rate of the drive rate limiter.
//! - `telemetry`: the cost of the telemetry agent and state repository.
//! - `profile`: the guest profiler's cost on guest compute (off, 100 Hz, 1000 Hz).
//! - `decision`: the tuner's decision time and the age of the sample it decides on, on
//!   the control loop of a running VM.
//! - `repo`: the state repository's backends side by side (8 writers into SQLite and into
//!   PostgreSQL; scripts/bench-pg.sh starts a private server), and a database outage.
//! - `tuner`: tuner policies (best static, threshold, random, learned, online) on the
//!   `phased` workload suite; report, results and plots in `target/bench-tuner/`.
//! - `all`: all of them in a row; `summary`: a table of the latest result files.
//!
//! `scripts/bench.sh` builds, installs QEMU if needed and runs `all` then `summary`;
//! `BENCHMARKS.md` explains the figures.

mod bare;
mod blk;
mod boot;
mod child;
mod decision;
mod error;
mod host_plot;
mod memory;
mod pio;
mod profile;
mod pvh;
mod qemu;
mod ratelimit;
mod repo;
mod report;
mod stats;
mod summary;
mod telemetry;
mod tuner;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::error::BenchError;

#[derive(Parser)]
#[command(
    name = "vmm-bench",
    version,
    about = "Benchmarks of the vmm monitor (JSON to stdout and to <out-dir>/<name>.json)"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// The vmm binary [default: `vmm` beside this program].
    #[arg(long, global = true, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Where result files go [default: <cargo target dir>/bench].
    #[arg(long, global = true, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The QEMU binary [default: qemu-system-x86_64 on PATH].
    #[arg(long, global = true, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// QEMU's -cpu value (see BENCHMARKS.md for why it is not plain `host`).
    #[arg(long, global = true, value_name = "CPU", default_value = qemu::DEFAULT_CPU)]
    qemu_cpu: String,
    /// Leave QEMU out of the comparisons.
    #[arg(long, global = true)]
    no_qemu: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot latency of `hello`: vmm against QEMU microvm, interleaved.
    Boot(BootArgs),
    /// Port-I/O exit round trip: vmm against a bare kvm-ioctls loop (and QEMU), interleaved.
    Pio(PioArgs),
    /// The monitor's resident memory beyond guest RAM (bad-loop kernel).
    Memory(MemoryArgs),
    /// virtio-blk throughput/IOPS (blk-io): vmm against a host pread/pwrite loop (and QEMU).
    Blk(BlkArgs),
    /// Rate limiter accuracy: achieved over configured bw= and iops= (blk-io under vmm).
    Ratelimit(RateLimitArgs),
    /// Telemetry overhead: exit round trip and compute with and without the agent, and
    /// the state repository's rows per second.
    Telemetry(TelemetryArgs),
    /// Guest profiler overhead: cpu-burn iterations off, at 100 Hz and at 1000 Hz,
    /// interleaved.
    Profile(ProfileArgs),
    /// The tuner's decision time and the age of the sample it decides on (control loop).
    Decision(DecisionArgs),
    /// The state repository's backends side by side: 8 writers into SQLite and into
    /// PostgreSQL (scripts/bench-pg.sh starts a private server and runs this).
    Repo(repo::RepoArgs),
    /// Tuner policies on the phased workload suite (report.md, results.json, PNG plots).
    Tuner(TunerArgs),
    /// Every benchmark with its defaults (or --quick); JSON of all of them to stdout.
    All {
        /// A fast smoke run (one short run of everything): not for figures.
        #[arg(long)]
        quick: bool,
    },
    /// Print a table of the latest result files in the output directory.
    Summary,
    /// PNG plots of `scripts/bench-host.sh`'s results: SLO attainment per scenario and
    /// arm, cores granted per VM over time.
    HostPlot {
        /// The results [default: <out-dir>/host-all.json].
        #[arg(long, value_name = "PATH")]
        input: Option<PathBuf>,
        /// Where the PNGs go [default: <out-dir>].
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
    },
    /// Write a test kernel wrapped for QEMU's PVH boot (to rerun a comparison by hand).
    PvhWrap {
        /// The test kernel.
        #[arg(long, value_name = "PATH")]
        kernel: PathBuf,
        /// The command line to embed.
        #[arg(long, value_name = "STR", default_value = "")]
        cmdline: String,
        /// Use the loader's command line (QEMU's `-append` plus, on microvm, its
        /// `virtio_mmio.device=` words) instead of the embedded one when it passes one.
        #[arg(long)]
        loader_cmdline: bool,
        /// The output file.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct BootArgs {
    /// Measured runs of each side.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Unmeasured warm-up runs of each side.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// The kernel [default: the `hello` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct PioArgs {
    /// Runs of each side.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Port writes per run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Guest memory of the bare VM in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// The kernel [default: the `pio-bench` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct MemoryArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// vmm's --timeout-ms (samples are taken before it).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(2000..))]
    timeout_ms: u64,
    /// The kernel [default: the `bad-loop` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// One more `vmm run` argument (repeatable), e.g. the tuner on with a policy loaded:
    /// `--vmm-arg=--drive --vmm-arg=path=d.img --vmm-arg=--policy
    /// --vmm-arg=models/test-policy.onnx`.
    #[arg(long = "vmm-arg", value_name = "ARG", allow_hyphen_values = true)]
    vmm_args: Vec<String>,
}

#[derive(Args, Clone)]
struct BlkArgs {
    /// Runs of each side of each workload.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Duration of every run (blk-io ms=).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..))]
    ms: u64,
    /// Size of the image file in MiB (written afresh to <out-dir>/blk.img).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    image_mib: u64,
    /// The kernel [default: the `blk-io` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RateLimitArgs {
    /// Runs of each setting.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Duration of every run (blk-io ms=).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1000..))]
    ms: u64,
    /// Size of the image file in MiB (<out-dir>/blk.img, written if missing).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    image_mib: u64,
    /// The kernel [default: the `blk-io` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct DecisionArgs {
    /// The control loop's interval, ms.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    interval_ms: u64,
    /// How long the guest runs, s.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    seconds: u64,
    /// The policy [default: models/general.onnx of this repository].
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct TelemetryArgs {
    /// Runs of each configuration.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// pio-bench count= (port writes per run).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// cpu-burn ms=.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..))]
    burn_ms: u64,
    /// Rows written in each run of the state repository throughput test.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    repo_rows: u64,
    /// Runs of the state repository throughput test.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    repo_runs: u64,
}

#[derive(Args, Clone)]
struct ProfileArgs {
    /// Runs of each rate.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// cpu-burn ms=.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..))]
    burn_ms: u64,
}

#[derive(Args, Clone)]
struct TunerArgs {
    /// A smoke run: 1 seed, 2 scenarios, 12 static configurations, short phases.
    #[arg(long)]
    quick: bool,
    /// Output directory [default: <cargo target dir>/bench-tuner].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Seeds per scenario [default: 5, --quick 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100))]
    seeds: Option<u64>,
    /// Scenarios, comma-separated [default: all four; --quick: mixed,bursty].
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
    /// VMs run at once (only 1: the machine has 2 cores).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1))]
    jobs: u64,
    /// The learned policy [default: models/general.onnx of the repository].
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
    /// phase_ms= of the scenarios [default: 1500, --quick 1000].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(200..))]
    phase_ms: Option<u64>,
    /// phases= of the scenarios [default: 6, --quick 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    phases: Option<u64>,
    /// Length of each phase of the calibration schedule [default: 1000, --quick 800].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(300..))]
    calib_ms: Option<u64>,
    /// Predicted-best static configurations re-run on every seed [default: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10))]
    top_k: Option<u64>,
    /// The kernel [default: the `phased` test kernel].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Run no VM: re-read DIR/results.json of an earlier run and rewrite its analysis,
    /// plots and report.md with this build.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "quick", "out", "seeds", "scenarios", "policy", "phase_ms", "phases", "calib_ms",
        "top_k", "kernel",
    ])]
    reanalyse: Option<PathBuf>,
}

/// Paths and programs every benchmark uses.
struct Env {
    vmm: PathBuf,
    out_dir: PathBuf,
    qemu: Result<qemu::Qemu, String>,
}

/// Prints the tuner benchmark's goal checks on stderr.
fn report_goals(r: &tuner::TunerReport) {
    for g in &r.goal {
        eprintln!(
            "vmm-bench tuner: goal {}: {} ({})",
            g.scenario, g.verdict, g.detail
        );
    }
}

fn existing(what: &'static str, path: PathBuf, hint: &'static str) -> Result<PathBuf, BenchError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Missing { what, path, hint })
    }
}

fn kernel(explicit: &Option<PathBuf>, name: &str) -> Result<PathBuf, BenchError> {
    existing(
        "test kernel",
        explicit
            .clone()
            .unwrap_or_else(|| test_kernels::kernel_path(name)),
        "build the workspace first (cargo build --release --workspace)",
    )
}

/// `--out-dir`, or `bench/` beside the test kernels in the cargo target directory.
fn out_dir(c: &Common) -> PathBuf {
    c.out_dir.clone().unwrap_or_else(|| {
        Path::new(test_kernels::KERNELS_DIR)
            .parent()
            .map(|t| t.join("bench"))
            .unwrap_or_else(|| PathBuf::from("target/bench"))
    })
}

impl Env {
    fn new(c: &Common) -> Result<Self, BenchError> {
        let vmm = match &c.vmm {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::io("locating vmm-bench", e))?
                .with_file_name("vmm"),
        };
        let vmm = existing(
            "the vmm binary",
            vmm,
            "build it (cargo build --release --workspace) or pass --vmm",
        )?;
        let out_dir = out_dir(c);
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| BenchError::io(format!("creating {}", out_dir.display()), e))?;
        let qemu = if c.no_qemu {
            Err("left out (--no-qemu)".to_string())
        } else {
            qemu::find(c.qemu.as_deref(), &c.qemu_cpu)
        };
        if let Err(reason) = &qemu {
            eprintln!("vmm-bench: QEMU not compared: {reason}");
        }
        Ok(Self { vmm, out_dir, qemu })
    }

    fn boot(&self, a: &BootArgs) -> Result<boot::BootReport, BenchError> {
        boot::run(&boot::BootSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "hello")?,
            expected_output: boot::HELLO_OUTPUT.to_string(),
            runs: a.runs as usize,
            warmup: a.warmup as usize,
            qemu: self.qemu.clone(),
            out_dir: self.out_dir.clone(),
            timeout: Duration::from_secs(30),
        })
    }

    fn pio(&self, a: &PioArgs) -> Result<pio::PioReport, BenchError> {
        pio::run(&pio::PioSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "pio-bench")?,
            count: a.count,
            runs: a.runs as usize,
            mem_mib: a.mem_mib,
            qemu: self.qemu.clone(),
            out_dir: self.out_dir.clone(),
        })
    }

    fn memory(&self, a: &MemoryArgs) -> Result<memory::MemoryReport, BenchError> {
        let t = a.timeout_ms;
        memory::run(&memory::MemorySettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "bad-loop")?,
            mem_mib: a.mem_mib,
            timeout_ms: t,
            sample_after_ms: vec![t / 6, t / 3, t / 2],
            extra: a.vmm_args.clone(),
        })
    }

    fn blk(&self, a: &BlkArgs) -> Result<blk::BlkReport, BenchError> {
        blk::run(&blk::BlkSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "blk-io")?,
            image: ratelimit::default_image(&self.out_dir),
            image_mib: a.image_mib,
            ms: a.ms,
            runs: a.runs as usize,
            workloads: blk::WORKLOADS.to_vec(),
            qemu: self.qemu.clone(),
            out_dir: self.out_dir.clone(),
        })
    }

    fn ratelimit(&self, a: &RateLimitArgs) -> Result<ratelimit::RateLimitReport, BenchError> {
        ratelimit::run(&ratelimit::RateLimitSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "blk-io")?,
            image: ratelimit::default_image(&self.out_dir),
            image_mib: a.image_mib,
            ms: a.ms,
            progress_ms: 500,
            runs: a.runs as usize,
            settings: ratelimit::default_settings(),
        })
    }

    fn telemetry(&self, a: &TelemetryArgs) -> Result<telemetry::TelemetryReport, BenchError> {
        telemetry::run(&telemetry::TelemetrySettings {
            vmm: self.vmm.clone(),
            pio_kernel: kernel(&None, "pio-bench")?,
            burn_kernel: kernel(&None, "cpu-burn")?,
            out_dir: self.out_dir.clone(),
            runs: a.runs as usize,
            pio_count: a.count,
            burn_ms: a.burn_ms,
            repo_rows: a.repo_rows,
            repo_runs: a.repo_runs as usize,
        })
    }

    fn profile(&self, a: &ProfileArgs) -> Result<profile::ProfileReport, BenchError> {
        profile::run(&profile::ProfileSettings {
            vmm: self.vmm.clone(),
            burn_kernel: kernel(&None, "cpu-burn")?,
            runs: a.runs as usize,
            burn_ms: a.burn_ms,
        })
    }

    fn decision(&self, a: &DecisionArgs) -> Result<decision::DecisionReport, BenchError> {
        let policy = match &a.policy {
            Some(p) => p.clone(),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/general.onnx"),
        };
        decision::run(&decision::DecisionSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&None, "blk-io")?,
            policy: existing("the policy", policy, "pass --policy")?,
            scratch: self.out_dir.join("decision-scratch"),
            interval: Duration::from_millis(a.interval_ms),
            run: Duration::from_secs(a.seconds),
        })
    }

    fn tuner(&self, a: &TunerArgs) -> Result<(), BenchError> {
        if let Some(dir) = &a.reanalyse {
            let r = tuner::reanalyse(dir)?;
            report_goals(&r);
            eprintln!(
                "vmm-bench tuner: re-analysed {} runs; wrote {}/report.md, results.json and {} plots",
                r.runs.len(),
                dir.display(),
                r.plots.len()
            );
            return Ok(());
        }
        let scenarios = match &a.scenarios {
            Some(v) => v.clone(),
            None if a.quick => vec!["mixed".into(), "bursty".into()],
            None => tuner::SCENARIOS.iter().map(|s| s.to_string()).collect(),
        };
        if let Some(bad) = scenarios
            .iter()
            .find(|s| !tuner::SCENARIOS.contains(&s.as_str()))
        {
            return Err(BenchError::Unexpected(format!(
                "unknown scenario {bad:?} (expected some of {})",
                tuner::SCENARIOS.join(",")
            )));
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let out = a.out.clone().unwrap_or_else(|| {
            Path::new(test_kernels::KERNELS_DIR)
                .parent()
                .map(|t| t.join("bench-tuner"))
                .unwrap_or_else(|| PathBuf::from("target/bench-tuner"))
        });
        let settings = tuner::TunerSettings {
            vmm: self.vmm.clone(),
            kernel: kernel(&a.kernel, "phased")?,
            out_dir: out.clone(),
            scenarios,
            seeds: a.seeds.unwrap_or(if a.quick { 1 } else { 5 }),
            phase_ms: a.phase_ms.unwrap_or(if a.quick {
                1000
            } else {
                tuner::DEFAULT_PHASE_MS
            }),
            phases: a
                .phases
                .unwrap_or(if a.quick { 4 } else { tuner::DEFAULT_PHASES }),
            calib_ms: a.calib_ms.unwrap_or(if a.quick {
                800
            } else {
                tuner::DEFAULT_CALIB_MS
            }),
            sweep: if a.quick {
                tuner::StaticConfig::quick()
            } else {
                tuner::StaticConfig::all()
            },
            top_k: a.top_k.map_or(tuner::DEFAULT_TOP_K, |k| k as usize),
            policy: a
                .policy
                .clone()
                .unwrap_or_else(|| repo.join("models/general.onnx")),
            quick: a.quick,
        };
        let r = tuner::run(&settings)?;
        report_goals(&r);
        eprintln!(
            "vmm-bench tuner: done in {:.0} s (a full run: ~{:.0} s); wrote {}/report.md, results.json and {} plots",
            r.total_s,
            r.full_run_estimate_s,
            out.display(),
            r.plots.len()
        );
        Ok(())
    }

    /// Writes `<name>.json`, prints the JSON, and says where it went on stderr.
    fn emit<T: Serialize>(&self, name: &str, value: &T) -> Result<(), BenchError> {
        let (path, text) = report::write_json(&self.out_dir, name, value)?;
        println!("{text}");
        eprintln!("vmm-bench: wrote {}", path.display());
        Ok(())
    }
}

#[derive(Serialize)]
struct AllReport {
    boot: boot::BootReport,
    pio: pio::PioReport,
    memory: memory::MemoryReport,
    blk: blk::BlkReport,
    ratelimit: ratelimit::RateLimitReport,
    telemetry: telemetry::TelemetryReport,
}

fn real_main(cli: Cli) -> Result<(), BenchError> {
    if let Cmd::PvhWrap {
        kernel,
        cmdline,
        loader_cmdline,
        out,
    } = &cli.command
    {
        let elf = std::fs::read(kernel)
            .map_err(|e| BenchError::io(format!("reading {}", kernel.display()), e))?;
        let source = if *loader_cmdline {
            pvh::CmdlineSource::PvhStartInfo
        } else {
            pvh::CmdlineSource::Embedded
        };
        let w = pvh::wrap_with(&elf, cmdline, source)?;
        std::fs::write(out, &w.elf)
            .map_err(|e| BenchError::io(format!("writing {}", out.display()), e))?;
        eprintln!(
            "vmm-bench: wrote {} (PVH entry {:#x}, shim at {:#x})",
            out.display(),
            w.pvh_entry,
            w.shim_base
        );
        return Ok(());
    }
    if let Cmd::HostPlot { input, plots } = &cli.command {
        let dir = out_dir(&cli.common);
        let input = input.clone().unwrap_or_else(|| dir.join("host-all.json"));
        for p in host_plot::plot(&input, plots.as_deref().unwrap_or(&dir))? {
            eprintln!("vmm-bench: wrote {}", p.display());
        }
        return Ok(());
    }
    if let Cmd::Summary = cli.command {
        print!("{}", summary::render(&out_dir(&cli.common))?);
        return Ok(());
    }
    let env = Env::new(&cli.common)?;
    match cli.command {
        Cmd::Boot(a) => env.emit("boot", &env.boot(&a)?),
        Cmd::Pio(a) => env.emit("pio", &env.pio(&a)?),
        Cmd::Memory(a) => env.emit("memory", &env.memory(&a)?),
        Cmd::Blk(a) => env.emit("blk", &env.blk(&a)?),
        Cmd::Ratelimit(a) => env.emit("ratelimit", &env.ratelimit(&a)?),
        Cmd::Telemetry(a) => env.emit("telemetry", &env.telemetry(&a)?),
        Cmd::Profile(a) => env.emit("profile", &env.profile(&a)?),
        Cmd::Decision(a) => env.emit("decision", &env.decision(&a)?),
        Cmd::Repo(a) => {
            let name = if a.outage_run_s.is_some() {
                "repo-outage"
            } else {
                "repo"
            };
            env.emit(name, &repo::repo(&env.out_dir, &a)?)
        }
        Cmd::Tuner(a) => env.tuner(&a),
        Cmd::All { quick } => {
            let boot_args = BootArgs {
                runs: if quick { 3 } else { 20 },
                warmup: 1,
                kernel: None,
            };
            let pio_args = PioArgs {
                runs: if quick { 1 } else { 5 },
                count: if quick { 20_000 } else { 200_000 },
                mem_mib: 128,
                kernel: None,
            };
            let mem_args = MemoryArgs {
                mem_mib: 128,
                timeout_ms: 3000,
                kernel: None,
                vmm_args: Vec::new(),
            };
            eprintln!("== boot latency");
            let boot = env.boot(&boot_args)?;
            report::write_json(&env.out_dir, "boot", &boot)?;
            eprintln!("== port-I/O exit round trip");
            let pio = env.pio(&pio_args)?;
            report::write_json(&env.out_dir, "pio", &pio)?;
            eprintln!("== monitor memory");
            let memory = env.memory(&mem_args)?;
            report::write_json(&env.out_dir, "memory", &memory)?;
            eprintln!("== virtio-blk throughput");
            let blk = env.blk(&BlkArgs {
                runs: if quick { 1 } else { 3 },
                ms: if quick { 300 } else { 2000 },
                image_mib: 256,
                kernel: None,
            })?;
            report::write_json(&env.out_dir, "blk", &blk)?;
            eprintln!("== rate limiter accuracy");
            let ratelimit = env.ratelimit(&RateLimitArgs {
                runs: if quick { 1 } else { 2 },
                ms: if quick { 1000 } else { 3000 },
                image_mib: 256,
                kernel: None,
            })?;
            report::write_json(&env.out_dir, "ratelimit", &ratelimit)?;
            eprintln!("== telemetry overhead");
            let telemetry = env.telemetry(&TelemetryArgs {
                runs: if quick { 1 } else { 5 },
                count: if quick { 10_000 } else { 100_000 },
                burn_ms: if quick { 300 } else { 2000 },
                repo_rows: if quick { 10_000 } else { 200_000 },
                repo_runs: if quick { 1 } else { 3 },
            })?;
            report::write_json(&env.out_dir, "telemetry", &telemetry)?;
            env.emit(
                "all",
                &AllReport {
                    boot,
                    pio,
                    memory,
                    blk,
                    ratelimit,
                    telemetry,
                },
            )
        }
        Cmd::Summary | Cmd::PvhWrap { .. } | Cmd::HostPlot { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
