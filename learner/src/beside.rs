//! `vmm-learn online`: online learning beside a running VM, in a process of its own.
//!
//! ```text
//! VM (vmm run --tuner|--policy --state-db DB --api-sock SOCK)
//!   tuner decides every interval, writes one row per interval into DB
//!        |  rows (read-only, live::LiveRows)            ^ PUT /policy {"path": ...}
//!        v                                              |
//! vmm-learn online: OnlineLearner (replay, DQN steps) -> export ONNX + card, checked
//!                   through tract -> OUT_DIR/NAME-<generation>.onnx -> pushed
//! ```
//!
//! Every [`OnlineOptions::learn_every`] new transitions (once
//! [`OnlineOptions::min_transitions`] are held) it takes [`OnlineOptions::steps`] DQN
//! steps, exports the network, checks it through tract in memory, writes it with its
//! model card (temporary names, then renamed) and asks the VM to load it. The VM loads
//! it with its own checks (card against its action space and reward weights, reference
//! Q-values) between two decisions; its rows then carry the new policy's name. Only the
//! two newest networks are kept on disk.
//!
//! Warm start ([`OnlineOptions::policy`]): the learner starts from a trained model's
//! weights ([`crate::warm`], checked against its card's reference Q-values) and pushes
//! that network first (`NAME-0`) before any training step. Without it, from random
//! weights, the first network is pushed after the first training round (`NAME-1`).
//!
//! It stops when asked ([`run`]'s `stop` flag: SIGTERM, SIGINT) or when the VM is gone
//! (its socket refuses connections or was removed), with an [`OnlineSummary`].
//! Exploration is the VM's: start it with `--epsilon` (e.g. 0.1) to learn from more
//! than the greedy choices.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api_client::{ClientError, Request};
use serde_json::{json, Value};
use tuner::policy::ModelCard;

use crate::error::LearnError;
use crate::live::{LiveRows, LiveVm};
use crate::online::{OnlineConfig, OnlineLearner};
use crate::warm::StartWeights;

/// How often the VM is asked whether it still runs when nothing else talks to it.
const ALIVE_EVERY: Duration = Duration::from_secs(1);
/// How long a VM that answers without a tuner is given to start it.
const TUNER_START_WAIT: Duration = Duration::from_secs(5);

/// Settings of `vmm-learn online`.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineOptions {
    /// The VM's control socket (`vmm run --api-sock`).
    pub api_sock: PathBuf,
    /// The VM's state repository (`vmm run --state-db`).
    pub state_db: PathBuf,
    /// Start from this trained model (its card beside it) instead of random weights.
    pub policy: Option<PathBuf>,
    /// The VM whose rows to learn from (default: the VM of the first new row).
    pub vm_id: Option<String>,
    /// Where the networks are written (default: `DB-stem.online/` beside the repository).
    pub out_dir: Option<PathBuf>,
    /// Name of the pushed networks: `NAME-<generation>`.
    pub name: String,
    /// New transitions between two pushes.
    pub learn_every: u64,
    /// DQN steps per push.
    pub steps: u64,
    /// Transitions held before the first training round.
    pub min_transitions: usize,
    /// Seed of the initial weights (without a start model) and of the minibatches.
    pub seed: u64,
    /// How often the repository is read.
    pub poll: Duration,
    /// How long to wait for the VM's first new row before giving up.
    pub first_row_timeout: Duration,
}

impl OnlineOptions {
    /// Defaults for the VM at `api_sock` writing `state_db`.
    pub fn new(api_sock: PathBuf, state_db: PathBuf) -> OnlineOptions {
        OnlineOptions {
            api_sock,
            state_db,
            policy: None,
            vm_id: None,
            out_dir: None,
            name: "online".into(),
            learn_every: 20,
            steps: 100,
            min_transitions: 32,
            seed: 1,
            poll: Duration::from_millis(200),
            first_row_timeout: Duration::from_secs(30),
        }
    }
}

