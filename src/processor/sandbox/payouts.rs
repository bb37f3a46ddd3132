//! The sandbox's payouts: push to card, and the returns it reports afterwards.
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
            // processor recorded decides, as a real network's return would.
            if let Some(row) = self.find(key).await? {
                if row.status == "succeeded" {
                    self.return_payout(&row.reference, amount).await?;
                }
            }
        }
        answer
    }

    /// Records the return of a paid payout (a call of its own, for the settlement
    /// report) and its notification, once however often it is asked.
    async fn return_payout(&self, payout_reference: &str, amount: Money) -> Result<(), ProcessorError> {
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
        let now = self.clock.now_us();
        let insert = "INSERT INTO sandbox_processor_notifications (kind, reference, event_reference, amount, currency, \
                      created_at_us) VALUES ('payout.returned', $1, $2, $3, $4, $5) ON CONFLICT (event_reference) DO NOTHING";
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
                    .bind(payout_reference)
                    .bind(&row.reference)
                    .bind(amount.minor())
                    .bind(amount.currency().code())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|_| unavailable())?;
                tx.commit().await.map_err(|_| unavailable())?;
            }
            // SQLite commits one writer at a time, in the order it numbers the rows.
            Db::Sqlite(pool) => {
                sqlx::query(insert)
                    .bind(payout_reference)
                    .bind(&row.reference)
                    .bind(amount.minor())
                    .bind(amount.currency().code())
                    .bind(now)
                    .execute(pool)
                    .await
                    .map_err(|_| unavailable())?;
            }
        }
        Ok(())
    }

    pub(super) async fn read_notifications(&self, after: i64, limit: i64) -> Result<Vec<Notification>, ProcessorError> {
        let limit = limit.clamp(1, crate::processor::NOTIFICATIONS_PAGE_MAX);
        let rows: Vec<(i64, String, String, String, i64, String, i64)> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT sequence, kind, reference, event_reference, amount, currency, created_at_us \
             FROM sandbox_processor_notifications WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(|_| unavailable())?;
        let mut out = Vec::with_capacity(rows.len());
        for (sequence, kind, reference, event_reference, amount, currency, at_us) in rows {
            let kind = match kind.as_str() {
                "payout.returned" => NotificationKind::PayoutReturned,
                other => return Err(ProcessorError::Failed(format!("unknown notification kind {other}"))),
            };
            let currency =
                Currency::from_code(&currency).ok_or_else(|| ProcessorError::Failed("unknown currency".into()))?;
            out.push(Notification {
                sequence,
                kind,
                reference,
                event_reference,
                amount: Money::from_minor(currency, amount),
                at_us,
            });
        }
        Ok(out)
    }
}
