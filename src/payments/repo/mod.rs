//! The payments' tables, written here and nowhere else: `payments`, `payment_events`
//! (and its counter), `payment_spend`, `payment_requests` and `payment_refunds`.
//!
//! The domain modules (sends, bills, refunds, the batch hook) decide; this module
//! turns their decisions into rows, each statement on both backends. The statements of
//! the wallet send's batch, which run inside the posting engine's transaction, are in
//! `pg` and `sqlite`, side by side. Every status change and its event are written in
//! one transaction; events are numbered by one counter row, so the sequence has no gaps.

pub(crate) mod disputes;
pub(crate) mod hub;
pub(crate) mod payouts;
pub(crate) mod pg;
pub(crate) mod refunds;
pub(crate) mod requests;
pub(crate) mod rows;
pub(crate) mod shop;
pub(crate) mod spend;
pub(crate) mod sqlite;
pub(crate) mod tabs;

use super::model::{Payment, PaymentRequest, PaymentStatus};
use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, UserId};
use crate::kernel::reason::Reason;
use crate::store::{is_unique_violation, Db};
use crate::with_db;
use rows::{append_event, EventFields, PaymentRow, RequestRow, COLUMNS, REQUEST_COLUMNS};

pub struct PaymentStore {
    /// Reads.
    db: Db,
    /// Writes outside the engine's batches: on SQLite the engine's own pool
    /// (`EngineHandle::writer`), where they take turns with the batches instead of
    /// polling for the write lock the engine holds nearly all the time during a burst.
    /// None of them holds its connection while it waits for anything but the database.
    writer: Db,
    hub: hub::EventHub,
    clock: Clock,
}

/// The sender's rolling 24-hour limit, checked and counted atomically by `insert`.
pub struct DailyCap {
    /// The sender's wallet in the payment's currency: its row lock serializes the
    /// sender's sends on PostgreSQL.
    pub wallet_account_id: i64,
    /// The tier's limit in minor units of the payment's currency.
    pub max_minor: i64,
}

/// Why `insert` wrote nothing.
enum Refused {
    /// Over the daily limit, given what was sent in the window.
    Daily(i64),
    /// The request this payment would pay is no longer open.
    RequestClosed,
}

pub enum Inserted {
    New(Payment),
    /// Another request with the same key got there first.
    Existing(Payment),
}

impl PaymentStore {
    /// Reads on `db`, writes on `writer`.
    pub fn new(db: Db, writer: Db, clock: Clock) -> Self {
        PaymentStore { db, writer, hub: hub::EventHub::default(), clock }
    }

    /// The clock payment rows and events are stamped with.
    /// The connection writes outside the engine's batches go through.
    pub(crate) fn writer(&self) -> &Db {
        &self.writer
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub async fn get(&self, payment_id: &PaymentId) -> Result<Option<Payment>> {
        let sql = format!("SELECT {COLUMNS} FROM payments WHERE payment_id = $1");
        let row: Option<PaymentRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(payment_id).fetch_optional(pool).await)?;
        row.map(Payment::try_from).transpose()
    }

