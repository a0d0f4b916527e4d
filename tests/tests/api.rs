//! The control API over HTTP/1.1: curl on the Unix socket, every route with every
//! telemetry option and a policy under seccomp, the socket's mode and ownership, and
//! hostile clients (garbage, oversized requests, idle connections, a full fd table).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{
    api, curl, kernel_command, kernel_path, kvm_available, run_kernel, thread_is_filtered, vmm_bin,
    wait_for, Scratch,
};

const LIMIT: Duration = Duration::from_secs(60);

fn repo_file(rel: &str) -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
        .to_str()
        .unwrap()
        .to_string()
}

fn disk(dir: &Scratch) -> String {
    let p = dir.path("d.img");
    std::fs::write(&p, vec![0u8; 16 << 20]).unwrap();
    p.to_str().unwrap().to_string()
}

/// Writes `bytes` on a fresh connection and returns what the server answers.
fn raw(sock: &str, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_route_answers_over_curl_with_telemetry_and_a_policy_under_seccomp() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("api-routes");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let db = dir.path("t.db");
    let port = 21000 + (std::process::id() % 20000) as u16;
    let model = repo_file("models/test-policy.onnx");
    let child = kernel_command("blk-io", &["--mem-mib", "64"])
        .args(["--drive", &format!("path={}", disk(&dir))])
        .args(["--cmdline", "mode=randread ms=5000 depth=4"])
        .args(["--policy", &model, "--state-db", db.to_str().unwrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--api-sock", sock])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        thread_is_filtered(child.id(), "vmm-api"),
        "the API thread has its own filter"
    );
    // GET /vm twice: the dirty log is the sampler's; the VM must not die (was SIGSYS).
    for _ in 0..2 {
        let (code, vm) = curl(sock, "GET", "/vm", None);
        assert_eq!(code, 200, "{vm}");
        assert_eq!(vm["vcpus"], 1, "{vm}");
        assert_eq!(vm["drives"][0]["id"], "blk0", "{vm}");
    }
    let (code, drives) = curl(sock, "GET", "/drives", None);
    assert_eq!(
        (code, drives[0]["id"].as_str()),
        (200, Some("blk0")),
        "{drives}"
    );
    let (code, d) = curl(
        sock,
        "PATCH",
        "/drives/blk0",
        Some(
            r#"{"priority":"high","rate_limiter":{"bandwidth":{"size":4000000,"refill_time_ms":100}}}"#,
        ),
    );
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["priority"], "high", "{d}");
    assert_eq!(d["rate_limiter"]["bandwidth"]["size"], 4000000, "{d}");
    let (code, v) = curl(sock, "PATCH", "/vm", Some(r#"{"vcpus":1,"host_cores":1}"#));
    assert_eq!(
        (code, &v["active_vcpus"]),
        (200, &serde_json::json!(1)),
        "{v}"
    );
    let (code, p) = curl(sock, "GET", "/policy", None);
    assert_eq!(code, 200, "{p}");
    assert!(p["policy"].as_str().is_some_and(|s| !s.is_empty()), "{p}");
    let (code, p) = curl(
        sock,
        "PUT",
        "/policy",
        Some(&format!(r#"{{"path":"{model}"}}"#)),
    );
    assert_eq!(code, 200, "reload on the API thread, under its filter: {p}");
    let (code, e) = curl(
        sock,
        "PUT",
        "/policy",
        Some(r#"{"path":"/nonexistent.onnx"}"#),
    );
    assert_eq!(code, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|s| s.contains("previous one stays")),
        "{e}"
    );
    // A FIFO as the model would block the thread that opens it: refused up front.
    let fifo = dir.path("fifo.onnx");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let (code, e) = curl(
        sock,
        "PUT",
        "/policy",
        Some(&format!(r#"{{"path":"{}"}}"#, fifo.display())),
    );
    assert_eq!(code, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|s| s.contains("not a regular file")),
        "{e}"
    );
    // Refusals with their status and a JSON error.
    for (method, path, body, want) in [
        ("GET", "/nothing", None, 404),
        ("DELETE", "/vm", None, 405),
        ("PATCH", "/vm", Some(r#"{"vcpu":1}"#), 400),
        ("PATCH", "/vm", Some("not json"), 400),
        ("PATCH", "/drives/nope", Some("{}"), 404),
    ] {
        let (code, e) = curl(sock, method, path, body);
        assert_eq!(code, want, "{method} {path}: {e}");
        assert!(e["error"].is_string(), "{method} {path}: {e}");
    }
    // `vmm api` keeps its interface.
    let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["vcpus"], 1, "{v}");
    let v = api(sock, r#"{"method":"GET","path":"/nothing"}"#);
    assert_eq!(v["status"], 404, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(0), "the guest's own exit status\n{stderr}");
    assert!(!stderr.contains("SIGSYS"), "{stderr}");
}

#[test]
fn the_socket_is_private_and_a_live_one_is_not_taken_over() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("api-socket");
    let sock = dir.path("api.sock");
    let sock_s = sock.to_str().unwrap();
    // umask 000 would make a plain bind 0777.
    let script = format!(
        "umask 000; exec {} run --kernel {} --cmdline ms=3000 --api-sock {}",
        vmm_bin().display(),
        kernel_path("cpu-burn").display(),
        sock_s
    );
    let first = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock_s);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // A second VM on the live socket is refused, naming the setting.
    let second = run_kernel("hello", &["--api-sock", sock_s], LIMIT);
    second.expect_status(2);
    assert!(second.stderr.contains("api_sock"), "{}", second.stderr);
    assert!(
        second.stderr.contains("another monitor"),
        "{}",
        second.stderr
    );
    // The first still answers.
    assert_eq!(curl(sock_s, "GET", "/vm", None).0, 200);
    let (status, stderr) = finish(first);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        !sock.exists(),
        "the socket is removed at the end of the run"
    );
    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    run_kernel("hello", &["--api-sock", sock_s], LIMIT).expect_status(0);
    // Something that is not a socket is left alone.
    let plain = dir.path("plain");
    std::fs::write(&plain, b"keep me").unwrap();
    let refused = run_kernel("hello", &["--api-sock", plain.to_str().unwrap()], LIMIT);
    refused.expect_status(2);
    assert!(refused.stderr.contains("api_sock"), "{}", refused.stderr);
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
}

#[test]
fn garbage_oversized_and_idle_clients_do_not_hurt_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("api-hostile");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=9000"])
        .args(["--api-sock", sock])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    let answer = raw(sock, b"hello there\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let answer = raw(sock, b"{\"method\":\"GET\",\"path\":\"/vm\"}\n\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the old JSON lines: {answer:?}"
    );
    let answer = raw(
        sock,
        b"PUT /policy HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    let answer = raw(sock, &vec![b'A'; 20_000]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // A client that never finishes its request is told after 5 s and closed.
    let answer = raw(sock, b"GET /vm HTTP/1.1\r\nHost: x\r\n");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // 50 idle connections (beyond the cap of 16) do not stop a later request.
    let idle: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(sock).expect("connect"))
        .collect();
    let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    assert_eq!(v["status"], 200, "{v}");
    drop(idle);
    let (status, stderr) = finish(child);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stderr.lines().count() < 50, "{stderr}");
}

#[test]
fn a_full_descriptor_table_backs_off_without_flooding_the_log() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("api-emfile");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("cpu-burn", &["--cmdline", "ms=6000"])
        .args(["--api-sock", sock])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    let pid = child.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // The socket appears before the vCPU threads start and the monitor opens their
    // schedstat files: on a slow (cold) start those came after the count, and the table
    // was full before the first connection. Count once the number holds still.
    let mut open = fds();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fds();
        if now == open {
            break;
        }
        open = now;
    }
    // Room for two more descriptors only.
    let limit = open + 2;
    let ok = Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={limit}:{limit}")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(ok.success());
    let idle: Vec<UnixStream> = (0..20)
        .filter_map(|_| UnixStream::connect(sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // Still answered: the server closes its oldest idle connection to make room.
    let out = Command::new(vmm_bin())
        .args(["api", "--sock", sock, r#"{"method":"GET","path":"/vm"}"#])
        .output()
        .expect("vmm api");
    drop(idle);
    let (status, stderr) = finish(child);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains(r#""status":200"#),
        "answer {answer:?}, client {:?}\n--- monitor\n{stderr}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status, Some(0), "{stderr}");
    let lines = stderr
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(lines >= 1, "EMFILE was provoked: {stderr}");
    assert!(lines <= 3, "{lines} lines: {stderr}");
}
