//! `net-echo`: a UDP echo responder and a UDP packet generator on a virtio-net device,
//! through the polling driver in `rt/virtio.rs` (`virtio::Net`).
//!
//! Parameters (`key=value`): `mode=echo` (`echo` or `send`), `ms=2000` (echo: how long
//! to run), `count=N` (echo: stop after N echoes, see below; send: packets to send,
//! default 1000), `ip=10.0.0.2` (our IPv4 address), `peer=10.0.0.1` (send: destination),
//! `port=7000` (send: source and destination UDP port), `size=64` (send: UDP payload
//! bytes, 4..=1472), `pps=0` (send: at most this many packets per second, 0 = as fast as
//! the queue allows), `dev=0` (index among the virtio-net devices), `timeout_ms=30000`
//! (longest the transmit queue may stay stuck), `report_ms=50` (metrics reports,
//! 0 = none).
//!
//! - `echo`: for `ms` milliseconds (with `count=N` and no `ms=`: until N packets were
//!   echoed; with both: whichever comes first) receives frames and
//!   - answers ARP requests (Ethernet type 0x0806, opcode 1) for `ip` with our MAC,
//!   - echoes IPv4/UDP frames to `ip` (any port, unfragmented): the same frame back with
//!     Ethernet destination = the received source and source = our MAC, IP addresses
//!     swapped (header checksum recomputed), UDP ports swapped and UDP checksum 0,
//!   - ignores (counts) everything else.
//! - `send`: sends `count` UDP frames (default 1000; with an explicit `ms=`, as many as fit
//!   in `ms` milliseconds unless `count` comes first) of `size` payload bytes from `ip:port` to
//!   `peer:port`, Ethernet destination ff:ff:ff:ff:ff:ff; payload = the sequence number
//!   (u32, little endian, from 0) then bytes `i & 0xff` (i = payload offset). Frames the
//!   device receives meanwhile are dropped (their buffers reposted).
//!
//! Output lines: `net-echo: mac=<xx:xx:xx:xx:xx:xx>` at start, then
//! `net-echo: echoed=<n> arp=<n> ignored=<n> ms=<elapsed> packets_per_sec=<x>` (echo) or
//! `net-echo: sent=<n> ms=<elapsed> packets_per_sec=<x>` (send), exit 0. Errors:
//! `net-echo: error <what>` (exit 1; exit 2 for a bad parameter), e.g.
//! `net-echo: error no virtio-net device`.
//!
//! Metrics: slot 0 gets ops = packets echoed / sent, bytes = their Ethernet frame bytes
//! (no latency), every `report_ms` ms and once before the result line.
#![no_std]
#![no_main]

#[macro_use]
#[path = "../rt/mod.rs"]
mod rt;

use core::hint::spin_loop;

use rt::metrics::{self, Reporter};
use rt::virtio::{self, Net, NetTx, NET_MAX_FRAME};

/// Exit status for a failure (no device, device error).
const EXIT_FAIL: u8 = 1;
/// Exit status for a bad parameter.
const EXIT_USAGE: u8 = 2;

