//! A hostile guest against the monitor, seccomp on (the default): the `bad-virtio` test
//! kernel breaks the virtio protocol in the ways that once hung the event loop (available
//! ring at address 0, overlapping rings, the device's own write moving the available
//! index), killed the monitor with SIGSYS or blocked it (a request queued before
//! DRIVER_OK, or a ring another vCPU keeps full, served on the vCPU thread that sets
//! DRIVER_OK, under the device lock) or flooded its log (writes to a read-only drive, a serial output that
//! fails every write). Every run must end with the guest's own exit status well within
//! its `--timeout-ms`, and the monitor's stderr must stay short.

use std::time::Duration;

use integration_tests::{kvm_available, run_kernel, Run, Scratch};

/// The monitor's own limit for each run: a hang shows as exit status 124.
const TIMEOUT_MS: &str = "30000";
/// The test's hard limit (the helper kills the monitor past it).
const LIMIT: Duration = Duration::from_secs(90);
/// Most stderr lines a run may print.
const MAX_LOG_LINES: usize = 300;

fn drive(dir: &Scratch, fill: u8) -> String {
    let p = dir.path("d.img");
    std::fs::write(&p, vec![fill; 1 << 20]).unwrap();
    p.to_str().unwrap().to_string()
}

fn bad_virtio(drive_spec: &str, cmdline: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--drive",
        drive_spec,
        "--mem-mib",
        "64",
        "--timeout-ms",
        TIMEOUT_MS,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let run = run_kernel("bad-virtio", &args, LIMIT);
    check_quiet(&run);
    run
}

fn check_quiet(run: &Run) {
    let lines = run.stderr.lines().count();
    assert!(
        lines <= MAX_LOG_LINES,
        "{lines} stderr lines (at most {MAX_LOG_LINES}); first ones:\n{}",
        run.stderr.lines().take(20).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn a_request_queued_before_driver_ok_is_served_by_the_event_loop() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-early");
    let d = drive(&dir, 0x5a);
    bad_virtio(&format!("path={d}"), "mode=early", &[])
        .expect_status(0)
        .expect_line("bad-virtio: early status=0 byte=90");
}

#[test]
fn an_available_ring_at_address_zero_needs_a_reset() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-avail0");
    let d = drive(&dir, 0);
    bad_virtio(&format!("path={d}"), "mode=avail0", &[])
        .expect_status(0)
        .expect_line("bad-virtio: avail0 needs_reset=1 used=0");
}

#[test]
fn overlapping_rings_need_a_reset() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-overlap");
    let d = drive(&dir, 0);
    bad_virtio(&format!("path={d}"), "mode=overlap", &[])
        .expect_status(0)
        .expect_line("bad-virtio: overlap needs_reset=1 used=0");
}

#[test]
fn an_available_index_moved_mid_batch_needs_a_reset() {
    if !kvm_available() {
        return;
    }
    // Sector 0 is 0x77 bytes: the device's read into the available ring sets avail.idx
    // to 0x7777, far more than the queue size past what it served.
    let dir = Scratch::new("hostile-runaway");
    let d = drive(&dir, 0x77);
    bad_virtio(&format!("path={d}"), "mode=runaway", &[])
        .expect_status(0)
        .expect_line("bad-virtio: runaway needs_reset=1 used=1");
}

#[test]
fn a_ring_kept_full_by_another_vcpu_blocks_neither_activation_nor_the_loop() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-busy");
    let d = drive(&dir, 0);
    let run = bad_virtio(&format!("path={d}"), "mode=busy ms=1000", &["--vcpus", "2"]);
    run.expect_status(0);
    let served: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("bad-virtio: busy served="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no result line\n{}\n{}", run.stdout, run.stderr));
    assert!(
        served >= 100,
        "the event loop kept serving: {served} requests"
    );
}

#[test]
fn endless_writes_to_a_read_only_drive_log_a_few_lines() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-flood");
    let d = drive(&dir, 0);
    let run = bad_virtio(
        &format!("path={d},read-only"),
        "mode=flood ms=2000 depth=16",
        &[],
    );
    run.expect_status(0);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("bad-virtio: flood "))
        .unwrap_or_else(|| panic!("no result line\n{}\n{}", run.stdout, run.stderr));
    let num = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    let (requests, errors) = (num("requests="), num("errors="));
    assert_eq!(requests, errors, "every write to a read-only drive fails");
    assert!(
        requests >= 1000,
        "the flood was real: {requests} failed requests in 2 s"
    );
    // Bytes on the drive untouched.
    assert!(std::fs::read(&d).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn odd_width_accesses_and_bad_notifies_log_a_few_lines() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-mmio");
    let d = drive(&dir, 0);
    let run = bad_virtio(&format!("path={d}"), "mode=mmio ms=2000", &[]);
    run.expect_status(0);
    let accesses: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("bad-virtio: mmio accesses="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no result line\n{}\n{}", run.stdout, run.stderr));
    assert!(accesses >= 1000, "the abuse was real: {accesses} accesses");
}

#[test]
fn a_serial_output_that_fails_every_write_logs_a_few_lines() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel(
        "bad-virtio",
        &[
            "--serial-out",
            "/dev/full",
            "--timeout-ms",
            TIMEOUT_MS,
            "--cmdline",
            "mode=print count=1000",
        ],
        LIMIT,
    );
    check_quiet(&run);
    run.expect_status(0);
}
