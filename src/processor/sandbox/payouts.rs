//! The sandbox's payouts (push to card, and the returns it reports afterwards) and its
//! notifications.
//!
//! Test cards (any other valid card that approves charges is a debit card that takes
//! both speeds; a card that declines charges declines payouts the same way):
//!
//! | card | payout |
//! |---|---|
//! | 4000056655665556 | a debit card: standard and instant paid |
//! | 4000000000004202 | a credit card: standard paid, instant not supported |
//! | 4000000000004210 | the payout fails (declined by the issuer) |
//! | 4000000000004228 | paid, then returned (the card was closed): a `payout.returned` notification |

use super::{NewCall, Sandbox};
use crate::kernel::money::{Currency, Money};
use crate::processor::{
    CallKind, CardDetails, DeclineCode, Notification, NotificationKind, PayoutSpeed, PayoutSupport, ProcessorError,
};
use crate::store::Db;
use crate::with_db;

/// A credit card: standard payouts only.
pub const CREDIT_CARD: &str = "4000000000004202";
/// Every payout to it is declined.
pub const PAYOUT_DECLINED: &str = "4000000000004210";
/// Every payout to it is paid and then returned.
pub const PAYOUT_RETURNED: &str = "4000000000004228";

pub(super) fn support(pan: &str) -> PayoutSupport {
    PayoutSupport { standard: true, instant: pan != CREDIT_CARD }
}

fn unavailable() -> ProcessorError {
    ProcessorError::Failed("sandbox storage unavailable".into())
}

impl Sandbox {
    pub(super) async fn push_to_card(
        &self,
        key: &str,
        card: CardDetails<'_>,
        amount: Money,
        speed: PayoutSpeed,
    ) -> Result<String, ProcessorError> {
        let pan = card.pan.expose();
        let outcome = if speed == PayoutSpeed::Instant && !support(pan).instant {
            Err(ProcessorError::Failed("the card cannot receive instant payouts".into()))
        } else if pan == PAYOUT_DECLINED {
            Err(ProcessorError::Declined(DeclineCode::CardDeclined))
        } else {
            Self::card_result(&card, true)
        };
        let last4 = card.pan.last4().to_owned();
        let answer = self
            .call(NewCall {
                key,
                kind: CallKind::Payout,
                related: None,
                amount: Some(amount),
                fee: 0,
                outcome,
                last4: Some(&last4),
            })
            .await;
        if pan == PAYOUT_RETURNED {
            // Also when the caller heard nothing (a timeout after processing): what the
            // processor recorded decides, as a real network's return would. A failure
            // here must not change the answer about a card already paid.
            let returned = async {
                match self.find(key).await? {
                    Some(row) if row.status == "succeeded" => self.return_payout(key, &row.reference, amount).await,
                    _ => Ok(()),
                }
            };
            if let Err(e) = returned.await {
                tracing::error!(error = %e, "the sandbox could not record a payout's return");
            }
        }
        answer
    }

    /// Records the return of a paid payout (a call of its own, for the settlement
    /// report) and its notification, once however often it is asked.
    async fn return_payout(
        &self,
        payout_key: &str,
        payout_reference: &str,
        amount: Money,
    ) -> Result<(), ProcessorError> {
        let key = format!("return:{payout_reference}");
        let row = self
            .record(NewCall {
                key: &key,
                kind: CallKind::PayoutReturn,
                related: Some(payout_reference),
                amount: Some(amount),
                fee: 0,
                outcome: Ok(()),
                last4: None,
            })
            .await?;
        self.notify("payout.returned", payout_key, payout_reference, &row.reference, amount, 0).await
    }

    /// Records a notification, once per `event_reference`, numbered in commit order.
    pub(super) async fn notify(
        &self,
        kind: &str,
        call_key: &str,
        reference: &str,
        event_reference: &str,
        amount: Money,
        fee: i64,
    ) -> Result<(), ProcessorError> {
        let now = self.clock.now_us();
        let insert = "INSERT INTO sandbox_processor_notifications (kind, reference, event_reference, amount, fee, \
                      currency, created_at_us, call_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                      ON CONFLICT (event_reference) DO NOTHING";
        match &self.db {
            Db::Postgres(pool) => {
                // Sequence numbers are taken at insert and become visible at commit; the
                // table lock makes them commit in order, so a reader that resumes after
                // the last number it saw never skips one committed later.
                let mut tx = pool.begin().await.map_err(|_| unavailable())?;
                sqlx::query("LOCK TABLE sandbox_processor_notifications IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .map_err(|_| unavailable())?;
                sqlx::query(insert)
                    .bind(kind)
                    .bind(reference)
                    .bind(event_reference)
                    .bind(amount.minor())
                    .bind(fee)
                    .bind(amount.currency().code())
                    .bind(now)
                    .bind(call_key)
                    .execute(&mut *tx)
                    .await
                    .map_err(|_| unavailable())?;
                tx.commit().await.map_err(|_| unavailable())?;
            }
            // SQLite commits one writer at a time, in the order it numbers the rows.
            Db::Sqlite(pool) => {
                sqlx::query(insert)
                    .bind(kind)
                    .bind(reference)
                    .bind(event_reference)
                    .bind(amount.minor())
                    .bind(fee)
                    .bind(amount.currency().code())
                    .bind(now)
                    .bind(call_key)
                    .execute(pool)
                    .await
                    .map_err(|_| unavailable())?;
            }
        }
        Ok(())
    }

    pub(super) async fn read_notifications(&self, after: i64, limit: i64) -> Result<Vec<Notification>, ProcessorError> {
        let limit = limit.clamp(1, crate::processor::NOTIFICATIONS_PAGE_MAX);
        let rows: Vec<NotificationRow> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT sequence, kind, reference, event_reference, amount, fee, currency, created_at_us, call_key \
             FROM sandbox_processor_notifications WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(|_| unavailable())?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind = match r.kind.as_str() {
                "payout.returned" => NotificationKind::PayoutReturned,
                "dispute.opened" => NotificationKind::DisputeOpened,
                "dispute.won" => NotificationKind::DisputeWon,
                "dispute.lost" => NotificationKind::DisputeLost,
                other => return Err(ProcessorError::Failed(format!("unknown notification kind {other}"))),
            };
            let currency =
                Currency::from_code(&r.currency).ok_or_else(|| ProcessorError::Failed("unknown currency".into()))?;
            out.push(Notification {
                sequence: r.sequence,
                kind,
                reference: r.reference,
                event_reference: r.event_reference,
                amount: Money::from_minor(currency, r.amount),
                fee: Money::from_minor(currency, r.fee),
                at_us: r.created_at_us,
                call_key: r.call_key,
            });
        }
        Ok(out)
    }
}

#[derive(sqlx::FromRow)]
struct NotificationRow {
    sequence: i64,
    kind: String,
    reference: String,
    event_reference: String,
    amount: i64,
    fee: i64,
    currency: String,
    created_at_us: i64,
    call_key: String,
}
