//! The performance monitoring agent: turns counter snapshots into performance vectors.
//!
//! - [`Sampler`] computes one [`Sample`] from two [`CounterSnapshot`]s (previous and
//!   current): raw rates and ratios in the units of [`crate::schema`], and the normalised
//!   vector. It never panics and never lets NaN or infinity out: a counter that went
//!   backwards (a reset) contributes its current value as the increase, a zero or
//!   negative interval gives zero rates, and any non-finite value is replaced by 0 and
//!   counted in [`SamplerStats`].
//! - [`Agent`] runs a sampler on its own thread: every interval it calls
//!   [`CounterSource::snapshot`], samples, and hands the sample to each registered
//!   [`Sink`]. Every sink runs on its own thread behind a bounded queue; when a sink falls
//!   behind, samples for it are dropped and counted, so a slow sink never delays sampling.

use std::collections::HashMap;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::counters::{
    CounterSnapshot, CounterSource, ExitKind, QueueCounters, VcpuCounters, LATENCY_BUCKETS_US,
};
use crate::schema::{FeatureId, FEATURES};
use crate::slo::{self, SloReport, SloTarget};

/// Shortest sampling interval the agent accepts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Default sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// Default number of samples queued per sink before new ones are dropped.
pub const DEFAULT_SINK_QUEUE: usize = 64;

/// Errors of the agent.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configured interval is below [`MIN_INTERVAL`].
    #[error("sampling interval {0:?} is below the minimum of 1 ms")]
    IntervalTooShort(Duration),
    /// The configured sink queue length is zero.
    #[error("sink queue length must be at least 1")]
    ZeroSinkQueue,
    /// A thread could not be spawned.
    #[error("cannot spawn the {name} thread: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A thread of the agent panicked (the sampler, or a sink).
    #[error("the {0} thread panicked")]
    Panicked(String),
}

/// One interval's performance vector.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Time of the current snapshot ([`CounterSnapshot::at_ns`]).
    pub at_ns: u64,
    /// Nanoseconds since the previous snapshot (0 if time did not advance).
    pub interval_ns: u64,
    /// Raw values in the schema's units, one per feature, always finite.
    pub raw: Vec<f64>,
    /// Normalised values in `[0, 1]`, one per feature.
    pub vector: Vec<f32>,
    /// Per queue, the quantiles of its requests' own latencies in the interval.
    pub queue_latency: Vec<QueueLatency>,
    /// The VM's SLO attainment in the interval (`None` without an SLO).
    pub slo: Option<SloReport>,
    /// The guest profiler's shares of the interval's samples (`None` when the profiler
    /// took none); not in the policy's vector yet (`crate::guest_profile`).
    pub profile: Option<crate::guest_profile::ProfileShares>,
    /// When the interval's (current) snapshot was taken, on this process's monotonic
    /// clock (set by the [`Agent`]): a decision's sample age is measured from it.
    pub taken: Option<Instant>,
}

/// Quantiles of one queue's per-request latencies over one interval (from the delta of
/// its histogram).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueLatency {
    /// Device id (`blk0`, `net0`, ...).
    pub device: String,
    /// Queue index within the device.
    pub queue: u16,
    /// Requests completed in the interval.
    pub requests: u64,
    /// Median latency in microseconds (0 without requests).
    pub p50_us: f64,
    /// 99th percentile latency in microseconds (0 without requests).
    pub p99_us: f64,
}

impl Sample {
    /// Raw value of one feature.
    pub fn raw_of(&self, id: FeatureId) -> f64 {
        self.raw.get(id.index()).copied().unwrap_or(0.0)
    }

    /// Normalised value of one feature.
    pub fn value_of(&self, id: FeatureId) -> f32 {
        self.vector.get(id.index()).copied().unwrap_or(0.0)
    }
}

/// What the sampler has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerStats {
    /// Samples produced.
    pub samples: u64,
    /// Non-finite values (NaN, infinity) replaced by 0.
    pub non_finite_replaced: u64,
    /// Cumulative counters that went backwards (counter resets).
    pub counter_resets: u64,
    /// Samples whose interval was zero (time did not advance).
    pub zero_intervals: u64,
}

/// Computes performance vectors from pairs of counter snapshots.
#[derive(Debug, Default)]
pub struct Sampler {
    prev: Option<CounterSnapshot>,
    stats: SamplerStats,
}

/// Increase of a cumulative counter, counting resets.
struct Deltas {
    resets: u64,
}

impl Deltas {
    fn d(&mut self, prev: u64, cur: u64) -> u64 {
        if cur >= prev {
            cur - prev
        } else {
            // The counter restarted from 0 since the previous snapshot: what it holds now
            // is what it gained since the restart.
            self.resets += 1;
            cur
        }
    }
}

/// Value at quantile `q` of a latency histogram (bucket counts per
/// [`LATENCY_BUCKETS_US`], last bucket unbounded), in microseconds, interpolated linearly
/// inside the bucket. Returns 0 for an empty histogram. A quantile in the unbounded bucket
/// reports the last finite bound.
pub fn histogram_quantile_us(buckets: &[u64], q: f64) -> f64 {
    let total: u64 = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
    if total == 0 || q.is_nan() {
        return 0.0;
    }
    let target = q.clamp(0.0, 1.0) * total as f64;
    let last_bound = LATENCY_BUCKETS_US.last().copied().unwrap_or(0) as f64;
    let mut before = 0.0f64;
    for (i, &count) in buckets.iter().enumerate() {
        let after = before + count as f64;
        if count > 0 && after >= target {
            let lower = if i == 0 {
                0.0
            } else {
                LATENCY_BUCKETS_US.get(i - 1).copied().unwrap_or(0) as f64
            };
            let Some(&upper) = LATENCY_BUCKETS_US.get(i) else {
                return last_bound;
            };
            let frac = ((target - before) / count as f64).clamp(0.0, 1.0);
            return lower + (upper as f64 - lower) * frac;
        }
        before = after;
    }
    last_bound
}

impl Sampler {
    /// A sampler with no previous snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts so far.
    pub fn stats(&self) -> SamplerStats {
        self.stats
    }

