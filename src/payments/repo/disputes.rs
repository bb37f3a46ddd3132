//! Disputes' rows (`disputes`) and what a dispute changes on its payment.

use super::rows::{append_event, EventFields, PaymentRow, COLUMNS};
use super::PaymentStore;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{DisputeId, PaymentId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::payments::model::DisputeStatus;
use crate::payments::Payment;
use crate::with_db;

/// A dispute as stored. Amounts are minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DisputeRow {
    pub dispute_id: DisputeId,
    pub payment_id: PaymentId,
    pub processor_ref: String,
    pub capture_ref: String,
    pub currency: String,
    pub amount: i64,
    pub fee: i64,
    /// The user it is recovered from; empty when the platform bears it.
    pub recovered_from: String,
    pub from_wallet: i64,
    pub to_receivable: i64,
    pub fee_charged: i64,
    /// What the platform bears: all of it by policy, or the part the recipient no
    /// longer holds (refunded, or the card-funding fee).
    pub platform_share: i64,
    pub status: String,
    pub reversal_ref: Option<String>,
    pub opened_at_us: i64,
    pub decided_at_us: Option<i64>,
}

impl DisputeRow {
    pub fn money(&self, minor: i64) -> Result<Money> {
        let c = Currency::from_code(&self.currency)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {:?} in disputes", self.currency)))?;
        Ok(Money::from_minor(c, minor))
    }

    pub fn status(&self) -> Result<DisputeStatus> {
        DisputeStatus::from_db(&self.status)
    }
}

pub(crate) const DISPUTE_COLUMNS: &str = "dispute_id, payment_id, processor_ref, capture_ref, currency, amount, fee, \
     recovered_from, from_wallet, to_receivable, fee_charged, platform_share, status, reversal_ref, opened_at_us, \
     decided_at_us";

