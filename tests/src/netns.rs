//! A network namespace with a TAP for the virtio-net tests: traffic only goes to
//! addresses inside it.

use std::process::{Command, Stdio};

/// A network namespace with a TAP at 10.0.0.1/24, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `vmmit<pid><tag>` with its TAP; `None` (after a `skipped:`
    /// line) without root or iproute2, and a panic under CI=true.
    pub fn create(tag: &str) -> Option<Self> {
        let name = format!("vmmit{}{tag}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !ok(&["netns", "add", &name]) {
            let msg = "network namespaces need root and iproute2 (`ip netns add` failed)";
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("{msg}");
            }
            eprintln!("skipped: {msg}");
            return None;
        }
        let ns = Netns { name };
        for cmd in [
            vec!["tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["addr", "add", "10.0.0.1/24", "dev", "tap0"],
            vec!["link", "set", "tap0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", ns.name.as_str(), "ip"];
            full.extend(cmd.iter().copied());
            assert!(ok(&full), "ip {full:?} failed");
        }
        Some(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