    /// Forgets the previous snapshot: the next [`Sampler::observe`] starts over.
    pub fn reset(&mut self) {
        self.prev = None;
    }

    /// Records `cur` and returns the sample since the previously observed snapshot, or
    /// `None` for the first snapshot (it only sets the baseline).
    pub fn observe(&mut self, cur: CounterSnapshot) -> Option<Sample> {
        let sample = self.prev.take().map(|prev| self.sample(&prev, &cur));
        self.prev = Some(cur);
        sample
    }

    /// The sample between two snapshots.
    pub fn sample(&mut self, prev: &CounterSnapshot, cur: &CounterSnapshot) -> Sample {
        let mut deltas = Deltas { resets: 0 };
        let interval_ns = cur.at_ns.saturating_sub(prev.at_ns);
        if interval_ns == 0 {
            self.stats.zero_intervals += 1;
        }
        let secs = interval_ns as f64 / 1e9;
        let rate = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let mut raw = vec![0.0f64; FEATURES.len()];
        let mut set = |id: FeatureId, v: f64| raw[id.index()] = v;

        // vCPUs, matched by index; a vCPU absent before counts from zero.
        let empty_vcpu = VcpuCounters::default();
        let (mut guest_ns, mut monitor_ns) = (0u64, 0u64);
        let mut exits = [0u64; ExitKind::COUNT];
        for v in &cur.vcpus {
            let p = prev
                .vcpus
                .iter()
                .find(|p| p.index == v.index)
                .unwrap_or(&empty_vcpu);
            guest_ns = guest_ns.saturating_add(deltas.d(p.guest_ns, v.guest_ns));
            monitor_ns = monitor_ns.saturating_add(deltas.d(p.monitor_ns, v.monitor_ns));
            for (k, e) in exits.iter_mut().enumerate() {
                *e = e.saturating_add(deltas.d(p.exits[k], v.exits[k]));
            }
        }
        let active = if cur.active_vcpus > 0 {
            cur.active_vcpus as f64
        } else {
            cur.vcpus.len().max(1) as f64
        };
        if interval_ns > 0 {
            set(
                FeatureId::CpuUtilisation,
                guest_ns as f64 / (interval_ns as f64 * active),
            );
        }
        let busy = guest_ns as f64 + monitor_ns as f64;
        if busy > 0.0 {
            set(FeatureId::MonitorShare, monitor_ns as f64 / busy);
        }
        let kind = |k: ExitKind| exits[k.index()] as f64;
        set(
            FeatureId::ExitRateIo,
            rate(kind(ExitKind::IoIn) + kind(ExitKind::IoOut)),
        );
        set(
            FeatureId::ExitRateMmio,
            rate(kind(ExitKind::MmioRead) + kind(ExitKind::MmioWrite)),
        );
        set(FeatureId::ExitRateHlt, rate(kind(ExitKind::Hlt)));
        set(
            FeatureId::ExitRateOther,
            rate(
                kind(ExitKind::Shutdown)
                    + kind(ExitKind::InternalError)
                    + kind(ExitKind::Interrupted)
                    + kind(ExitKind::Other),
            ),
        );
        set(
            FeatureId::ExitRateTotal,
            rate(exits.iter().map(|e| *e as f64).sum()),
        );

        // Queues, matched by (device, queue); a queue absent before counts from zero.
        let prev_queues: HashMap<(&str, u16), &QueueCounters> = prev
            .queues
            .iter()
            .map(|q| ((q.device.as_str(), q.queue), q))
            .collect();
        let empty_queue = QueueCounters::default();
        let (mut io_req, mut io_bytes, mut io_err) = (0u64, 0u64, 0u64);
        let (mut net_req, mut net_bytes) = (0u64, 0u64);
        let (mut depth_sum, mut depth_samples) = (0u64, 0u64);
        let mut throttled_sum = 0.0f64;
        let mut hist = [0u64; LATENCY_BUCKETS_US.len() + 1];
        let mut drive_req = vec![0u64; cur.drives.len()];
        let mut drive_hist = vec![[0u64; LATENCY_BUCKETS_US.len() + 1]; cur.drives.len()];
        let mut queue_latency = Vec::with_capacity(cur.queues.len());
        for q in &cur.queues {
            let p = prev_queues
                .get(&(q.device.as_str(), q.queue))
                .copied()
                .unwrap_or(&empty_queue);
            let req = deltas.d(p.requests, q.requests);
            let mut q_hist = [0u64; LATENCY_BUCKETS_US.len() + 1];
            for (h, (pb, cb)) in q_hist
                .iter_mut()
                .zip(p.latency_buckets.iter().zip(q.latency_buckets.iter()))
            {
                *h = deltas.d(*pb, *cb);
            }
            queue_latency.push(QueueLatency {
                device: q.device.clone(),
                queue: q.queue,
                requests: req,
                p50_us: histogram_quantile_us(&q_hist, 0.50),
                p99_us: histogram_quantile_us(&q_hist, 0.99),
            });
            if let Some(slot) = cur.drives.iter().position(|d| d.id == q.device) {
                drive_req[slot] = drive_req[slot].saturating_add(req);
                for (h, x) in drive_hist[slot].iter_mut().zip(q_hist.iter()) {
                    *h = h.saturating_add(*x);
                }
            }
            let bytes = deltas.d(p.bytes, q.bytes);
            let err = deltas.d(p.errors, q.errors);
            let throttled = deltas.d(p.throttled_ns, q.throttled_ns);
            depth_sum = depth_sum.saturating_add(deltas.d(p.depth_sum, q.depth_sum));
            depth_samples =
                depth_samples.saturating_add(deltas.d(p.depth_samples, q.depth_samples));
            if interval_ns > 0 {
                throttled_sum += (throttled as f64 / interval_ns as f64).min(1.0);
            }
            if q.is_net() {
                net_req = net_req.saturating_add(req);
                net_bytes = net_bytes.saturating_add(bytes);
            } else {
                io_req = io_req.saturating_add(req);
                io_bytes = io_bytes.saturating_add(bytes);
                io_err = io_err.saturating_add(err);
                for (h, x) in hist.iter_mut().zip(q_hist.iter()) {
                    *h = h.saturating_add(*x);
                }
            }
        }
        set(FeatureId::IoRequestRate, rate(io_req as f64));
        set(FeatureId::IoBytesRate, rate(io_bytes as f64));
        set(FeatureId::IoErrorRate, rate(io_err as f64));
        if !cur.queues.is_empty() {
            set(
                FeatureId::ThrottledFraction,
                throttled_sum / cur.queues.len() as f64,
            );
        }
        if depth_samples > 0 {
            set(
                FeatureId::QueueDepthMean,
                depth_sum as f64 / depth_samples as f64,
            );
        }
        let io_p99 = histogram_quantile_us(&hist, 0.99);
        set(FeatureId::IoLatencyP50, histogram_quantile_us(&hist, 0.50));
        set(FeatureId::IoLatencyP99, io_p99);
        set(FeatureId::NetPacketRate, rate(net_req as f64));
        set(FeatureId::NetBytesRate, rate(net_bytes as f64));

        // Memory.
        let (pm, cm) = (&prev.memory, &cur.memory);
        if cm.guest_bytes > 0 {
            set(
                FeatureId::MemoryResidentFraction,
                cm.resident_bytes as f64 / cm.guest_bytes as f64,
            );
        }
        set(
            FeatureId::PageFaultRate,
            rate(deltas.d(pm.page_faults, cm.page_faults) as f64),
        );
        set(
            FeatureId::DirtyPageRate,
            rate(deltas.d(pm.dirty_pages, cm.dirty_pages) as f64),
        );

        // Guest-reported workload metrics.
        let (pg, cg) = (&prev.guest, &cur.guest);
        let guest_ops_rate = rate(deltas.d(pg.ops, cg.ops) as f64);
        set(FeatureId::GuestOpsRate, guest_ops_rate);
        let lat_sum = deltas.d(pg.latency_ns_sum, cg.latency_ns_sum);
        let lat_n = deltas.d(pg.latency_samples, cg.latency_samples);
        if lat_n > 0 {
            set(
                FeatureId::GuestLatencyMean,
                lat_sum as f64 / lat_n as f64 / 1e3,
            );
        }

        set(FeatureId::ActiveVcpus, cur.active_vcpus as f64);
        set(FeatureId::HostCores, cur.host_cores as f64);
        for (slot, d) in cur.drives.iter().enumerate() {
            if let Some([req, level, prio]) = FeatureId::drive_slot(slot) {
                set(req, rate(drive_req[slot] as f64));
                set(level, f64::from(d.rate_level));
                set(prio, f64::from(d.priority.code()));
            }
        }
        set(
            FeatureId::NetQosLevel,
            cur.net_qos_level.map_or(0.0, f64::from),
        );
        for (slot, h) in drive_hist.iter().enumerate() {
            if let Some(id) = FeatureId::drive_latency_slot(slot) {
                set(id, histogram_quantile_us(h, 0.99));
            }
        }

        // The SLO: the guest's own operation reports where it sends them, else the
        // drives' request rate.
        let slo_report = cur.slo.as_ref().map(|s| {
            let ops_rate = if cg.ops > 0 {
                guest_ops_rate
            } else {
                rate(io_req as f64)
            };
            slo::attain(
                s,
                slo::Observed {
                    p99_us: io_p99,
                    ops_rate,
                },
            )
        });
        if let Some(r) = &slo_report {
            set(FeatureId::SloClass, f64::from(r.class.code()));
            if let Some(t) = r.target(SloTarget::P99Us) {
                set(FeatureId::SloP99Target, t.goal);
                set(FeatureId::SloP99Margin, t.margin);
            }
            if let Some(t) = r.target(SloTarget::MinOps) {
                set(FeatureId::SloOpsTarget, t.goal);
                set(FeatureId::SloOpsMargin, t.margin);
            }
        }
        set(
            FeatureId::SloMet,
            if slo_report.as_ref().is_none_or(|r| r.met()) {
                1.0
            } else {
                0.0
            },
        );

        // The host: vCPU threads' run delay, the allowed CPUs' load.
        if interval_ns > 0 && !cur.vcpus.is_empty() {
            let (mut sum, mut max) = (0u64, 0u64);
            for v in &cur.vcpus {
                let p = prev
                    .vcpus
                    .iter()
                    .find(|p| p.index == v.index)
                    .unwrap_or(&empty_vcpu);
                let d = deltas.d(p.run_delay_ns, v.run_delay_ns);
                sum = sum.saturating_add(d);
                max = max.max(d);
            }
            let interval = interval_ns as f64;
            set(
                FeatureId::VcpuRunDelayShare,
                sum as f64 / (interval * cur.vcpus.len() as f64),
            );
            set(FeatureId::VcpuRunDelayMax, max as f64 / interval);
        }
        let (ph, ch) = (&prev.host, &cur.host);
        let total = deltas.d(ph.total_ticks, ch.total_ticks);
        if total > 0 {
            let busy = deltas.d(ph.busy_ticks, ch.busy_ticks);
            set(FeatureId::HostLoad, busy as f64 / total as f64);
        }

        for (i, x) in raw.iter_mut().enumerate() {
            if !x.is_finite() {
                log::warn!(
                    "feature {} was {x}, replaced by 0",
                    FEATURES.get(i).map_or("?", |f| f.name)
                );
                *x = 0.0;
                self.stats.non_finite_replaced += 1;
            }
        }
        let vector = raw
            .iter()
            .zip(FEATURES.iter())
            .map(|(x, f)| f.normalisation.apply(*x))
            .collect();
        if deltas.resets > 0 {
            log::debug!("{} counters went backwards (reset)", deltas.resets);
        }
        self.stats.counter_resets += deltas.resets;
        self.stats.samples += 1;
        Sample {
            at_ns: cur.at_ns,
            interval_ns,
            raw,
            vector,
            queue_latency,
            slo: slo_report,
            profile: cur.profile.as_ref().and_then(|c| {
                crate::guest_profile::ProfileShares::between(prev.profile.as_ref(), c)
            }),
            taken: None,
        }
    }
}

