#!/usr/bin/env python3
"""Multi-tenant benchmark of `vmm host` (issue 16, items 6-7): scenarios x arms, interleaved.

Scenarios (3 vCPUs or more on the host's 2 cores; `bursty` is held out: the arbiter's
constants were chosen looking at `noisy` and `peaks` only):
  noisy   critical blk-io randread (1 vCPU, SLO min_ops/p99) beside a 2-vCPU cpu-burn batch VM
  peaks   the same critical VM beside two 2-vCPU `phased` VMs (standard, batch) whose CPU
          phases alternate (cpu:P,idle:P and idle:P,cpu:P): their peaks never coincide,
          5 vCPUs on 2 cores
  bursty  a critical 2-vCPU `phased` VM alternating io and cpu phases (io: 1 vCPU reading at
          depth 1 with background writes; cpu: both vCPUs burning) beside a steady 2-vCPU
          cpu-burn batch VM
Arms:
  alone      the critical VM by itself (the reference)
  static     plain `vmm run` processes pinned with taskset: critical on the last CPU, the
             others on the first (the only disjoint partition of 2 cores)
  off        `vmm host`, arbiter off (no grants: Linux's scheduler; the untuned baseline)
  threshold  `vmm host`, a threshold autoscaler per VM (no SLO, no placement)
  pi         `vmm host`, a PI controller on the critical VM's SLO margin (time only)
  slo        `vmm host`, the SLO arbiter (placement + time, by class)
A seed sets the VMs' start order, the phase lengths and the `phased` seed. Per run: the
critical VM's attainment (share of its 100 ms intervals with slo_met=1 in the state
repository, window [WARM_MS, RUN_MS-500] of its uptime), its median per-interval p99,
batch ops/s (guest.ops deltas over the window, summed over the non-critical VMs), core-
seconds granted (GET /host grants integrated over the window; static: the partition) and
used (each VM's process CPU time from /proc/<pid>/stat, all threads).

Usage: scripts/bench_host.py [--seeds N] [--scenarios noisy,peaks,bursty] [--arms ...]
Env: VMM, KERNELS, RUN_MS (12000), WARM_MS (2000). Writes target/bench/host-<scenario>.json
and target/bench/host-all.json (runs, summaries, time series for `vmm-bench host-plot`).
"""
import argparse
import json
import math
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.environ.get("VMM", f"{ROOT}/target/release/vmm")
KERNELS = os.environ.get("KERNELS", f"{ROOT}/target/test-kernels")
RUN_MS = int(os.environ.get("RUN_MS", "12000"))
WARM_MS = int(os.environ.get("WARM_MS", "2000"))
MIN_OPS = float(os.environ.get("MIN_OPS", "10000"))
P99_US = int(os.environ.get("P99_US", "1000"))
BURSTY_MIN_OPS = float(os.environ.get("BURSTY_MIN_OPS", "5000"))
ARMS = ["alone", "static", "off", "threshold", "pi", "slo", "static-w"]
# The CPU weight `slo` gives each VM (100 x min(vCPUs + 1, 2 CPUs) x class factor), for the
# static-w arm: the static partition with the same weights, pushed with PUT /grant.
CLASS_FACTOR = {"critical": 4, "standard": 2, "batch": 1}
SCENARIOS = ["noisy", "peaks", "bursty"]
HELD_OUT = "bursty"
CLK = os.sysconf("SC_CLK_TCK")


def http_get(sock, path, timeout=0.5):
    """GET over a unix socket; the JSON body or None."""
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        body = data.split(b"\r\n\r\n", 1)[1]
        return json.loads(body)
    except (OSError, ValueError, IndexError):
        return None


def proc_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def vms_of(scenario, seed, tmp):
    """[(id, class, vm config without sockets)], critical first."""
    crit_blk = {
        "kernel": f"{KERNELS}/blk-io", "cmdline": f"mode=randread ms={RUN_MS}",
        "drives": [{"path": f"{tmp}/disk.img", "read_only": True}],
        "slo": {"class": "critical", "p99_us": P99_US, "min_ops": MIN_OPS}}
    burn = {"kernel": f"{KERNELS}/cpu-burn", "cmdline": f"ms={RUN_MS}", "vcpus": 2,
            "slo": {"class": "batch"}}
    if scenario == "noisy":
        return [("crit", crit_blk), ("batch", burn)]
    if scenario == "peaks":
        p = [1500, 2000, 2500][seed % 3]
        n = RUN_MS // (2 * p) + 1

        def phased(first, second, cls):
            sched = ",".join([f"{first}:{p},{second}:{p}"] * n)
            return {"kernel": f"{KERNELS}/phased", "cmdline": f"schedule={sched} seed={seed}",
                    "vcpus": 2, "slo": {"class": cls}}
        return [("crit", crit_blk), ("app", phased("cpu", "idle", "standard")),
                ("batch", phased("idle", "cpu", "batch"))]
    if scenario == "bursty":
        b = [800, 1000, 1200][seed % 3]
        n = RUN_MS // (2 * b) + 1
        sched = ",".join([f"io:{b},cpu:{b}"] * n)
        crit = {"kernel": f"{KERNELS}/phased", "cmdline": f"schedule={sched} seed={seed}",
                "vcpus": 2,
                "drives": [{"path": f"{tmp}/fg.img", "read_only": True}, {"path": f"{tmp}/bg-{seed}.img"}],
                "slo": {"class": "critical", "p99_us": P99_US, "min_ops": BURSTY_MIN_OPS}}
        return [("crit", crit), ("batch", burn)]
    raise ValueError(scenario)


