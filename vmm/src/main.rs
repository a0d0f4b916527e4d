//! The `vmm` command: `vmm run` boots a guest; more subcommands come with the tuner.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tuner::state_repo::{Location, RepoConfig, StateRepo};
use vmm::{ConfigError, RunOutcome, VmConfig};

/// Exit status for bad user input (as clap's own usage errors).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM virtual machine monitor with a built-in tuner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel and run it until it exits.
    Run(Box<RunArgs>),
    /// Print the performance-vector schema (names, units, normalisation).
    Schema {
        /// Print it as JSON (the form written into model cards).
        #[arg(long)]
        json: bool,
    },
    /// Work with a state repository.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// A/B testing of tuner policies.
    Ab {
        #[command(subcommand)]
        command: AbCommand,
    },
    /// Train a Q-network policy offline: runs `vmm-learn train` with the same arguments
    /// (the `vmm-learn` binary beside this one holds the learner; see `vmm-learn train
    /// --help`).
    #[command(disable_help_flag = true)]
    Train {
        /// The arguments of `vmm-learn train`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run several VMs on this host, each its own `vmm run` process, under one arbiter
    /// of the host's cores and bandwidth (host.json: the budget and the VMs).
    Host {
        /// The host configuration (see resources/host-example.json).
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Profile a running guest for a while: an SVG flame graph of where its vCPUs spent
    /// their time (one frame per sample: the function holding the instruction pointer).
    Profile {
        /// The monitor's --api-sock.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// Length of the window in seconds.
        #[arg(long, value_name = "N", default_value_t = 5)]
        seconds: u64,
        /// The SVG flame graph to write.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Also write the window's folded stacks (`function count` lines) here.
        #[arg(long, value_name = "PATH")]
        folded: Option<PathBuf>,
        /// Sample at this rate during the window (the rate in force before is restored).
        #[arg(long, value_name = "HZ")]
        hz: Option<u64>,
    },
    /// Send one request to a running monitor's control socket and print the answer.
    Api {
        /// The monitor's --api-sock.
        #[arg(long, value_name = "PATH")]
        sock: PathBuf,
        /// The request, e.g. '{"method":"GET","path":"/drives"}'.
        request: String,
    },
}

#[derive(Subcommand)]
enum AbCommand {
    /// Each arm's reward, throughput and latency with 95% confidence intervals, and
    /// whether the difference in reward is significant.
    Report {
        /// The state repository of the A/B run: a SQLite file or a PostgreSQL URL.
        #[arg(long, value_name = "PATH|URL")]
        state_db: Location,
        /// The VM whose rows to compare (one VM alternating the arms in blocks); without
        /// it, the rows of every VM in the repository (several VMs split between the arms,
        /// each run with one policy and its own `--vm-id`).
        #[arg(long, value_name = "NAME")]
        vm_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Export every row for training (`--out FILE`), or copy every row and event into
    /// another repository (`--to PATH|URL`: SQLite -> PostgreSQL and back).
    Export {
        /// The repository (SQLite file or PostgreSQL URL written by `vmm run --state-db`).
        #[arg(long, value_name = "PATH|URL")]
        state_db: Location,
        /// Output format (parquet only in a vmm built with `--features parquet`).
        #[arg(long, value_parser = ["csv", "parquet"], default_value = "csv")]
        format: String,
        /// Output file.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "to",
            conflicts_with = "to"
        )]
        out: Option<PathBuf>,
        /// The repository to copy into (created or migrated; a SQLite file or a
        /// PostgreSQL URL).
        #[arg(long, value_name = "PATH|URL")]
        to: Option<Location>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// JSON file with the VM's settings; flags given as well override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Guest kernel: 64-bit ELF (test kernel, vmlinux) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (test kernels read key=value words from it).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// vCPUs the guest is asked to use at start (<= --vcpus; the static configuration).
    #[arg(long, value_name = "N")]
    active_vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "M")]
    mem_mib: Option<u64>,
    /// Write the guest's serial output to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,
    /// Do not install seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// End the run after this many milliseconds (exit status 124).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Add a virtio-blk drive (repeatable):
    /// path=FILE[,read-only][,id=NAME][,bw=BYTES_PER_SEC][,iops=N][,priority=low|medium|high|N]
    /// [,level=0..4 (a tuner rate-limit level instead of bw/iops)].
    #[arg(long = "drive", value_name = "SPEC")]
    drives: Vec<String>,
    /// Add a virtio-net device on a TAP interface: tap=NAME[,mac=MAC][,id=NAME] (repeatable).
    #[arg(long = "net", value_name = "SPEC")]
    network: Vec<String>,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Sampling interval of the performance monitoring agent (ms).
    #[arg(long, value_name = "N")]
    metrics_interval_ms: Option<u64>,
    /// Store one row per interval in this state repository: a SQLite file, or a
    /// PostgreSQL database (`postgres://USER@HOST/DB`, `...?host=/socket/dir`).
    #[arg(long, value_name = "PATH|URL")]
    state_db: Option<Location>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Name of this VM in the state repository.
    #[arg(long, value_name = "NAME")]
    vm_id: Option<String>,
    /// Tune the VM with this ONNX Q-network (model card beside it).
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
    /// Tune the VM with a built-in policy: static or threshold.
    #[arg(long, value_name = "NAME")]
    tuner: Option<String>,
    /// Exploration rate of the tuner (0..=1; 0 in production).
    #[arg(long, value_name = "E")]
    epsilon: Option<f64>,
    /// Removed: online learning runs beside the VM (`vmm-learn online`); refused.
    #[arg(long, hide = true)]
    learn: bool,
    /// Removed with --learn; refused.
    #[arg(long, value_name = "N", hide = true)]
    learn_every: Option<u64>,
    /// Fewest vCPUs the tuner may leave the guest.
    #[arg(long, value_name = "N")]
    min_vcpus: Option<u32>,
    /// A/B test two policies (model paths, static or threshold) in alternating blocks.
    #[arg(long, value_name = "A,B")]
    ab: Option<String>,
    /// Intervals per A/B block.
    #[arg(long, value_name = "N")]
    ab_block: Option<u64>,
    /// Turn the run-loop exit counters off (to measure their cost).
    #[arg(long)]
    no_exit_counters: bool,
    /// Service level objective: class=critical|standard|batch[,p99_us=N][,min_ops=N]
    /// (p99 request latency over the drives in us; guest operations per second).
    #[arg(long, value_name = "SPEC")]
    slo: Option<String>,
    /// Sample each vCPU's instruction pointer N times a second (1..=10000; off by
    /// default; `PUT /profile` changes it at run time).
    #[arg(long, value_name = "N")]
    profile_hz: Option<u64>,
    /// The guest kernel's symbols for the profiler as a System.map (default: the ELF
    /// symbol table of --kernel).
    #[arg(long, value_name = "PATH")]
    symbols: Option<PathBuf>,
}

