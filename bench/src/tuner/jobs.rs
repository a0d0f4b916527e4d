//! One run: a `vmm` process with its flags (and `vmm-learn online` beside it for the
//! online policy), and the rows it leaves in its state repository.

use super::intervals::{intervals_from_rows, metrics, RunRecord};
use super::phases::{parse_kernel_output, KernelOutput};
use super::runner::TunerSettings;
use super::suite::{PolicyKind, StaticConfig, INTERVAL_MS, MEM_MIB, VCPUS};
use crate::child;
use crate::error::BenchError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tuner::state_repo::{RepoConfig, Row, StateRepo};

/// Reads `/proc/loadavg`.
pub fn loadavg() -> Option<[f64; 3]> {
    let t = std::fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<f64> = t
        .split_whitespace()
        .take(3)
        .filter_map(|w| w.parse().ok())
        .collect();
    (v.len() == 3).then(|| [v[0], v[1], v[2]])
}

/// Exploration of the VM's tuner while `vmm-learn online` learns beside it.
pub const ONLINE_EPSILON: &str = "0.2";

/// The `vmm-learn` binary beside `vmm`, if it is there (online learning runs in it).
pub fn learn_bin(vmm: &Path) -> Option<PathBuf> {
    Some(vmm.with_file_name("vmm-learn")).filter(|p| p.is_file())
}

/// Runs `vmm-learn online` beside the VM that will serve `sock` and write `db`: waits (up
/// to 10 s) for both, then runs the learner until the VM is gone. Returns its summary
/// line, or why it failed.
pub(super) fn learn_beside(
    learn: PathBuf,
    sock: PathBuf,
    db: PathBuf,
    dir: PathBuf,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let start = Instant::now();
        while !(sock.exists() && db.exists()) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = Command::new(&learn)
            .arg("online")
            .arg("--api-sock")
            .arg(&sock)
            .arg("--state-db")
            .arg(&db)
            .args(["--vm-id", "vm0", "--poll-ms", "100"])
            .arg("--out-dir")
            .arg(dir.join("nets"))
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Ok(o) => format!(
                "vmm-learn failed ({:?}): {}",
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("cannot run {}: {e}", learn.display()),
        }
    })
}

/// How to run one VM.
pub(super) struct Job<'a> {
    pub(super) name: String,
    pub(super) scenario: String,
    pub(super) seed: u64,
    pub(super) policy: PolicyKind,
    pub(super) config: Option<StaticConfig>,
    pub(super) cmdline: String,
    pub(super) planned_ms: u64,
    pub(super) extra: Vec<String>,
    pub(super) start: StaticConfig,
    pub(super) settings: &'a TunerSettings,
    pub(super) drives: &'a [PathBuf; 2],
    pub(super) tmp: &'a Path,
}

/// The `vmm run` flags of a policy (besides the VM's shape).
pub(super) fn policy_flags(policy: PolicyKind, model: &Path) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match policy {
        PolicyKind::BestStatic => s(&["--tuner", "static"]),
        PolicyKind::Threshold => s(&["--tuner", "threshold"]),
        PolicyKind::Random => s(&["--tuner", "static", "--epsilon", "1"]),
        PolicyKind::Learned => vec!["--policy".into(), model.display().to_string()],
        PolicyKind::Online => s(&["--tuner", "static", "--epsilon", ONLINE_EPSILON]),
    }
}

/// The `--drive` specs and `--active-vcpus` of a static configuration.
pub(super) fn static_flags(c: &StaticConfig, drives: &[PathBuf; 2]) -> Vec<String> {
    let mut v = vec!["--active-vcpus".to_string(), c.active_vcpus.to_string()];
    for (i, d) in drives.iter().enumerate() {
        v.push("--drive".into());
        v.push(format!(
            "path={},id=blk{i},level={},priority={}",
            d.display(),
            c.levels[i],
            c.priorities[i].name()
        ));
    }
    v
}

