//! The batch hook's statements on SQLite: each list as one JSON parameter.

use sqlx::error::BoxDynError;
use sqlx::sqlite::SqliteArguments;
use sqlx::Arguments;

use super::rows::EventFields;
use super::{split_prepared, BatchPayment, BatchSpend, Prepared};
use crate::store::{from_json_rows, json_rows};

pub(crate) async fn prepare(
    c: &mut sqlx::SqliteConnection,
    keys: &[(&str, &str)],
    users: &[&str],
    senders: &[&str],
    since_hour: i64,
    shop: &super::ShopKeys<'_>,
) -> std::result::Result<Prepared, sqlx::Error> {
    // Each list travels as one JSON parameter (see `store::json_rows`). Keys already
    // used, the parties' accounts and the senders' spend in the window: three keyed reads
    // in one statement, told apart by the first column, as on PostgreSQL; each statement
    // is a hand-off to SQLite's thread and back. The rows come back as one JSON array in
    // one row (`store::from_json_rows`): SQLite's thread hands each row over on its own.
    let rows: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(kind, a, b, c, d, n)) FROM ( \
         SELECT 1 AS kind, p.sender_id AS a, p.idempotency_key AS b, p.payment_id AS c, p.request_hash AS d, \
         0 AS n FROM json_each(?1) AS j \
         JOIN payments p ON p.sender_id = j.value ->> 0 AND p.idempotency_key = j.value ->> 1 \
         UNION ALL \
         SELECT 2, user_id, tier, status, '', 0 FROM accounts WHERE user_id IN (SELECT value FROM json_each(?2)) \
         UNION ALL \
         SELECT 3, sender_id, currency, '', '', CAST(SUM(amount) AS BIGINT) FROM payment_spend \
         WHERE sender_id IN (SELECT value FROM json_each(?3)) AND hour >= ?4 GROUP BY sender_id, currency \
         UNION ALL \
         SELECT 4, p.buyer_id, p.idempotency_key, p.purchase_id, p.request_hash, 0 FROM json_each(?5) AS j \
         JOIN purchases p ON p.buyer_id = j.value ->> 0 AND p.idempotency_key = j.value ->> 1 \
         UNION ALL \
         SELECT 5, p.listing_id, p.buyer_id, '', '', SUM(p.quantity) FROM json_each(?6) AS j \
         JOIN purchases p ON p.listing_id = j.value ->> 0 AND p.buyer_id = j.value ->> 1 \
         GROUP BY p.listing_id, p.buyer_id \
         UNION ALL \
         SELECT 6, listing_id, json_array(listing_id, seller_id, stream_id, title, currency, price, quantity, sold, \
         per_buyer_max, starts_at_us, ends_at_us, closed_at_us, created_at_us), '', '', 0 FROM listings \
         WHERE listing_id IN (SELECT value FROM json_each(?7)))",
    )
    .bind(json_rows(keys)?)
    .bind(json_rows(users)?)
    .bind(json_rows(senders)?)
    .bind(since_hour)
    .bind(json_rows(&shop.keys)?)
    .bind(json_rows(&shop.pairs)?)
    .bind(json_rows(&shop.listings)?)
    .fetch_one(&mut *c)
    .await?;
    let rows: Vec<(i64, String, String, String, String, i64)> = from_json_rows(&rows)?;
    Ok(split_prepared(rows))
}

