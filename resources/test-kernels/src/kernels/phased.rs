//! `phased`: a workload whose demand changes over time, for training and testing the
//! tuner. It runs a schedule of phases, each of one kind:
//!
//! - `cpu`: every vCPU the guest is asked to use (vCPU control `active`) burns the
//!   integer loop of `rt::work`; 1 op = one batch of 1024 iterations (no latency
//!   samples). Workers at or above `active` park in the monitor and come back when
//!   `active` rises.
//! - `io`: vCPU 0 keeps `depth` (1..=4) random 4 KiB reads in flight on the foreground
//!   drive (`dev_fg`, default the first virtio-blk drive), 1 op and 1 latency sample
//!   (submit to completion, ns) per read, while keeping up to 8 sequential 64 KiB writes in
//!   flight on the background drive (`dev_bg`, default the second) without ever waiting
//!   for them: their used ring is polled in the same loop. Background writes are another
//!   tenant's load: bytes only, no ops. The other vCPUs idle.
//! - `idle`: every vCPU idles through the paravirtual idle (`rt::vcpu_control::idle_us`,
//!   2 ms at a time), reporting nothing.
//!
//! Parameters: `scenario=cpu-idle|io-contention|mixed|bursty` (mixed), `seed=N` (1),
//! `phase_ms=N` (2000), `phases=N` (6, at most 64), `schedule=KIND:MS,...` (explicit;
//! overrides scenario and phases), `depth=N` (1..=4; default: drawn per io phase from
//! the seed), `report_ms=N` (20), `dev_fg=N` (0), `dev_bg=N` (1).
//!
//! Output: `phased: scenario=<name> seed=<n> phases=<k>`, then per phase
//! `phased: phase <i> <kind> at_ms=<ms since start> ms=<planned length>`, then
//! `phased: done ops=<total ops> ms=<elapsed>` (exit 0). A bad parameter prints
//! `phased: bad parameter <key>` (exit 2); a missing drive or a device error
//! `phased: error <what>` (exit 1). vCPU 0 leads: it publishes the current phase in
//! [`PHASE`] and the others follow. See README.md, "phased", for the scenarios.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rt::metrics::Reporter;
use rt::rand::SplitMix64;
use rt::vcpu_control;
use rt::virtio::{self, Blk, BLK_S_OK, BLK_T_IN, BLK_T_OUT, SECTOR_SIZE};
use rt::work::burn_batch;

/// Most phases in a schedule.
const MAX_PHASES: usize = 64;
/// Longest phase or mean phase length accepted (1 hour).
const MAX_PHASE_MS: u64 = 3_600_000;
/// One paravirtual idle request while idling (the monitor clamps at 10 ms).
const IDLE_SLICE_US: u64 = 2_000;
/// How often a burning vCPU re-reads `active` (each read is a VM exit).
const CTL_MS: u64 = 10;
/// Foreground request size and most foreground requests in flight.
const FG_BS: u64 = 4096;
const MAX_FG_DEPTH: usize = 4;
/// Background request size and requests kept in flight.
const BG_BS: u64 = 65536;
const BG_DEPTH: usize = 8;
/// Longest wait for a foreground completion before giving up.
const FG_TIMEOUT_MS: u64 = 30_000;
/// Metrics report period unless `report_ms=` says otherwise.
const DEFAULT_REPORT_MS: u64 = 20;
/// Exit statuses.
const EXIT_FAIL: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// Prints `phased: bad parameter <key>` and exits 2.
fn bad(key: &str) -> ! {
    println!("phased: bad parameter {}", key);
    rt::exit(EXIT_USAGE)
}

/// Prints `phased: error <args>` and exits 1.
macro_rules! fail {
    ($($arg:tt)*) => {{
        println!("phased: error {}", format_args!($($arg)*));
        rt::exit(EXIT_FAIL)
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cpu = 0,
    Io = 1,
    Idle = 2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cpu => "cpu",
            Kind::Io => "io",
            Kind::Idle => "idle",
        }
    }

    fn parse(s: &[u8]) -> Option<Kind> {
        match s {
            b"cpu" => Some(Kind::Cpu),
            b"io" => Some(Kind::Io),
            b"idle" => Some(Kind::Idle),
            _ => None,
        }
    }

    fn from_bits(b: u32) -> Kind {
        match b {
            0 => Kind::Cpu,
            1 => Kind::Io,
            _ => Kind::Idle,
        }
    }
}

