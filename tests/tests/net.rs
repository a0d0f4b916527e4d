//! virtio-net end to end: a TAP inside a network namespace the test makes, the `net-echo`
//! test kernel on the guest side, and real UDP packets from the host side of the TAP.

use std::process::Stdio;
use std::time::Duration;

use integration_tests::netns::Netns;
use integration_tests::{kernel_path, kvm_available, vmm_bin};

/// Tests that measure a rate run one at a time: the harness runs two tests at once, and on
/// a 2-core host the other VM can starve the one being measured.
static MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    MACHINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn spawn_guest(ns: &Netns, cmdline: &str) -> std::process::Child {
    let kernel = kernel_path("net-echo");
    ns.command(vmm_bin().to_str().unwrap())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "tap=tap0",
        ])
        .args(["--timeout-ms", "30000", "--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn field(text: &str, prefix: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= on a line starting {prefix:?} in\n{text}"))
}

/// The host side sends UDP packets to the guest; the guest echoes them back.
#[test]
fn udp_packets_round_trip_through_the_guest() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::create("e") else { return };
    let guest = spawn_guest(&ns, "mode=echo ms=6000 ip=10.0.0.2");
    std::thread::sleep(Duration::from_millis(700));
    let script = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.1", 7000))
s.settimeout(0.5)
got = 0
for i in range(200):
    s.sendto(i.to_bytes(4, "little") + b"x" * 60, ("10.0.0.2", 7000))
    try:
        data, addr = s.recvfrom(2048)
        if addr[0] == "10.0.0.2" and data[:4] == i.to_bytes(4, "little"):
            got += 1
    except socket.timeout:
        pass
print(got)
"#;
    let out = ns
        .command("python3")
        .args(["-c", script])
        .output()
        .expect("python3");
    let echoed: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("peer failed: {}", String::from_utf8_lossy(&out.stderr)));
    let run = guest.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    eprintln!("{stdout}\nround trips: {echoed}/200");
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(echoed >= 195, "only {echoed} of 200 UDP packets came back");
    assert!(field(&stdout, "net-echo: echoed=", "echoed") >= u64::from(echoed));
    assert!(
        field(&stdout, "net-echo: echoed=", "arp") >= 1,
        "the host ARPs for the guest first"
    );
}

/// The guest sends UDP packets; a socket on the host side counts them.
#[test]
fn guest_packets_reach_the_host() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::create("s") else { return };
    let script = r#"
import socket
import sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", 7000))
print("ready", flush=True)
s.settimeout(5.0)
got = 0
seen = set()
try:
    while got < 500:
        data, addr = s.recvfrom(2048)
        seen.add(int.from_bytes(data[:4], "little"))
        got += 1
        s.settimeout(1.0)
except socket.timeout:
    pass
print(len(seen))
"#;
    let peer = ns
        .command("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut peer = peer;
    {
        use std::io::BufRead;
        let stdout = peer.stdout.as_mut().expect("peer stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("peer ready");
        assert_eq!(line.trim(), "ready");
    }
    let run = spawn_guest(
        &ns,
        "mode=send count=500 size=64 pps=20000 ip=10.0.0.2 peer=10.0.0.1",
    )
    .wait_with_output()
    .expect("wait");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(field(&stdout, "net-echo: sent=", "sent"), 500);
    let out = peer.wait_with_output().expect("peer");
    let received: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    eprintln!("{stdout}\nhost received {received}/500 distinct packets");
    assert!(received >= 490, "host received only {received} of 500");
}

/// A packet-rate limit on the network device holds: the guest's sender is slowed to it.
#[test]
fn packet_rate_limit_holds_within_10_percent() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::create("l") else { return };
    let kernel = kernel_path("net-echo");
    let run = ns
        .command(vmm_bin().to_str().unwrap())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "tap=tap0,pps=1000",
        ])
        .args([
            "--timeout-ms",
            "30000",
            "--cmdline",
            "mode=send count=3000 size=64 ip=10.0.0.2 peer=10.0.0.1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("vmm");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let pps = field(&stdout, "net-echo: sent=", "packets_per_sec") as f64;
    eprintln!("{stdout}\nachieved {pps} packets/s of 1000 configured");
    assert!(
        (900.0..=1100.0).contains(&pps),
        "achieved/configured = {:.3}",
        pps / 1000.0
    );
}

/// A policy file drives the network QoS knob end to end: `models/test-policy-qos.onnx`
/// prefers `qos:net0:3` (10 Mbit/s + 1 kpps) in every state, and the guest's own report of
/// the packets it sent per second falls to that level after the first decision.
#[test]
fn a_policy_sets_network_qos_and_the_guest_feels_it() {
    let _machine = alone();
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::create("q") else { return };
    let dir = integration_tests::Scratch::new("net-qos");
    let db = dir.path("q.db");
    let model =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/test-policy-qos.onnx");
    let kernel = kernel_path("net-echo");
    let run = ns
        .command(vmm_bin().to_str().unwrap())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "tap=tap0",
            "--policy",
            model.to_str().unwrap(),
            "--metrics-interval-ms",
            "100",
            "--state-db",
            db.to_str().unwrap(),
        ])
        .args([
            "--timeout-ms",
            "30000",
            "--cmdline",
            "mode=send ms=2500 size=64 ip=10.0.0.2 peer=10.0.0.1 report_ms=10",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("vmm");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let repo = tuner::state_repo::StateRepo::open(&db, Default::default()).unwrap();
    let rows = repo.rows("vm0", 0).unwrap();
    let ops = tuner::schema::Schema::index_of("guest_ops_rate").unwrap();
    // The action taken after row t is applied during interval t+1; t+2 is the first
    // interval wholly under the level, t+3 too if the tuner's sink lagged an interval on a
    // loaded host (the rollback safeguard, which undoes the change because the guest's
    // throughput and so the reward fall, acts at the end of t+3 at the earliest).
    let pairs: Vec<(f64, f64)> = rows
        .windows(4)
        .filter(|w| w[0].action.as_deref() == Some("qos:net0:3"))
        .map(|w| (w[0].raw[ops], w[2].raw[ops].min(w[3].raw[ops])))
        .collect();
    eprintln!("{stdout}\nguest packets/s (before, under qos:net0:3): {pairs:?}");
    assert!(
        !pairs.is_empty(),
        "the policy never chose qos:net0:3: {rows:?}"
    );
    for (before, under) in &pairs {
        assert!(
            *under <= 1_150.0,
            "guest sent {under:.0} packets/s under a 1 kpps level"
        );
        assert!(
            *before > 3.0 * under,
            "{before:.0} packets/s before vs {under:.0} under the level"
        );
    }
    let peak = rows.iter().map(|r| r.raw[ops]).fold(0.0, f64::max);
    // The guest's own final figure covers the whole run, mostly under the level.
    let pps = field(&stdout, "net-echo: sent=", "packets_per_sec") as f64;
    assert!(pps < peak, "{pps} vs peak {peak}");
}