fn decode(e: Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

impl PaymentStore {
    /// The card payment whose capture has this processor reference.
    pub(crate) async fn payment_by_capture(&self, capture_ref: &str) -> Result<Option<Payment>> {
        let sql = format!("SELECT {COLUMNS} FROM payments WHERE capture_ref = $1");
        let row: Option<PaymentRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(capture_ref).fetch_optional(pool).await)?;
        row.map(Payment::try_from).transpose()
    }

    pub(crate) async fn dispute_by_ref(&self, processor_ref: &str) -> Result<Option<DisputeRow>> {
        let sql = format!("SELECT {DISPUTE_COLUMNS} FROM disputes WHERE processor_ref = $1");
        Ok(with_db!(&self.db, pool => sqlx::query_as(&sql).bind(processor_ref).fetch_optional(pool).await)?)
    }

    /// Records a dispute (once per processor reference) and answers the row as stored:
    /// the first record's split between wallet and receivable is the one booked.
    pub(crate) async fn insert_dispute(&self, d: &DisputeRow) -> Result<DisputeRow> {
        with_db!(&self.writer, pool => sqlx::query(
            "INSERT INTO disputes (dispute_id, payment_id, processor_ref, capture_ref, currency, amount, fee, recovered_from, \
             from_wallet, to_receivable, fee_charged, platform_share, status, opened_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'open', $13) ON CONFLICT (processor_ref) DO NOTHING",
        )
        .bind(&d.dispute_id)
        .bind(&d.payment_id)
        .bind(&d.processor_ref)
        .bind(&d.capture_ref)
        .bind(&d.currency)
        .bind(d.amount)
        .bind(d.fee)
        .bind(&d.recovered_from)
        .bind(d.from_wallet)
        .bind(d.to_receivable)
        .bind(d.fee_charged)
        .bind(d.platform_share)
        .bind(d.opened_at_us)
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.dispute_by_ref(&d.processor_ref)
            .await?
            .ok_or_else(|| Error::internal(anyhow::anyhow!("dispute {} vanished", d.processor_ref)))
    }

    /// A new split of an open dispute whose entry the ledger refused (the wallet was
    /// spent meanwhile): nothing was booked under the old one.
    pub(crate) async fn resplit_dispute(
        &self,
        dispute_id: &DisputeId,
        from_wallet: i64,
        to_receivable: i64,
    ) -> Result<()> {
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE disputes SET from_wallet = $2, to_receivable = $3 WHERE dispute_id = $1 AND status = 'open'",
        )
        .bind(dispute_id)
        .bind(from_wallet)
        .bind(to_receivable)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Marks the dispute's payment DISPUTED with its `payment.disputed` event, once.
    pub(crate) async fn mark_disputed(&self, payment_id: &PaymentId) -> Result<()> {
        self.set_dispute_status(payment_id, None, DisputeStatus::Open, "payment.disputed").await
    }

    /// Decides an open dispute (won or lost) and its payment, with the payment's event,
    /// once: a second call changes nothing.
    pub(crate) async fn decide_dispute(
        &self,
        d: &DisputeRow,
        status: DisputeStatus,
        reversal_ref: Option<&str>,
    ) -> Result<()> {
        let event = if status == DisputeStatus::Won { "payment.dispute_won" } else { "payment.dispute_lost" };
        self.set_dispute_status(&d.payment_id, Some((&d.dispute_id, reversal_ref)), status, event).await
    }

    async fn set_dispute_status(
        &self,
        payment_id: &PaymentId,
        decided: Option<(&DisputeId, Option<&str>)>,
        status: DisputeStatus,
        event: &'static str,
    ) -> Result<()> {
        let now = self.clock.now_us();
        let sql = format!("SELECT {COLUMNS} FROM payments WHERE payment_id = $1");
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let changed = match decided {
                Some((dispute_id, reversal)) => sqlx::query(
                    "UPDATE disputes SET status = $2, decided_at_us = $3, reversal_ref = $4 \
                     WHERE dispute_id = $1 AND status = 'open'",
                )
                .bind(dispute_id)
                .bind(status.as_str())
                .bind(now)
                .bind(reversal)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
                None => 1,
            };
            if changed == 1 {
                // Opening moves only an undisputed payment (a late replay of the opening
                // never reopens a decided dispute); a decision moves only an open one.
                let from = if decided.is_some() { DisputeStatus::Open } else { DisputeStatus::Undisputed };
                let updated = sqlx::query(
                    "UPDATE payments SET dispute_status = $2, updated_at_us = $3 WHERE payment_id = $1 AND dispute_status = $4",
                )
                .bind(payment_id)
                .bind(status.as_str())
                .bind(now)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if updated == 1 {
                    let row: PaymentRow = sqlx::query_as(&sql).bind(payment_id).fetch_one(&mut *tx).await?;
                    let p = Payment::try_from(row).map_err(decode)?;
                    append_event!(tx, now, &EventFields::payment(event, &p));
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        })?;
        self.notify();
        Ok(())
    }

    /// Disputes, newest first, optionally only open ones, before the keyset `before`.
    pub(crate) async fn list_disputes(
        &self,
        open_only: bool,
        before: (i64, String),
        limit: i64,
    ) -> Result<Vec<DisputeRow>> {
        let sql = format!(
            "SELECT {DISPUTE_COLUMNS} FROM disputes WHERE ($1 = 0 OR status = 'open') \
             AND (opened_at_us < $2 OR (opened_at_us = $2 AND dispute_id < $3)) \
             ORDER BY opened_at_us DESC, dispute_id DESC LIMIT $4"
        );
        Ok(with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(i64::from(open_only))
            .bind(before.0)
            .bind(&before.1)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }

    /// The open disputes' count and amount per currency: what is at risk.
    pub(crate) async fn disputes_at_risk(&self) -> Result<Vec<(String, i64, i64)>> {
        Ok(with_db!(&self.db, pool => sqlx::query_as(
            "SELECT currency, COUNT(*), CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM disputes WHERE status = 'open' \
             GROUP BY currency ORDER BY currency",
        )
        .fetch_all(pool)
        .await)?)
    }

    /// Users who owe the platform, with what they owe per currency (minor units), after
    /// the keyset `after` (user, currency), at most `limit`: the receivables with a
    /// balance, found through the disputes that made them.
    pub(crate) async fn debts(&self, after: (&str, &str), limit: i64) -> Result<Vec<(UserId, String, i64)>> {
        let rows: Vec<(String, String, i64)> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT u.recovered_from, a.currency, a.posted_debits - a.posted_credits FROM \
             (SELECT DISTINCT recovered_from, currency FROM disputes WHERE recovered_from <> '') u \
             JOIN ledger_accounts a ON a.code = 'user:' || u.recovered_from || ':receivable:' || u.currency \
             WHERE a.posted_debits > a.posted_credits \
             AND (u.recovered_from > $1 OR (u.recovered_from = $1 AND a.currency > $2)) \
             ORDER BY u.recovered_from, a.currency LIMIT $3",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(|(u, c, owed)| (UserId::from_db(u), c, owed)).collect())
    }
}
