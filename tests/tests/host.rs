//! `vmm host`: three VMs (each its own `vmm run`) under one arbiter: `GET /host` lists
//! them with pids and grants within the budget, one VM killed leaves the others running,
//! SIGTERM stops them all (exit 143, nothing left behind), every VM's rows land in the
//! one state repository; a critical VM missing its SLO takes the batch VM's cores; the
//! grant as a cap on a VM's knobs through its API; bad host configurations exit 2 naming
//! the field, before any VM starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    api, api_with, curl, kernel_command, kernel_path, kvm_available, vmm_bin, vmm_release_bin,
    wait_for, Scratch,
};
use serde_json::Value;

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn kernel(name: &str) -> String {
    s(&kernel_path(name))
}

/// A host.json in `dir` for three VMs: a critical `blk-io` doing random reads, a
/// standard one-vCPU and a batch two-vCPU `cpu-burn`, each running for `ms`.
fn three_vms(dir: &Scratch, ms: u64) -> PathBuf {
    let img = dir.path("web.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let cfg = serde_json::json!({
        "api_sock": s(&dir.path("host.sock")),
        "state_db": s(&dir.path("host.db")),
        "log_dir": s(&dir.0),
        "interval_ms": 300,
        "stop_timeout_ms": 10000,
        "devices": [{"path": s(&dir.0), "bandwidth_bps": 200_000_000u64}],
        "vms": [
            {"id": "web", "op_bytes": 4096,
             "vm": {"kernel": kernel("blk-io"), "cmdline": format!("mode=randread ms={ms}"),
                    "slo": {"class": "critical", "min_ops": 100},
                    "drives": [{"path": s(&img), "read_only": true}],
                    "metrics_interval_ms": 200}},
            {"id": "app",
             "vm": {"kernel": kernel("cpu-burn"), "vcpus": 1, "cmdline": format!("ms={ms}"),
                    "slo": {"class": "standard"},
                    "metrics_interval_ms": 200}},
            {"id": "batch",
             "vm": {"kernel": kernel("cpu-burn"), "vcpus": 2, "cmdline": format!("ms={ms}"),
                    "slo": {"class": "batch"},
                    "tuner": "threshold", "metrics_interval_ms": 200}}
        ]
    });
    let path = dir.path("host.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    path
}

