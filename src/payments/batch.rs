//! The one-click send from the wallet, committed in the posting engine's batch.
//!
//! A wallet-funded `SendPayment` is one ledger command with this module's attachment:
//! the engine's batch transaction locks the two wallets, and under those locks this
//! hook checks the payment's rules (idempotency key, frozen accounts, the tier's
//! per-payment and rolling 24-hour limits, including what earlier payments of the same
//! batch already used), the engine decides the transfer, and this hook writes the
//! payment row and its outbox events. A batch of hundreds of payments so costs a
//! handful of statements and one commit, and the event counter row is advanced once
//! per batch instead of once per payment.
//!
//! The payment's idempotency record is the payment row itself (`UNIQUE (sender_id,
//! idempotency_key)`): a key already committed is found by `prepare` and answered as a
//! replay; a duplicate inside the batch follows the first; a concurrent duplicate in
//! another process makes this batch's insert fail on the unique index, and the engine
//! runs the batch again, which then finds the committed row.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::error::BoxDynError;
use sqlx::postgres::PgArguments;
use sqlx::sqlite::SqliteArguments;

use super::model::{Payment, PaymentStatus, PaymentsConfig};
use super::repo::rows::EventFields;
use crate::accounts::{Status as AccountStatus, Tier};
use crate::kernel::error::{Error, Result};
use crate::kernel::money::Money;
use crate::ledger::engine::hook::{Admit, BatchHook, Conn, HookBatch};
use crate::ledger::Outcome;

/// A wallet-funded send, attached to its transfer entry.
#[derive(Clone)]
pub(crate) struct SendAttachment {
    /// The payment as it is stored once settled (status and times are set by the hook).
    pub payment: Payment,
    pub idempotency_key: String,
    pub request_hash: String,
    /// AUTO funding: a wallet short of the amount is not a failed payment but a reason
    /// to charge the card; nothing is written and the caller takes the card path.
    pub fallback_on_insufficient: bool,
}

/// Registered with the engine at startup.
pub struct PaymentsHook {
    config: Arc<PaymentsConfig>,
}

impl PaymentsHook {
    pub fn new(config: Arc<PaymentsConfig>) -> Self {
        PaymentsHook { config }
    }
}

#[derive(Clone)]
struct Existing {
    payment_id: String,
    request_hash: String,
}

/// How the first command with a given key in this batch ended.
enum First {
    /// A payment row was (or will be) written: later duplicates replay it.
    Recorded(String),
    /// Refused without a row: later duplicates get the same error.
    Refused(Error),
}

struct Batch {
    config: Arc<PaymentsConfig>,
    /// Command index in the batch -> its attachment (a copy: the batch state outlives
    /// the borrow of the commands).
    sends: HashMap<usize, SendAttachment>,
    existing: HashMap<(String, String), Existing>,
    users: HashMap<String, (Tier, AccountStatus)>,
    /// (sender, currency) -> amount sent in the window, including this batch so far.
    sent: HashMap<(String, String), i64>,
    firsts: HashMap<(String, String), (String, First)>,
    /// The payments to write: the command they belong to, and the row as decided.
    rows: Vec<(usize, Payment)>,
}

fn key_reused(key: &str) -> Error {
    Error::AlreadyExists(format!("idempotency_key {key:?} was already used for a different payment"))
}

