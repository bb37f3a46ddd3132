//! Reading the outbox for `WatchPayments`: stored events after a sequence, then live
//! ones. The outbox is the only buffer: a watcher reads it in bounded pages, so a slow
//! consumer costs the server a cursor, never memory.

use std::collections::HashMap;

use serde::Deserialize;

use super::model::{PaymentRequest, RequestStatus};
use super::payout::{Payout, PayoutStatus};
use super::repo::payouts::{PayoutRow, PAYOUT_COLUMNS};
use super::repo::rows::{PaymentRow, RequestRow, COLUMNS, REQUEST_COLUMNS};
use super::{Payment, PaymentStatus};
use crate::kernel::error::Result;
use crate::kernel::ids::{PaymentId, PayoutId, RequestId};
use crate::kernel::money::Money;
use crate::store::{json_rows, Db};
use crate::with_db;

/// Events read per query.
pub const PAGE_MAX: i64 = 200;

/// One outbox row, decoded.
#[derive(Debug, Clone)]
pub struct Event {
    pub sequence: i64,
    pub event_type: String,
    /// Whom it concerns: the sender and recipient of a payment, the requester and payer
    /// of a request.
    pub party_a: String,
    pub party_b: String,
    pub conversation_id: String,
    pub payment: Option<Payment>,
    pub request: Option<PaymentRequest>,
    /// The payout, on `payout.*` events.
    pub payout: Option<Payout>,
    /// The purchase and its listing's units sold right after the change, on
    /// `purchase.*` events.
    pub purchase: Option<(super::shop::Purchase, i64)>,
    pub occurred_at_us: i64,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    sequence: i64,
    event_type: String,
    party_a: String,
    party_b: String,
    conversation_id: String,
    payment_id: Option<String>,
    request_id: Option<String>,
    /// A JSON copy of the payment or request, in events written before the state moved
    /// to typed columns (migration 0008); empty since.
    snapshot: String,
    status: String,
    refunded_amount: i64,
    failure_reason: String,
    failure_message: String,
    authorization_ref: Option<String>,
    capture_ref: Option<String>,
    settled_at_us: Option<i64>,
    payout_id: Option<String>,
    purchase_id: Option<String>,
    units_sold: Option<i64>,
    occurred_at_us: i64,
}

/// A legacy event's JSON copy: the row's columns under their names.
#[derive(Deserialize)]
#[serde(untagged)]
enum Snapshot {
    Payment(Box<PaymentRow>),
    Request(Box<RequestRow>),
}

pub use super::repo::hub::EventHub;

