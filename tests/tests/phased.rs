//! The `phased` workload kernel: its phase schedule (explicit and drawn from a seed), what
//! the state repository sees in each kind of phase (busy vCPUs, guest I/O, and a
//! paravirtual idle that costs almost no guest CPU time), and its parameter checks.

use std::time::Duration;

use integration_tests::{kvm_available, run_kernel, Run, Scratch};
use tuner::schema::FeatureId;
use tuner::state_repo::{RepoConfig, StateRepo};

const LIMIT: Duration = Duration::from_secs(90);

/// Two sparse 64 MiB drive images in `dir`, as `--drive` arguments.
fn drives(dir: &Scratch) -> Vec<String> {
    ["fg", "bg"]
        .iter()
        .flat_map(|name| {
            let path = dir.path(&format!("{name}.img"));
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(64 << 20).unwrap();
            [
                "--drive".to_string(),
                format!("path={},id={name}", path.display()),
            ]
        })
        .collect()
}

/// Runs `phased` on 2 vCPUs and 64 MiB with two drives and the given command line.
fn phased(dir: &Scratch, cmdline: &str, extra: &[&str]) -> Run {
    let drives = drives(dir);
    let mut args: Vec<&str> = vec!["--vcpus", "2", "--mem-mib", "64"];
    args.extend(drives.iter().map(String::as_str));
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", cmdline]);
    run_kernel("phased", &args, LIMIT)
}

/// The `(kind, planned ms)` of every phase line, in order.
fn phases(run: &Run) -> Vec<(String, u64)> {
    run.stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("phased: phase "))
        .map(|rest| {
            let w: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(w.len(), 4, "phase line {rest:?}");
            assert!(w[2].starts_with("at_ms="), "phase line {rest:?}");
            let ms = w[3].strip_prefix("ms=").expect("ms=").parse().expect("ms");
            (w[1].to_string(), ms)
        })
        .collect()
}

#[test]
fn phases_follow_the_schedule_and_idle_costs_no_guest_cpu() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("phased-sched");
    let db = dir.path("state.db");
    let run = phased(
        &dir,
        "schedule=cpu:600,idle:600,io:600",
        &[
            "--state-db",
            db.to_str().unwrap(),
            "--metrics-interval-ms",
            "100",
        ],
    );
    run.expect_status(0)
        .expect_line("phased: scenario=schedule seed=1 phases=3");
    assert_eq!(
        phases(&run),
        [
            ("cpu".into(), 600),
            ("idle".into(), 600),
            ("io".into(), 600)
        ]
    );
    let done = run
        .stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("phased: done ops="))
        .unwrap_or_else(|| panic!("no done line\n{}", run.stdout));
    let (ops, ms) = done.split_once(" ms=").expect("done line");
    let (ops, ms): (u64, u64) = (ops.parse().unwrap(), ms.parse().unwrap());
    assert!((1790..2500).contains(&ms), "elapsed {ms} ms");
    assert!(ops > 1000, "ops {ops}");

    let repo = StateRepo::open(&db, RepoConfig::default()).unwrap();
    let rows = repo.rows("vm0", 0).unwrap();
    let f = |r: &tuner::state_repo::Row, id: FeatureId| r.raw[id.index()];
    let table: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "t={:.2} util={:.2} ops/s={:.0} io/s={:.0} lat_us={:.1}",
                r.ts_ns as f64 / 1e9,
                f(r, FeatureId::CpuUtilisation),
                f(r, FeatureId::GuestOpsRate),
                f(r, FeatureId::IoRequestRate),
                f(r, FeatureId::GuestLatencyMean)
            )
        })
        .collect();
    let table = table.join("\n");
    eprintln!("{table}");
    // The rows in order: the cpu phase (guest ops, no I/O), then rows with neither (the
    // idle phase), then the io phase (guest I/O).
    let first_io = rows
        .iter()
        .position(|r| f(r, FeatureId::IoRequestRate) > 0.0)
        .unwrap_or_else(|| panic!("no row with I/O\n{table}"));
    let busy = |r: &&tuner::state_repo::Row| f(r, FeatureId::GuestOpsRate) > 0.0;
    let last_cpu = rows[..first_io]
        .iter()
        .rposition(|r| busy(&r))
        .unwrap_or_else(|| panic!("no row with guest ops before the io phase\n{table}"));
    // Whole intervals inside the cpu phase: both vCPUs burn.
    let cpu_rows: Vec<_> = rows[..last_cpu]
        .iter()
        .filter(|r| f(r, FeatureId::CpuUtilisation) > 0.8)
        .collect();
    assert!(cpu_rows.len() >= 3, "cpu phase rows\n{table}");
    for r in &cpu_rows {
        let ops = f(r, FeatureId::GuestOpsRate);
        assert!(
            (1e4..=1e7).contains(&ops),
            "cpu phase ops/s {ops:.0} outside 1e4..1e7\n{table}"
        );
    }
    // The idle phase: 600 ms, so at least 4 whole intervals with no ops, and the vCPUs
    // (both active) spend almost no time in the guest.
    let idle = &rows[last_cpu + 1..first_io];
    assert!(idle.len() >= 4, "idle phase rows\n{table}");
    for r in idle {
        let util = f(r, FeatureId::CpuUtilisation);
        assert!(util < 0.15, "cpu_utilisation {util:.3} while idle\n{table}");
        assert_eq!(f(r, FeatureId::GuestOpsRate), 0.0);
        assert_eq!(f(r, FeatureId::ActiveVcpus), 2.0);
    }
    // The io phase: foreground reads are ops with latency samples.
    let io_rows: Vec<_> = rows[first_io..]
        .iter()
        .filter(|r| busy(r) && f(r, FeatureId::IoRequestRate) > 0.0)
        .collect();
    assert!(io_rows.len() >= 3, "io phase rows\n{table}");
    assert!(
        io_rows
            .iter()
            .all(|r| f(r, FeatureId::GuestLatencyMean) > 0.0),
        "io ops carry latency samples\n{table}"
    );
}

