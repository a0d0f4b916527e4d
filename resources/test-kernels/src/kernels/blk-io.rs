//! `blk-io`: drives a virtio-blk device through the polling driver in `rt/virtio.rs`.
//!
//! Parameters (`key=value`): `dev=0` (index among the virtio-blk devices), `mode=capacity`
//! (`capacity`, `fill`, `check`, `id`, `rotest`, `seqread`, `seqwrite`, `randread`,
//! `randwrite`), `bs=4096` (bytes per request: a multiple of 512, at most 65536),
//! `depth=1` (requests in flight, 1..=64), `ms=1000` (timed modes), `sectors=2048`
//! (`fill`/`check`), `seed=0`, `span=min(capacity, 65536)` (sectors the timed modes cover),
//! `verify=0` (1: read back what a timed write mode wrote), `progress=0` (ms between
//! progress lines in the timed modes, 0 = none), `timeout_ms=30000` (longest wait for any
//! completion before giving up), `multi=0` (1: vCPU i runs the timed mode on device i),
//! `devs=N` (2..=32: vCPU 0 alone runs the timed mode on devices 0..N at once),
//! `report_ms=50` (metrics-device reports of the timed modes, 0 = none).
//!
//! Output lines (all start with `blk-io: `):
//! - `capacity`: `blk-io: capacity=<sectors> ro=<0|1>`
//! - `fill`: `blk-io: fill ok sectors=<n>` (pattern below, then FLUSH if offered)
//! - `check`: `blk-io: check ok sectors=<n>` or
//!   `blk-io: check mismatch sector=<s> byte=<j> got=<g> want=<w>` (exit 1)
//! - `id`: `blk-io: id=<string up to the first NUL>`
//! - `rotest`: `blk-io: write status=<status>` (exit 0 whatever the status)
//! - timed modes: optional `blk-io: progress t_ms=<t> ops=<n> bytes=<b>` lines, then
//!   `blk-io: mode=<m> bs=<bs> depth=<d> ms=<elapsed> ops=<n> bytes=<b> ops_per_sec=<x>
//!   bytes_per_sec=<y> errors=<e>`; with `verify=1` after a write mode
//!   `blk-io: verify ok blocks=<n>` or
//!   `blk-io: verify mismatch sector=<s> stored=0x<c> computed=0x<c> tag=<w1>` (exit 1)
//! - `multi=1` (timed modes only): every vCPU i prints `blk-io: dev=<i> ...` progress,
//!   result and verify lines (the single-device lines with a `dev=<i> ` prefix), then
//!   vCPU 0 prints `blk-io: multi done devices=<n>` (exit 1 if any device had errors), or
//!   `blk-io: error multi needs one device per vCPU` (exit 1)
//! - `devs=N` (timed modes only): vCPU 0 keeps `depth` requests in flight on each of
//!   devices 0..N from one polling loop, then prints the `blk-io: dev=<i> ...` result line
//!   of every device in order (then its verify lines), then `blk-io: devs done devices=<N>`
//!   (exit 1 if any device had errors)
//! - errors: `blk-io: error <what>` (exit 1; exit 2 for a bad parameter)
//!
//! Metrics (timed modes): slot 0 (`multi=1`: slot i; `devs=N`: slot 0, summed over the
//! devices) of the metrics device gets the OK requests' ops, bytes, sum of
//! submit-to-completion latencies (TSC, in ns) and count, every `report_ms` ms and once
//! after the drain, before the result line(s).
//!
//! Fill pattern: byte j (0..512) of sector s is `(s * 131 + j * 7 + seed) & 0xff`.
//! Timed-write sectors: u64 words w0..w63 (little endian); w1 = the sector number,
//! w2 = a write tag, w3..w63 pseudo-random; w0 = XOR over i in 1..=63 of
//! `mix(w_i + i * 0x9e3779b97f4a7c15)` with `mix` the splitmix64 finalizer.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use rt::metrics::{self, Reporter};
use rt::virtio::{self, Blk, BLK_S_OK, BLK_T_IN, BLK_T_OUT, SECTOR_SIZE};

/// Most requests in flight (`depth`).
const MAX_DEPTH: usize = 64;
/// Largest request (`bs`).
const MAX_BS: u64 = 65536;
/// Default `span` cap in sectors.
const DEFAULT_SPAN: u64 = 65536;
/// Sector size as a usize.
const SECTOR: usize = SECTOR_SIZE as usize;
/// Exit status for a bad parameter.
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure (device error, verification mismatch).
const EXIT_FAIL: u8 = 1;

