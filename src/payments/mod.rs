//! One-click DM payments: sends funded from the wallet, a card, or both, settled against
//! the ledger through the posting engine and charged only through the vault's processor
//! boundary.
//!
//! - `model`  payments, statuses, funding, limits, validation
//! - `card`   the card path of a send and the finishing of pending payments (claims,
//!   processor calls, the resolver's settle)
//! - `batch`  the wallet-funded send: rules, payment row and events committed in the
//!   posting engine's batch transaction (the live-stream hot path)
//! - `spend`  per-hour sums of what each sender sent, for the rolling 24-hour limit
//! - `store`  payment rows and the event outbox (state change and event in one
//!   transaction, gap-free event sequence)
//! - `disputes` chargebacks: booking, recovery by policy, decisions, debts
//! - `notifications` the processor's reports after its calls, applied in order
//! - `payout`  payouts, their statuses, limits and the instant fee
//! - `payouts` cash-out of wallet money to the user's card, and returns
//! - `listing` live shopping's listings and purchases, validated
//! - `shop`    live shopping: listings, purchases with exact stock in the engine's
//!   batch, the sellers' held proceeds, refunds
//! - `events` reading the outbox; `feed` the process's one reader that fans new events
//!   out to its watchers; `outbox` a publisher's cursor and lease (events on a broker)
//!
//! A send is a sequence of steps, each idempotent under a key derived from the payment
//! id (`pay:<id>:hold`, `:auth`, `:capture`, `:settle`, `:post_hold`, `:void_hold`), so
//! it can be resumed from any point: by the caller's retry, or by the resolver that
//! picks up payments left pending (a crash, or a processor outcome that was unknown).

pub mod batch;
mod card;
pub mod disputes;
pub mod events;
pub mod feed;
pub mod listing;
pub mod model;
mod notifications;
pub mod outbox;
pub mod payout;
pub mod payouts;
pub mod refunds;
pub(crate) mod repo;
pub mod requests;
pub mod shop;
pub mod spend;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use model::{FundingSource, Payment, PaymentStatus, PaymentsConfig};
pub use repo::Claim;
use repo::PaymentStore;

use crate::accounts::Accounts;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, RequestId, UserId};
use crate::kernel::money::Money;
use crate::kernel::page::Page;
use crate::kernel::reason::Reason;
use crate::ledger::{Direction, Ledger, NewEntry, Op, Outcome, Posting};
use crate::store::Db;
use crate::telemetry::ResolverStats;
use crate::vault::Vault;

/// The caller recorded on ledger entries and idempotency keys of payments.
const ACTOR: &str = crate::ledger::callers::PAYMENTS;
/// How often daily-limit buckets that left the window are deleted.
const SPEND_PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// `SendPayment` after wire parsing.
pub struct SendInput {
    pub idempotency_key: String,
    pub recipient: UserId,
    pub amount: Money,
    pub note: String,
    pub conversation_id: String,
    pub message_id: String,
    pub funding: FundingSource,
    pub payment_method_token: Option<String>,
    /// Set when this send pays a request.
    pub request_id: Option<RequestId>,
}

impl SendInput {
    /// The digest a retry with the same key must match: everything the caller chose.
    pub(crate) fn request_hash(&self) -> String {
        crate::ledger::hash_request(&serde_json::json!({
            "recipient": self.recipient.as_str(),
            "currency": self.amount.currency().code(),
            "amount": self.amount.minor(),
            "note": self.note,
            "conversation": self.conversation_id,
            "message": self.message_id,
            "funding": self.funding.as_str(),
            "token": self.payment_method_token,
            "request": self.request_id.as_ref().map(|r| r.as_str()),
        }))
    }
}

/// The answer to a key used before for a different payment.
pub(crate) fn key_reused(key: &str) -> Error {
    Error::AlreadyExists(format!("idempotency_key {key:?} was already used for a different payment"))
}

