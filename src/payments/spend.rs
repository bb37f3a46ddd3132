//! What senders have sent, per currency and hour, for the rolling 24-hour limit.
//!
//! The window is counted in whole hours: a payment counts from the moment it is made
//! until the end of the hour that ends 24 hours after the hour it was made in, so for
//! 24 to 25 hours. That errs on the strict side (never more than the limit in any 24
//! hours) and keeps the check at most 25 rows per sender, however many payments the
//! sender makes. Rows are added in the transaction that records the payment, under the
//! sender's wallet lock for wallet sends, so concurrent sends cannot both slip under the
//! limit.

/// One hour in microseconds: the bucket width.
pub const HOUR_US: i64 = 3_600_000_000;
/// Buckets kept after they leave the window, for inspection, before the resolver
/// deletes them.
pub const KEEP_HOURS: i64 = 48;

/// The bucket of a moment.
pub fn hour_of(us: i64) -> i64 {
    us.div_euclid(HOUR_US)
}

/// The first bucket of the window that ends at `now_us`: the one holding `now - 24h`.
pub fn window_start(now_us: i64) -> i64 {
    hour_of(now_us - 24 * HOUR_US)
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