/// Errors of `vmm-learn online`.
#[derive(Debug, thiserror::Error)]
pub enum BesideError {
    /// A bad option value.
    #[error("{problem}")]
    Option {
        /// The option, spelled as in the configuration (`api_sock`, `learn_every`, ...).
        option: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No VM answers on the socket, or it runs no tuner.
    #[error("{path}: {problem}")]
    Vm {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Reading the repository, training or exporting failed.
    #[error(transparent)]
    Learn(#[from] LearnError),
    /// A network could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl BesideError {
    /// The option at fault, for command-line messages.
    pub fn option(&self) -> &'static str {
        match self {
            BesideError::Option { option, .. } => option,
            BesideError::Vm { .. } => "api_sock",
            BesideError::Learn(e) => e.option(),
            BesideError::Io { .. } => "out_dir",
        }
    }

    /// Whether the user's input is at fault (exit status 2) rather than a failure.
    pub fn is_input_error(&self) -> bool {
        match self {
            BesideError::Option { .. } | BesideError::Vm { .. } => true,
            BesideError::Learn(e) => e.is_input_error(),
            BesideError::Io { .. } => false,
        }
    }
}

fn option(option: &'static str, problem: impl Into<String>) -> BesideError {
    BesideError::Option {
        option,
        problem: problem.into(),
    }
}

/// Why the learner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT.
    Signal,
    /// The VM's socket refuses connections or is gone.
    MonitorGone,
}

/// What a run of `vmm-learn online` did.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineSummary {
    /// Why it stopped.
    pub stop: Stop,
    /// The VM followed (if any row came).
    pub vm_id: Option<String>,
    /// Transitions learned from.
    pub transitions: u64,
    /// Rows skipped (no outcome, a gap, a failed check, a `static` reset).
    pub skipped: u64,
    /// DQN steps taken.
    pub steps: u64,
    /// Networks the VM loaded.
    pub pushed: u64,
    /// Networks the VM refused (or that failed to export).
    pub failed: u64,
    /// The last network the VM loaded.
    pub last_policy: Option<String>,
    /// Whether it started from a trained model.
    pub warm: bool,
}

impl OnlineSummary {
    /// The one line printed at the end.
    pub fn line(&self) -> String {
        format!(
            "vmm-learn online: stopped ({}): VM {}, {} transitions learned ({} rows skipped), \
             {} DQN steps, {} network(s) pushed{}, {} refused or failed; {}",
            match self.stop {
                Stop::Signal => "signal",
                Stop::MonitorGone => "the VM is gone",
            },
            self.vm_id.as_deref().unwrap_or("-"),
            self.transitions,
            self.skipped,
            self.steps,
            self.pushed,
            self.last_policy
                .as_deref()
                .map(|p| format!(" (last {p})"))
                .unwrap_or_default(),
            self.failed,
            if self.warm {
                "warm start"
            } else {
                "from scratch"
            }
        )
    }
}

/// A start model: its card and layers.
struct StartModel {
    path: PathBuf,
    card: ModelCard,
    weights: StartWeights,
}

/// Reads the start model and its card (size-capped, regular files only).
fn read_start(path: &Path) -> Result<StartModel, BesideError> {
    let bad = |message: String| {
        BesideError::Learn(LearnError::StartModel {
            path: path.to_path_buf(),
            message,
        })
    };
    let card_path = ModelCard::path_for(path);
    let text = tuner::files::read_capped(&card_path, tuner::files::TEXT_CAP)
        .map_err(|e| bad(format!("its card: {e}")))?;
    let card: ModelCard = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("its card {}: {e}", card_path.display())))?;
    let bytes =
        tuner::files::read_capped(path, tuner::files::MODEL_CAP).map_err(|e| bad(e.to_string()))?;
    let weights = crate::warm::read(path, &bytes, &card)?;
    Ok(StartModel {
        path: path.to_path_buf(),
        card,
        weights,
    })
}

/// Sends one request; `Ok(Err(..))` is an answer other than 200.
fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Result<Value, String>, ClientError> {
    let answer = api_client::send(
        sock,
        &Request {
            method: method.into(),
            path: path.into(),
            body,
        },
    )?;
    if answer.get("status").and_then(Value::as_u64) == Some(200) {
        Ok(Ok(answer.get("body").cloned().unwrap_or(Value::Null)))
    } else {
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_string();
        Ok(Err(error))
    }
}