/// `vmm train`: runs `vmm-learn train ARGS` from the directory of this executable (the
/// learner and burn are not linked into the monitor). Returns only on failure.
fn run_train(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let learn = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vmm-learn")));
    let Some(learn) = learn.filter(|p| p.is_file()) else {
        eprintln!(
            "vmm: error: train: `vmm train` runs `vmm-learn train`, and no vmm-learn binary \
             is beside this vmm (build it with `cargo build --release -p learner`, or run \
             vmm-learn train directly)"
        );
        return ExitCode::FAILURE;
    };
    let e = std::process::Command::new(&learn)
        .arg("train")
        .args(args)
        .exec();
    eprintln!("vmm: error: train: cannot run {}: {e}", learn.display());
    ExitCode::FAILURE
}

/// The command-line flag for a configuration field, for error messages.
fn flag_of(field: &str) -> String {
    let top = field.split('.').next().unwrap_or(field);
    match top {
        "config" => "--config".into(),
        "drives" => "--drive".into(),
        "network" => "--net".into(),
        f => format!("--{}", f.replace('_', "-")),
    }
}

fn config_from(args: RunArgs) -> Result<VmConfig, ConfigError> {
    let mut cfg = match (&args.config, &args.kernel) {
        (Some(path), _) => VmConfig::from_file(path)?,
        (None, Some(kernel)) => VmConfig::new(kernel),
        (None, None) => {
            return Err(ConfigError::new(
                "kernel",
                "missing: give --kernel PATH or --config PATH",
            ))
        }
    };
    if let Some(k) = args.kernel {
        cfg.kernel = k;
    }
    if args.initrd.is_some() {
        cfg.initrd = args.initrd;
    }
    if let Some(c) = args.cmdline {
        cfg.cmdline = c;
    }
    if let Some(v) = args.vcpus {
        cfg.vcpus = v;
    }
    if args.active_vcpus.is_some() {
        cfg.active_vcpus = args.active_vcpus;
    }
    if let Some(m) = args.mem_mib {
        cfg.mem_mib = m;
    }
    if args.serial_out.is_some() {
        cfg.serial_out = args.serial_out;
    }
    if args.no_seccomp {
        cfg.seccomp = false;
    }
    if args.timeout_ms.is_some() {
        cfg.timeout_ms = args.timeout_ms;
    }
    if args.api_sock.is_some() {
        cfg.api_sock = args.api_sock;
    }
    if let Some(n) = args.metrics_interval_ms {
        cfg.metrics_interval_ms = n;
    }
    if args.state_db.is_some() {
        cfg.state_db = args.state_db;
    }
    if args.metrics_addr.is_some() {
        cfg.metrics_addr = args.metrics_addr;
    }
    if let Some(v) = args.vm_id {
        cfg.vm_id = v;
    }
    if args.policy.is_some() {
        cfg.policy = args.policy;
    }
    if args.tuner.is_some() {
        cfg.tuner = args.tuner;
    }
    if let Some(e) = args.epsilon {
        cfg.epsilon = e;
    }
    if args.learn {
        cfg.learn = true;
    }
    if args.learn_every.is_some() {
        cfg.learn_every = args.learn_every;
    }
    if args.min_vcpus.is_some() {
        cfg.min_vcpus = args.min_vcpus;
    }
    if args.ab.is_some() {
        cfg.ab = args.ab;
    }
    if let Some(b) = args.ab_block {
        cfg.ab_block = b;
    }
    if args.no_exit_counters {
        cfg.exit_counters = false;
    }
    if args.profile_hz.is_some() {
        cfg.profile_hz = args.profile_hz;
    }
    if args.symbols.is_some() {
        cfg.symbols = args.symbols;
    }
    if let Some(spec) = &args.slo {
        cfg.slo = Some(vmm::config::parse_slo(spec)?);
    }
    if !args.network.is_empty() {
        cfg.network = args
            .network
            .iter()
            .map(|n| vmm::config::NetworkConfig::parse(n))
            .collect::<Result<_, _>>()?;
    }
    if !args.drives.is_empty() {
        cfg.drives = args
            .drives
            .iter()
            .map(|d| vmm::config::DriveConfig::parse(d))
            .collect::<Result<_, _>>()?;
    }
    Ok(cfg)
}

