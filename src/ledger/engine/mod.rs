//! The posting engine: the single write path for every ledger entry.
//!
//! Callers submit commands to a bounded queue (full = RESOURCE_EXHAUSTED, never
//! unbounded memory). Workers take whatever is queued, up to `batch_size_max`, waiting at
//! most `commit_wait` for more, and commit the batch in one database transaction:
//!
//! 1. insert the idempotency keys (sorted), which also serializes concurrent duplicates
//!    across processes: the second waits for the first and then sees its key;
//! 2. lock the balance rows of every account in the batch, in ascending id order, so
//!    batches of any number of processes never deadlock;
//! 3. let the batch hook (payments) read what its rules need, under those locks, then
//!    decide each command on its own against the locked balances, in memory
//!    (`decide`): an overdraft rejects that command only, never its neighbours;
//! 4. let the hook write its own rows (payments, limit buckets) with its own statements;
//! 5. take a contiguous block of the gap-free sequence (one row), write postings,
//!    entries and one net balance update per account with set-based statements (one on
//!    PostgreSQL), let the hook write its numbered rows (outbox events), and delete the
//!    keys of rejected commands; commit.
//!
//! Lock order is always keys, then balance rows, then the hook's rows, then the
//! sequence row, then the hook's counter, in every process, so there is no cycle. If the
//! database refuses a batch (a trigger or constraint, which would mean a bug the code
//! checks missed), each command is retried alone so only the culprit fails (`batch`
//! runs one batch from its commands to their answers). Shutdown
//! stops intake and drains the queue (`Intake` says how the next batch is gathered).
//! On SQLite the one worker runs on a thread of its own (`Engine::start` says why).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Mutex};

pub(crate) mod backend;
mod batch;
pub(crate) mod command;
mod config;
pub(crate) mod decide;
mod health;
pub mod hook;
mod intake;

use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::kernel::reason::Reason;
use crate::store::Db;
use batch::{process_batch, BatchContext};
pub(crate) use command::Command;
pub use command::{Idem, NewEntry, Op, Outcome, Resolution};
pub use config::EngineConfig;
pub use health::DatabaseState;
use hook::{BatchHook, Ticket};
use intake::{InFlight, Intake};

/// Cheap to clone; every clone submits to the same queue.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    database: Arc<DatabaseState>,
    db: Db,
    clock: Clock,
    /// To hand back the ticket of a command refused before it was queued.
    hook: Option<Arc<dyn BatchHook>>,
}

fn unreachable_error() -> Error {
    Error::Unavailable("the database is unreachable; retry with the same idempotency key".into())
}

/// What the engine has done since it started; the counters live with the metrics that
/// report them.
pub use crate::telemetry::EngineStats;

impl EngineHandle {
    /// The clock the engine's batches read; the rest of the ledger stamps its rows with
    /// it too.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Where other ledger writes go so that they take turns with the engine's batches
    /// instead of racing them. On SQLite: the engine's own pool, whose one connection is
    /// handed out first come, first served; a write on another connection would poll
    /// for SQLite's write lock, which the engine holds nearly all the time under a burst,
    /// and wait for seconds (a live stream's first payments, which create the seller's
    /// wallet, waited 1.6 s). On PostgreSQL, `general`: row locks queue fairly there.
    pub fn writer<'a>(&'a self, general: &'a Db) -> &'a Db {
        match &self.db {
            Db::Sqlite(_) => &self.db,
            Db::Postgres(_) => general,
        }
    }

    pub async fn submit(&self, caller: &str, idem: Option<Idem>, op: Op) -> Result<Outcome> {
        self.submit_attached(caller, idem, op, None).await
    }

