//! A private PostgreSQL server for the tests: a fresh cluster in a scratch directory
//! (Debian's `postgresql` package, installed by `scripts/test.sh`), listening only on a
//! Unix socket in that directory, run as `nobody` when the tests run as root (PostgreSQL
//! refuses root), password authentication (scram) for the user `vmm`. Stopped and removed
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The password of the cluster's `vmm` user.
pub const PASSWORD: &str = "vmm-test-pw";

/// A running test cluster.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
}

/// The directory of `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program args` as the cluster's owner (`nobody` under root).
fn as_owner(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

fn run(mut c: Command, what: &str) -> Result<Output, String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

impl Postgres {
    /// Starts a fresh cluster, or `None` when PostgreSQL is not installed or does not
    /// start: under CI (`CI=true`) that fails the test loudly; elsewhere it prints
    /// `skipped: ...` and the caller returns early.
    pub fn start(name: &str) -> Option<Postgres> {
        match Self::try_start(name) {
            Ok(p) => Some(p),
            Err(e) => {
                if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                    panic!("PostgreSQL cannot start and CI=true: {e}");
                }
                eprintln!("skipped: PostgreSQL cannot start: {e}");
                None
            }
        }
    }

    fn try_start(name: &str) -> Result<Postgres, String> {
        let bin =
            bin_dir().ok_or("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")?;
        let dir = std::env::temp_dir().join(format!("vmm-pg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pw = dir.join("pw");
        std::fs::write(&pw, PASSWORD).map_err(|e| e.to_string())?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "nobody"]).arg(&dir);
                    c
                },
                "chown",
            )?;
        }
        let p = Postgres { dir, bin };
        let data = p.dir.join("data");
        run(
            as_owner(
                &p.bin.join("initdb"),
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    "vmm",
                    "--auth=scram-sha-256",
                    &format!("--pwfile={}", pw.display()),
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            ),
            "initdb",
        )?;
        p.pg_ctl_start()?;
        Ok(p)
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let data = self.dir.join("data");
        let opts = format!(
            "-k {} -c listen_addresses='' -c fsync=off",
            self.dir.display()
        );
        run(
            as_owner(
                &self.bin.join("pg_ctl"),
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-o",
                    &opts,
                    "-l",
                    &self.dir.join("log").to_string_lossy(),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            ),
            "pg_ctl start",
        )?;
        Ok(())
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let r = run(
            as_owner(
                &self.bin.join("pg_ctl"),
                &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
            ),
            "pg_ctl stop",
        );
        if let Err(e) = r {
            eprintln!("{e}");
        }
    }

    /// Starts the server again after [`Postgres::stop`].
    pub fn restart(&self) {
        self.pg_ctl_start().expect("pg_ctl start");
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `db` as `vmm` with the right password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://vmm:{PASSWORD}@/{db}?host={}",
            self.dir.display()
        )
    }

    /// Runs `sql` with `psql` in database `db`; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(self.url(db))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates database `name`.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
