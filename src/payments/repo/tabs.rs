//! Stream tabs' rows (`stream_tabs`): opening, the batch's reads and spend under its
//! locks, closing with the amount fixed first, and what the resolver picks up.

use std::collections::HashMap;

use super::PaymentStore;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{TabId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::ledger::engine::hook::Conn;
use crate::payments::listing::{Tab, TabKind, TabStatus};
use crate::store::json_rows;
use crate::with_db;

pub(crate) const TAB_COLUMNS: &str = "tab_id, buyer_id, stream_id, currency, cap, spent, status, \
     payment_method_token, authorization_ref, capture_ref, captured, failure_reason, failure_message, expires_at_us, \
     created_at_us, closed_at_us, kind";

#[derive(sqlx::FromRow)]
pub(crate) struct TabRow {
    tab_id: String,
    buyer_id: String,
    stream_id: String,
    currency: String,
    cap: i64,
    spent: i64,
    status: String,
    payment_method_token: Option<String>,
    authorization_ref: Option<String>,
    capture_ref: Option<String>,
    captured: Option<i64>,
    failure_reason: String,
    failure_message: String,
    expires_at_us: i64,
    created_at_us: i64,
    closed_at_us: Option<i64>,
    kind: String,
}

impl TryFrom<TabRow> for Tab {
    type Error = Error;
    fn try_from(r: TabRow) -> Result<Self> {
        let c = Currency::from_code(&r.currency)
            .ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {:?} in stream_tabs", r.currency)))?;
        Ok(Tab {
            tab_id: TabId::from_db(r.tab_id),
            buyer_id: UserId::from_db(r.buyer_id),
            stream_id: r.stream_id,
            cap: Money::from_minor(c, r.cap),
            spent: Money::from_minor(c, r.spent),
            status: TabStatus::from_db(&r.status)?,
            payment_method_token: r.payment_method_token,
            authorization_ref: r.authorization_ref,
            capture_ref: r.capture_ref,
            captured: r.captured,
            failure_reason: r.failure_reason,
            failure_message: r.failure_message,
            expires_at_us: r.expires_at_us,
            created_at_us: r.created_at_us,
            closed_at_us: r.closed_at_us,
            kind: TabKind::from_db(&r.kind)?,
        })
    }
}

/// How `insert_tab` ended.
pub(crate) enum TabInserted {
    New(Tab),
    /// The key was used before: that tab, and its request's hash.
    Existing(Tab, String),
}

impl PaymentStore {
    pub(crate) async fn tab(&self, id: &TabId) -> Result<Option<Tab>> {
        let row: Option<TabRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {TAB_COLUMNS} FROM stream_tabs WHERE tab_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(Tab::try_from).transpose()
    }

    /// The buyer's tab under `key`, with its request's hash.
    async fn tab_by_key(&self, buyer: &UserId, key: &str) -> Result<Option<(Tab, String)>> {
        #[derive(sqlx::FromRow)]
        struct WithHash {
            #[sqlx(flatten)]
            row: TabRow,
            request_hash: String,
        }
        let found: Option<WithHash> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {TAB_COLUMNS}, request_hash FROM stream_tabs WHERE buyer_id = $1 AND idempotency_key = $2"
        ))
        .bind(buyer.as_str())
        .bind(key)
        .fetch_optional(pool)
        .await)?;
        found.map(|f| Ok((Tab::try_from(f.row)?, f.request_hash))).transpose()
    }

    /// Records a tab as opening unless the buyer used the key. A second tab for the
    /// same stream while one is open is refused (the partial unique index).
    pub(crate) async fn insert_tab(&self, tab: &Tab, key: &str, hash: &str) -> Result<TabInserted> {
        if let Some((t, h)) = self.tab_by_key(&tab.buyer_id, key).await? {
            return Ok(TabInserted::Existing(t, h));
        }
        let inserted = with_db!(&self.writer, pool => sqlx::query(
            "INSERT INTO stream_tabs (tab_id, buyer_id, stream_id, currency, cap, status, payment_method_token, \
             idempotency_key, request_hash, expires_at_us, created_at_us, updated_at_us, kind) \
             VALUES ($1, $2, $3, $4, $5, 'opening', $6, $7, $8, $9, $10, $10, $11)",
        )
        .bind(tab.tab_id.as_str())
        .bind(tab.buyer_id.as_str())
        .bind(&tab.stream_id)
        .bind(tab.cap.currency().code())
        .bind(tab.cap.minor())
        .bind(&tab.payment_method_token)
        .bind(key)
        .bind(hash)
        .bind(tab.expires_at_us)
        .bind(tab.created_at_us)
        .bind(tab.kind.as_str())
        .execute(pool)
        .await
        .map(|_| ()));
        match inserted {
            Ok(()) => Ok(TabInserted::New(tab.clone())),
            // A concurrent retry with the key committed first, or another tab for the
            // stream is open.
            Err(e) if crate::store::is_unique_violation(&e) => match self.tab_by_key(&tab.buyer_id, key).await? {
                Some((t, h)) => Ok(TabInserted::Existing(t, h)),
                None => Err(Error::AlreadyExists(format!(
                    "you have an open tab for stream {} already; close it first",
                    tab.stream_id
                ))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Marks an opening tab open with its authorization.
    pub(crate) async fn open_tab(&self, id: &TabId, authorization: &str) -> Result<Option<Tab>> {
        let now = self.clock.now_us();
        let row: Option<TabRow> = with_db!(&self.writer, pool => sqlx::query_as(&format!(
            "UPDATE stream_tabs SET status = 'open', authorization_ref = $2, updated_at_us = $3 \
             WHERE tab_id = $1 AND status = 'opening' RETURNING {TAB_COLUMNS}"
        ))
        .bind(id.as_str())
        .bind(authorization)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        row.map(Tab::try_from).transpose()
    }

    /// Fails a tab: its authorization was declined (opening), or its capture (closing).
    pub(crate) async fn fail_tab(&self, id: &TabId, reason: &str, message: &str) -> Result<()> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE stream_tabs SET status = 'failed', failure_reason = $2, failure_message = $3, \
             updated_at_us = $4, closed_at_us = $4 WHERE tab_id = $1 AND status IN ('opening', 'closing')",
        )
        .bind(id.as_str())
        .bind(reason)
        .bind(message)
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Stops purchases on an open tab and fixes what its closing captures. Answers the
    /// tab as it now stands (closing, or whatever it already was).
    pub(crate) async fn start_closing_tab(&self, id: &TabId) -> Result<Option<Tab>> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE stream_tabs SET status = 'closing', captured = spent, updated_at_us = $2 \
             WHERE tab_id = $1 AND status = 'open'",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.tab(id).await
    }

    /// A closing tab's capture is booked: closed.
    pub(crate) async fn close_tab(&self, id: &TabId, capture_ref: Option<&str>) -> Result<Option<Tab>> {
        let now = self.clock.now_us();
        let row: Option<TabRow> = with_db!(&self.writer, pool => sqlx::query_as(&format!(
            "UPDATE stream_tabs SET status = 'closed', capture_ref = $2, updated_at_us = $3, closed_at_us = $3 \
             WHERE tab_id = $1 AND status = 'closing' RETURNING {TAB_COLUMNS}"
        ))
        .bind(id.as_str())
        .bind(capture_ref)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        row.map(Tab::try_from).transpose()
    }

    /// Open tabs of a stream (at most `limit`).
    pub(crate) async fn open_tabs_of_stream(&self, stream_id: &str, limit: i64) -> Result<Vec<Tab>> {
        let rows: Vec<TabRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {TAB_COLUMNS} FROM stream_tabs WHERE stream_id = $1 AND status IN ('opening', 'open') LIMIT $2"
        ))
        .bind(stream_id)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Tab::try_from).collect()
    }

    /// What the resolver finishes: open tabs past their expiry, and tabs left opening
    /// or closing since before `stale_before_us` (a crash, or an unknown card outcome).
    pub(crate) async fn due_tabs(&self, stale_before_us: i64, limit: i64) -> Result<Vec<Tab>> {
        let now = self.clock.now_us();
        let rows: Vec<TabRow> = with_db!(&self.db, pool => sqlx::query_as(&format!(
            "SELECT {TAB_COLUMNS} FROM stream_tabs WHERE status IN ('opening', 'open', 'closing') \
             AND (expires_at_us <= $1 OR (status <> 'open' AND updated_at_us < $2)) ORDER BY expires_at_us LIMIT $3"
        ))
        .bind(now)
        .bind(stale_before_us)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Tab::try_from).collect()
    }
}