/// The current phase, published by vCPU 0: [`STARTING`], `((i + 1) << 2) | kind` while
/// phase `i` runs, then [`DONE`]. Followers compare whole words to notice a new phase.
static PHASE: AtomicU32 = AtomicU32::new(STARTING);
const STARTING: u32 = 0;
const DONE: u32 = u32::MAX;

fn phase_word(i: usize, kind: Kind) -> u32 {
    ((i as u32 + 1) << 2) | kind as u32
}

/// Each vCPU's ops so far (for the `done` line).
static OPS: [AtomicU64; rt::MAX_CPUS] = [const { AtomicU64::new(0) }; rt::MAX_CPUS];

#[derive(Clone, Copy)]
struct Phase {
    kind: Kind,
    ms: u64,
    /// Foreground depth of an io phase.
    depth: usize,
}

struct Schedule {
    name: &'static str,
    seed: u64,
    phases: [Phase; MAX_PHASES],
    len: usize,
}

impl Schedule {
    fn push(&mut self, kind: Kind, ms: u64) {
        self.phases[self.len] = Phase { kind, ms, depth: 1 };
        self.len += 1;
    }

    fn has(&self, kind: Kind) -> bool {
        self.phases[..self.len].iter().any(|p| p.kind == kind)
    }
}

/// The value of `key`, a number, or `default`; a malformed number is a bad parameter.
fn num(key: &str, default: u64) -> u64 {
    match rt::arg(key) {
        None => default,
        Some(v) => rt::cmdline::parse_u64(v).unwrap_or_else(|| bad(key)),
    }
}

/// Builds the schedule from the command line (exits 2 on a bad parameter).
fn schedule() -> Schedule {
    let seed = num("seed", 1);
    let mut s = Schedule {
        name: "mixed",
        seed,
        phases: [Phase {
            kind: Kind::Idle,
            ms: 0,
            depth: 1,
        }; MAX_PHASES],
        len: 0,
    };
    if let Some(list) = rt::arg("schedule") {
        s.name = "schedule";
        for item in list.split(|&b| b == b',') {
            let mut parts = item.splitn(2, |&b| b == b':');
            let kind = parts.next().and_then(Kind::parse);
            let ms = parts.next().and_then(rt::cmdline::parse_u64);
            match (kind, ms) {
                (Some(kind), Some(ms)) if ms <= MAX_PHASE_MS && s.len < MAX_PHASES => {
                    s.push(kind, ms)
                }
                _ => bad("schedule"),
            }
        }
    } else {
        let name = rt::arg("scenario").unwrap_or(b"mixed");
        s.name = match name {
            b"cpu-idle" => "cpu-idle",
            b"io-contention" => "io-contention",
            b"mixed" => "mixed",
            b"bursty" => "bursty",
            _ => bad("scenario"),
        };
        let pm = num("phase_ms", 2000);
        if pm == 0 || pm > MAX_PHASE_MS {
            bad("phase_ms");
        }
        let n = num("phases", 6);
        if n == 0 || n > MAX_PHASES as u64 {
            bad("phases");
        }
        generate(&mut s, pm, n as usize);
    }
    let depth = rt::arg("depth").map(|_| num("depth", 1));
    if matches!(depth, Some(d) if d == 0 || d > MAX_FG_DEPTH as u64) {
        bad("depth");
    }
    // A separate stream, so that `depth=` does not change the phases.
    let mut rng = SplitMix64::stream(seed, 2);
    for p in s.phases[..s.len].iter_mut() {
        if p.kind == Kind::Io {
            p.depth = match depth {
                Some(d) => d as usize,
                None => rng.range(1, MAX_FG_DEPTH as u64) as usize,
            };
        }
    }
    s
}

