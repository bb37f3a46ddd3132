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
//! 4. write the hook's own rows (payments, limit buckets);
//! 5. take a contiguous block of the gap-free sequence (one row), write postings,
//!    entries, one net balance update per account and the hook's numbered rows (outbox
//!    events) with set-based statements (one on PostgreSQL), and delete the keys of
//!    rejected commands; commit.
//!
//! Lock order is always keys, then balance rows, then the hook's rows, then the
//! sequence row, then the hook's counter, in every process, so there is no cycle. If the
//! database refuses a batch (a trigger or constraint, which would mean a bug the code
//! checks missed), each command is retried alone so only the culprit fails (`batch`
//! runs one batch from its commands to their answers). Shutdown
//! stops intake and drains the queue (`Intake` says how the next batch is gathered).
//! On SQLite the one worker runs on a thread of its own (`Engine::start` says why).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Mutex};

use super::batch::{process_batch, BatchContext};
use super::hook::{Attachment, BatchHook};
use super::intake::{InFlight, Intake};
use super::model::{Entry, Metadata, Posting};
use crate::error::{Error, Result};
use crate::store::Db;

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

/// A new entry whose postings are validated, resolved and balanced.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub kind: String,
    pub description: String,
    pub metadata: Metadata,
    pub postings: Vec<Posting>,
    /// `Some(seconds)` reserves the entry as pending with that timeout.
    pub pending_timeout_s: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Post the pending entry; `Some(minor)` posts part of a two-posting entry.
    Post(Option<i64>),
    Void,
    Expire,
}

#[derive(Debug, Clone)]
pub enum Op {
    Post(NewEntry),
    /// Resolve a pending entry (read beforehand, with its postings).
    Resolve {
        pending: Entry,
        action: Resolution,
    },
    /// Post the mirror of a posted entry (read beforehand).
    Reverse {
        original: Entry,
        description: String,
    },
}

/// A caller's idempotency key with the hash of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idem {
    pub key: String,
    pub operation: &'static str,
    pub request_hash: String,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The command was applied now.
    Created {
        entry: Box<Entry>,
        /// The batch's clock reading, which the batch hook's rows were stamped with (a
        /// payment's `settled_at`). The entry's own `created_at_us` is the later of it
        /// and the last batch's time (`batch::Committed`), so the two differ when a
        /// concurrent batch with a later clock took the sequence row first.
        batch_clock_us: i64,
    },
    /// The key was used before with the same request: this is the entry it produced.
    Replayed(String),
}

pub(crate) struct Command {
    pub caller: String,
    pub idem: Option<Idem>,
    pub op: Op,
    /// Another module's part of this command, handed to the engine's `BatchHook`.
    pub attachment: Option<Attachment>,
    pub(super) reply: oneshot::Sender<Result<Outcome>>,
}

impl Command {
    /// A command as `EngineHandle::submit_attached` makes it, for the intake's tests.
    #[cfg(test)]
    pub(crate) fn new(
        caller: String,
        idem: Option<Idem>,
        op: Op,
        attachment: Option<Attachment>,
        reply: oneshot::Sender<Result<Outcome>>,
    ) -> Self {
        Command { caller, idem, op, attachment, reply }
    }

    /// The accounts whose balance rows the command's batch locks.
    pub(crate) fn account_ids(&self) -> impl Iterator<Item = i64> + '_ {
        let postings = match &self.op {
            Op::Post(e) => &e.postings,
            Op::Resolve { pending, .. } => &pending.postings,
            Op::Reverse { original, .. } => &original.postings,
        };
        postings.iter().map(|p| p.account_id)
    }
}

/// Cheap to clone; every clone submits to the same queue.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    database: Arc<DatabaseState>,
    db: Db,
}

