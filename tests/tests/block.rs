//! virtio-blk end to end: the `blk-io` test kernel drives a drive backed by a host file;
//! the tests check the bytes on both sides, read-only mode, rate limits (also changed
//! mid-run through the control socket) and the guest's GET_ID.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{api, kernel_command, kvm_available, run_kernel, wait_for, Run, Scratch};

const LIMIT: Duration = Duration::from_secs(90);

/// The pattern blk-io's `fill` writes and `check` expects: byte j of sector s.
fn pattern(sector: u64, j: u64, seed: u64) -> u8 {
    ((sector * 131 + j * 7 + seed) & 0xff) as u8
}

fn disk(dir: &Scratch, name: &str, mib: usize) -> String {
    let p = dir.path(name);
    std::fs::write(&p, vec![0u8; mib << 20]).unwrap();
    p.to_str().unwrap().to_string()
}

fn blk_io(drive: &str, cmdline: &str, extra: &[&str]) -> Run {
    let spec = format!("path={drive}");
    let mut args = vec![
        "--drive",
        spec.as_str(),
        "--mem-mib",
        "64",
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    run_kernel("blk-io", &args, LIMIT)
}

/// Parses `key=value` from the result line that starts with `prefix`.
fn field(run: &Run, prefix: &str, key: &str) -> u64 {
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "no line starting {prefix:?} in\n{}\n{}",
                run.stdout, run.stderr
            )
        });
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn guest_writes_reach_the_host_file_byte_for_byte() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-fill");
    let d = disk(&dir, "d.img", 8);
    blk_io(&d, "mode=fill sectors=2048 seed=7 bs=65536", &[])
        .expect_status(0)
        .expect_line("blk-io: fill ok sectors=2048");
    let bytes = std::fs::read(&d).unwrap();
    for s in 0..2048u64 {
        for j in 0..512u64 {
            let got = bytes[(s * 512 + j) as usize];
            assert_eq!(got, pattern(s, j, 7), "sector {s} byte {j}");
        }
    }
    assert!(
        bytes[2048 * 512..].iter().all(|&b| b == 0),
        "nothing written past the range"
    );
}

#[test]
fn host_bytes_are_read_back_by_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-check");
    let d = disk(&dir, "d.img", 8);
    let mut bytes = std::fs::read(&d).unwrap();
    for s in 0..4096u64 {
        for j in 0..512u64 {
            bytes[(s * 512 + j) as usize] = pattern(s, j, 3);
        }
    }
    std::fs::write(&d, &bytes).unwrap();
    blk_io(&d, "mode=check sectors=4096 seed=3", &[])
        .expect_status(0)
        .expect_line("blk-io: check ok sectors=4096");
    // One flipped byte on the host is seen by the guest.
    bytes[1000 * 512 + 17] ^= 0xff;
    std::fs::write(&d, &bytes).unwrap();
    let run = blk_io(&d, "mode=check sectors=4096 seed=3", &[]);
    run.expect_status(1);
    assert!(
        run.stdout
            .contains("blk-io: check mismatch sector=1000 byte=17"),
        "{}",
        run.stdout
    );
}

#[test]
fn read_only_drive_refuses_writes_and_keeps_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-ro");
    let d = disk(&dir, "d.img", 1);
    let spec = format!("path={d},read-only");
    let args = ["--drive", spec.as_str(), "--mem-mib", "64", "--cmdline"];
    let mut a = args.to_vec();
    a.push("mode=capacity");
    run_kernel("blk-io", &a, LIMIT)
        .expect_status(0)
        .expect_line("blk-io: capacity=2048 ro=1");
    let mut a = args.to_vec();
    a.push("mode=rotest");
    run_kernel("blk-io", &a, LIMIT)
        .expect_status(0)
        .expect_line("blk-io: write status=1");
    assert!(std::fs::read(&d).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn get_id_returns_the_drive_id() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-id");
    let d = disk(&dir, "disk.img", 1);
    let spec = format!("path={d},id=data");
    run_kernel(
        "blk-io",
        &["--drive", &spec, "--mem-mib", "64", "--cmdline", "mode=id"],
        LIMIT,
    )
    .expect_status(0)
    .expect_line("blk-io: id=data:disk.img");
}

#[test]
fn timed_random_writes_verify() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-randwrite");
    let d = disk(&dir, "d.img", 16);
    let run = blk_io(&d, "mode=randwrite ms=500 depth=8 bs=4096 verify=1", &[]);
    run.expect_status(0);
    assert!(
        run.stdout.contains("blk-io: verify ok blocks="),
        "{}",
        run.stdout
    );
    assert_eq!(field(&run, "blk-io: mode=randwrite", "errors"), 0);
    assert!(field(&run, "blk-io: mode=randwrite", "ops") > 10);
}

