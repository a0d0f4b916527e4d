//! The benchmark's errors.

use std::io;
use std::path::PathBuf;

use crate::bare::BareError;
use crate::pvh::PvhError;

/// Why a benchmark could not produce its figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A program the benchmark needs is not where it should be.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// A child process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// A run did not end in time and was killed.
    #[error("{what} did not finish within {secs} s and was killed")]
    Timeout {
        /// What was running.
        what: String,
        /// The limit.
        secs: u64,
    },
    /// A guest or a child process did not behave as the benchmark expects.
    #[error("{0}")]
    Unexpected(String),
    /// The bare KVM loop failed.
    #[error("bare KVM loop: {0}")]
    Bare(#[from] BareError),
    /// A kernel could not be wrapped for QEMU.
    #[error("PVH wrapper: {0}")]
    Pvh(#[from] PvhError),
    /// Results could not be (de)serialised.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The multi-tenant plots could not be drawn.
    #[error("host plots: {0}")]
    HostPlot(#[from] crate::host_plot::HostPlotError),
}

impl BenchError {
    /// An [`BenchError::Io`] error with a description of what failed.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }
}
