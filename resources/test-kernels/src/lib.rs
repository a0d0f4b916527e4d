//! Guest test kernels for the `vmm` monitor.
//!
//! `build.rs` compiles every `src/kernels/<name>.rs` (plus the shared runtime in
//! `src/rt/`) into a static x86-64 ELF kernel at `<target dir>/test-kernels/<name>`,
//! following the boot contract in `BOOT.md`. This library only tells tests where the
//! kernels are. See `README.md` for each kernel's parameters and output lines.

use std::path::PathBuf;

/// Directory holding the compiled kernels (`<cargo target dir>/test-kernels`), fixed at
/// build time.
pub const KERNELS_DIR: &str = env!("TEST_KERNELS_DIR");

/// Names of all test kernels (the stems of `src/kernels/*.rs`), sorted; each is a file
/// name in [`KERNELS_DIR`] and a valid argument to [`kernel_path`].
pub const KERNELS: &[&str] = include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Path of the compiled test kernel `name` (e.g. `"hello"`), an ELF file suitable for
/// `vmm run --kernel`. The path is not checked; see [`KERNELS`] for the valid names.
pub fn kernel_path(name: &str) -> PathBuf {
    PathBuf::from(KERNELS_DIR).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_built() {
        assert!(KERNELS.contains(&"hello"));
        for name in KERNELS {
            let path = kernel_path(name);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            assert_eq!(&bytes[..4], b"\x7fELF", "{path:?} is not an ELF file");
            // ELF64, little endian, ET_EXEC, x86-64.
            assert_eq!(bytes[4], 2);
            assert_eq!(bytes[5], 1);
            assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 2);
            assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 0x3e);
            let entry = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
            assert_eq!(entry, 0x10_0000, "{path:?}: entry point");
        }
    }
}
