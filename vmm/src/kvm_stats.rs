//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+): every counter the kernel
//! keeps for a VM or a vCPU (exits, halt_exits, pf_taken, insn_emulation, ...), read by
//! name with `pread` on a file descriptor KVM hands out.
//!
//! Written by hand because kvm-ioctls has no wrapper for this ioctl yet; the layout is the
//! kernel's documented ABI (Documentation/virt/kvm/api.rst, 4.133): a header, an array of
//! descriptors (each followed by its name), and a data block of u64 values.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;
/// Type bits of a descriptor's flags: 0 cumulative, 1 instant, 2 peak, 3/4 histograms.
const TYPE_MASK: u32 = 0xf;
const TYPE_LINEAR_HIST: u32 = 3;
const TYPE_LOG_HIST: u32 = 4;

/// Errors opening or reading the statistics.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The kernel has no binary stats for this fd.
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Unsupported(#[source] std::io::Error),
    /// Reading the stats file failed.
    #[error("cannot read KVM statistics: {0}")]
    Read(#[from] std::io::Error),
    /// The header or descriptors are inconsistent.
    #[error("malformed KVM statistics: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone)]
struct Desc {
    name: String,
    offset: u64,
}

/// An open statistics file with its parsed descriptors (scalar counters only).
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    data_offset: u64,
    descs: Vec<Desc>,
    buffer: Vec<u8>,
    data_len: usize,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl KvmStats {
    /// Opens the statistics of a KVM VM or vCPU fd.
    pub fn open(kvm_fd: RawFd) -> Result<Self, KvmStatsError> {
        // SAFETY: the ioctl takes no argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(kvm_fd, KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(KvmStatsError::Unsupported(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        if name_size > 256 || num_desc > 4096 {
            return Err(KvmStatsError::Malformed("implausible header sizes"));
        }
        let desc_size = DESC_FIXED_SIZE + name_size;
        let mut raw = vec![0u8; desc_size * num_desc];
        file.read_exact_at(&mut raw, desc_offset)?;
        let mut descs = Vec::new();
        let mut data_len = 0usize;
        for d in raw.chunks_exact(desc_size) {
            let flags = u32_at(d, 0);
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u64::from(u32_at(d, 8));
            let name_bytes = &d[DESC_FIXED_SIZE..];
            let end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            data_len = data_len.max(offset as usize + size * 8);
            let kind = flags & TYPE_MASK;
            if size == 1 && kind != TYPE_LINEAR_HIST && kind != TYPE_LOG_HIST {
                descs.push(Desc { name, offset });
            }
        }
        Ok(Self {
            file,
            data_offset,
            descs,
            buffer: vec![0u8; data_len],
            data_len,
        })
    }

    /// Names of the scalar counters, in the kernel's order.
    pub fn names(&self) -> Vec<String> {
        self.descs.iter().map(|d| d.name.clone()).collect()
    }

    /// Reads every scalar counter now: (name, value).
    pub fn read(&mut self) -> Result<Vec<(String, u64)>, KvmStatsError> {
        self.file
            .read_exact_at(&mut self.buffer[..self.data_len], self.data_offset)?;
        Ok(self
            .descs
            .iter()
            .map(|d| {
                let o = d.offset as usize;
                let mut v = [0u8; 8];
                v.copy_from_slice(&self.buffer[o..o + 8]);
                (d.name.clone(), u64::from_le_bytes(v))
            })
            .collect())
    }
}

impl AsRawFd for KvmStats {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_stats_are_named_and_readable() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut stats = match KvmStats::open(vcpu.as_raw_fd()) {
            Ok(s) => s,
            Err(KvmStatsError::Unsupported(e)) => {
                eprintln!("skipped: kernel without binary stats: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let names = stats.names();
        assert!(names.iter().any(|n| n == "exits"), "{names:?}");
        let values = stats.read().unwrap();
        assert_eq!(values.len(), names.len());
        let mut vm_stats = KvmStats::open(vm.as_raw_fd()).unwrap();
        assert!(!vm_stats.read().unwrap().is_empty());
    }
}