/// Events after `after`, for `user` (every user's when `None`), optionally in one
/// conversation, in sequence order. Each event's payment or request is its row as it is
/// now, with the state the event recorded laid over it, so a replayed
/// `payment.created` still shows the payment as it was then.
pub async fn read(db: &Db, user: Option<&str>, conversation: &str, after: i64) -> Result<Vec<Event>> {
    // One user's events come through the two party indexes, each an index range from
    // the cursor: `party_a = $2 OR party_b = $2` in one query reads the whole table's
    // range after the cursor instead (150 ms a poll at a million events on SQLite).
    const COLUMNS: &str = "sequence, event_type, party_a, party_b, conversation_id, payment_id, request_id, snapshot, status, refunded_amount, \
         failure_reason, failure_message, authorization_ref, capture_ref, settled_at_us, payout_id, purchase_id, \
         units_sold, occurred_at_us";
    let sql = match user {
        None => format!(
            "SELECT {COLUMNS} FROM payment_events WHERE sequence > $1 AND ($3 = '' OR conversation_id = $3) \
             AND $2 IS NULL ORDER BY sequence LIMIT $4"
        ),
        Some(_) => format!(
            "SELECT * FROM (SELECT {COLUMNS} FROM payment_events WHERE party_a = $2 AND sequence > $1 \
             AND ($3 = '' OR conversation_id = $3) ORDER BY sequence LIMIT $4) AS a \
             UNION ALL SELECT * FROM (SELECT {COLUMNS} FROM payment_events WHERE party_b = $2 AND party_a <> $2 \
             AND sequence > $1 AND ($3 = '' OR conversation_id = $3) ORDER BY sequence LIMIT $4) AS b \
             ORDER BY sequence LIMIT $4"
        ),
    };
    let rows: Vec<EventRow> = with_db!(db, pool => sqlx::query_as(&sql)
    .bind(after)
    .bind(user)
    .bind(conversation)
    .bind(PAGE_MAX)
    .fetch_all(pool)
    .await)?;
    let typed = rows.iter().filter(|r| r.snapshot.is_empty());
    let payment_ids: Vec<&str> = typed
        .clone()
        .filter(|r| r.event_type.starts_with("payment."))
        .filter_map(|r| r.payment_id.as_deref())
        .collect();
    let request_ids: Vec<&str> = typed
        .clone()
        .filter(|r| r.event_type.starts_with("request."))
        .filter_map(|r| r.request_id.as_deref())
        .collect();
    let payout_ids: Vec<&str> =
        typed.clone().filter(|r| r.event_type.starts_with("payout.")).filter_map(|r| r.payout_id.as_deref()).collect();
    let purchase_ids: Vec<&str> =
        typed.filter(|r| r.event_type.starts_with("purchase.")).filter_map(|r| r.purchase_id.as_deref()).collect();
    let payments = load_payments(db, &payment_ids).await?;
    let requests = load_requests(db, &request_ids).await?;
    let payouts = load_payouts(db, &payout_ids).await?;
    let purchases = super::repo::shop::purchases_by_id(db, &purchase_ids).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            // A payout's row as it is now, with the state the event recorded laid over it.
            let payout = r
                .event_type
                .starts_with("payout.")
                .then(|| r.payout_id.as_deref().and_then(|id| payouts.get(id)))
                .flatten()
                .map(|p| Payout {
                    status: PayoutStatus::from_db(&r.status).unwrap_or(p.status),
                    failure_reason: r.failure_reason.clone(),
                    failure_message: r.failure_message.clone(),
                    processor_ref: r.capture_ref.clone(),
                    paid_at_us: r.settled_at_us,
                    return_ref: if r.event_type == "payout.returned" { p.return_ref.clone() } else { None },
                    returned_at_us: if r.event_type == "payout.returned" { p.returned_at_us } else { None },
                    ..p.clone()
                });
            // A purchase's row as it is now, with the refunds the event recorded.
            let purchase = r
                .event_type
                .starts_with("purchase.")
                .then(|| r.purchase_id.as_deref().and_then(|id| purchases.get(id)))
                .flatten()
                .map(|p| {
                    let refunded = Money::from_minor(p.amount.currency(), r.refunded_amount);
                    (super::shop::Purchase { refunded_amount: refunded, ..p.clone() }, r.units_sold.unwrap_or(0))
                });
            let (payment, request) = if !r.snapshot.is_empty() {
                // A copy that no longer decodes still delivers its event, without the
                // payment or request, and says so in the log.
                let warn = |e: &dyn std::fmt::Display| {
                    tracing::warn!(sequence = r.sequence, error = %e, "legacy event copy does not decode");
                };
                match serde_json::from_str::<Snapshot>(&r.snapshot) {
                    Ok(Snapshot::Payment(p)) => (Payment::try_from(*p).inspect_err(|e| warn(e)).ok(), None),
                    Ok(Snapshot::Request(q)) => (None, PaymentRequest::try_from(*q).inspect_err(|e| warn(e)).ok()),
                    Err(e) => {
                        warn(&e);
                        (None, None)
                    }
                }
            } else if r.event_type.starts_with("payment.") {
                let payment = r.payment_id.as_deref().and_then(|id| payments.get(id)).map(|p| Payment {
                    status: PaymentStatus::from_db(&r.status).unwrap_or(p.status),
                    refunded_amount: Money::from_minor(p.currency(), r.refunded_amount),
                    failure_reason: r.failure_reason.clone(),
                    failure_message: r.failure_message.clone(),
                    authorization_ref: r.authorization_ref.clone(),
                    capture_ref: r.capture_ref.clone(),
                    settled_at_us: r.settled_at_us,
                    ..p.clone()
                });
                (payment, None)
            } else if r.event_type.starts_with("payout.") || r.event_type.starts_with("purchase.") {
                (None, None)
            } else {
                let request = r.request_id.as_deref().and_then(|id| requests.get(id)).map(|q| PaymentRequest {
                    status: RequestStatus::from_db(&r.status).unwrap_or(q.status),
                    payment_id: r.payment_id.clone().map(PaymentId::from_db),
                    ..q.clone()
                });
                (None, request)
            };
            Event {
                sequence: r.sequence,
                event_type: r.event_type,
                party_a: r.party_a,
                party_b: r.party_b,
                conversation_id: r.conversation_id,
                payment,
                request,
                payout,
                purchase,
                occurred_at_us: r.occurred_at_us,
            }
        })
        .collect())
}

