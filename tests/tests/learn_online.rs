//! `vmm-learn online`: online learning in its own process beside a running VM. It reads
//! the VM's live transitions from its state repository, trains, and pushes each network
//! with `PUT /policy`; the VM's rows then carry the new policy. Warm-started from
//! `models/general.onnx`, its first network computes that model's Q-values. It stops with
//! the VM (or on SIGTERM) with one summary line, and refuses bad input with one line
//! naming the option and exit status 2.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    api, kernel_command, kvm_available, run_kernel, vmm_learn, vmm_learn_bin, wait_for, Run,
    Scratch,
};
use tuner::actions::ActionSpace;
use tuner::policy::{ModelCard, OnnxPolicy, QNetwork};
use tuner::reward::RewardWeights;

const LIMIT: Duration = Duration::from_secs(90);

/// Two VMs with a learner each would starve each other on a 2-core host: one at a time.
static MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    MACHINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

use integration_tests::query_pairs as query;

/// A `phased` VM with two drives (the shape of `models/general.onnx`), the threshold
/// tuner exploring, a state repository and a control socket; runs `schedule`.
fn start_vm(dir: &Scratch, schedule: &str) -> (Child, PathBuf, PathBuf) {
    let db = dir.path("vm.db");
    let sock = dir.path("vm.sock");
    let mut drives = Vec::new();
    for name in ["fg.img", "bg.img"] {
        let p = dir.path(name);
        std::fs::write(&p, vec![0u8; 16 << 20]).unwrap();
        drives.push(format!("path={}", s(&p)));
    }
    let child = kernel_command(
        "phased",
        &[
            "--vcpus",
            "2",
            "--mem-mib",
            "64",
            "--drive",
            &drives[0],
            "--drive",
            &drives[1],
            "--cmdline",
            schedule,
            "--metrics-interval-ms",
            "100",
            "--tuner",
            "threshold",
            "--epsilon",
            "0.3",
            "--state-db",
            s(&db),
            "--api-sock",
            s(&sock),
            "--timeout-ms",
            "60000",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(s(&sock));
    wait_for(s(&db));
    (child, db, sock)
}

fn learner(args: &[&str]) -> Child {
    Command::new(vmm_learn_bin())
        .env("RUST_LOG", "info")
        .arg("online")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `child` to end; kills it (and fails) past that.
fn finish(mut child: Child, what: &str, limit: Duration) -> Run {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not end within {limit:?}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// The VM's policy in charge (`GET /policy`).
fn vm_policy(sock: &Path) -> String {
    let a = api(s(sock), r#"{"method":"GET","path":"/policy"}"#);
    a["body"]["policy"].as_str().unwrap_or_default().to_string()
}

/// Polls `GET /policy` until it starts with `prefix` (up to `limit`).
fn wait_policy(sock: &Path, prefix: &str, limit: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < limit && sock.exists() {
        let p = vm_policy(sock);
        if p.starts_with(prefix) {
            return Some(p);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn it_learns_beside_a_running_vm_pushes_networks_and_stops_with_it() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("learn-online");
    let (vm, db, sock) = start_vm(&dir, "schedule=cpu:4000,io:4000,idle:3000,cpu:4000");
    let out_dir = dir.path("nets");
    let learn = learner(&[
        "--api-sock",
        s(&sock),
        "--state-db",
        s(&db),
        "--out-dir",
        s(&out_dir),
        "--learn-every",
        "10",
        "--steps",
        "20",
        "--min-transitions",
        "16",
        "--poll-ms",
        "100",
    ]);
    // GET /policy shows the learner's network once the VM loaded it.
    let served = wait_policy(&sock, "online-", Duration::from_secs(40));
    let vm_run = finish(vm, "the VM", LIMIT);
    vm_run.expect_status(0);
    let run = finish(learn, "vmm-learn online", Duration::from_secs(20));
    run.expect_status(0);
    eprintln!("{}\n{}", run.stdout, run.stderr);
    let served = served.unwrap_or_else(|| panic!("no network served\n{}", run.stderr));
    assert!(served.starts_with("online-"), "{served}");
    // One summary line: it stopped because the VM went away, after pushing networks.
    let line = run.stdout.trim_end();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("stopped (the VM is gone)"), "{line}");
    assert!(line.contains("from scratch"), "{line}");
    let pushed: u64 = line
        .split(" network(s) pushed")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(pushed >= 1, "{line}");
    // The VM swapped the policy in, and its rows carry the new policy's name.
    let swaps = query(
        &db,
        "select detail, ts_ns from events where kind = 'policy_swap' order by ts_ns",
    );
    assert!(
        swaps.iter().any(|(d, _)| d == "threshold -> online-1"),
        "{swaps:?}"
    );
    let per_policy = query(
        &db,
        "select policy_id, count(*) from samples group by policy_id",
    );
    eprintln!("rows per policy: {per_policy:?}");
    assert!(
        per_policy
            .iter()
            .any(|(p, n)| p.starts_with("online-") && *n >= 3),
        "{per_policy:?}"
    );
    // The pushed files: the newest two networks and their cards, nothing else.
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(!files.is_empty() && files.len() <= 4, "{files:?}");
    assert!(files.iter().all(|f| f.starts_with("online-")), "{files:?}");
}

#[test]
fn a_warm_start_serves_the_start_models_network_first_and_stops_on_sigterm() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("learn-warm");
    let (vm, db, sock) = start_vm(&dir, "schedule=cpu:3000,io:3000,idle:3000,cpu:3000");
    let out_dir = dir.path("nets");
    let general = repo_dir().join("models/general.onnx");
    let learn = learner(&[
        "--api-sock",
        s(&sock),
        "--state-db",
        s(&db),
        "--policy",
        s(&general),
        "--out-dir",
        s(&out_dir),
        "--name",
        "warm",
        // No training round in this test: the start network alone is pushed.
        "--learn-every",
        "100000",
    ]);
    let served = wait_policy(&sock, "warm-", Duration::from_secs(30));
    // SIGTERM while the VM still runs: one summary line, exit status 0.
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(learn.id() as i32, libc::SIGTERM) };
    let run = finish(learn, "vmm-learn online", Duration::from_secs(20));
    run.expect_status(0);
    let line = run.stdout.trim_end();
    assert!(line.contains("stopped (signal)"), "{line}");
    assert!(line.contains("warm start"), "{line}");
    assert_eq!(served.as_deref(), Some("warm-0"), "{}", run.stderr);
    assert_eq!(vm_policy(&sock), "warm-0");

    // The network pushed before any training step computes general.onnx's Q-values.
    let space = ActionSpace::new(tuner::actions::VmShape::new(2, 0, 0));
    let weights = RewardWeights::default();
    let mut start = OnnxPolicy::load(&general, &space, Some(&weights)).unwrap();
    let mut first = OnnxPolicy::load(out_dir.join("warm-0.onnx"), &space, Some(&weights))
        .expect("the pushed network loads");
    let card = start.card().clone();
    let mut states = vec![card.evaluation.reference_input.clone()];
    // And on the VM's own states: the VM keeps running and writing (its writer commits
    // every 200 ms), so wait for enough rows rather than read what is there now.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while query(&db, "select 'rows', count(*) from samples")
        .first()
        .is_none_or(|(_, n)| *n < 10)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM wrote too few rows"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c.prepare("select vector from samples limit 20").unwrap();
    for v in st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
        states.push(tuner::state_repo::decode_vector(&v.unwrap()).unwrap());
    }
    assert!(states.len() > 5, "too few rows");
    for x in &states {
        let (a, b) = (start.q_values(x).unwrap(), first.q_values(x).unwrap());
        for (qa, qb) in a.iter().zip(&b) {
            assert!(
                (qa - qb).abs() <= 1e-4 * qa.abs().max(1.0),
                "{a:?} vs {b:?}"
            );
        }
    }
    let finished = finish(vm, "the VM", LIMIT);
    finished.expect_status(0);
    let per_policy = query(
        &db,
        "select policy_id, count(*) from samples group by policy_id",
    );
    assert!(
        per_policy.iter().any(|(p, n)| p == "warm-0" && *n >= 3),
        "{per_policy:?}"
    );
    let card0 =
        ModelCard::from_json(&std::fs::read_to_string(out_dir.join("warm-0.card.json")).unwrap())
            .unwrap();
    assert_eq!(card0.name, "warm-0");
    assert_eq!(
        card0.evaluation.reference_input,
        card.evaluation.reference_input
    );
}

/// One line on stderr naming the option, exit status 2.
fn expect_usage(run: &Run, flag: &str, words: &str) {
    run.expect_status(2);
    let err = run.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("vmm-learn: error: "), "{err}");
    assert!(err.contains(flag), "{err} lacks {flag}");
    assert!(err.contains(words), "{err} lacks {words}");
}

#[test]
fn bad_input_is_refused_by_name() {
    let dir = Scratch::new("learn-bad");
    let none = dir.path("none.sock");
    let db = dir.path("none.db");
    // Without a VM (no KVM needed).
    let r = vmm_learn(
        &["online", "--api-sock", s(&none), "--state-db", s(&db)],
        LIMIT,
    );
    expect_usage(&r, "--api-sock", "does not exist");
    let file = dir.path("plain");
    std::fs::write(&file, "x").unwrap();
    let r = vmm_learn(
        &["online", "--api-sock", s(&file), "--state-db", s(&db)],
        LIMIT,
    );
    expect_usage(&r, "--api-sock", "not a VM's control socket");
    let r = vmm_learn(
        &[
            "online",
            "--api-sock",
            s(&file),
            "--state-db",
            s(&db),
            "--learn-every",
            "0",
        ],
        LIMIT,
    );
    expect_usage(&r, "--learn-every", "outside");
    // A start model that is not ONNX (its card copied beside it).
    let fake = dir.path("fake.onnx");
    std::fs::write(&fake, "not a model").unwrap();
    std::fs::copy(
        repo_dir().join("models/general.card.json"),
        dir.path("fake.card.json"),
    )
    .unwrap();
    let r = vmm_learn(
        &[
            "online",
            "--api-sock",
            s(&file),
            "--state-db",
            s(&db),
            "--policy",
            s(&fake),
        ],
        LIMIT,
    );
    expect_usage(&r, "--policy", "not an ONNX model");
    if !kvm_available() {
        return;
    }
    // The monitor's old flags are refused with the way to learn now.
    for (flag, field) in [
        (&["--learn"][..], "learn (--learn)"),
        (&["--learn-every", "5"][..], "learn_every (--learn-every)"),
    ] {
        let r = run_kernel("cpu-burn", flag, LIMIT);
        r.expect_status(2);
        assert!(r.stderr.contains(field), "{}", r.stderr);
        assert!(r.stderr.contains("vmm-learn online"), "{}", r.stderr);
    }
    let _machine = alone();
    // A live VM, but no repository or not one.
    let (vm, vm_db, sock) = start_vm(&dir, "schedule=cpu:6000");
    let r = vmm_learn(
        &["online", "--api-sock", s(&sock), "--state-db", s(&db)],
        LIMIT,
    );
    expect_usage(&r, "--state-db", "does not exist");
    let r = vmm_learn(
        &["online", "--api-sock", s(&sock), "--state-db", s(&file)],
        LIMIT,
    );
    expect_usage(&r, "--state-db", "not a VM's state repository");
    // A model of another kind (not the learner's MLP).
    let run_with = |policy: &Path| {
        vmm_learn(
            &[
                "online",
                "--api-sock",
                s(&sock),
                "--state-db",
                s(&vm_db),
                "--policy",
                s(policy),
            ],
            LIMIT,
        )
    };
    let r = run_with(&repo_dir().join("models/test-policy.onnx"));
    expect_usage(&r, "--policy", "not a Q-network exported by the learner");
    // general.onnx with a card scored with other reward weights than the VM's.
    let other = dir.path("other.onnx");
    std::fs::copy(repo_dir().join("models/general.onnx"), &other).unwrap();
    let mut card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("models/general.card.json")).unwrap(),
    )
    .unwrap();
    card["reward_weights"]["free"] = serde_json::json!(1.0);
    std::fs::write(dir.path("other.card.json"), card.to_string()).unwrap();
    let r = run_with(&other);
    expect_usage(&r, "--policy", "does not fit this VM");
    let finished = finish(vm, "the VM", LIMIT);
    finished.expect_status(0);
    // The VM is gone: its socket refuses (or is removed).
    let r = vmm_learn(
        &["online", "--api-sock", s(&sock), "--state-db", s(&vm_db)],
        LIMIT,
    );
    run_is_usage_about_socket(&r);
}

fn run_is_usage_about_socket(r: &Run) {
    r.expect_status(2);
    assert!(r.stderr.contains("--api-sock"), "{}", r.stderr);
    assert!(
        r.stderr.contains("does not exist") || r.stderr.contains("no VM serves it"),
        "{}",
        r.stderr
    );
}
