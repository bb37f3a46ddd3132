//! Background upkeep: expiring pending entries past their timeout (through the engine,
//! like every write) and dropping idempotency keys past their retention.

use std::time::Duration;

use super::engine::{EngineHandle, Op, Resolution};
use super::read;
use crate::kernel::error::Result;
use crate::store::Db;
use crate::with_db;

/// Pending entries expired per sweep; the next sweep takes the rest.
const EXPIRE_BATCH_MAX: i64 = 500;

/// The caller recorded on entries the sweeper writes.
pub const EXPIRY_ACTOR: &str = super::callers::EXPIRY;

/// Expires every pending entry past its timeout; returns how many it expired.
pub async fn expire_due(db: &Db, engine: &EngineHandle) -> Result<usize> {
    let ids: Vec<String> = with_db!(db, pool => sqlx::query_scalar(
        "SELECT e.id FROM ledger_entries e WHERE e.status = 'pending' AND e.expires_at_us <= $1 \
         AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.pending_entry_id = e.id) \
         ORDER BY e.expires_at_us LIMIT $2",
    )
    .bind(engine.clock().now_us())
    .bind(EXPIRE_BATCH_MAX)
    .fetch_all(pool)
    .await)?;
    let entries = read::get_entries(db, &ids).await?;
    // Submitted together, so the engine commits them in as few batches as it can.
    let mut set = tokio::task::JoinSet::new();
    for pending in entries {
        let engine = engine.clone();
        set.spawn(async move {
            engine.submit(EXPIRY_ACTOR, None, Op::Resolve { pending, action: Resolution::Expire }).await
        });
    }
    let mut expired = 0;
    while let Some(result) = set.join_next().await {
        // A concurrent post or void wins the race; that is not an error.
        if matches!(result, Ok(Ok(_))) {
            expired += 1;
        }
    }
    Ok(expired)
}

/// Deletes idempotency keys older than `retention`.
pub async fn prune_keys(db: &Db, retention: Duration, now_us: i64) -> Result<u64> {
    let cutoff = now_us.saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
    Ok(crate::ledger::engine::backend::delete_keys_before(db, cutoff).await?)
}

/// Runs both jobs until the task is dropped.
pub async fn run(db: Db, engine: EngineHandle, expiry_interval: Duration, key_retention: Duration) {
    let mut tick = tokio::time::interval(expiry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        match expire_due(&db, &engine).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "expired pending ledger entries"),
            Err(e) => tracing::warn!(error = %e, "pending-entry expiry failed; will retry"),
        }
        if last_prune.elapsed() >= Duration::from_secs(3600) {
            last_prune = tokio::time::Instant::now();
            match prune_keys(&db, key_retention, engine.clock().now_us()).await {
                Ok(n) => tracing::info!(deleted = n, "pruned idempotency keys past retention"),
                Err(e) => tracing::warn!(error = %e, "idempotency key pruning failed; will retry"),
            }
        }
    }
}
