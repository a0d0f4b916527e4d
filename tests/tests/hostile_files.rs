//! User-named files that are not what they should be (issue 14, items 8 and 9): FIFOs,
//! devices, directories and foreign databases are refused at once with a message naming
//! the option (exit status 2), never read forever or waited on, and readers of a state
//! repository never change the file they read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{kernel_path, kvm_available, run_kernel, vmm, Scratch};

/// Hang detection only: each refusal takes milliseconds.
const LIMIT: Duration = Duration::from_secs(30);

fn fifo(dir: &Scratch, name: &str) -> PathBuf {
    let p = dir.path(name);
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_fifo_or_device_as_config_or_state_db_is_refused_without_kvm() {
    let dir = Scratch::new("hostile-files");
    let f = fifo(&dir, "f");
    for (args, flag) in [
        (vec!["run", "--config", s(&f)], "--config"),
        (vec!["run", "--config", "/dev/zero"], "--config"),
        (
            vec!["train", "--state-db", s(&f), "--out", "/tmp/never.onnx"],
            "--state-db",
        ),
        (
            vec![
                "state",
                "export",
                "--state-db",
                s(&f),
                "--out",
                "/tmp/x.csv",
            ],
            "--state-db",
        ),
        (vec!["ab", "report", "--state-db", s(&f)], "--state-db"),
    ] {
        let run = vmm(&args, LIMIT);
        assert_eq!(run.status, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(flag), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("FIFO") || run.stderr.contains("character device"),
            "{args:?}: {}",
            run.stderr
        );
    }
}

#[test]
fn a_fifo_as_kernel_initrd_or_serial_out_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("hostile-run-files");
    let f = fifo(&dir, "f");
    let hello = kernel_path("hello");
    for (args, flag) in [
        (vec!["run", "--kernel", s(&f)], "--kernel"),
        (
            vec!["run", "--kernel", s(&hello), "--initrd", s(&f)],
            "--initrd",
        ),
        (
            vec!["run", "--kernel", s(&hello), "--serial-out", s(&f)],
            "--serial-out",
        ),
        (
            vec!["run", "--kernel", s(&hello), "--serial-out", s(&dir.0)],
            "--serial-out",
        ),
    ] {
        let run = vmm(&args, LIMIT);
        assert_eq!(run.status, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(flag), "{args:?}: {}", run.stderr);
    }
    // A character device is a fine place for the console.
    run_kernel("hello", &["--serial-out", "/dev/null"], LIMIT).expect_status(0);
    // A FIFO or a device as the model or its card (the other one valid): the VM runs on
    // the static configuration (was: a hang, or memory growing until the OOM killer).
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let card = repo.join("models/test-policy.card.json");
    let fifo_model = fifo(&dir, "fifo-model.onnx");
    std::fs::copy(&card, dir.path("fifo-model.card.json")).unwrap();
    let zero_model = dir.path("zero.onnx");
    std::os::unix::fs::symlink("/dev/zero", &zero_model).unwrap();
    std::fs::copy(&card, dir.path("zero.card.json")).unwrap();
    let fifo_card = dir.path("fifo-card.onnx");
    std::fs::copy(repo.join("models/test-policy.onnx"), &fifo_card).unwrap();
    fifo(&dir, "fifo-card.card.json");
    let disk = dir.path("d.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("path={}", s(&disk));
    for model in [&fifo_model, &zero_model, &fifo_card] {
        let run = run_kernel("hello", &["--drive", &drive, "--policy", s(model)], LIMIT);
        run.expect_status(0);
        assert!(run.stderr.contains("not a regular file"), "{}", run.stderr);
    }
}

#[test]
fn state_readers_refuse_foreign_files_and_leave_them_unchanged() {
    let dir = Scratch::new("hostile-readers");
    let empty = dir.path("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let foreign = dir.path("foreign.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let text = dir.path("text.db");
    std::fs::write(&text, b"not a database\n".repeat(300)).unwrap();
    let out = dir.path("out.csv");
    for db in [&empty, &foreign, &text] {
        let before = std::fs::read(db).unwrap();
        let mtime = std::fs::metadata(db).unwrap().modified().unwrap();
        for args in [
            vec!["state", "export", "--state-db", s(db), "--out", s(&out)],
            vec!["ab", "report", "--state-db", s(db)],
        ] {
            let run = vmm(&args, LIMIT);
            assert_eq!(run.status, Some(2), "{args:?}: {}", run.stderr);
            assert!(
                run.stderr.contains("not a state repository"),
                "{args:?}: {}",
                run.stderr
            );
        }
        // Was: the empty file became a repository, the foreign one got tables.
        assert_eq!(std::fs::read(db).unwrap(), before, "{}", db.display());
        assert_eq!(std::fs::metadata(db).unwrap().modified().unwrap(), mtime);
    }
}
