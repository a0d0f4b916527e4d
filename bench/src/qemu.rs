//! QEMU's `microvm` machine as the comparison point, booting the same test kernels.
//!
//! The command line is the one from the project's issue, with two changes this machine
//! forces, both in the `-cpu` option (see [`DEFAULT_CPU`]); the kernel is the test kernel
//! wrapped for a PVH boot (see [`crate::pvh`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::BenchError;
use crate::pvh;

/// The QEMU binary looked up on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The `-cpu` value used by default.
///
/// - `-arch-capabilities`: with plain `-cpu host`, QEMU 7.2 aborts at start on this nested
///   KVM ("failed to set MSR 0x10a", IA32_ARCH_CAPABILITIES).
/// - `+invtsc,vmware-cpuid-freq=on`: make QEMU report the TSC frequency in CPUID leaf
///   0x4000_0010, as `vmm` does; without it the test kernels print a warning line first
///   (45 more serial bytes, so 45 more exits) and time `pio-bench` with a guessed clock.
pub const DEFAULT_CPU: &str = "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on";

/// A QEMU installation to compare with.
#[derive(Debug, Clone, Serialize)]
pub struct Qemu {
    /// The binary.
    pub binary: PathBuf,
    /// First line of `--version`.
    pub version: String,
    /// The `-cpu` option value.
    pub cpu: String,
}

/// Finds `qemu-system-x86_64` (or `explicit`) and asks its version.
pub fn find(explicit: Option<&Path>, cpu: &str) -> Result<Qemu, String> {
    let binary = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(QEMU_BINARY))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| format!("{QEMU_BINARY} is not on PATH (install qemu-system-x86)"))?,
    };
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(Qemu {
        binary,
        version,
        cpu: cpu.to_string(),
    })
}

impl Qemu {
    /// The arguments that boot `kernel` (a PVH ELF) on `-M <machine>` (`microvm`, with
    /// options) with serial on stdio, with `extra` arguments (devices, `-append`) after the
    /// common ones.
    pub fn args_with(&self, kernel: &Path, machine: &str, extra: &[String]) -> Vec<String> {
        [
            "-M",
            machine,
            "-enable-kvm",
            "-cpu",
            &self.cpu,
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .chain(["-kernel".to_string(), kernel.display().to_string()])
        .collect()
    }

    /// The command that boots `kernel` (a PVH ELF).
    pub fn command(&self, kernel: &Path) -> Command {
        self.command_with(kernel, "microvm", &[])
    }

    /// The command of [`Qemu::args_with`].
    pub fn command_with(&self, kernel: &Path, machine: &str, extra: &[String]) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(self.args_with(kernel, machine, extra));
        c
    }

    /// The one-line shell form of [`Qemu::command`], for reports.
    pub fn command_line(&self, kernel: &Path) -> String {
        self.command_line_with(kernel, "microvm", &[])
    }

    /// The one-line shell form of [`Qemu::command_with`] (arguments with spaces quoted).
    pub fn command_line_with(&self, kernel: &Path, machine: &str, extra: &[String]) -> String {
        let mut s = self.binary.display().to_string();
        for a in self.args_with(kernel, machine, extra) {
            s.push(' ');
            if a.contains(' ') {
                s.push('\'');
                s.push_str(&a);
                s.push('\'');
            } else {
                s.push_str(&a);
            }
        }
        s
    }
}

/// QEMU's exit status for a guest that wrote `code` to its `isa-debug-exit` device.
pub fn debug_exit_status(code: u8) -> i32 {
    (i32::from(code) << 1) | 1
}

/// Writes `kernel` wrapped for PVH with `cmdline` to `out_dir/<file name>[-<tag>].pvh`.
pub fn wrap_kernel(
    kernel: &Path,
    cmdline: &str,
    out_dir: &Path,
    tag: &str,
) -> Result<PathBuf, BenchError> {
    wrap_kernel_with(kernel, cmdline, pvh::CmdlineSource::Embedded, out_dir, tag)
}

/// As [`wrap_kernel`], taking the command line from `source`.
pub fn wrap_kernel_with(
    kernel: &Path,
    cmdline: &str,
    source: pvh::CmdlineSource,
    out_dir: &Path,
    tag: &str,
) -> Result<PathBuf, BenchError> {
    let elf =
        std::fs::read(kernel).map_err(|e| BenchError::io(format!("{}", kernel.display()), e))?;
    let wrapped = pvh::wrap_with(&elf, cmdline, source)?;
    let name = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kernel".into());
    let file = if tag.is_empty() {
        format!("{name}.pvh")
    } else {
        format!("{name}-{tag}.pvh")
    };
    let path = out_dir.join(file);
    std::fs::write(&path, &wrapped.elf)
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}
