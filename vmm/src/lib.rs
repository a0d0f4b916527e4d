//! The `vmm` monitor: boots guests directly on KVM with the rust-vmm crates.
//!
//! - [`api`]: the control socket (HTTP/1.1 on a Unix socket) for turning knobs by hand.
//! - [`config`]: the VM's settings and their validation.
//! - [`memory`]: guest memory layout and allocation.
//! - [`boot`]: kernel loading (ELF, bzImage), zero page, long-mode entry state.
//! - [`cpuid`]: the per-vCPU CPUID table.
//! - [`kvm_stats`]: KVM's binary statistics by name.
//! - [`vcpu`]: the run loop of one vCPU thread.
//! - [`vcpu_stats`]: per-vCPU exit and time counters kept in that loop.
//! - [`runtime`]: the running VM's counters and knobs for the tuner and the control API.
//! - [`cpu_quota`]: the vCPU threads' host CPU quota through cgroups (v2, v1 or none).
//! - [`grant`]: the host arbiter's grant to this VM (`PUT /grant`), a cap on its knobs.
//! - [`knobs`]: the knob controller: the one knob state (with its generation) and the one
//!   path by which the API, the tuner, the watchdog and the grant change a knob.
//! - [`host`]: `vmm host`, many VMs (each its own `vmm run`) under one arbiter.
//! - [`profiler`]: the guest profiler (instruction-pointer samples per guest function).
//! - [`vm`]: putting it all together and running a VM to its end.
//! - [`seccomp`]: the filters of the monitor's threads.
//! - [`signals`]: SIGTERM and SIGINT stop the VM gracefully.
//! - [`panics`]: what a panic does (the hook; which threads recover).

pub mod api;
pub mod boot;
pub mod config;
pub mod cpu_quota;
pub mod cpuid;
pub mod grant;
pub mod host;
pub mod knobs;
pub mod kvm_stats;
pub mod memory;
pub mod panics;
pub mod profiler;
pub mod runtime;
pub mod seccomp;
pub mod signals;
pub mod telemetry;
pub mod tuning;
pub mod vcpu;
pub mod vcpu_stats;
pub mod vm;

pub use config::{ConfigError, VmConfig};
pub use vm::{run, RunOutcome, VmError, EXIT_GUEST_CRASH, EXIT_TIMEOUT};
