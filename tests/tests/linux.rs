//! Boots the kernel of Debian's `linux-image-cloud-amd64` package as far as this project's
//! machines allow: its first console lines (`Linux version ...`) on the serial port.
//!
//! The kernel is fetched by `scripts/fetch-debian-kernel.sh` into `target/debian-kernel/`:
//! `vmlinuz` as the package ships it (a bzImage) and `vmlinux`, the ELF kernel decompressed
//! from it on the host. The test boots `vmlinux`: on the nested KVM here, code at CPL 0 is
//! emulated ~4000x slower than native (DESIGN.md, "The machines here"), and the bzImage's
//! own LZ4 decompressor would take minutes before Linux prints anything.
//!
//! Even so the banner costs ~20 s of CPU here (measured 2026-11-26, Debian 6.1.0-56): Linux
//! only logs it at first, and the early console that prints the log comes up in
//! `setup_arch()`, after `clear_bss()` (a `rep stosb` over 5 MiB) and the sorting of ~6000
//! jump-label and ~4300 static-call entries, all emulated. On a loaded machine the wall
//! time grows accordingly (30-46 s seen with other builds running).
//!
//! The test stops the monitor as soon as the line appears instead of waiting for the whole
//! run; it fails if the line has not appeared within [`LIMIT`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{kvm_available, target_dir, vmm_bin, Scratch};

/// How long Linux may take to print its banner.
const LIMIT: Duration = Duration::from_secs(60);
/// How often the serial output is read.
const POLL: Duration = Duration::from_millis(100);
/// What Linux prints first (`linux_banner`, replayed by the early console).
const BANNER: &str = "Linux version";
/// The kernel command line.
/// - `earlyprintk=serial,ttyS0`: the early console on COM1. Linux registers it while parsing
///   the early parameters in `setup_arch()` and replays its log buffer, banner first; without
///   it the banner would wait for the real serial console, far later in the boot.
/// - `console=ttyS0`: the real console, for whatever comes after.
/// - `reboot=k panic=-1`: a panic resets through the keyboard controller, which ends the run.
/// - `nokaslr`: no randomisation (vmlinux carries no relocations anyway).
/// - No `quiet`: it would drop the banner (log level notice) from the console.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 nokaslr";

/// The kernel the test boots, if `scripts/fetch-debian-kernel.sh` has fetched it.
fn debian_kernel() -> Option<PathBuf> {
    let path = target_dir().join("debian-kernel").join("vmlinux");
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "{} is missing, and CI=true: run scripts/fetch-debian-kernel.sh before the tests",
            path.display()
        );
    }
    eprintln!("skipped: no Debian kernel (run scripts/fetch-debian-kernel.sh)");
    None
}

/// Kills the monitor when dropped, so that a failing test leaves no VM behind.
struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a file written by the monitor; empty if it does not exist yet.
fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// CPU time (user + system) the monitor has used so far, from `/proc/<pid>/stat`: the
/// guest's CPL 0 code is emulated inside KVM, so this is mostly the guest's own work, and
/// it tells a slow machine from a loaded one.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at `state`; utime and
    // stime are fields 14 and 15 of the line, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The first whole line of `text` containing `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    let start = text.find(needle)?;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let len = text[start..].find('\n')?;
    Some(text[line_start..start + len].trim_end_matches('\r'))
}

#[test]
fn debian_cloud_kernel_prints_its_banner_on_the_serial_port() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = debian_kernel() else {
        return;
    };
    let scratch = Scratch::new("linux");
    let serial = scratch.path("serial.out");
    let stderr = scratch.path("stderr.log");
    let start = Instant::now();
    let child = Command::new(vmm_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", CMDLINE, "--mem-mib", "256"])
        .args(["--timeout-ms", &LIMIT.as_millis().to_string()])
        .arg("--serial-out")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file, not a pipe: nobody reads a pipe while the guest runs, and a full one
        // would block the monitor.
        .stderr(File::create(&stderr).expect("create the stderr log"))
        .spawn()
        .expect("spawn vmm");
    let mut monitor = Monitor(child);

    let failure = |why: String| -> ! {
        panic!(
            "{why}\n--- serial output\n{}\n--- stderr\n{}",
            read_lossy(&serial),
            read_lossy(&stderr)
        )
    };
    let (banner, elapsed, cpu) = loop {
        let out = read_lossy(&serial);
        if let Some(line) = line_with(&out, BANNER) {
            break (line.to_string(), start.elapsed(), cpu_time(monitor.0.id()));
        }
        if let Some(status) = monitor.0.try_wait().expect("try_wait") {
            failure(format!(
                "vmm ended ({status}) after {:.1?} without printing {BANNER:?}",
                start.elapsed()
            ));
        }
        if start.elapsed() > LIMIT {
            failure(format!("no {BANNER:?} on the serial port within {LIMIT:?}"));
        }
        std::thread::sleep(POLL);
    };
    drop(monitor);

    eprintln!("linux: {banner}");
    eprintln!(
        "linux: {BANNER:?} on the serial port {elapsed:.2?} after the monitor started \
         (monitor CPU time {})",
        cpu.map_or("unknown".into(), |c| format!("{c:.2?}"))
    );
    assert!(banner.contains(BANNER));
    assert!(
        banner.contains("cloud-amd64"),
        "not the Debian cloud kernel: {banner}"
    );
}

#[test]
fn line_with_finds_whole_lines_only() {
    let text = "a\n[    0.000000] Linux version 6.1 (x)\r\nb";
    assert_eq!(
        line_with(text, BANNER),
        Some("[    0.000000] Linux version 6.1 (x)")
    );
    assert_eq!(line_with("Linux version 6.1 (partial", BANNER), None);
    assert_eq!(line_with("nothing\n", BANNER), None);
}