/// Ethernet header: destination, source, type.
const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
/// IPv4 header without options.
const IP_HDR: usize = 20;
const IP_PROTO_UDP: u8 = 17;
const UDP_HDR: usize = 8;
/// Largest UDP payload in one frame.
const MAX_PAYLOAD: usize = NET_MAX_FRAME - ETH_HDR - IP_HDR - UDP_HDR;
/// Smallest payload (room for the sequence number).
const MIN_PAYLOAD: usize = 4;
/// ARP packet for IPv4 over Ethernet.
const ARP_LEN: usize = 28;
/// Minimum Ethernet frame without FCS (ARP replies are padded to it).
const MIN_FRAME: usize = 60;
/// Frames handled between two kicks.
const BATCH: usize = 64;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Prints `net-echo: error <args>` and exits with `code`.
macro_rules! die {
    ($code:expr, $($arg:tt)*) => {{
        println!("net-echo: error {}", format_args!($($arg)*));
        rt::exit($code)
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Echo,
    Send,
}

struct Params {
    mode: Mode,
    dev: u64,
    /// Echo duration (None: run until `count`).
    ms: Option<u64>,
    /// `send`: the longest time to send for, only when `ms=` is given.
    send_ms: Option<u64>,
    count: Option<u64>,
    ip: [u8; 4],
    peer: [u8; 4],
    port: u16,
    size: usize,
    /// `send`: packets per second (0 = unpaced).
    pps: u64,
    timeout_ns: u64,
    report_ms: u64,
}

/// A parameter value for error messages.
fn shown(v: &[u8]) -> &str {
    core::str::from_utf8(v).unwrap_or("?")
}

/// Parses a dotted-quad IPv4 address.
fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for o in out.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = part.iter().fold(0u32, |a, &d| a * 10 + u32::from(d - b'0'));
        *o = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn ip_arg(key: &str, default: [u8; 4]) -> [u8; 4] {
    match rt::arg(key) {
        None => default,
        Some(v) => match parse_ipv4(v) {
            Some(ip) => ip,
            None => die!(EXIT_USAGE, "bad parameter {}={} (a.b.c.d)", key, shown(v)),
        },
    }
}

fn params() -> Params {
    let mode = match rt::arg("mode") {
        None | Some(b"echo") => Mode::Echo,
        Some(b"send") => Mode::Send,
        Some(v) => die!(EXIT_USAGE, "bad parameter mode={} (echo or send)", shown(v)),
    };
    let count = rt::arg("count").map(|_| rt::arg_u64("count", 0));
    let ms = match (rt::arg("ms"), count) {
        (Some(_), _) => Some(rt::arg_u64("ms", 0)),
        (None, Some(_)) => None,
        (None, None) => Some(2000),
    };
    let port = rt::arg_u64("port", 7000);
    let Ok(port) = u16::try_from(port) else {
        die!(EXIT_USAGE, "bad parameter port={} (0..=65535)", port);
    };
    let size = rt::arg_u64("size", 64);
    if size < MIN_PAYLOAD as u64 || size > MAX_PAYLOAD as u64 {
        die!(
            EXIT_USAGE,
            "bad parameter size={} ({}..={})",
            size,
            MIN_PAYLOAD,
            MAX_PAYLOAD
        );
    }
    Params {
        mode,
        dev: rt::arg_u64("dev", 0),
        send_ms: rt::arg("ms").and(ms),
        ms,
        count,
        ip: ip_arg("ip", [10, 0, 0, 2]),
        peer: ip_arg("peer", [10, 0, 0, 1]),
        port,
        size: size as usize,
        pps: rt::arg_u64("pps", 0),
        timeout_ns: rt::arg_u64("timeout_ms", 30_000).saturating_mul(1_000_000),
        report_ms: rt::arg_u64("report_ms", metrics::DEFAULT_REPORT_MS),
    }
}

fn kmain(cpu: usize) -> ! {
    if cpu != 0 {
        rt::park();
    }
    let p = params();
    if Net::count() as u64 <= p.dev {
        if p.dev == 0 {
            die!(EXIT_FAIL, "no virtio-net device");
        }
        die!(EXIT_FAIL, "no virtio-net device dev={}", p.dev);
    }
    if !virtio::dma_region_is_ram() {
        die!(
            EXIT_FAIL,
            "guest RAM does not cover [8 MiB, 16 MiB) (give the guest at least 32 MiB)"
        );
    }
    let mut net = match Net::open(p.dev as usize) {
        Ok(n) => n,
        Err(e) => die!(EXIT_FAIL, "virtio-net init: {}", e),
    };
    let m = net.mac;
    println!(
        "net-echo: mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    match p.mode {
        Mode::Echo => echo(&p, &mut net),
        Mode::Send => send(&p, &mut net),
    }
    rt::exit(0)
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum (RFC 1071) of `data` (its checksum field zeroed).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `count` per second over `ns`.
fn per_sec(count: u64, ns: u64) -> u64 {
    if ns == 0 {
        0
    } else {
        (u128::from(count) * 1_000_000_000 / u128::from(ns)) as u64
    }
}

/// Reclaims transmitted packets until one descriptor is free; dies after `timeout_ns`
/// without progress.
fn wait_tx_room(tx: &mut NetTx, timeout_ns: u64) {
    if tx.has_room() {
        return;
    }
    tx.kick();
    let limit = rt::ns_to_ticks(timeout_ns);
    let start = rt::rdtsc();
    loop {
        match tx.reclaim() {
            Ok(n) if n > 0 => return,
            Ok(_) => {}
            Err(e) => die!(EXIT_FAIL, "{} (transmit queue)", e),
        }
        if rt::rdtsc().wrapping_sub(start) > limit {
            die!(
                EXIT_FAIL,
                "timeout waiting for the device ({} packets in flight)",
                tx.in_flight()
            );
        }
        spin_loop();
    }
}

// ---------------------------------------------------------------------------------------
// Echo.

/// What became of one received frame.
enum Outcome {
    /// Echoed a UDP frame of this many bytes.
    Echoed(usize),
    /// Answered an ARP request.
    Arp,
    /// Not for us, or not ARP/UDP.
    Ignored,
}

/// Handles one received frame; `tx` has a free descriptor.
fn handle(frame: &[u8], mac: &[u8; 6], ip: &[u8; 4], tx: &mut NetTx) -> Outcome {
    if frame.len() < ETH_HDR {
        return Outcome::Ignored;
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => handle_arp(frame, mac, ip, tx),
        ETHERTYPE_IPV4 => handle_ipv4(frame, mac, ip, tx),
        _ => Outcome::Ignored,
    }
}

fn handle_arp(frame: &[u8], mac: &[u8; 6], ip: &[u8; 4], tx: &mut NetTx) -> Outcome {
    let a = ETH_HDR;
    if frame.len() < a + ARP_LEN
        || be16(frame, a) != 1 // Ethernet
        || be16(frame, a + 2) != ETHERTYPE_IPV4
        || frame[a + 4] != 6
        || frame[a + 5] != 4
        || be16(frame, a + 6) != 1 // request
        || frame[a + 24..a + 28] != ip[..]
    {
        return Outcome::Ignored;
    }
    let sha = &frame[a + 8..a + 14];
    let spa = &frame[a + 14..a + 18];
    let sent = tx.send_with(MIN_FRAME, |out| {
        out.fill(0);
        out[0..6].copy_from_slice(sha);
        out[6..12].copy_from_slice(mac);
        put16(out, 12, ETHERTYPE_ARP);
        put16(out, a, 1);
        put16(out, a + 2, ETHERTYPE_IPV4);
        out[a + 4] = 6;
        out[a + 5] = 4;
        put16(out, a + 6, 2); // reply
        out[a + 8..a + 14].copy_from_slice(mac);
        out[a + 14..a + 18].copy_from_slice(ip);
        out[a + 18..a + 24].copy_from_slice(sha);
        out[a + 24..a + 28].copy_from_slice(spa);
    });
    debug_assert!(sent);
    Outcome::Arp
}

fn handle_ipv4(frame: &[u8], mac: &[u8; 6], ip: &[u8; 4], tx: &mut NetTx) -> Outcome {
    let h = ETH_HDR;
    if frame.len() < h + IP_HDR || frame[h] >> 4 != 4 {
        return Outcome::Ignored;
    }
    let ihl = usize::from(frame[h] & 0xf) * 4;
    let total = usize::from(be16(frame, h + 2));
    if ihl < IP_HDR
        || total < ihl + UDP_HDR
        || h + total > frame.len()
        || be16(frame, h + 6) & 0x3fff != 0 // MF or a fragment offset
        || frame[h + 9] != IP_PROTO_UDP
        || frame[h + 16..h + 20] != ip[..]
    {
        return Outcome::Ignored;
    }
    let len = frame.len();
    let u = h + ihl;
    let sent = tx.send_with(len, |out| {
        out.copy_from_slice(frame);
        out[0..6].copy_from_slice(&frame[6..12]);
        out[6..12].copy_from_slice(mac);
        out[h + 12..h + 16].copy_from_slice(&frame[h + 16..h + 20]);
        out[h + 16..h + 20].copy_from_slice(&frame[h + 12..h + 16]);
        put16(out, h + 10, 0);
        let sum = checksum(&out[h..h + ihl]);
        put16(out, h + 10, sum);
        out[u..u + 2].copy_from_slice(&frame[u + 2..u + 4]);
        out[u + 2..u + 4].copy_from_slice(&frame[u..u + 2]);
        put16(out, u + 6, 0);
    });
    debug_assert!(sent);
    Outcome::Echoed(len)
}

fn echo(p: &Params, net: &mut Net) {
    let mac = net.mac;
    let start = rt::rdtsc();
    let deadline = p.ms.map(|ms| rt::ns_to_ticks(ms.saturating_mul(1_000_000)));
    let limit = p.count.unwrap_or(u64::MAX);
    let mut reporter = Reporter::new(0, p.report_ms, start);
    let (mut echoed, mut bytes, mut arp, mut ignored) = (0u64, 0u64, 0u64, 0u64);
    let mut end;
    loop {
        end = rt::rdtsc();
        if echoed >= limit || deadline.is_some_and(|d| end.wrapping_sub(start) >= d) {
            break;
        }
        let mut got = 0;
        while got < BATCH && echoed < limit {
            wait_tx_room(&mut net.tx, p.timeout_ns);
            let tx = &mut net.tx;
            let outcome = match net.rx.recv_with(|f| handle(f, &mac, &p.ip, tx)) {
                Ok(Some(o)) => o,
                Ok(None) => break,
                Err(e) => die!(EXIT_FAIL, "{} (receive queue)", e),
            };
            match outcome {
                Outcome::Echoed(n) => {
                    echoed += 1;
                    bytes += n as u64;
                }
                Outcome::Arp => arp += 1,
                Outcome::Ignored => ignored += 1,
            }
            got += 1;
        }
        if got > 0 {
            net.rx.kick();
            net.tx.kick();
        } else {
            spin_loop();
        }
        if let Err(e) = net.tx.reclaim() {
            die!(EXIT_FAIL, "{} (transmit queue)", e);
        }
        reporter.maybe_report(rt::rdtsc(), echoed, bytes, 0, 0);
    }
    let ns = rt::ticks_to_ns(end.wrapping_sub(start));
    if let Err(e) = net.tx.drain(p.timeout_ns) {
        die!(
            EXIT_FAIL,
            "{} ({} packets in flight)",
            e,
            net.tx.in_flight()
        );
    }
    reporter.report(echoed, bytes, 0, 0);
    println!(
        "net-echo: echoed={} arp={} ignored={} ms={} packets_per_sec={}",
        echoed,
        arp,
        ignored,
        ns / 1_000_000,
        per_sec(echoed, ns)
    );
}

// ---------------------------------------------------------------------------------------
// Send.

/// Writes the constant part of the UDP frames (everything but the IP id, the IP header
/// checksum and the sequence number) into `t`.
fn template(p: &Params, mac: &[u8; 6], t: &mut [u8]) {
    let h = ETH_HDR;
    let u = h + IP_HDR;
    t[0..6].copy_from_slice(&BROADCAST);
    t[6..12].copy_from_slice(mac);
    put16(t, 12, ETHERTYPE_IPV4);
    t[h] = 0x45;
    t[h + 1] = 0;
    put16(t, h + 2, (IP_HDR + UDP_HDR + p.size) as u16);
    put16(t, h + 4, 0);
    put16(t, h + 6, 0x4000); // don't fragment
    t[h + 8] = 64;
    t[h + 9] = IP_PROTO_UDP;
    put16(t, h + 10, 0);
    t[h + 12..h + 16].copy_from_slice(&p.ip);
    t[h + 16..h + 20].copy_from_slice(&p.peer);
    put16(t, u, p.port);
    put16(t, u + 2, p.port);
    put16(t, u + 4, (UDP_HDR + p.size) as u16);
    put16(t, u + 6, 0);
    for (i, b) in t[u + UDP_HDR..].iter_mut().enumerate() {
        *b = i as u8;
    }
}

fn send(p: &Params, net: &mut Net) {
    // An explicit `ms=` bounds the sending time too (count then defaults to unlimited).
    let deadline = p.send_ms.map(|ms| rt::ns_to_ticks(ms.saturating_mul(1_000_000)));
    let mut count = p
        .count
        .unwrap_or(if deadline.is_some() { u64::MAX } else { 1000 });
    let frame_len = ETH_HDR + IP_HDR + UDP_HDR + p.size;
    let mut tmpl = [0u8; NET_MAX_FRAME];
    let tmpl = &mut tmpl[..frame_len];
    template(p, &net.mac, tmpl);
    let h = ETH_HDR;
    let payload = h + IP_HDR + UDP_HDR;
    let limit = rt::ns_to_ticks(p.timeout_ns);
    // TSC ticks between two packets with `pps=N` (packet k goes out at start + k * gap).
    let gap = match p.pps {
        0 => 0,
        pps => (rt::tsc_khz() * 1000 / pps).max(1),
    };
    let start = rt::rdtsc();
    let mut reporter = Reporter::new(0, p.report_ms, start);
    let (mut submitted, mut sent) = (0u64, 0u64);
    let mut progress = start;
    let mut end = start;
    while sent < count {
        if deadline.is_some_and(|d| rt::rdtsc().wrapping_sub(start) >= d) {
            // Time is up: wait for what is in flight, submit nothing more.
            count = submitted;
        }
        let before = submitted;
        while submitted < count {
            if gap > 0 && rt::rdtsc().wrapping_sub(start) < submitted.saturating_mul(gap) {
                break;
            }
            let seq = submitted;
            let queued = net.tx.send_with(frame_len, |out| {
                out.copy_from_slice(tmpl);
                put16(out, h + 4, seq as u16);
                let sum = checksum(&out[h..h + IP_HDR]);
                put16(out, h + 10, sum);
                out[payload..payload + 4].copy_from_slice(&(seq as u32).to_le_bytes());
            });
            if !queued {
                break;
            }
            submitted += 1;
        }
        if submitted != before {
            net.tx.kick();
            // The timeout counts from the last submission or completion.
            progress = rt::rdtsc();
        }
        // Drop whatever arrives meanwhile, so that the receive queue never runs dry.
        let mut dropped = 0;
        loop {
            match net.rx.recv_with(|_| ()) {
                Ok(Some(())) => dropped += 1,
                Ok(None) => break,
                Err(e) => die!(EXIT_FAIL, "{} (receive queue)", e),
            }
        }
        if dropped > 0 {
            net.rx.kick();
        }
        let reclaimed = net.tx.reclaim();
        let now = rt::rdtsc();
        match reclaimed {
            Ok(0) => {
                if net.tx.in_flight() > 0 && now.wrapping_sub(progress) > limit {
                    die!(
                        EXIT_FAIL,
                        "timeout waiting for the device ({} packets in flight)",
                        net.tx.in_flight()
                    );
                }
                spin_loop();
            }
            Ok(n) => {
                sent += n as u64;
                progress = now;
                end = now;
            }
            Err(e) => die!(EXIT_FAIL, "{} (transmit queue)", e),
        }
        reporter.maybe_report(now, sent, sent * frame_len as u64, 0, 0);
    }
    let ns = rt::ticks_to_ns(end.wrapping_sub(start));
    reporter.report(sent, sent * frame_len as u64, 0, 0);
    println!(
        "net-echo: sent={} ms={} packets_per_sec={}",
        sent,
        ns / 1_000_000,
        per_sec(sent, ns)
    );
}
