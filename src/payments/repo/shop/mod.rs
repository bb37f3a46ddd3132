//! Live shopping's rows: `listings` and `purchases` (their refunds are in `refunds`,
//! the purchase part of the posting engine's batch in `batch`).

mod batch;
pub(crate) mod refunds;

pub(crate) use batch::{pg_ctes, sqlite_statements, BatchPurchase, BatchShop, PreparedRow, PurchasesPrepared};

use std::collections::HashMap;

use super::PaymentStore;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::payments::listing::{Hold, Listing, NewListing, Purchase};
use crate::store::{json_rows, Db};
use crate::with_db;

fn currency(code: &str) -> Result<Currency> {
    Currency::from_code(code).ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {code:?} in a row")))
}

pub(crate) const LISTING_COLUMNS: &str = "listing_id, seller_id, stream_id, title, currency, price, quantity, sold, \
     per_buyer_max, starts_at_us, ends_at_us, closed_at_us, created_at_us";

#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct ListingRow {
    listing_id: String,
    seller_id: String,
    stream_id: String,
    title: String,
    currency: String,
    price: i64,
    quantity: Option<i64>,
    sold: i64,
    per_buyer_max: i64,
    starts_at_us: Option<i64>,
    ends_at_us: Option<i64>,
    closed_at_us: Option<i64>,
    created_at_us: i64,
}

impl TryFrom<ListingRow> for Listing {
    type Error = Error;
    fn try_from(r: ListingRow) -> Result<Self> {
        Ok(Listing {
            unit_price: Money::from_minor(currency(&r.currency)?, r.price),
            listing_id: ListingId::from_db(r.listing_id),
            seller_id: UserId::from_db(r.seller_id),
            stream_id: r.stream_id,
            title: r.title,
            quantity: r.quantity,
            sold: r.sold,
            per_buyer_max: r.per_buyer_max,
            starts_at_us: r.starts_at_us,
            ends_at_us: r.ends_at_us,
            closed_at_us: r.closed_at_us,
            created_at_us: r.created_at_us,
        })
    }
}

pub(crate) const PURCHASE_COLUMNS: &str = "purchase_id, listing_id, buyer_id, seller_id, stream_id, currency, \
     quantity, unit_price, amount, commission, refunded_amount, commission_refunded, restocked, hold, \
     available_at_us, released_amount, created_at_us, tab_id, wallet_amount, card_amount, fee_amount";

#[derive(sqlx::FromRow)]
pub(crate) struct PurchaseRow {
    purchase_id: String,
    listing_id: String,
    buyer_id: String,
    seller_id: String,
    stream_id: String,
    currency: String,
    quantity: i64,
    unit_price: i64,
    amount: i64,
    commission: i64,
    refunded_amount: i64,
    commission_refunded: i64,
    restocked: i64,
    hold: String,
    available_at_us: i64,
    released_amount: Option<i64>,
    created_at_us: i64,
    tab_id: Option<String>,
    wallet_amount: i64,
    card_amount: i64,
    fee_amount: i64,
}

impl TryFrom<PurchaseRow> for Purchase {
    type Error = Error;
    fn try_from(r: PurchaseRow) -> Result<Self> {
        let c = currency(&r.currency)?;
        Ok(Purchase {
            purchase_id: PurchaseId::from_db(r.purchase_id),
            listing_id: ListingId::from_db(r.listing_id),
            buyer_id: UserId::from_db(r.buyer_id),
            seller_id: UserId::from_db(r.seller_id),
            stream_id: r.stream_id,
            quantity: r.quantity,
            unit_price: Money::from_minor(c, r.unit_price),
            amount: Money::from_minor(c, r.amount),
            commission: Money::from_minor(c, r.commission),
            refunded_amount: Money::from_minor(c, r.refunded_amount),
            commission_refunded: r.commission_refunded,
            restocked: r.restocked,
            hold: Hold::from_db(&r.hold)?,
            available_at_us: r.available_at_us,
            released_amount: r.released_amount,
            created_at_us: r.created_at_us,
            tab_id: r.tab_id.map(crate::kernel::ids::TabId::from_db),
            wallet_amount: Money::from_minor(c, r.wallet_amount),
            card_amount: Money::from_minor(c, r.card_amount),
            fee_amount: Money::from_minor(c, r.fee_amount),
        })
    }
}

/// How `insert_listing` ended.
pub(crate) enum ListingInserted {
    New(Listing),
    /// The key was used before: the listing it made, and that request's hash.
    Existing(Listing, String),
}