/// The batch's tabs by id, locked on PostgreSQL (the hook's rows of the lock order, as
/// the listings are).
pub(crate) async fn prepare_tabs(
    conn: &mut Conn<'_>,
    ids: &[&str],
) -> std::result::Result<HashMap<String, Tab>, sqlx::Error> {
    let rows: Vec<TabRow> = match conn {
        Conn::Postgres(c) => {
            sqlx::query_as(&format!(
                "SELECT {TAB_COLUMNS} FROM stream_tabs WHERE tab_id = ANY($1) ORDER BY tab_id FOR UPDATE"
            ))
            .bind(ids)
            .fetch_all(&mut **c)
            .await?
        }
        Conn::Sqlite(c) => {
            sqlx::query_as(&format!(
                "SELECT {TAB_COLUMNS} FROM stream_tabs WHERE tab_id IN (SELECT value FROM json_each(?1))"
            ))
            .bind(json_rows(ids)?)
            .fetch_all(&mut **c)
            .await?
        }
    };
    rows.into_iter()
        .map(|r| Tab::try_from(r).map(|t| (t.tab_id.to_string(), t)))
        .collect::<Result<HashMap<_, _>>>()
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))
}

/// Adds each tab's spend in the batch (`HookBatch::write_rows`).
pub(crate) async fn write_tab_spend(
    conn: &mut Conn<'_>,
    spent: &[(&str, i64)],
) -> std::result::Result<(), sqlx::Error> {
    if spent.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Postgres(c) => {
            let (ids, amounts): (Vec<&str>, Vec<i64>) = spent.iter().copied().unzip();
            sqlx::query(
                "UPDATE stream_tabs t SET spent = t.spent + s.n FROM UNNEST($1::text[], $2::int8[]) AS s(id, n) \
                 WHERE t.tab_id = s.id",
            )
            .bind(&ids)
            .bind(&amounts)
            .execute(&mut **c)
            .await?;
        }
        Conn::Sqlite(c) => {
            sqlx::query(
                "UPDATE stream_tabs SET spent = spent + (SELECT j.value ->> 1 FROM json_each(?1) AS j \
                 WHERE j.value ->> 0 = stream_tabs.tab_id) \
                 WHERE tab_id IN (SELECT j.value ->> 0 FROM json_each(?1) AS j)",
            )
            .bind(json_rows(spent)?)
            .execute(&mut **c)
            .await?;
        }
    }
    Ok(())
}
