//! Payouts' rows (`payouts`), their events, and the cursor over the processor's
//! notifications (`processor_cursors`).

use super::rows::{append_event, EventFields};
use super::{Claim, PaymentStore};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PayoutId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
use crate::payments::payout::{self as model, Payout, PayoutStatus};
use crate::store::{is_unique_violation, Db};
use crate::with_db;

pub(crate) const PAYOUT_COLUMNS: &str = "payout_id, user_id, currency, amount, fee, speed, payment_method_token, \
     card_last4, status, failure_reason, failure_message, processor_ref, return_ref, hold_entry_id, created_at_us, \
     paid_at_us, returned_at_us";

#[derive(Clone, sqlx::FromRow)]
pub(crate) struct PayoutRow {
    payout_id: String,
    user_id: String,
    currency: String,
    amount: i64,
    fee: i64,
    speed: String,
    payment_method_token: String,
    card_last4: String,
    status: String,
    failure_reason: String,
    failure_message: String,
    processor_ref: Option<String>,
    return_ref: Option<String>,
    hold_entry_id: Option<String>,
    created_at_us: i64,
    paid_at_us: Option<i64>,
    returned_at_us: Option<i64>,
}

impl TryFrom<PayoutRow> for Payout {
    type Error = Error;
    fn try_from(r: PayoutRow) -> Result<Self> {
        let c = Currency::from_code(&r.currency)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {:?} in payouts", r.currency)))?;
        Ok(Payout {
            payout_id: PayoutId::from_db(r.payout_id),
            user_id: UserId::from_db(r.user_id),
            amount: Money::from_minor(c, r.amount),
            fee: Money::from_minor(c, r.fee),
            speed: model::speed_from_db(&r.speed)?,
            payment_method_token: r.payment_method_token,
            card_last4: r.card_last4,
            status: PayoutStatus::from_db(&r.status)?,
            failure_reason: r.failure_reason,
            failure_message: r.failure_message,
            processor_ref: r.processor_ref,
            return_ref: r.return_ref,
            hold_entry_id: r.hold_entry_id,
            created_at_us: r.created_at_us,
            paid_at_us: r.paid_at_us,
            returned_at_us: r.returned_at_us,
        })
    }
}

