//! The batch hook's statements on PostgreSQL: arrays bound whole (`UNNEST`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use sqlx::error::BoxDynError;
use sqlx::postgres::PgArguments;

use crate::store::bind_pg as bind_step;

use super::rows::EventFields;
use super::{split_prepared, BatchPayment, BatchSpend, Prepared};
use crate::payments::Payment;

/// The rules read of `prepare`, in one of `PLAN_GENERATIONS` spellings that differ only
/// in a comment; the spelling changes each time the number of batches this process has
/// read doubles.
///
/// Why: PostgreSQL soon runs a kept prepared statement with one generic plan for good,
/// chosen from the table sizes of that moment. On a database that starts empty and is
/// never analysed (autovacuum off), the plan chosen while `payments` held a few rows
/// found a key through `payments_sender` and filtered the sender's whole history, a
/// cost that grew with every payment (1.6 ms per batch after 30 s of the benchmark,
/// where the unique (sender_id, idempotency_key) index answers in about 0.3 ms). A new
/// spelling is a new prepared statement, planned again against the tables as they are
/// now: the plan follows the tables' growth as autovacuum's statistics would make it,
/// at the price of a handful of re-plans early in the process's life. Planning this
/// read on every batch instead (an unprepared statement) was measured too: it costs a
/// round trip and a plan per batch, and 2 to 3% of throughput at 256 clients. (Written as
/// LATERAL probes per array element, the accounts and spend parts were slower at both
/// 64 and 256 clients than `= ANY`, which the engine's connections, where sequential
/// scans are off, answer from the indexes.)
fn prepare_sql() -> &'static str {
    static BATCHES: AtomicU64 = AtomicU64::new(0);
    static SPELLINGS: OnceLock<Vec<String>> = OnceLock::new();
    let spellings = SPELLINGS
        .get_or_init(|| (0..PLAN_GENERATIONS).map(|g| format!("/* plan generation {g} */ {RULES_READ}")).collect());
    &spellings[plan_generation(BATCHES.fetch_add(1, Ordering::Relaxed).wrapping_add(1))]
}

/// Keys already used, the parties' accounts and the senders' spend in the window, and
/// for purchases the keys used, the units each buyer bought of a listing and the
/// listings (each as JSON): keyed reads in one round trip, told apart by the first
/// column. (The listings are not locked: every purchase of a listing locks its seller's
/// pending account or the commission account, which serializes them, and the
/// listing's CHECK refuses any oversell that got past that.)
const RULES_READ: &str = "SELECT 1::int2, p.sender_id, p.idempotency_key, p.payment_id, p.request_hash, 0::int8 \
     FROM UNNEST($1::text[], $2::text[]) AS t(s, k) \
     JOIN payments p ON p.sender_id = t.s AND p.idempotency_key = t.k \
     UNION ALL \
     SELECT 2::int2, user_id, tier, status, '', 0::int8 FROM accounts WHERE user_id = ANY($3) \
     UNION ALL \
     SELECT 3::int2, sender_id, currency, '', '', CAST(SUM(amount) AS BIGINT) FROM payment_spend \
     WHERE sender_id = ANY($4) AND hour >= $5 GROUP BY sender_id, currency \
     UNION ALL \
     SELECT 4::int2, p.buyer_id, p.idempotency_key, p.purchase_id, p.request_hash, 0::int8 \
     FROM UNNEST($6::text[], $7::text[]) AS t(b, k) \
     JOIN purchases p ON p.buyer_id = t.b AND p.idempotency_key = t.k \
     UNION ALL \
     SELECT 5::int2, p.listing_id, p.buyer_id, '', '', CAST(SUM(p.quantity) AS BIGINT) \
     FROM UNNEST($8::text[], $9::text[]) AS t(l, b) \
     JOIN purchases p ON p.listing_id = t.l AND p.buyer_id = t.b GROUP BY p.listing_id, p.buyer_id \
     UNION ALL \
     SELECT 6::int2, l.listing_id, row_to_json(l)::text, '', '', 0::int8 FROM listings l \
     WHERE l.listing_id = ANY($10)";

/// The spelling for the `n`th batch (from 1): the base-2 logarithm of `n`, so the
/// spelling changes at 2, 4, 8, ... batches, capped at the last one.
fn plan_generation(n: u64) -> usize {
    (n.max(1).ilog2() as usize).min(PLAN_GENERATIONS - 1)
}

/// Spellings of the rules read: the last one is reached after 2^(PLAN_GENERATIONS - 1)
/// batches (about 4 million), when the tables' sizes no longer change the plan.
const PLAN_GENERATIONS: usize = 23;

