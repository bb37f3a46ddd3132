//! One-click DM payments: sends funded from the wallet, a card, or both, settled against
//! the ledger through the posting engine and charged only through the vault's processor
//! boundary.
//!
//! - `model`  payments, statuses, funding, limits, validation
//! - `store`  payment rows and the event outbox (state change and event in one
//!   transaction, gap-free event sequence)
//!
//! A send is a sequence of steps, each idempotent under a key derived from the payment
//! id (`pay:<id>:hold`, `:auth`, `:capture`, `:settle`, `:post_hold`, `:void_hold`), so
//! it can be resumed from any point: by the caller's retry, or by the resolver that
//! picks up payments left pending (a crash, or a processor outcome that was unknown).

pub mod events;
pub mod model;
pub mod refunds;
pub mod requests;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use model::{FundingSource, Payment, PaymentStatus, PaymentsConfig};
use store::{Inserted, PaymentStore};

use crate::accounts::{Accounts, Status as AccountStatus, UserId};
use crate::error::{Error, Result};
use crate::ledger::{
    AccountCode, Direction, Entry, Ledger, PostEntryInput, PostingInput, SYSTEM_CLEARING, SYSTEM_FEES,
};
use crate::money::{Currency, Money};
use crate::processor::ProcessorError;
use crate::store::{now_us, Db};
use crate::vault::Vault;

/// The caller recorded on ledger entries and idempotency keys of payments.
const ACTOR: &str = "payments";

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
    pub request_id: Option<String>,
}

#[derive(Clone)]
pub struct Payments {
    store: Arc<PaymentStore>,
    ledger: Ledger,
    vault: Arc<Vault>,
    accounts: Accounts,
    config: Arc<PaymentsConfig>,
}

fn key(payment_id: &str, step: &str) -> String {
    format!("pay:{payment_id}:{step}")
}

fn posting(code: AccountCode, direction: Direction, amount: Money) -> PostingInput {
    PostingInput { account_code: code, direction, amount }
}

impl Payments {
    pub fn new(db: Db, ledger: Ledger, vault: Arc<Vault>, accounts: Accounts, config: PaymentsConfig) -> Self {
        Payments { store: Arc::new(PaymentStore::new(db)), ledger, vault, accounts, config: Arc::new(config) }
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
        let currency = input.amount.currency();
        let request_hash = crate::ledger::hash_request(&serde_json::json!({
            "recipient": input.recipient.as_str(),
            "currency": currency.code(),
            "amount": input.amount.minor(),
            "note": input.note,
            "conversation": input.conversation_id,
            "message": input.message_id,
            "funding": input.funding.as_str(),
            "token": input.payment_method_token,
            "request": input.request_id,
        }));
        if let Some((existing, existing_hash)) = self.store.by_key(sender.as_str(), &input.idempotency_key).await? {
            if existing_hash != request_hash {
                return Err(Error::AlreadyExists(format!(
                    "idempotency_key {:?} was already used for a different payment",
                    input.idempotency_key
                )));
            }
            return Self::replay(existing);
        }

        // Rules, before any money moves; a refusal here writes nothing.
        if &input.recipient == sender {
            return Err(Error::invalid("recipient_id", "you cannot pay yourself"));
        }
        let sender_account = self.accounts.ensure(sender).await?;
        let recipient_account = self.accounts.ensure(&input.recipient).await?;
        if sender_account.status == AccountStatus::Frozen {
            return Err(Error::FailedPrecondition {
                reason: "ACCOUNT_FROZEN",
                message: "your account is frozen".into(),
            });
        }
        if recipient_account.status == AccountStatus::Frozen {
            return Err(Error::FailedPrecondition {
                reason: "RECIPIENT_FROZEN",
                message: "the recipient's account cannot receive payments".into(),
            });
        }
        let limits = self.config.limits(sender_account.tier);
        let payment_max = model::major_to_minor(limits.payment_max, currency);
        if input.amount.minor() > payment_max {
            return Err(Error::ResourceExhausted {
                reason: "PAYMENT_LIMIT",
                message: format!("at most {} per payment for your account", Money::from_minor(currency, payment_max)),
            });
        }
        let daily_max = model::major_to_minor(limits.daily_max, currency);
        let sent = self.store.sent_since(sender.as_str(), currency.code(), now_us() - 86_400_000_000).await?;
        if sent.saturating_add(input.amount.minor()) > daily_max {
            return Err(Error::ResourceExhausted {
                reason: "DAILY_LIMIT",
                message: format!(
                    "at most {} in 24 hours for your account; {} already sent",
                    Money::from_minor(currency, daily_max),
                    Money::from_minor(currency, sent)
                ),
            });
        }

        // The split between wallet and card.
        let wallet = self.ledger.accounts().wallet(sender, currency).await?;
        let available = self.ledger.accounts().balance(wallet.id).await?.available(true).unwrap_or(0).max(0);
        let (wallet_part, card_part) = match input.funding {
            FundingSource::Balance => (input.amount.minor(), 0),
            FundingSource::Card => (0, input.amount.minor()),
            FundingSource::Auto => {
                let w = available.min(input.amount.minor());
                (w, input.amount.minor() - w)
            }
        };
        let fee = self.config.card_fee(card_part);
        if let Some(token) = &input.payment_method_token {
            // A token that is not the sender's is NOT_FOUND, before anything is written.
            self.vault.list(sender, false).await?.iter().find(|m| &m.token == token).ok_or_else(|| {
                Error::NotFound("payment method not found (unknown, expired or another account's)".into())
            })?;
        }

        let now = now_us();
        let mut payment = Payment {
            payment_id: format!("pay_{}", uuid::Uuid::now_v7().simple()),
            sender_id: sender.to_string(),
            recipient_id: input.recipient.to_string(),
            currency: currency.code().to_owned(),
            amount: input.amount.minor(),
            wallet_amount: wallet_part,
            card_amount: card_part,
            fee_amount: fee,
            refunded_amount: 0,
            status: PaymentStatus::Pending,
            funding_source: input.funding,
            payment_method_token: input.payment_method_token.clone(),
            note: input.note,
            conversation_id: input.conversation_id,
            message_id: input.message_id,
            request_id: input.request_id.clone(),
            failure_reason: String::new(),
            failure_message: String::new(),
            authorization_ref: None,
            capture_ref: None,
            created_at_us: now,
            settled_at_us: None,
        };
        if card_part > 0 && input.payment_method_token.is_none() && !self.has_default_card(sender).await? {
            payment.status = PaymentStatus::Failed;
            payment.failure_reason = "NO_PAYMENT_METHOD".into();
            payment.failure_message = if input.funding == FundingSource::Auto {
                "insufficient wallet balance and no default card to charge the rest".into()
            } else {
                "no default payment method; link a card first".into()
            };
        }
        let payment = match self.store.insert(&payment, &input.idempotency_key, &request_hash).await? {
            Inserted::New(p) => p,
            Inserted::Existing(p) => return Self::replay(p),
        };
        if payment.status == PaymentStatus::Failed {
            return Self::replay(payment);
        }
        self.settle(payment).await
    }

