//! Refunds: the recipient gives back all or part of a payment, into the sender's wallet.
//!
//! The refunded amount is reserved on the payment first (a conditional update that can
//! never exceed the payment, so concurrent refunds cannot over-refund), then the ledger
//! moves the money; if the recipient's wallet cannot cover it, the reservation is undone.

use super::repo::refunds::{NewRefund, REFUND_CALLER};
use super::{model, Payment, PaymentStatus, Payments};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, RefundId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, PostEntryInput, PostingInput};
use crate::store::is_unique_violation;
use crate::with_db;

#[derive(sqlx::FromRow)]
struct RefundRow {
    refund_id: RefundId,
    payment_id: PaymentId,
    amount: i64,
    status: String,
    request_hash: String,
}

fn refund_failed() -> Error {
    Error::FailedPrecondition {
        reason: Reason::InsufficientFunds,
        message: "the refund failed: your wallet could not cover it".into(),
    }
}

impl Payments {
    pub async fn refund(
        &self,
        recipient: &UserId,
        payment_id: &PaymentId,
        idempotency_key: &str,
        amount: Option<Money>,
        reason: &str,
    ) -> Result<Payment> {
        crate::ledger::check_idempotency_key("idempotency_key", idempotency_key)?;
        model::check_note("reason", reason)?;
        let payment = self.get(recipient, payment_id).await?;
        if payment.recipient_id != *recipient {
            return Err(Error::PermissionDenied("only the recipient can refund a payment".into()));
        }
        let currency = payment.currency();
        if let Some(m) = amount {
            if m.currency() != currency {
                return Err(Error::invalid("amount.currency", format!("the payment is in {currency}")));
            }
        }
        let request_hash = crate::ledger::hash_request(
            &serde_json::json!({"payment": payment_id.as_str(), "amount": amount.map(|m| m.minor()), "reason": reason}),
        );
        if let Some(answer) = self.replay_refund(recipient, payment_id, idempotency_key, &request_hash).await? {
            return answer;
        }
        self.check_not_owing(recipient)?;
        match self.reserve_refund(recipient, &payment, idempotency_key, amount, reason, &request_hash).await {
            // A concurrent call with this key may have refunded what was left, or moved
            // the payment on, between the lookup above and the refusal: answer as it did.
            Err(
                refusal @ Error::FailedPrecondition {
                    reason: Reason::RefundExceedsPayment | Reason::PaymentNotRefundable,
                    ..
                },
            ) => match self.replay_refund(recipient, payment_id, idempotency_key, &request_hash).await? {
                Some(answer) => answer,
                None => Err(refusal),
            },
            other => other,
        }
    }

    /// The answer to a retry: the refund already made with this key (or its failure), or
    /// `None` when the key is unused. A key used for another request is ALREADY_EXISTS.
    async fn replay_refund(
        &self,
        recipient: &UserId,
        payment_id: &PaymentId,
        idempotency_key: &str,
        request_hash: &str,
    ) -> Result<Option<Result<Payment>>> {
        let existing: Option<RefundRow> = with_db!(self.store.db(), pool => sqlx::query_as(
            "SELECT refund_id, payment_id, amount, status, request_hash FROM payment_refunds \
             WHERE created_by = $1 AND idempotency_key = $2",
        )
        .bind(recipient.as_str())
        .bind(idempotency_key)
        .fetch_optional(pool)
        .await)?;
        let Some(r) = existing else { return Ok(None) };
        if r.request_hash != request_hash || r.payment_id != *payment_id {
            return Ok(Some(Err(Error::AlreadyExists(format!(
                "idempotency_key {idempotency_key:?} was already used for a different refund"
            )))));
        }
        Ok(Some(match r.status.as_str() {
            "failed" => Err(refund_failed()),
            "pending" => self.finish_refund(&r.refund_id, &r.payment_id, r.amount).await,
            _ => self.get(recipient, payment_id).await,
        }))
    }