/// A consumer of samples (the state repository writer, the metrics registry, a policy).
///
/// Each sink runs on its own thread; `accept` may be slow without delaying sampling
/// (samples for a sink that falls behind are dropped and counted).
pub trait Sink: Send {
    /// Name used in logs and [`SinkStats`].
    fn name(&self) -> &str;
    /// Consumes one sample.
    fn accept(&mut self, sample: &Arc<Sample>);
    /// Called once when the agent stops, after the last sample.
    fn finish(&mut self) {}
    /// Called once, on the sink's thread, after [`Sink::accept`] panicked (`message`:
    /// the panic's); the sink gets no more samples. The tuner returns to the static
    /// configuration here.
    fn panicked(&mut self, _message: &str) {}
}

/// A sink calling a closure for every sample.
pub struct FnSink<F> {
    name: String,
    f: F,
}

impl<F: FnMut(&Sample) + Send> FnSink<F> {
    /// A sink named `name` calling `f`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F: FnMut(&Sample) + Send> Sink for FnSink<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn accept(&mut self, sample: &Arc<Sample>) {
        (self.f)(sample)
    }
}

/// A shared slot holding the latest sample (cheap to clone; all clones share the slot).
/// As a [`Sink`] it stores every sample it gets; the metrics server and `GET /vm` read it
/// (slow readers take the latest value; they never hold up the control loop). Beside it,
/// the agent keeps each sink's count of samples dropped because the sink fell behind.
#[derive(Debug, Clone, Default)]
pub struct LatestSample {
    sample: Arc<Mutex<Option<Arc<Sample>>>>,
    drops: Arc<Mutex<Vec<(String, u64)>>>,
}