/// Prints `blk-io: error <args>` and exits with `code`.
macro_rules! die {
    ($code:expr, $($arg:tt)*) => {{
        println!("blk-io: error {}", format_args!($($arg)*));
        rt::exit($code)
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Capacity,
    Fill,
    Check,
    Id,
    RoTest,
    Timed { write: bool, random: bool },
}

struct Params {
    dev: u64,
    mode: Mode,
    mode_name: &'static str,
    bs: u64,
    depth: usize,
    ms: u64,
    sectors: u64,
    seed: u64,
    span: Option<u64>,
    verify: bool,
    progress_ms: u64,
    timeout_ns: u64,
    report_ms: u64,
    multi: bool,
    /// `devs=N`: the number of devices vCPU 0 drives at once (None = not given).
    devs: Option<u64>,
}

fn params() -> Params {
    let mode_arg = rt::arg("mode").unwrap_or(b"capacity");
    let (mode, mode_name) = match mode_arg {
        b"capacity" => (Mode::Capacity, "capacity"),
        b"fill" => (Mode::Fill, "fill"),
        b"check" => (Mode::Check, "check"),
        b"id" => (Mode::Id, "id"),
        b"rotest" => (Mode::RoTest, "rotest"),
        b"seqread" => (Mode::Timed { write: false, random: false }, "seqread"),
        b"seqwrite" => (Mode::Timed { write: true, random: false }, "seqwrite"),
        b"randread" => (Mode::Timed { write: false, random: true }, "randread"),
        b"randwrite" => (Mode::Timed { write: true, random: true }, "randwrite"),
        _ => die!(EXIT_USAGE, "bad parameter mode"),
    };
    let bs = rt::arg_u64("bs", 4096);
    if bs == 0 || !bs.is_multiple_of(SECTOR_SIZE) || bs > MAX_BS {
        die!(EXIT_USAGE, "bad parameter bs={} (multiple of 512, at most 65536)", bs);
    }
    let depth = rt::arg_u64("depth", 1);
    if depth == 0 || depth > MAX_DEPTH as u64 {
        die!(EXIT_USAGE, "bad parameter depth={} (1..=64)", depth);
    }
    Params {
        dev: rt::arg_u64("dev", 0),
        mode,
        mode_name,
        bs,
        depth: depth as usize,
        ms: rt::arg_u64("ms", 1000),
        sectors: rt::arg_u64("sectors", 2048),
        seed: rt::arg_u64("seed", 0),
        span: rt::arg("span").map(|_| rt::arg_u64("span", 0)),
        verify: rt::arg_u64("verify", 0) != 0,
        progress_ms: rt::arg_u64("progress", 0),
        timeout_ns: rt::arg_u64("timeout_ms", 30_000).saturating_mul(1_000_000),
        report_ms: rt::arg_u64("report_ms", metrics::DEFAULT_REPORT_MS),
        multi: rt::arg_u64("multi", 0) != 0,
        devs: rt::arg("devs").map(|_| rt::arg_u64("devs", 0)),
    }
}

/// vCPU 0's decision for the other vCPUs: not yet, park, or run `multi`.
static ROLE: AtomicU8 = AtomicU8::new(ROLE_UNDECIDED);
const ROLE_UNDECIDED: u8 = 0;
const ROLE_PARK: u8 = 1;
const ROLE_MULTI: u8 = 2;

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        // Only vCPU 0 parses and checks the parameters (a bad one ends the VM).
        loop {
            match ROLE.load(Ordering::Acquire) {
                ROLE_UNDECIDED => core::hint::spin_loop(),
                ROLE_MULTI => multi(cpu),
                _ => rt::park(),
            }
        }
    }
    let p = params();
    if !virtio::dma_region_is_ram() {
        die!(
            EXIT_FAIL,
            "guest RAM does not cover [8 MiB, 16 MiB) (give the guest at least 32 MiB)"
        );
    }
    if p.multi && p.devs.is_some() {
        die!(EXIT_USAGE, "bad parameter multi=1 (not with devs)");
    }
    if p.multi {
        if !matches!(p.mode, Mode::Timed { .. }) {
            die!(
                EXIT_USAGE,
                "bad parameter mode={} (multi=1 needs a timed mode)",
                p.mode_name
            );
        }
        if Blk::count() < rt::cpu_count() {
            die!(EXIT_FAIL, "multi needs one device per vCPU");
        }
        ROLE.store(ROLE_MULTI, Ordering::Release);
        multi(0)
    }
    ROLE.store(ROLE_PARK, Ordering::Release);
    if let Some(n) = p.devs {
        let Mode::Timed { write, random } = p.mode else {
            die!(
                EXIT_USAGE,
                "bad parameter mode={} (devs needs a timed mode)",
                p.mode_name
            );
        };
        if !(2..=MAX_DEVS as u64).contains(&n) {
            die!(EXIT_USAGE, "bad parameter devs={} (2..={})", n, MAX_DEVS);
        }
        devs(&p, n as usize, write, random)
    }
    let blk = open(p.dev as usize, &p);
    match p.mode {
        Mode::Capacity => {
            println!(
                "blk-io: capacity={} ro={}",
                blk.capacity(),
                blk.read_only() as u8
            );
            rt::exit(0)
        }
        Mode::Id => id(blk, &p),
        Mode::RoTest => rotest(blk, &p),
        Mode::Fill | Mode::Check => sweep(blk, &p),
        Mode::Timed { write, random } => timed(blk, &p, write, random),
    }
}

/// Opens the `index`-th virtio-blk device and checks `depth` against its queue, or dies.
fn open(index: usize, p: &Params) -> Blk {
    let blk = match Blk::open(index) {
        Ok(blk) => blk,
        Err(virtio::Error::NoDevice) if index == 0 => die!(EXIT_FAIL, "no virtio-blk device"),
        Err(virtio::Error::NoDevice) => die!(EXIT_FAIL, "no virtio-blk device dev={}", index),
        Err(e) => die!(EXIT_FAIL, "virtio-blk init: {}", e),
    };
    if p.depth > blk.max_in_flight() {
        die!(
            EXIT_USAGE,
            "bad parameter depth={} (queue holds {})",
            p.depth,
            blk.max_in_flight()
        );
    }
    blk
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// A DMA buffer as a byte slice.
///
/// # Safety
/// `addr..addr + len` must be DMA memory that no in-flight request uses for as long as
/// the slice lives.
unsafe fn bytes_mut<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    core::slice::from_raw_parts_mut(addr as usize as *mut u8, len)
}

/// Allocates DMA memory or dies.
fn alloc(size: u64, align: u64, what: &str) -> u64 {
    match virtio::dma_alloc(size, align) {
        Some(a) => a,
        None => die!(EXIT_USAGE, "DMA region [8 MiB, 16 MiB) too small for {}", what),
    }
}

/// Byte 0 of sector `s` in the fill pattern; byte j is that plus 7 * j (mod 256).
fn pattern_base(s: u64, seed: u64) -> u8 {
    (s.wrapping_mul(131).wrapping_add(seed) & 0xff) as u8
}

