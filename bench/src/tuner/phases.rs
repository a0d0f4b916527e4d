//! The `phased` test kernel's output: its phase lines and when each kind of phase ran.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One phase of the kernel's schedule (its `phased: phase` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpan {
    /// `cpu`, `io` or `idle`.
    pub kind: String,
    /// Start, ms since the kernel started.
    pub at_ms: u64,
    /// Planned length in ms.
    pub ms: u64,
}

/// What the kernel printed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelOutput {
    /// The phases, in order.
    pub phases: Vec<PhaseSpan>,
    /// Total ops of the `done` line.
    pub done_ops: Option<u64>,
    /// Elapsed ms of the `done` line.
    pub done_ms: Option<u64>,
}

/// Parses the `phased:` lines of a serial log (other lines are ignored).
pub fn parse_kernel_output(text: &str) -> KernelOutput {
    let mut out = KernelOutput::default();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("phased: ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let value = |key: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        match words.first() {
            Some(&"phase") if words.len() >= 3 => {
                if let (Some(at_ms), Some(ms)) = (value("at_ms"), value("ms")) {
                    out.phases.push(PhaseSpan {
                        kind: words[2].to_string(),
                        at_ms,
                        ms,
                    });
                }
            }
            Some(&"done") => {
                out.done_ops = value("ops");
                out.done_ms = value("ms");
            }
            _ => {}
        }
    }
    out
}

/// Milliseconds of each phase kind in `phases`.
pub fn kind_ms(phases: &[PhaseSpan]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for p in phases {
        *m.entry(p.kind.clone()).or_insert(0) += p.ms;
    }
    m
}

/// The phase kind at `t_ms` (ms since the kernel started), if inside one.
pub fn phase_at(phases: &[PhaseSpan], t_ms: f64) -> Option<&PhaseSpan> {
    phases
        .iter()
        .find(|p| t_ms >= p.at_ms as f64 && t_ms < (p.at_ms + p.ms) as f64)
}