impl LatestSample {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest sample, if any.
    pub fn get(&self) -> Option<Arc<Sample>> {
        self.sample
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the latest sample.
    pub fn set(&self, sample: Arc<Sample>) {
        *self.sample.lock().unwrap_or_else(PoisonError::into_inner) = Some(sample);
    }

    /// Per sink (by name), samples dropped so far because its bounded queue was full.
    pub fn sink_drops(&self) -> Vec<(String, u64)> {
        self.drops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_sink_drops(&self, drops: Vec<(String, u64)>) {
        *self.drops.lock().unwrap_or_else(PoisonError::into_inner) = drops;
    }
}

impl Sink for LatestSample {
    fn name(&self) -> &str {
        "latest"
    }
    fn accept(&mut self, sample: &Arc<Sample>) {
        self.set(Arc::clone(sample));
    }
}

/// Configuration of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// Sampling interval (at least [`MIN_INTERVAL`]).
    pub interval: Duration,
    /// Samples queued per sink before new ones are dropped (at least 1).
    pub sink_queue: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            sink_queue: DEFAULT_SINK_QUEUE,
        }
    }
}

/// Delivery counts of one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// The sink's name.
    pub name: String,
    /// Samples queued for the sink.
    pub queued: u64,
    /// Samples the sink has consumed.
    pub consumed: u64,
    /// Samples dropped because the sink's queue was full (or the sink had died).
    pub dropped: u64,
}

/// Counts of a running or stopped agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Snapshots read from the source.
    pub snapshots: u64,
    /// Intervals whose sampling deadline had already passed (the source or the host was
    /// slower than the interval); those ticks are skipped, not bunched up.
    pub overruns: u64,
    /// The sampler's counts.
    pub sampler: SamplerStats,
    /// Per-sink delivery counts, in registration order.
    pub sinks: Vec<SinkStats>,
}

#[derive(Default)]
struct SinkCounters {
    name: String,
    queued: AtomicU64,
    consumed: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Shared {
    snapshots: AtomicU64,
    overruns: AtomicU64,
    sampler: Mutex<SamplerStats>,
    sinks: Vec<SinkCounters>,
}

/// The sampling agent: a thread that samples a [`CounterSource`] every interval and
/// feeds the registered sinks. Stop it with [`Agent::stop`] (dropping it also stops it).
pub struct Agent {
    stop_tx: Option<SyncSender<()>>,
    sampler: Option<JoinHandle<()>>,
    sink_threads: Vec<(String, JoinHandle<()>)>,
    shared: Arc<Shared>,
    latest: LatestSample,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("running", &self.sampler.is_some())
            .finish()
    }
}

