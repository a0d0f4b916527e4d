//! Compiles every guest test kernel `src/kernels/<name>.rs` into a static x86-64 ELF at
//! `<cargo target dir>/test-kernels/<name>`.
//!
//! Each kernel is a `#![no_std]` `#![no_main]` crate (it includes the runtime in
//! `src/rt/`) compiled by invoking `$RUSTC` directly for the host target (x86-64 Linux),
//! linked with `kernel.ld` so that `_start` sits at 1 MiB. No extra target is needed.
//! See `BOOT.md` for the contract the kernels implement and `README.md` for the kernels.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_var("OUT_DIR"));
    let src_dir = manifest_dir.join("src");
    let kernels_dir = src_dir.join("kernels");
    let linker_script = manifest_dir.join("kernel.ld");

    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-changed={}", linker_script.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let dest_dir = target_dir(&out_dir).join("test-kernels");
    fs::create_dir_all(&dest_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dest_dir.display()));
    let build_dir = out_dir.join("kernels");
    fs::create_dir_all(&build_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", build_dir.display()));

    let names = kernel_names(&kernels_dir);
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));

    // Compile all kernels in parallel: each rustc invocation is single-threaded.
    let results: Vec<(String, Result<String, String>)> = thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let (rustc, kernels_dir, linker_script, build_dir, dest_dir) =
                    (&rustc, &kernels_dir, &linker_script, &build_dir, &dest_dir);
                scope.spawn(move || {
                    let src = kernels_dir.join(format!("{name}.rs"));
                    let result = compile(rustc, &src, name, linker_script, build_dir).and_then(
                        |(elf, warnings)| install(&elf, &dest_dir.join(name)).map(|()| warnings),
                    );
                    (name.clone(), result)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("kernel build thread panicked"))
            .collect()
    });

    let mut failed = Vec::new();
    for (name, result) in &results {
        match result {
            Ok(warnings) => {
                for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
                    println!("cargo:warning=test kernel {name}: {line}");
                }
            }
            Err(err) => {
                eprintln!("error: test kernel `{name}` failed to build:\n{err}");
                failed.push(name.as_str());
            }
        }
    }
    if !failed.is_empty() {
        panic!("failed to build test kernel(s): {}", failed.join(", "));
    }

    for name in &names {
        // Rebuild if an installed kernel is deleted.
        println!("cargo:rerun-if-changed={}", dest_dir.join(name).display());
    }
    let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let list_file = out_dir.join("kernels.rs");
    fs::write(&list_file, format!("&[{}]\n", list.join(", ")))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", list_file.display()));
    println!("cargo:rustc-env=TEST_KERNELS_DIR={}", dest_dir.display());
}

fn env_var(name: &str) -> OsString {
    env::var_os(name).unwrap_or_else(|| panic!("{name} is not set"))
}

/// The cargo target directory: `$CARGO_TARGET_DIR` if absolute, else the first ancestor
/// of `OUT_DIR` holding a `CACHEDIR.TAG` (cargo creates one at the target dir's root),
/// else — on a brand-new target dir, where cargo may not have written the tag yet — the
/// directory above the profile directory (`OUT_DIR` is `<target>/<profile>/build/<pkg>/out`).
fn target_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    out_dir
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .or_else(|| {
            let build = out_dir.ancestors().nth(2)?;
            if build.file_name()? != "build" {
                return None;
            }
            out_dir.ancestors().nth(4).map(Path::to_path_buf)
        })
        .unwrap_or_else(|| {
            panic!(
                "cannot find the cargo target dir (no CACHEDIR.TAG above {}); set CARGO_TARGET_DIR",
                out_dir.display()
            )
        })
}

/// Names of the kernels: the stems of `src/kernels/*.rs`, sorted.
fn kernel_names(dir: &Path) -> Vec<String> {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display())))
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .map(|path| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let valid = !stem.is_empty()
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            assert!(
                valid,
                "bad kernel file name {} (use [a-z0-9-])",
                path.display()
            );
            stem.to_string()
        })
        .collect();
    names.sort();
    names
}

/// Compiles one kernel into `build_dir/<name>`; returns its path and rustc's warnings,
/// or rustc's error output.
fn compile(
    rustc: &OsString,
    src: &Path,
    name: &str,
    linker_script: &Path,
    build_dir: &Path,
) -> Result<(PathBuf, String), String> {
    let out = build_dir.join(name);
    let mut cmd = Command::new(rustc);
    cmd.arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name")
        .arg(name.replace('-', "_"))
        .arg("--target=x86_64-unknown-linux-gnu")
        .args(["-C", "panic=abort"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "codegen-units=1"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "target-cpu=x86-64"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "strip=debuginfo"])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", linker_script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .args(["-C", "link-arg=-Wl,-z,max-page-size=4096"])
        .arg("-o")
        .arg(&out)
        .arg(src);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rustc.to_string_lossy()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok((out, stderr))
    } else {
        Err(format!("{cmd:?}\n{stderr}"))
    }
}

/// Copies `elf` to `dest` atomically (temporary file in the same directory + rename).
fn install(elf: &Path, dest: &Path) -> Result<(), String> {
    let file_name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dest.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    fs::copy(elf, &tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot rename {} to {}: {e}", tmp.display(), dest.display())
    })
}
