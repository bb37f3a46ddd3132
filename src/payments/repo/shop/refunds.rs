//! Sellers' refunds of purchases (`purchase_refunds`): recorded with the purchase's
//! counts first, then, once the money moved, finished (units back on sale, the event),
//! or failed (the counts given back). One attempt at a time works on a refund; the
//! row's `updated_at_us` is its fence (`claim_refund`).

use super::super::rows::{append_event, EventFields};
use super::super::PaymentStore;
use super::{PurchaseRow, PURCHASE_COLUMNS};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PurchaseId, PurchaseRefundId};
use crate::kernel::money::Money;
use crate::payments::listing::{Hold, Purchase};
use crate::with_db;

/// A seller's refund as recorded before its money moves.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RefundRow {
    pub refund_id: String,
    pub purchase_id: String,
    pub amount: i64,
    pub commission: i64,
    pub restock: i64,
    pub source: String,
    pub status: String,
    pub request_hash: String,
    /// When the refund was recorded or last claimed: the attempt working on it holds
    /// this value as its fence (see `claim_refund`).
    pub updated_at_us: i64,
}

const REFUND_COLUMNS: &str =
    "refund_id, purchase_id, amount, commission, restock, source, status, request_hash, updated_at_us";

impl PaymentStore {
    /// The refund under `key` of a purchase, if any.
    pub(crate) async fn refund_by_key(&self, purchase: &PurchaseId, key: &str) -> Result<Option<RefundRow>> {
        let row: Option<RefundRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {REFUND_COLUMNS} FROM purchase_refunds WHERE purchase_id = $1 AND idempotency_key = $2"
        ))
        .bind(purchase.as_str())
        .bind(key)
        .fetch_optional(pool)
        .await)?;
        Ok(row)
    }

    /// Records a refund of `amount` and counts it on the purchase, in one transaction:
    /// the purchase row's checks (never more than its amount) and its lock make
    /// parallel refunds exact. The source is the purchase's pending money while it is
    /// held, else the seller's wallet. `Err` with the refusal when it does not fit.
    /// Answers the refund and whether this call recorded it (and so holds its fence);
    /// `false` when a concurrent call with the same key recorded it first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert_refund(
        &self,
        purchase_id: &PurchaseId,
        amount: Option<i64>,
        restock: i64,
        key: &str,
        hash: &str,
        refunds_max: i64,
    ) -> Result<(RefundRow, bool)> {
        let now = self.clock.now_us();
        let id = PurchaseRefundId::generate();
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            // Takes the purchase row's lock first (on both backends a write), so
            // that the checks below read what no concurrent refund can change.
            let p: Option<PurchaseRow> = sqlx::query_as(&format!(
                "UPDATE purchases SET updated_at_us = $2 WHERE purchase_id = $1 RETURNING {PURCHASE_COLUMNS}"
            ))
            .bind(purchase_id.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let p = Purchase::try_from(p.ok_or_else(|| Error::not_found(format!("purchase {purchase_id}")))?)?;
            // A concurrent call with the same key may have recorded it while this one
            // waited for the lock: answer that refund rather than collide on the key.
            let existing: Option<RefundRow> = sqlx::query_as(&format!(
                "SELECT {REFUND_COLUMNS} FROM purchase_refunds WHERE purchase_id = $1 AND idempotency_key = $2"
            ))
            .bind(purchase_id.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = existing {
                return Ok((r, false));
            }
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM purchase_refunds WHERE purchase_id = $1")
                .bind(purchase_id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            if count >= refunds_max {
                return Err(Error::ResourceExhausted {
                    reason: crate::kernel::reason::Reason::RefundExceedsPayment,
                    message: format!("at most {refunds_max} refunds per purchase"),
                });
            }
            let left = p.amount.minor() - p.refunded_amount.minor();
            let amount = amount.unwrap_or(left);
            if amount <= 0 || amount > left {
                return Err(Error::FailedPrecondition {
                    reason: crate::kernel::reason::Reason::RefundExceedsPayment,
                    message: format!(
                        "at most {} is left to refund",
                        Money::from_minor(p.amount.currency(), left)
                    ),
                });
            }
            if restock > p.quantity - p.restocked {
                return Err(Error::invalid(
                    "restock_quantity",
                    format!("at most {} units of this purchase are not back on sale", p.quantity - p.restocked),
                ));
            }
            let refunded = p.refunded_amount.minor() + amount;
            let commission = p.commission_refunded_at(refunded) - p.commission_refunded;
            let source = if p.hold == Hold::Held { "pending" } else { "available" };
            sqlx::query(
                "UPDATE purchases SET refunded_amount = refunded_amount + $2, \
                 commission_refunded = commission_refunded + $3, restocked = restocked + $4 WHERE purchase_id = $1",
            )
            .bind(purchase_id.as_str())
            .bind(amount)
            .bind(commission)
            .bind(restock)
            .execute(&mut *tx)
            .await?;
            let row: RefundRow = sqlx::query_as(&format!(
                "INSERT INTO purchase_refunds (refund_id, purchase_id, amount, commission, restock, source, status, \
                 idempotency_key, request_hash, created_at_us, updated_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, $9) RETURNING {REFUND_COLUMNS}"
            ))
            .bind(id.as_str())
            .bind(purchase_id.as_str())
            .bind(amount)
            .bind(commission)
            .bind(restock)
            .bind(source)
            .bind(key)
            .bind(hash)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok((row, true))
        })
    }

    /// Refunds recorded but not yet finished whose attempt is older than `before_us`
    /// (a crash, or an attempt that ran out of its lease): at most `limit`.
    pub(crate) async fn pending_refunds(&self, before_us: i64, limit: i64) -> Result<Vec<RefundRow>> {
        let rows: Vec<RefundRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {REFUND_COLUMNS} FROM purchase_refunds WHERE status = 'pending' AND updated_at_us < $1 \
             ORDER BY created_at_us LIMIT $2"
        ))
        .bind(before_us)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        Ok(rows)
    }

    /// Finishes a refund whose money moved: marks it posted, puts its units back on
    /// sale and appends its event, in one transaction. `None` when another attempt
    /// finished it first.
    pub(crate) async fn finish_refund(&self, refund: &RefundRow) -> Result<Option<Purchase>> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(
                "UPDATE purchase_refunds SET status = 'posted', updated_at_us = $2 \
                 WHERE refund_id = $1 AND status = 'pending'",
            )
            .bind(&refund.refund_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 0 {
                return Ok(None);
            }
            let p: PurchaseRow = sqlx::query_as(&format!(
                "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE purchase_id = $1"
            ))
            .bind(&refund.purchase_id)
            .fetch_one(&mut *tx)
            .await?;
            let p = Purchase::try_from(p)?;
            let sold: i64 = sqlx::query_scalar(
                "UPDATE listings SET sold = sold - $2, updated_at_us = $3 WHERE listing_id = $1 RETURNING sold",
            )
            .bind(p.listing_id.as_str())
            .bind(refund.restock)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            append_event!(tx, now, &EventFields::purchase("purchase.refunded", &p, sold));
            tx.commit().await?;
            Ok(Some(p))
        })
    }

    /// Takes over a pending refund whose attempt is older than `stale_before_us` (its
    /// caller crashed or stalled). The row's `updated_at_us` is the fence: the claim
    /// only succeeds while it still holds the value `refund` was read with, and it sets
    /// a newer one, so of two attempts only the latest may fail the refund. Answers the
    /// refund with its new fence, or `None` when another attempt holds it or it ended.
    pub(crate) async fn claim_refund(&self, refund: &RefundRow, stale_before_us: i64) -> Result<Option<RefundRow>> {
        // The new fence is strictly newer than the old one even on a clock that stands
        // still: the old one is older than `stale_before_us`, which is before now.
        let now = self.clock.now_us().max(refund.updated_at_us + 1);
        let row: Option<RefundRow> = with_db!(&self.writer, pool => sqlx::query_as(&format!(
            "UPDATE purchase_refunds SET updated_at_us = $2 \
             WHERE refund_id = $1 AND status = 'pending' AND updated_at_us = $3 AND updated_at_us < $4 \
             RETURNING {REFUND_COLUMNS}"
        ))
        .bind(&refund.refund_id)
        .bind(now)
        .bind(refund.updated_at_us)
        .bind(stale_before_us)
        .fetch_optional(pool)
        .await)?;
        Ok(row)
    }

    /// The refund `refund_id`, as it stands.
    pub(crate) async fn refund(&self, refund_id: &str) -> Result<Option<RefundRow>> {
        let row: Option<RefundRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {REFUND_COLUMNS} FROM purchase_refunds WHERE refund_id = $1"
        ))
        .bind(refund_id)
        .fetch_optional(pool)
        .await)?;
        Ok(row)
    }

    /// Undoes a refund whose money could not move (the seller's wallet could not cover
    /// it): the purchase's counts go back, the refund is failed. Only the attempt that
    /// holds the refund's fence may do it (a later attempt may have moved the money
    /// since); answers whether it did.
    pub(crate) async fn fail_refund(&self, refund: &RefundRow, reason: &str) -> Result<bool> {
        let now = self.clock.now_us().max(refund.updated_at_us);
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(
                "UPDATE purchase_refunds SET status = 'failed', failure_reason = $3, updated_at_us = $2 \
                 WHERE refund_id = $1 AND status = 'pending' AND updated_at_us = $4",
            )
            .bind(&refund.refund_id)
            .bind(now)
            .bind(reason)
            .bind(refund.updated_at_us)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 1 {
                sqlx::query(
                    "UPDATE purchases SET refunded_amount = refunded_amount - $2, \
                     commission_refunded = commission_refunded - $3, restocked = restocked - $4, updated_at_us = $5 \
                     WHERE purchase_id = $1",
                )
                .bind(&refund.purchase_id)
                .bind(refund.amount)
                .bind(refund.commission)
                .bind(refund.restock)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, Error>(done == 1)
        })
    }
}
