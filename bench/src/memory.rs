//! The monitor's own resident memory: `vmm` running the `bad-loop` kernel (it spins forever
//! at CPL 3 after one line), sampled from `/proc/<pid>/status` and `/proc/<pid>/smaps`; the
//! guest RAM mapping is told apart from everything else the process has resident.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::child::{spawn_piped, wait_exited, Watchdog};
use crate::error::BenchError;
use crate::report::Meta;

/// Firecracker's published anchor for its monitor's own memory: under 5 MiB.
pub const ANCHOR_MIB: f64 = 5.0;
/// The line `bad-loop` prints before it spins.
const SPINNING: &str = "bad-loop: spinning";

/// Settings of the memory benchmark.
#[derive(Debug, Clone)]
pub struct MemorySettings {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `bad-loop` kernel.
    pub kernel: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// `--timeout-ms` given to `vmm`.
    pub timeout_ms: u64,
    /// Delays after the guest's line at which to sample.
    pub sample_after_ms: Vec<u64>,
    /// More `vmm run` arguments (e.g. a drive and a policy: the tuner on).
    pub extra: Vec<String>,
}

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions (`rw-p`).
    pub perms: String,
    /// Path or pseudo-path (`[heap]`, `anon_inode:kvm-vcpu:0`); empty for anonymous memory.
    pub path: String,
    /// `Size:` in KiB.
    pub size_kib: u64,
    /// `Rss:` in KiB.
    pub rss_kib: u64,
    /// `Pss:` in KiB.
    pub pss_kib: u64,
    /// `Anonymous:` in KiB (private pages not backed by a file, copy-on-write ones included).
    pub anonymous_kib: u64,
}

/// Parses the text of `/proc/<pid>/smaps`.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = words.next().unwrap_or("").to_string();
                // offset, device, inode, then the path (which may contain spaces).
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                maps.push(Mapping {
                    start,
                    end,
                    perms,
                    path,
                    size_kib: 0,
                    rss_kib: 0,
                    pss_kib: 0,
                    anonymous_kib: 0,
                });
                continue;
            }
        }
        let value = || {
            words
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if let Some(m) = maps.last_mut() {
            match first {
                "Size:" => m.size_kib = value(),
                "Rss:" => m.rss_kib = value(),
                "Pss:" => m.pss_kib = value(),
                "Anonymous:" => m.anonymous_kib = value(),
                _ => {}
            }
        }
    }
    maps
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Index of the guest RAM mapping: the anonymous mapping of exactly `guest_kib`, or failing
/// that the largest anonymous mapping at least that big.
pub fn find_guest_mapping(maps: &[Mapping], guest_kib: u64) -> Option<usize> {
    let anon = |m: &&Mapping| m.path.is_empty();
    maps.iter()
        .position(|m| anon(&m) && m.size_kib == guest_kib)
        .or_else(|| {
            maps.iter()
                .enumerate()
                .filter(|(_, m)| anon(m) && m.size_kib >= guest_kib)
                .max_by_key(|(_, m)| m.size_kib)
                .map(|(i, _)| i)
        })
}

/// The category of a non-guest mapping, for the breakdown.
fn category(m: &Mapping, exe: &str) -> &'static str {
    match m.path.as_str() {
        "" => "anonymous (malloc arenas, thread stacks)",
        "[heap]" => "heap",
        "[stack]" => "main stack",
        p if p == exe => "vmm binary",
        p if p.starts_with('/') => "shared libraries and other files",
        p if p.starts_with("anon_inode:kvm") => "KVM (kvm_run pages)",
        _ => "other ([vdso], [vvar], ...)",
    }
}