fn start_host(bin: &Path, config: &Path) -> Child {
    Command::new(bin)
        .args(["host", "--config", &s(config)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm host")
}

fn get_host(sock: &str) -> Value {
    let (code, body) = curl(sock, "GET", "/host", None);
    assert_eq!(code, 200, "{body}");
    body
}

fn vm<'a>(host: &'a Value, id: &str) -> &'a Value {
    host["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["id"] == id))
        .unwrap_or_else(|| panic!("no VM {id} in {host}"))
}

fn alive(pid: u64) -> bool {
    // A zombie is gone for our purposes: its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|t| {
            t.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Polls `GET /host` until `ok` holds (at most `limit`), returning the last answer.
fn wait_host(sock: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = get_host(sock);
        if ok(&h) || start.elapsed() > limit {
            return h;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn finish(child: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    let mut child = child;
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "vmm host did not stop within {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn all_granted(h: &Value) -> bool {
    h["vms"].as_array().is_some_and(|v| {
        v.iter()
            .all(|v| v["state"] == "running" && v["grant"].is_object())
    })
}

/// Starts the three-VM host with `bin`, checks `GET /host`, the grants in the VMs
/// themselves, and SIGTERM; returns the scratch dir (for the repository) and stderr.
fn three_vms_under(bin: &Path, name: &str, kill_one: bool) -> (Scratch, String) {
    let dir = Scratch::new(name);
    let config = three_vms(&dir, 60_000);
    let sock = s(&dir.path("host.sock"));
    let child = start_host(bin, &config);
    let host_pid = child.id();
    wait_for(&sock);
    let h = wait_host(&sock, Duration::from_secs(30), all_granted);
    assert!(all_granted(&h), "not every VM running with a grant: {h:#}");
    let budget = h["budget"]["cores"].as_f64().unwrap();
    let granted: f64 = h["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["grant"]["cores"].as_f64().unwrap())
        .sum();
    assert!(
        granted <= budget + 1e-6,
        "grants {granted} > budget {budget}: {h:#}"
    );
    let mut pids = Vec::new();
    for id in ["web", "app", "batch"] {
        let v = vm(&h, id);
        let pid = v["pid"].as_u64().expect("pid");
        assert!(alive(pid), "VM {id} (pid {pid}) is not running");
        assert_ne!(pid, u64::from(host_pid));
        pids.push(pid);
        // The grant is in force in the VM itself, as a cap on its host cores.
        let sock_vm = v["api_sock"].as_str().unwrap();
        let g = api_with(bin, sock_vm, r#"{"method":"GET","path":"/grant"}"#);
        assert_eq!(g["status"], 200, "{g}");
        let cores = g["body"]["cores"].as_f64().expect("a core grant");
        let host_cores = g["body"]["host_cores"].as_u64().unwrap() as f64;
        assert!(host_cores <= cores.ceil(), "VM {id}: {g}");
    }
    // Placement: the critical VM's threads (vCPUs and event loop included) run on CPUs of
    // its own, the others on the rest (grants move between intervals: read again until
    // one interval's grants and the threads agree).
    let mut last = String::new();
    let placed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let h = get_host(&sock);
        match placement_holds(&h) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(placed, "placement: {last}");
    // The critical VM's drive sits on the budgeted device: it has a bandwidth grant.
    assert!(
        vm(&h, "web")["grant"]["drives"]["blk0"]["bandwidth_bps"]
            .as_u64()
            .unwrap()
            > 0,
        "{h:#}"
    );
    if kill_one {
        // One VM crashes: the others keep running, GET /host shows it exited.
        // SAFETY: signalling a child of the host started by this test.
        unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
        let h = wait_host(&sock, Duration::from_secs(10), |h| {
            vm(h, "app")["state"] == "exited"
        });
        assert_eq!(vm(&h, "app")["state"], "exited", "{h:#}");
        assert_eq!(vm(&h, "app")["signal"], libc::SIGKILL, "{h:#}");
        std::thread::sleep(Duration::from_millis(1000));
        let h = get_host(&sock);
        for id in ["web", "batch"] {
            assert_eq!(vm(&h, id)["state"], "running", "{h:#}");
        }
        assert!(alive(pids[0]) && alive(pids[2]));
    }
    // SIGTERM stops them all cleanly.
    // SAFETY: signalling the host process this test started.
    unsafe { libc::kill(host_pid as i32, libc::SIGTERM) };
    let (status, stderr) = finish(child, Duration::from_secs(30));
    assert_eq!(status, Some(143), "{stderr}");
    for (pid, id) in pids.iter().zip(["web", "app", "batch"]) {
        assert!(!alive(*pid), "VM {id} (pid {pid}) outlived the host");
    }
    assert!(!Path::new(&sock).exists(), "the host socket is left");
    for id in ["web", "app", "batch"] {
        let sock_vm = vm(&h, id)["api_sock"].as_str().unwrap().to_string();
        assert!(!Path::new(&sock_vm).exists(), "{sock_vm} is left");
    }
    (dir, stderr)
}

#[test]
fn three_vms_share_the_host_survive_a_crash_and_stop_together() {
    if !kvm_available() {
        return;
    }
    let (dir, stderr) = three_vms_under(&vmm_bin(), "three", true);
    assert!(stderr.contains("VM app was killed by signal 9"), "{stderr}");
    // Every VM's rows are in the one repository, each with its own id.
    let db = rusqlite::Connection::open(dir.path("host.db")).unwrap();
    for id in ["web", "app", "batch"] {
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM samples WHERE vm_id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(n > 0, "no rows of VM {id} in the shared repository");
    }
}

#[test]
fn the_release_binary_runs_three_vms_under_seccomp() {
    if !kvm_available() {
        return;
    }
    let Some(bin) = vmm_release_bin() else {
        return;
    };
    // The grant route runs on each VM's event loop under its seccomp filter; a refused
    // system call would leave a VM without a grant (all_granted fails) or kill it.
    let (_dir, stderr) = three_vms_under(&bin, "three-release", false);
    assert!(!stderr.contains("not taken"), "{stderr}");
}

#[test]
fn the_grant_caps_host_cores_and_drive_bandwidth_through_the_api() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("grant-api");
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = s(&dir.path("vm.sock"));
    let mut child = kernel_command(
        "cpu-burn",
        &[
            "--vcpus",
            "2",
            "--cmdline",
            "ms=20000",
            "--api-sock",
            &sock,
            "--drive",
            &format!("path={},read-only", s(&img)),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn vmm run");
    wait_for(&sock);
    let total = vmm::runtime::allowed_cpus().len() as u64;
    let put = |body: &str| {
        api(
            &sock,
            &format!(r#"{{"method":"PUT","path":"/grant","body":{body}}}"#),
        )
    };
    let vm_cores = || api(&sock, r#"{"method":"GET","path":"/vm"}"#)["body"]["host_cores"].as_u64();
    assert_eq!(vm_cores(), Some(total));
    // A grant of one core: applied at once.
    let g = put(r#"{"cores": 1, "drives": {"blk0": {"bandwidth_bps": 1000000}}}"#);
    assert_eq!(g["status"], 200, "{g}");
    assert_eq!(vm_cores(), Some(1));
    // Asking for more than the grant gives the grant.
    let p = api(
        &sock,
        &format!(r#"{{"method":"PATCH","path":"/vm","body":{{"host_cores":{total}}}}}"#),
    );
    assert_eq!(p["status"], 200, "{p}");
    assert_eq!(p["body"]["host_cores"], 1, "{p}");
    // The drive's bandwidth is capped at the grant, the same on every route.
    let (code, drives) = curl(&sock, "GET", "/drives", None);
    assert_eq!(code, 200);
    let bw = &drives[0]["rate_limiter"]["bandwidth"];
    let rate = bw["size"].as_f64().unwrap() * 1000.0 / bw["refill_time_ms"].as_f64().unwrap();
    assert_eq!(rate, 1_000_000.0, "{drives}");
    let (code, _) = curl(
        &sock,
        "PATCH",
        "/drives/blk0",
        Some(r#"{"rate_limiter": {}}"#),
    );
    assert_eq!(code, 200);
    let (_, drives) = curl(&sock, "GET", "/drives", None);
    assert!(
        drives[0]["rate_limiter"]["bandwidth"].is_object(),
        "{drives}"
    );
    // A larger grant gives back what was asked (all cores; no drive limit).
    let g = put(r#"{"cores": 64}"#);
    assert_eq!(g["status"], 200, "{g}");
    assert_eq!(vm_cores(), Some(total));
    let (_, drives) = curl(&sock, "GET", "/drives", None);
    assert!(drives[0]["rate_limiter"]["bandwidth"].is_null(), "{drives}");
    // A CPU list places every thread of the VM there: its vCPUs and its event loop
    // (the process's main thread) alike; without one they get their start CPUs back.
    let last_cpu = *vmm::runtime::allowed_cpus().last().unwrap();
    let g = put(&format!(r#"{{"cores": 64, "cpus": [{last_cpu}]}}"#));
    assert_eq!(g["status"], 200, "{g}");
    assert_eq!(g["body"]["cpus"], serde_json::json!([last_cpu]), "{g}");
    let pid = child.id();
    let threads = |want: &str| {
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let tid = t.file_name().to_string_lossy().to_string();
            if comm.starts_with("vcpu") || tid == pid.to_string() {
                let theirs = allowed_list(&t.path().join("status").display().to_string());
                assert_eq!(theirs, want, "thread {tid} ({})", comm.trim());
            }
        }
    };
    threads(&last_cpu.to_string());
    let g = put(r#"{"cores": 64}"#);
    assert_eq!(g["status"], 200, "{g}");
    threads(&allowed_list("/proc/self/status"));
    // Bad grants are refused, naming the field; the grant in force stays.
    for (body, field) in [
        (r#"{"cores": 0}"#, "cores"),
        (r#"{"drives": {"blk9": {"bandwidth_bps": 1}}}"#, "blk9"),
        (
            r#"{"drives": {"blk0": {"bandwidth_bps": 0}}}"#,
            "bandwidth_bps",
        ),
        (r#"{"cpu_set": 1}"#, "cpu_set"),
        (r#"{"cpus": []}"#, "cpus"),
        (r#"{"cpus": [1023]}"#, "cpus: CPU 1023"),
    ] {
        let r = put(body);
        assert_eq!(r["status"], 400, "{body}: {r}");
        assert!(r["error"].as_str().unwrap().contains(field), "{body}: {r}");
    }
    let g = api(&sock, r#"{"method":"GET","path":"/grant"}"#);
    assert_eq!(g["body"]["cores"], 64.0, "{g}");
    // SAFETY: signalling the monitor this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
}

#[test]
fn bad_host_configurations_exit_2_naming_the_field_before_any_vm_starts() {
    let dir = Scratch::new("bad-host");
    for img in ["a.img", "b.img"] {
        std::fs::write(dir.path(img), vec![0u8; 1 << 20]).unwrap();
    }
    let allowed = vmm::runtime::allowed_cpus();
    let too_many = format!("0-{}", allowed.iter().max().unwrap() + 1);
    let vm = |id: &str, extra: Value| {
        let mut v = serde_json::json!({"kernel": kernel("blk-io"), "slo": {"class": "batch"}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        serde_json::json!({"id": id, "vm": v})
    };
    let drive = |f: &str| serde_json::json!({"drives": [{"path": s(&dir.path(f))}]});
    let cases: Vec<(&str, Value, Vec<Value>, &str)> = vec![
        (
            "budget larger than the host",
            serde_json::json!({"cpus": too_many}),
            vec![vm("a", serde_json::json!({}))],
            "cpus",
        ),
        (
            "two VMs on one socket",
            serde_json::json!({}),
            vec![
                vm(
                    "a",
                    serde_json::json!({"api_sock": s(&dir.path("vm.sock"))}),
                ),
                vm(
                    "b",
                    serde_json::json!({"api_sock": s(&dir.path("vm.sock"))}),
                ),
            ],
            "vms.b.vm.api_sock",
        ),
        (
            "two VMs on one image",
            serde_json::json!({}),
            vec![vm("a", drive("a.img")), vm("b", drive("a.img"))],
            "vms.b.vm.drives[0].path",
        ),
        (
            "an SLO the bandwidth budget cannot meet",
            serde_json::json!({"devices": [{"path": s(&dir.0), "bandwidth_bps": 1_000_000}]}),
            vec![{
                let mut v = vm("a", drive("a.img"));
                v["op_bytes"] = 4096.into();
                v["vm"]["slo"] = serde_json::json!({"class": "critical", "min_ops": 10_000});
                v
            }],
            "vms.a.vm.slo.min_ops",
        ),
        (
            "duplicate ids",
            serde_json::json!({}),
            vec![vm("a", drive("a.img")), vm("a", drive("b.img"))],
            "vms[1].id",
        ),
    ];
    for (what, extra, vms, field) in cases {
        let mut cfg = serde_json::json!({
            "api_sock": s(&dir.path("host.sock")),
            "state_db": s(&dir.path("host.db")),
            "log_dir": s(&dir.0),
            "vms": vms,
        });
        for (k, x) in extra.as_object().unwrap() {
            cfg[k] = x.clone();
        }
        let path = dir.path("host.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let out = Command::new(vmm_bin())
            .args(["host", "--config", &s(&path)])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.starts_with(&format!("vmm: error: {field} ")),
            "{what}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
        // Nothing started: no socket, no repository, no VM log.
        for f in ["host.sock", "host.db", "a.log", "b.log"] {
            assert!(!dir.path(f).exists(), "{what}: {f} exists");
        }
    }
}

#[test]
fn a_critical_vm_missing_its_slo_takes_the_cores_of_the_batch_vm() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("reclaim");
    let img = dir.path("web.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    // A budget of (at most) two cores, whatever the machine has: both VMs can use two.
    let cpus: Vec<String> = vmm::runtime::allowed_cpus()
        .iter()
        .take(2)
        .map(|c| c.to_string())
        .collect();
    let budget = cpus.len() as f64;
    // 40 000 reads/s of 4 KiB fit the 200 MB/s budget (so the configuration is valid),
    // but this host's nested KVM serves a few thousand: the SLO is missed every interval.
    let cfg = serde_json::json!({
        "api_sock": s(&dir.path("host.sock")),
        "log_dir": s(&dir.0),
        "interval_ms": 200,
        "cpus": cpus.join(","),
        "devices": [{"path": s(&dir.0), "bandwidth_bps": 200_000_000u64}],
        "vms": [
            {"id": "batch",
             "vm": {"kernel": kernel("cpu-burn"), "vcpus": 2, "cmdline": "ms=60000",
                    "slo": {"class": "batch"}}},
            {"id": "web", "op_bytes": 4096,
             "vm": {"kernel": kernel("blk-io"), "vcpus": 2, "cmdline": "mode=randread ms=60000",
                    "slo": {"class": "critical", "min_ops": 40000},
                    "drives": [{"path": s(&img), "read_only": true}]}}
        ]
    });
    let path = dir.path("host.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let sock = s(&dir.path("host.sock"));
    let child = start_host(&vmm_bin(), &path);
    let host_pid = child.id();
    wait_for(&sock);
    // It grows one CPU per interval while it uses what it holds (its vCPU polls).
    let settled = |h: &Value| {
        vm(h, "web")["slo_state"] == "missed"
            && vm(h, "web")["intervals"].as_u64() >= Some(3)
            && vm(h, "batch")["grant"].is_object()
            && vm(h, "web")["grant"]["cpus"].as_array().map(Vec::len) == Some(cpus.len())
    };
    let h = wait_host(&sock, Duration::from_secs(30), settled);
    assert!(settled(&h), "{h:#}");
    // The critical VM holds all it can use but the batch VM's floor; batch keeps 0.1.
    let web = vm(&h, "web")["grant"]["cores"].as_f64().unwrap();
    let batch = vm(&h, "batch")["grant"]["cores"].as_f64().unwrap();
    assert!((batch - 0.1).abs() < 1e-9, "{h:#}");
    // At risk, the critical VM holds every CPU of the budget as its own (its cap is its
    // vCPUs plus its I/O thread); the batch VM runs at its floor.
    assert!((web - (budget - 0.1)).abs() < 0.011, "{h:#}");
    assert_eq!(
        vm(&h, "web")["grant"]["cpus"].as_array().map(Vec::len),
        Some(cpus.len()),
        "{h:#}"
    );
    assert_eq!(vm(&h, "web")["attainment"], 0.0, "{h:#}");
    // In the batch VM itself: one host core at most, and a CPU quota of 0.1 core where
    // the host has a cgroup for it.
    let g = api(
        vm(&h, "batch")["api_sock"].as_str().unwrap(),
        r#"{"method":"GET","path":"/grant"}"#,
    );
    assert_eq!(g["body"]["host_cores"], 1, "{g}");
    if g["body"]["cpu_quota"]["mode"] != "none" {
        assert_eq!(g["body"]["cpu_quota"]["cores"], 0.1, "{g}");
    }
    // SAFETY: signalling the host process this test started.
    unsafe { libc::kill(host_pid as i32, libc::SIGTERM) };
    let (status, stderr) = finish(child, Duration::from_secs(30));
    assert_eq!(status, Some(143), "{stderr}");
}

#[test]
fn the_baseline_arbiter_modes_grant_as_named() {
    if !kvm_available() {
        return;
    }
    for mode in ["off", "threshold", "pi"] {
        let dir = Scratch::new(&format!("mode-{mode}"));
        let img = dir.path("web.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let cfg = serde_json::json!({
            "api_sock": s(&dir.path("host.sock")),
            "log_dir": s(&dir.0),
            "interval_ms": 200,
            "arbiter": mode,
            "vms": [
                {"id": "batch",
                 "vm": {"kernel": kernel("cpu-burn"), "vcpus": 2, "cmdline": "ms=60000",
                        "slo": {"class": "batch"}}},
                {"id": "web",
                 "vm": {"kernel": kernel("blk-io"), "cmdline": "mode=randread ms=60000",
                        "slo": {"class": "critical", "min_ops": 100},
                        "drives": [{"path": s(&img), "read_only": true}]}}
            ]
        });
        let path = dir.path("host.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let sock = s(&dir.path("host.sock"));
        let child = start_host(&vmm_bin(), &path);
        let host_pid = child.id();
        wait_for(&sock);
        // Both VMs observed for a few intervals.
        let h = wait_host(&sock, Duration::from_secs(30), |h| {
            vm(h, "web")["intervals"].as_u64() >= Some(5)
                && (mode == "off"
                    || ["web", "batch"]
                        .iter()
                        .all(|id| vm(h, id)["grant"].is_object()))
        });
        assert_eq!(h["arbiter"], mode, "{h:#}");
        for id in ["web", "batch"] {
            let g = &vm(&h, id)["grant"];
            if mode == "off" {
                assert!(g.is_null(), "{mode}: {id} has a grant: {h:#}");
            } else {
                // Time only: no placement.
                assert!(
                    g["cores"].as_f64().is_some_and(|c| c > 0.0),
                    "{mode}: {h:#}"
                );
                assert!(g["cpus"].is_null(), "{mode}: {h:#}");
            }
        }
        if mode != "off" {
            let total = vm(&h, "web")["grant"]["cores"].as_f64().unwrap()
                + vm(&h, "batch")["grant"]["cores"].as_f64().unwrap();
            assert!(
                total <= h["budget"]["cores"].as_f64().unwrap() + 1e-6,
                "{h:#}"
            );
        }
        // SAFETY: signalling the host process this test started.
        unsafe { libc::kill(host_pid as i32, libc::SIGTERM) };
        let (status, stderr) = finish(child, Duration::from_secs(30));
        assert_eq!(status, Some(143), "{mode}: {stderr}");
    }
}

#[test]
fn a_host_killed_outright_leaves_no_vm_behind() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("host-killed");
    let cfg = serde_json::json!({
        "api_sock": s(&dir.path("host.sock")),
        "log_dir": s(&dir.0),
        "vms": [{"id": "burn",
                 "vm": {"kernel": kernel("cpu-burn"), "cmdline": "ms=60000", "slo": {"class": "batch"}}}]
    });
    let path = dir.path("host.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let sock = s(&dir.path("host.sock"));
    let mut child = start_host(&vmm_bin(), &path);
    wait_for(&sock);
    let h = wait_host(&sock, Duration::from_secs(30), |h| {
        vm(h, "burn")["state"] == "running"
    });
    let pid = vm(&h, "burn")["pid"].as_u64().expect("pid");
    child.kill().unwrap();
    let _ = child.wait();
    // The VM gets SIGTERM from the kernel (its parent-death signal) and stops.
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(pid), "VM pid {pid} outlived its killed host");
    assert!(
        std::fs::read_to_string(dir.path("burn.log"))
            .unwrap()
            .contains("stopped by signal 15"),
        "{:?}",
        std::fs::read_to_string(dir.path("burn.log"))
    );
}

/// Parses a `Cpus_allowed_list` value (`0-1,3`).
fn cpu_list(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u64>(), b.trim().parse::<u64>()) {
            out.extend(a..=b);
        }
    }
    out
}

/// Checks the slo arbiter's placement against every thread of every running VM: the
/// critical VM `web` has CPUs no other VM is granted, and each VM's threads (all of them:
/// vCPUs, event loop, helpers) are allowed exactly its granted CPUs.
fn placement_holds(h: &Value) -> Result<(), String> {
    let budget = h["budget"]["cpus"].as_array().map_or(0, Vec::len);
    let grant_cpus = |id: &str| -> Vec<u64> {
        vm(h, id)["grant"]["cpus"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let web = grant_cpus("web");
    if budget >= 2 && web.len() != 1 {
        return Err(format!("web does not hold one CPU of its own: {h}"));
    }
    for id in ["web", "app", "batch"] {
        let v = vm(h, id);
        if v["state"] != "running" {
            continue;
        }
        let mine = grant_cpus(id);
        if mine.is_empty() {
            return Err(format!("{id}: no CPU list in its grant: {v}"));
        }
        if id != "web" && budget >= 2 && mine.iter().any(|c| web.contains(c)) {
            return Err(format!("{id} granted web's CPUs {web:?}: {mine:?}"));
        }
        let pid = v["pid"].as_u64().ok_or("no pid")?;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let theirs = cpu_list(&allowed_list(
                &t.path().join("status").display().to_string(),
            ));
            // A vCPU thread may be held to fewer of them (host_cores below the grant).
            let ok = if comm.starts_with("vcpu") {
                !theirs.is_empty() && theirs.iter().all(|c| mine.contains(c))
            } else {
                theirs == mine
            };
            if !ok {
                return Err(format!(
                    "{id}: thread {} ({}) allowed {theirs:?}, granted {mine:?}",
                    t.file_name().to_string_lossy(),
                    comm.trim()
                ));
            }
        }
    }
    Ok(())
}

/// The `Cpus_allowed_list` line of a `/proc/.../status` file.
fn allowed_list(status: &str) -> String {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}
