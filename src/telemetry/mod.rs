//! Logs, metrics and the per-call log line.

mod call_log;
mod log_writer;
mod metrics;

use std::sync::OnceLock;

pub use call_log::{CallLogLayer, CallSlot};
pub use metrics::{serve_metrics, Metrics};

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// What the posting engine has done since it started, for metrics and benchmarks: the
/// engine adds to these, the metrics read them.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Batch transactions run (retries of a refused batch included).
    pub batches: std::sync::atomic::AtomicU64,
    /// Commands taken from the queue.
    pub commands: std::sync::atomic::AtomicU64,
    /// Batches whose first call touched a hot account (a live stream's or a flash
    /// sale's seller): each gathered calls until that account's batch in flight ended.
    pub hot_batches: std::sync::atomic::AtomicU64,
    /// Time spent committing batches, microseconds, summed over workers.
    pub busy_us: std::sync::atomic::AtomicU64,
}

/// What the payments' background resolver has done since the server started: the
/// resolver adds to these, the metrics read them.
#[derive(Debug, Default)]
pub struct ResolverStats {
    /// Passes finished. A pass runs every job once; a job that fails is logged and
    /// tried again at the next pass, so a pass finishes either way.
    pub passes: std::sync::atomic::AtomicU64,
}

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,h2=warn";

/// The buffered standard output every log line goes to.
static LOG_WRITER: OnceLock<log_writer::LogWriter> = OnceLock::new();

/// Writes out buffered log lines; call before the process exits.
pub fn flush_logs() {
    if let Some(w) = LOG_WRITER.get() {
        w.flush();
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter. Calling it
/// twice is harmless (tests start many servers in one process).
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, std::env::var("RUST_LOG").ok().as_deref());
}

/// Installs the global subscriber with `filter` (`RUST_LOG` syntax; the default when
/// `None` or invalid).
pub fn init_logging_with(format: LogFormat, filter: Option<&str>) {
    let filter = filter.and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let writer = LOG_WRITER.get_or_init(log_writer::LogWriter::stdout).clone();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