/// Checks that a VM with a tuner serves `sock`; returns its policy's id.
fn check_vm(sock: &Path) -> Result<String, BesideError> {
    let vm = |problem: String| BesideError::Vm {
        path: sock.to_path_buf(),
        problem,
    };
    match fs::metadata(sock) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(vm(
                "does not exist: start the VM with --api-sock first".into()
            ))
        }
        Err(e) => return Err(vm(e.to_string())),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(vm(format!(
                "is {}, not a VM's control socket",
                tuner::files::kind_of(m.file_type())
            )))
        }
        Ok(_) => {}
    }
    // A VM serves its socket a moment before its tuner runs: ask again for a while.
    let since = Instant::now();
    loop {
        match api(sock, "GET", "/policy", None) {
            Ok(Ok(body)) => {
                return Ok(body
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string())
            }
            Ok(Err(_)) if since.elapsed() < TUNER_START_WAIT => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Ok(Err(e)) => {
                return Err(vm(format!(
                    "the VM runs no tuner ({e}): start it with --tuner or --policy"
                )))
            }
            Err(e) if e.monitor_gone() => return Err(vm(format!("no VM serves it: {e}"))),
            Err(e) => return Err(vm(e.to_string())),
        }
    }
}

/// The default output directory: `DB-stem.online/` beside the repository.
fn default_out_dir(db: &Path) -> PathBuf {
    let stem = db
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    db.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!("{stem}.online"))
}

/// Writes `NAME.onnx` and `NAME.card.json` under temporary names, then renames them.
fn write_model(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    card: &ModelCard,
) -> Result<PathBuf, BesideError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BesideError::Io { path, source }
    };
    let out = dir.join(format!("{name}.onnx"));
    let card_path = ModelCard::path_for(&out);
    let tmp = dir.join(format!(".{name}.tmp{}.onnx", std::process::id()));
    let tmp_card = ModelCard::path_for(&tmp);
    let mut text = serde_json::to_vec_pretty(card)
        .map_err(|e| BesideError::Learn(LearnError::Export(format!("model card: {e}"))))?;
    text.push(b'\n');
    let result = fs::write(&tmp, bytes)
        .map_err(io(&tmp))
        .and_then(|_| fs::write(&tmp_card, &text).map_err(io(&tmp_card)))
        .and_then(|_| fs::rename(&tmp_card, &card_path).map_err(io(&card_path)))
        .and_then(|_| fs::rename(&tmp, &out).map_err(io(&out)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&tmp_card);
    }
    result.map(|_| out)
}

/// The learner and what it pushed.
struct Session {
    learner: OnlineLearner,
    generation: u64,
    since_push: u64,
    pushed: u64,
    failed: u64,
    last_policy: Option<String>,
}

impl Session {
    /// Exports the network as generation `self.generation`, writes it and pushes it.
    fn push(&mut self, opts: &OnlineOptions, out_dir: &Path) -> Result<(), ClientError> {
        let name = format!("{}-{}", opts.name, self.generation);
        let written = self
            .learner
            .export_bytes()
            .map_err(BesideError::from)
            .and_then(|(bytes, mut card)| {
                card.name = name.clone();
                write_model(out_dir, &name, &bytes, &card)
            });
        let path = match written {
            Ok(p) => p,
            Err(e) => {
                // The VM keeps its policy; a network that does not export is never pushed.
                log::warn!("network {name} not pushed: {e}");
                self.failed += 1;
                return Ok(());
            }
        };
        let body = json!({ "path": path });
        let remove = |p: &Path| {
            let _ = fs::remove_file(ModelCard::path_for(p));
            let _ = fs::remove_file(p);
        };
        let answer = match api(&opts.api_sock, "PUT", "/policy", Some(body)) {
            Ok(a) => a,
            Err(e) => {
                // Not pushed: not kept.
                remove(&path);
                return Err(e);
            }
        };
        match answer {
            Ok(answer) => {
                let id = answer
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or(&name)
                    .to_string();
                log::info!("pushed {id} ({})", path.display());
                self.pushed += 1;
                self.last_policy = Some(id);
                // Keep this network and the one before; older ones are gone from the VM.
                if let Some(old) = self.generation.checked_sub(2) {
                    remove(&out_dir.join(format!("{}-{old}.onnx", opts.name)));
                }
            }
            Err(e) => {
                log::warn!("the VM refused {name}: {e}");
                remove(&path);
                self.failed += 1;
            }
        }
        Ok(())
    }
}