/// Writes the fill pattern for sectors `first..` into `buf` (whole sectors).
fn fill_pattern(buf: &mut [u8], first: u64, seed: u64) {
    for (k, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let mut v = pattern_base(first + k as u64, seed);
        for b in sector {
            *b = v;
            v = v.wrapping_add(7);
        }
    }
}

/// First byte of `buf` (sectors `first..`) that differs from the fill pattern:
/// (sector, byte, got, want).
fn check_pattern(buf: &[u8], first: u64, seed: u64) -> Option<(u64, usize, u8, u8)> {
    for (k, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let s = first + k as u64;
        let mut want = pattern_base(s, seed);
        for (j, &got) in sector.iter().enumerate() {
            if got != want {
                return Some((s, j, got, want));
            }
            want = want.wrapping_add(7);
        }
    }
    None
}

/// splitmix64's finalizer: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Contribution of word `i` (value `w`) to a sector checksum.
fn term(i: u64, w: u64) -> u64 {
    mix(w.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Reads u64 word `i` of the sector at `addr`.
fn word(addr: u64, i: u64) -> u64 {
    // SAFETY: callers pass sectors of DMA buffers that are not in flight.
    unsafe { core::ptr::read((addr + 8 * i) as usize as *const u64) }
}

/// Writes u64 word `i` of the sector at `addr`.
fn set_word(addr: u64, i: u64, v: u64) {
    // SAFETY: as in `word`.
    unsafe { core::ptr::write((addr + 8 * i) as usize as *mut u64, v) }
}

/// Checksum of the sector at `addr`: XOR of `term(i, w_i)` for words 1..=63.
fn checksum(addr: u64) -> u64 {
    (1..64).fold(0, |acc, i| acc ^ term(i, word(addr, i)))
}

/// One step of xorshift64 (state must be non-zero).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A non-zero xorshift state derived from `seed` and a stream constant.
fn rng_state(seed: u64, stream: u64) -> u64 {
    match mix(seed ^ stream) {
        0 => 1,
        x => x,
    }
}

/// Nanoseconds to whole milliseconds.
fn ms_of(ns: u64) -> u64 {
    ns / 1_000_000
}

/// `count` per second over `ns`.
fn per_sec(count: u64, ns: u64) -> u64 {
    if ns == 0 {
        0
    } else {
        (u128::from(count) * 1_000_000_000 / u128::from(ns)) as u64
    }
}

// ---------------------------------------------------------------------------------------
// The request pump: keeps up to `depth` requests in flight.

/// One request buffer and the request currently using it.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// DMA buffer of `bs` bytes.
    buf: u64,
    /// Request type (`BLK_T_IN` / `BLK_T_OUT`).
    ty: u32,
    /// First sector.
    sector: u64,
    /// Bytes (a multiple of 512, at most `bs`).
    len: u32,
    /// Timed write modes: per-sector checksum contributions of words 3..=63 (DMA array).
    rest: u64,
    /// Timed modes: TSC when the request was prepared for submission.
    submitted: u64,
}

/// Why a run stopped early.
enum Stop {
    /// The workload printed its own failure line.
    Failed,
    /// The driver reported an error.
    Dev(virtio::Error),
}

/// A workload: produces requests and checks their results.
trait Work {
    /// Describes the next request in `slot` (whose buffer is free); false when there is
    /// nothing more to submit (it is not called again).
    fn next(&mut self, slot: &mut Slot) -> bool;
    /// A request finished with `status`; `now` is the TSC when its completion was seen
    /// (read once per batch of completions).
    fn done(&mut self, slot: &Slot, status: u8, now: u64) -> Result<(), Stop>;
    /// Called with the TSC while waiting for completions and after every batch of them.
    fn tick(&mut self, _now: u64) {}
}

struct Pump {
    blk: Blk,
    slots: [Slot; MAX_DEPTH],
    /// Indices of the free slots (a stack).
    free: [u8; MAX_DEPTH],
    nfree: usize,
    /// Slot of each in-flight head.
    head_slot: [u8; virtio::MAX_QUEUE_SIZE as usize],
    /// Longest wait for any completion, in TSC ticks.
    timeout_ticks: u64,
}

impl Pump {
    /// `depth` slots with buffers of `bs` bytes each.
    fn new(blk: Blk, depth: usize, bs: u64, timeout_ns: u64) -> Pump {
        let mut slots = [Slot::default(); MAX_DEPTH];
        let mut free = [0u8; MAX_DEPTH];
        for (i, slot) in slots.iter_mut().take(depth).enumerate() {
            slot.buf = alloc(bs, 4096, "the request buffers");
            free[i] = (depth - 1 - i) as u8;
        }
        Pump {
            blk,
            slots,
            free,
            nfree: depth,
            head_slot: [0; virtio::MAX_QUEUE_SIZE as usize],
            timeout_ticks: rt::ns_to_ticks(timeout_ns),
        }
    }

    /// Fills every free slot with the next requests of `work` (setting `*more` to false
    /// once it has none left), unpublished; returns whether it added any.
    #[inline]
    fn fill<W: Work>(&mut self, work: &mut W, more: &mut bool) -> Result<bool, Stop> {
        let mut added = false;
        while *more && self.nfree > 0 {
            let s = usize::from(self.free[self.nfree - 1]);
            if !work.next(&mut self.slots[s]) {
                *more = false;
                break;
            }
            let sl = self.slots[s];
            let head = self
                .blk
                .submit(sl.ty, sl.sector, sl.buf, sl.len)
                .ok_or(Stop::Dev(virtio::Error::QueueFull))?;
            self.head_slot[usize::from(head)] = s as u8;
            self.nfree -= 1;
            added = true;
        }
        Ok(added)
    }

    /// [`Pump::fill`], then publishes the new requests with one notification if any.
    #[inline]
    fn submit_all<W: Work>(&mut self, work: &mut W, more: &mut bool) -> Result<(), Stop> {
        if self.fill(work, more)? {
            self.blk.kick();
        }
        Ok(())
    }

    /// Frees the slot of completion `c` and of every further completion the device has
    /// returned, handing each to `work` with `now` (the TSC when the batch was seen).
    #[inline]
    fn complete_all<W: Work>(
        &mut self,
        mut c: virtio::Completion,
        now: u64,
        work: &mut W,
    ) -> Result<(), Stop> {
        loop {
            let s = self.head_slot[usize::from(c.head)];
            self.free[self.nfree] = s;
            self.nfree += 1;
            work.done(&self.slots[usize::from(s)], c.status, now)?;
            match self.blk.poll().map_err(Stop::Dev)? {
                Some(next) => c = next,
                None => return Ok(()),
            }
        }
    }

    /// Runs `work` until it has nothing more to submit and nothing is in flight.
    /// One notification per batch of submissions.
    fn run<W: Work>(&mut self, work: &mut W) -> Result<(), Stop> {
        let mut more = true;
        loop {
            self.submit_all(work, &mut more)?;
            if self.blk.in_flight() == 0 {
                return Ok(());
            }
            let c = self.poll_completion(work)?;
            let now = rt::rdtsc();
            self.complete_all(c, now, work)?;
            work.tick(now);
        }
    }

    /// Spins on the used ring until a request completes (the driver's polling wait).
    /// Not inlined, so that the monitor's profiler names this loop.
    #[inline(never)]
    fn poll_completion<W: Work>(&mut self, work: &mut W) -> Result<virtio::Completion, Stop> {
        let waited = rt::rdtsc();
        loop {
            if let Some(c) = self.blk.poll().map_err(Stop::Dev)? {
                return Ok(c);
            }
            let now = rt::rdtsc();
            if now.wrapping_sub(waited) > self.timeout_ticks {
                return Err(Stop::Dev(virtio::Error::Timeout));
            }
            work.tick(now);
            core::hint::spin_loop();
        }
    }

    /// Runs `work`; on failure prints the error line (unless the workload did) and exits 1.
    fn run_or_die<W: Work>(&mut self, work: &mut W) {
        match self.run(work) {
            Ok(()) => {}
            Err(Stop::Failed) => rt::exit(EXIT_FAIL),
            Err(Stop::Dev(e)) => die!(
                EXIT_FAIL,
                "{} ({} requests in flight)",
                e,
                self.blk.in_flight()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// capacity / id / rotest.

fn id(mut blk: Blk, p: &Params) -> ! {
    let buf = alloc(64, 64, "the id buffer");
    match blk.get_id(buf, p.timeout_ns) {
        Ok(BLK_S_OK) => {}
        Ok(status) => die!(EXIT_FAIL, "get_id status={}", status),
        Err(e) => die!(EXIT_FAIL, "get_id: {}", e),
    }
    // SAFETY: the GET_ID request finished; nothing else uses the buffer.
    let raw = unsafe { bytes_mut(buf, virtio::BLK_ID_BYTES as usize) };
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let mut text = [0u8; virtio::BLK_ID_BYTES as usize];
    for (t, &b) in text.iter_mut().zip(&raw[..len]) {
        *t = if (0x20..0x7f).contains(&b) { b } else { b'?' };
    }
    rt::console()
        .str("blk-io: id=")
        .bytes(&text[..len])
        .str("\n");
    rt::exit(0)
}

fn rotest(mut blk: Blk, p: &Params) -> ! {
    let buf = alloc(SECTOR_SIZE, 4096, "the sector buffer");
    // SAFETY: fresh DMA buffer, not in flight.
    fill_pattern(unsafe { bytes_mut(buf, SECTOR) }, 0, p.seed);
    match blk.write(0, buf, SECTOR_SIZE as u32, p.timeout_ns) {
        Ok(status) => println!("blk-io: write status={}", status),
        Err(e) => die!(EXIT_FAIL, "write: {}", e),
    }
    rt::exit(0)
}

// ---------------------------------------------------------------------------------------
// fill / check.

/// Writes (fill) or reads and checks (check) the pattern over sectors [0, end).
struct Sweep {
    write: bool,
    next: u64,
    end: u64,
    spb: u64,
    seed: u64,
}

impl Work for Sweep {
    fn next(&mut self, slot: &mut Slot) -> bool {
        if self.next >= self.end {
            return false;
        }
        let n = self.spb.min(self.end - self.next);
        slot.sector = self.next;
        slot.len = (n * SECTOR_SIZE) as u32;
        slot.ty = if self.write { BLK_T_OUT } else { BLK_T_IN };
        if self.write {
            // SAFETY: the slot's buffer is free (not in flight).
            fill_pattern(unsafe { bytes_mut(slot.buf, slot.len as usize) }, self.next, self.seed);
        }
        self.next += n;
        true
    }

    fn done(&mut self, slot: &Slot, status: u8, _now: u64) -> Result<(), Stop> {
        if status != BLK_S_OK {
            println!(
                "blk-io: error {} status={} sector={}",
                if self.write { "write" } else { "read" },
                status,
                slot.sector
            );
            return Err(Stop::Failed);
        }
        if !self.write {
            // SAFETY: the read finished; the buffer is back with the driver.
            let data = unsafe { bytes_mut(slot.buf, slot.len as usize) };
            if let Some((s, j, got, want)) = check_pattern(data, slot.sector, self.seed) {
                println!(
                    "blk-io: check mismatch sector={} byte={} got={} want={}",
                    s, j, got, want
                );
                return Err(Stop::Failed);
            }
        }
        Ok(())
    }
}

fn sweep(blk: Blk, p: &Params) -> ! {
    let write = p.mode == Mode::Fill;
    if p.sectors > blk.capacity() {
        die!(
            EXIT_USAGE,
            "bad parameter sectors={} (capacity={})",
            p.sectors,
            blk.capacity()
        );
    }
    let mut pump = Pump::new(blk, p.depth, p.bs, p.timeout_ns);
    let mut work = Sweep {
        write,
        next: 0,
        end: p.sectors,
        spb: p.bs / SECTOR_SIZE,
        seed: p.seed,
    };
    pump.run_or_die(&mut work);
    if write {
        if pump.blk.has_flush() {
            match pump.blk.flush(p.timeout_ns) {
                Ok(BLK_S_OK) => {}
                Ok(status) => die!(EXIT_FAIL, "flush status={}", status),
                Err(e) => die!(EXIT_FAIL, "flush: {}", e),
            }
        }
        println!("blk-io: fill ok sectors={}", p.sectors);
    } else {
        println!("blk-io: check ok sectors={}", p.sectors);
    }
    rt::exit(0)
}

// ---------------------------------------------------------------------------------------
// Timed modes.

struct Timed {
    write: bool,
    random: bool,
    nblocks: u64,
    spb: u64,
    bs: u64,
    next_block: u64,
    rng: u64,
    start: u64,
    deadline: u64,
    ops: u64,
    bytes: u64,
    errors: u64,
    /// Sum of submit-to-completion times of the OK requests, in TSC ticks.
    lat_ticks: u64,
    /// Number of requests in `lat_ticks`.
    lat_samples: u64,
    tag: u64,
    /// Verify bitmap (one bit per block written successfully), 0 if none.
    bitmap: u64,
    /// TSC ticks between progress lines, 0 = none.
    progress_ticks: u64,
    next_progress: u64,
    /// Metrics device reports (every `report_ms`).
    reporter: Reporter,
    /// `multi=1`: the device index, printed in the progress lines.
    dev: Option<usize>,
}

impl Timed {
    /// Writes the counters to the metrics slot now (latency converted to ns here only).
    #[cold]
    #[inline(never)]
    fn report_metrics(&mut self, now: u64) {
        let lat_ns = rt::ticks_to_ns(self.lat_ticks);
        self.reporter
            .report_at(now, self.ops, self.bytes, lat_ns, self.lat_samples);
    }
}

impl Work for Timed {
    #[inline]
    fn next(&mut self, slot: &mut Slot) -> bool {
        let now = rt::rdtsc();
        if now >= self.deadline {
            return false;
        }
        slot.submitted = now;
        let block = if self.random {
            xorshift(&mut self.rng) % self.nblocks
        } else {
            let b = self.next_block;
            self.next_block = if b + 1 == self.nblocks { 0 } else { b + 1 };
            b
        };
        slot.sector = block * self.spb;
        slot.len = self.bs as u32;
        if self.write {
            slot.ty = BLK_T_OUT;
            self.tag += 1;
            let t2 = term(2, self.tag);
            for k in 0..self.spb {
                let sec = slot.buf + k * SECTOR_SIZE;
                let s = slot.sector + k;
                // SAFETY: `rest` holds `spb` u64s for this slot's buffer.
                let rest = unsafe { core::ptr::read((slot.rest + 8 * k) as usize as *const u64) };
                set_word(sec, 1, s);
                set_word(sec, 2, self.tag);
                set_word(sec, 0, rest ^ term(1, s) ^ t2);
            }
        } else {
            slot.ty = BLK_T_IN;
        }
        true
    }

    #[inline]
    fn done(&mut self, slot: &Slot, status: u8, now: u64) -> Result<(), Stop> {
        if status == BLK_S_OK {
            self.ops += 1;
            self.bytes += u64::from(slot.len);
            self.lat_ticks += now.wrapping_sub(slot.submitted);
            self.lat_samples += 1;
            if self.bitmap != 0 {
                let block = slot.sector / self.spb;
                let w = (self.bitmap + 8 * (block / 64)) as usize as *mut u64;
                // SAFETY: the bitmap holds `nblocks` bits and block < nblocks.
                unsafe { *w |= 1 << (block % 64) };
            }
        } else {
            self.errors += 1;
        }
        Ok(())
    }

    #[inline]
    fn tick(&mut self, now: u64) {
        if self.reporter.due(now) {
            self.report_metrics(now);
        }
        if self.progress_ticks == 0 || now < self.next_progress {
            return;
        }
        while self.next_progress <= now {
            self.next_progress += self.progress_ticks;
        }
        self.print_progress(now);
    }
}

impl Timed {
    /// Prints `blk-io: [dev=<i> ]progress t_ms=<t> ops=<n> bytes=<b>` for TSC `now`.
    #[cold]
    #[inline(never)]
    fn print_progress(&self, now: u64) {
        let mut c = rt::console();
        c.str("blk-io: ");
        if let Some(d) = self.dev {
            c.str("dev=").dec(d as u64).str(" ");
        }
        let _ = writeln!(
            c,
            "progress t_ms={} ops={} bytes={}",
            ms_of(rt::ticks_to_ns(now - self.start)),
            self.ops,
            self.bytes
        );
    }
}

/// Reads back every block whose bit is set in the bitmap and checks its sectors.
struct Verify {
    bitmap: u64,
    nblocks: u64,
    spb: u64,
    bs: u64,
    next_block: u64,
    blocks: u64,
}

impl Verify {
    /// The first block >= `from` whose bit is set.
    fn find(&self, from: u64) -> Option<u64> {
        let mut b = from;
        while b < self.nblocks {
            // SAFETY: the bitmap holds `nblocks` bits.
            let w = unsafe { *((self.bitmap + 8 * (b / 64)) as usize as *const u64) } >> (b % 64);
            if w != 0 {
                let hit = b + u64::from(w.trailing_zeros());
                return (hit < self.nblocks).then_some(hit);
            }
            b = (b / 64 + 1) * 64;
        }
        None
    }
}

impl Work for Verify {
    fn next(&mut self, slot: &mut Slot) -> bool {
        let Some(block) = self.find(self.next_block) else {
            return false;
        };
        self.next_block = block + 1;
        slot.ty = BLK_T_IN;
        slot.sector = block * self.spb;
        slot.len = self.bs as u32;
        true
    }

    fn done(&mut self, slot: &Slot, status: u8, _now: u64) -> Result<(), Stop> {
        if status != BLK_S_OK {
            println!(
                "blk-io: error verify read status={} sector={}",
                status, slot.sector
            );
            return Err(Stop::Failed);
        }
        for k in 0..self.spb {
            let sec = slot.buf + k * SECTOR_SIZE;
            let s = slot.sector + k;
            let stored = word(sec, 0);
            let computed = checksum(sec);
            let tag = word(sec, 1);
            if stored != computed || tag != s {
                println!(
                    "blk-io: verify mismatch sector={} stored={:#x} computed={:#x} tag={}",
                    s, stored, computed, tag
                );
                return Err(Stop::Failed);
            }
        }
        self.blocks += 1;
        Ok(())
    }
}

/// The number of `bs` blocks in the `span` a timed mode covers on `blk`; dies on a bad
/// `span` (larger than the capacity, or smaller than one block).
fn timed_blocks(blk: &Blk, p: &Params) -> u64 {
    let capacity = blk.capacity();
    let span = p.span.unwrap_or(capacity.min(DEFAULT_SPAN));
    if span > capacity {
        die!(EXIT_USAGE, "bad parameter span={} (capacity={})", span, capacity);
    }
    let nblocks = span / (p.bs / SECTOR_SIZE);
    if nblocks == 0 {
        die!(EXIT_USAGE, "bad parameter span={} (smaller than bs)", span);
    }
    nblocks
}

/// A timed mode set up on one device: the pump with its buffers and the workload.
struct TimedRun {
    pump: Pump,
    work: Timed,
    ms: u64,
}

/// What a timed run did.
struct Outcome {
    ns: u64,
    ops: u64,
    bytes: u64,
    errors: u64,
}

impl TimedRun {
    /// Checks `span` against the device, allocates the buffers (and the verify bitmap),
    /// prepares the write data and, if `report`, the metrics reporter (slot `dev`, or 0;
    /// without `report` it never reports). Dies on a bad parameter or when the DMA region
    /// is too small.
    fn new(
        blk: Blk,
        p: &Params,
        write: bool,
        random: bool,
        dev: Option<usize>,
        report: bool,
    ) -> TimedRun {
        let nblocks = timed_blocks(&blk, p);
        let spb = p.bs / SECTOR_SIZE;
        let mut pump = Pump::new(blk, p.depth, p.bs, p.timeout_ns);
        if write {
            // Pseudo-random words 3..=63 in every sector of every buffer, written once;
            // their checksum contribution is cached so a write only stamps words 0..=2.
            let mut rng = rng_state(p.seed, 0xda7a);
            for slot in pump.slots.iter_mut().take(p.depth) {
                slot.rest = alloc(8 * spb, 64, "the write buffers");
                for k in 0..spb {
                    let sec = slot.buf + k * SECTOR_SIZE;
                    let mut rest = 0;
                    for i in 3..64 {
                        let w = xorshift(&mut rng);
                        set_word(sec, i, w);
                        rest ^= term(i, w);
                    }
                    // SAFETY: `rest` holds `spb` u64s.
                    unsafe { core::ptr::write((slot.rest + 8 * k) as usize as *mut u64, rest) };
                }
            }
        }
        let bitmap = if write && p.verify {
            alloc(nblocks.div_ceil(64) * 8, 64, "the verify bitmap")
        } else {
            0
        };
        // Probes the metrics device now (if nobody has), not inside the timed part.
        // Metrics slot = vCPU index = device index in multi mode, 0 otherwise.
        let report_ms = if report { p.report_ms } else { 0 };
        let reporter = Reporter::new(dev.unwrap_or(0), report_ms, rt::rdtsc());
        let work = Timed {
            write,
            random,
            nblocks,
            spb,
            bs: p.bs,
            next_block: 0,
            rng: rng_state(p.seed, 0x0ff5e7),
            start: 0,
            deadline: 0,
            ops: 0,
            bytes: 0,
            errors: 0,
            lat_ticks: 0,
            lat_samples: 0,
            tag: p.seed << 32,
            bitmap,
            progress_ticks: rt::ns_to_ticks(p.progress_ms.saturating_mul(1_000_000)),
            next_progress: 0,
            reporter,
            dev,
        };
        TimedRun {
            pump,
            work,
            ms: p.ms,
        }
    }

    /// Keeps `depth` requests in flight for `ms`, drains them, sends the final metrics
    /// report. Dies on a driver error.
    fn run(&mut self) -> Outcome {
        let start = rt::rdtsc();
        let w = &mut self.work;
        w.start = start;
        w.deadline = start.saturating_add(rt::ns_to_ticks(self.ms.saturating_mul(1_000_000)));
        w.next_progress = start + w.progress_ticks;
        w.reporter.last = start;
        self.pump.run_or_die(w);
        let end = rt::rdtsc();
        let w = &self.work;
        w.reporter
            .report(w.ops, w.bytes, rt::ticks_to_ns(w.lat_ticks), w.lat_samples);
        Outcome {
            ns: rt::ticks_to_ns(end - start),
            ops: w.ops,
            bytes: w.bytes,
            errors: w.errors,
        }
    }

    /// With `verify=1` after a write mode: reads back every block written and checks it;
    /// returns the number of blocks (a mismatch prints its line and exits 1).
    fn verify(&mut self) -> Option<u64> {
        if self.work.bitmap == 0 {
            return None;
        }
        let mut verify = Verify {
            bitmap: self.work.bitmap,
            nblocks: self.work.nblocks,
            spb: self.work.spb,
            bs: self.work.bs,
            next_block: 0,
            blocks: 0,
        };
        self.pump.run_or_die(&mut verify);
        Some(verify.blocks)
    }
}

/// Prints the result line: `blk-io: [dev=<i> ]mode=<m> bs=... errors=<e>`.
fn print_result(dev: Option<usize>, p: &Params, o: &Outcome) {
    let mut c = rt::console();
    c.str("blk-io: ");
    if let Some(d) = dev {
        c.str("dev=").dec(d as u64).str(" ");
    }
    let _ = writeln!(
        c,
        "mode={} bs={} depth={} ms={} ops={} bytes={} ops_per_sec={} bytes_per_sec={} errors={}",
        p.mode_name,
        p.bs,
        p.depth,
        ms_of(o.ns),
        o.ops,
        o.bytes,
        per_sec(o.ops, o.ns),
        per_sec(o.bytes, o.ns),
        o.errors
    );
}

fn timed(blk: Blk, p: &Params, write: bool, random: bool) -> ! {
    let mut run = TimedRun::new(blk, p, write, random, None, true);
    let o = run.run();
    print_result(None, p, &o);
    if o.errors != 0 {
        die!(EXIT_FAIL, "{} requests failed", o.errors);
    }
    if let Some(blocks) = run.verify() {
        println!("blk-io: verify ok blocks={}", blocks);
    }
    rt::exit(0)
}

// ---------------------------------------------------------------------------------------
// multi=1: vCPU i runs the timed mode on block device i.

/// Requests that failed on any device in multi mode.
static MULTI_ERRORS: AtomicU64 = AtomicU64::new(0);

/// One vCPU's part of `multi=1` (vCPU 0 has validated the parameters and counted the
/// devices). Opens device `cpu`, sets up its own queue and buffers, waits for the others
/// at a barrier, runs, prints its result line (and verify line), then vCPU 0 waits for all
/// and prints the summary.
fn multi(cpu: usize) -> ! {
    let p = params();
    let Mode::Timed { write, random } = p.mode else {
        unreachable!("multi mode without a timed mode")
    };
    let blk = open(cpu, &p);
    let mut run = TimedRun::new(blk, &p, write, random, Some(cpu), true);
    rt::barrier();
    let o = run.run();
    print_result(Some(cpu), &p, &o);
    MULTI_ERRORS.fetch_add(o.errors, Ordering::Relaxed);
    if o.errors == 0 {
        if let Some(blocks) = run.verify() {
            println!("blk-io: dev={} verify ok blocks={}", cpu, blocks);
        }
    }
    rt::set_done(cpu);
    if cpu != 0 {
        rt::park();
    }
    rt::wait_all_done();
    println!("blk-io: multi done devices={}", rt::cpu_count());
    let failed = MULTI_ERRORS.load(Ordering::Relaxed) != 0;
    rt::exit(if failed { EXIT_FAIL } else { 0 })
}

// ---------------------------------------------------------------------------------------
// devs=N: vCPU 0 alone keeps `depth` requests in flight on each of devices 0..N.

/// Most devices `devs=N` drives.
const MAX_DEVS: usize = 32;

// The per-device state lives in the DMA region, allocated with 64-byte alignment.
const _: () = assert!(core::mem::align_of::<TimedRun>() <= 64);
// `devs_pump` keeps per-device flags in u64 bit masks.
const _: () = assert!(MAX_DEVS <= 64);

/// Upper bound of the DMA bytes [`TimedRun::new`] allocates for one device whose span has
/// `nblocks` blocks (every allocation counted with its worst alignment padding).
fn run_dma_bytes(p: &Params, write: bool, nblocks: u64) -> u64 {
    let depth = p.depth as u64;
    let spb = p.bs / SECTOR_SIZE;
    let mut need = 4095 + depth * p.bs.next_multiple_of(4096);
    if write {
        need += 63 + depth * (8 * spb).next_multiple_of(64);
        if p.verify {
            need += 63 + nblocks.div_ceil(64) * 8;
        }
    }
    need
}

/// Sends the metrics report of a `devs` run (slot 0: the sums over the devices); at TSC
/// `now` if given (restarting the period), else unconditionally (the final report).
#[cold]
#[inline(never)]
fn report_devs(runs: &[TimedRun], reporter: &mut Reporter, now: Option<u64>) {
    let (mut ops, mut bytes, mut lat_ticks, mut samples) = (0u64, 0u64, 0u64, 0u64);
    for r in runs {
        ops += r.work.ops;
        bytes += r.work.bytes;
        lat_ticks += r.work.lat_ticks;
        samples += r.work.lat_samples;
    }
    let lat_ns = rt::ticks_to_ns(lat_ticks);
    match now {
        Some(now) => reporter.report_at(now, ops, bytes, lat_ns, samples),
        None => reporter.report(ops, bytes, lat_ns, samples),
    }
}

/// The hot loop of a `devs` run. Fills every device's slots, then loops over passes:
/// poll every used ring and take all completions found, refill the freed slots of those
/// devices, then publish and notify each of them (one notification per device per pass,
/// the notifications back to back so that the monitor sees them together). Each pass
/// starts one device further, so that no device is systematically first. Returns when
/// every device has drained after the deadline, with the TSC of each device's last
/// completion in `end`. Errors carry the index of the device that failed.
fn devs_pump(
    runs: &mut [TimedRun],
    start: u64,
    progress_ticks: u64,
    reporter: &mut Reporter,
    end: &mut [u64; MAX_DEVS],
) -> Result<(), (usize, Stop)> {
    let n = runs.len();
    let mut first = 0;
    let mut more = [true; MAX_DEVS];
    // TSC of each device's last completion (or of the start): the timeout runs from it.
    let mut since = [start; MAX_DEVS];
    let timeout = runs[0].pump.timeout_ticks;
    let mut next_progress = if progress_ticks == 0 {
        u64::MAX
    } else {
        start + progress_ticks
    };
    for (i, r) in runs.iter_mut().enumerate() {
        r.pump
            .submit_all(&mut r.work, &mut more[i])
            .map_err(|e| (i, e))?;
    }
    loop {
        first = if first + 1 >= n { 0 } else { first + 1 };
        let order = (0..n).map(|k| {
            if first + k >= n {
                first + k - n
            } else {
                first + k
            }
        });
        let mut active = false;
        // Bit i: device i had completions in this pass.
        let mut reaped = 0u64;
        for i in order.clone() {
            let r = &mut runs[i];
            if r.pump.blk.in_flight() == 0 {
                continue;
            }
            active = true;
            let Some(c) = r.pump.blk.poll().map_err(|e| (i, Stop::Dev(e)))? else {
                continue;
            };
            let now = rt::rdtsc();
            since[i] = now;
            r.pump
                .complete_all(c, now, &mut r.work)
                .map_err(|e| (i, e))?;
            reaped |= 1 << i;
        }
        if !active {
            return Ok(());
        }
        if reaped == 0 {
            core::hint::spin_loop();
        } else {
            let mut added = 0u64;
            for i in order.clone().filter(|&i| reaped & (1 << i) != 0) {
                let r = &mut runs[i];
                if r.pump.fill(&mut r.work, &mut more[i]).map_err(|e| (i, e))? {
                    added |= 1 << i;
                }
            }
            for i in order.filter(|&i| reaped & (1 << i) != 0) {
                let r = &mut runs[i];
                if added & (1 << i) != 0 {
                    r.pump.blk.kick();
                } else if r.pump.blk.in_flight() == 0 {
                    // Past the deadline and drained: this was its last completion.
                    end[i] = since[i];
                }
            }
        }
        let now = rt::rdtsc();
        for (i, r) in runs.iter().enumerate() {
            if r.pump.blk.in_flight() != 0 && now.wrapping_sub(since[i]) > timeout {
                return Err((i, Stop::Dev(virtio::Error::Timeout)));
            }
        }
        if reporter.due(now) {
            report_devs(runs, reporter, Some(now));
        }
        if now >= next_progress {
            while next_progress <= now {
                next_progress += progress_ticks;
            }
            for r in runs.iter() {
                r.work.print_progress(now);
            }
        }
    }
}

/// `devs=N` on vCPU 0 (the others park; `p` is checked, the mode is timed, 2 <= n <=
/// MAX_DEVS): opens devices 0..n, checks that their buffers fit in the DMA region, runs
/// the timed mode on all of them at once, reports to metrics slot 0, prints every
/// device's result line in order, their verify lines, then the summary.
fn devs(p: &Params, n: usize, write: bool, random: bool) -> ! {
    let found = Blk::count();
    if found < n {
        die!(
            EXIT_FAIL,
            "devs={} needs {} virtio-blk devices (found {})",
            n,
            n,
            found
        );
    }
    let size = core::mem::size_of::<TimedRun>() as u64;
    let mut blks: [Option<Blk>; MAX_DEVS] = core::array::from_fn(|_| None);
    let mut need = 63 + n as u64 * size;
    for (i, b) in blks.iter_mut().take(n).enumerate() {
        let blk = open(i, p);
        need += run_dma_bytes(p, write, timed_blocks(&blk, p));
        *b = Some(blk);
    }
    let free = virtio::dma_free_bytes();
    if need > free {
        die!(
            EXIT_USAGE,
            "bad parameter devs={} ({} devices with depth={} bs={} need {} bytes of the DMA \
             region [8 MiB, 16 MiB), {} free)",
            n,
            n,
            p.depth,
            p.bs,
            need,
            free
        );
    }
    let base = alloc(n as u64 * size, 64, "the device state") as usize as *mut TimedRun;
    for (i, b) in blks.iter_mut().take(n).enumerate() {
        let blk = b.take().expect("devs: device opened above");
        let run = TimedRun::new(blk, p, write, random, Some(i), false);
        // SAFETY: entry i of the fresh allocation of n TimedRuns (aligned, see above).
        unsafe { base.add(i).write(run) };
    }
    // SAFETY: n initialised TimedRuns in DMA memory that nothing else uses (no device
    // touches it: only buffers and rings are given to the devices).
    let runs = unsafe { core::slice::from_raw_parts_mut(base, n) };
    // Probes the metrics device now (if asked), not inside the timed part.
    let mut reporter = Reporter::new(0, p.report_ms, rt::rdtsc());
    let progress_ticks = rt::ns_to_ticks(p.progress_ms.saturating_mul(1_000_000));
    let start = rt::rdtsc();
    let deadline = start.saturating_add(rt::ns_to_ticks(p.ms.saturating_mul(1_000_000)));
    for r in runs.iter_mut() {
        r.work.start = start;
        r.work.deadline = deadline;
    }
    reporter.last = start;
    let mut end = [start; MAX_DEVS];
    if let Err((i, stop)) = devs_pump(runs, start, progress_ticks, &mut reporter, &mut end) {
        match stop {
            Stop::Failed => rt::exit(EXIT_FAIL),
            Stop::Dev(e) => die!(
                EXIT_FAIL,
                "dev={} {} ({} requests in flight)",
                i,
                e,
                runs[i].pump.blk.in_flight()
            ),
        }
    }
    report_devs(runs, &mut reporter, None);
    let mut errors = 0;
    for (i, r) in runs.iter().enumerate() {
        let o = Outcome {
            ns: rt::ticks_to_ns(end[i] - start),
            ops: r.work.ops,
            bytes: r.work.bytes,
            errors: r.work.errors,
        };
        print_result(Some(i), p, &o);
        errors += o.errors;
    }
    for (i, r) in runs.iter_mut().enumerate() {
        if r.work.errors == 0 {
            if let Some(blocks) = r.verify() {
                println!("blk-io: dev={} verify ok blocks={}", i, blocks);
            }
        }
    }
    println!("blk-io: devs done devices={}", n);
    rt::exit(if errors != 0 { EXIT_FAIL } else { 0 })
}