/// Draws `n` phases of scenario `s.name` with mean length `pm` from `s.seed`.
fn generate(s: &mut Schedule, pm: u64, n: usize) {
    let mut rng = SplitMix64::stream(s.seed, 1);
    let normal = |rng: &mut SplitMix64| rng.range(pm / 2, pm + pm / 2);
    let mut prev = None;
    for i in 0..n {
        let (kind, ms) = match s.name {
            "cpu-idle" => {
                let kind = match prev {
                    None if rng.below(2) == 0 => Kind::Cpu,
                    None => Kind::Idle,
                    Some(Kind::Cpu) => Kind::Idle,
                    Some(_) => Kind::Cpu,
                };
                (kind, normal(&mut rng))
            }
            "io-contention" => {
                let kind = if i % 2 == 0 { Kind::Io } else { Kind::Idle };
                (kind, normal(&mut rng))
            }
            "bursty" => {
                if i % 2 == 0 {
                    let kind = if rng.below(2) == 0 {
                        Kind::Cpu
                    } else {
                        Kind::Io
                    };
                    (kind, rng.range(pm / 3, pm))
                } else {
                    (Kind::Idle, rng.range(pm, 2 * pm))
                }
            }
            _ => {
                // mixed: any kind but the previous one.
                const ALL: [Kind; 3] = [Kind::Cpu, Kind::Io, Kind::Idle];
                let kind = match prev {
                    None => ALL[rng.below(3) as usize],
                    Some(p) => {
                        let others = ALL.iter().filter(|&&k| k != p);
                        let pick = rng.below(2) as usize;
                        others.copied().nth(pick).unwrap_or(Kind::Idle)
                    }
                };
                (kind, normal(&mut rng))
            }
        };
        s.push(kind, ms);
        prev = Some(kind);
    }
}

/// Per-vCPU cumulative counters, reported to this vCPU's metrics slot.
struct Counters {
    cpu: usize,
    ops: u64,
    bytes: u64,
    lat_sum_ns: u64,
    lat_n: u64,
    reporter: Reporter,
}

impl Counters {
    fn new(cpu: usize, report_ms: u64) -> Counters {
        Counters {
            cpu,
            ops: 0,
            bytes: 0,
            lat_sum_ns: 0,
            lat_n: 0,
            reporter: Reporter::new(cpu, report_ms, rt::rdtsc()),
        }
    }

    #[inline(always)]
    fn maybe_report(&mut self, now: u64) {
        if self.reporter.due(now) {
            self.publish();
            let (o, b, s, n) = (self.ops, self.bytes, self.lat_sum_ns, self.lat_n);
            self.reporter.report_at(now, o, b, s, n);
        }
    }

    /// Reports now (before idling or parking, so the monitor's figures are current).
    fn flush(&mut self) {
        self.publish();
        self.reporter.last = rt::rdtsc();
        self.reporter
            .report(self.ops, self.bytes, self.lat_sum_ns, self.lat_n);
    }

    fn publish(&self) {
        OPS[self.cpu].store(self.ops, Ordering::Relaxed);
    }
}

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        // Only vCPU 0 checks the parameters (a bad one ends the VM).
        let report_ms = rt::arg("report_ms").and_then(rt::cmdline::parse_u64);
        follow(cpu, report_ms.unwrap_or(DEFAULT_REPORT_MS))
    }
    let report_ms = num("report_ms", DEFAULT_REPORT_MS);
    let s = schedule();
    let dev_fg = num("dev_fg", 0);
    let dev_bg = num("dev_bg", 1);
    if dev_fg >= 32 {
        bad("dev_fg");
    }
    if dev_bg >= 32 || dev_bg == dev_fg {
        bad("dev_bg");
    }
    let mut io = if s.has(Kind::Io) {
        Some(IoLoad::open(dev_fg as usize, dev_bg as usize, s.seed))
    } else {
        None
    };
    let mut c = Counters::new(0, report_ms);
    println!(
        "phased: scenario={} seed={} phases={}",
        s.name, s.seed, s.len
    );
    let khz = rt::tsc_khz();
    let t0 = rt::rdtsc();
    let mut end = t0;
    for (i, p) in s.phases[..s.len].iter().enumerate() {
        let start = rt::rdtsc();
        end = end.saturating_add(p.ms.saturating_mul(khz));
        let word = phase_word(i, p.kind);
        PHASE.store(word, Ordering::Release);
        println!(
            "phased: phase {} {} at_ms={} ms={}",
            i,
            p.kind.name(),
            start.wrapping_sub(t0) / khz,
            p.ms
        );
        match p.kind {
            Kind::Cpu => {
                burn(&mut c, word, end);
            }
            Kind::Io => {
                if let Some(io) = io.as_mut() {
                    io.run(&mut c, p.depth, end);
                }
            }
            Kind::Idle => idle_until(end),
        }
        c.flush();
    }
    PHASE.store(DONE, Ordering::Release);
    let elapsed_ms = rt::rdtsc().wrapping_sub(t0) / khz;
    let total: u64 = (0..rt::cpu_count())
        .map(|i| OPS[i].load(Ordering::Relaxed))
        .sum();
    println!("phased: done ops={} ms={}", total, elapsed_ms);
    rt::exit(0)
}