fn validate(opts: &OnlineOptions) -> Result<(), BesideError> {
    if !(1..=100_000).contains(&opts.learn_every) {
        return Err(option(
            "learn_every",
            format!("{} is outside 1..=100000", opts.learn_every),
        ));
    }
    if !(1..=100_000).contains(&opts.steps) {
        return Err(option(
            "steps",
            format!("{} is outside 1..=100000", opts.steps),
        ));
    }
    if !(1..=50_000).contains(&opts.min_transitions) {
        return Err(option(
            "min_transitions",
            format!("{} is outside 1..=50000", opts.min_transitions),
        ));
    }
    let name_ok = (1..=32).contains(&opts.name.len())
        && opts
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(option(
            "name",
            format!("{:?} must be 1-32 of [A-Za-z0-9_-]", opts.name),
        ));
    }
    if !(1..=60_000).contains(&opts.poll.as_millis()) {
        return Err(option("poll_ms", "must be within 1..=60000 ms"));
    }
    Ok(())
}

/// Sleeps `d` in short slices; `true` when `stop` was set meanwhile.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    stop.load(Ordering::Relaxed)
}

/// Learns beside the VM until `stop` is set or the VM goes away.
pub fn run(opts: &OnlineOptions, stop: &AtomicBool) -> Result<OnlineSummary, BesideError> {
    validate(opts)?;
    let start = opts.policy.as_deref().map(read_start).transpose()?;
    let vm_policy = check_vm(&opts.api_sock)?;
    let mut live = LiveRows::open(&opts.state_db, opts.vm_id.clone())?;
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| default_out_dir(&opts.state_db));
    fs::create_dir_all(&out_dir).map_err(|source| BesideError::Io {
        path: out_dir.clone(),
        source,
    })?;
    // The VM opens the pushed files from its own working directory: absolute paths.
    let out_dir = fs::canonicalize(&out_dir).map_err(|source| BesideError::Io {
        path: out_dir.clone(),
        source,
    })?;
    log::info!(
        "learning beside the VM at {} (policy {vm_policy}), networks in {}",
        opts.api_sock.display(),
        out_dir.display()
    );
    let began = Instant::now();
    let mut last_contact = Instant::now();
    let mut session: Option<Session> = None;
    let mut stopped = None;
    while stopped.is_none() {
        if stop.load(Ordering::Relaxed) {
            stopped = Some(Stop::Signal);
            break;
        }
        let (transitions, newest) = live.poll()?;
        if session.is_none() {
            if let Some(row) = &newest {
                let mut s = start_session(opts, LiveRows::shape_of(row)?, start.as_ref())?;
                if start.is_some() {
                    // The start model's own network, before any training step.
                    match s.push(opts, &out_dir) {
                        Err(e) if e.monitor_gone() => stopped = Some(Stop::MonitorGone),
                        Err(e) => log::warn!("push: {e}"),
                        Ok(()) => last_contact = Instant::now(),
                    }
                    s.generation += 1;
                }
                session = Some(s);
            } else if began.elapsed() > opts.first_row_timeout {
                return Err(option(
                    "state_db",
                    format!(
                        "no new row in {} for {:?}: is the VM on {} started with --state-db {}{}?",
                        opts.state_db.display(),
                        opts.first_row_timeout,
                        opts.api_sock.display(),
                        opts.state_db.display(),
                        opts.vm_id
                            .as_deref()
                            .map(|v| format!(" and --vm-id {v}"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(s) = session.as_mut() {
            for t in transitions {
                match s
                    .learner
                    .push_labelled(t.state, &t.label, t.reward, t.next_state)
                {
                    Ok(true) => s.since_push += 1,
                    Ok(false) => {}
                    Err(e) => log::debug!("transition refused: {e}"),
                }
            }
            if s.since_push >= opts.learn_every && s.learner.ready() {
                s.since_push = 0;
                match s.learner.train(opts.steps) {
                    Ok(st) => log::debug!(
                        "{} DQN steps (loss {:.4}), pushing {}-{}",
                        st.total_steps,
                        st.mean_loss,
                        opts.name,
                        s.generation
                    ),
                    Err(e) => log::warn!("training round skipped: {e}"),
                }
                match s.push(opts, &out_dir) {
                    Err(e) if e.monitor_gone() => stopped = Some(Stop::MonitorGone),
                    Err(e) => log::warn!("push: {e}"),
                    Ok(()) => last_contact = Instant::now(),
                }
                s.generation += 1;
            }
        }
        if stopped.is_none() && last_contact.elapsed() >= ALIVE_EVERY {
            match api(&opts.api_sock, "GET", "/policy", None) {
                Err(e) if e.monitor_gone() => stopped = Some(Stop::MonitorGone),
                Err(e) => log::warn!("the VM did not answer: {e}"),
                Ok(_) => last_contact = Instant::now(),
            }
        }
        if stopped.is_none() && nap(opts.poll, stop) {
            stopped = Some(Stop::Signal);
        }
    }
    let ls = live.stats();
    let (steps, pushed, failed, last_policy, skipped) = match &session {
        Some(s) => {
            let st = s.learner.stats();
            (
                st.steps,
                s.pushed,
                s.failed,
                s.last_policy.clone(),
                ls.skipped + st.skipped + st.rejected,
            )
        }
        None => (0, 0, 0, None, ls.skipped),
    };
    Ok(OnlineSummary {
        stop: stopped.unwrap_or(Stop::Signal),
        vm_id: live.vm_id().map(str::to_string),
        transitions: session.as_ref().map_or(0, |s| s.learner.stats().pushed),
        skipped,
        steps,
        pushed,
        failed,
        last_policy,
        warm: start.is_some(),
    })
}

/// The learner for the VM's shape: from the start model's weights, or fresh.
fn start_session(
    opts: &OnlineOptions,
    vm: LiveVm,
    start: Option<&StartModel>,
) -> Result<Session, BesideError> {
    let mut config = OnlineConfig {
        min_transitions: opts.min_transitions,
        ..OnlineConfig::default()
    };
    config.dqn.seed = opts.seed;
    let learner = match start {
        Some(m) => {
            OnlineLearner::warm_started(vm.shape, vm.weights, config, &m.weights, &m.card, &m.path)?
        }
        None => OnlineLearner::new(vm.shape, vm.weights, config)?,
    };
    log::info!(
        "learner for {} ({}), reward weights {:?}",
        vm.shape,
        if start.is_some() {
            "warm start"
        } else {
            "from scratch"
        },
        vm.weights
    );
    Ok(Session {
        learner,
        generation: if start.is_some() { 0 } else { 1 },
        since_push: 0,
        pushed: 0,
        failed: 0,
        last_policy: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_and_a_missing_socket_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        let mut o = OnlineOptions::new(dir.path().join("none.sock"), dir.path().join("s.db"));
        o.learn_every = 0;
        assert_eq!(run(&o, &stop).unwrap_err().option(), "learn_every");
        o.learn_every = 5;
        o.name = "a b".into();
        assert_eq!(run(&o, &stop).unwrap_err().option(), "name");
        o.name = "online".into();
        let e = run(&o, &stop).unwrap_err();
        assert_eq!(e.option(), "api_sock");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A plain file is not a socket.
        let f = dir.path().join("file");
        fs::write(&f, "x").unwrap();
        o.api_sock = f;
        let e = run(&o, &stop).unwrap_err();
        assert!(e.to_string().contains("not a VM's control socket"), "{e}");
        // A start model that is not there is named.
        o.policy = Some(dir.path().join("missing.onnx"));
        let e = run(&o, &stop).unwrap_err();
        assert_eq!(e.option(), "policy", "{e}");
    }

    #[test]
    fn models_are_written_whole_under_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let card: ModelCard = serde_json::from_slice(
            &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/general.card.json"))
                .unwrap(),
        )
        .unwrap();
        let p = write_model(dir.path(), "online-3", b"bytes", &card).unwrap();
        assert_eq!(p, dir.path().join("online-3.onnx"));
        assert_eq!(fs::read(&p).unwrap(), b"bytes");
        assert!(dir.path().join("online-3.card.json").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert_eq!(
            default_out_dir(Path::new("/x/runs.db")),
            PathBuf::from("/x/runs.online")
        );
    }
}