pub(crate) async fn prepare(
    c: &mut sqlx::PgConnection,
    keys: &[(&str, &str)],
    users: &[&str],
    senders: &[&str],
    since_hour: i64,
    shop: &super::ShopKeys<'_>,
) -> std::result::Result<Prepared, sqlx::Error> {
    let (ks, kk): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let (pb, pk): (Vec<&str>, Vec<&str>) = shop.keys.iter().copied().unzip();
    let (ll, lb): (Vec<&str>, Vec<&str>) = shop.pairs.iter().copied().unzip();
    // `RULES_READ`; `users` and `senders` come deduplicated.
    let rows: Vec<(i16, String, String, String, String, i64)> = sqlx::query_as(prepare_sql())
        .bind(&ks)
        .bind(&kk)
        .bind(users)
        .bind(senders)
        .bind(since_hour)
        .bind(&pb)
        .bind(&pk)
        .bind(&ll)
        .bind(&lb)
        .bind(&shop.listings)
        .fetch_all(&mut *c)
        .await?;
    Ok(split_prepared(rows))
}

/// Wallet-only sends (the whole amount from the wallet, no card, no fee, no request):
/// the payment rows and the daily-limit buckets, in one statement on the batch's
/// connection before the engine's journal (`HookBatch::write_rows`). Every transaction
/// that touches the buckets (the card path's too) does so before it takes the event
/// counter (`write_events`), so the two locks never wait on each other in a cycle.
pub(crate) async fn write_rows(
    c: &mut sqlx::PgConnection,
    rows: &[BatchPayment<'_>],
    spent: &[BatchSpend<'_>],
    shop: &super::shop::BatchShop<'_>,
    now_us: i64,
) -> std::result::Result<(), sqlx::Error> {
    let mut args = PgArguments::default();
    let mut sql = rows_statement(&mut args, rows, spent, now_us).map_err(sqlx::Error::Encode)?;
    if !shop.purchases.is_empty() {
        // The purchases and the listings' counts join the same statement.
        let ctes = super::shop::pg_ctes(&mut args, shop, now_us).map_err(sqlx::Error::Encode)?;
        sql.push_str(", ");
        sql.push_str(&ctes);
    }
    sql.push_str(" SELECT 1");
    sqlx::query_with(&sql, args).execute(&mut *c).await?;
    Ok(())
}

/// The `WITH` list of the rows statement (spend buckets, payments); the caller adds
/// any more CTEs and the final `SELECT`.
fn rows_statement(
    args: &mut PgArguments,
    rows: &[BatchPayment<'_>],
    spent: &[BatchSpend<'_>],
    now_us: i64,
) -> std::result::Result<String, BoxDynError> {
    let s_sender = bind_step(args, spent.iter().map(|((s, _, _), _)| *s).collect::<Vec<&str>>())?;
    let s_currency = bind_step(args, spent.iter().map(|((_, c, _), _)| *c).collect::<Vec<&str>>())?;
    let s_hour = bind_step(args, spent.iter().map(|((_, _, h), _)| *h).collect::<Vec<i64>>())?;
    let s_amount = bind_step(args, spent.iter().map(|(_, a)| *a).collect::<Vec<i64>>())?;
    let now = bind_step(args, now_us)?;
    let mut col = |f: fn(&Payment) -> &str| bind_step(args, rows.iter().map(|(p, _, _)| f(p)).collect::<Vec<&str>>());
    let id = col(|p| p.payment_id.as_str())?;
    let sender = col(|p| p.sender_id.as_str())?;
    let recipient = col(|p| p.recipient_id.as_str())?;
    let currency = col(|p| p.currency().code())?;
    let status = col(|p| p.status.as_str())?;
    let funding = col(|p| p.funding_source.as_str())?;
    let note = col(|p| &p.note)?;
    let conversation = col(|p| &p.conversation_id)?;
    let message = col(|p| &p.message_id)?;
    let reason = col(|p| &p.failure_reason)?;
    let failure = col(|p| &p.failure_message)?;
    let amount = bind_step(args, rows.iter().map(|(p, _, _)| p.amount.minor()).collect::<Vec<i64>>())?;
    let key = bind_step(args, rows.iter().map(|(_, k, _)| *k).collect::<Vec<&str>>())?;
    let hash = bind_step(args, rows.iter().map(|(_, _, h)| *h).collect::<Vec<&str>>())?;
    let created = bind_step(args, rows.iter().map(|(p, _, _)| p.created_at_us).collect::<Vec<i64>>())?;
    let settled = bind_step(args, rows.iter().map(|(p, _, _)| p.settled_at_us).collect::<Vec<Option<i64>>>())?;
    Ok(format!(
        "WITH hook_spend AS ( \
           INSERT INTO payment_spend (sender_id, currency, hour, amount) \
           SELECT * FROM UNNEST({s_sender}::text[], {s_currency}::text[], {s_hour}::int8[], {s_amount}::int8[]) \
           ON CONFLICT (sender_id, currency, hour) DO UPDATE SET amount = payment_spend.amount + excluded.amount \
         ), hook_payments AS ( \
           INSERT INTO payments (payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, \
             fee_amount, status, funding_source, note, conversation_id, message_id, failure_reason, failure_message, \
             idempotency_key, request_hash, created_at_us, updated_at_us, settled_at_us) \
           SELECT t.id, t.s, t.r, t.c, t.a, t.a, 0, 0, t.st, t.f, t.n, t.cv, t.m, t.fr, t.fm, t.k, t.h, t.ca, {now}, t.sa \
           FROM UNNEST({id}::text[], {sender}::text[], {recipient}::text[], {currency}::text[], {amount}::int8[], \
             {status}::text[], {funding}::text[], {note}::text[], {conversation}::text[], {message}::text[], \
             {reason}::text[], {failure}::text[], {key}::text[], {hash}::text[], {created}::int8[], {settled}::int8[]) \
             AS t(id, s, r, c, a, st, f, n, cv, m, fr, fm, k, h, ca, sa) \
         )"
    ))
}

/// The batch's outbox events, in one statement on the batch's connection right after
/// the engine's journal statement (`HookBatch::write_numbered`). The event counter is
/// advanced once for the whole batch; its row lock, held to commit, keeps the outbox
/// sequence gap-free and in commit order.
pub(crate) async fn write_events(
    c: &mut sqlx::PgConnection,
    events: &[EventFields],
    now_us: i64,
) -> std::result::Result<(), sqlx::Error> {
    let mut args = PgArguments::default();
    let sql = events_statement(&mut args, events, now_us).map_err(sqlx::Error::Encode)?;
    sqlx::query_with(&sql, args).execute(&mut *c).await?;
    Ok(())
}

fn events_statement(
    args: &mut PgArguments,
    events: &[EventFields],
    now_us: i64,
) -> std::result::Result<String, BoxDynError> {
    let column = |f: fn(&EventFields) -> &str| events.iter().map(f).collect::<Vec<&str>>();
    let n = bind_step(args, events.len() as i64)?;
    let now = bind_step(args, now_us)?;
    let o = bind_step(args, (1..=events.len() as i64).collect::<Vec<i64>>())?;
    let ty = bind_step(args, column(|e| e.event_type))?;
    let pay = bind_step(args, events.iter().map(|e| e.payment_id.as_deref()).collect::<Vec<Option<&str>>>())?;
    let a = bind_step(args, column(|e| &e.party_a))?;
    let b = bind_step(args, column(|e| &e.party_b))?;
    let cv = bind_step(args, column(|e| &e.conversation_id))?;
    let st = bind_step(args, column(|e| e.status))?;
    let fr = bind_step(args, column(|e| &e.failure_reason))?;
    let fm = bind_step(args, column(|e| &e.failure_message))?;
    let sa = bind_step(args, events.iter().map(|e| e.settled_at_us).collect::<Vec<Option<i64>>>())?;
    let pu = bind_step(args, events.iter().map(|e| e.purchase_id.as_deref()).collect::<Vec<Option<&str>>>())?;
    let us = bind_step(args, events.iter().map(|e| e.units_sold).collect::<Vec<Option<i64>>>())?;
    Ok(format!(
        "WITH hook_event_seq AS ( \
           UPDATE payment_event_sequence SET last_value = last_value + {n} WHERE id = 1 \
           RETURNING last_value - {n} AS base \
         ), hook_events AS ( \
           INSERT INTO payment_events (sequence, event_type, payment_id, request_id, party_a, party_b, \
             conversation_id, status, failure_reason, failure_message, settled_at_us, purchase_id, units_sold, \
             snapshot, occurred_at_us) \
           SELECT s.base + t.o, t.ty, t.p, NULL, t.a, t.b, t.cv, t.st, t.fr, t.fm, t.sa, t.pu, t.us, '', {now} \
           FROM UNNEST({o}::int8[], {ty}::text[], {pay}::text[], {a}::text[], {b}::text[], {cv}::text[], \
             {st}::text[], {fr}::text[], {fm}::text[], {sa}::int8[], {pu}::text[], {us}::int8[]) \
             AS t(o, ty, p, a, b, cv, st, fr, fm, sa, pu, us), hook_event_seq s \
         ) SELECT 1"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_read_is_spelled_anew_each_time_the_batch_count_doubles() {
        let generations: Vec<usize> = [0, 1, 2, 3, 4, 7, 8, 1 << 20].into_iter().map(plan_generation).collect();
        assert_eq!(generations, vec![0, 0, 1, 1, 2, 2, 3, 20]);
        assert_eq!(plan_generation(u64::MAX), PLAN_GENERATIONS - 1);
        assert_eq!(plan_generation((1 << (PLAN_GENERATIONS - 1)) - 1), PLAN_GENERATIONS - 2);
        assert_eq!(plan_generation(1 << (PLAN_GENERATIONS - 1)), PLAN_GENERATIONS - 1);
        // Each spelling is a distinct statement text, so PostgreSQL plans it afresh.
        let texts: std::collections::HashSet<&str> = (0..1u64 << 12).map(|_| prepare_sql()).collect();
        // 12 or 13 of them, depending on how many batches this process read before.
        assert!(texts.len() >= 12, "{} spellings", texts.len());
    }
}
