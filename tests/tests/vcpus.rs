//! Hot-adjusting vCPUs: the guest is asked to use fewer vCPUs through the vCPU control
//! device, the parked vCPU's thread stops running guest code, the work rate drops, and
//! everything comes back when the vCPU is wanted again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{api, kernel_path, kvm_available, vmm_bin, wait_for, Scratch};

/// Both tests measure what the guest gets from the host's cores: they run one at a time
/// (the harness runs two at once, and on a 2-core host the other VM halves the rates).
static MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    MACHINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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

/// Starts `cpu-burn` for 7 s on 2 vCPUs with a control socket at `sock`, and waits until
/// it is up and burning.
fn spawn_cpu_burn(sock: &str) -> std::process::Child {
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
    child
}

#[test]
fn dropping_a_vcpu_parks_it_and_raising_it_back_resumes() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("vcpus");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = spawn_cpu_burn(sock);
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

/// Thread ids of a monitor's vCPU threads (named `vcpu0`, `vcpu1`, ...), sorted.
fn vcpu_thread_ids(pid: u32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vcpu"))
        })
        .filter_map(|t| t.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    tids.sort_unstable();
    tids
}

/// CPU time the threads `tids` of `pid` have had, in ns (`schedstat`, field 1).
fn cpu_ns(pid: u32, tids: &[i32]) -> f64 {
    tids.iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/task/{t}/schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum()
}

/// (guest ops per second, host cores the vCPU threads used) over one second.
fn measure_cores(sock: &str, pid: u32, tids: &[i32]) -> (f64, f64) {
    let c0 = cpu_ns(pid, tids);
    let t0 = Instant::now();
    let (ops, _) = measure(sock);
    let c1 = cpu_ns(pid, tids);
    (ops, (c1 - c0) / 1e9 / t0.elapsed().as_secs_f64())
}

/// The vCPU cgroup's quota file (v1 `cpu.cfs_quota_us`, v2 `cpu.max`), trimmed.
fn quota_file(dir: &std::path::Path, mode: &str) -> String {
    let name = if mode == "v2" {
        "cpu.max"
    } else {
        "cpu.cfs_quota_us"
    };
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
        .trim()
        .to_string()
}

#[test]
fn host_cores_caps_the_vcpu_threads_with_a_cgroup_cpu_quota() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("vcpus-quota");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let mut child = spawn_cpu_burn(sock);
    let vm = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    let quota = vm["body"]["cpu_quota"].clone();
    let mode = quota["mode"].as_str().unwrap_or("none").to_string();
    if mode == "none" {
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI hosts must offer a cgroup v1 or v2 cpu controller: {quota}"
        );
        eprintln!("skipped: no CPU quota on this host: {}", quota["reason"]);
        return;
    }
    let all_cores = vm["body"]["host_cores"].as_u64().expect("host_cores");
    let cg = std::path::PathBuf::from(quota["path"].as_str().expect("cgroup path"));
    assert!(
        cg.ends_with(format!("vmm-{}-vcpus", child.id())),
        "{}",
        cg.display()
    );
    assert!(cg.is_dir(), "{} must exist while the VM runs", cg.display());
    let vcpus = vcpu_thread_ids(child.id());
    assert_eq!(vcpus.len(), 2, "two vCPU threads");
    let (free, free_cores) = measure_cores(sock, child.id(), &vcpus);

    let v = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"host_cores":1}}"#,
    );
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["cpu_quota"]["cores"], 1.0, "{v}");
    assert!(v["body"]["cpu_quota"]["error"].is_null(), "{v}");
    let members = if mode == "v2" {
        "cgroup.threads"
    } else {
        "tasks"
    };
    let mut inside: Vec<i32> = std::fs::read_to_string(cg.join(members))
        .unwrap()
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    inside.sort_unstable();
    assert_eq!(inside, vcpus, "the cgroup holds exactly the vCPU threads");
    let one_core = if mode == "v2" {
        "100000 100000"
    } else {
        "100000"
    };
    assert_eq!(quota_file(&cg, &mode), one_core);
    if mode == "v1" {
        let period = std::fs::read_to_string(cg.join("cpu.cfs_period_us")).unwrap();
        assert_eq!(period.trim(), "100000");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (one, one_cores) = measure_cores(sock, child.id(), &vcpus);

    let v = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"cpu_quota":0.25}}"#,
    );
    assert_eq!(v["status"], 200, "{v}");
    let quarter = if mode == "v2" {
        "25000 100000"
    } else {
        "25000"
    };
    assert_eq!(quota_file(&cg, &mode), quarter);
    std::thread::sleep(Duration::from_millis(300));
    let (capped, capped_cores) = measure_cores(sock, child.id(), &vcpus);

    let refused = api(
        sock,
        r#"{"method":"PATCH","path":"/vm","body":{"cpu_quota":0}}"#,
    );
    let v = api(
        sock,
        &format!(r#"{{"method":"PATCH","path":"/vm","body":{{"host_cores":{all_cores}}}}}"#),
    );
    assert_eq!(v["status"], 200, "{v}");
    assert!(v["body"]["cpu_quota"]["cores"].is_null(), "{v}");
    let unlimited = if mode == "v2" { "max 100000" } else { "-1" };
    assert_eq!(quota_file(&cg, &mode), unlimited);

    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "cpu quota ({mode}): guest ops/s (host cores used by the vCPU threads): unconfined \
         {free:.3e} ({free_cores:.2}), 1 core {one:.3e} ({one_cores:.2}), \
         0.25 core {capped:.3e} ({capped_cores:.2}); ops ratio {:.2}",
        capped / free.max(one)
    );
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(!cg.exists(), "{} must be removed at the end", cg.display());
    // The quota is a ceiling on the threads' CPU time whatever else the host runs (some
    // slack for the window not matching the 100 ms periods).
    assert!(one_cores < 1.15, "1-core quota: {one_cores:.2} cores used");
    assert!(
        capped_cores < 0.32,
        "0.25-core quota: {capped_cores:.2} cores used"
    );
    // The guest feels it: unless the host was so loaded that the unconfined vCPUs got
    // less than half a core, a quarter core does well under their rate.
    if free_cores.max(one_cores) >= 0.5 {
        assert!(
            capped < 0.75 * free.max(one),
            "a 0.25-core quota must cut the work rate: {capped:.3e} vs {:.3e} ops/s",
            free.max(one)
        );
    } else {
        eprintln!("rate check not applicable: the unconfined vCPUs got {free_cores:.2} cores");
    }
}
