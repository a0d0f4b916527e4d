//! The CPUID table each vCPU sees: KVM's supported table, filtered per vCPU.
//!
//! - Topology: APIC id = vCPU index, one package of `count` cores (leaves 1, 4, 0xb, 0x1f).
//! - Features the host's KVM emulates badly at CPL 0 are hidden: cmpxchg16b, XSAVE, OSXSAVE,
//!   AVX and everything built on AVX (FMA, F16C, AVX2, AVX-512). On this project's nested
//!   KVM the instruction emulator refuses them and a Linux guest dies (see DESIGN.md).
//! - The hypervisor leaves: KVM's signature at 0x4000_0000, and the timing leaf 0x4000_0010
//!   (TSC and APIC-bus frequency in kHz) that test kernels use as their clock.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Highest hypervisor leaf the monitor advertises.
pub const HYPERVISOR_TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's APIC bus runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EBX: AVX2 (5) and the AVX-512 family (16, 17, 21, 26, 27, 28, 30, 31).
const LEAF7_EBX_AVX_MASK: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7 ECX: AVX-512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ, VAES/VPCLMULQDQ (VEX forms).
const LEAF7_ECX_AVX_MASK: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7 EDX: AVX-512 4VNNIW/4FMAPS, VP2INTERSECT, AMX, AVX512-FP16.
const LEAF7_EDX_AVX_MASK: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);

/// Per-vCPU facts the filter needs.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// This vCPU's index, used as its APIC id.
    pub index: u32,
    /// Number of vCPUs in the VM.
    pub count: u32,
    /// The guest TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u32,
}

/// Errors while building the table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The table has no room for the monitor's extra leaf.
    #[error("the CPUID table is full ({0} entries)")]
    Full(usize),
}

/// Returns `supported` filtered for the vCPU described by `topo`.
pub fn filter(supported: &CpuId, topo: VcpuTopology) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        // XSAVE is hidden, so its state-component leaf goes too.
        .filter(|e| e.function != 0xd)
        .collect();
    let apic = topo.index;
    let count = topo.count.max(1);
    // Bits needed to number `count` APIC ids.
    let shift = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | ((count & 0xff) << 16);
                e.ecx &= !(LEAF1_ECX_CX16
                    | LEAF1_ECX_XSAVE
                    | LEAF1_ECX_OSXSAVE
                    | LEAF1_ECX_AVX
                    | LEAF1_ECX_FMA
                    | LEAF1_ECX_F16C);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package minus one in EAX[31:26]; one thread shares each cache
                // below L3, all cores share the last level.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((count - 1).min(63) << 26) | ((sharing & 0xfff) << 14);
            }
            7 if e.index == 0 => {
                e.ebx &= !LEAF7_EBX_AVX_MASK;
                e.ecx &= !LEAF7_ECX_AVX_MASK;
                e.edx &= !LEAF7_EDX_AVX_MASK;
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: cores in the package.
                e.edx = apic;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x4000_0000 => {
                e.eax = e.eax.max(HYPERVISOR_TIMING_LEAF);
            }
            0x8000_0001 => {
                // Leave extended features as KVM reports them.
            }
            _ => {}
        }
    }
    entries.retain(|e| e.function != HYPERVISOR_TIMING_LEAF);
    entries.push(kvm_cpuid_entry2 {
        function: HYPERVISOR_TIMING_LEAF,
        eax: topo.tsc_khz,
        ebx: APIC_BUS_KHZ,
        ..Default::default()
    });
    CpuId::from_entries(&entries).map_err(|_| CpuidError::Full(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(1, 0, 0x806f0, 0x0008_0800, 0xffff_ffff, 0xffff_ffff),
            e(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            e(0xb, 0, 1, 2, 0x100, 9),
            e(0xb, 1, 4, 8, 0x201, 9),
            e(0xd, 0, 7, 0, 0, 0),
            e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn hides_features_the_emulator_refuses() {
        let c = filter(
            &table(),
            VcpuTopology {
                index: 0,
                count: 1,
                tsc_khz: 2_000_000,
            },
        )
        .unwrap();
        let l1 = find(&c, 1, 0);
        for bit in [12, 13, 26, 27, 28, 29] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 7, 0).ebx & (1 << 5), 0);
        assert!(c.as_slice().iter().all(|e| e.function != 0xd));
    }

    #[test]
    fn topology_and_hypervisor_leaves_per_vcpu() {
        let c = filter(
            &table(),
            VcpuTopology {
                index: 3,
                count: 4,
                tsc_khz: 2_500_000,
            },
        )
        .unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        assert_eq!(find(&c, 0x4000_0000, 0).eax, HYPERVISOR_TIMING_LEAF);
        let t = find(&c, HYPERVISOR_TIMING_LEAF, 0);
        assert_eq!((t.eax, t.ebx), (2_500_000, APIC_BUS_KHZ));
    }
}
