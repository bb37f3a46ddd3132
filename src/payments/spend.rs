//! What senders have sent, per currency and hour, for the rolling 24-hour limit.
//!
//! The window is counted in whole hours: a payment counts from the moment it is made
//! until the end of the hour that ends 24 hours after the hour it was made in, so for
//! 24 to 25 hours. That errs on the strict side (never more than the limit in any 24
//! hours) and keeps the check at most 25 rows per sender, however many payments the
//! sender makes. Rows are added in the transaction that records the payment, under the
//! sender's wallet lock for wallet sends, so concurrent sends cannot both slip under the
//! limit.

use crate::store::Db;
use crate::with_db;

/// One hour in microseconds: the bucket width.
pub const HOUR_US: i64 = 3_600_000_000;
/// Buckets kept after they leave the window, for inspection, before the resolver
/// deletes them.
const KEEP_HOURS: i64 = 48;

/// The bucket of a moment.
pub fn hour_of(us: i64) -> i64 {
    us.div_euclid(HOUR_US)
}

/// The first bucket of the window that ends at `now_us`: the one holding `now - 24h`.
pub fn window_start(now_us: i64) -> i64 {
    hour_of(now_us - 24 * HOUR_US)
}

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
            .bind(&p.currency)
            .bind($crate::payments::spend::hour_of(p.created_at_us))
            .bind(p.amount)
            .execute(&mut *$tx)
            .await?;
    }};
}
pub(crate) use change;

/// What sender `$1` sent in currency `$2` from bucket `$3` on (NULL for nothing).
pub(crate) const SUM_SQL: &str =
    "SELECT CAST(SUM(amount) AS BIGINT) FROM payment_spend WHERE sender_id = $1 AND currency = $2 AND hour >= $3";

/// What `sender` sent in `currency` in the window ending at `now_us`.
pub async fn sent(db: &Db, sender: &str, currency: &str, now_us: i64) -> crate::kernel::error::Result<i64> {
    let sum: Option<i64> = with_db!(db, pool => sqlx::query_scalar(SUM_SQL)
    .bind(sender)
    .bind(currency)
    .bind(window_start(now_us))
    .fetch_one(pool)
    .await)?;
    Ok(sum.unwrap_or(0))
}

/// Deletes buckets long out of the window. Returns how many.
pub async fn purge(db: &Db, now_us: i64) -> crate::kernel::error::Result<u64> {
    let n = with_db!(db, pool => sqlx::query("DELETE FROM payment_spend WHERE hour < $1")
        .bind(window_start(now_us) - KEEP_HOURS)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_covers_the_last_24_hours_in_whole_buckets() {
        let now = 1_000 * HOUR_US + HOUR_US / 2;
        assert_eq!(hour_of(now), 1_000);
        // 24 hours ago falls in bucket 976, which is still counted.
        assert_eq!(window_start(now), 976);
        assert_eq!(hour_of(now - 24 * HOUR_US), 976);
        assert_eq!(hour_of(-1), -1);
    }
}
