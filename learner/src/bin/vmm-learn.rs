//! `vmm-learn`: the learner's command line, a process of its own beside the monitor
//! (which does not link burn).
//!
//! - `vmm-learn train`: offline DQN training on a state repository, exported to ONNX
//!   (`NAME.onnx` + `NAME.card.json`, checked through tract). `vmm train` runs it.
//! - `vmm-learn online`: learns online beside a running VM from its state repository and
//!   pushes each new network to it (`PUT /policy` on its control socket); see
//!   [`learner::beside`].
//!
//! Bad input is one line on stderr naming the option, and exit status 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit status for bad user input (as clap's own usage errors).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "vmm-learn",
    version,
    about = "Trains the vmm tuner's Q-network: offline from a state repository, or online beside a running VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a Q-network policy with DQN on a state repository and export it to ONNX
    /// (NAME.onnx and NAME.card.json, checked through tract).
    Train(Box<TrainArgs>),
    /// Learn online beside a running VM: read its live transitions from its state
    /// repository, train, and push each new network to it with PUT /policy.
    ///
    /// Start the VM with a tuner, a repository and a control socket, e.g. `vmm run ...
    /// --tuner threshold --epsilon 0.1 --state-db DB --api-sock SOCK`, then run
    /// `vmm-learn online --api-sock SOCK --state-db DB [--policy START.onnx]`. The
    /// exploration is the VM's (--epsilon). It stops on SIGTERM/SIGINT or when the VM
    /// exits, printing one summary line.
    Online(Box<OnlineArgs>),
}

#[derive(Args)]
struct OnlineArgs {
    /// The running VM's control socket (`vmm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The running VM's state repository (`vmm run --state-db`), read-only.
    #[arg(long, value_name = "PATH")]
    state_db: PathBuf,
    /// Start from this trained policy's weights (its card beside it) instead of random
    /// ones; its network is pushed first, before any training.
    #[arg(long, value_name = "START.onnx")]
    policy: Option<PathBuf>,
    /// The VM whose rows to learn from [default: the VM of the first new row].
    #[arg(long, value_name = "NAME")]
    vm_id: Option<String>,
    /// Where the networks are written [default: DB-stem.online/ beside the repository].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Name of the pushed networks: NAME-0 (the start model), NAME-1, ...
    #[arg(long, value_name = "NAME", default_value = "online")]
    name: String,
    /// New transitions between two pushed networks.
    #[arg(long, value_name = "N", default_value_t = 20)]
    learn_every: u64,
    /// DQN steps before each push.
    #[arg(long, value_name = "N", default_value_t = 100)]
    steps: u64,
    /// Transitions held before the first training round.
    #[arg(long, value_name = "N", default_value_t = 32)]
    min_transitions: usize,
    /// Seed of the initial weights (without --policy) and of the minibatches.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// How often the repository is read (ms).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    poll_ms: u64,
    /// Give up when the VM writes no row for this long at the start (s).
    #[arg(long, value_name = "S", default_value_t = 30)]
    first_row_timeout_s: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// The state repository to learn from (written by `vmm run --state-db`): a SQLite
    /// file or a PostgreSQL URL (`postgres://USER@HOST/DB`: the fleet's rows).
    #[arg(long, value_name = "PATH|URL")]
    state_db: tuner::state_repo::Location,
    /// Only the rows written by this host (PostgreSQL).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Only the rows of this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only the VMs whose id starts with this scenario label (e.g. `phased`).
    #[arg(long, value_name = "LABEL")]
    scenario: Option<String>,
    /// Only the rows received at or after this Unix time (seconds).
    #[arg(long, value_name = "UNIX_S")]
    from: Option<u64>,
    /// Only the rows received before this Unix time (seconds).
    #[arg(long, value_name = "UNIX_S")]
    until: Option<u64>,
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

/// A bad option: its name (as in a configuration) and the problem.
struct UsageError {
    field: &'static str,
    problem: String,
}

impl UsageError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

fn usage_error(e: &UsageError) -> ExitCode {
    eprintln!(
        "vmm-learn: error: {} (--{}): {}",
        e.field,
        e.field.replace('_', "-"),
        e.problem
    );
    ExitCode::from(EXIT_USAGE)
}

fn train_options(args: TrainArgs) -> Result<learner::TrainOptions, UsageError> {
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
    let unix_ns = |field: &'static str, s: u64| {
        s.checked_mul(1_000_000_000)
            .and_then(|ns| i64::try_from(ns).ok())
            .ok_or_else(|| UsageError::new(field, format!("{s} s is out of range")))
    };
    opts.dataset.filter = tuner::state_repo::RowFilter {
        host_id: args.host,
        vm_id: args.vm,
        scenario: args.scenario,
        from_wall_ns: args.from.map(|s| unix_ns("from", s)).transpose()?,
        to_wall_ns: args.until.map(|s| unix_ns("until", s)).transpose()?,
        ..tuner::state_repo::RowFilter::default()
    };
    opts.name = args.name;
    opts.description = args.description;
    if let Some(text) = args.reward_weights {
        let w: Vec<f64> = text
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| UsageError::new("reward_weights", format!("{text:?}: {e}")))?;
        let (free, throughput, miss, throughput_ref) = match w[..] {
            [f, t, m] => (f, t, m, tuner::reward::DEFAULT_THROUGHPUT_REF),
            [f, t, m, r] => (f, t, m, r),
            _ => {
                return Err(UsageError::new(
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
        Err(e) if e.is_input_error() => usage_error(&UsageError::new(e.option(), e.to_string())),
        Err(e) => {
            eprintln!("vmm-learn: error: train: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Set by SIGTERM and SIGINT: the online learner finishes its round and stops.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    STOP.store(true, Ordering::Relaxed);
}

/// Routes SIGTERM and SIGINT to [`STOP`].
fn install_stop_signals() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic; the
        // handler is a plain `extern "C"` function that lives for the whole process.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn run_online(args: OnlineArgs) -> ExitCode {
    let mut opts = learner::beside::OnlineOptions::new(args.api_sock, args.state_db);
    opts.policy = args.policy;
    opts.vm_id = args.vm_id;
    opts.out_dir = args.out_dir;
    opts.name = args.name;
    opts.learn_every = args.learn_every;
    opts.steps = args.steps;
    opts.min_transitions = args.min_transitions;
    opts.seed = args.seed;
    opts.poll = Duration::from_millis(args.poll_ms);
    opts.first_row_timeout = Duration::from_secs(args.first_row_timeout_s);
    if let Err(e) = install_stop_signals() {
        eprintln!("vmm-learn: error: online: cannot handle SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    match learner::beside::run(&opts, &STOP) {
        Ok(summary) => {
            println!("{}", summary.line());
            ExitCode::SUCCESS
        }
        Err(e) if e.is_input_error() => usage_error(&UsageError::new(e.option(), e.to_string())),
        Err(e) => {
            eprintln!("vmm-learn: error: online: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    match Cli::parse().command {
        Command::Train(args) => run_train(*args),
        Command::Online(args) => run_online(*args),
    }
}