/// The payments with these ids, by id (at most a page of events' worth).
async fn load_payments(db: &Db, ids: &[&str]) -> Result<HashMap<PaymentId, Payment>> {
    let rows: Vec<PaymentRow> = rows_by_id(db, &format!("SELECT {COLUMNS} FROM payments"), "payment_id", ids).await?;
    rows.into_iter().map(|r| Payment::try_from(r).map(|p| (p.payment_id.clone(), p))).collect()
}

/// The payouts with these ids, by id.
async fn load_payouts(db: &Db, ids: &[&str]) -> Result<HashMap<PayoutId, Payout>> {
    let rows: Vec<PayoutRow> =
        rows_by_id(db, &format!("SELECT {PAYOUT_COLUMNS} FROM payouts"), "payout_id", ids).await?;
    rows.into_iter().map(|r| Payout::try_from(r).map(|p| (p.payout_id.clone(), p))).collect()
}

/// The requests with these ids, by id.
async fn load_requests(db: &Db, ids: &[&str]) -> Result<HashMap<RequestId, PaymentRequest>> {
    let rows: Vec<RequestRow> =
        rows_by_id(db, &format!("SELECT {REQUEST_COLUMNS} FROM payment_requests"), "request_id", ids).await?;
    rows.into_iter().map(|r| PaymentRequest::try_from(r).map(|q| (q.request_id.clone(), q))).collect()
}

/// `select` (a query without WHERE) for the rows whose `column` is one of `ids`, in one
/// statement: an array parameter on PostgreSQL, a JSON one on SQLite.
async fn rows_by_id<R>(db: &Db, select: &str, column: &str, ids: &[&str]) -> Result<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + Send
        + Unpin,
{
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = match db {
        Db::Postgres(pool) => {
            let sql = format!("{select} WHERE {column} = ANY($1)");
            sqlx::query_as(&sql).bind(&ids).fetch_all(pool).await?
        }
        Db::Sqlite(pool) => {
            let sql = format!("{select} WHERE {column} IN (SELECT value FROM json_each(?1))");
            sqlx::query_as(&sql).bind(json_rows(&ids)?).fetch_all(pool).await?
        }
    };
    Ok(rows)
}

/// The newest sequence in the outbox.
pub async fn latest(db: &Db) -> Result<i64> {
    let n: i64 = with_db!(db, pool => sqlx::query_scalar("SELECT last_value FROM payment_event_sequence WHERE id = 1")
        .fetch_one(pool)
        .await)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events written before migration 0008 hold a JSON copy in the shape `Payment` and
    /// `PaymentRequest` serialized to then: their columns under the same names.
    #[test]
    fn legacy_json_copies_still_decode() {
        let payment = r#"{"payment_id":"pay_1","sender_id":"alice","recipient_id":"bob","currency":"USD",
            "amount":1250,"wallet_amount":1000,"card_amount":250,"fee_amount":0,"refunded_amount":0,
            "status":"settled","funding_source":"auto","payment_method_token":null,"note":"pizza",
            "conversation_id":"c1","message_id":"m1","request_id":null,"failure_reason":"","failure_message":"",
            "authorization_ref":null,"capture_ref":"sbx_1","created_at_us":1,"settled_at_us":2}"#;
        let Ok(Snapshot::Payment(row)) = serde_json::from_str::<Snapshot>(payment) else { panic!("not a payment") };
        let p = Payment::try_from(*row).unwrap();
        assert_eq!((p.payment_id.as_str(), p.sender_id.as_str(), p.status), ("pay_1", "alice", PaymentStatus::Settled));
        assert_eq!((p.amount.minor(), p.card_amount.minor(), p.currency().code()), (1250, 250, "USD"));

        let request = r#"{"request_id":"req_1","requester_id":"bob","payer_id":"alice","currency":"EUR",
            "amount":500,"note":"","conversation_id":"c1","message_id":"m2","status":"paid",
            "payment_id":"pay_1","created_at_us":1,"expires_at_us":9}"#;
        let Ok(Snapshot::Request(row)) = serde_json::from_str::<Snapshot>(request) else { panic!("not a request") };
        let q = PaymentRequest::try_from(*row).unwrap();
        assert_eq!((q.status, q.payment_id.as_ref().map(|p| p.as_str())), (RequestStatus::Paid, Some("pay_1")));
        assert_eq!((q.currency().code(), q.amount.minor()), ("EUR", 500));
    }
}
