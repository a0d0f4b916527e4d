//! Boots every test kernel with the built `vmm` binary and checks its serial output and
//! exit status; checks that bad input gets a one-line error and status 2.

use std::time::Duration;

use integration_tests::{kernel_path, kvm_available, run_kernel, vmm, Scratch};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn hello_prints_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("hello", &[], LIMIT);
    run.expect_status(0).expect_line("Hello from test kernel");
}

#[test]
fn hello_on_four_vcpus_still_exits_zero() {
    if !kvm_available() {
        return;
    }
    run_kernel("hello", &["--vcpus", "4"], LIMIT)
        .expect_status(0)
        .expect_line("Hello from test kernel");
}

#[test]
fn exit_code_is_the_process_status() {
    if !kvm_available() {
        return;
    }
    for code in [0, 1, 42, 255] {
        let arg = format!("code={code}");
        run_kernel("exit-code", &["--cmdline", &arg], LIMIT)
            .expect_status(code)
            .expect_line(&format!("exit-code: {code}"));
    }
}

#[test]
fn smp_every_vcpu_reports_its_apic_id() {
    if !kvm_available() {
        return;
    }
    for n in [1u32, 2, 4] {
        let run = run_kernel("smp", &["--vcpus", &n.to_string()], LIMIT);
        run.expect_status(0).expect_line(&format!("smp: {n} cpus"));
        for i in 0..n {
            run.expect_line(&format!("cpu {i} apic {i}"));
        }
    }
}

#[test]
fn the_mp_table_lists_every_vcpu_where_linux_looks_for_it() {
    if !kvm_available() {
        return;
    }
    // The guest scans low memory as Linux does and checks both checksums.
    for n in [1, 4] {
        run_kernel("mptable", &["--vcpus", &n.to_string()], LIMIT)
            .expect_status(0)
            .expect_line(&format!(
                "mptable: at 0x9fc00 cpus={n} boot=0 ioapic=0xfec00000 lines=24"
            ));
    }
}

#[test]
fn cpu_burn_reports_iterations_on_every_vcpu() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("cpu-burn", &["--vcpus", "2", "--cmdline", "ms=300"], LIMIT);
    run.expect_status(0);
    let total = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("cpu-burn: cpus=2 ms=300 iterations="))
        .unwrap_or_else(|| panic!("no summary line in {:?}", run.stdout));
    let total: u64 = total.trim().parse().expect("iterations is a number");
    assert!(total > 1000, "implausibly few iterations: {total}");
    let per_cpu: u64 = run
        .stdout
        .lines()
        .filter_map(|l| {
            l.strip_prefix("cpu ")
                .and_then(|r| r.split_once(" iterations "))
        })
        .map(|(_, k)| k.trim().parse::<u64>().expect("number"))
        .sum();
    assert_eq!(per_cpu, total, "per-vCPU counts must add up to the total");
    // The guest spun for its 300 ms of TSC time: the run cannot be much shorter.
    assert!(
        run.elapsed >= Duration::from_millis(250),
        "{:?}",
        run.elapsed
    );
}

#[test]
fn mem_touch_verifies_what_it_wrote() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel(
        "mem-touch",
        &["--mem-mib", "128", "--cmdline", "mib=64"],
        LIMIT,
    );
    run.expect_status(0);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("mem-touch: mib=64 ok ns=")),
        "{}",
        run.stdout
    );
}

#[test]
fn triple_fault_is_reported_with_registers() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("bad-triple-fault", &[], LIMIT);
    run.expect_status(vmm::EXIT_GUEST_CRASH)
        .expect_line("bad-triple-fault: faulting");
    assert!(
        run.stderr.contains("vCPU 0: triple fault"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rip=0x") && run.stderr.contains("cr3=0x"),
        "{}",
        run.stderr
    );
}

#[test]
fn unmapped_mmio_is_ignored_and_reads_all_ones() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("bad-mmio", &[], LIMIT);
    run.expect_status(0)
        .expect_line("bad-mmio: read 0xffffffff")
        .expect_line("bad-mmio: survived");
    assert!(
        run.stderr.contains("MMIO write at 0xfe000000"),
        "{}",
        run.stderr
    );
}

#[test]
fn wild_port_writes_leave_the_monitor_up() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("bad-ports", &[], LIMIT);
    run.expect_status(0).expect_line("bad-ports: survived");
    assert!(
        run.stderr.contains("has no device; ignored"),
        "{}",
        run.stderr
    );
}

