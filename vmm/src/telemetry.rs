//! Starting and stopping the tuner's eyes for one VM: the performance monitoring agent
//! (sampling every `metrics_interval_ms`), the state repository it writes to
//! (`state_db`), and the Prometheus endpoint (`metrics_addr`). All optional; nothing runs
//! unless one of `state_db` or `metrics_addr` is set.

use std::sync::Arc;
use std::time::Duration;

use tuner::agent::{Agent, AgentConfig, Sink};
use tuner::counters::CounterSource;
use tuner::prometheus::{MetricsServer, SeriesLabels, ServerLimits};
use tuner::state_repo::{RepoConfig, StateRepo};

use crate::config::{ConfigError, VmConfig};
use crate::runtime::VmRuntime;

/// The running telemetry of one VM.
#[derive(Default)]
pub struct Telemetry {
    agent: Option<Agent>,
    repo: Option<StateRepo>,
    server: Option<MetricsServer>,
    watchdog: Option<tuner::manager::WatchdogHandle>,
}

/// A JSON summary of the configuration in force, stored with every row.
/// What the state repository records of the VM's configuration with every row: what a
/// learner needs to rebuild the action space (drives, network devices) and to know the
/// reward (the effective weights), and the static settings.
fn config_json(cfg: &VmConfig) -> String {
    serde_json::json!({
        "vcpus": cfg.vcpus,
        "active_vcpus": cfg.start_vcpus(),
        "mem_mib": cfg.mem_mib,
        "drives": cfg.drives.iter().map(|d| serde_json::json!({
            "path": d.path, "read_only": d.read_only, "rate_limiter": d.rate_limiter,
            "priority": d.priority, "rate_level": d.rate_level,
        })).collect::<Vec<_>>(),
        "network": cfg.network.iter().map(|n| serde_json::json!({
            "tap": n.tap, "rate_limiter": n.rate_limiter,
        })).collect::<Vec<_>>(),
        "reward_weights": cfg.reward_weights.unwrap_or_default(),
        "slo": cfg.slo,
    })
    .to_string()
}

impl Telemetry {
    /// Starts what `cfg` asks for.
    pub fn start(cfg: &VmConfig, runtime: Arc<VmRuntime>) -> Result<Self, ConfigError> {
        let mut t = Telemetry::default();
        let tuning = cfg.tuner_on();
        // An SLO is measured every interval (its attainment is in GET /vm).
        if cfg.state_db.is_none() && cfg.metrics_addr.is_none() && !tuning && cfg.slo.is_none() {
            return Ok(t);
        }
        let api_view = runtime.clone();
        let source: Arc<dyn CounterSource> = runtime.clone();
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let mut policy_slot = None;
        if let Some(location) = &cfg.state_db {
            let repo = StateRepo::open_at(location, RepoConfig::default())
                .map_err(|e| ConfigError::new("state_db", format!("{location}: {e}")))?;
            api_view.set_repo_stats(repo.writer());
            let sink = repo.sink(&cfg.vm_id, "static", &config_json(cfg));
            policy_slot = Some(sink.policy_handle());
            sinks.push(Box::new(sink));
            t.repo = Some(repo);
        }
        let writer = t.repo.as_ref().map(|r| r.writer());
        // The tuner is the control loop's decide-and-apply step, on the sampling thread
        // (no queue in front of it); the other sinks are slow readers.
        let mut control: Option<Box<dyn Sink>> = None;
        if let Some(parts) = crate::tuning::build(cfg, runtime, writer, policy_slot)? {
            control = Some(Box::new(parts.tuner));
            t.watchdog = Some(parts.watchdog);
        }
        let agent = Agent::start_loop(
            source.clone(),
            AgentConfig {
                interval: Duration::from_millis(cfg.metrics_interval_ms),
                ..AgentConfig::default()
            },
            control,
            sinks,
        )
        .map_err(|e| ConfigError::new("metrics_interval_ms", e.to_string()))?;
        api_view.set_latest_sample(agent.latest_handle());
        if let Some(addr) = &cfg.metrics_addr {
            let labels = SeriesLabels {
                vm: cfg.vm_id.clone(),
                host: host_name(),
            };
            let server = MetricsServer::start_with(
                addr.as_str(),
                source,
                Some(agent.latest_handle()),
                ServerLimits::default(),
                labels,
            )
            .map_err(|e| ConfigError::new("metrics_addr", e.to_string()))?;
            t.server = Some(server);
        }
        t.agent = Some(agent);
        Ok(t)
    }

    /// Leaves the endpoint to the process exit, stops the agent (its sinks drain), then closes the repository
    /// (its last rows are committed).
    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            // Its threads see the stop flag within a tenth of a second (no wake-up
            // connection, which the main thread's filter would forbid).
            if let Err(e) = s.stop() {
                log::warn!("metrics server: {e}");
            }
        }
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
        if let Some(a) = self.agent.take() {
            match a.stop() {
                Ok(stats) => log::info!("telemetry agent: {stats:?}"),
                Err(e) => log::warn!("telemetry agent: {e}"),
            }
        }
        if let Some(r) = self.repo.take() {
            match r.close() {
                Ok(stats) => log::info!("state repository: {stats:?}"),
                Err(e) => log::warn!("state repository: {e}"),
            }
        }
    }
}

/// This host's name (`gethostname`), for the `host` label of the metrics; empty when it
/// cannot be read. Read on the main thread before any filter goes on.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
