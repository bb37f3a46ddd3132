//! Refunds' rows (`payment_refunds`) and what a refund changes on its payment.

use super::rows::{append_event, EventFields, PaymentRow, COLUMNS};
use super::PaymentStore;
use crate::kernel::ids::{PaymentId, RefundId, UserId};
use crate::payments::{Payment, PaymentStatus};
use crate::with_db;

pub(crate) fn status_after(amount: i64, refunded: i64) -> &'static str {
    if refunded == 0 {
        PaymentStatus::Settled.as_str()
    } else if refunded >= amount {
        PaymentStatus::Refunded.as_str()
    } else {
        PaymentStatus::PartiallyRefunded.as_str()
    }
}

/// The ledger caller refunds post as: their idempotency keys live in its scope.
pub(crate) const REFUND_CALLER: &str = "payments";

/// The operation of the tombstone that takes a failed refund's ledger key (see
/// `Payments::finish_refund`); no ledger request ever carries it, so a post under the
/// key is refused as a key reused for another request.
pub(crate) const REFUND_TOMBSTONE: &str = "refund_failed";

/// A refund to record and reserve on its payment.
pub(crate) struct NewRefund<'a> {
    pub refund_id: &'a RefundId,
    pub payment_id: &'a PaymentId,
    pub minor: i64,
    pub reason: &'a str,
    pub idempotency_key: &'a str,
    pub request_hash: &'a str,
    pub created_by: &'a UserId,
    pub now_us: i64,
}

impl PaymentStore {
    /// Records the refund under its key and reserves its amount on the payment, with the
    /// `payment.refunded` event, in one transaction. `Ok(false)`: the payment has less
    /// left to refund (nothing written); a unique violation: the key was taken first.
    pub(crate) async fn reserve_refund(&self, r: &NewRefund<'_>) -> std::result::Result<bool, sqlx::Error> {
        let sql = format!(
            "UPDATE payments SET refunded_amount = refunded_amount + $2, \
             status = CASE WHEN refunded_amount + $2 >= amount THEN 'refunded' ELSE 'partially_refunded' END, \
             updated_at_us = $3 \
             WHERE payment_id = $1 AND refunded_amount + $2 <= amount AND status IN ('settled', 'partially_refunded') \
             RETURNING {COLUMNS}"
        );
        with_db!(&self.writer, pool => async {
            let mut tx = pool.begin().await?;
            // The key first: a concurrent call with the same key waits here for this
            // transaction and then finds the key taken (a unique violation), and so
            // answers as this one instead of racing it for what is left to refund.
            sqlx::query(
                "INSERT INTO payment_refunds (refund_id, payment_id, amount, reason, status, idempotency_key, request_hash, \
                 created_by, created_at_us) VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8)",
            )
            .bind(r.refund_id)
            .bind(r.payment_id)
            .bind(r.minor)
            .bind(r.reason)
            .bind(r.idempotency_key)
            .bind(r.request_hash)
            .bind(r.created_by)
            .bind(r.now_us)
            .execute(&mut *tx)
            .await?;
            let row: Option<PaymentRow> =
                sqlx::query_as(&sql).bind(r.payment_id).bind(r.minor).bind(r.now_us).fetch_optional(&mut *tx).await?;
            let Some(row) = row else {
                // Dropping the transaction rolls the key back: a later retry may succeed.
                return Ok::<_, sqlx::Error>(false);
            };
            let p = Payment::try_from(row).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            append_event!(tx, self.clock.now_us(), &EventFields::payment("payment.refunded", &p));
            tx.commit().await?;
            Ok(true)
        }
        .await)
    }

    /// Completes a refund whose entry was posted, or fails it when the ledger refused
    /// the entry (`fence_key`: the entry's idempotency key, taken here with a tombstone,
    /// see `Payments::finish_refund`), undoing the reservation with a
    /// `payment.refund_failed` event. Returns whether the refund failed.
    pub(crate) async fn settle_refund(
        &self,
        refund_id: &RefundId,
        payment_id: &PaymentId,
        minor: i64,
        fence_key: Option<&str>,
    ) -> std::result::Result<bool, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM payments WHERE payment_id = $1");
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            // The tombstone (`Payments::finish_refund`), through the ledger, which owns
            // the keys.
            let fence = match fence_key {
                Some(key) => Some(crate::ledger::keys::fence_idempotency_key!(
                    tx,
                    REFUND_CALLER,
                    key,
                    REFUND_TOMBSTONE,
                    self.clock.now_us()
                )?),
                None => None,
            };
            // Fenced: this call's tombstone took the key. Failed: a tombstone holds the
            // key, this one or another finisher's; otherwise another finisher posted
            // the refund's entry under it.
            let fenced = matches!(fence, Some(None));
            let failed = match &fence {
                Some(None) => true,
                Some(Some(operation)) => operation == REFUND_TOMBSTONE,
                None => false,
            };
            let done = sqlx::query("UPDATE payment_refunds SET status = $2 WHERE refund_id = $1 AND status = 'pending'")
                .bind(refund_id)
                .bind(if failed { "failed" } else { "completed" })
                .execute(&mut *tx)
                .await?;
            if fenced && done.rows_affected() == 1 {
                let p: PaymentRow = sqlx::query_as(&sql).bind(payment_id).fetch_one(&mut *tx).await?;
                let current = Payment::try_from(p).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                let refunded = current.refunded_amount.minor() - minor;
                sqlx::query("UPDATE payments SET refunded_amount = $2, status = $3, updated_at_us = $4 WHERE payment_id = $1")
                    .bind(payment_id)
                    .bind(refunded)
                    .bind(status_after(current.amount.minor(), refunded))
                    .bind(self.clock.now_us())
                    .execute(&mut *tx)
                    .await?;
                let p: PaymentRow = sqlx::query_as(&sql).bind(payment_id).fetch_one(&mut *tx).await?;
                let after = Payment::try_from(p).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                append_event!(tx, self.clock.now_us(), &EventFields::payment("payment.refund_failed", &after));
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(failed)
        })
    }
}
