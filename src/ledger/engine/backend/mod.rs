//! The batch transaction on each backend (`pg`, `sqlite`), and what it gives back.

pub(super) mod pg;
pub(super) mod sqlite;

use super::decide::Decision;

/// The outcome of one batch transaction: a decision per command of the plan.
/// The batch's decisions, and the time its entries were written with (`Committed`).
pub(crate) type BatchResult = std::result::Result<Committed, sqlx::Error>;

/// A committed batch: its decisions, and its entries' `created_at_us`. That time is
/// assigned under the journal's sequence row, as the later of the batch's clock reading
/// and the last batch's time, so entries' times never go backwards in sequence order
/// (two concurrent batches read the clock before either takes the row) and a time range
/// of the journal is a sequence range (`read::sequence_before`).
pub(crate) struct Committed {
    pub decisions: Vec<Decision>,
    pub created_at_us: i64,
}

/// A committed idempotency record.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct KeyRecord {
    pub caller: String,
    pub key: String,
    pub operation: String,
    pub request_hash: String,
    pub result_id: String,
}