#[async_trait]
impl BatchHook for PaymentsHook {
    async fn prepare(
        &self,
        conn: &mut Conn<'_>,
        attached: &[(usize, &(dyn Any + Send + Sync))],
        now_us: i64,
    ) -> std::result::Result<Box<dyn HookBatch>, sqlx::Error> {
        let mut sends = HashMap::with_capacity(attached.len());
        for (i, a) in attached {
            if let Some(s) = a.downcast_ref::<SendAttachment>() {
                sends.insert(*i, s.clone());
            }
        }
        let mut keys: Vec<(&str, &str)> =
            sends.values().map(|s| (s.payment.sender_id.as_str(), s.idempotency_key.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut users: Vec<&str> =
            sends.values().flat_map(|s| [s.payment.sender_id.as_str(), s.payment.recipient_id.as_str()]).collect();
        users.sort_unstable();
        users.dedup();
        let mut senders: Vec<&str> = sends.values().map(|s| s.payment.sender_id.as_str()).collect();
        senders.sort_unstable();
        senders.dedup();
        let since = super::spend::window_start(now_us);

        let (existing, accounts, sums) = match conn {
            Conn::Postgres(c) => pg::prepare(c, &keys, &users, &senders, since).await?,
            Conn::Sqlite(c) => sqlite::prepare(c, &keys, &users, &senders, since).await?,
        };
        let existing = existing
            .into_iter()
            .map(|(s, k, payment_id, request_hash)| ((s, k), Existing { payment_id, request_hash }))
            .collect();
        let users = accounts
            .into_iter()
            .filter_map(|(u, tier, status)| {
                Some((u, (Tier::from_db(&tier).ok()?, AccountStatus::from_db(&status).ok()?)))
            })
            .collect();
        let sent = sums.into_iter().map(|(s, c, n)| ((s, c), n)).collect();
        Ok(Box::new(Batch {
            config: self.config.clone(),
            sends,
            existing,
            users,
            sent,
            firsts: HashMap::new(),
            rows: Vec::new(),
        }))
    }
}

impl Batch {
    /// The payment's own rules, under the batch's locks.
    fn rules(&self, s: &SendAttachment) -> Result<()> {
        let p = &s.payment;
        let (tier, status) = self
            .users
            .get(&p.sender_id)
            .copied()
            .ok_or_else(|| Error::internal(anyhow::anyhow!("sender account {} missing", p.sender_id)))?;
        let recipient = self
            .users
            .get(&p.recipient_id)
            .map(|(_, status)| *status)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("recipient account {} missing", p.recipient_id)))?;
        let amount = Money::from_minor(p.currency()?, p.amount);
        let sent = self.sent.get(&(p.sender_id.clone(), p.currency.clone())).copied().unwrap_or(0);
        super::model::check_send_rules(status, recipient, self.config.limits(tier), amount, sent)?;
        Ok(())
    }
}

impl HookBatch for Batch {
    fn admit(&mut self, cmd: usize) -> Admit {
        let Some(s) = self.sends.get(&cmd) else { return Admit::Proceed };
        let id = (s.payment.sender_id.clone(), s.idempotency_key.clone());
        if let Some((hash, first)) = self.firsts.get(&id) {
            return Admit::Answer(Box::new(match first {
                _ if *hash != s.request_hash => Err(key_reused(&s.idempotency_key)),
                First::Recorded(payment_id) => Ok(Outcome::Replayed(payment_id.clone())),
                First::Refused(e) => Err(e.duplicate()),
            }));
        }
        if let Some(e) = self.existing.get(&id) {
            return Admit::Answer(Box::new(if e.request_hash == s.request_hash {
                Ok(Outcome::Replayed(e.payment_id.clone()))
            } else {
                Err(key_reused(&s.idempotency_key))
            }));
        }
        match self.rules(s) {
            Ok(()) => Admit::Proceed,
            Err(e) => {
                self.firsts.insert(id, (s.request_hash.clone(), First::Refused(e.duplicate())));
                Admit::Answer(Box::new(Err(e)))
            }
        }
    }