impl Agent {
    /// Starts the agent: one sampling thread plus one thread per sink. The first
    /// snapshot is read at once (as the baseline); the first sample follows one interval
    /// later.
    pub fn start(
        source: Arc<dyn CounterSource>,
        config: AgentConfig,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Result<Agent, AgentError> {
        Self::start_loop(source, config, None, sinks)
    }

    /// Starts the control loop: one thread that, every interval, snapshots the source,
    /// makes the sample and hands it to `control` (the tuner: decide and apply) at once,
    /// on the same thread, with no queue in front of it; then offers the sample to the
    /// slow readers (`sinks`, each behind a bounded queue that drops with a counter, and
    /// the latest-sample slot). A panic in `control` calls its [`Sink::panicked`] (the
    /// tuner restores the static configuration) and the loop goes on sampling without it.
    pub fn start_loop(
        source: Arc<dyn CounterSource>,
        config: AgentConfig,
        mut control: Option<Box<dyn Sink>>,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Result<Agent, AgentError> {
        if config.interval < MIN_INTERVAL {
            return Err(AgentError::IntervalTooShort(config.interval));
        }
        if config.sink_queue == 0 {
            return Err(AgentError::ZeroSinkQueue);
        }
        let shared = Arc::new(Shared {
            sinks: sinks
                .iter()
                .map(|s| SinkCounters {
                    name: s.name().to_string(),
                    ..SinkCounters::default()
                })
                .collect(),
            ..Shared::default()
        });
        let mut agent = Agent {
            stop_tx: None,
            sampler: None,
            sink_threads: Vec::new(),
            shared: Arc::clone(&shared),
            latest: LatestSample::new(),
        };
        let mut senders = Vec::with_capacity(sinks.len());
        for (i, mut sink) in sinks.into_iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel::<Arc<Sample>>(config.sink_queue);
            let name = format!("tuner-sink-{}", sink.name());
            let shared = Arc::clone(&shared);
            let thread_name = name.clone();
            let handle = thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    crate::sandbox::run_helper(&thread_name, || {
                        for sample in rx {
                            let accepted =
                                panic::catch_unwind(AssertUnwindSafe(|| sink.accept(&sample)));
                            if let Err(p) = accepted {
                                // The sink stops here (its queue closes: the sampler
                                // counts what it can no longer hand over as dropped).
                                let message = crate::sandbox::panic_message(&*p);
                                log::error!("sink {thread_name} panicked: {message}; it stops");
                                sink.panicked(&message);
                                return;
                            }
                            if let Some(c) = shared.sinks.get(i) {
                                c.consumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        sink.finish();
                    });
                })
                .map_err(|source| AgentError::Spawn {
                    name: name.clone(),
                    source,
                })?;
            // On error above, `agent` drops: the senders already created drop with
            // `senders`, so the sink threads spawned so far end; Drop joins them.
            agent.sink_threads.push((name, handle));
            senders.push(tx);
        }
        let (stop_tx, stop_rx) = mpsc::sync_channel::<()>(1);
        let latest = agent.latest.clone();
        let interval = config.interval;
        let handle = thread::Builder::new()
            .name("tuner-agent".to_string())
            .spawn(move || {
                crate::sandbox::run_helper("tuner-agent", move || {
                    let mut sampler = Sampler::new();
                    let mut next = Instant::now();
                    loop {
                        let taken = Instant::now();
                        let snapshot = source.snapshot();
                        shared.snapshots.fetch_add(1, Ordering::Relaxed);
                        if let Some(mut sample) = sampler.observe(snapshot) {
                            sample.taken = Some(taken);
                            *shared
                                .sampler
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner) = sampler.stats();
                            let sample = Arc::new(sample);
                            if let Some(c) = control.as_mut() {
                                let done =
                                    panic::catch_unwind(AssertUnwindSafe(|| c.accept(&sample)));
                                if let Err(p) = done {
                                    let message = crate::sandbox::panic_message(&*p);
                                    log::error!(
                                        "control step {} panicked: {message}; it stops",
                                        c.name()
                                    );
                                    c.panicked(&message);
                                    control = None;
                                }
                            }
                            latest.set(Arc::clone(&sample));
                            for (i, tx) in senders.iter().enumerate() {
                                let Some(c) = shared.sinks.get(i) else {
                                    continue;
                                };
                                match tx.try_send(Arc::clone(&sample)) {
                                    Ok(()) => {
                                        c.queued.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(TrySendError::Full(_)) => {
                                        if c.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                                            log::warn!(
                                                "sink {} is falling behind; dropping samples",
                                                c.name
                                            );
                                        }
                                    }
                                    Err(TrySendError::Disconnected(_)) => {
                                        if c.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                                            log::error!("sink {} has died", c.name);
                                        }
                                    }
                                }
                            }
                        }
                        latest.set_sink_drops(
                            shared
                                .sinks
                                .iter()
                                .map(|c| (c.name.clone(), c.dropped.load(Ordering::Relaxed)))
                                .collect(),
                        );
                        next += interval;
                        let now = Instant::now();
                        if next <= now {
                            // Behind schedule: skip the missed ticks instead of sampling in a burst.
                            shared.overruns.fetch_add(1, Ordering::Relaxed);
                            next = now + interval;
                        }
                        match stop_rx.recv_timeout(next - now) {
                            Err(RecvTimeoutError::Timeout) => {}
                            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    if let Some(c) = control.as_mut() {
                        c.finish();
                    }
                    // `senders` drop here: the sink threads drain their queues and finish.
                });
            })
            .map_err(|source| AgentError::Spawn {
                name: "tuner-agent".to_string(),
                source,
            })?;
        agent.stop_tx = Some(stop_tx);
        agent.sampler = Some(handle);
        log::info!(
            "tuner agent started: interval {:?}, {} sinks",
            interval,
            agent.sink_threads.len()
        );
        Ok(agent)
    }

    /// Counts so far.
    pub fn stats(&self) -> AgentStats {
        let s = &self.shared;
        AgentStats {
            snapshots: s.snapshots.load(Ordering::Relaxed),
            overruns: s.overruns.load(Ordering::Relaxed),
            sampler: *s.sampler.lock().unwrap_or_else(PoisonError::into_inner),
            sinks: s
                .sinks
                .iter()
                .map(|c| SinkStats {
                    name: c.name.clone(),
                    queued: c.queued.load(Ordering::Relaxed),
                    consumed: c.consumed.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// The latest sample (also available to others through [`Agent::latest_handle`]).
    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.latest.get()
    }

    /// A handle on the latest-sample slot (e.g. for the metrics server).
    pub fn latest_handle(&self) -> LatestSample {
        self.latest.clone()
    }

    /// Stops sampling, lets every sink consume what is queued for it, calls each sink's
    /// [`Sink::finish`] and joins every thread. Returns the final counts.
    pub fn stop(mut self) -> Result<AgentStats, AgentError> {
        self.shutdown()?;
        Ok(self.stats())
    }

    fn shutdown(&mut self) -> Result<(), AgentError> {
        let mut result = Ok(());
        if let Some(tx) = self.stop_tx.take() {
            // Full means a stop is already pending; either way the thread wakes.
            let _ = tx.try_send(());
        }
        if let Some(handle) = self.sampler.take() {
            if handle.join().is_err() {
                log::error!("the tuner agent thread panicked");
                result = Err(AgentError::Panicked("tuner-agent".to_string()));
            }
        }
        for (name, handle) in self.sink_threads.drain(..) {
            if handle.join().is_err() {
                log::error!("the {name} thread panicked");
                if result.is_ok() {
                    result = Err(AgentError::Panicked(name));
                }
            }
        }
        result
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("stopping the tuner agent: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::counters::{GuestMetrics, MemoryCounters};

    /// A snapshot with one vCPU and two queues (`blk0`, `net0`), shaped by `t` (seconds).
    pub(crate) fn snapshot_at(t: u64) -> CounterSnapshot {
        let mut exits = [0u64; ExitKind::COUNT];
        exits[ExitKind::IoOut.index()] = 100 * t;
        exits[ExitKind::MmioWrite.index()] = 50 * t;
        exits[ExitKind::Hlt.index()] = 10 * t;
        exits[ExitKind::Other.index()] = t;
        let mut blk_hist = [0u64; LATENCY_BUCKETS_US.len() + 1];
        // Per second: 60 requests in [50, 100) us, 39 in [100, 250) us, 1 in [5, 10) ms.
        blk_hist[3] = 60 * t;
        blk_hist[4] = 39 * t;
        blk_hist[9] = t;
        CounterSnapshot {
            at_ns: t * 1_000_000_000,
            vcpus: vec![VcpuCounters {
                index: 0,
                exits,
                guest_ns: 500_000_000 * t,
                monitor_ns: 100_000_000 * t,
                kvm_stats: vec![],
                run_delay_ns: 20_000_000 * t,
            }],
            queues: vec![
                QueueCounters {
                    device: "blk0".into(),
                    queue: 0,
                    requests: 100 * t,
                    bytes: 409_600 * t,
                    errors: t,
                    throttled_ns: 250_000_000 * t,
                    depth_sum: 40 * t,
                    depth_samples: 10 * t,
                    latency_buckets: blk_hist,
                    latency_ns_sum: 100 * 150_000 * t,
                },
                QueueCounters {
                    device: "net0".into(),
                    queue: 1,
                    requests: 1000 * t,
                    bytes: 1_500_000 * t,
                    ..QueueCounters::default()
                },
            ],
            memory: MemoryCounters {
                guest_bytes: 1 << 30,
                resident_bytes: 1 << 28,
                page_faults: 2000 * t,
                dirty_pages: 300 * t,
            },
            guest: GuestMetrics {
                ops: 5000 * t,
                bytes: 0,
                latency_ns_sum: 5000 * 20_000 * t,
                latency_samples: 5000 * t,
            },
            active_vcpus: 1,
            host_cores: 2,
            drives: vec![crate::counters::DriveKnobs {
                id: "blk0".into(),
                rate_level: 3,
                priority: crate::actions::PriorityLevel::High,
            }],
            net_qos_level: Some(1),
            log_lines_suppressed: 7 * t,
            host: crate::counters::HostCounters {
                busy_ticks: 60 * t,
                total_ticks: 200 * t,
                allowed_cpus: 2,
            },
            slo: Some(crate::slo::Slo {
                class: crate::slo::SloClass::Critical,
                p99_us: Some(200),
                min_ops: Some(4000.0),
            }),
            // Per second: 7 samples in a compute function, 2 in an idle one, 1 in I/O.
            profile: Some(crate::guest_profile::ProfileCounters {
                hz: 10,
                functions: vec![
                    crate::guest_profile::FunctionCount {
                        class: crate::guest_profile::CodeClass::Compute,
                        count: 7 * t,
                    },
                    crate::guest_profile::FunctionCount {
                        class: crate::guest_profile::CodeClass::Idle,
                        count: 2 * t,
                    },
                    crate::guest_profile::FunctionCount {
                        class: crate::guest_profile::CodeClass::Io,
                        count: t,
                    },
                ],
            }),
        }
    }

    #[test]
    fn a_sample_carries_the_profilers_shares_of_its_interval() {
        let mut s = Sampler::new();
        let p = s
            .sample(&snapshot_at(1), &snapshot_at(3))
            .profile
            .expect("shares");
        assert_eq!(p.samples, 20);
        assert!(close(p.compute, 0.7) && close(p.idle, 0.2) && close(p.io, 0.1));
        assert!(close(p.hottest, 0.7));
        // Without a profiler, no shares.
        let mut a = snapshot_at(1);
        let mut b = snapshot_at(3);
        a.profile = None;
        b.profile = None;
        assert_eq!(s.sample(&a, &b).profile, None);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn computes_rates_and_ratios() {
        let mut s = Sampler::new();
        let sample = s.sample(&snapshot_at(1), &snapshot_at(3));
        assert_eq!(sample.at_ns, 3_000_000_000);
        assert_eq!(sample.interval_ns, 2_000_000_000);
        let r = |id| sample.raw_of(id);
        assert!(close(r(FeatureId::CpuUtilisation), 0.5));
        assert!(close(r(FeatureId::MonitorShare), 100.0 / 600.0));
        assert!(close(r(FeatureId::ExitRateIo), 100.0));
        assert!(close(r(FeatureId::ExitRateMmio), 50.0));
        assert!(close(r(FeatureId::ExitRateHlt), 10.0));
        assert!(close(r(FeatureId::ExitRateOther), 1.0));
        assert!(close(r(FeatureId::ExitRateTotal), 161.0));
        assert!(close(r(FeatureId::IoRequestRate), 100.0));
        assert!(close(r(FeatureId::IoBytesRate), 409_600.0));
        assert!(close(r(FeatureId::IoErrorRate), 1.0));
        // blk0 throttled a quarter of the time, net0 never: mean 0.125.
        assert!(close(r(FeatureId::ThrottledFraction), 0.125));
        assert!(close(r(FeatureId::QueueDepthMean), 4.0));
        // p50: 100 of 200 requests -> inside [50, 100): 50 + 50 * (100/120).
        let p50 = r(FeatureId::IoLatencyP50);
        assert!(close(p50, 50.0 + 50.0 * 100.0 / 120.0), "{p50}");
        // p99: 198 of 200 -> last of bucket [100, 250) (cumulative 198).
        let p99 = r(FeatureId::IoLatencyP99);
        assert!(close(p99, 250.0), "{p99}");
        assert!(close(r(FeatureId::NetPacketRate), 1000.0));
        assert!(close(r(FeatureId::NetBytesRate), 1_500_000.0));
        assert!(close(r(FeatureId::MemoryResidentFraction), 0.25));
        assert!(close(r(FeatureId::PageFaultRate), 2000.0));
        assert!(close(r(FeatureId::DirtyPageRate), 300.0));
        assert!(close(r(FeatureId::GuestOpsRate), 5000.0));
        assert!(close(r(FeatureId::GuestLatencyMean), 20.0));
        assert!(close(r(FeatureId::ActiveVcpus), 1.0));
        assert!(close(r(FeatureId::HostCores), 2.0));
        // Drive slot 0 is blk0 (its own requests only), slot 1 is empty.
        assert!(close(r(FeatureId::Drive0RequestRate), 100.0));
        assert!(close(r(FeatureId::Drive0RateLevel), 3.0));
        assert!(close(r(FeatureId::Drive0Priority), 3.0));
        assert_eq!(sample.value_of(FeatureId::Drive0RateLevel), 0.75);
        assert_eq!(sample.value_of(FeatureId::Drive0Priority), 1.0);
        assert_eq!(r(FeatureId::Drive1RequestRate), 0.0);
        assert_eq!(r(FeatureId::Drive1Priority), 0.0);
        assert!(close(r(FeatureId::NetQosLevel), 1.0));
        // Per-request latency per drive slot and per queue.
        assert!(close(r(FeatureId::Drive0LatencyP99), 250.0));
        assert_eq!(r(FeatureId::Drive1LatencyP99), 0.0);
        let blk = &sample.queue_latency[0];
        assert_eq!(
            (blk.device.as_str(), blk.queue, blk.requests),
            ("blk0", 0, 200)
        );
        assert!(close(blk.p50_us, p50) && close(blk.p99_us, 250.0));
        assert_eq!(sample.queue_latency[1].p99_us, 0.0, "net0 has no latencies");
        // SLO: p99 250 us against 200 (missed by 0.25), 5000 guest ops/s against 4000
        // (met, margin 0.25).
        let slo = sample.slo.as_ref().expect("an SLO is configured");
        assert!(!slo.met());
        assert!(close(r(FeatureId::SloClass), 3.0));
        assert_eq!(r(FeatureId::SloMet), 0.0);
        assert!(close(r(FeatureId::SloP99Target), 200.0));
        assert!(close(r(FeatureId::SloP99Margin), -0.25));
        assert!(close(r(FeatureId::SloOpsTarget), 4000.0));
        assert!(close(r(FeatureId::SloOpsMargin), 0.25));
        assert!(close(
            f64::from(sample.value_of(FeatureId::SloP99Margin)),
            0.375
        ));
        // The host: 20 ms run delay per second on the one vCPU; 60 of 200 ticks busy.
        assert!(close(r(FeatureId::VcpuRunDelayShare), 0.02));
        assert!(close(r(FeatureId::VcpuRunDelayMax), 0.02));
        assert!(close(r(FeatureId::HostLoad), 0.3));
        assert_eq!(sample.vector.len(), FEATURES.len());
        assert_eq!(sample.value_of(FeatureId::CpuUtilisation), 0.5);
        assert_eq!(sample.value_of(FeatureId::HostCores), 0.25);
        assert!(sample.vector.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(s.stats().samples, 1);
        assert_eq!(s.stats().counter_resets, 0);
    }

    /// Without guest reports, the SLO's operation rate is the drives' request rate.
    #[test]
    fn the_ops_target_falls_back_to_the_drives_requests() {
        let quiet = |t: u64| {
            let mut s = snapshot_at(t);
            s.guest = GuestMetrics::default();
            s
        };
        let sample = Sampler::new().sample(&quiet(1), &quiet(3));
        let ops = sample
            .slo
            .as_ref()
            .and_then(|r| r.target(SloTarget::MinOps))
            .expect("ops target");
        // blk0 completes 100 requests/s against a target of 4000 ops/s.
        assert!(close(ops.observed, 100.0), "{ops:?}");
        assert!(close(ops.margin, (100.0 - 4000.0) / 4000.0));
        assert!(!ops.met);
    }

    #[test]
    fn first_snapshot_is_only_a_baseline() {
        let mut s = Sampler::new();
        assert!(s.observe(snapshot_at(1)).is_none());
        let sample = s.observe(snapshot_at(2)).expect("second gives a sample");
        assert_eq!(sample.interval_ns, 1_000_000_000);
        assert!(close(sample.raw_of(FeatureId::GuestOpsRate), 5000.0));
        s.reset();
        assert!(s.observe(snapshot_at(3)).is_none());
    }

    #[test]
    fn zero_interval_gives_zero_rates_not_nan() {
        let mut s = Sampler::new();
        let a = snapshot_at(2);
        let mut b = snapshot_at(3);
        b.at_ns = a.at_ns; // time did not advance
        let sample = s.sample(&a, &b);
        assert_eq!(sample.interval_ns, 0);
        assert!(sample.raw.iter().all(|x| x.is_finite()));
        assert_eq!(sample.raw_of(FeatureId::ExitRateTotal), 0.0);
        assert_eq!(sample.raw_of(FeatureId::CpuUtilisation), 0.0);
        // Gauges still report.
        assert!(close(
            sample.raw_of(FeatureId::MemoryResidentFraction),
            0.25
        ));
        // Time going backwards is treated the same way.
        let sample = s.sample(&snapshot_at(3), &snapshot_at(2));
        assert_eq!(sample.interval_ns, 0);
        assert_eq!(s.stats().zero_intervals, 2);
        assert_eq!(s.stats().non_finite_replaced, 0);
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let mut s = Sampler::new();
        let before = snapshot_at(10);
        let mut after = snapshot_at(11);
        // The guest's metrics device restarted: its counters hold one second's worth.
        after.guest = snapshot_at(1).guest;
        let sample = s.sample(&before, &after);
        assert!(close(sample.raw_of(FeatureId::GuestOpsRate), 5000.0));
        assert!(close(sample.raw_of(FeatureId::GuestLatencyMean), 20.0));
        assert_eq!(s.stats().counter_resets, 3);
        assert!(sample.vector.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn empty_snapshots_and_new_devices_are_safe() {
        let mut s = Sampler::new();
        let empty = CounterSnapshot::default();
        let sample = s.sample(&empty, &empty);
        // Everything 0, but "every SLO target met" (there is none), and the signed
        // margins sit at their middle.
        let met = FeatureId::SloMet.index();
        let middle = [
            FeatureId::SloP99Margin.index(),
            FeatureId::SloOpsMargin.index(),
        ];
        for (i, (x, v)) in sample.raw.iter().zip(sample.vector.iter()).enumerate() {
            let (want_raw, want_v) = match i {
                i if i == met => (1.0, 1.0),
                i if middle.contains(&i) => (0.0, 0.5),
                _ => (0.0, 0.0),
            };
            assert_eq!((*x, *v), (want_raw, want_v), "feature {i}");
        }
        assert!(sample.slo.is_none());
        // A queue and vCPU that did not exist before count from zero.
        let mut prev = snapshot_at(1);
        prev.queues.clear();
        prev.vcpus.clear();
        let sample = s.sample(&prev, &snapshot_at(2));
        assert!(close(sample.raw_of(FeatureId::IoRequestRate), 200.0));
        assert_eq!(s.stats().counter_resets, 0);
        // Extreme values stay finite and in range.
        let mut huge = snapshot_at(1);
        huge.at_ns = 1;
        huge.vcpus[0].guest_ns = u64::MAX;
        huge.queues[0].latency_buckets = [u64::MAX; LATENCY_BUCKETS_US.len() + 1];
        let sample = s.sample(&CounterSnapshot::default(), &huge);
        assert!(sample.raw.iter().all(|x| x.is_finite()));
        assert!(sample.vector.iter().all(|x| (0.0..=1.0).contains(x)));
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = [0u64; LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(histogram_quantile_us(&h, 0.5), 0.0);
        h[0] = 10; // all below 10 us
        assert!(close(histogram_quantile_us(&h, 0.5), 5.0));
        assert!(close(histogram_quantile_us(&h, 1.0), 10.0));
        let mut h = [0u64; LATENCY_BUCKETS_US.len() + 1];
        h[LATENCY_BUCKETS_US.len()] = 3; // unbounded bucket
        assert!(close(histogram_quantile_us(&h, 0.99), 250_000.0));
        assert_eq!(histogram_quantile_us(&h, f64::NAN), 0.0);
    }

    /// A source whose counters advance by one second of `snapshot_at` per snapshot.
    struct Ticking {
        t: AtomicU64,
    }

    impl CounterSource for Ticking {
        fn snapshot(&self) -> CounterSnapshot {
            snapshot_at(self.t.fetch_add(1, Ordering::Relaxed) + 1)
        }
    }

    #[test]
    fn agent_feeds_sinks_and_drops_for_slow_ones() {
        let source = Arc::new(Ticking {
            t: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let fast = FnSink::new("fast", move |s: &Sample| {
            let _ = tx.send(s.raw_of(FeatureId::GuestOpsRate));
        });
        let slow = FnSink::new("slow", |_: &Sample| {
            thread::sleep(Duration::from_millis(40));
        });
        let config = AgentConfig {
            interval: Duration::from_millis(2),
            sink_queue: 2,
        };
        let agent = Agent::start(source, config, vec![Box::new(fast), Box::new(slow)])
            .expect("agent starts");
        // Wait (bounded) until the slow sink has lagged; a loaded host only makes it slower.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let st = agent.stats();
            if st.sampler.samples >= 20 && st.sinks[1].dropped > 0 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(agent.latest().is_some());
        let stats = agent.stop().expect("clean stop");
        let fast_values: Vec<f64> = rx.try_iter().collect();
        // Sampling went on at its own pace while the slow sink lagged.
        assert!(stats.sampler.samples >= 20, "{stats:?}");
        assert_eq!(stats.snapshots, stats.sampler.samples + 1);
        let (f, s) = (&stats.sinks[0], &stats.sinks[1]);
        assert_eq!(f.name, "fast");
        assert_eq!(f.queued + f.dropped, stats.sampler.samples);
        assert_eq!(f.consumed, f.queued);
        assert_eq!(fast_values.len() as u64, f.consumed);
        assert!(fast_values.iter().all(|v| close(*v, 5000.0)));
        assert_eq!(s.name, "slow");
        assert!(s.dropped > 0, "{s:?}");
        assert_eq!(s.queued + s.dropped, stats.sampler.samples);
        assert_eq!(s.consumed, s.queued);
    }

    #[test]
    fn agent_stops_promptly_and_rejects_bad_config() {
        let source = Arc::new(Ticking {
            t: AtomicU64::new(0),
        });
        let finished = Arc::new(AtomicU64::new(0));
        struct Finishing(Arc<AtomicU64>);
        impl Sink for Finishing {
            fn name(&self) -> &str {
                "finishing"
            }
            fn accept(&mut self, _: &Arc<Sample>) {}
            fn finish(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let config = AgentConfig {
            interval: Duration::from_secs(3600),
            ..AgentConfig::default()
        };
        let agent = Agent::start(
            source.clone(),
            config,
            vec![Box::new(Finishing(finished.clone()))],
        )
        .expect("agent starts");
        let t0 = Instant::now();
        let stats = agent.stop().expect("clean stop");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(stats.snapshots, 1);
        assert_eq!(stats.sampler.samples, 0);
        assert_eq!(finished.load(Ordering::Relaxed), 1);

        let too_fast = AgentConfig {
            interval: Duration::from_micros(500),
            ..AgentConfig::default()
        };
        assert!(matches!(
            Agent::start(source.clone(), too_fast, vec![]),
            Err(AgentError::IntervalTooShort(_))
        ));
        let no_queue = AgentConfig {
            sink_queue: 0,
            ..AgentConfig::default()
        };
        assert!(matches!(
            Agent::start(source, no_queue, vec![]),
            Err(AgentError::ZeroSinkQueue)
        ));
    }

    #[test]
    fn latest_sample_sink_keeps_the_newest() {
        let mut latest = LatestSample::new();
        assert!(latest.get().is_none());
        let mut s = Sampler::new();
        let a = Arc::new(s.sample(&snapshot_at(1), &snapshot_at(2)));
        let b = Arc::new(s.sample(&snapshot_at(2), &snapshot_at(4)));
        latest.accept(&a);
        latest.accept(&b);
        assert_eq!(latest.get().map(|x| x.at_ns), Some(4_000_000_000));
        assert_eq!(latest.name(), "latest");
    }
}