    /// Submits a command with the ticket of another module's part of it, which the
    /// engine's hook gets in the same batch transaction (see `hook`). The ticket goes
    /// back to the hook (`BatchHook::release`) when the command is answered, or at once
    /// when it is refused before it is queued.
    pub async fn submit_attached(
        &self,
        caller: &str,
        idem: Option<Idem>,
        op: Op,
        ticket: Option<Ticket>,
    ) -> Result<Outcome> {
        let refused = |e: Error| {
            if let (Some(hook), Some(ticket)) = (&self.hook, ticket) {
                hook.release(&[ticket]);
            }
            e
        };
        if !self.database.reachable() {
            return Err(refused(unreachable_error()));
        }
        let (reply, rx) = oneshot::channel();
        let cmd = Command { caller: caller.to_owned(), idem, op, ticket, reply };
        self.tx.try_send(cmd).map_err(|e| {
            refused(match e {
                mpsc::error::TrySendError::Full(_) => Error::ResourceExhausted {
                    reason: Reason::LedgerQueueFull,
                    message: "the ledger is at capacity; retry with the same idempotency key".into(),
                },
                mpsc::error::TrySendError::Closed(_) => Error::Unavailable("the ledger is shutting down".into()),
            })
        })?;
        rx.await.map_err(|_| Error::Unavailable("the ledger engine stopped".into()))?
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn database(&self) -> &Arc<DatabaseState> {
        &self.database
    }
}

/// The running engine; `shutdown` drains the queue and waits for the workers.
pub struct Engine {
    stop: watch::Sender<bool>,
    /// Fires when every worker has returned.
    done: oneshot::Receiver<()>,
}

impl Engine {
    /// Starts the workers. `hook` is called for batches that carry tickets.
    pub fn start(
        db: Db,
        config: EngineConfig,
        hook: Option<Arc<dyn BatchHook>>,
        clock: Clock,
    ) -> std::io::Result<(Engine, EngineHandle)> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(EngineStats::default());
        let database = Arc::new(DatabaseState::default());
        let intake = Arc::new(Mutex::new(Intake::new(rx)));
        let in_flight = Arc::new(InFlight::default());
        // SQLite has one write lock for the whole database: a second worker would only
        // wait for it, and SQLite waits by sleeping (milliseconds at a time), so on SQLite
        // the engine always runs one worker.
        let workers = match db {
            Db::Sqlite(_) => 1,
            Db::Postgres(_) => config.workers.max(1),
        };
        // On SQLite the one worker runs on a thread of its own: each batch is a handful
        // of calls to SQLite's thread, and under a burst a reply woken from outside the
        // runtime waits in its global queue behind the gRPC calls' tasks between every
        // two of them. On PostgreSQL the workers wait on sockets, which the shared
        // runtime serves as promptly as the rest.
        let runtime = match db {
            Db::Sqlite(_) => Some(tokio::runtime::Builder::new_current_thread().enable_all().build()?),
            Db::Postgres(_) => None,
        };
        let handles: Vec<tokio::task::JoinHandle<()>> = (0..workers)
            .map(|_| {
                let worker = Worker {
                    db: db.clone(),
                    config: config.clone(),
                    intake: intake.clone(),
                    in_flight: in_flight.clone(),
                    stop: stop_rx.clone(),
                    hook: hook.clone(),
                    stats: stats.clone(),
                    database: database.clone(),
                    sqlite_wal: crate::store::SqliteWal::default(),
                    clock: clock.clone(),
                };
                match &runtime {
                    Some(rt) => rt.spawn(worker.run()),
                    None => tokio::spawn(worker.run()),
                }
            })
            .collect();
        let (done_tx, done) = oneshot::channel();
        let all_done = async move {
            for h in handles {
                let _ = h.await;
            }
            let _ = done_tx.send(());
        };
        match runtime {
            Some(rt) => {
                std::thread::Builder::new().name("dmpay-ledger".into()).spawn(move || rt.block_on(all_done))?;
            }
            None => {
                tokio::spawn(all_done);
            }
        }
        Ok((Engine { stop, done }, EngineHandle { tx, stats, database, db, clock, hook }))
    }

    /// Refuses new commands, commits everything already queued, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

struct Worker {
    db: Db,
    config: EngineConfig,
    intake: Arc<Mutex<Intake>>,
    in_flight: Arc<InFlight>,
    stop: watch::Receiver<bool>,
    hook: Option<Arc<dyn BatchHook>>,
    stats: Arc<EngineStats>,
    database: Arc<DatabaseState>,
    sqlite_wal: crate::store::SqliteWal,
    clock: Clock,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let (batch, accounts, hot) = {
                // One worker gathers at a time, so batches stay as large as the load
                // allows; the others commit meanwhile.
                let intake = self.intake.clone();
                let mut intake = intake.lock().await;
                let Some(intake::Gathered { commands: batch, hot }) =
                    intake.gather(&self.config, &self.in_flight, &mut self.stop).await
                else {
                    return;
                };
                // Registered while the intake is held, before the next worker gathers.
                let accounts: Vec<i64> = batch.iter().flat_map(Command::account_ids).collect();
                self.in_flight.enter(&accounts);
                (batch, accounts, hot)
            };
            let size = batch.len();
            // Handed back to the hook once every command of the batch is answered.
            let tickets: Vec<Ticket> = batch.iter().filter_map(|c| c.ticket).collect();
            let started = std::time::Instant::now();
            if self.database.reachable() {
                let ctx = BatchContext {
                    db: &self.db,
                    hook: self.hook.as_deref(),
                    timeout: self.config.batch_timeout,
                    database: &self.database,
                    clock: &self.clock,
                };
                process_batch(&ctx, batch).await;
            } else {
                for cmd in batch {
                    let _ = cmd.reply.send(Err(unreachable_error()));
                }
            }
            let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.commands.fetch_add(size as u64, Ordering::Relaxed);
            if hot {
                self.stats.hot_batches.fetch_add(1, Ordering::Relaxed);
            }
            self.stats.busy_us.fetch_add(elapsed_us, Ordering::Relaxed);
            tracing::trace!(size, elapsed_us, "ledger batch");
            self.in_flight.leave(&accounts);
            if let (Some(hook), false) = (&self.hook, tickets.is_empty()) {
                hook.release(&tickets);
            }
            // After the batch's callers have their answers.
            if let Db::Sqlite(pool) = &self.db {
                self.sqlite_wal.between_batches(pool).await;
            }
        }
    }
}
