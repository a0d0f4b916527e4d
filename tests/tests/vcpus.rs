//! Hot-adjusting vCPUs: the guest is asked to use fewer vCPUs through the vCPU control
//! device, the parked vCPU's thread stops running guest code, the work rate drops, and
//! everything comes back when the vCPU is wanted again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{api, kernel_path, kvm_available, vmm_bin, wait_for, Scratch};

/// (guest ops, vCPU 1 guest ns) over one second.
fn measure(sock: &str) -> (f64, f64) {
    let read = || {
        let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
        let ops = v["body"]["guest"]["ops"].as_u64().expect("ops") as f64;
        let g1 = v["body"]["vcpu_guest_ns"][1].as_u64().expect("guest ns") as f64;
        (ops, g1, Instant::now())
    };
    let (o0, g0, t0) = read();
    std::thread::sleep(Duration::from_millis(1000));
    let (o1, g1, t1) = read();
    let secs = t1.duration_since(t0).as_secs_f64();
    ((o1 - o0) / secs, (g1 - g0) / secs)
}

#[test]
fn dropping_a_vcpu_parks_it_and_raising_it_back_resumes() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("vcpus");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let kernel = kernel_path("cpu-burn");
    let child = Command::new(vmm_bin())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", "2"])
        .args([
            "--cmdline",
            "ms=7000 report_ms=20 ctl_ms=5",
            "--api-sock",
            sock,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(500));
    let (ops2, g2) = measure(sock);
    let v = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"vcpus":1}}"#,
    );
    assert_eq!(v["status"], 200, "{v}");
    std::thread::sleep(Duration::from_millis(200));
    let parked = api(sock, r#"{"method":"GET","path":"/vm"}"#)["body"]["parked_vcpus"].clone();
    let (ops1, g1) = measure(sock);
    let v = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"vcpus":2}}"#,
    );
    assert_eq!(v["status"], 200, "{v}");
    std::thread::sleep(Duration::from_millis(200));
    let (ops2b, g2b) = measure(sock);
    let refused = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"vcpus":3}}"#,
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "ops/s: 2 vCPUs {ops2:.3e}, 1 vCPU {ops1:.3e} ({:.2}), back to 2 {ops2b:.3e}; \
         vCPU 1 guest time/s: {g2:.2e}, {g1:.2e}, {g2b:.2e}",
        ops1 / ops2
    );
    assert_eq!(parked, 1, "vCPU 1 must be parked in the monitor");
    assert!(
        g1 < 0.05 * g2,
        "a parked vCPU runs no guest code: {g1:.2e} vs {g2:.2e} ns/s"
    );
    assert!(g2b > 0.5 * g2, "vCPU 1 resumes: {g2b:.2e} vs {g2:.2e} ns/s");
    // The work rate follows the vCPUs in use when the host has a core for each: about half
    // with one vCPU. On a host already saturated by other work two vCPUs cannot run at
    // once anyway, so the rate is then only reported.
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    if ops2 > 1.5 * ops1 || load < cores + 0.5 {
        assert!(
            (0.35..=0.65).contains(&(ops1 / ops2)),
            "one vCPU should do about half: {:.2}",
            ops1 / ops2
        );
        assert!(
            ops2b > 1.5 * ops1,
            "the rate must come back: {ops2b:.3e} vs {ops1:.3e}"
        );
    } else {
        eprintln!("rate check not applicable: host load {load:.1} on {cores} cores leaves no core for a second vCPU");
    }
    assert_eq!(refused["status"], 400, "{refused}");
}