#[test]
fn endless_loop_ends_with_timeout_status() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("bad-loop", &["--timeout-ms", "500"], LIMIT);
    run.expect_status(124).expect_line("bad-loop: spinning");
    assert!(
        run.stderr.contains("timeout after 500 ms"),
        "{}",
        run.stderr
    );
    assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);
}

#[test]
fn serial_output_goes_to_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("serial-out");
    let out = dir.path("serial.txt");
    let run = run_kernel("hello", &["--serial-out", out.to_str().unwrap()], LIMIT);
    run.expect_status(0);
    assert!(
        !run.stdout.contains("Hello"),
        "output must not go to stdout"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text, "Hello from test kernel\n");
}

#[test]
fn json_config_runs_the_same_vm() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("json-config");
    let cfg = dir.path("vm.json");
    let kernel = kernel_path("smp");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"kernel": "{}", "vcpus": 2, "mem_mib": 64, "cmdline": "", "seccomp": true, "timeout_ms": 30000}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    vmm(&["run", "--config", cfg.to_str().unwrap()], LIMIT)
        .expect_status(0)
        .expect_line("smp: 2 cpus");
    // A flag overrides the file.
    vmm(
        &["run", "--config", cfg.to_str().unwrap(), "--vcpus", "3"],
        LIMIT,
    )
    .expect_status(0)
    .expect_line("smp: 3 cpus");
}

#[test]
fn seccomp_can_be_turned_off() {
    if !kvm_available() {
        return;
    }
    run_kernel("hello", &["--no-seccomp"], LIMIT)
        .expect_status(0)
        .expect_line("Hello from test kernel");
}

/// A minimal ELF64 x86-64 file with one PT_LOAD segment of `memsz` bytes at 1 MiB.
fn synthetic_elf(memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    f
}

/// Runs `vmm run` with bad input; expects status 2 and one error line naming `field`.
fn bad_input(args: &[&str], field: &str, problem: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let run = vmm(&full, LIMIT);
    run.expect_status(2);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got:\n{}", run.stderr);
    assert!(
        errors[0].contains(field) && errors[0].contains(problem),
        "error should name {field:?} and say {problem:?}: {}",
        errors[0]
    );
}

#[test]
fn bad_input_gets_one_line_and_status_2() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("bad-input");
    let hello = kernel_path("hello");
    let hello = hello.to_str().unwrap();
    bad_input(
        &["--kernel", "/nonexistent/kernel"],
        "kernel",
        "No such file",
    );
    let junk = dir.path("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    bad_input(
        &["--kernel", junk.to_str().unwrap()],
        "kernel",
        "not an ELF or bzImage",
    );
    bad_input(&["--kernel", hello, "--vcpus", "0"], "vcpus", "at least 1");
    bad_input(
        &["--kernel", hello, "--vcpus", "100000"],
        "vcpus",
        "exceeds the KVM limit",
    );
    bad_input(
        &["--kernel", hello, "--mem-mib", "8"],
        "mem_mib",
        "below the minimum",
    );
    bad_input(
        &["--kernel", hello, "--mem-mib", "100000000"],
        "mem_mib",
        "exceeds the host",
    );
    let big = dir.path("big.elf");
    std::fs::write(&big, synthetic_elf(64 << 20)).unwrap();
    bad_input(
        &["--kernel", big.to_str().unwrap(), "--mem-mib", "32"],
        "mem_mib",
        "too small for the kernel",
    );
    bad_input(
        &["--kernel", hello, "--initrd", "/nonexistent/initrd"],
        "initrd",
        "No such file",
    );
    bad_input(&[], "kernel", "missing");
    let cfg = dir.path("bad.json");
    std::fs::write(&cfg, r#"{"kernel": "x", "vcpus": 1,"#).unwrap();
    bad_input(
        &["--config", cfg.to_str().unwrap()],
        "config",
        "malformed JSON",
    );
    std::fs::write(&cfg, format!(r#"{{"kernel": "{hello}", "cpus": 2}}"#)).unwrap();
    bad_input(
        &["--config", cfg.to_str().unwrap()],
        "config",
        "unknown field `cpus`",
    );
    bad_input(
        &["--config", "/nonexistent/vm.json"],
        "config",
        "cannot read",
    );
    // clap's own usage errors use status 2 as well.
    vmm(&["run", "--kernel", hello, "--vcpus", "two"], LIMIT).expect_status(2);
}

#[test]
fn i8042_reset_ends_the_run_with_status_0() {
    if !kvm_available() {
        return;
    }
    let run = run_kernel("reset", &[], LIMIT);
    run.expect_status(0).expect_line("reset: requesting");
    assert!(!run.stdout.contains("reset: ignored"), "{}", run.stdout);
}