    pub async fn by_key(&self, sender: &UserId, key: &str) -> Result<Option<(Payment, String)>> {
        let sql = format!("SELECT {COLUMNS}, request_hash FROM payments WHERE sender_id = $1 AND idempotency_key = $2");
        let row: Option<PaymentRowWithHash> = with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(sender)
            .bind(key)
            .fetch_optional(pool)
            .await)?;
        row.map(|r| Ok((Payment::try_from(r.row)?, r.request_hash))).transpose()
    }

    /// Where reads go; writes stay inside this module.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Wakes this process's watchers after an event committed.
    pub fn notify(&self) {
        self.hub.notify();
    }

    pub fn hub(&self) -> &hub::EventHub {
        &self.hub
    }

    /// Inserts a new payment with its first event; the caller holds `claim` on it until
    /// `claimed_until_us` (see `renew`).
    ///
    /// A payment that will move money (not one recorded as failed) is counted against
    /// the sender's rolling 24-hour limit in the same transaction, and the check and the
    /// count are one atomic step: on PostgreSQL the transaction first locks the sender's
    /// wallet row, the lock under which the posting engine checks and counts
    /// wallet-funded sends (`batch`), so card sends, wallet sends and request payments
    /// of one sender take turns; on SQLite the insert that opens the transaction takes
    /// the database's one write lock before the sum is read. A payment over the limit is
    /// rolled back: nothing is written and the answer is `DAILY_LIMIT`.
    pub async fn insert(
        &self,
        p: &Payment,
        key: &str,
        request_hash: &str,
        claim: &Claim,
        claimed_until_us: i64,
        daily: Option<&DailyCap>,
    ) -> Result<Inserted> {
        let event = if p.status == PaymentStatus::Failed { "payment.failed" } else { "payment.created" };
        let on_postgres = matches!(self.writer, Db::Postgres(_));
        let window_start = crate::payments::spend::window_start(self.clock.now_us());
        // An async block, so `?` inside stops here and the unique violation of a
        // concurrent duplicate can be told apart below. It answers the rolling sum that
        // refused the payment, if it was refused.
        let result = with_db!(&self.writer, pool => async {
            let mut tx = pool.begin().await?;
            if let (true, Some(cap), false) = (on_postgres, daily, p.status == PaymentStatus::Failed) {
                sqlx::query("SELECT id FROM ledger_accounts WHERE id = $1 FOR UPDATE")
                    .bind(cap.wallet_account_id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(request_id) = &p.request_id {
                // The request row is the point where paying it and closing it meet: this
                // lock makes a concurrent decline, cancel or expiry wait for the payment
                // row (and then refuse against it), and a request closed first is not
                // paid.
                let open: Option<i64> = sqlx::query_scalar(
                    "UPDATE payment_requests SET updated_at_us = $2 WHERE request_id = $1 AND status = 'open' \
                     AND expires_at_us > $2 RETURNING expires_at_us",
                )
                .bind(request_id)
                .bind(p.created_at_us)
                .fetch_optional(&mut *tx)
                .await?;
                if open.is_none() {
                    return Ok(Err(Refused::RequestClosed));
                }
            }
            sqlx::query(
                "INSERT INTO payments (payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, \
                 fee_amount, status, funding_source, payment_method_token, note, conversation_id, message_id, request_id, \
                 failure_reason, failure_message, idempotency_key, request_hash, created_at_us, updated_at_us, claim, \
                 claimed_until_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $20, $21, $22)",
            )
            .bind(&p.payment_id)
            .bind(&p.sender_id)
            .bind(&p.recipient_id)
            .bind(p.currency().code())
            .bind(p.amount.minor())
            .bind(p.wallet_amount.minor())
            .bind(p.card_amount.minor())
            .bind(p.fee_amount.minor())
            .bind(p.status.as_str())
            .bind(p.funding_source.as_str())
            .bind(&p.payment_method_token)
            .bind(&p.note)
            .bind(&p.conversation_id)
            .bind(&p.message_id)
            .bind(&p.request_id)
            .bind(&p.failure_reason)
            .bind(&p.failure_message)
            .bind(key)
            .bind(request_hash)
            .bind(p.created_at_us)
            .bind(&claim.0)
            .bind(claimed_until_us)
            .execute(&mut *tx)
            .await?;
            if p.status != PaymentStatus::Failed {
                if let Some(cap) = daily {
                    let sent: Option<i64> = sqlx::query_scalar(spend::SUM_SQL)
                        .bind(&p.sender_id)
                        .bind(p.currency().code())
                        .bind(window_start)
                        .fetch_one(&mut *tx)
                        .await?;
                    let sent = sent.unwrap_or(0);
                    if sent.saturating_add(p.amount.minor()) > cap.max_minor {
                        // Dropping the transaction rolls the payment row back.
                        return Ok(Err(Refused::Daily(sent)));
                    }
                }
                spend::change!(tx, spend::ADD_SQL, p);
            }
            append_event!(tx, self.clock.now_us(), &EventFields::payment(event, p));
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(()))
        }
        .await);
        match result {
            Ok(Ok(())) => {
                self.notify();
                Ok(Inserted::New(p.clone()))
            }
            Ok(Err(Refused::Daily(sent))) => {
                let cap = daily.map(|c| c.max_minor).unwrap_or(0);
                Err(crate::payments::model::daily_limit_error(p.currency(), cap, sent))
            }
            Ok(Err(Refused::RequestClosed)) => Err(Error::FailedPrecondition {
                reason: Reason::RequestNotOpen,
                message: "the request is no longer open (paid, declined, cancelled or expired)".into(),
            }),
            Err(e) if is_unique_violation(&e) => match self.by_key(&p.sender_id, key).await? {
                Some((existing, _)) => Ok(Inserted::Existing(existing)),
                // Not the key: the request this payment would pay has a live payment.
                None if p.request_id.is_some() => Err(Error::FailedPrecondition {
                    reason: Reason::RequestNotOpen,
                    message: "this request is already paid or being paid".into(),
                }),
                None => Err(Error::internal(anyhow::anyhow!("payment insert conflict without a row"))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Records processor references as they become known (no event: not a state change).
    pub async fn set_refs(
        &self,
        payment_id: &PaymentId,
        authorization: Option<&str>,
        capture: Option<&str>,
    ) -> Result<()> {
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE payments SET authorization_ref = COALESCE($2, authorization_ref), capture_ref = COALESCE($3, capture_ref), \
             updated_at_us = $4 WHERE payment_id = $1",
        )
        .bind(payment_id)
        .bind(authorization)
        .bind(capture)
        .bind(self.clock.now_us())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Moves a pending payment to SETTLED or FAILED with its event; a payment already
    /// finished is returned as it is. A failure is recorded only by the holder of
    /// `claim` (`None`: anyone): an attempt that lost its claim to the resolver must not
    /// fail a payment the resolver may be settling.
    pub async fn finish(
        &self,
        payment_id: &PaymentId,
        status: PaymentStatus,
        reason: &str,
        message: &str,
        claim: Option<&Claim>,
    ) -> Result<Payment> {
        let now = self.clock.now_us();
        let settled_at = (status == PaymentStatus::Settled).then_some(now);
        let event = match status {
            PaymentStatus::Settled => "payment.settled",
            _ => "payment.failed",
        };
        let sql = format!("SELECT {COLUMNS} FROM payments WHERE payment_id = $1");
        let row: Option<PaymentRow> = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            // The payment's request row first, if it has one: `insert` takes a request's
            // row before it writes a payment, and a second payment's insert waits on this
            // payment's row (the unique index of live payments per request), so taking
            // the payment's row first here could deadlock with it. A write, so that on
            // SQLite the transaction holds the write lock before it reads.
            sqlx::query(
                "UPDATE payment_requests SET updated_at_us = updated_at_us \
                 WHERE request_id = (SELECT request_id FROM payments WHERE payment_id = $1)",
            )
            .bind(payment_id)
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(
                "UPDATE payments SET status = $2, failure_reason = $3, failure_message = $4, settled_at_us = $5, \
                 updated_at_us = $6 WHERE payment_id = $1 AND status = 'pending' AND ($7 IS NULL OR claim = $7)",
            )
            .bind(payment_id)
            .bind(status.as_str())
            .bind(reason)
            .bind(message)
            .bind(settled_at)
            .bind(now)
            .bind(claim.map(|c| c.0.as_str()))
            .execute(&mut *tx)
            .await?;
            let row: Option<PaymentRow> = sqlx::query_as(&sql).bind(payment_id).fetch_optional(&mut *tx).await?;
            if done.rows_affected() == 1 {
                if let Some(r) = &row {
                    let p = Payment::try_from(r.clone()).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    // The request row (locked above) is marked paid before the spend bucket
                    // and the event counter are taken: the order `insert` and a request's
                    // close take them in too.
                    let mut paid = None;
                    if let (Some(request_id), PaymentStatus::Settled) = (&p.request_id, status) {
                        let sql = format!("UPDATE payment_requests SET status = 'paid', payment_id = $2, updated_at_us = $3 \
                             WHERE request_id = $1 AND status = 'open' RETURNING {}", REQUEST_COLUMNS);
                        let row: Option<RequestRow> =
                            sqlx::query_as(&sql).bind(request_id).bind(&p.payment_id).bind(now).fetch_optional(&mut *tx).await?;
                        paid = row
                            .map(PaymentRequest::try_from)
                            .transpose()
                            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    }
                    if status == PaymentStatus::Failed {
                        // A failed payment no longer counts against the daily limit.
                        spend::change!(tx, spend::SUB_SQL, &p);
                    }
                    append_event!(tx, self.clock.now_us(), &EventFields::payment(event, &p));
                    if let Some(req) = paid {
                        append_event!(tx, self.clock.now_us(), &EventFields::request("request.paid", &req));
                    }
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        self.notify();
        row.map(Payment::try_from)
            .transpose()?
            .ok_or_else(|| Error::internal(anyhow::anyhow!("payment {payment_id} vanished")))
    }

    /// The caller's payments, newest first, optionally in one conversation.
    pub async fn list(
        &self,
        user: &str,
        conversation: &str,
        before: (i64, String),
        limit: i64,
    ) -> Result<Vec<Payment>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM payments WHERE (sender_id = $1 OR recipient_id = $1) \
             AND ($2 = '' OR conversation_id = $2) \
             AND (created_at_us < $3 OR (created_at_us = $3 AND payment_id < $4)) \
             ORDER BY created_at_us DESC, payment_id DESC LIMIT $5"
        );
        let rows: Vec<PaymentRow> = with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(user)
            .bind(conversation)
            .bind(before.0)
            .bind(&before.1)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(Payment::try_from).collect()
    }

    /// Takes over pending payments whose claim has run out (their attempt crashed or
    /// stalled), each by a conditional update, so that two resolvers, or a resolver and
    /// a live attempt, never work on one payment at once. The new claim lasts `lease_us`.
    pub async fn claim_stale(&self, lease_us: i64, limit: i64) -> Result<Vec<(Payment, Claim)>> {
        let now = self.clock.now_us();
        let sql = format!(
            "SELECT {COLUMNS} FROM payments WHERE status = 'pending' AND (claimed_until_us IS NULL OR claimed_until_us < $1) \
             ORDER BY updated_at_us LIMIT $2"
        );
        let rows: Vec<PaymentRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(now).bind(limit).fetch_all(pool).await)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let p = Payment::try_from(row)?;
            let claim = Claim::new();
            let taken = with_db!(&self.writer, pool => sqlx::query(
                "UPDATE payments SET claim = $2, claimed_until_us = $3, updated_at_us = $4 \
                 WHERE payment_id = $1 AND status = 'pending' AND (claimed_until_us IS NULL OR claimed_until_us < $4)",
            )
            .bind(&p.payment_id)
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

    /// Extends `claim` on a pending payment by `lease_us` from now; false when the
    /// payment is no longer pending or someone else holds it (the resolver took over).
    pub async fn renew(&self, payment_id: &PaymentId, claim: &Claim, lease_us: i64) -> Result<bool> {
        let now = self.clock.now_us();
        let renewed = with_db!(&self.writer, pool => sqlx::query(
            "UPDATE payments SET claimed_until_us = $3, updated_at_us = $4 \
             WHERE payment_id = $1 AND status = 'pending' AND claim = $2",
        )
        .bind(payment_id)
        .bind(&claim.0)
        .bind(now.saturating_add(lease_us))
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected() == 1))?;
        Ok(renewed)
    }
}

/// The right to finish a pending payment, held by one attempt at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim(String);

impl Claim {
    pub fn new() -> Self {
        Claim(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl Default for Claim {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(sqlx::FromRow)]
struct PaymentRowWithHash {
    #[sqlx(flatten)]
    row: PaymentRow,
    request_hash: String,
}

/// A payment the batch writes: the payment, its idempotency key and its request's hash.
pub(crate) type BatchPayment<'a> = (&'a Payment, &'a str, &'a str);

/// One rolling-limit bucket's increase in a batch: (sender, currency, hour), amount.
pub(crate) type BatchSpend<'a> = ((&'a str, &'a str, i64), i64);

/// What the batch hook's `prepare` reads on either backend: keys already used (sender,
/// key, payment id, request hash), the parties' accounts (user, tier, status), the
/// senders' spend in the window (sender, currency, amount), and the purchases' reads
/// (`shop::PreparedRow`s, kinds 4 to 6).
pub(crate) type Prepared = (
    Vec<(String, String, String, String)>,
    Vec<(String, String, String)>,
    Vec<(String, String, i64)>,
    Vec<shop::PreparedRow>,
);

/// The purchases' part of `prepare`: (buyer, key) pairs used, the listings, and the
/// (listing, buyer) pairs whose units bought are counted.
#[derive(Default)]
pub(crate) struct ShopKeys<'a> {
    pub keys: Vec<(&'a str, &'a str)>,
    pub listings: Vec<&'a str>,
    pub pairs: Vec<(&'a str, &'a str)>,
}

/// Splits `prepare`'s one result set, whose first column tells the reads apart (1: a
/// key already used, 2: an account, 3: a sender's spend, 4 to 6: the purchases'), into
/// `Prepared`.
fn split_prepared<K: Into<i64>>(rows: Vec<(K, String, String, String, String, i64)>) -> Prepared {
    let (mut existing, mut accounts, mut sums, mut shop) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (kind, a, b, c, d, n) in rows {
        match kind.into() {
            1 => existing.push((a, b, c, d)),
            2 => accounts.push((a, b, c)),
            3 => sums.push((a, b, n)),
            k => shop.push((k, a, b, c, d, n)),
        }
    }
    (existing, accounts, sums, shop)
}