/// Stock additions one listing may have: each is a row kept for retries.
pub(crate) const STOCK_ADDS_PER_LISTING_MAX: i64 = 1_000;

/// What `add_stock` did.
#[derive(Debug)]
pub(crate) enum StockAdded {
    /// Added now, or by an earlier call with the same key and quantity: the listing.
    Added(Box<Listing>),
    /// No limited listing with that id.
    NoListing,
    /// The listing is closed (and the key is new).
    Closed,
    /// The key was used for another quantity.
    KeyReused,
    /// The listing would hold more than `QUANTITY_MAX` units.
    TooMuch,
    /// The listing had `STOCK_ADDS_PER_LISTING_MAX` additions already.
    TooManyAdds,
}

impl PaymentStore {
    pub(crate) async fn listing(&self, id: &ListingId) -> Result<Option<Listing>> {
        let row: Option<ListingRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {LISTING_COLUMNS} FROM listings WHERE listing_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(Listing::try_from).transpose()
    }

    /// A listing and its seller's commission override, for a purchase's price.
    pub(crate) async fn listing_for_sale(&self, id: &ListingId) -> Result<Option<(Listing, Option<i32>, bool)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            listing: ListingRow,
            commission_bps: Option<i32>,
            seller: bool,
        }
        let cols = LISTING_COLUMNS.split(", ").map(|c| format!("l.{c}")).collect::<Vec<_>>().join(", ");
        let row: Option<Row> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {cols}, a.commission_bps, a.seller FROM listings l JOIN accounts a ON a.user_id = l.seller_id \
             WHERE l.listing_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(|r| Ok((Listing::try_from(r.listing)?, r.commission_bps, r.seller))).transpose()
    }

    /// Inserts a listing unless the seller has used the key, and unless the seller has
    /// `open_max` open listings already (counted in the same transaction).
    pub(crate) async fn insert_listing(
        &self,
        input: &NewListing,
        per_buyer_max: i64,
        open_max: i64,
    ) -> Result<ListingInserted> {
        let now = self.clock.now_us();
        let id = ListingId::generate();
        let hash = input.request_hash();
        #[derive(sqlx::FromRow)]
        struct WithHash {
            #[sqlx(flatten)]
            listing: ListingRow,
            request_hash: String,
        }
        let by_key = format!(
            "SELECT {LISTING_COLUMNS}, request_hash FROM listings WHERE seller_id = $1 AND idempotency_key = $2"
        );
        let lock_seller = match &self.writer {
            Db::Postgres(_) => "SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE",
            Db::Sqlite(_) => "SELECT 1 FROM accounts WHERE user_id = $1",
        };
        let inserted: Option<ListingRow> = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            // The seller's account row is the lock that serializes their listing
            // creations on PostgreSQL, so the count below cannot be raced past the
            // limit; on SQLite the transaction's writes already run one at a time.
            sqlx::query(lock_seller).bind(input.seller_id.as_str()).execute(&mut *tx).await?;
            let open: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM listings WHERE seller_id = $1 AND closed_at_us IS NULL \
                 AND (ends_at_us IS NULL OR ends_at_us > $2)",
            )
            .bind(input.seller_id.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            if open >= open_max {
                // A retry of a creation that committed still gets its listing.
                let found: Option<WithHash> = sqlx::query_as(&by_key)
                    .bind(input.seller_id.as_str())
                    .bind(&input.idempotency_key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(f) = found {
                    return Ok(ListingInserted::Existing(Listing::try_from(f.listing)?, f.request_hash));
                }
                return Err(Error::ResourceExhausted {
                    reason: crate::kernel::reason::Reason::OpenListings,
                    message: format!("at most {open_max} open listings per seller; close one first"),
                });
            }
            let row: Option<ListingRow> = sqlx::query_as(&format!(
                "INSERT INTO listings (listing_id, seller_id, stream_id, title, currency, price, quantity, \
                 per_buyer_max, starts_at_us, ends_at_us, idempotency_key, request_hash, created_at_us, \
                 updated_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) \
                 ON CONFLICT (seller_id, idempotency_key) DO NOTHING RETURNING {LISTING_COLUMNS}"
            ))
            .bind(id.as_str())
            .bind(input.seller_id.as_str())
            .bind(&input.stream_id)
            .bind(&input.title)
            .bind(input.unit_price.currency().code())
            .bind(input.unit_price.minor())
            .bind(input.quantity)
            .bind(per_buyer_max)
            .bind(input.starts_at_us)
            .bind(input.ends_at_us)
            .bind(&input.idempotency_key)
            .bind(&hash)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, Error>(row)
        })?;
        if let Some(row) = inserted {
            return Ok(ListingInserted::New(Listing::try_from(row)?));
        }
        let f: Option<WithHash> = with_db!(&self.db, pool => sqlx::query_as(&by_key)
            .bind(input.seller_id.as_str())
            .bind(&input.idempotency_key)
            .fetch_optional(pool)
            .await)?;
        let f = f.ok_or_else(|| Error::internal(anyhow::anyhow!("listing key conflict without a row")))?;
        Ok(ListingInserted::Existing(Listing::try_from(f.listing)?, f.request_hash))
    }

    /// Adds `quantity` units to a limited, unclosed listing under `key` (a retry of an
    /// earlier add answers `Added`, closed since or not), in one
    /// transaction with the listing's row locked first (so the key check, the count of
    /// adds and the quantity bound read what no concurrent add can change). A retry of
    /// any earlier add answers the listing as it is now and adds nothing.
    pub(crate) async fn add_stock(&self, id: &ListingId, quantity: i64, key: &str) -> Result<StockAdded> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row: Option<ListingRow> = sqlx::query_as(&format!(
                "UPDATE listings SET updated_at_us = $2 WHERE listing_id = $1 RETURNING {LISTING_COLUMNS}"
            ))
            .bind(id.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(listing) = row.map(Listing::try_from).transpose()? else { return Ok(StockAdded::NoListing) };
            let Some(current) = listing.quantity else { return Ok(StockAdded::NoListing) };
            let earlier: Option<i64> = sqlx::query_scalar(
                "SELECT quantity FROM listing_stock_adds WHERE listing_id = $1 AND idempotency_key = $2",
            )
            .bind(id.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = match earlier {
                Some(q) if q != quantity => return Ok(StockAdded::KeyReused),
                // A retry of an add that was made answers the listing, closed since or not.
                Some(_) => StockAdded::Added(Box::new(listing)),
                None if listing.closed_at_us.is_some() => return Ok(StockAdded::Closed),
                None => {
                    let adds: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM listing_stock_adds WHERE listing_id = $1")
                        .bind(id.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                    if adds >= STOCK_ADDS_PER_LISTING_MAX {
                        return Ok(StockAdded::TooManyAdds);
                    }
                    if current + quantity > crate::payments::listing::QUANTITY_MAX {
                        return Ok(StockAdded::TooMuch);
                    }
                    sqlx::query(
                        "INSERT INTO listing_stock_adds (listing_id, idempotency_key, quantity, created_at_us) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id.as_str())
                    .bind(key)
                    .bind(quantity)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    let row: ListingRow = sqlx::query_as(&format!(
                        "UPDATE listings SET quantity = quantity + $2 WHERE listing_id = $1 RETURNING {LISTING_COLUMNS}"
                    ))
                    .bind(id.as_str())
                    .bind(quantity)
                    .fetch_one(&mut *tx)
                    .await?;
                    StockAdded::Added(Box::new(Listing::try_from(row)?))
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Closes a listing (idempotent: a closed one keeps its first closing time).
    pub(crate) async fn close_listing(&self, id: &ListingId) -> Result<Option<Listing>> {
        let now = self.clock.now_us();
        let row: Option<ListingRow> = with_db!(&self.writer, pool => sqlx::query_as(&format!(
            "UPDATE listings SET closed_at_us = COALESCE(closed_at_us, $2), updated_at_us = $2 \
             WHERE listing_id = $1 RETURNING {LISTING_COLUMNS}"
        ))
        .bind(id.as_str())
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        row.map(Listing::try_from).transpose()
    }

    /// Closes every open listing of a stream (the stream ended). Answers how many.
    pub(crate) async fn close_stream_listings(&self, stream_id: &str) -> Result<u64> {
        let now = self.clock.now_us();
        let n = with_db!(&self.writer, pool => sqlx::query(
            "UPDATE listings SET closed_at_us = $2, updated_at_us = $2 WHERE stream_id = $1 AND closed_at_us IS NULL"
        )
        .bind(stream_id)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// A stream's listings before the keyset `before`, newest first.
    pub(crate) async fn listings(&self, stream_id: &str, before: (i64, String), limit: i64) -> Result<Vec<Listing>> {
        let rows: Vec<ListingRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {LISTING_COLUMNS} FROM listings WHERE stream_id = $1 \
             AND (created_at_us < $2 OR (created_at_us = $2 AND listing_id < $3)) \
             ORDER BY created_at_us DESC, listing_id DESC LIMIT $4"
        ))
        .bind(stream_id)
        .bind(before.0)
        .bind(&before.1)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Listing::try_from).collect()
    }

    pub(crate) async fn purchase(&self, id: &PurchaseId) -> Result<Option<Purchase>> {
        let row: Option<PurchaseRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE purchase_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(Purchase::try_from).transpose()
    }

    /// The buyer's purchase under `key`, with its request's hash.
    pub(crate) async fn purchase_by_key(&self, buyer: &UserId, key: &str) -> Result<Option<(Purchase, String)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            row: PurchaseRow,
            request_hash: String,
        }
        let row: Option<Row> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {PURCHASE_COLUMNS}, request_hash FROM purchases WHERE buyer_id = $1 AND idempotency_key = $2"
        ))
        .bind(buyer.as_str())
        .bind(key)
        .fetch_optional(pool)
        .await)?;
        row.map(|r| Ok((Purchase::try_from(r.row)?, r.request_hash))).transpose()
    }

    /// A seller's sales before the keyset `before`, newest first.
    pub(crate) async fn sales(&self, seller: &UserId, before: (i64, String), limit: i64) -> Result<Vec<Purchase>> {
        let rows: Vec<PurchaseRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE seller_id = $1 \
             AND (created_at_us < $2 OR (created_at_us = $2 AND purchase_id < $3)) \
             ORDER BY created_at_us DESC, purchase_id DESC LIMIT $4"
        ))
        .bind(seller.as_str())
        .bind(before.0)
        .bind(&before.1)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Purchase::try_from).collect()
    }

    /// Held purchases whose hold has ended, or releases a crash interrupted: at most
    /// `limit`, oldest first.
    pub(crate) async fn due_releases(&self, limit: i64) -> Result<Vec<Purchase>> {
        let now = self.clock.now_us();
        let rows: Vec<PurchaseRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE hold <> 'released' AND available_at_us <= $1 \
             ORDER BY available_at_us LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Purchase::try_from).collect()
    }

    /// Fixes what a held purchase releases (its seller share less what refunds took
    /// from pending) and marks it releasing; a purchase already releasing keeps its
    /// amount. `None` when it is released already.
    pub(crate) async fn start_release(&self, id: &PurchaseId) -> Result<Option<i64>> {
        let now = self.clock.now_us();
        let amount: Option<Option<i64>> = with_db!(&self.writer, pool => sqlx::query_scalar(
            "UPDATE purchases SET hold = 'releasing', updated_at_us = $2, released_amount = COALESCE(released_amount, \
             (amount - commission) - (refunded_amount - commission_refunded)) \
             WHERE purchase_id = $1 AND hold <> 'released' RETURNING released_amount"
        )
        .bind(id.as_str())
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        Ok(amount.flatten())
    }

    pub(crate) async fn finish_release(&self, id: &PurchaseId) -> Result<()> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE purchases SET hold = 'released', updated_at_us = $2 WHERE purchase_id = $1 AND hold = 'releasing'"
        )
        .bind(id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Makes a held purchase's money due now (the order was delivered).
    pub(crate) async fn release_now(&self, id: &PurchaseId) -> Result<()> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE purchases SET available_at_us = $2, updated_at_us = $2 \
             WHERE purchase_id = $1 AND hold = 'held' AND available_at_us > $2"
        )
        .bind(id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }
}

/// The purchases with these ids, by id.
pub(crate) async fn purchases_by_id(db: &Db, ids: &[&str]) -> Result<HashMap<String, Purchase>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<PurchaseRow> = match db {
        Db::Postgres(pool) => {
            sqlx::query_as(&format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE purchase_id = ANY($1)"))
                .bind(ids)
                .fetch_all(pool)
                .await?
        }
        Db::Sqlite(pool) => {
            sqlx::query_as(&format!(
                "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE purchase_id IN (SELECT value FROM json_each($1))"
            ))
            .bind(json_rows(ids)?)
            .fetch_all(pool)
            .await?
        }
    };
    rows.into_iter().map(|r| Purchase::try_from(r).map(|p| (p.purchase_id.to_string(), p))).collect()
}