#[test]
fn a_seed_fixes_the_schedule() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("phased-seed");
    let run = |cmdline: &str| {
        let run = phased(&dir, cmdline, &[]);
        run.expect_status(0);
        assert!(run.stdout.contains("phased: done ops="), "{}", run.stdout);
        phases(&run)
    };
    let a = run("scenario=mixed seed=7 phase_ms=40 phases=10");
    let b = run("scenario=mixed seed=7 phase_ms=40 phases=10");
    let c = run("scenario=mixed seed=8 phase_ms=40 phases=10");
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "same seed, same schedule");
    assert_ne!(a, c, "another seed, another schedule");
    for (k, ms) in &a {
        assert!((20..=60).contains(ms), "{k} phase of {ms} ms");
    }
    assert!(
        a.windows(2).all(|w| w[0].0 != w[1].0),
        "mixed never repeats a kind: {a:?}"
    );

    let cpu_idle = run("scenario=cpu-idle seed=3 phase_ms=30 phases=6");
    assert!(cpu_idle.windows(2).all(|w| w[0].0 != w[1].0));
    assert!(cpu_idle.iter().all(|(k, _)| k == "cpu" || k == "idle"));

    let io = run("scenario=io-contention seed=3 phase_ms=30 phases=4");
    let kinds: Vec<&str> = io.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["io", "idle", "io", "idle"]);

    let bursty = run("scenario=bursty seed=5 phase_ms=30 phases=6");
    for (i, (k, ms)) in bursty.iter().enumerate() {
        if i % 2 == 0 {
            assert!(k == "cpu" || k == "io", "burst {k}");
            assert!((10..=30).contains(ms), "burst of {ms} ms");
        } else {
            assert_eq!(k, "idle");
            assert!((30..=60).contains(ms), "gap of {ms} ms");
        }
    }
}

#[test]
fn bad_parameters_and_missing_drives_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("phased-bad");
    for (cmdline, key) in [
        ("scenario=nope", "scenario"),
        ("schedule=cpu:100,walk:100", "schedule"),
        ("schedule=cpu:x", "schedule"),
        ("phases=0", "phases"),
        ("seed=abc", "seed"),
        ("depth=9", "depth"),
    ] {
        phased(&dir, cmdline, &[])
            .expect_status(2)
            .expect_line(&format!("phased: bad parameter {key}"));
    }
    // An io phase without the drives: a clear error, exit 1.
    let run = run_kernel(
        "phased",
        &["--mem-mib", "64", "--cmdline", "schedule=idle:10,io:100"],
        LIMIT,
    );
    run.expect_status(1);
    assert!(
        run.stdout
            .contains("phased: error io phases need virtio-blk drives 0 (foreground) and 1 (background), found 0"),
        "{}",
        run.stdout
    );
    // Without io phases no drive is needed.
    run_kernel("phased", &["--cmdline", "schedule=cpu:50,idle:50"], LIMIT)
        .expect_status(0)
        .expect_line("phased: scenario=schedule seed=1 phases=2");
}