/// The spend buckets, the payment rows, their events and the event counter's advance:
/// four statements in one call on the batch's connection (`HookBatch::write_rows`).
pub(crate) async fn write_all(
    c: &mut sqlx::SqliteConnection,
    rows: &[BatchPayment<'_>],
    spent: &[BatchSpend<'_>],
    events: &[EventFields],
    shop: &super::shop::BatchShop<'_>,
    now_us: i64,
) -> std::result::Result<(), sqlx::Error> {
    let mut args = SqliteArguments::default();
    let sql = statements(&mut args, rows, spent, events, now_us).map_err(sqlx::Error::Encode)?;
    if shop.purchases.is_empty() {
        sqlx::query_with(sql, args).execute(&mut *c).await?;
    } else {
        // The purchases and the listings' counts in the same call, after the rest.
        let more = super::shop::sqlite_statements(&mut args, shop, now_us).map_err(sqlx::Error::Encode)?;
        sqlx::query_with(&format!("{sql}; {more}"), args).execute(&mut *c).await?;
    }
    Ok(())
}

fn statements(
    args: &mut SqliteArguments<'static>,
    rows: &[BatchPayment<'_>],
    spent: &[BatchSpend<'_>],
    events: &[EventFields],
    now_us: i64,
) -> std::result::Result<&'static str, BoxDynError> {
    let spent: Vec<(&str, &str, i64, i64)> = spent.iter().map(|((s, c, h), a)| (*s, *c, *h, *a)).collect();
    type PaymentJson<'a> = (
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
    let payments: Vec<PaymentJson<'_>> = rows
        .iter()
        .map(|(p, key, hash)| {
            (
                p.payment_id.as_str(),
                p.sender_id.as_str(),
                p.recipient_id.as_str(),
                p.currency().code(),
                p.amount.minor(),
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
        Option<&'a str>,
        Option<i64>,
    );
    let events: Vec<EventRow<'_>> = events
        .iter()
        .enumerate()
        .map(|(k, e)| {
            (
                k as i64 + 1,
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
                e.purchase_id.as_deref(),
                e.units_sold,
            )
        })
        .collect();
    // Wallet-only sends: the whole amount from the wallet, no card, no fee. The spend
    // buckets, the payment rows, their events (numbered from the counter as it stands;
    // the batch holds SQLite's write lock, so nothing else moves it) and the counter's
    // advance. Positional parameters, taken in order across the statements. `WHERE
    // true` tells SQLite's parser that ON CONFLICT belongs to the INSERT.
    args.add(json_rows(&spent)?)?;
    args.add(json_rows(&payments)?)?;
    args.add(now_us)?;
    args.add(json_rows(&events)?)?;
    args.add(now_us)?;
    args.add(events.len() as i64)?;
    Ok(concat!(
        "WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) \
         INSERT INTO payment_spend (sender_id, currency, hour, amount) \
         SELECT r.v ->> 0, r.v ->> 1, r.v ->> 2, r.v ->> 3 FROM r WHERE true \
         ON CONFLICT (sender_id, currency, hour) DO UPDATE SET amount = payment_spend.amount + excluded.amount; \
         WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) \
         INSERT INTO payments (payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, \
         fee_amount, status, funding_source, note, conversation_id, message_id, failure_reason, failure_message, \
         idempotency_key, request_hash, created_at_us, updated_at_us, settled_at_us) \
         SELECT r.v ->> 0, r.v ->> 1, r.v ->> 2, r.v ->> 3, r.v ->> 4, r.v ->> 4, 0, 0, \
         r.v ->> 5, r.v ->> 6, r.v ->> 7, r.v ->> 8, r.v ->> 9, r.v ->> 10, \
         r.v ->> 11, r.v ->> 12, r.v ->> 13, r.v ->> 14, ?, r.v ->> 15 FROM r; \
         WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) INSERT INTO payment_events (sequence, ",
        crate::payments::repo::rows::EVENT_COLUMNS!(),
        ", purchase_id, units_sold, snapshot, occurred_at_us) \
         SELECT (SELECT last_value FROM payment_event_sequence WHERE id = 1) + (r.v ->> 0), r.v ->> 1, r.v ->> 2, \
         r.v ->> 3, r.v ->> 4, r.v ->> 5, r.v ->> 6, r.v ->> 7, r.v ->> 8, r.v ->> 9, r.v ->> 10, r.v ->> 11, \
         r.v ->> 12, r.v ->> 13, r.v ->> 14, r.v ->> 15, '', ? FROM r; \
         UPDATE payment_event_sequence SET last_value = last_value + ? WHERE id = 1"
    ))
}
