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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::model::{Payment, PaymentStatus, PaymentsConfig};
use super::repo::rows::EventFields;
use super::shop::batch::{PurchaseAttachment, Purchases};
use crate::accounts::{Status as AccountStatus, Tier};
use crate::kernel::error::{Error, Result};
use crate::ledger::engine::hook::{Admit, BatchHook, Conn, HookBatch, Ticket};
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

/// What a ledger command carries for this hook: a wallet send or a live-stream purchase.
#[derive(Clone)]
pub(crate) enum Attachment {
    Send(SendAttachment),
    Purchase(PurchaseAttachment),
}

/// Registered with the engine at startup. Keeps the sends and purchases whose entries
/// are in the engine's hands, by ticket: at most one per command queued or in a batch,
/// so as many as the engine's queue and batches hold.
pub struct PaymentsHook {
    config: Arc<PaymentsConfig>,
    sends: Mutex<HashMap<u64, Attachment>>,
    next_ticket: AtomicU64,
}

impl PaymentsHook {
    pub fn new(config: Arc<PaymentsConfig>) -> Self {
        PaymentsHook { config, sends: Mutex::new(HashMap::new()), next_ticket: AtomicU64::new(1) }
    }

    /// Keeps `send` until the engine releases its ticket.
    pub(crate) fn register(&self, send: SendAttachment) -> Ticket {
        self.keep(Attachment::Send(send))
    }

    /// Keeps `purchase` until the engine releases its ticket.
    pub(crate) fn register_purchase(&self, purchase: PurchaseAttachment) -> Ticket {
        self.keep(Attachment::Purchase(purchase))
    }

    fn keep(&self, attachment: Attachment) -> Ticket {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.sends.lock().unwrap_or_else(|e| e.into_inner()).insert(ticket, attachment);
        Ticket(ticket)
    }