#[derive(Clone)]
pub struct Payments {
    store: Arc<PaymentStore>,
    ledger: Ledger,
    vault: Arc<Vault>,
    accounts: Accounts,
    config: Arc<PaymentsConfig>,
    hook: Arc<batch::PaymentsHook>,
    debtors: Arc<disputes::Debtors>,
    /// What a purchase needs of its listing before the batch, kept briefly.
    listings: Arc<shop::ListingCache>,
    resolver: Arc<ResolverStats>,
}

impl Payments {
    /// `hook` is the `batch::PaymentsHook` registered with `ledger`'s engine (wallet
    /// sends hand it their payment); `config` is shared with it.
    pub fn new(
        db: Db,
        ledger: Ledger,
        vault: Arc<Vault>,
        accounts: Accounts,
        config: Arc<PaymentsConfig>,
        hook: Arc<batch::PaymentsHook>,
    ) -> Self {
        Payments {
            store: Arc::new(PaymentStore::new(
                db.clone(),
                ledger.engine().writer(&db).clone(),
                ledger.engine().clock().clone(),
            )),
            ledger,
            vault,
            accounts,
            config,
            hook,
            debtors: Arc::new(disputes::Debtors::default()),
            listings: Arc::new(shop::ListingCache::default()),
            resolver: Arc::new(ResolverStats::default()),
        }
    }

    /// What the background resolver (`run_resolver`) has done, for the metrics.
    pub fn resolver_stats(&self) -> &Arc<ResolverStats> {
        &self.resolver
    }

    /// The hook registered with the engine, which holds the wallet sends in flight.
    pub fn hook(&self) -> &Arc<batch::PaymentsHook> {
        &self.hook
    }

    /// Replays a payment for a retry: the payment, or the error it failed with.
    pub(crate) fn replay(p: Payment) -> Result<Payment> {
        match p.failure() {
            Some(e) => Err(e),
            None => Ok(p),
        }
    }