    fn decided(&mut self, cmd: usize, result: std::result::Result<(), &Error>) {
        let Some(s) = self.sends.get(&cmd) else { return };
        let id = (s.payment.sender_id.clone(), s.idempotency_key.clone());
        let first = match result {
            Ok(_) => {
                let mut p = s.payment.clone();
                p.status = PaymentStatus::Settled;
                *self.sent.entry((p.sender_id.clone(), p.currency.clone())).or_insert(0) += p.amount;
                let recorded = First::Recorded(p.payment_id.clone());
                self.rows.push((cmd, p));
                recorded
            }
            // The wallet cannot cover it: the payment is recorded as failed, so a retry
            // with the same key replays the failure (AUTO funding takes the card
            // instead, and writes nothing here).
            Err(Error::FailedPrecondition { reason, message }) if !s.fallback_on_insufficient => {
                let mut p = s.payment.clone();
                p.status = PaymentStatus::Failed;
                p.failure_reason = (*reason).to_owned();
                p.failure_message = message.clone();
                let recorded = First::Recorded(p.payment_id.clone());
                self.rows.push((cmd, p));
                recorded
            }
            Err(e) => First::Refused(e.duplicate()),
        };
        self.firsts.insert(id, (s.request_hash.clone(), first));
    }

    fn write_steps(&mut self, args: &mut PgArguments, now_us: i64) -> std::result::Result<Option<String>, BoxDynError> {
        self.settle(now_us);
        let (rows, spent) = self.rows_and_spend();
        if rows.is_empty() {
            return Ok(None);
        }
        pg::write_steps(args, &rows, &spent, now_us).map(Some)
    }

    fn sqlite_steps(
        &mut self,
        args: &mut SqliteArguments<'static>,
        now_us: i64,
    ) -> std::result::Result<Option<String>, BoxDynError> {
        self.settle(now_us);
        let (rows, spent) = self.rows_and_spend();
        if rows.is_empty() {
            return Ok(None);
        }
        // One writer holds the whole database, so nothing is gained by numbering the
        // events later: they go with the rows.
        sqlite::steps(args, &rows, &spent, &self.events(), now_us).map(Some)
    }

    fn journal_steps(
        &mut self,
        args: &mut PgArguments,
        now_us: i64,
    ) -> std::result::Result<Option<String>, BoxDynError> {
        let events = self.events();
        if events.is_empty() {
            return Ok(None);
        }
        pg::journal_steps(args, &events, now_us).map(Some)
    }
}

impl Batch {
    /// Stamps the settled payments with the batch's commit time.
    fn settle(&mut self, now_us: i64) {
        for (_, p) in &mut self.rows {
            if p.status == PaymentStatus::Settled {
                p.settled_at_us = Some(now_us);
            }
        }
    }

    /// The payment rows to write, and one daily-limit bucket update per sender, currency
    /// and hour, sorted so that concurrent batches lock the bucket rows in one order.
    fn rows_and_spend(&self) -> (Vec<BatchPayment<'_>>, Vec<BatchSpend<'_>>) {
        let rows: Vec<BatchPayment<'_>> = self
            .rows
            .iter()
            .filter_map(|(cmd, p)| {
                self.sends.get(cmd).map(|s| (p, s.idempotency_key.as_str(), s.request_hash.as_str()))
            })
            .collect();
        let mut spent: HashMap<(&str, &str, i64), i64> = HashMap::new();
        for (p, _, _) in rows.iter().filter(|(p, _, _)| p.status == PaymentStatus::Settled) {
            *spent.entry((&p.sender_id, &p.currency, super::spend::hour_of(p.created_at_us))).or_insert(0) += p.amount;
        }
        let mut spent: Vec<BatchSpend<'_>> = spent.into_iter().collect();
        spent.sort_unstable();
        (rows, spent)
    }
}

impl Batch {
    /// The outbox events of the payments written: the thread shows each payment appear
    /// and then settle (or fail), as it does for a card payment whose steps take longer.
    fn events(&self) -> Vec<EventFields> {
        let mut events = Vec::with_capacity(self.rows.len() * 2);
        for (cmd, p) in &self.rows {
            if !self.sends.contains_key(cmd) {
                continue;
            }
            let created = Payment { status: PaymentStatus::Pending, settled_at_us: None, ..p.clone() };
            events.push(EventFields::payment("payment.created", &created));
            events.push(EventFields::payment(
                if p.status == PaymentStatus::Settled { "payment.settled" } else { "payment.failed" },
                p,
            ));
        }
        events
    }
}

use super::repo::{pg, sqlite, BatchPayment, BatchSpend};
