//! The `vmm` command: `vmm run` boots a guest; more subcommands come with the tuner.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
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
    /// Train a Q-network policy with DQN on a state repository and export it to ONNX
    /// (NAME.onnx and NAME.card.json, checked through tract).
    Train(Box<TrainArgs>),
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
        /// The state repository of the A/B run.
        #[arg(long, value_name = "PATH")]
        state_db: PathBuf,
        /// The VM whose rows to compare (one VM alternating the arms in blocks); without
        /// it, the rows of every VM in the repository (several VMs split between the arms,
        /// each run with one policy and its own `--vm-id`).
        #[arg(long, value_name = "NAME")]
        vm_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Export every row for training.
    Export {
        /// The repository (SQLite file written by `vmm run --state-db`).
        #[arg(long, value_name = "PATH")]
        state_db: PathBuf,
        /// Output format.
        #[arg(long, value_parser = ["csv", "parquet"], default_value = "csv")]
        format: String,
        /// Output file.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
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
    /// Store one row per interval in this SQLite state repository.
    #[arg(long, value_name = "PATH")]
    state_db: Option<PathBuf>,
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
    /// Learn online: train a Q-network from the live transitions in the background and
    /// hot-swap it into the tuner every --learn-every transitions.
    #[arg(long)]
    learn: bool,
    /// Online learning: transitions between two refreshes of the served network.
    #[arg(long, value_name = "N")]
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
}

#[derive(Args)]
struct TrainArgs {
    /// The state repository to learn from (written by `vmm run --state-db`).
    #[arg(long, value_name = "PATH")]
    state_db: PathBuf,
    /// The model to write: NAME.onnx (the card goes beside it as NAME.card.json).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// DQN steps (minibatch updates).
    #[arg(long, value_name = "N", default_value_t = learner::train::DEFAULT_STEPS)]
    steps: u64,
    /// Seed of the initial weights and of the minibatches.
    #[arg(long, value_name = "N", default_value_t = learner::DqnConfig::default().seed)]
    seed: u64,
    /// Discount factor, in [0, 1).
    #[arg(long, value_name = "G", default_value_t = learner::DqnConfig::default().gamma)]
    gamma: f64,
    /// Width of the two hidden layers.
    #[arg(long, value_name = "N", default_value_t = learner::DqnConfig::default().hidden)]
    hidden: usize,
    /// Minibatch size.
    #[arg(long, value_name = "N", default_value_t = learner::DqnConfig::default().batch)]
    batch: usize,
    /// Adam's learning rate.
    #[arg(long, value_name = "LR", default_value_t = learner::DqnConfig::default().lr)]
    lr: f64,
    /// Steps between copies of the online network into the target network.
    #[arg(long, value_name = "N", default_value_t = learner::DqnConfig::default().target_every)]
    target_every: u64,
    /// Plain DQN targets (max of the target network) instead of Double DQN.
    #[arg(long)]
    no_double: bool,
    /// Subtracted from the reward of every change (any action but noop) when learning, so
    /// that the policy changes a knob only when it expects a gain.
    #[arg(long, value_name = "R", default_value_t = learner::DqnConfig::default().change_penalty)]
    change_penalty: f32,
    /// Squared-error loss instead of Huber.
    #[arg(long)]
    mse: bool,
    /// Leave out the VMs whose id starts with PREFIX, e.g. a held-out scenario (repeatable).
    #[arg(long = "exclude-prefix", value_name = "PREFIX")]
    exclude_prefix: Vec<String>,
    /// The policy's name in its card (default: the file stem of --out).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Free text for the card.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Reward weights for the card when the data does not record them:
    /// FREE,THROUGHPUT,MISS[,THROUGHPUT_REF] of reward v3 (must match the data's when it
    /// does; THROUGHPUT_REF defaults to 2e6 ops/s).
    #[arg(long, value_name = "F,T,M[,REF]")]
    reward_weights: Option<String>,
    /// Do not train: re-derive the start configuration of the model already at --out
    /// from the data (its own Q-values walk the data's idle states) and rewrite only its
    /// card's `start`.
    #[arg(long)]
    refresh_start: bool,
}

fn train_options(args: TrainArgs) -> Result<learner::TrainOptions, ConfigError> {
    let mut opts = learner::TrainOptions::new(args.state_db, args.out);
    opts.steps = args.steps;
    opts.dqn = learner::DqnConfig {
        hidden: args.hidden,
        gamma: args.gamma,
        lr: args.lr,
        batch: args.batch,
        target_every: args.target_every,
        double: !args.no_double,
        seed: args.seed,
        change_penalty: args.change_penalty,
        ..learner::DqnConfig::default()
    };
    if args.mse {
        opts.dqn.loss = learner::Loss::Mse;
    }
    opts.dataset.exclude_prefixes = args.exclude_prefix;
    opts.name = args.name;
    opts.description = args.description;
    if let Some(text) = args.reward_weights {
        let w: Vec<f64> = text
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| ConfigError::new("reward_weights", format!("{text:?}: {e}")))?;
        let (free, throughput, miss, throughput_ref) = match w[..] {
            [f, t, m] => (f, t, m, tuner::reward::DEFAULT_THROUGHPUT_REF),
            [f, t, m, r] => (f, t, m, r),
            _ => {
                return Err(ConfigError::new(
                    "reward_weights",
                    format!(
                    "{text:?}: give three or four numbers FREE,THROUGHPUT,MISS[,THROUGHPUT_REF] \
                         (reward v{})",
                    tuner::reward::REWARD_VERSION
                ),
                ))
            }
        };
        opts.reward_weights = Some(tuner::reward::RewardWeights {
            free,
            throughput,
            miss,
            throughput_ref,
        });
    }
    Ok(opts)
}

fn run_train(args: TrainArgs) -> ExitCode {
    let refresh = args.refresh_start;
    let opts = match train_options(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    // What to print on success: the summary and start lines of a training run, or the
    // start line alone when only the start configuration is refreshed.
    let lines = if refresh {
        learner::train::refresh_start(&opts)
            .map(|start| vec![learner::train::start_line(start.as_ref())])
    } else {
        learner::train(&opts).map(|report| vec![report.summary_line(), report.start_line()])
    };
    match lines {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.is_input_error() => usage_error(&ConfigError::new(e.option(), e.to_string())),
        Err(e) => {
            eprintln!("vmm: error: train: {e}");
            ExitCode::FAILURE
        }
    }
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
    if let Some(n) = args.learn_every {
        cfg.learn_every = n;
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
                },
        } => {
            if !state_db.exists() {
                return usage_error(&ConfigError::new(
                    "state_db",
                    format!("{} does not exist", state_db.display()),
                ));
            }
            // Read-only: the export never changes the file it reads (issue 14).
            let repo = match tuner::state_repo::StateRepo::open_read_only(&state_db) {
                Ok(r) => r,
                Err(e) => {
                    return usage_error(&ConfigError::new(
                        "state_db",
                        format!("{}: {e}", state_db.display()),
                    ))
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
            if !state_db.exists() {
                return usage_error(&ConfigError::new(
                    "state_db",
                    format!("{} does not exist", state_db.display()),
                ));
            }
            let rows =
                tuner::state_repo::StateRepo::open_read_only(&state_db).and_then(
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
                Err(e) => usage_error(&ConfigError::new(
                    "state_db",
                    format!("{}: {e}", state_db.display()),
                )),
            }
        }
        Command::Train(args) => run_train(*args),
        Command::Api { sock, request } => match vmm::api::call(&sock, &request) {
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