    pub async fn send(&self, sender: &UserId, input: SendInput) -> Result<Payment> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        model::check_note("note", &input.note)?;
        model::check_opaque("conversation_id", &input.conversation_id)?;
        model::check_opaque("message_id", &input.message_id)?;
        let request_hash = input.request_hash();
        if &input.recipient == sender {
            return Err(Error::invalid("recipient_id", "you cannot pay yourself"));
        }
        if self.owes(sender) {
            // A retry of a send made before the debt still gets its answer.
            return match self.store.by_key(sender, &input.idempotency_key).await? {
                Some((existing, hash)) if hash == request_hash => Self::replay(existing),
                Some(_) => Err(key_reused(&input.idempotency_key)),
                None => Err(disputes::owing()),
            };
        }
        // From the wallet (BALANCE, and AUTO while the wallet covers the amount): one
        // command in the posting engine's batch, payment row and events included.
        if input.request_id.is_none() && input.payment_method_token.is_none() && input.funding != FundingSource::Card {
            if let Some(p) = self.send_from_wallet(sender, &input, &request_hash).await? {
                return Ok(p);
            }
        }
        let key = input.idempotency_key.clone();
        match self.send_with_card(sender, input, &request_hash).await {
            // A concurrent call with this key may have gone through between its lookup
            // and this refusal (using up the daily limit, say): answer as it did.
            Err(refusal @ (Error::FailedPrecondition { .. } | Error::ResourceExhausted { .. })) => {
                match self.store.by_key(sender, &key).await? {
                    Some((existing, hash)) if hash == request_hash => Self::replay(existing),
                    _ => Err(refusal),
                }
            }
            other => other,
        }
    }

    /// Creates the platform account of `user`, the authenticated caller, on first use.
    /// A read first: accounts usually exist, and on SQLite a write would take the
    /// database's one write lock from the posting engine.
    async fn ensure_user(&self, user: &UserId) -> Result<()> {
        if !self.accounts.exists(user).await? {
            self.accounts.ensure(user).await?;
        }
        Ok(())
    }

    /// Refuses a counterparty (`field`) that has no platform account, before anything is
    /// written. Accounts come from the platform (`Accounts.UpsertAccount`, when a user
    /// signs up) or from the user's own first call; a payment to a made-up name must not
    /// create an account, a wallet, a payment row or an event.
    pub(crate) async fn require_user(&self, field: &str, user: &UserId) -> Result<()> {
        if !self.accounts.exists(user).await? {
            return Err(Error::NotFound(format!("{field}: no user {user}")));
        }
        Ok(())
    }

    /// A send paid entirely from the sender's wallet, decided and committed in the
    /// engine's batch (`batch`). `None` when AUTO funding finds the wallet short: the
    /// caller then charges the card for the rest, and nothing was written.
    async fn send_from_wallet(
        &self,
        sender: &UserId,
        input: &SendInput,
        request_hash: &str,
    ) -> Result<Option<Payment>> {
        self.require_user("recipient_id", &input.recipient).await?;
        self.ensure_user(sender).await?;
        let currency = input.amount.currency();
        let from = self.ledger.accounts().wallet(sender, currency).await?;
        let to = self.ledger.accounts().wallet(&input.recipient, currency).await?;
        let payment = Payment {
            payment_id: PaymentId::generate(),
            sender_id: sender.clone(),
            recipient_id: input.recipient.clone(),
            amount: input.amount,
            wallet_amount: input.amount,
            card_amount: Money::zero(currency),
            fee_amount: Money::zero(currency),
            refunded_amount: Money::zero(currency),
            status: PaymentStatus::Pending,
            funding_source: input.funding,
            payment_method_token: None,
            note: input.note.clone(),
            conversation_id: input.conversation_id.clone(),
            message_id: input.message_id.clone(),
            request_id: None,
            failure_reason: String::new(),
            failure_message: String::new(),
            authorization_ref: None,
            capture_ref: None,
            created_at_us: self.now_us(),
            settled_at_us: None,
            dispute_status: crate::payments::model::DisputeStatus::Undisputed,
        };
        let postings = vec![
            Posting { account_id: from.id, account_code: from.code, direction: Direction::Debit, amount: input.amount },
            Posting { account_id: to.id, account_code: to.code, direction: Direction::Credit, amount: input.amount },
        ];
        crate::ledger::check_balanced("postings", &postings)?;
        let entry = NewEntry {
            kind: "dm_payment".into(),
            description: payment.note.clone(),
            metadata: Self::entry_metadata(&payment),
            postings,
            pending_timeout_s: None,
            locks: Vec::new(),
        };
        let attachment = batch::SendAttachment {
            payment: payment.clone(),
            idempotency_key: input.idempotency_key.clone(),
            request_hash: request_hash.to_owned(),
            fallback_on_insufficient: input.funding == FundingSource::Auto,
        };
        // The hook keeps the send until the engine hands its ticket back: the transfer
        // and the payment row commit in one batch transaction.
        let ticket = self.hook.register(attachment);
        let outcome = self.ledger.engine().submit_attached(ACTOR, None, Op::Post(entry), Some(ticket)).await;
        match outcome {
            Ok(Outcome::Created { batch_clock_us, .. }) => {
                self.store.notify();
                // The time the batch hook wrote into the payment row and its events,
                // so this answer, GetPayment and the thread's events agree.
                Ok(Some(Payment { status: PaymentStatus::Settled, settled_at_us: Some(batch_clock_us), ..payment }))
            }
            Ok(Outcome::Replayed(payment_id)) => {
                let p = self
                    .store
                    .get(&PaymentId::from_db(payment_id))
                    .await?
                    .ok_or_else(|| Error::not_found("payment"))?;
                Self::replay(p).map(Some)
            }
            Err(Error::FailedPrecondition { reason: Reason::InsufficientFunds, .. })
                if input.funding == FundingSource::Auto =>
            {
                Ok(None)
            }
            Err(e) => {
                if matches!(e, Error::FailedPrecondition { .. }) {
                    // A recorded failure: its row and events were written.
                    self.store.notify();
                }
                Err(e)
            }
        }
    }

    /// The metadata every entry of a payment carries.
    fn entry_metadata(payment: &Payment) -> BTreeMap<String, String> {
        [
            ("payment_id".to_string(), payment.payment_id.to_string()),
            ("conversation_id".to_string(), payment.conversation_id.clone()),
            ("message_id".to_string(), payment.message_id.clone()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect()
    }

    /// A payment the user took part in; others get NOT_FOUND, as for a missing one.
    pub async fn get(&self, user: &UserId, payment_id: &PaymentId) -> Result<Payment> {
        if payment_id.as_str().is_empty() {
            return Err(Error::invalid("payment_id", "required"));
        }
        match self.store.get(payment_id).await? {
            Some(p) if p.involves(user) => Ok(p),
            _ => Err(Error::NotFound(format!("payment {payment_id} not found"))),
        }
    }

    pub async fn list(
        &self,
        user: &UserId,
        conversation: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Payment>, Option<String>)> {
        model::check_opaque("conversation_id", conversation)?;
        let page = Page::parse(page_size, 50, 200, page_token, "pay_")?;
        let mut rows = self.store.list(user.as_str(), conversation, page.before.clone(), page.limit()).await?;
        let next = page.finish(&mut rows, |p| (p.created_at_us, p.payment_id.to_string()));
        Ok((rows, next))
    }

    /// Runs the resolver until the task is dropped.
    pub async fn run_resolver(self, interval: std::time::Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            // First, so a restarted process knows its debtors at once (the first tick is
            // immediate), and other replicas' debts within a tick.
            match self.collect_receivables().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(repaid = n, "repaid receivables from incoming money"),
                Err(e) => tracing::warn!(error = %e, "receivable collection failed; will retry"),
            }
            // Old daily-limit buckets go every few minutes: a purge is a write, and on
            // SQLite every write takes the lock the posting engine commits under.
            if last_purge.is_none_or(|t| t.elapsed() >= SPEND_PURGE_INTERVAL) {
                last_purge = Some(std::time::Instant::now());
                match repo::spend::purge(self.store.db(), self.now_us()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(deleted = n, "purged old daily-limit buckets"),
                    Err(e) => tracing::warn!(error = %e, "purging daily-limit buckets failed; will retry"),
                }
            }
            match self.resolve_pending().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(resolved = n, "resolved pending payments"),
                Err(e) => tracing::warn!(error = %e, "payment resolver failed; will retry"),
            }
            match self.expire_requests().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "expired payment requests"),
                Err(e) => tracing::warn!(error = %e, "request expiry failed; will retry"),
            }
            match self.resolve_refunds().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(resolved = n, "resolved pending refunds"),
                Err(e) => tracing::warn!(error = %e, "refund resolver failed; will retry"),
            }
            match self.resolve_payouts().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(resolved = n, "resolved pending payouts"),
                Err(e) => tracing::warn!(error = %e, "payout resolver failed; will retry"),
            }
            match self.resolve_shop().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(finished = n, "released sale proceeds and finished purchase refunds"),
                Err(e) => tracing::warn!(error = %e, "live-shopping resolver failed; will retry"),
            }
            match self.apply_processor_notifications().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(applied = n, "applied processor notifications"),
                Err(e) => tracing::warn!(error = %e, "processor notifications not applied yet; will retry"),
            }
            self.resolver.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Now, by the clock the payments' rows are stamped with.
    pub(crate) fn now_us(&self) -> i64 {
        self.store.clock().now_us()
    }

    pub fn events_hub(&self) -> &events::EventHub {
        self.store.hub()
    }

    pub fn db(&self) -> &Db {
        self.store.db()
    }
}