    async fn has_default_card(&self, user: &UserId) -> Result<bool> {
        Ok(self.vault.list(user, false).await?.iter().any(|m| m.is_default))
    }

    fn wallet_code(user: &str, currency: Currency) -> Result<AccountCode> {
        Ok(AccountCode::wallet(&UserId::parse("user_id", user)?, currency))
    }

    async fn entry(
        &self,
        payment: &Payment,
        step: &str,
        kind: &str,
        postings: Vec<PostingInput>,
        pending: bool,
    ) -> Result<Entry> {
        let mut metadata: BTreeMap<String, String> = [
            ("payment_id".to_string(), payment.payment_id.clone()),
            ("conversation_id".to_string(), payment.conversation_id.clone()),
            ("message_id".to_string(), payment.message_id.clone()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        if let (Some(reference), "settle") = (&payment.capture_ref, step) {
            // The capture this entry books, for reconciliation with the processor's
            // report. Only on the settle entry: the others' requests must not change
            // when a resumed payment has learnt its capture reference meanwhile.
            metadata.insert("processor_reference".to_string(), reference.clone());
        }
        self.ledger
            .post_entry(
                ACTOR,
                PostEntryInput {
                    idempotency_key: key(&payment.payment_id, step),
                    kind: kind.into(),
                    description: payment.note.clone(),
                    postings,
                    metadata,
                    pending,
                    // A hold lives as long as the ledger allows (30 days), so the
                    // resolver has time to finish a payment whose card outcome is
                    // unknown; it is posted or voided long before that.
                    pending_timeout_s: if pending { crate::ledger::PENDING_TIMEOUT_MAX_S } else { 0 },
                },
            )
            .await
    }

    async fn fail(&self, payment: &Payment, reason: &str, message: &str) -> Result<Payment> {
        let p = self.store.finish(&payment.payment_id, PaymentStatus::Failed, reason, message).await?;
        Self::replay(p)
    }

    /// Runs (or resumes) the settlement of a pending payment. Every step is idempotent.
    pub async fn settle(&self, payment: Payment) -> Result<Payment> {
        let currency = payment.currency()?;
        let sender_wallet = Self::wallet_code(&payment.sender_id, currency)?;
        let recipient_wallet = Self::wallet_code(&payment.recipient_id, currency)?;
        let wallet_part = Money::from_minor(currency, payment.wallet_amount);

        if payment.card_amount == 0 {
            let result = self
                .entry(
                    &payment,
                    "transfer",
                    "dm_payment",
                    vec![
                        posting(sender_wallet, Direction::Debit, wallet_part),
                        posting(recipient_wallet, Direction::Credit, wallet_part),
                    ],
                    false,
                )
                .await;
            return match result {
                Ok(_) => self.store.finish(&payment.payment_id, PaymentStatus::Settled, "", "").await,
                Err(Error::FailedPrecondition { reason, message }) => self.fail(&payment, reason, &message).await,
                Err(e) => Err(e),
            };
        }

        // Card funded, fully or in part. First hold the wallet part, so concurrent sends
        // cannot spend it while the card is charged.
        let hold = if payment.wallet_amount > 0 {
            let held = self
                .entry(
                    &payment,
                    "hold",
                    "dm_payment_hold",
                    vec![
                        posting(sender_wallet.clone(), Direction::Debit, wallet_part),
                        posting(recipient_wallet.clone(), Direction::Credit, wallet_part),
                    ],
                    true,
                )
                .await;
            match held {
                Ok(e) => Some(e),
                Err(Error::FailedPrecondition { reason, message }) => {
                    return self.fail(&payment, reason, &message).await
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let charge_total = Money::from_minor(currency, payment.card_amount + payment.fee_amount);
        let sender = UserId::parse("sender_id", &payment.sender_id)?;

        let charged = self.charge(&payment, &sender, charge_total).await;
        let capture_ref = match charged {
            Ok(reference) => reference,
            Err(Charge::Declined(reason, message)) => {
                self.release(&payment, hold.as_ref()).await?;
                return self.fail(&payment, reason, &message).await;
            }
            Err(Charge::Unknown) => {
                // Left pending: the resolver looks the call up and finishes it.
                return self.store.get(&payment.payment_id).await?.ok_or_else(|| Error::not_found("payment"));
            }
            Err(Charge::Other(e)) => return Err(e),
        };
        self.store.set_refs(&payment.payment_id, None, Some(&capture_ref)).await?;

        // The card funding and the transfer, in one entry: the processor owes dmpay what
        // the card paid, the sender's wallet is credited with it and debited for the
        // payment and the fee.
        let card_part = Money::from_minor(currency, payment.card_amount);
        let mut postings = vec![
            posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Debit, charge_total),
            posting(sender_wallet.clone(), Direction::Credit, charge_total),
            posting(sender_wallet.clone(), Direction::Debit, charge_total),
            posting(recipient_wallet.clone(), Direction::Credit, card_part),
        ];
        if payment.fee_amount > 0 {
            postings.push(posting(
                AccountCode::system(SYSTEM_FEES, currency),
                Direction::Credit,
                Money::from_minor(currency, payment.fee_amount),
            ));
        }
        let charged = Payment { capture_ref: Some(capture_ref.clone()), ..payment.clone() };
        let settled = self.entry(&charged, "settle", "dm_payment_card", postings, false).await;
        if let Err(e) = settled {
            // The card was charged: never fail the payment here; the resolver retries.
            tracing::error!(payment_id = %payment.payment_id, error = %e, "card settled but ledger posting failed; will retry");
            return Err(Error::Unavailable("the payment is being settled; retry with the same key".into()));
        }
        if let Some(h) = &hold {
            self.move_wallet_part(&payment, h, sender_wallet, recipient_wallet, wallet_part).await?;
        }
        self.store.finish(&payment.payment_id, PaymentStatus::Settled, "", "").await
    }

    /// Moves the held wallet part to the recipient by posting the hold. Should the hold
    /// have expired meanwhile, the wallet part moves as a transfer of its own instead, so
    /// the recipient always gets the whole payment once the card part is in.
    async fn move_wallet_part(
        &self,
        payment: &Payment,
        hold: &Entry,
        sender_wallet: AccountCode,
        recipient_wallet: AccountCode,
        wallet_part: Money,
    ) -> Result<()> {
        match self.ledger.post_pending(ACTOR, &hold.id, &key(&payment.payment_id, "post_hold"), None).await {
            Ok(_) => Ok(()),
            Err(Error::FailedPrecondition { reason: "ENTRY_NOT_PENDING" | "ENTRY_EXPIRED", .. }) => {
                let current = self.ledger.get_entry(&hold.id).await?;
                if current.status == crate::ledger::EntryStatus::Posted {
                    return Ok(());
                }
                tracing::warn!(payment_id = %payment.payment_id, "hold no longer pending; moving the wallet part directly");
                self.entry(
                    payment,
                    "wallet_transfer",
                    "dm_payment",
                    vec![
                        posting(sender_wallet, Direction::Debit, wallet_part),
                        posting(recipient_wallet, Direction::Credit, wallet_part),
                    ],
                    false,
                )
                .await
                .map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Authorizes and captures the card part. A call whose outcome is unknown is looked
    /// up, never retried blindly.
    async fn charge(&self, payment: &Payment, sender: &UserId, total: Money) -> std::result::Result<String, Charge> {
        let processor = self.vault.processor().clone();
        let auth_key = key(&payment.payment_id, "auth");
        let cap_key = key(&payment.payment_id, "capture");
        let outcome = |r: std::result::Result<String, ProcessorError>| match r {
            Ok(reference) => Ok(reference),
            Err(ProcessorError::Declined(code)) => Err(Charge::Declined(code.reason(), code.message().to_owned())),
            Err(ProcessorError::Failed(_)) => {
                Err(Charge::Declined("PROCESSING_ERROR", "the card processor could not process the charge".into()))
            }
            Err(ProcessorError::Unknown) => Err(Charge::Unknown),
        };
        // A previous attempt may have reached the processor: ask before calling.
        let earlier = processor.lookup(&auth_key).await.map_err(|_| Charge::Unknown)?;
        let authorization = match earlier {
            Some(record) => outcome(record.outcome.map(|()| record.reference))?,
            None => {
                let card =
                    self.vault.chargeable(sender, payment.payment_method_token.as_deref(), "charge").await.map_err(
                        |e| match e {
                            Error::FailedPrecondition { reason, message } => Charge::Declined(reason, message),
                            Error::NotFound(m) => Charge::Declined("NO_PAYMENT_METHOD", m),
                            other => Charge::Other(other),
                        },
                    )?;
                outcome(processor.authorize(&auth_key, card.details(), total).await)?
            }
        };
        let _ = self.store.set_refs(&payment.payment_id, Some(&authorization), None).await;
        let captured = match processor.lookup(&cap_key).await.map_err(|_| Charge::Unknown)? {
            Some(record) => record.outcome.map(|()| record.reference),
            None => processor.capture(&cap_key, &authorization, total).await,
        };
        outcome(captured)
    }

    /// Releases the wallet hold of a payment that will not go through.
    async fn release(&self, payment: &Payment, hold: Option<&Entry>) -> Result<()> {
        if let Some(h) = hold {
            match self.ledger.void_pending(ACTOR, &h.id, &key(&payment.payment_id, "void_hold")).await {
                Ok(_) | Err(Error::FailedPrecondition { reason: "ENTRY_NOT_PENDING", .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A payment the user took part in; others get NOT_FOUND, as for a missing one.
    pub async fn get(&self, user: &UserId, payment_id: &str) -> Result<Payment> {
        if payment_id.is_empty() {
            return Err(Error::invalid("payment_id", "required"));
        }
        match self.store.get(payment_id).await? {
            Some(p) if p.involves(user.as_str()) => Ok(p),
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
        let size = match page_size {
            0 => 50,
            n if n > 200 => return Err(Error::invalid("page_size", "at most 200")),
            n => n,
        };
        let before = if page_token.is_empty() {
            (i64::MAX, String::new())
        } else {
            page_token
                .split_once('/')
                .and_then(|(t, id)| Some((t.parse::<i64>().ok()?, id.to_owned())))
                .filter(|(_, id)| id.starts_with("pay_"))
                .ok_or_else(|| Error::invalid("page_token", "not a token from a previous page"))?
        };
        let mut rows = self.store.list(user.as_str(), conversation, before, i64::from(size) + 1).await?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|p| format!("{}/{}", p.created_at_us, p.payment_id))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Finishes payments left pending (crash, unknown processor outcome).
    pub async fn resolve_pending(&self) -> Result<usize> {
        let stale = self.store.stale_pending(self.config.resolve_after_s * 1_000_000, 100).await?;
        let mut done = 0;
        for p in stale {
            let id = p.payment_id.clone();
            match self.settle(p).await {
                Ok(_) | Err(Error::FailedPrecondition { .. }) => done += 1,
                Err(e) => tracing::warn!(payment_id = %id, error = %e, "pending payment not resolved yet"),
            }
        }
        Ok(done)
    }

    /// Runs the resolver until the task is dropped.
    pub async fn run_resolver(self, interval: std::time::Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
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
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn events_hub(&self) -> &events::EventHub {
        self.store.hub()
    }

    pub fn db(&self) -> &Db {
        self.store.db()
    }
}

/// Why a card charge did not produce a capture.
enum Charge {
    /// Refused: the payment fails with this reason.
    Declined(&'static str, String),
    /// No answer: leave the payment pending for the resolver.
    Unknown,
    /// Our own failure (database).
    Other(Error),
}