    /// How many sends the engine holds tickets of (for tests).
    pub fn held(&self) -> usize {
        self.sends.lock().unwrap_or_else(|e| e.into_inner()).len()
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
    Recorded(crate::kernel::ids::PaymentId),
    /// Refused without a row: later duplicates get the same error.
    Refused(Error),
}

struct Batch {
    config: Arc<PaymentsConfig>,
    /// Command index in the batch -> its send (a copy: the batch may be run again).
    sends: HashMap<usize, SendAttachment>,
    /// Commands whose ticket this hook no longer holds: answered, never decided.
    lost: Vec<usize>,
    existing: HashMap<(String, String), Existing>,
    users: HashMap<String, (Tier, AccountStatus)>,
    /// (sender, currency) -> amount sent in the window, including this batch so far.
    sent: HashMap<(String, String), i64>,
    firsts: HashMap<(String, String), (String, First)>,
    /// The payments to write: the command they belong to, and the row as decided.
    rows: Vec<(usize, Payment)>,
    /// The batch's live-stream purchases.
    purchases: Purchases,
    /// The batch's clock reading, for the listings' start and end times.
    now_us: i64,
}

#[async_trait]
impl BatchHook for PaymentsHook {
    async fn prepare(
        &self,
        conn: &mut Conn<'_>,
        attached: &[(usize, Ticket)],
        now_us: i64,
    ) -> std::result::Result<Box<dyn HookBatch>, sqlx::Error> {
        let mut sends = HashMap::with_capacity(attached.len());
        let mut purchases = HashMap::new();
        let mut lost = Vec::new();
        {
            let held = self.sends.lock().unwrap_or_else(|e| e.into_inner());
            for (i, Ticket(t)) in attached {
                match held.get(t) {
                    Some(Attachment::Send(s)) => {
                        sends.insert(*i, s.clone());
                    }
                    Some(Attachment::Purchase(p)) => {
                        purchases.insert(*i, p.clone());
                    }
                    None => lost.push(*i),
                }
            }
        }
        let mut purchases = Purchases::new(purchases);
        let mut keys: Vec<(&str, &str)> =
            sends.values().map(|s| (s.payment.sender_id.as_str(), s.idempotency_key.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut users: Vec<&str> = sends
            .values()
            .flat_map(|s| [s.payment.sender_id.as_str(), s.payment.recipient_id.as_str()])
            .chain(purchases.buyers_and_sellers())
            .collect();
        users.sort_unstable();
        users.dedup();
        let mut senders: Vec<&str> =
            sends.values().map(|s| s.payment.sender_id.as_str()).chain(purchases.buyers()).collect();
        senders.sort_unstable();
        senders.dedup();
        let since = super::spend::window_start(now_us);

        let shop_keys = purchases.shop_keys();
        let (existing, accounts, sums, shop_rows) = match conn {
            Conn::Postgres(c) => pg::prepare(c, &keys, &users, &senders, since, &shop_keys).await?,
            Conn::Sqlite(c) => sqlite::prepare(c, &keys, &users, &senders, since, &shop_keys).await?,
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
        if !purchases.is_empty() {
            let prepared = super::repo::shop::PurchasesPrepared::from_rows(shop_rows)?;
            let tab_ids = purchases.tab_ids();
            let tabs = if tab_ids.is_empty() {
                HashMap::new()
            } else {
                super::repo::tabs::prepare_tabs(conn, &tab_ids).await?
            };
            purchases.prepared(prepared, tabs);
        }
        Ok(Box::new(Batch {
            config: self.config.clone(),
            sends,
            lost,
            existing,
            users,
            sent,
            firsts: HashMap::new(),
            rows: Vec::new(),
            purchases,
            now_us,
        }))
    }

    fn release(&self, tickets: &[Ticket]) {
        let mut held = self.sends.lock().unwrap_or_else(|e| e.into_inner());
        for Ticket(t) in tickets {
            held.remove(t);
        }
    }
}

/// The key of `Batch::sent`: the sender and the payment's currency.
fn spend_key(p: &Payment) -> (String, String) {
    (p.sender_id.to_string(), p.currency().code().to_owned())
}

impl Batch {
    /// The payment's own rules, under the batch's locks.
    fn rules(&self, s: &SendAttachment) -> Result<()> {
        let p = &s.payment;
        let (tier, status) = self
            .users
            .get(p.sender_id.as_str())
            .copied()
            .ok_or_else(|| Error::internal(anyhow::anyhow!("sender account {} missing", p.sender_id)))?;
        let recipient = self
            .users
            .get(p.recipient_id.as_str())
            .map(|(_, status)| *status)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("recipient account {} missing", p.recipient_id)))?;
        let sent = self.sent.get(&spend_key(p)).copied().unwrap_or(0);
        super::model::check_send_rules(status, recipient, self.config.limits(tier), p.amount, sent)?;
        Ok(())
    }
}

#[async_trait]
impl HookBatch for Batch {
    fn admit(&mut self, cmd: usize) -> Admit {
        if self.lost.contains(&cmd) {
            // Never moves money without its payment row.
            return Admit::Answer(Box::new(Err(Error::internal(anyhow::anyhow!(
                "the send of this transfer is no longer held"
            )))));
        }
        if self.purchases.contains(cmd) {
            return match self.purchases.admit(cmd, &self.config, &self.users, &self.sent, self.now_us) {
                None => Admit::Proceed,
                Some(answer) => Admit::Answer(Box::new(answer)),
            };
        }
        let Some(s) = self.sends.get(&cmd) else { return Admit::Proceed };
        let id = (s.payment.sender_id.to_string(), s.idempotency_key.clone());
        if let Some((hash, first)) = self.firsts.get(&id) {
            return Admit::Answer(Box::new(match first {
                _ if *hash != s.request_hash => Err(super::key_reused(&s.idempotency_key)),
                First::Recorded(payment_id) => Ok(Outcome::Replayed(payment_id.to_string())),
                First::Refused(e) => Err(e.duplicate()),
            }));
        }
        if let Some(e) = self.existing.get(&id) {
            return Admit::Answer(Box::new(if e.request_hash == s.request_hash {
                Ok(Outcome::Replayed(e.payment_id.clone()))
            } else {
                Err(super::key_reused(&s.idempotency_key))
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
        if self.purchases.contains(cmd) {
            self.purchases.decided(cmd, result, &mut self.sent);
            return;
        }
        let Some(s) = self.sends.get(&cmd) else { return };
        let id = (s.payment.sender_id.to_string(), s.idempotency_key.clone());
        let first = match result {
            Ok(_) => {
                let mut p = s.payment.clone();
                p.status = PaymentStatus::Settled;
                *self.sent.entry(spend_key(&p)).or_insert(0) += p.amount.minor();
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
                p.failure_reason = reason.as_str().to_owned();
                p.failure_message = message.clone();
                let recorded = First::Recorded(p.payment_id.clone());
                self.rows.push((cmd, p));
                recorded
            }
            Err(e) => First::Refused(e.duplicate()),
        };
        self.firsts.insert(id, (s.request_hash.clone(), first));
    }

    async fn write_rows(&mut self, conn: &mut Conn<'_>, now_us: i64) -> std::result::Result<(), sqlx::Error> {
        self.settle(now_us);
        let (rows, spent) = self.rows_and_spend();
        let shop = self.purchases.rows();
        if !rows.is_empty() || !spent.is_empty() || !shop.purchases.is_empty() {
            match conn {
                Conn::Postgres(c) => pg::write_rows(c, &rows, &spent, &shop, now_us).await?,
                // One writer holds the whole database, so nothing is gained by numbering
                // the events later: they go with the rows.
                Conn::Sqlite(c) => sqlite::write_all(c, &rows, &spent, &self.events(), &shop, now_us).await?,
            }
        }
        let tab_spend = self.purchases.tab_spend();
        if !tab_spend.is_empty() {
            super::repo::tabs::write_tab_spend(conn, &tab_spend).await?;
        }
        Ok(())
    }

    async fn write_numbered(&mut self, conn: &mut Conn<'_>, now_us: i64) -> std::result::Result<(), sqlx::Error> {
        let Conn::Postgres(c) = conn else { return Ok(()) };
        let events = self.events();
        if events.is_empty() {
            return Ok(());
        }
        pg::write_events(c, &events, now_us).await
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
            let bucket = (p.sender_id.as_str(), p.currency().code(), super::spend::hour_of(p.created_at_us));
            *spent.entry(bucket).or_insert(0) += p.amount.minor();
        }
        // Purchases count toward the buyer's rolling limit as sends do.
        for (buyer, currency, hour, amount) in self.purchases.spend() {
            *spent.entry((buyer, currency, hour)).or_insert(0) += amount;
        }
        let mut spent: Vec<BatchSpend<'_>> = spent.into_iter().collect();
        spent.sort_unstable();
        (rows, spent)
    }
}

impl Batch {
    /// The outbox events of the payments written: the thread shows each payment appear
    /// and then settle (or fail), as it does for a card payment whose steps take longer.
    /// One event per payment: a wallet payment is created and settled (or fails) in this
    /// one commit, so it has one state change to announce, not a `payment.created`
    /// nobody could observe on its own.
    fn events(&self) -> Vec<EventFields> {
        let mut events = Vec::with_capacity(self.rows.len());
        for (cmd, p) in &self.rows {
            if !self.sends.contains_key(cmd) {
                continue;
            }
            events.push(EventFields::payment(
                if p.status == PaymentStatus::Settled { "payment.settled" } else { "payment.failed" },
                p,
            ));
        }
        events.extend(self.purchases.events());
        events
    }
}

use super::repo::{pg, sqlite, BatchPayment, BatchSpend};

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lost: Vec<usize>) -> Batch {
        Batch {
            config: Arc::new(PaymentsConfig::default()),
            sends: HashMap::new(),
            lost,
            existing: HashMap::new(),
            users: HashMap::new(),
            sent: HashMap::new(),
            firsts: HashMap::new(),
            rows: Vec::new(),
            purchases: Purchases::default(),
            now_us: 0,
        }
    }

    #[test]
    fn a_transfer_whose_send_is_no_longer_held_is_refused_not_decided() {
        let mut b = batch(vec![1]);
        assert!(matches!(b.admit(0), Admit::Proceed), "a command without a ticket is the ledger's own");
        match b.admit(1) {
            Admit::Answer(answer) => assert!(matches!(*answer, Err(Error::Internal(_)))),
            Admit::Proceed => panic!("money would move without its payment row"),
        }
    }

    #[test]
    fn tickets_are_held_until_released() {
        let hook = PaymentsHook::new(Arc::new(PaymentsConfig::default()));
        let usd = |minor| {
            crate::kernel::money::Money::from_minor(crate::kernel::money::Currency::from_code("USD").unwrap(), minor)
        };
        let user = |id: &str| crate::kernel::ids::UserId::parse("user", id).unwrap();
        let send = |id: &str| SendAttachment {
            payment: Payment {
                payment_id: crate::kernel::ids::PaymentId::parse("payment_id", id).unwrap(),
                sender_id: user("alice"),
                recipient_id: user("bob"),
                amount: usd(100),
                wallet_amount: usd(100),
                card_amount: usd(0),
                fee_amount: usd(0),
                refunded_amount: usd(0),
                status: PaymentStatus::Pending,
                funding_source: super::super::FundingSource::Balance,
                payment_method_token: None,
                note: String::new(),
                conversation_id: String::new(),
                message_id: String::new(),
                request_id: None,
                failure_reason: String::new(),
                failure_message: String::new(),
                authorization_ref: None,
                capture_ref: None,
                created_at_us: 0,
                settled_at_us: None,
                dispute_status: crate::payments::model::DisputeStatus::Undisputed,
            },
            idempotency_key: id.into(),
            request_hash: String::new(),
            fallback_on_insufficient: false,
        };
        let a = hook.register(send("a"));
        let b = hook.register(send("b"));
        assert_ne!(a, b);
        assert_eq!(hook.held(), 2);
        hook.release(&[a]);
        assert_eq!(hook.held(), 1);
        hook.release(&[a, b]);
        assert_eq!(hook.held(), 0, "releasing twice is harmless");
    }
}
