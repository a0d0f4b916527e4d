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
    Run(RunArgs),
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
    /// Add a virtio-blk drive: path=FILE[,read-only][,id=NAME] (repeatable).
    #[arg(long = "drive", value_name = "SPEC")]
    drives: Vec<String>,
}

/// The command-line flag for a configuration field, for error messages.
fn flag_of(field: &str) -> String {
    match field {
        "config" => "--config".into(),
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
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let cfg = match config_from(args) {
                Ok(c) => c,
                Err(e) => return usage_error(&e),
            };
            match vmm::run(&cfg) {
                Ok(outcome) => {
                    match &outcome {
                        RunOutcome::Stopped(devices::ExitReason::Crash(report)) => {
                            eprintln!("vmm: guest crashed: {report}")
                        }
                        RunOutcome::Stopped(devices::ExitReason::MonitorError(e)) => {
                            eprintln!("vmm: error: {e}")
                        }
                        RunOutcome::TimedOut(ms) => eprintln!("vmm: timeout after {ms} ms"),
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