class Poller(threading.Thread):
    """Every 0.5 s: GET /vm of each VM, GET /host when hosted, each VM's process CPU."""

    def __init__(self, d, ids, host, pids):
        super().__init__(daemon=True)
        self.d, self.ids, self.host, self.pids = d, ids, host, pids
        self.rows, self.stop = [], threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop.is_set():
            t = time.monotonic() - t0
            row = {"t": t, "vm": {}, "host": None, "cpu": {}}
            for vid in self.ids:
                b = http_get(f"{self.d}/{vid}.sock", "/vm")
                if b:
                    row["vm"][vid] = {"uptime_ns": b.get("uptime_ns"), "ops": (b.get("guest") or {}).get("ops")}
            if self.host:
                h = http_get(f"{self.d}/host.sock", "/host")
                if h:
                    row["host"] = {v["id"]: {"grant": (v.get("grant") or {}).get("cores"),
                                             "cpus": (v.get("grant") or {}).get("cpus"),
                                             "used": v.get("used_cores"), "pid": v.get("pid")}
                                   for v in h.get("vms", [])}
                    for vid, v in row["host"].items():
                        if v["pid"]:
                            self.pids[vid] = v["pid"]
            for vid, pid in list(self.pids.items()):
                row["cpu"][vid] = proc_cpu_s(pid)
            self.rows.append(row)
            self.stop.wait(0.5)


