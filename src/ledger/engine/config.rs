//! The engine's settings.

use std::time::Duration;

/// Engine settings (`DMPAY_LEDGER_*`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most commands committed in one transaction.
    pub batch_size_max: usize,
    /// Longest wait for more commands once one is in hand.
    pub commit_wait: Duration,
    /// Commands waiting beyond this many are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Batches committed concurrently by this process.
    pub workers: usize,
    /// Longest a batch transaction may take on PostgreSQL before its connection is
    /// dropped and its callers hear UNAVAILABLE.
    pub batch_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_size_max: 256,
            commit_wait: Duration::from_micros(200),
            queue_capacity: 20_000,
            workers: 2,
            // Normal batches take milliseconds, the largest well under a second.
            batch_timeout: Duration::from_secs(2),
        }
    }
}