/// What vCPUs other than 0 do: follow [`PHASE`] until the end.
fn follow(cpu: usize, report_ms: u64) -> ! {
    let mut c = Counters::new(cpu, report_ms);
    loop {
        let word = PHASE.load(Ordering::Acquire);
        if word == STARTING || word == DONE {
            vcpu_control::idle_us(IDLE_SLICE_US as u32);
            continue;
        }
        if cpu as u64 >= u64::from(vcpu_control::active()) {
            c.flush();
            vcpu_control::park(cpu);
            continue;
        }
        match Kind::from_bits(word & 3) {
            Kind::Cpu => {
                burn(&mut c, word, u64::MAX);
                c.flush();
            }
            _ => vcpu_control::idle_us(IDLE_SLICE_US as u32),
        }
    }
}

/// Burns until `deadline` (TSC), [`PHASE`] moves on from `word`, or (not vCPU 0) the
/// guest is asked to use fewer vCPUs than this one's index.
fn burn(c: &mut Counters, word: u32, deadline: u64) {
    let ctl_every = CTL_MS.saturating_mul(rt::tsc_khz());
    let mut next_ctl = rt::rdtsc().saturating_add(ctl_every);
    let mut x = c.ops | 1;
    loop {
        x = burn_batch(x);
        c.ops += 1;
        let now = rt::rdtsc();
        if now >= deadline || PHASE.load(Ordering::Relaxed) != word {
            return;
        }
        c.maybe_report(now);
        if c.cpu != 0 && now >= next_ctl {
            if c.cpu as u64 >= u64::from(vcpu_control::active()) {
                return;
            }
            next_ctl = rt::rdtsc().saturating_add(ctl_every);
        }
    }
}

/// Idles (paravirtual idle, at most [`IDLE_SLICE_US`] at a time) until `deadline` (TSC).
fn idle_until(deadline: u64) {
    loop {
        let now = rt::rdtsc();
        if now >= deadline {
            return;
        }
        let us = rt::ticks_to_ns(deadline - now) / 1000;
        if us == 0 {
            core::hint::spin_loop();
        } else {
            vcpu_control::idle_us(us.min(IDLE_SLICE_US) as u32);
        }
    }
}

/// A foreground request in flight.
#[derive(Clone, Copy)]
struct FgReq {
    head: u16,
    started: u64,
}

/// The io phase's two drives (vCPU 0 only), kept across io phases.
struct IoLoad {
    fg: Blk,
    bg: Blk,
    fg_bufs: u64,
    fg_blocks: u64,
    fg_in_flight: [Option<FgReq>; MAX_FG_DEPTH],
    bg_buf: u64,
    bg_blocks: u64,
    bg_next: u64,
    rng: SplitMix64,
}

impl IoLoad {
    /// Opens both drives or exits 1 with a clear line.
    fn open(dev_fg: usize, dev_bg: usize, seed: u64) -> IoLoad {
        let found = Blk::count();
        if found <= dev_fg.max(dev_bg) {
            fail!(
                "io phases need virtio-blk drives {} (foreground) and {} (background), found {}",
                dev_fg,
                dev_bg,
                found
            );
        }
        if !virtio::dma_region_is_ram() {
            fail!("guest RAM does not cover [8 MiB, 16 MiB) (give the guest at least 32 MiB)");
        }
        let open = |index: usize, what: &str| match Blk::open(index) {
            Ok(b) => b,
            Err(e) => fail!("{} drive {}: {}", what, index, e),
        };
        let fg = open(dev_fg, "foreground");
        let bg = open(dev_bg, "background");
        if bg.read_only() {
            fail!("background drive {} is read-only", dev_bg);
        }
        let blocks = |b: &Blk, bs: u64| b.capacity() / (bs / SECTOR_SIZE);
        let fg_blocks = blocks(&fg, FG_BS);
        let bg_blocks = blocks(&bg, BG_BS);
        if fg_blocks == 0 || bg_blocks == 0 {
            fail!("drives must hold at least 64 KiB");
        }
        let alloc = |size: u64| match virtio::dma_alloc(size, 4096) {
            Some(a) => a,
            None => fail!("out of DMA memory"),
        };
        let fg_bufs = alloc(FG_BS * MAX_FG_DEPTH as u64);
        let bg_buf = alloc(BG_BS);
        IoLoad {
            fg,
            bg,
            fg_bufs,
            fg_blocks,
            fg_in_flight: [None; MAX_FG_DEPTH],
            bg_buf,
            bg_blocks,
            bg_next: 0,
            rng: SplitMix64::stream(seed, 3),
        }
    }