/// One sample of the process's memory.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySample {
    /// Milliseconds after the guest's line.
    pub after_ms: u64,
    /// `VmRSS` of the whole process, KiB.
    pub vm_rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub vm_hwm_kib: u64,
    /// `RssAnon`, KiB.
    pub rss_anon_kib: u64,
    /// `RssFile`, KiB.
    pub rss_file_kib: u64,
    /// Threads of the process.
    pub threads: u64,
    /// Sum of `Rss:` over all mappings, KiB (cross-check of `VmRSS`).
    pub smaps_rss_kib: u64,
    /// The guest RAM mapping's address range.
    pub guest_mapping: String,
    /// Its size, KiB.
    pub guest_size_kib: u64,
    /// Its resident part (guest pages touched so far), KiB.
    pub guest_rss_kib: u64,
    /// Everything else resident: the monitor itself, KiB.
    pub monitor_rss_kib: u64,
    /// Of which anonymous memory (`Anonymous:`: heap, stacks, written library data), KiB.
    pub monitor_anonymous_kib: u64,
    /// The monitor's `Pss:` sum (shared file pages divided among their users), KiB.
    pub monitor_pss_kib: u64,
    /// The monitor's resident memory by kind of mapping, KiB.
    pub breakdown_kib: BTreeMap<String, u64>,
}

/// The memory benchmark's result file.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// When and where.
    pub meta: Meta,
    /// The command measured.
    pub command: String,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Every sample.
    pub samples: Vec<MemorySample>,
    /// The last sample's monitor RSS without guest memory, MiB.
    pub monitor_rss_mib: f64,
    /// The last sample's monitor PSS without guest memory, MiB.
    pub monitor_pss_mib: f64,
    /// The last sample's whole-process RSS, MiB.
    pub process_rss_mib: f64,
    /// The last sample's guest RSS, MiB.
    pub guest_rss_mib: f64,
    /// Firecracker's anchor, MiB.
    pub anchor_mib: f64,
    /// `monitor_rss_mib < anchor_mib`.
    pub under_anchor: bool,
    /// `vmm`'s exit status (124 = its timeout, as expected).
    pub exit_status: i32,
}

fn sample(pid: u32, after_ms: u64, guest_kib: u64, exe: &str) -> Result<MemorySample, BenchError> {
    let read = |file: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::read_to_string(&path).map_err(|e| BenchError::io(format!("reading {path}"), e))
    };
    let status = read("status")?;
    let maps = parse_smaps(&read("smaps")?);
    let gi = find_guest_mapping(&maps, guest_kib).ok_or_else(|| {
        BenchError::Unexpected(format!(
            "no anonymous mapping of {guest_kib} KiB (the guest RAM) in /proc/{pid}/smaps"
        ))
    })?;
    let guest = &maps[gi];
    let mut breakdown = BTreeMap::new();
    let (mut monitor_rss, mut monitor_pss, mut monitor_anon) = (0, 0, 0);
    for (i, m) in maps.iter().enumerate() {
        if i == gi {
            continue;
        }
        monitor_rss += m.rss_kib;
        monitor_pss += m.pss_kib;
        let cat = category(m, exe);
        monitor_anon += m.anonymous_kib;
        *breakdown.entry(cat.to_string()).or_insert(0) += m.rss_kib;
    }
    let field = |k| status_kib(&status, k).unwrap_or(0);
    Ok(MemorySample {
        after_ms,
        vm_rss_kib: field("VmRSS"),
        vm_hwm_kib: field("VmHWM"),
        rss_anon_kib: field("RssAnon"),
        rss_file_kib: field("RssFile"),
        threads: status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
        smaps_rss_kib: maps.iter().map(|m| m.rss_kib).sum(),
        guest_mapping: format!("{:#x}-{:#x}", guest.start, guest.end),
        guest_size_kib: guest.size_kib,
        guest_rss_kib: guest.rss_kib,
        monitor_rss_kib: monitor_rss,
        monitor_anonymous_kib: monitor_anon,
        monitor_pss_kib: monitor_pss,
        breakdown_kib: breakdown,
    })
}

