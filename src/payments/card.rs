//! The card path of a send, and how a pending payment is finished: the payment row
//! first, then the wallet hold, the processor (authorize, capture) and the ledger, each
//! step idempotent under a key derived from the payment id, so the caller's retry or
//! the resolver can resume it from any point. One attempt at a time holds the payment's
//! claim (`store::Claim`), renewed before every step that cannot be undone.

use super::repo::{Claim, DailyCap, Inserted};
use super::{model, FundingSource, Payment, PaymentStatus, Payments, SendInput, ACTOR};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, Entry, PostEntryInput, PostingInput, SYSTEM_CLEARING, SYSTEM_FEES};
use crate::processor::ProcessorError;

fn key(payment_id: &PaymentId, step: &str) -> String {
    format!("pay:{payment_id}:{step}")
}

fn posting(code: AccountCode, direction: Direction, amount: Money) -> PostingInput {
    PostingInput { account_code: code, direction, amount }
}

/// Why a card charge did not produce a capture.
enum Charge {
    /// Refused: the payment fails with this reason.
    Declined(Reason, String),
    /// No answer: leave the payment pending for the resolver.
    Unknown,
    /// The resolver took the payment over from this attempt: stop, it finishes it.
    Lost,
    /// Our own failure (database).
    Other(Error),
}

impl Payments {
    /// A send that charges a card for all or part of the amount (or pays a request):
    /// payment row first, then the processor, then the ledger, each step idempotent.
    pub(super) async fn send_with_card(
        &self,
        sender: &UserId,
        input: SendInput,
        request_hash: &str,
    ) -> Result<Payment> {
        let currency = input.amount.currency();
        if let Some((existing, existing_hash)) = self.store.by_key(sender, &input.idempotency_key).await? {
            if existing_hash != request_hash {
                return Err(super::key_reused(&input.idempotency_key));
            }
            return Self::replay(existing);
        }

        // Rules, before any money moves; a refusal here writes nothing.
        let recipient_account = self
            .accounts
            .get(&input.recipient)
            .await?
            .ok_or_else(|| Error::NotFound(format!("recipient_id: no user {}", input.recipient)))?;
        let sender_account = self.accounts.ensure(sender).await?;
        // A first look, so that a send plainly over the limit writes nothing; the count
        // itself is taken atomically with the payment row (`PaymentStore::insert`).
        let sent = super::repo::spend::sent(self.store.db(), sender, currency, self.now_us()).await?;
        let limits = self.config.limits(sender_account.tier);
        model::check_send_rules(sender_account.status, recipient_account.status, limits, input.amount, sent)?;

        // The split between wallet and card.
        let wallet = self.ledger.accounts().wallet(sender, currency).await?;
        let daily =
            DailyCap { wallet_account_id: wallet.id, max_minor: model::major_to_minor(limits.daily_max, currency) };
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
            self.check_own_card(sender, token).await?;
        }