fn decode(e: Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

/// What `insert_payout` checks atomically with the row, besides the key.
pub(crate) struct PayoutChecks {
    /// The user's wallet in the payout's currency: on PostgreSQL its row lock
    /// serializes the user's payouts with each other and with the posting engine.
    pub wallet_account_id: i64,
    /// The tier's rolling 24-hour payout limit, minor units.
    pub daily_max_minor: i64,
    /// Since when money received from card-funded payments cannot be cashed out
    /// instantly (`None`: no such hold applies).
    pub card_money_since_us: Option<i64>,
}

/// Why `insert_payout` wrote nothing.
enum Refused {
    Daily(i64),
    Insufficient(i64),
    OnHold(i64),
}

pub(crate) enum InsertedPayout {
    New(Payout),
    /// Another call with the same key got there first.
    Existing(Payout, String),
}

impl PaymentStore {
    pub(crate) async fn payout(&self, payout_id: &PayoutId) -> Result<Option<Payout>> {
        let sql = format!("SELECT {PAYOUT_COLUMNS} FROM payouts WHERE payout_id = $1");
        let row: Option<PayoutRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(payout_id).fetch_optional(pool).await)?;
        row.map(Payout::try_from).transpose()
    }

    pub(crate) async fn payout_by_key(&self, user: &UserId, key: &str) -> Result<Option<(Payout, String)>> {
        let sql =
            format!("SELECT {PAYOUT_COLUMNS}, request_hash FROM payouts WHERE user_id = $1 AND idempotency_key = $2");
        let row: Option<PayoutRowWithHash> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(user).bind(key).fetch_optional(pool).await)?;
        row.map(|r| Ok((Payout::try_from(r.row)?, r.request_hash))).transpose()
    }

    pub(crate) async fn payout_by_ref(&self, processor_ref: &str) -> Result<Option<Payout>> {
        let sql = format!("SELECT {PAYOUT_COLUMNS} FROM payouts WHERE processor_ref = $1");
        let row: Option<PayoutRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(processor_ref).fetch_optional(pool).await)?;
        row.map(Payout::try_from).transpose()
    }

    /// The user's payouts, newest first, before the keyset `before`.
    pub(crate) async fn list_payouts(&self, user: &UserId, before: (i64, String), limit: i64) -> Result<Vec<Payout>> {
        let sql = format!(
            "SELECT {PAYOUT_COLUMNS} FROM payouts WHERE user_id = $1 \
             AND (created_at_us < $2 OR (created_at_us = $2 AND payout_id < $3)) \
             ORDER BY created_at_us DESC, payout_id DESC LIMIT $4"
        );
        let rows: Vec<PayoutRow> = with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(user)
            .bind(before.0)
            .bind(&before.1)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(Payout::try_from).collect()
    }

    /// Inserts a new payout with its `payout.created` event, the caller holding `claim`
    /// on it until `claimed_until_us`. In the same transaction, and as one atomic step
    /// with the insert, it checks the rolling 24-hour payout limit, that the wallet's
    /// available balance covers this payout and every other payout not yet held in the
    /// ledger, and the instant hold on card money: on PostgreSQL under the wallet row's
    /// lock, on SQLite under the database's write lock that the insert takes first. A
    /// refused payout is rolled back: nothing is written.
    pub(crate) async fn insert_payout(
        &self,
        p: &Payout,
        key: &str,
        request_hash: &str,
        claim: &Claim,
        claimed_until_us: i64,
        checks: &PayoutChecks,
    ) -> Result<InsertedPayout> {
        let on_postgres = matches!(self.writer, Db::Postgres(_));
        let window_start = p.created_at_us - 86_400_000_000;
        let result = with_db!(&self.writer, pool => async {
            let mut tx = pool.begin().await?;
            if on_postgres {
                sqlx::query("SELECT id FROM ledger_accounts WHERE id = $1 FOR UPDATE")
                    .bind(checks.wallet_account_id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO payouts (payout_id, user_id, currency, amount, fee, speed, payment_method_token, card_last4, \
                 status, idempotency_key, request_hash, claim, claimed_until_us, created_at_us, updated_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, $11, $12, $13, $13)",
            )
            .bind(&p.payout_id)
            .bind(&p.user_id)
            .bind(p.currency().code())
            .bind(p.amount.minor())
            .bind(p.fee.minor())
            .bind(model::speed_as_str(p.speed))
            .bind(&p.payment_method_token)
            .bind(&p.card_last4)
            .bind(key)
            .bind(request_hash)
            .bind(&claim.0)
            .bind(claimed_until_us)
            .bind(p.created_at_us)
            .execute(&mut *tx)
            .await?;
            // Everything this user has paid out in the window, this payout included.
            let paid_out: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM payouts WHERE user_id = $1 AND currency = $2 \
                 AND created_at_us >= $3 AND status <> 'failed'",
            )
            .bind(&p.user_id)
            .bind(p.currency().code())
            .bind(window_start)
            .fetch_one(&mut *tx)
            .await?;
            if paid_out > checks.daily_max_minor {
                return Ok(Err(Refused::Daily(paid_out - p.amount.minor())));
            }
            // The wallet's available balance, less the payouts accepted but not yet held
            // by the ledger (this one included): the ledger's hold checks the balance
            // again, but a payout it would refuse should not be accepted at all. A hold
            // is committed with its idempotency key, in the same transaction that takes
            // the money from the available balance, so the key tells exactly which
            // payouts the balance already counts.
            let available: i64 = sqlx::query_scalar(
                "SELECT posted_credits - posted_debits - pending_debits FROM ledger_accounts WHERE id = $1",
            )
            .bind(checks.wallet_account_id)
            .fetch_one(&mut *tx)
            .await?;
            let unheld: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM payouts WHERE user_id = $1 AND currency = $2 \
                 AND status = 'pending' AND hold_entry_id IS NULL AND NOT EXISTS (SELECT 1 FROM idempotency_keys k \
                 WHERE k.caller = $3 AND k.key = 'payout:' || payouts.payout_id || ':hold')",
            )
            .bind(&p.user_id)
            .bind(p.currency().code())
            .bind(crate::ledger::callers::PAYMENTS)
            .fetch_one(&mut *tx)
            .await?;
            let free = available.saturating_sub(unheld);
            if free < 0 {
                return Ok(Err(Refused::Insufficient(free.saturating_add(p.amount.minor()).max(0))));
            }
            if let Some(since) = checks.card_money_since_us {
                let card_money: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(card_amount - refunded_amount), 0) AS BIGINT) FROM payments WHERE recipient_id = $1 \
                     AND currency = $2 AND created_at_us >= $3 AND card_amount > 0 \
                     AND status IN ('settled', 'partially_refunded')",
                )
                .bind(&p.user_id)
                .bind(p.currency().code())
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
                if free < card_money {
                    return Ok(Err(Refused::OnHold(card_money)));
                }
            }
            append_event!(tx, self.clock.now_us(), &EventFields::payout("payout.created", p));
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(()))
        }
        .await);
        let currency = p.currency();
        match result {
            Ok(Ok(())) => {
                self.notify();
                Ok(InsertedPayout::New(p.clone()))
            }
            Ok(Err(Refused::Daily(paid_out))) => {
                Err(model::daily_payout_error(currency, checks.daily_max_minor, paid_out))
            }
            Ok(Err(Refused::Insufficient(free))) => Err(Error::FailedPrecondition {
                reason: Reason::InsufficientFunds,
                message: format!("your wallet has {} available to cash out", Money::from_minor(currency, free)),
            }),
            Ok(Err(Refused::OnHold(held))) => Err(Error::FailedPrecondition {
                reason: Reason::FundsOnHold,
                message: format!(
                    "{} you received from card payments cannot be cashed out instantly yet; a standard payout can",
                    Money::from_minor(currency, held)
                ),
            }),
            Err(e) if is_unique_violation(&e) => match self.payout_by_key(&p.user_id, key).await? {
                Some((existing, hash)) => Ok(InsertedPayout::Existing(existing, hash)),
                None => Err(Error::internal(anyhow::anyhow!("payout insert conflict without a row"))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Records what became known about a pending payout (no event: not a state
    /// change): the ledger entry holding its money, the processor's reference.
    pub(crate) async fn set_payout_refs(
        &self,
        payout_id: &PayoutId,
        hold_entry_id: Option<&str>,
        processor_ref: Option<&str>,
    ) -> Result<()> {
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE payouts SET hold_entry_id = COALESCE($2, hold_entry_id), processor_ref = COALESCE($3, processor_ref), \
             updated_at_us = $4 WHERE payout_id = $1",
        )
        .bind(payout_id)
        .bind(hold_entry_id)
        .bind(processor_ref)
        .bind(self.clock.now_us())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Moves a pending payout to PAID or FAILED with its event; a payout already
    /// finished is returned as it is. A failure is recorded only by the holder of
    /// `claim` (`None`: anyone), as for payments. A FAILED payout may still become PAID:
    /// the resolver can give up on a payout (its card removed) while the attempt it took
    /// over still waits for a push that then succeeds; the card was paid and the money
    /// booked, so PAID is the truth, announced by a `payout.paid` after the failure.
    pub(crate) async fn finish_payout(
        &self,
        payout_id: &PayoutId,
        status: PayoutStatus,
        reason: &str,
        message: &str,
        claim: Option<&Claim>,
    ) -> Result<Payout> {
        let now = self.clock.now_us();
        let event = if status == PayoutStatus::Paid { "payout.paid" } else { "payout.failed" };
        let paid_at = (status == PayoutStatus::Paid).then_some(now);
        let sql = format!("SELECT {PAYOUT_COLUMNS} FROM payouts WHERE payout_id = $1");
        let row: Option<PayoutRow> = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(
                "UPDATE payouts SET status = $2, failure_reason = $3, failure_message = $4, paid_at_us = $5, \
                 updated_at_us = $6, claim = NULL, claimed_until_us = NULL \
                 WHERE payout_id = $1 AND ($7 IS NULL OR claim = $7) \
                 AND (status = 'pending' OR (status = 'failed' AND $2 = 'paid'))",
            )
            .bind(payout_id)
            .bind(status.as_str())
            .bind(reason)
            .bind(message)
            .bind(paid_at)
            .bind(now)
            .bind(claim.map(|c| c.0.as_str()))
            .execute(&mut *tx)
            .await?;
            let row: Option<PayoutRow> = sqlx::query_as(&sql).bind(payout_id).fetch_optional(&mut *tx).await?;
            if done.rows_affected() == 1 {
                if let Some(r) = &row {
                    let p = Payout::try_from(r.clone()).map_err(decode)?;
                    append_event!(tx, now, &EventFields::payout(event, &p));
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        self.notify();
        row.map(Payout::try_from)
            .transpose()?
            .ok_or_else(|| Error::internal(anyhow::anyhow!("payout {payout_id} vanished")))
    }

    /// Moves a PAID payout to RETURNED with its event (once: a second call changes
    /// nothing) and answers the payout as it is.
    pub(crate) async fn return_payout(&self, payout_id: &PayoutId, return_ref: &str) -> Result<Payout> {
        let now = self.clock.now_us();
        let sql = format!("SELECT {PAYOUT_COLUMNS} FROM payouts WHERE payout_id = $1");
        let row: Option<PayoutRow> = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(
                "UPDATE payouts SET status = 'returned', return_ref = $2, returned_at_us = $3, updated_at_us = $3 \
                 WHERE payout_id = $1 AND status = 'paid'",
            )
            .bind(payout_id)
            .bind(return_ref)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let row: Option<PayoutRow> = sqlx::query_as(&sql).bind(payout_id).fetch_optional(&mut *tx).await?;
            if done.rows_affected() == 1 {
                if let Some(r) = &row {
                    let p = Payout::try_from(r.clone()).map_err(decode)?;
                    append_event!(tx, now, &EventFields::payout("payout.returned", &p));
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        self.notify();
        row.map(Payout::try_from)
            .transpose()?
            .ok_or_else(|| Error::internal(anyhow::anyhow!("payout {payout_id} vanished")))
    }

    /// Takes over pending payouts whose claim ran out, each by a conditional update,
    /// as `claim_stale` does for payments.
    pub(crate) async fn claim_stale_payouts(&self, lease_us: i64, limit: i64) -> Result<Vec<(Payout, Claim)>> {
        let now = self.clock.now_us();
        let sql = format!(
            "SELECT {PAYOUT_COLUMNS} FROM payouts WHERE status = 'pending' \
             AND (claimed_until_us IS NULL OR claimed_until_us < $1) ORDER BY updated_at_us LIMIT $2"
        );
        let rows: Vec<PayoutRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(now).bind(limit).fetch_all(pool).await)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let p = Payout::try_from(row)?;
            let claim = Claim::new();
            let taken = with_db!(&self.writer, pool => sqlx::query(
                "UPDATE payouts SET claim = $2, claimed_until_us = $3, updated_at_us = $4 \
                 WHERE payout_id = $1 AND status = 'pending' AND (claimed_until_us IS NULL OR claimed_until_us < $4)",
            )
            .bind(&p.payout_id)
            .bind(&claim.0)
            .bind(now.saturating_add(lease_us))
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1))?;
            if taken {
                claimed.push((p, claim));
            }
        }
        Ok(claimed)
    }

    /// Extends `claim` on a pending payout; false when it is no longer pending or
    /// someone else holds it.
    pub(crate) async fn renew_payout(&self, payout_id: &PayoutId, claim: &Claim, lease_us: i64) -> Result<bool> {
        let now = self.clock.now_us();
        let renewed = with_db!(&self.writer, pool => sqlx::query(
            "UPDATE payouts SET claimed_until_us = $3, updated_at_us = $4 \
             WHERE payout_id = $1 AND status = 'pending' AND claim = $2",
        )
        .bind(payout_id)
        .bind(&claim.0)
        .bind(now.saturating_add(lease_us))
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected() == 1))?;
        Ok(renewed)
    }

    /// The last processor notification applied, 0 before the first.
    pub(crate) async fn processor_cursor(&self, processor: &str) -> Result<i64> {
        let n: Option<i64> = with_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT last_sequence FROM processor_cursors WHERE processor = $1",
        )
        .bind(processor)
        .fetch_optional(pool)
        .await)?;
        Ok(n.unwrap_or(0))
    }

    /// Moves the cursor forward (never back).
    pub(crate) async fn advance_processor_cursor(&self, processor: &str, sequence: i64) -> Result<()> {
        with_db!(&self.writer, pool => sqlx::query(
            "INSERT INTO processor_cursors (processor, last_sequence) VALUES ($1, $2) \
             ON CONFLICT (processor) DO UPDATE SET last_sequence = excluded.last_sequence \
             WHERE processor_cursors.last_sequence < excluded.last_sequence",
        )
        .bind(processor)
        .bind(sequence)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct PayoutRowWithHash {
    #[sqlx(flatten)]
    row: PayoutRow,
    request_hash: String,
}
