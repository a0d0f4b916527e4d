//! One policy for every VM shape (actions v2): the shipped `models/general.onnx` loads and
//! tunes `phased` guests of four different shapes (vCPUs, drives, a network device when a
//! TAP can be made), and the state repository shows that the policy itself (not the
//! static fallback) decided every interval and that no action ever touched a device the
//! VM does not have.

use std::process::Stdio;
use std::time::Duration;

use integration_tests::netns::Netns;
use integration_tests::{kernel_path, kvm_available, vmm, vmm_bin, Scratch};
use tuner::state_repo::{Row, StateRepo};

const LIMIT: Duration = Duration::from_secs(120);

fn general() -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/general.onnx")
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// The device slot a decision label or action name touches (`rl:blk2:3`,
/// `rollback:qos:net1:0`, `refused:prio:blk0:high`): `("blk", 2)`, `("net", 1)`.
fn slot_of(label: &str) -> Option<(&'static str, usize)> {
    let name = label
        .trim_start_matches("refused:")
        .trim_start_matches("failed:")
        .trim_start_matches("rollback:");
    let device = name.split(':').nth(1)?;
    for kind in ["blk", "net"] {
        if let Some(i) = device.strip_prefix(kind) {
            return i.parse().ok().map(|i| (kind, i));
        }
    }
    None
}

/// One VM's run of `phased` under the shipped policy.
struct Shape {
    vcpus: u32,
    drives: usize,
    nets: usize,
    cmdline: &'static str,
}

/// Runs `shape` with the shipped policy exploring a little (so that many actions of the
/// layout are tried, each through the masks) and returns the rows and events.
fn run(
    dir: &Scratch,
    ns: Option<&Netns>,
    shape: &Shape,
    tag: &str,
) -> (Vec<Row>, Vec<(String, String)>) {
    let db = dir.path(&format!("{tag}.db"));
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel_path("phased").to_str().expect("utf-8").into(),
        "--vcpus".into(),
        shape.vcpus.to_string(),
        "--mem-mib".into(),
        "64".into(),
        "--policy".into(),
        general(),
        "--epsilon".into(),
        "0.3".into(),
        "--metrics-interval-ms".into(),
        "100".into(),
        "--state-db".into(),
        db.to_str().expect("utf-8").into(),
        "--vm-id".into(),
        tag.into(),
        "--timeout-ms".into(),
        "60000".into(),
        "--cmdline".into(),
        shape.cmdline.into(),
    ];
    for d in 0..shape.drives {
        let path = dir.path(&format!("{tag}-d{d}.img"));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 << 20))
            .expect("drive image");
        args.push("--drive".into());
        args.push(format!("path={}", path.display()));
    }
    if shape.nets > 0 {
        args.push("--net".into());
        args.push("tap=tap0".into());
    }
    let (status, stdout, stderr) = match ns {
        Some(ns) => {
            let out = ns
                .command(vmm_bin().to_str().expect("utf-8"))
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("vmm");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        None => {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = vmm(&refs, LIMIT);
            (out.status, out.stdout, out.stderr)
        }
    };
    assert_eq!(status, Some(0), "{tag}\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("phased: done"),
        "{tag}: the guest did not finish\n{stdout}"
    );
    assert!(
        !stderr.contains("does not match this monitor"),
        "{tag}: the policy was refused\n{stderr}"
    );
    let repo = StateRepo::open(&db, Default::default()).expect("state repository");
    let rows = repo.rows(tag, 0).expect("rows");
    let events = repo
        .events(Some(tag), 0)
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect();
    (rows, events)
}

#[test]
fn the_shipped_policy_tunes_vms_of_every_shape_and_never_an_absent_device() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("policy-shapes");
    let ns = Netns::create("s");
    if ns.is_none() {
        eprintln!("skipped: the 3-vCPU VM runs without its network device (no TAP here)");
    }
    let shapes = [
        Shape {
            vcpus: 1,
            drives: 0,
            nets: 0,
            cmdline: "scenario=cpu-idle seed=3 phase_ms=600 phases=4",
        },
        Shape {
            vcpus: 2,
            drives: 2,
            nets: 0,
            cmdline: "scenario=io-contention seed=1 phase_ms=600 phases=4",
        },
        Shape {
            vcpus: 4,
            drives: 1,
            nets: 0,
            cmdline: "scenario=cpu-idle seed=2 phase_ms=600 phases=4",
        },
        Shape {
            vcpus: 3,
            drives: 4,
            nets: usize::from(ns.is_some()),
            cmdline: "scenario=mixed seed=4 phase_ms=600 phases=5 dev_fg=2 dev_bg=3",
        },
    ];
    let mut applied_total = 0;
    for (i, shape) in shapes.iter().enumerate() {
        let tag = format!("shape{i}-{}v{}d{}n", shape.vcpus, shape.drives, shape.nets);
        let ns = if shape.nets > 0 { ns.as_ref() } else { None };
        let (rows, events) = run(&dir, ns, shape, &tag);
        eprintln!(
            "{tag}: {} rows; actions {:?}; events {events:?}",
            rows.len(),
            rows.iter()
                .filter_map(|r| r.action.as_deref())
                .filter(|a| *a != "noop")
                .collect::<Vec<_>>()
        );
        // The policy loaded (no load failure, no fallback) and made every decision.
        assert!(
            !events
                .iter()
                .any(|(k, _)| k == "policy_load_failure" || k == "fallback"),
            "{tag}: {events:?}"
        );
        let decided: Vec<&Row> = rows.iter().filter(|r| r.action.is_some()).collect();
        assert!(decided.len() >= 15, "{tag}: {} decisions", decided.len());
        assert!(
            decided.iter().all(|r| r.policy_id == "general"),
            "{tag}: policies {:?}",
            decided.iter().map(|r| &r.policy_id).collect::<Vec<_>>()
        );
        // No decision, refusal, rollback or start step ever named an absent device.
        let labels = decided.iter().filter_map(|r| r.action.as_deref()).chain(
            events
                .iter()
                .filter(|(k, _)| k == "policy_start" || k == "refusal" || k == "rollback")
                .flat_map(|(_, d)| d.split([',', ' '])),
        );
        for label in labels {
            if let Some((kind, slot)) = slot_of(label) {
                let have = if kind == "blk" {
                    shape.drives
                } else {
                    shape.nets
                };
                assert!(slot < have, "{tag}: {label} on an absent device");
            }
        }
        // The vCPUs stayed within the VM's own bounds.
        let vcpus = tuner::schema::Schema::index_of("active_vcpus").expect("feature");
        for r in &rows {
            assert!(
                (1.0..=f64::from(shape.vcpus)).contains(&r.raw[vcpus]),
                "{tag}: {} vCPUs",
                r.raw[vcpus]
            );
        }
        let applied = decided
            .iter()
            .filter_map(|r| r.action.as_deref())
            .filter(|a| *a != "noop" && !a.starts_with("refused:") && !a.starts_with("failed:"))
            .count();
        if shape.vcpus == 1 && shape.drives == 0 && shape.nets == 0 {
            // Nothing to tune: every action but noop is masked.
            assert_eq!(applied, 0, "{tag}");
            assert!(
                decided.iter().all(|r| r.action.as_deref() == Some("noop")),
                "{tag}"
            );
        }
        applied_total += applied;
    }
    assert!(applied_total >= 5, "{applied_total} actions applied in all");
}