/// `vmm state export --to`: every row and event of `from` into `to` (opened for writing,
/// its schema created or migrated).
fn copy_repository(from: &Location, to: &Location) -> ExitCode {
    let source = match StateRepo::open_read_only_at(from) {
        Ok(r) => r,
        Err(e) => return usage_error(&ConfigError::new("state_db", format!("{from}: {e}"))),
    };
    let config = RepoConfig {
        // Copied rows keep their verdicts; nothing to judge.
        anomaly: None,
        ..RepoConfig::default()
    };
    let target = match StateRepo::open_at(to, config) {
        Ok(r) => r,
        Err(e) => return usage_error(&ConfigError::new("to", format!("{to}: {e}"))),
    };
    if target.stats().degraded {
        return usage_error(&ConfigError::new(
            "to",
            format!("{to}: {}: the database cannot be reached", to.backend()),
        ));
    }
    let copied = source.copy_to(&target);
    let closed = target.close();
    match (copied, closed) {
        (Ok((rows, events)), Ok(stats)) if stats.rows_dropped == 0 => {
            println!("copied {rows} rows and {events} events from {from} to {to}");
            ExitCode::SUCCESS
        }
        (Ok(_), Ok(stats)) => {
            eprintln!(
                "vmm: error: copy to {to}: {} rows dropped ({} commit errors)",
                stats.rows_dropped, stats.commit_errors
            );
            ExitCode::FAILURE
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm: error: copy from {from} to {to}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(e: &ConfigError) -> ExitCode {
    eprintln!(
        "vmm: error: {} ({}): {}",
        e.field,
        flag_of(&e.field),
        e.problem
    );
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    vmm::panics::install_hook();
    let cli = Cli::parse();
    match cli.command {
        Command::Schema { json } => {
            if json {
                println!("{}", tuner::schema::Schema::to_json());
            } else {
                print!("{}", tuner::schema::Schema::describe());
            }
            ExitCode::SUCCESS
        }
        Command::State {
            command:
                StateCommand::Export {
                    state_db,
                    format,
                    out,
                    to,
                },
        } => {
            if let Some(missing) = state_db.sqlite_path().filter(|p| !p.exists()) {
                return usage_error(&ConfigError::new(
                    "state_db",
                    format!("{} does not exist", missing.display()),
                ));
            }
            if let Some(to) = to {
                return copy_repository(&state_db, &to);
            }
            let Some(out) = out else {
                return usage_error(&ConfigError::new("out", "--out or --to is required"));
            };
            if format == "parquet" && !cfg!(feature = "parquet") {
                return usage_error(&ConfigError::new(
                    "format",
                    "parquet export is not built into this vmm: build it with \
                     `cargo build --release -p vmm --features parquet` (or export csv)",
                ));
            }
            // Read-only: the export never changes the file it reads (issue 14).
            let repo = match tuner::state_repo::StateRepo::open_read_only_at(&state_db) {
                Ok(r) => r,
                Err(e) => {
                    return usage_error(&ConfigError::new("state_db", format!("{state_db}: {e}")))
                }
            };
            let result = match format.as_str() {
                "parquet" => repo.export_parquet(&out),
                _ => repo.export_csv(&out),
            };
            match result {
                Ok(n) => {
                    println!("exported {n} rows to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm: error: export: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ab {
            command: AbCommand::Report { state_db, vm_id },
        } => {
            if let Some(missing) = state_db.sqlite_path().filter(|p| !p.exists()) {
                return usage_error(&ConfigError::new(
                    "state_db",
                    format!("{} does not exist", missing.display()),
                ));
            }
            let rows =
                tuner::state_repo::StateRepo::open_read_only_at(&state_db).and_then(
                    |r| match &vm_id {
                        Some(vm) => r.rows(vm, 0),
                        None => r.rows_of_all_vms(0),
                    },
                );
            match rows {
                Ok(rows) => match tuner::ab::report(&rows) {
                    Ok(r) => {
                        print!("{}", tuner::ab::render(&r));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("vmm: error: ab report: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => usage_error(&ConfigError::new("state_db", format!("{state_db}: {e}"))),
            }
        }
        Command::Train { args } => run_train(args),
        Command::Host { config } => match vmm::host::run(&config) {
            Ok(status) => std::process::exit(status),
            Err(vmm::host::HostError::Config(e)) => {
                eprintln!(
                    "vmm: error: {} (in {}): {}",
                    e.field,
                    config.display(),
                    e.problem
                );
                ExitCode::from(EXIT_USAGE)
            }
            Err(e) => {
                eprintln!("vmm: error: host: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Profile {
            api_sock,
            seconds,
            out,
            folded,
            hz,
        } => {
            let req = vmm::profiler::flame::FlameRequest {
                sock: api_sock,
                seconds,
                out,
                folded,
                hz,
            };
            match vmm::profiler::flame::profile(&req) {
                Ok(summary) => {
                    println!(
                        "{} samples; flame graph in {}",
                        summary.samples,
                        req.out.display()
                    );
                    for (name, n) in summary.functions.iter().take(10) {
                        println!(
                            "{:6.2}% {n:8} {name}",
                            100.0 * *n as f64 / summary.samples as f64
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm: error: profile: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Api { sock, request } => match api_client::call(&sock, &request) {
            Ok(answer) => {
                println!("{answer}");
                let ok = answer.get("status").and_then(|s| s.as_u64()) == Some(200);
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("vmm: error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let cfg = match config_from(*args) {
                Ok(c) => c,
                Err(e) => return usage_error(&e),
            };
            // A panic that reaches here (the main thread's, outside any guard) ends the
            // process with exit status 1; vCPU threads may be inside KVM_RUN.
            let result = std::panic::catch_unwind(|| vmm::run(&cfg)).unwrap_or_else(|p| {
                eprintln!(
                    "vmm: error: the monitor panicked: {}",
                    tuner::sandbox::panic_message(&*p)
                );
                std::process::exit(1)
            });
            match result {
                Ok(outcome) => {
                    match &outcome {
                        RunOutcome::Stopped(devices::ExitReason::Crash(report)) => {
                            eprintln!("vmm: guest crashed: {report}")
                        }
                        RunOutcome::Stopped(devices::ExitReason::MonitorError(e)) => {
                            eprintln!("vmm: error: {e}")
                        }
                        RunOutcome::TimedOut(ms) => eprintln!("vmm: timeout after {ms} ms"),
                        RunOutcome::Signalled(sig) => eprintln!("vmm: stopped by signal {sig}"),
                        RunOutcome::Stopped(reason) => log::info!("guest stopped: {reason:?}"),
                    }
                    // Exit the process directly: vCPU threads may still be inside KVM_RUN.
                    std::process::exit(outcome.exit_status());
                }
                Err(vmm::VmError::Config(e)) => usage_error(&e),
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