        let now = self.now_us();
        let mut payment = Payment {
            payment_id: PaymentId::generate(),
            sender_id: sender.clone(),
            recipient_id: input.recipient.clone(),
            amount: input.amount,
            wallet_amount: Money::from_minor(currency, wallet_part),
            card_amount: Money::from_minor(currency, card_part),
            fee_amount: Money::from_minor(currency, fee),
            refunded_amount: Money::zero(currency),
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
            dispute_status: crate::payments::model::DisputeStatus::Undisputed,
        };
        if card_part > 0 && input.payment_method_token.is_none() && !self.has_default_card(sender).await? {
            payment.status = PaymentStatus::Failed;
            payment.failure_reason = Reason::NoPaymentMethod.as_str().into();
            payment.failure_message = if input.funding == FundingSource::Auto {
                "insufficient wallet balance and no default card to charge the rest".into()
            } else {
                "no default payment method; link a card first".into()
            };
        }
        let claim = Claim::new();
        let until = now.saturating_add(self.lease_us());
        let payment =
            match self.store.insert(&payment, &input.idempotency_key, request_hash, &claim, until, Some(&daily)).await?
            {
                Inserted::New(p) => p,
                Inserted::Existing(p) => return Self::replay(p),
            };
        if payment.status == PaymentStatus::Failed {
            return Self::replay(payment);
        }
        self.settle(payment, &claim).await
    }

    /// A card token that is not `user`'s is NOT_FOUND, before anything is written (a
    /// send's, a tab's or a card purchase's).
    pub(super) async fn check_own_card(&self, user: &UserId, token: &str) -> Result<()> {
        match self.vault.list(user, false).await?.iter().any(|m| m.token == token) {
            true => Ok(()),
            false => Err(Error::NotFound("payment method not found (unknown, expired or another account's)".into())),
        }
    }

    pub(super) async fn has_default_card(&self, user: &UserId) -> Result<bool> {
        Ok(self.vault.list(user, false).await?.iter().any(|m| m.is_default))
    }

    async fn entry(
        &self,
        payment: &Payment,
        step: &str,
        kind: &str,
        postings: Vec<PostingInput>,
        pending: bool,
    ) -> Result<Entry> {
        let mut metadata = Self::entry_metadata(payment);
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

    /// How long a claim on a pending payment lasts without renewal: the resolver's
    /// patience (`DMPAY_PAYMENTS_RESOLVE_AFTER`).
    pub(super) fn lease_us(&self) -> i64 {
        self.config.resolve_after_s.saturating_mul(1_000_000)
    }

    /// Fails the payment, if `claim` still holds it; otherwise answers with the payment
    /// as whoever holds it has made it.
    async fn fail(&self, payment: &Payment, claim: &Claim, reason: Reason, message: &str) -> Result<Payment> {
        let p = self
            .store
            .finish(&payment.payment_id, PaymentStatus::Failed, reason.as_str(), message, Some(claim))
            .await?;
        Self::replay(p)
    }

    /// Renews `claim` before an irreversible step; false when the resolver has taken the
    /// payment over (this attempt stalled past its lease) or it is no longer pending.
    async fn still_ours(&self, payment: &Payment, claim: &Claim) -> Result<bool> {
        self.store.renew(&payment.payment_id, claim, self.lease_us()).await
    }

    /// The payment as it stands, for an attempt that lost its claim: the attempt that
    /// holds it finishes the payment, and a retry with the same key sees the outcome.
    async fn current(&self, payment: &Payment) -> Result<Payment> {
        let p = self.store.get(&payment.payment_id).await?.ok_or_else(|| Error::not_found("payment"))?;
        Self::replay(p)
    }

    /// Runs (or resumes) the settlement of a pending payment under `claim`. Every step is
    /// idempotent; before each step that cannot be undone (a processor call, failing the
    /// payment) the claim is renewed, and an attempt that lost it stops.
    pub async fn settle(&self, payment: Payment, claim: &Claim) -> Result<Payment> {
        let currency = payment.currency();
        let sender_wallet = AccountCode::wallet(&payment.sender_id, currency);
        let recipient_wallet = AccountCode::wallet(&payment.recipient_id, currency);
        let wallet_part = payment.wallet_amount;

        if payment.card_amount.minor() == 0 {
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
                Ok(_) => self.store.finish(&payment.payment_id, PaymentStatus::Settled, "", "", None).await,
                Err(Error::FailedPrecondition { reason, message }) => {
                    self.fail(&payment, claim, reason, &message).await
                }
                Err(e) => Err(e),
            };
        }

        // What the card pays: computed before the hold below, so an impossible total
        // cannot leave a hold behind.
        let charge_total = payment
            .card_amount
            .checked_add(payment.fee_amount)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("card part and fee overflow")))?;

        // Card funded, fully or in part. First hold the wallet part, so concurrent sends
        // cannot spend it while the card is charged.
        let hold = if payment.wallet_amount.minor() > 0 {
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
                    return self.fail(&payment, claim, reason, &message).await
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let charged = self.charge(&payment, claim, charge_total).await;
        let capture_ref = match charged {
            Ok(reference) => reference,
            Err(Charge::Declined(reason, message)) => {
                // Only the claim's holder may give up on the payment: the resolver may
                // have taken it over while this attempt waited for the processor, and
                // be charging the card under the same keys right now.
                if !self.still_ours(&payment, claim).await? {
                    return self.current(&payment).await;
                }
                self.release(&payment, hold.as_ref()).await?;
                return self.fail(&payment, claim, reason, &message).await;
            }
            Err(Charge::Lost) => return self.current(&payment).await,
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
        let card_part = payment.card_amount;
        let mut postings = vec![
            posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Debit, charge_total),
            posting(sender_wallet.clone(), Direction::Credit, charge_total),
            posting(sender_wallet.clone(), Direction::Debit, charge_total),
            posting(recipient_wallet.clone(), Direction::Credit, card_part),
        ];
        if payment.fee_amount.minor() > 0 {
            postings.push(posting(AccountCode::system(SYSTEM_FEES, currency), Direction::Credit, payment.fee_amount));
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
        // The card is charged and booked: settling is the truth whoever finishes it.
        self.store.finish(&payment.payment_id, PaymentStatus::Settled, "", "", None).await
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
            Err(Error::FailedPrecondition { reason: Reason::EntryNotPending | Reason::EntryExpired, .. }) => {
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
    async fn charge(&self, payment: &Payment, claim: &Claim, total: Money) -> std::result::Result<String, Charge> {
        let ours = || async {
            match self.still_ours(payment, claim).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(Charge::Lost),
                Err(e) => Err(Charge::Other(e)),
            }
        };
        let processor = self.vault.processor().clone();
        let auth_key = key(&payment.payment_id, "auth");
        let cap_key = key(&payment.payment_id, "capture");
        let outcome = |r: std::result::Result<String, ProcessorError>| match r {
            Ok(reference) => Ok(reference),
            Err(ProcessorError::Declined(code)) => Err(Charge::Declined(code.reason(), code.message().to_owned())),
            Err(ProcessorError::Failed(_)) => {
                Err(Charge::Declined(Reason::ProcessingError, "the card processor could not process the charge".into()))
            }
            Err(ProcessorError::Unknown) => Err(Charge::Unknown),
        };
        // A previous attempt may have reached the processor: ask before calling.
        let earlier = processor.lookup(&auth_key).await.map_err(|_| Charge::Unknown)?;
        let authorization = match earlier {
            Some(record) => outcome(record.outcome.map(|()| record.reference))?,
            None => {
                ours().await?;
                let card = self
                    .vault
                    .chargeable(&payment.sender_id, payment.payment_method_token.as_deref(), "charge")
                    .await
                    .map_err(|e| match e {
                        Error::FailedPrecondition { reason, message } => Charge::Declined(reason, message),
                        Error::NotFound(m) => Charge::Declined(Reason::NoPaymentMethod, m),
                        other => Charge::Other(other),
                    })?;
                outcome(processor.authorize(&auth_key, card.details(), total).await)?
            }
        };
        let _ = self.store.set_refs(&payment.payment_id, Some(&authorization), None).await;
        let captured = match processor.lookup(&cap_key).await.map_err(|_| Charge::Unknown)? {
            Some(record) => record.outcome.map(|()| record.reference),
            None => {
                ours().await?;
                processor.capture(&cap_key, &authorization, total).await
            }
        };
        outcome(captured)
    }

    /// Releases the wallet hold of a payment that will not go through.
    async fn release(&self, payment: &Payment, hold: Option<&Entry>) -> Result<()> {
        if let Some(h) = hold {
            match self.ledger.void_pending(ACTOR, &h.id, &key(&payment.payment_id, "void_hold")).await {
                Ok(_) | Err(Error::FailedPrecondition { reason: Reason::EntryNotPending, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Finishes payments left pending (crash, unknown processor outcome).
    pub async fn resolve_pending(&self) -> Result<usize> {
        let stale = self.store.claim_stale(self.lease_us(), 100).await?;
        let mut done = 0;
        for (p, claim) in stale {
            let id = p.payment_id.clone();
            match self.settle(p, &claim).await {
                Ok(_) | Err(Error::FailedPrecondition { .. }) => done += 1,
                Err(e) => tracing::warn!(payment_id = %id, error = %e, "pending payment not resolved yet"),
            }
        }
        Ok(done)
    }
}