    /// Checks the payment can take the refund, reserves the amount on it and records the
    /// refund under its key, in one transaction, then moves the money.
    async fn reserve_refund(
        &self,
        recipient: &UserId,
        payment: &Payment,
        idempotency_key: &str,
        amount: Option<Money>,
        reason: &str,
        request_hash: &str,
    ) -> Result<Payment> {
        let payment_id = &payment.payment_id;
        let currency = payment.currency();
        if !matches!(payment.status, PaymentStatus::Settled | PaymentStatus::PartiallyRefunded) {
            return Err(Error::FailedPrecondition {
                reason: Reason::PaymentNotRefundable,
                message: format!("a {} payment cannot be refunded", payment.status.as_str()),
            });
        }
        let left = payment.amount.minor() - payment.refunded_amount.minor();
        let minor = amount.map_or(left, |m| m.minor());
        if minor > left || left == 0 {
            return Err(Error::FailedPrecondition {
                reason: Reason::RefundExceedsPayment,
                message: format!("at most {} is left to refund", Money::from_minor(currency, left)),
            });
        }

        // Reserve: the condition keeps refunds within the payment under any concurrency.
        let refund_id = RefundId::generate();
        let now = self.now_us();
        let reserved = self
            .store
            .reserve_refund(&NewRefund {
                refund_id: &refund_id,
                payment_id,
                minor,
                reason,
                idempotency_key,
                request_hash,
                created_by: recipient,
                now_us: now,
            })
            .await;
        match reserved {
            Ok(true) => self.store.notify(),
            Ok(false) => {
                return Err(Error::FailedPrecondition {
                    reason: Reason::RefundExceedsPayment,
                    message: "the payment has less left to refund".into(),
                })
            }
            // A concurrent call with the same key committed first: answer as that one.
            Err(e) if is_unique_violation(&e) => {
                return match self.replay_refund(recipient, payment_id, idempotency_key, request_hash).await? {
                    Some(answer) => answer,
                    None => Err(Error::Unavailable("a concurrent refund with this key; retry".into())),
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.finish_refund(&refund_id, payment_id, minor).await
    }

    /// Moves the refunded money in the ledger and completes the refund, or undoes the
    /// reservation when the recipient's wallet cannot cover it. Idempotent, and safe to
    /// run concurrently for one refund (a retry of the call and the resolver both may).
    ///
    /// The ledger keeps no key for a refused entry, so a refusal alone decides nothing:
    /// another finisher could post the same entry a moment later, once the recipient's
    /// wallet holds the money, and the refund would then be both failed (its reservation
    /// undone) and paid. So the finisher that saw the refusal fails the refund in the same
    /// transaction that takes the entry's idempotency key with a tombstone. The key is the
    /// arbiter: whichever commits first, the refund's entry or the tombstone, wins, and
    /// the loser answers with the winner's outcome (a later post under the key is
    /// ALREADY_EXISTS; a tombstone that finds the key taken means the entry is posted).
    async fn finish_refund(&self, refund_id: &RefundId, payment_id: &PaymentId, minor: i64) -> Result<Payment> {
        let payment = self.store.get(payment_id).await?.ok_or_else(|| Error::not_found("payment"))?;
        let currency = payment.currency();
        let amount = Money::from_minor(currency, minor);
        let from = AccountCode::wallet(&payment.recipient_id, currency);
        let to = AccountCode::wallet(&payment.sender_id, currency);
        let entry_key = format!("refund:{refund_id}");
        let posted = self
            .ledger
            .post_entry(
                REFUND_CALLER,
                PostEntryInput {
                    idempotency_key: entry_key.clone(),
                    kind: "dm_refund".into(),
                    description: String::new(),
                    postings: vec![
                        PostingInput { account_code: from, direction: Direction::Debit, amount },
                        PostingInput { account_code: to, direction: Direction::Credit, amount },
                    ],
                    metadata: [
                        ("payment_id".to_string(), payment_id.to_string()),
                        ("refund_id".to_string(), refund_id.to_string()),
                    ]
                    .into(),
                    pending: false,
                    pending_timeout_s: 0,
                },
            )
            .await;
        let refused = match posted {
            Ok(_) => false,
            Err(Error::FailedPrecondition { .. }) => true,
            // The key holds another finisher's tombstone: the refund has failed.
            Err(Error::AlreadyExists(_)) => return Err(refund_failed()),
            Err(e) => return Err(e),
        };
        let failed =
            self.store.settle_refund(refund_id, payment_id, minor, refused.then_some(entry_key.as_str())).await?;
        self.store.notify();
        if failed {
            return Err(refund_failed());
        }
        self.store.get(payment_id).await?.ok_or_else(|| Error::not_found("payment"))
    }

    /// Finishes refunds left pending by a crash.
    pub async fn resolve_refunds(&self) -> Result<usize> {
        let idle = self.now_us() - self.config.resolve_after_s * 1_000_000;
        let rows: Vec<(RefundId, PaymentId, i64)> = with_db!(self.store.db(), pool => sqlx::query_as(
            "SELECT refund_id, payment_id, amount FROM payment_refunds WHERE status = 'pending' AND created_at_us < $1 LIMIT 100",
        )
        .bind(idle)
        .fetch_all(pool)
        .await)?;
        let mut n = 0;
        for (refund_id, payment_id, amount) in rows {
            match self.finish_refund(&refund_id, &payment_id, amount).await {
                Ok(_) | Err(Error::FailedPrecondition { .. }) => n += 1,
                Err(e) => tracing::warn!(refund_id = %refund_id, error = %e, "pending refund not resolved yet"),
            }
        }
        Ok(n)
    }
}
