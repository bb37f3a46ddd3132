//! The ledger's idempotency keys as other modules may touch them: only through here.
//!
//! A module that posts under a key it derives (a refund's entry, say) sometimes has to
//! make sure the key can never be posted under again, because the entry must not happen
//! any more. It does that by taking the key first with a tombstone, an operation no
//! ledger request ever carries: a later post under the key is then refused as a key
//! reused for another request, and the tombstone's writer knows the entry will not appear.

/// Takes `$key` of `$caller` with the tombstone `$operation`, stamped `$now_us`, in the
/// caller's own transaction `$tx` (either backend, inside `with_db!`). Evaluates to
/// `Result<Option<String>, sqlx::Error>`: `None` when the tombstone took the key, or the
/// operation of whatever held it already (the entry's own, or another tombstone).
///
/// On PostgreSQL an insert that meets an uncommitted row with the same key waits for
/// that transaction, so the answer is final; on SQLite the writer holds the whole
/// database, so no other row can be in flight.
macro_rules! fence_idempotency_key {
    ($tx:expr, $caller:expr, $key:expr, $operation:expr, $now_us:expr) => {{
        let placed = sqlx::query(
            "INSERT INTO idempotency_keys (caller, key, operation, request_hash, result_id, created_at_us) \
             VALUES ($1, $2, $3, '', '', $4) ON CONFLICT (caller, key) DO NOTHING",
        )
        .bind($caller)
        .bind($key)
        .bind($operation)
        .bind($now_us)
        .execute(&mut *$tx)
        .await?
        .rows_affected()
            == 1;
        if placed {
            Ok::<Option<String>, sqlx::Error>(None)
        } else {
            let operation: Option<String> =
                sqlx::query_scalar("SELECT operation FROM idempotency_keys WHERE caller = $1 AND key = $2")
                    .bind($caller)
                    .bind($key)
                    .fetch_optional(&mut *$tx)
                    .await?;
            // The key's row cannot vanish inside this transaction except by the daily
            // purge of old keys; an empty operation then reads as "not a tombstone".
            Ok(Some(operation.unwrap_or_default()))
        }
    }};
}
pub(crate) use fence_idempotency_key;
