//! How another module commits its own rows in the posting engine's batch transaction.
//!
//! A one-click payment is a ledger entry plus the payment row and its outbox events,
//! and all of it must commit together. Rather than a second transaction per payment
//! (whose commit and event-counter lock would serialize every payment), the payments
//! module attaches its part to the ledger command and registers a `BatchHook`: the
//! engine calls it inside the batch transaction, under the batch's account locks, so the
//! hook's checks (idempotency, frozen accounts, rolling limits) see the same state the
//! money moves against, and its rows commit with the entries, once per batch.
//!
//! The boundary is typed both ways. A command carries a `Ticket`, a number the hook gave
//! out for the part of the command it keeps itself (the engine never sees what it
//! stands for). The hook writes its own rows with its own statements on the batch's
//! connection (`Conn`): the engine hands it no SQL and takes none from it. Every ticket
//! of a batch is handed back (`release`) once the batch is answered, or at once when the
//! command never reached the queue.

use async_trait::async_trait;

use super::command::Outcome;
pub use super::command::Ticket;
use crate::kernel::error::{Error, Result};

/// The batch transaction's connection, on either backend.
pub enum Conn<'c> {
    Postgres(&'c mut sqlx::PgConnection),
    Sqlite(&'c mut sqlx::SqliteConnection),
}

/// The hook's say on a command, just before its ledger decision.
pub enum Admit {
    /// Decide the command's entry as usual.
    Proceed,
    /// Answer the command without a ledger decision (a replay, or a refusal by the
    /// hook's own rules). Nothing of the command is written.
    Answer(Box<Result<Outcome>>),
}

/// Registered once with the engine; called for every batch that carries tickets.
#[async_trait]
pub trait BatchHook: Send + Sync + 'static {
    /// Reads what the batch's decisions need. Called under the batch's account locks,
    /// before any decision, with the index of each ticketed command in the batch (again
    /// on each attempt, if the batch's transaction is run more than once).
    async fn prepare(
        &self,
        conn: &mut Conn<'_>,
        attached: &[(usize, Ticket)],
        now_us: i64,
    ) -> std::result::Result<Box<dyn HookBatch>, sqlx::Error>;

    /// The engine is done with these tickets: their commands were answered (or never
    /// queued). Called once per ticket handed to the engine.
    fn release(&self, tickets: &[Ticket]);
}

/// The hook's state for one batch transaction.
#[async_trait]
pub trait HookBatch: Send {
    /// Just before command `cmd`'s ledger decision, in batch order.
    fn admit(&mut self, cmd: usize) -> Admit;
    /// Right after it: accepted, or why the ledger refused it.
    fn decided(&mut self, cmd: usize, result: std::result::Result<(), &Error>);
    /// Writes the hook's rows that take no shared counter (its plain inserts and
    /// upserts), after the decisions and before the engine takes the journal's
    /// sequence row, which every batch needs: the work done while holding that row is
    /// what serializes batches. On SQLite, whose one writer holds the whole database,
    /// the hook writes all of its rows here.
    async fn write_rows(&mut self, conn: &mut Conn<'_>, now_us: i64) -> std::result::Result<(), sqlx::Error>;
    /// PostgreSQL: writes the hook's rows numbered by a shared counter (an outbox),
    /// right after the engine's journal statement, so the counter is always locked
    /// after the journal's sequence row (no two transactions take them in the other
    /// order). Nothing to do on SQLite.
    async fn write_numbered(&mut self, conn: &mut Conn<'_>, now_us: i64) -> std::result::Result<(), sqlx::Error>;
}
