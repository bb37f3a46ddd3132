//! How far a publisher of the outbox (`payment_events`) to another system has got
//! (`outbox_cursors`): the last sequence the other side acknowledged, and which process
//! holds the publishing lease.
//!
//! One process of a deployment publishes at a time, so events leave in sequence order:
//! a process takes the lease when it is free or expired, renews it with every advance,
//! and gives it up when it stops. A process that crashed holds it until it expires; the
//! next owner resumes from the cursor, so an event acknowledged but not yet recorded is
//! sent again (the broker drops it as a duplicate by its id), and none is skipped.

use crate::kernel::clock::Clock;
use crate::kernel::error::Result;
use crate::store::Db;
use crate::with_db;

/// One publisher's cursor and lease, as process `owner`.
#[derive(Clone)]
pub struct OutboxCursor {
    writer: Db,
    clock: Clock,
    name: String,
    owner: String,
}

impl super::Payments {
    /// The cursor of the publisher `name`, held as this process.
    pub fn outbox_cursor(&self, name: &str) -> OutboxCursor {
        OutboxCursor {
            writer: self.store.writer().clone(),
            clock: self.store.clock().clone(),
            name: name.to_owned(),
            owner: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
        }
    }
}

impl OutboxCursor {
    /// Takes or renews the lease for `lease_us`; the last acknowledged sequence when
    /// this process holds it, `None` while another does.
    pub async fn claim(&self, lease_us: i64) -> Result<Option<i64>> {
        if let Some(sequence) = self.take_lease(lease_us).await? {
            return Ok(Some(sequence));
        }
        // No row yet (the deployment's first publisher), or another process holds it:
        // make the row if it is missing, then try once more.
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "INSERT INTO outbox_cursors (name, sequence, owner, lease_until_us, updated_at_us) \
             VALUES ($1, 0, '', 0, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&self.name)
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.take_lease(lease_us).await
    }

    /// The lease, if it is this process's or free: the cursor.
    async fn take_lease(&self, lease_us: i64) -> Result<Option<i64>> {
        let now = self.clock.now_us();
        let sequence: Option<i64> = with_db!(&self.writer, pool => sqlx::query_scalar(
            "UPDATE outbox_cursors SET owner = $2, lease_until_us = $3, updated_at_us = $4 \
             WHERE name = $1 AND (owner = $2 OR lease_until_us < $4) RETURNING sequence",
        )
        .bind(&self.name)
        .bind(&self.owner)
        .bind(now.saturating_add(lease_us))
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        Ok(sequence)
    }

    /// Records `sequence` as acknowledged and renews the lease; `false` when the lease
    /// was lost meanwhile (another process publishes now).
    pub async fn advance(&self, sequence: i64, lease_us: i64) -> Result<bool> {
        let now = self.clock.now_us();
        let done = with_db!(&self.writer, pool => sqlx::query(
            "UPDATE outbox_cursors SET sequence = $3, lease_until_us = $4, updated_at_us = $5 \
             WHERE name = $1 AND owner = $2 AND sequence <= $3"
        )
        .bind(&self.name)
        .bind(&self.owner)
        .bind(sequence)
        .bind(now.saturating_add(lease_us))
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Gives the lease up (a clean stop), so the next process need not wait for it.
    pub async fn release(&self) -> Result<()> {
        with_db!(&self.writer, pool => sqlx::query(
            "UPDATE outbox_cursors SET lease_until_us = 0 WHERE name = $1 AND owner = $2"
        )
        .bind(&self.name)
        .bind(&self.owner)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }
}
