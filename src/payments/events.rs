//! Reading the outbox for `WatchPayments`: stored events after a sequence, then live
//! ones. The outbox is the only buffer: a watcher reads it in bounded pages, so a slow
//! consumer costs the server a cursor, never memory.

use serde::Deserialize;
use tokio::sync::watch;

use super::requests::PaymentRequest;
use super::Payment;
use crate::error::Result;
use crate::store::Db;
use crate::with_db;

/// Events read per query.
pub const PAGE_MAX: i64 = 200;

/// One outbox row, decoded.
#[derive(Debug, Clone)]
pub struct Event {
    pub sequence: i64,
    pub event_type: String,
    pub payment: Option<Payment>,
    pub request: Option<PaymentRequest>,
    pub occurred_at_us: i64,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    sequence: i64,
    event_type: String,
    snapshot: String,
    occurred_at_us: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Snapshot {
    Payment(Box<Payment>),
    Request(Box<PaymentRequest>),
}

/// Wakes watchers in this process when an event commits; other processes' events are
/// found by the watchers' periodic poll.
#[derive(Clone)]
pub struct EventHub {
    latest: watch::Sender<i64>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub { latest: watch::channel(0).0 }
    }
}

impl EventHub {
    pub fn notify(&self) {
        self.latest.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }
}

/// Events after `after`, for `user` (every user's when `None`), optionally in one
/// conversation, in sequence order.
pub async fn read(db: &Db, user: Option<&str>, conversation: &str, after: i64) -> Result<Vec<Event>> {
    let rows: Vec<EventRow> = with_db!(db, pool => sqlx::query_as(
        "SELECT sequence, event_type, snapshot, occurred_at_us FROM payment_events \
         WHERE sequence > $1 AND ($2 IS NULL OR party_a = $2 OR party_b = $2) AND ($3 = '' OR conversation_id = $3) \
         ORDER BY sequence LIMIT $4",
    )
    .bind(after)
    .bind(user)
    .bind(conversation)
    .bind(PAGE_MAX)
    .fetch_all(pool)
    .await)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let snapshot = serde_json::from_str::<Snapshot>(&r.snapshot).ok();
            let (payment, request) = match snapshot {
                Some(Snapshot::Payment(p)) => (Some(*p), None),
                Some(Snapshot::Request(q)) => (None, Some(*q)),
                None => (None, None),
            };
            Event { sequence: r.sequence, event_type: r.event_type, payment, request, occurred_at_us: r.occurred_at_us }
        })
        .collect())
}

/// The newest sequence in the outbox.
pub async fn latest(db: &Db) -> Result<i64> {
    let n: i64 = with_db!(db, pool => sqlx::query_scalar("SELECT last_value FROM payment_event_sequence WHERE id = 1")
        .fetch_one(pool)
        .await)?;
    Ok(n)
}