#[test]
fn bandwidth_limit_holds_within_10_percent() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-bw");
    let d = disk(&dir, "d.img", 64);
    let limit = 4_000_000u64;
    let run = blk_io(
        &format!("{d},bw={limit}"),
        "mode=seqread ms=3000 depth=4 bs=65536",
        &[],
    );
    run.expect_status(0);
    let rate = field(&run, "blk-io: mode=seqread", "bytes_per_sec") as f64;
    let ratio = rate / limit as f64;
    eprintln!("achieved {rate:.0} B/s of {limit} B/s configured: {ratio:.3}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "achieved/configured = {ratio:.3}"
    );
}

#[test]
fn ops_limit_holds_within_10_percent() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-iops");
    let d = disk(&dir, "d.img", 16);
    let limit = 500u64;
    let run = blk_io(
        &format!("{d},iops={limit}"),
        "mode=randread ms=3000 depth=4 bs=4096",
        &[],
    );
    run.expect_status(0);
    let rate = field(&run, "blk-io: mode=randread", "ops_per_sec") as f64;
    let ratio = rate / limit as f64;
    eprintln!("achieved {rate:.0} ops/s of {limit} configured: {ratio:.3}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "achieved/configured = {ratio:.3}"
    );
}

fn drive_bytes(sock: &str) -> u64 {
    let v = api(sock, r#"{"method":"GET","path":"/vm"}"#);
    v["body"]["drives"][0]["bytes"].as_u64().expect("bytes")
}

#[test]
fn limit_changed_mid_run_takes_effect_within_one_refill_period() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-change");
    let d = disk(&dir, "d.img", 64);
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let child = kernel_command("blk-io", &["--mem-mib", "64"])
        .args(["--drive", &format!("path={d},bw=1000000")])
        .args([
            "--api-sock",
            sock,
            "--cmdline",
            "mode=seqread ms=5000 depth=4 bs=16384",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(1200));
    // Before: 1 MB/s.
    let (b0, t0) = (drive_bytes(sock), Instant::now());
    std::thread::sleep(Duration::from_millis(1000));
    let before = (drive_bytes(sock) - b0) as f64 / t0.elapsed().as_secs_f64();
    // Raise to 4 MB/s (bucket of 400 KB per 100 ms).
    let answer = api(
        sock,
        r#"{"method":"PATCH","path":"/drives/blk0","body":{"rate_limiter":{"bandwidth":{"size":400000,"refill_time_ms":100}}}}"#,
    );
    assert_eq!(answer["status"], 200, "{answer}");
    // One refill period later the new rate holds.
    std::thread::sleep(Duration::from_millis(100));
    let (b1, t1) = (drive_bytes(sock), Instant::now());
    std::thread::sleep(Duration::from_millis(1000));
    let after = (drive_bytes(sock) - b1) as f64 / t1.elapsed().as_secs_f64();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("before {before:.0} B/s, after {after:.0} B/s");
    assert!(
        (0.85e6..=1.15e6).contains(&before),
        "before the change: {before:.0} B/s"
    );
    assert!(
        (3.4e6..=4.6e6).contains(&after),
        "after the change: {after:.0} B/s"
    );
}

#[test]
fn control_socket_rejects_bad_requests() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-api");
    let d = disk(&dir, "d.img", 1);
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let mut child = kernel_command("bad-loop", &["--timeout-ms", "20000"])
        .args(["--drive", &format!("path={d}"), "--api-sock", sock])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sock);
    let cases = [
        ("not json", 400),
        (r#"{"method":"GET","path":"/nothing"}"#, 404),
        (r#"{"method":"DELETE","path":"/drives"}"#, 405),
        (r#"{"method":"PATCH","path":"/drives/nope","body":{}}"#, 404),
        (
            r#"{"method":"PATCH","path":"/drives/blk0","body":{"priority":"urgent"}}"#,
            400,
        ),
        (
            r#"{"method":"PATCH","path":"/drives/blk0","body":{"rate_limiter":{"ops":{"size":10,"refill_time_ms":5}}}}"#,
            400,
        ),
        (
            r#"{"method":"PATCH","path":"/drives/blk0","body":{"priority":"high"}}"#,
            200,
        ),
    ];
    for (req, want) in cases {
        let v = api(sock, req);
        assert_eq!(v["status"], want, "{req} -> {v}");
    }
    let v = api(sock, r#"{"method":"GET","path":"/drives"}"#);
    assert_eq!(v["body"][0]["priority"], "high", "{v}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_full_backing_disk_gives_the_guest_an_error_and_keeps_the_monitor_up() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("blk-enospc");
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.to_str().unwrap().to_string());
    // An 8 MiB sparse image on a 1 MiB filesystem: writes past ~1 MiB hit ENOSPC.
    let img = mnt.join("d.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let run = blk_io(
        img.to_str().unwrap(),
        "mode=fill sectors=16384 bs=65536",
        &[],
    );
    run.expect_status(1);
    assert!(
        run.stdout.contains("blk-io: error"),
        "the guest sees the failure: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains("backing file I/O failed"),
        "{}",
        run.stderr
    );
    // The same VM type still reads fine afterwards: the monitor stayed sane.
    blk_io(img.to_str().unwrap(), "mode=capacity", &[])
        .expect_status(0)
        .expect_line("blk-io: capacity=16384 ro=0");
}