pub(super) fn run_job(job: &Job<'_>) -> Result<RunRecord, BenchError> {
    let dir = job.tmp.join(&job.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
    let db = dir.join("state.db");
    let mut cmd = Command::new(&job.settings.vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&job.settings.kernel)
        .arg("--cmdline")
        .arg(&job.cmdline)
        .args(["--vcpus", &VCPUS.to_string()])
        .args(["--mem-mib", &MEM_MIB.to_string()])
        .args(["--metrics-interval-ms", &INTERVAL_MS.to_string()])
        .arg("--state-db")
        .arg(&db)
        .args(["--vm-id", "vm0"]);
    match job.config {
        Some(c) => {
            cmd.args(static_flags(&c, job.drives));
        }
        None => {
            for (i, d) in job.drives.iter().enumerate() {
                cmd.arg("--drive")
                    .arg(format!("path={},id=blk{i}", d.display()));
            }
        }
    }
    cmd.args(&job.extra);
    // Online learning: the VM serves a control socket and vmm-learn learns beside it.
    let learner = match (job.policy, learn_bin(&job.settings.vmm)) {
        (PolicyKind::Online, Some(learn)) => {
            let sock = dir.join("vm.sock");
            cmd.arg("--api-sock").arg(&sock);
            Some(learn_beside(learn, sock, db.clone(), dir.clone()))
        }
        _ => None,
    };
    let timeout = Duration::from_millis(job.planned_ms + 60_000);
    let t = child::run_timed(&mut cmd, timeout);
    if let Some(summary) = learner.and_then(|h| h.join().ok()) {
        eprintln!("vmm-bench tuner: {}: {summary}", job.name);
    }
    let mut rec = RunRecord {
        scenario: job.scenario.clone(),
        seed: job.seed,
        policy: job.policy,
        config: job.config,
        cmdline: job.cmdline.clone(),
        wall_s: 0.0,
        exit_code: None,
        error: None,
        serial_log: None,
        kernel: KernelOutput::default(),
        intervals: Vec::new(),
        metrics: None,
    };
    let t = match t {
        Ok(t) => t,
        Err(e) => {
            rec.error = Some(e.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(rec);
        }
    };
    rec.wall_s = t.exit.as_secs_f64();
    rec.exit_code = t.status.code();
    let serial = String::from_utf8_lossy(&t.stdout).into_owned();
    let logs = job.settings.out_dir.join("serial");
    std::fs::create_dir_all(&logs)
        .map_err(|e| BenchError::io(format!("creating {}", logs.display()), e))?;
    let log_path = logs.join(format!("{}.txt", job.name));
    std::fs::write(
        &log_path,
        format!("{serial}\n--- vmm stderr ---\n{}", t.stderr),
    )
    .map_err(|e| BenchError::io(format!("writing {}", log_path.display()), e))?;
    rec.serial_log = Some(format!("serial/{}.txt", job.name));
    rec.kernel = parse_kernel_output(&serial);
    if !t.status.success() {
        let last = t.stderr.lines().last().unwrap_or("").to_string();
        rec.error = Some(format!("vmm exited with {:?}: {last}", t.status.code()));
    }
    match read_rows(&db) {
        Ok(rows) => {
            let rewards: Vec<f64> = rows.iter().filter_map(|r| r.reward).collect();
            rec.intervals = intervals_from_rows(&rows, &job.start, &rec.kernel.phases);
            rec.metrics = metrics(&rewards, &rec.intervals);
            if rec.metrics.is_none() && rec.error.is_none() {
                rec.error = Some(format!("no rewarded rows ({} rows)", rows.len()));
            }
        }
        Err(e) => {
            if rec.error.is_none() {
                rec.error = Some(e.to_string());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rec)
}

pub(super) fn read_rows(db: &Path) -> Result<Vec<Row>, BenchError> {
    if !db.is_file() {
        return Err(BenchError::Unexpected(format!(
            "no state repository at {}",
            db.display()
        )));
    }
    let repo = StateRepo::open(db, RepoConfig::default())
        .map_err(|e| BenchError::Unexpected(format!("{}: {e}", db.display())))?;
    let rows = repo
        .rows("vm0", 0)
        .map_err(|e| BenchError::Unexpected(format!("{}: {e}", db.display())));
    let _ = repo.close();
    rows
}

/// Writes a sparse drive image of `mib` MiB if it is missing or of another size.
pub(super) fn ensure_image(path: &Path, mib: u64) -> Result<(), BenchError> {
    let want = mib << 20;
    if std::fs::metadata(path)
        .map(|m| m.len() == want)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let f = std::fs::File::create(path)
        .map_err(|e| BenchError::io(format!("creating {}", path.display()), e))?;
    f.set_len(want)
        .map_err(|e| BenchError::io(format!("sizing {}", path.display()), e))
}