def run_arm(scenario, arm, seed, tmp):
    d = f"{tmp}/{scenario}-{arm}-{seed}"
    os.makedirs(d)
    vms = vms_of(scenario, seed, tmp)
    if arm == "alone":
        vms = vms[:1]
    order = vms if seed % 2 == 1 else list(reversed(vms))
    ids = [v[0] for v in vms]
    procs, pids = [], {}
    ncpu = len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))
    if arm in ("alone", "static", "static-w"):
        gap = (seed % 3) * 0.3
        for i, (vid, cfg) in enumerate(order):
            c = dict(cfg, api_sock=f"{d}/{vid}.sock", serial_out=f"{d}/{vid}.serial",
                     state_db=f"{d}/state.db", vm_id=vid)
            with open(f"{d}/{vid}.json", "w") as f:
                json.dump(c, f)
            pre = []
            if arm in ("static", "static-w"):
                pre = ["taskset", "-c", str(cpus[-1] if vid == "crit" else cpus[0])]
            p = subprocess.Popen(pre + [VMM, "run", "--config", f"{d}/{vid}.json"],
                                 stdout=open(f"{d}/{vid}.out", "w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            pids[vid] = p.pid
            if i + 1 < len(order):
                time.sleep(gap)
        if arm == "static-w":
            for vid, cfg in order:
                w = 100 * min(cfg.get("vcpus", 1) + 1, ncpu) * CLASS_FACTOR[cfg["slo"]["class"]]
                for _ in range(100):
                    if os.path.exists(f"{d}/{vid}.sock"):
                        break
                    time.sleep(0.05)
                subprocess.run(["curl", "-s", "-m", "2", "--unix-socket", f"{d}/{vid}.sock", "-X", "PUT",
                                "-d", json.dumps({"weight": w}), "http://localhost/grant"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        host = False
    else:
        hc = {"api_sock": f"{d}/host.sock", "state_db": f"{d}/state.db", "interval_ms": 500,
              "log_dir": d, "arbiter": arm,
              "vms": [{"id": vid, "op_bytes": 4096,
                       "vm": dict(cfg, api_sock=f"{d}/{vid}.sock", serial_out=f"{d}/{vid}.serial")}
                      for vid, cfg in order]}
        with open(f"{d}/host.json", "w") as f:
            json.dump(hc, f)
        procs.append(subprocess.Popen([VMM, "host", "--config", f"{d}/host.json"],
                                      stdout=open(f"{d}/host.out", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        host = True
    poller = Poller(d, ids, host, pids)
    poller.start()
    deadline = time.monotonic() + RUN_MS / 1000 + 20
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 15)
            p.wait()
        if p.returncode not in (0,):
            print(f"bench-host: {scenario} {arm} seed {seed}: exit {p.returncode}", file=sys.stderr)
    poller.stop.set()
    poller.join()
    return measure(d, scenario, arm, seed, ids, poller.rows, ncpu)


def window_rows(rows, vid, lo, hi):
    return [r for r in rows if vid in r["vm"] and r["vm"][vid]["uptime_ns"] is not None
            and lo <= r["vm"][vid]["uptime_ns"] <= hi]


def measure(d, scenario, arm, seed, ids, rows, ncpu):
    lo, hi = WARM_MS * 1_000_000, (RUN_MS - 500) * 1_000_000
    db = sqlite3.connect(f"{d}/state.db")
    crit_rows = list(db.execute(
        "SELECT ts_ns, slo_met, slo_p99_margin, slo_ops_margin FROM samples "
        "WHERE vm_id='crit' AND ts_ns BETWEEN ? AND ? ORDER BY ts_ns", (lo, hi)))
    db.close()
    judged = [r for r in crit_rows if r[1] is not None]
    att = sum(1 for r in judged if r[1] == 1) / len(judged) if judged else None
    goal = BURSTY_MIN_OPS if scenario == "bursty" else MIN_OPS
    iops = [goal * (1 + r[3]) for r in crit_rows if r[3] is not None]
    att5 = (sum(1 for r in crit_rows if r[3] is not None and (r[2] is None or r[2] >= 0)
                and goal * (1 + r[3]) >= goal / 2) / len(iops)) if iops else None
    p99s = [P99_US * (1 - r[2]) for r in crit_rows if r[2] is not None]
    # Attainment had the ops goal been 10 000/s (exact below the margin cap of 11 x goal).
    att10k = (sum(1 for r in crit_rows if r[3] is not None and (r[2] is None or r[2] >= 0)
                  and goal * (1 + r[3]) >= 10_000) / len(iops)) if iops else None

    def rate(vid):
        pts = [(r["vm"][vid]["uptime_ns"], r["vm"][vid]["ops"]) for r in window_rows(rows, vid, lo, hi)
               if r["vm"][vid]["ops"] is not None]
        if len(pts) < 2 or pts[-1][0] == pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / ((pts[-1][0] - pts[0][0]) / 1e9)

    # The window in poll time: the critical VM's uptime window.
    wr = window_rows(rows, "crit", lo, hi)
    t_lo, t_hi = (wr[0]["t"], wr[-1]["t"]) if len(wr) >= 2 else (None, None)
    in_win = [r for r in rows if t_lo is not None and t_lo <= r["t"] <= t_hi]
    span = (t_hi - t_lo) if t_lo is not None else None
    granted = {}
    used = {}
    for vid in ids:
        if arm in ("static", "static-w"):
            # The critical VM's CPU is its own; the others share the other one.
            share = 1.0 if vid == "crit" else 1.0 / max(1, len(ids) - 1)
            granted[vid] = share * span if span else None
        elif arm in ("threshold", "pi", "slo"):
            g = 0.0
            for a, b in zip(in_win, in_win[1:]):
                c = ((a["host"] or {}).get(vid) or {}).get("grant")
                g += (c or 0.0) * (b["t"] - a["t"])
            granted[vid] = g if span else None
        else:
            granted[vid] = None
        cs = [r["cpu"].get(vid) for r in in_win if r["cpu"].get(vid) is not None]
        used[vid] = (cs[-1] - cs[0]) if len(cs) >= 2 else None
    batch_rates = [rate(v) for v in ids if v != "crit"]
    series = [{"t": r["t"], "grant": {v: ((r["host"] or {}).get(v) or {}).get("grant") for v in ids},
               "cpus": {v: ((r["host"] or {}).get(v) or {}).get("cpus") for v in ids}} for r in rows]
    met_series = [(r[0] / 1e9, r[1]) for r in crit_rows]
    tot = lambda xs: sum(xs.values()) if xs and all(x is not None for x in xs.values()) else None
    return {
        "scenario": scenario, "arm": arm, "seed": seed, "held_out": scenario == HELD_OUT,
        "crit_intervals": len(judged), "crit_attainment": att, "crit_attainment_at_half_goal": att5,
        "crit_attainment_at_10k": att10k,
        "crit_interval_ops_median": statistics.median(iops) if iops else None,
        "crit_p99_us_median": statistics.median(p99s) if p99s else None,
        "crit_ops_per_s": rate("crit"),
        "batch_ops_per_s": sum(batch_rates) if batch_rates and all(x is not None for x in batch_rates) else None,
        "window_s": span, "core_s_granted": granted, "core_s_used": used,
        "core_s_granted_total": tot(granted), "core_s_used_total": tot(used),
        "host_utilisation": (tot(used) / (span * ncpu)) if tot(used) is not None and span else None,
        "series": series, "crit_met_series": met_series,
    }


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(xs):
    xs = [x for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    m = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": m, "ci95": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return {"n": n, "mean": m, "ci95": T95.get(n - 1, 2.262) * sd / math.sqrt(n)}


METRICS = ["crit_attainment", "crit_attainment_at_half_goal", "crit_attainment_at_10k", "crit_p99_us_median", "crit_ops_per_s",
           "batch_ops_per_s", "core_s_granted_total", "core_s_used_total", "host_utilisation"]


def fmt(c, scale=1.0, digits=2):
    if c["mean"] is None:
        return "-"
    s = f"{c['mean'] * scale:.{digits}f}"
    return s + (f" ± {c['ci95'] * scale:.{digits}f}" if c["ci95"] is not None else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tag", default="", help="suffix of the output files (host-<scenario>-<tag>.json)")
    a = ap.parse_args()
    scenarios = [s for s in a.scenarios.split(",") if s]
    arms = [x for x in a.arms.split(",") if x]
    for s in scenarios:
        if s not in SCENARIOS:
            sys.exit(f"bench-host: unknown scenario {s!r} (one of {SCENARIOS})")
    for x in arms:
        if x not in ARMS:
            sys.exit(f"bench-host: unknown arm {x!r} (one of {ARMS})")
    if not 1 <= a.seeds <= 50:
        sys.exit("bench-host: --seeds must be 1..50")
    for f in [VMM, f"{KERNELS}/blk-io", f"{KERNELS}/cpu-burn", f"{KERNELS}/phased"]:
        if not os.path.exists(f):
            sys.exit(f"bench-host: missing {f} (cargo build --release -p vmm; cargo build)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench-host: needs at least 2 CPUs")
    runs = []
    with tempfile.TemporaryDirectory(prefix="vmm-bench-host-") as tmp:
        for img in ["disk.img", "fg.img"]:
            with open(f"{tmp}/{img}", "wb") as f:
                f.truncate(8 << 20)
        for seed in range(1, a.seeds + 1):
            with open(f"{tmp}/bg-{seed}.img", "wb") as f:
                f.truncate(64 << 20)
            # Interleaved: every scenario and arm once, then the next seed.
            for s in scenarios:
                for x in arms:
                    r = run_arm(s, x, seed, tmp)
                    runs.append(r)
                    short = {k: v for k, v in r.items() if k not in ("series", "crit_met_series")}
                    print(json.dumps(short), file=sys.stderr)
    out_dir = f"{ROOT}/target/bench"
    os.makedirs(out_dir, exist_ok=True)
    summary = {s: {x: {m: ci([r[m] for r in runs if r["scenario"] == s and r["arm"] == x]) for m in METRICS}
                   for x in arms} for s in scenarios}
    meta = {"run_ms": RUN_MS, "warm_ms": WARM_MS, "seeds": a.seeds, "held_out": HELD_OUT,
            "slo": {"min_ops": MIN_OPS, "bursty_min_ops": BURSTY_MIN_OPS, "p99_us": P99_US},
            "host_cpus": len(os.sched_getaffinity(0))}
    if a.tag and not a.tag.replace("-", "").isalnum():
        sys.exit("bench-host: --tag must be letters, digits and '-'")
    sfx = f"-{a.tag}" if a.tag else ""
    for s in scenarios:
        with open(f"{out_dir}/host-{s}{sfx}.json", "w") as f:
            json.dump(dict(meta, scenario=s, summary=summary[s],
                           runs=[r for r in runs if r["scenario"] == s]), f, indent=1)
    with open(f"{out_dir}/host-all{sfx}.json", "w") as f:
        json.dump(dict(meta, summary=summary, runs=runs), f)
    for s in scenarios:
        print(f"\n{s}{' (held out)' if s == HELD_OUT else ''}: {a.seeds} seeds, mean ± 95% CI (t)")
        print("| arm | crit attainment | at half the ops goal | crit p99 us | crit kops/s | batch Mops/s "
              "| core-s granted | core-s used | host util |")
        print("|---|---|---|---|---|---|---|---|---|")
        for x in arms:
            m = summary[s][x]
            print(f"| {x} | {fmt(m['crit_attainment'])} | {fmt(m['crit_attainment_at_half_goal'])} | "
                  f"{fmt(m['crit_p99_us_median'], 1, 1)} | {fmt(m['crit_ops_per_s'], 1e-3, 1)} | "
                  f"{fmt(m['batch_ops_per_s'], 1e-6, 1)} | {fmt(m['core_s_granted_total'], 1, 1)} | "
                  f"{fmt(m['core_s_used_total'], 1, 1)} | {fmt(m['host_utilisation'])} |")


if __name__ == "__main__":
    main()