/// Whether the database answers, as last seen by the engine (a batch that got no answer
/// in time) and by the server's health probe (a ping). While it does not, commands are
/// refused at once with UNAVAILABLE instead of each waiting out a timeout behind the
/// one before: callers learn of an outage in microseconds and retry with their key.
#[derive(Debug)]
pub struct DatabaseState {
    reachable: std::sync::atomic::AtomicBool,
    /// The health probe's verdict alone (two missed pings in a row), for those who wait
    /// for it (`api::gate`): a single slow batch refuses ledger writes for a moment, but
    /// does not declare an outage.
    outage: tokio::sync::watch::Sender<bool>,
}

impl Default for DatabaseState {
    fn default() -> Self {
        DatabaseState {
            reachable: std::sync::atomic::AtomicBool::new(true),
            outage: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl DatabaseState {
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Set by the health probe after each ping, and by a batch that got no answer.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
    }

    /// Set by the health probe: whether it has declared the database unreachable.
    pub fn set_outage(&self, outage: bool) {
        self.outage.send_if_modified(|now| std::mem::replace(now, outage) != outage);
    }

    /// Sees every change of the probe's verdict (`true`: an outage).
    pub fn subscribe_outage(&self) -> tokio::sync::watch::Receiver<bool> {
        self.outage.subscribe()
    }
}

fn unreachable_error() -> Error {
    Error::Unavailable("the database is unreachable; retry with the same idempotency key".into())
}

/// What the engine has done since it started, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Batch transactions run (retries of a refused batch included).
    pub batches: AtomicU64,
    /// Commands taken from the queue.
    pub commands: AtomicU64,
    /// Time spent committing batches, microseconds, summed over workers.
    pub busy_us: AtomicU64,
}

impl EngineHandle {
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

    /// Submits a command with another module's attachment, which the engine's hook sees
    /// in the same batch transaction (see `hook`).
    pub async fn submit_attached(
        &self,
        caller: &str,
        idem: Option<Idem>,
        op: Op,
        attachment: Option<Attachment>,
    ) -> Result<Outcome> {
        if !self.database.reachable() {
            return Err(unreachable_error());
        }
        let (reply, rx) = oneshot::channel();
        let cmd = Command { caller: caller.to_owned(), idem, op, attachment, reply };
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::ResourceExhausted {
                reason: "LEDGER_QUEUE_FULL",
                message: "the ledger is at capacity; retry with the same idempotency key".into(),
            },
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable("the ledger is shutting down".into()),
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
    /// Starts the workers. `hook` is called for batches that carry attachments.
    pub fn start(
        db: Db,
        config: EngineConfig,
        hook: Option<Arc<dyn BatchHook>>,
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
        Ok((Engine { stop, done }, EngineHandle { tx, stats, database, db }))
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
}

impl Worker {
    async fn run(mut self) {
        loop {
            let (batch, accounts) = {
                // One worker gathers at a time, so batches stay as large as the load
                // allows; the others commit meanwhile.
                let intake = self.intake.clone();
                let mut intake = intake.lock().await;
                let Some(batch) = intake.gather(&self.config, &self.in_flight, &mut self.stop).await else { return };
                // Registered while the intake is held, before the next worker gathers.
                let accounts: Vec<i64> = batch.iter().flat_map(Command::account_ids).collect();
                self.in_flight.enter(&accounts);
                (batch, accounts)
            };
            let size = batch.len();
            let started = std::time::Instant::now();
            if self.database.reachable() {
                let ctx = BatchContext {
                    db: &self.db,
                    hook: self.hook.as_deref(),
                    timeout: self.config.batch_timeout,
                    database: &self.database,
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
            self.stats.busy_us.fetch_add(elapsed_us, Ordering::Relaxed);
            tracing::trace!(size, elapsed_us, "ledger batch");
            self.in_flight.leave(&accounts);
            // After the batch's callers have their answers.
            if let Db::Sqlite(pool) = &self.db {
                self.sqlite_wal.between_batches(pool).await;
            }
        }
    }
}