    /// Runs the foreground reader at `depth` and the background writer until `end`
    /// (TSC), then waits for the foreground requests (background ones stay in flight).
    fn run(&mut self, c: &mut Counters, depth: usize, end: u64) {
        let timeout = FG_TIMEOUT_MS.saturating_mul(rt::tsc_khz());
        let mut last_progress = rt::rdtsc();
        loop {
            let now = rt::rdtsc();
            let more = now < end;
            if more {
                self.submit_fg(depth, now);
                self.submit_bg();
            }
            if self.complete_fg(c) {
                last_progress = rt::rdtsc();
            }
            self.complete_bg(c);
            c.maybe_report(now);
            let fg_busy = self.fg_in_flight.iter().any(Option::is_some);
            if !more && !fg_busy {
                return;
            }
            if fg_busy && now.saturating_sub(last_progress) > timeout {
                fail!("timeout waiting for the foreground drive");
            }
        }
    }

    /// Tops the foreground reads up to `depth` in flight (random 4 KiB blocks).
    fn submit_fg(&mut self, depth: usize, now: u64) {
        let mut added = false;
        for (i, slot) in self.fg_in_flight.iter_mut().enumerate().take(depth) {
            if slot.is_some() {
                continue;
            }
            let block = self.rng.below(self.fg_blocks);
            let sector = block * (FG_BS / SECTOR_SIZE);
            let buf = self.fg_bufs + i as u64 * FG_BS;
            match self.fg.submit(BLK_T_IN, sector, buf, FG_BS as u32) {
                Some(head) => {
                    *slot = Some(FgReq { head, started: now });
                    added = true;
                }
                None => break,
            }
        }
        if added {
            self.fg.kick();
        }
    }

    /// Tops the background writes up to [`BG_DEPTH`] in flight (sequential 64 KiB blocks,
    /// wrapping), never waiting.
    fn submit_bg(&mut self) {
        let mut added = false;
        while self.bg.in_flight() < BG_DEPTH {
            let sector = self.bg_next * (BG_BS / SECTOR_SIZE);
            if self
                .bg
                .submit(BLK_T_OUT, sector, self.bg_buf, BG_BS as u32)
                .is_none()
            {
                break;
            }
            self.bg_next = (self.bg_next + 1) % self.bg_blocks;
            added = true;
        }
        if added {
            self.bg.kick();
        }
    }

    /// Takes finished foreground reads off the used ring; returns whether any finished.
    fn complete_fg(&mut self, c: &mut Counters) -> bool {
        let mut any = false;
        loop {
            let done = match self.fg.poll() {
                Ok(Some(done)) => done,
                Ok(None) => return any,
                Err(e) => fail!("foreground drive: {}", e),
            };
            let now = rt::rdtsc();
            if done.status != BLK_S_OK {
                fail!("foreground read status {}", done.status);
            }
            let slot = self
                .fg_in_flight
                .iter_mut()
                .find(|r| matches!(r, Some(r) if r.head == done.head));
            let Some(slot) = slot else {
                fail!("foreground drive returned unknown request {}", done.head);
            };
            if let Some(req) = slot.take() {
                c.ops += 1;
                c.bytes += FG_BS;
                c.lat_sum_ns += rt::ticks_to_ns(now.wrapping_sub(req.started));
                c.lat_n += 1;
            }
            any = true;
        }
    }

    /// Takes finished background writes off the used ring (bytes only).
    fn complete_bg(&mut self, c: &mut Counters) {
        loop {
            match self.bg.poll() {
                Ok(Some(done)) if done.status == BLK_S_OK => c.bytes += BG_BS,
                Ok(Some(done)) => fail!("background write status {}", done.status),
                Ok(None) => return,
                Err(e) => fail!("background drive: {}", e),
            }
        }
    }
}
