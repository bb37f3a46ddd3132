//! The batch hook's statements on SQLite: each list as one JSON parameter.

use super::*;
use crate::store::json_rows;

pub(super) async fn prepare(
    c: &mut sqlx::SqliteConnection,
    keys: &[(&str, &str)],
    users: &[&str],
    senders: &[&str],
    since_hour: i64,
) -> std::result::Result<Prepared, sqlx::Error> {
    // Each list travels as one JSON parameter (see `store::json_rows`).
    let existing = sqlx::query_as(
        "SELECT p.sender_id, p.idempotency_key, p.payment_id, p.request_hash FROM json_each(?1) AS j \
         JOIN payments p ON p.sender_id = j.value ->> 0 AND p.idempotency_key = j.value ->> 1",
    )
    .bind(json_rows(keys)?)
    .fetch_all(&mut *c)
    .await?;
    let accounts =
        sqlx::query_as("SELECT user_id, tier, status FROM accounts WHERE user_id IN (SELECT value FROM json_each(?1))")
            .bind(json_rows(users)?)
            .fetch_all(&mut *c)
            .await?;
    let sums = sqlx::query_as(
        "SELECT sender_id, currency, CAST(SUM(amount) AS BIGINT) FROM payment_spend \
         WHERE sender_id IN (SELECT value FROM json_each(?1)) AND hour >= ?2 GROUP BY sender_id, currency",
    )
    .bind(json_rows(senders)?)
    .bind(since_hour)
    .fetch_all(&mut *c)
    .await?;
    Ok((existing, accounts, sums))
}

pub(super) async fn write(
    c: &mut sqlx::SqliteConnection,
    rows: &[(&Payment, &str, &str)],
    spent: &[((&str, &str, i64), i64)],
    events: &[EventFields],
    now_us: i64,
) -> std::result::Result<(), sqlx::Error> {
    if !spent.is_empty() {
        let spent: Vec<(&str, &str, i64, i64)> = spent.iter().map(|((s, c, h), a)| (*s, *c, *h, *a)).collect();
        // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT.
        sqlx::query(
            "INSERT INTO payment_spend (sender_id, currency, hour, amount) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM json_each(?1) AS j WHERE true \
             ON CONFLICT (sender_id, currency, hour) DO UPDATE SET amount = payment_spend.amount + excluded.amount",
        )
        .bind(json_rows(&spent)?)
        .execute(&mut *c)
        .await?;
    }
    type PaymentRow<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i64,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i64,
        Option<i64>,
    );
    let payments: Vec<PaymentRow<'_>> = rows
        .iter()
        .map(|(p, key, hash)| {
            (
                p.payment_id.as_str(),
                p.sender_id.as_str(),
                p.recipient_id.as_str(),
                p.currency.as_str(),
                p.amount,
                p.status.as_str(),
                p.funding_source.as_str(),
                p.note.as_str(),
                p.conversation_id.as_str(),
                p.message_id.as_str(),
                p.failure_reason.as_str(),
                p.failure_message.as_str(),
                *key,
                *hash,
                p.created_at_us,
                p.settled_at_us,
            )
        })
        .collect();
    // Wallet-only sends: the whole amount from the wallet, no card, no fee.
    sqlx::query(
        "INSERT INTO payments (payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, \
         fee_amount, status, funding_source, note, conversation_id, message_id, failure_reason, failure_message, \
         idempotency_key, request_hash, created_at_us, updated_at_us, settled_at_us) \
         SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 4, 0, 0, \
         j.value ->> 5, j.value ->> 6, j.value ->> 7, j.value ->> 8, j.value ->> 9, j.value ->> 10, \
         j.value ->> 11, j.value ->> 12, j.value ->> 13, j.value ->> 14, ?2, j.value ->> 15 FROM json_each(?1) AS j",
    )
    .bind(json_rows(&payments)?)
    .bind(now_us)
    .execute(&mut *c)
    .await?;
    let last: i64 = sqlx::query_scalar(
        "UPDATE payment_event_sequence SET last_value = last_value + ?1 WHERE id = 1 RETURNING last_value",
    )
    .bind(events.len() as i64)
    .fetch_one(&mut *c)
    .await?;
    let base = last - events.len() as i64;
    type EventRow<'a> = (
        i64,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i64,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Option<i64>,
    );
    let events: Vec<EventRow<'_>> = events
        .iter()
        .enumerate()
        .map(|(k, e)| {
            (
                base + k as i64 + 1,
                e.event_type,
                e.payment_id.as_deref(),
                e.request_id.as_deref(),
                e.party_a.as_str(),
                e.party_b.as_str(),
                e.conversation_id.as_str(),
                e.status,
                e.refunded_amount,
                e.failure_reason.as_str(),
                e.failure_message.as_str(),
                e.authorization_ref.as_deref(),
                e.capture_ref.as_deref(),
                e.settled_at_us,
            )
        })
        .collect();
    sqlx::query(concat!(
        "INSERT INTO payment_events (sequence, ",
        crate::payments::store::EVENT_COLUMNS!(),
        ", snapshot, occurred_at_us) \
         SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5, \
         j.value ->> 6, j.value ->> 7, j.value ->> 8, j.value ->> 9, j.value ->> 10, j.value ->> 11, \
         j.value ->> 12, j.value ->> 13, '', ?2 FROM json_each(?1) AS j"
    ))
    .bind(json_rows(&events)?)
    .bind(now_us)
    .execute(&mut *c)
    .await?;
    Ok(())
}