/// Runs the memory benchmark.
pub fn run(s: &MemorySettings) -> Result<MemoryReport, BenchError> {
    let meta = Meta::now("memory");
    let mut cmd = Command::new(&s.vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&s.kernel)
        .arg("--mem-mib")
        .arg(s.mem_mib.to_string())
        .arg("--timeout-ms")
        .arg(s.timeout_ms.to_string())
        .args(&s.extra);
    let line = format!(
        "{} run --kernel {} --mem-mib {} --timeout-ms {}{}",
        s.vmm.display(),
        s.kernel.display(),
        s.mem_mib,
        s.timeout_ms,
        s.extra.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    if let Some(last) = s.sample_after_ms.iter().max() {
        if *last + 200 >= s.timeout_ms {
            return Err(BenchError::Unexpected(format!(
                "sampling at {last} ms is too close to the {} ms timeout",
                s.timeout_ms
            )));
        }
    }
    let exe = std::fs::canonicalize(&s.vmm)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut child = spawn_piped(&mut cmd)?;
    let pid = child.id();
    let watchdog = Watchdog::start(pid, Duration::from_millis(s.timeout_ms + 10_000));

    let result = (|| {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Unexpected("no stdout pipe".into()))?;
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .map_err(|e| BenchError::io("reading vmm's output", e))?;
        if first.trim() != SPINNING {
            return Err(BenchError::Unexpected(format!(
                "`{line}` printed {first:?}, expected {SPINNING:?}"
            )));
        }
        let t0 = Instant::now();
        let mut samples = Vec::new();
        for &at in &s.sample_after_ms {
            let due = Duration::from_millis(at);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            samples.push(sample(pid, at, s.mem_mib * 1024, &exe)?);
        }
        Ok(samples)
    })();
    let exited = wait_exited(pid);
    let killed = watchdog.disarm();
    let status = child.wait().map_err(|e| BenchError::io("reaping vmm", e))?;
    exited?;
    let samples = result?;
    if killed {
        return Err(BenchError::Timeout {
            what: line,
            secs: s.timeout_ms / 1000 + 10,
        });
    }
    let last = samples
        .last()
        .ok_or_else(|| BenchError::Unexpected("no sample taken".into()))?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let monitor_rss_mib = mib(last.monitor_rss_kib);
    Ok(MemoryReport {
        meta,
        command: line,
        mem_mib: s.mem_mib,
        monitor_rss_mib,
        monitor_pss_mib: mib(last.monitor_pss_kib),
        process_rss_mib: mib(last.vm_rss_kib),
        guest_rss_mib: mib(last.guest_rss_kib),
        anchor_mib: ANCHOR_MIB,
        under_anchor: monitor_rss_mib < ANCHOR_MIB,
        exit_status: status.code().unwrap_or(-1),
        samples: samples.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234  /work/target/release/vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
Anonymous:            16 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                2100 kB
Pss:                2100 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                  12 kB
Pss:                  12 kB
7f0020000000-7f0020001000 rw-s 00000000 00:0e 99  anon_inode:kvm-vcpu:0
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
";

    #[test]
    fn parses_smaps_and_finds_the_guest() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].path, "/work/target/release/vmm");
        assert_eq!(maps[0].rss_kib, 800);
        assert_eq!(maps[0].anonymous_kib, 16);
        assert_eq!(maps[1].path, "");
        assert_eq!(maps[3].path, "anon_inode:kvm-vcpu:0");
        assert_eq!(find_guest_mapping(&maps, 128 * 1024), Some(1));
        assert_eq!(find_guest_mapping(&maps, 64 * 1024), Some(1));
        assert_eq!(find_guest_mapping(&maps, 256 * 1024), None);
        assert_eq!(category(&maps[0], "/work/target/release/vmm"), "vmm binary");
        assert_eq!(category(&maps[3], ""), "KVM (kvm_run pages)");
    }

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tvmm\nVmHWM:\t    5000 kB\nVmRSS:\t    4321 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(4321));
        assert_eq!(status_kib(status, "VmHWM"), Some(5000));
        assert_eq!(status_kib(status, "RssAnon"), None);
    }
}
