//! The purchase part of the posting engine's batch: what its rules read says about
//! purchases, and the purchase rows and listing counts it writes with the payments'
//! rows statement (`pg::write_rows`, `sqlite::write_all`).

use std::collections::HashMap;

use super::ListingRow;
use crate::payments::listing::{Listing, Purchase};
/// What the batch's purchase rules read, under the batch's locks.
pub(crate) struct PurchasesPrepared {
    /// (buyer, key) -> (purchase id, request hash).
    pub existing: HashMap<(String, String), (String, String)>,
    pub listings: HashMap<String, Listing>,
    /// (listing, buyer) -> units bought before this batch.
    pub bought: HashMap<(String, String), i64>,
}

/// A purchase the batch writes, with its idempotency key and request hash.
pub(crate) struct BatchPurchase<'a> {
    pub purchase: &'a Purchase,
    pub key: &'a str,
    pub hash: &'a str,
}

/// One row of the batch hook's rules read (`pg::prepare`, `sqlite::prepare`) that
/// concerns purchases: kind 4, a key used (buyer, key, purchase, hash); 5, units bought
/// (listing, buyer, -, -, units); 6, a listing (id, the row as JSON).
pub(crate) type PreparedRow = (i64, String, String, String, String, i64);

impl PurchasesPrepared {
    pub(crate) fn from_rows(rows: Vec<PreparedRow>) -> std::result::Result<Self, sqlx::Error> {
        let mut out = PurchasesPrepared { existing: HashMap::new(), listings: HashMap::new(), bought: HashMap::new() };
        for (kind, a, b, c, d, n) in rows {
            match kind {
                4 => {
                    out.existing.insert((a, b), (c, d));
                }
                5 => {
                    out.bought.insert((a, b), n);
                }
                _ => {
                    let row: ListingRow = serde_json::from_str(&b).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    let listing = Listing::try_from(row).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    out.listings.insert(a, listing);
                }
            }
        }
        Ok(out)
    }
}

/// The batch's purchases to write: the rows and each listing's count increase.
pub(crate) struct BatchShop<'a> {
    pub purchases: Vec<BatchPurchase<'a>>,
    pub sold: Vec<(&'a str, i64)>,
}

/// A purchase row as one JSON array, in the order of the inserts' columns.
type PurchaseJson<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    i64,
    i64,
    i64,
    i64,
    i64,
    &'a str,
    &'a str,
    i64,
    Option<&'a str>,
    // (wallet_amount, card_amount, fee_amount): serde's tuples stop at 16 elements.
    (i64, i64, i64),
);

fn purchases_json<'a>(rows: &'a [BatchPurchase<'a>]) -> Vec<PurchaseJson<'a>> {
    rows.iter()
        .map(|r| {
            let p = r.purchase;
            (
                p.purchase_id.as_str(),
                p.listing_id.as_str(),
                p.buyer_id.as_str(),
                p.seller_id.as_str(),
                p.stream_id.as_str(),
                p.amount.currency().code(),
                p.quantity,
                p.unit_price.minor(),
                p.amount.minor(),
                p.commission.minor(),
                p.available_at_us,
                r.key,
                r.hash,
                p.created_at_us,
                p.tab_id.as_ref().map(|t| t.as_str()),
                (p.wallet_amount.minor(), p.card_amount.minor(), p.fee_amount.minor()),
            )
        })
        .collect()
}

/// PostgreSQL: the purchases and the listings' new counts as two more CTEs of the batch
/// hook's rows statement (`pg::write_rows`), so they cost the batch no round trip of
/// their own. The purchases travel as one JSON parameter.
pub(crate) fn pg_ctes(
    args: &mut sqlx::postgres::PgArguments,
    shop: &BatchShop<'_>,
    now_us: i64,
) -> std::result::Result<String, sqlx::error::BoxDynError> {
    use crate::store::bind_pg as bind;
    let rows = bind(args, serde_json::to_string(&purchases_json(&shop.purchases))?)?;
    let now = bind(args, now_us)?;
    let ids = bind(args, shop.sold.iter().map(|(id, _)| *id).collect::<Vec<&str>>())?;
    let counts = bind(args, shop.sold.iter().map(|(_, n)| *n).collect::<Vec<i64>>())?;
    Ok(format!(
        "shop_rows AS (INSERT INTO purchases (purchase_id, listing_id, buyer_id, seller_id, stream_id, currency, \
         quantity, unit_price, amount, commission, hold, available_at_us, idempotency_key, request_hash, \
         created_at_us, updated_at_us, tab_id, wallet_amount, card_amount, fee_amount) \
         SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5, (r ->> 6)::int8, (r ->> 7)::int8, \
         (r ->> 8)::int8, (r ->> 9)::int8, 'held', (r ->> 10)::int8, r ->> 11, r ->> 12, (r ->> 13)::int8, {now}, \
         r ->> 14, (r -> 15 ->> 0)::int8, (r -> 15 ->> 1)::int8, (r -> 15 ->> 2)::int8 FROM jsonb_array_elements({rows}::jsonb) AS r), \
         shop_sold AS (UPDATE listings l SET sold = l.sold + t.n, updated_at_us = {now} \
         FROM UNNEST({ids}::text[], {counts}::int8[]) AS t(id, n) WHERE l.listing_id = t.id)"
    ))
}

/// SQLite: the purchases and the listings' new counts as two more statements of the
/// batch hook's one call (`sqlite::write_all`); positional parameters, in order.
pub(crate) fn sqlite_statements(
    args: &mut sqlx::sqlite::SqliteArguments<'static>,
    shop: &BatchShop<'_>,
    now_us: i64,
) -> std::result::Result<&'static str, sqlx::error::BoxDynError> {
    use sqlx::Arguments;
    let pairs = serde_json::to_string(&shop.sold)?;
    args.add(now_us)?;
    args.add(serde_json::to_string(&purchases_json(&shop.purchases))?)?;
    args.add(pairs.clone())?;
    args.add(now_us)?;
    args.add(pairs)?;
    Ok("INSERT INTO purchases (purchase_id, listing_id, buyer_id, seller_id, stream_id, currency, \
         quantity, unit_price, amount, commission, hold, available_at_us, idempotency_key, request_hash, \
         created_at_us, updated_at_us, tab_id, wallet_amount, card_amount, fee_amount) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
         value ->> 7, value ->> 8, value ->> 9, 'held', value ->> 10, value ->> 11, value ->> 12, \
         value ->> 13, ?, value ->> 14, value -> 15 ->> 0, value -> 15 ->> 1, value -> 15 ->> 2 FROM json_each(?); \
         UPDATE listings SET sold = sold + (SELECT j.value ->> 1 FROM json_each(?) AS j \
         WHERE j.value ->> 0 = listings.listing_id), updated_at_us = ? \
         WHERE listing_id IN (SELECT j.value ->> 0 FROM json_each(?) AS j)")
}
