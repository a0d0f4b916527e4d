//! Helpers for the integration tests: find the built `vmm` binary and the test kernels,
//! run a VM with a time limit, and skip cleanly (or fail under CI) without `/dev/kvm`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use test_kernels::kernel_path;

pub mod hostile_onnx;
pub mod netns;
pub mod postgres;

/// The cargo target directory (`target/`), found from this test executable's path.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The `vmm` binary built in the same profile as this test (target/debug or target/release).
pub fn vmm_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // .../target/<profile>/deps/<test-exe>
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir");
    let bin = profile_dir.join("vmm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace`, as the README's test command does)",
        bin.display()
    );
    bin
}

/// The `vmm-learn` binary (the learner, `learner/src/bin/vmm-learn.rs`) built in the same
/// profile as this test, beside `vmm` (`cargo build --workspace` builds both).
pub fn vmm_learn_bin() -> PathBuf {
    let bin = vmm_bin().with_file_name("vmm-learn");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace`, or `cargo build -p learner`)",
        bin.display()
    );
    bin
}

/// The release-profile `vmm` (target/release/vmm: the binary that ships, panic =
/// "unwind", seccomp on), or `None` when it is not built: under CI (`CI=true`) the test
/// fails loudly; elsewhere it prints `skipped: ...` and the caller returns early.
/// `scripts/test.sh` builds it (`cargo build --release -p vmm`); `VMM_RELEASE_BIN`
/// overrides the path.
pub fn vmm_release_bin() -> Option<PathBuf> {
    // `VMM_RELEASE_BIN` names another binary (e.g. an installed one).
    let bin = std::env::var_os("VMM_RELEASE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/vmm"));
    if bin.exists() {
        return Some(bin);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "{} is missing and CI=true: build it first (cargo build --release -p vmm)",
            bin.display()
        );
    }
    eprintln!(
        "skipped: {} is missing (cargo build --release -p vmm)",
        bin.display()
    );
    None
}

/// Whether KVM is usable. Without it: under CI (`CI=true`) the test fails loudly;
/// elsewhere it prints `skipped: no /dev/kvm` and the caller returns early.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("/dev/kvm is missing or not accessible, and CI=true: KVM tests cannot be skipped in CI");
        }
        eprintln!("skipped: no /dev/kvm");
    }
    ok
}

/// What a `vmm` run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status (None if killed by a signal).
    pub status: Option<i32>,
    /// Guest serial output (stdout).
    pub stdout: String,
    /// Monitor messages (stderr).
    pub stderr: String,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Run {
    fn from_output(out: Output, elapsed: Duration) -> Self {
        Self {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    /// Asserts the exit status, printing both streams when it differs.
    pub fn expect_status(&self, want: i32) -> &Self {
        assert_eq!(
            self.status,
            Some(want),
            "unexpected exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts that stdout contains `line` as a whole line.
    pub fn expect_line(&self, line: &str) -> &Self {
        assert!(
            self.stdout
                .lines()
                .any(|l| l.trim_end_matches('\r') == line),
            "missing line {line:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `vmm` with `args`, stdin closed, and a hard limit of `limit` (the test fails if the
/// monitor hangs past it).
pub fn vmm(args: &[&str], limit: Duration) -> Run {
    run_bin(&vmm_bin(), args, limit)
}

/// Runs `vmm-learn` with `args` as [`vmm`] runs `vmm`.
pub fn vmm_learn(args: &[&str], limit: Duration) -> Run {
    run_bin(&vmm_learn_bin(), args, limit)
}

/// Runs `bin` with `args`, stdin closed, killed (and the test failed) past `limit`.
pub fn run_bin(bin: &Path, args: &[&str], limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    // Poll for the end; kill and fail if the program outlives the limit.
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "{} {args:?} hung for more than {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                    bin.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let out = child.wait_with_output().expect("wait");
    Run::from_output(out, start.elapsed())
}

/// Runs a test kernel: `vmm run --kernel <kernel> <extra...>`.
pub fn run_kernel(kernel: &str, extra: &[&str], limit: Duration) -> Run {
    let path = kernel_path(kernel);
    let path = path.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["run", "--kernel", path.as_str()];
    args.extend_from_slice(extra);
    vmm(&args, limit)
}

/// `vmm run --kernel <test kernel> <extra...>` with stdin closed, for a test that talks to
/// the running monitor; the caller sets stdout and stderr and spawns it.
pub fn kernel_command(kernel: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel_path(kernel))
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

/// A scratch directory unique to this process and `name`, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates the directory.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends one request to a running monitor's control socket with `vmm api` and parses the
/// JSON answer.
pub fn api(sock: &str, request: &str) -> serde_json::Value {
    api_with(&vmm_bin(), sock, request)
}

/// [`api`] with the `vmm api` client of binary `bin` (e.g. the release binary).
pub fn api_with(bin: &Path, sock: &str, request: &str) -> serde_json::Value {
    let out = Command::new(bin)
        .args(["api", "--sock", sock, request])
        .output()
        .expect("vmm api");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits (up to 10 s) for `path` to appear, e.g. a monitor's control socket.
pub fn wait_for(path: &str) {
    let start = Instant::now();
    while !Path::new(path).exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rows of `sql` (a text column, NULL read as "", then an integer column) from the state
/// repository `db`, opened read-only (the VM may still be writing it).
pub fn query_pairs(db: &std::path::Path, sql: &str) -> Vec<(String, i64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c.prepare(sql).unwrap();
    st.query_map([], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            r.get(1)?,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// `curl --unix-socket sock -X method [-d body] http://localhost<path>`: (HTTP status,
/// JSON body); panics when the answer is not JSON.
pub fn curl(sock: &str, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "15",
        "--unix-socket",
        sock,
        "-X",
        method,
    ])
    .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = cmd
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code: u16 = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("curl {method} {path}: body {json:?} is not JSON: {e}"));
    (code, value)
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Whether the thread named `name` of process `pid` runs under a seccomp filter (its
/// `Seccomp:` line says 2); panics when the process has no such thread.
pub fn thread_is_filtered(pid: u32, name: &str) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's tasks");
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            return status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]));
        }
    }
    panic!("no thread {name} in process {pid}");
}
