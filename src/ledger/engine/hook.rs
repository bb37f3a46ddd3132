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
//! The engine never looks inside an attachment; it hands the attachments of a batch to
//! the hook, which keeps its own per-batch state (`HookBatch`).

use std::any::Any;

use async_trait::async_trait;
use sqlx::error::BoxDynError;
use sqlx::postgres::PgArguments;
use sqlx::sqlite::SqliteArguments;

use super::command::Outcome;
use crate::kernel::error::{Error, Result};

/// The batch transaction's connection, on either backend.
pub enum Conn<'c> {
    Postgres(&'c mut sqlx::PgConnection),
    Sqlite(&'c mut sqlx::SqliteConnection),
}

pub use super::command::Attachment;

/// The hook's say on a command, just before its ledger decision.
pub enum Admit {
    /// Decide the command's entry as usual.
    Proceed,
    /// Answer the command without a ledger decision (a replay, or a refusal by the
    /// hook's own rules). Nothing of the command is written.
    Answer(Box<Result<Outcome>>),
}

/// Registered once with the engine; called for every batch that carries attachments.
#[async_trait]
pub trait BatchHook: Send + Sync + 'static {
    /// Reads what the batch's decisions need. Called under the batch's account locks,
    /// before any decision, with the index of each attached command in the batch.
    async fn prepare(
        &self,
        conn: &mut Conn<'_>,
        attached: &[(usize, &(dyn Any + Send + Sync))],
        now_us: i64,
    ) -> std::result::Result<Box<dyn HookBatch>, sqlx::Error>;
}

/// The hook's state for one batch transaction.
pub trait HookBatch: Send {
    /// Just before command `cmd`'s ledger decision, in batch order.
    fn admit(&mut self, cmd: usize) -> Admit;
    /// Right after it: accepted, or why the ledger refused it.
    fn decided(&mut self, cmd: usize, result: std::result::Result<(), &Error>);
    /// PostgreSQL: the hook's rows that take no shared counter (its plain inserts and
    /// upserts), as steps of one statement the engine sends before the journal
    /// statement, together with the batch's balance updates: the batch then holds the
    /// journal's sequence row, which every batch needs, for as short a time as possible.
    /// Parameters and steps as for `journal_steps`; `None` when it has nothing to write.
    /// On SQLite the hook writes everything in `sqlite_steps`.
    fn write_steps(&mut self, args: &mut PgArguments, now_us: i64) -> std::result::Result<Option<String>, BoxDynError>;
    /// SQLite: all of the hook's rows, as more statements of the engine's last call of
    /// the batch, which writes the entries and commits. SQLite runs on a thread of its
    /// own and every call is a hand-off to it and back, during which the database's one
    /// writer sits idle. The hook appends its parameters to `args` in the order of their
    /// positional `?` placeholders and returns its statements (`;`-separated, without a
    /// trailing one); `None` when it has nothing to write.
    fn sqlite_steps(
        &mut self,
        args: &mut SqliteArguments<'static>,
        now_us: i64,
    ) -> std::result::Result<Option<String>, BoxDynError>;
    /// PostgreSQL: the hook's rows numbered by a shared counter (an outbox), as more
    /// steps of the engine's journal statement, so they cost no round trip of their own
    /// while the batch holds the journal's sequence row, which serializes every batch.
    /// The hook appends its parameters to `args` and returns common table expressions
    /// (`hook_name AS (...)`, comma-separated, named `hook_*`) whose parameters are
    /// the ones it appended (`bind_step` appends one and names it); `None` when it has nothing to
    /// write. The statement takes the journal's sequence row first, so the hook's counter
    /// is always locked after it. On SQLite, whose one writer holds the whole database,
    /// the hook writes such rows in `sqlite_steps`.
    fn journal_steps(
        &mut self,
        args: &mut PgArguments,
        now_us: i64,
    ) -> std::result::Result<Option<String>, BoxDynError>;
}

/// Appends `value` to a journal statement's parameters (`HookBatch::journal_steps`) and
/// returns its placeholder, `$n`.
pub fn bind_step<'q, T>(args: &mut PgArguments, value: T) -> std::result::Result<String, BoxDynError>
where
    T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    sqlx::Arguments::add(args, value)?;
    Ok(format!("${}", sqlx::Arguments::len(args)))
}
