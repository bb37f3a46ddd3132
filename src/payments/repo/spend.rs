//! The rolling-limit buckets (`payment_spend`): what `spend` counts, as rows.

use crate::store::Db;
use crate::with_db;

/// Adds `$4` to the bucket (`$1` sender, `$2` currency, `$3` hour) inside the caller's
/// transaction.
pub(crate) const ADD_SQL: &str =
    "INSERT INTO payment_spend (sender_id, currency, hour, amount) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (sender_id, currency, hour) DO UPDATE SET amount = payment_spend.amount + excluded.amount";

/// Takes `$4` back from the bucket, for a payment that failed after it was counted.
/// (An upsert of a negative amount would fail the row's CHECK before the conflict is
/// seen.)
pub(crate) const SUB_SQL: &str =
    "UPDATE payment_spend SET amount = amount - $4 WHERE sender_id = $1 AND currency = $2 AND hour = $3";

/// Runs `ADD_SQL` or `SUB_SQL` for payment `$p`'s amount in its bucket, inside the
/// transaction `$tx` (either backend's).
macro_rules! change {
    ($tx:expr, $sql:expr, $p:expr) => {{
        let p: &$crate::payments::Payment = $p;
        sqlx::query($sql)
            .bind(&p.sender_id)
            .bind(p.currency().code())
            .bind($crate::payments::spend::hour_of(p.created_at_us))
            .bind(p.amount.minor())
            .execute(&mut *$tx)
            .await?;
    }};
}
pub(crate) use change;

/// What sender `$1` sent in currency `$2` from bucket `$3` on (NULL for nothing).
pub(crate) const SUM_SQL: &str =
    "SELECT CAST(SUM(amount) AS BIGINT) FROM payment_spend WHERE sender_id = $1 AND currency = $2 AND hour >= $3";

/// What `sender` sent in `currency` in the window ending at `now_us`.
pub async fn sent(
    db: &Db,
    sender: &crate::kernel::ids::UserId,
    currency: crate::kernel::money::Currency,
    now_us: i64,
) -> crate::kernel::error::Result<i64> {
    let sum: Option<i64> = with_db!(db, pool => sqlx::query_scalar(SUM_SQL)
    .bind(sender)
    .bind(currency.code())
    .bind(crate::payments::spend::window_start(now_us))
    .fetch_one(pool)
    .await)?;
    Ok(sum.unwrap_or(0))
}

/// Deletes buckets long out of the window. Returns how many.
pub async fn purge(db: &Db, now_us: i64) -> crate::kernel::error::Result<u64> {
    let n = with_db!(db, pool => sqlx::query("DELETE FROM payment_spend WHERE hour < $1")
        .bind(crate::payments::spend::window_start(now_us) - crate::payments::spend::KEEP_HOURS)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n)
}
