//! Keeping stored card data minimal and its keys current: unlinked methods are deleted
//! when they expire, and data keys are re-wrapped under the active KEK.

use super::keys::Sealed;
use super::model::SealedRow;
use super::Vault;
use crate::error::{Error, Result};
use crate::store::now_us;
use crate::with_db;

/// Records re-wrapped per transaction by `rotate`.
const ROTATE_BATCH: i64 = 200;

impl Vault {
    /// Deletes unlinked methods past their expiry (all, or one token). They never held
    /// money, and deleting unneeded card data is the point.
    pub async fn purge(&self, token: Option<&str>) -> Result<u64> {
        let now = now_us();
        let n = with_db!(&self.writer, pool => sqlx::query(
            "DELETE FROM payment_methods WHERE status = 'unlinked' AND expires_at_us <= $1 AND ($2 IS NULL OR token = $2)",
        )
        .bind(now)
        .bind(token)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Re-wraps every data key not under the active KEK, in batches; resumable (it
    /// picks up whatever is left) and online (one short transaction per batch).
    pub async fn rotate(&self, actor: &str) -> Result<u64> {
        let active = self.keys.active_kek().to_owned();
        let mut total = 0u64;
        loop {
            let rows: Vec<SealedRow> = with_db!(&self.db, pool => sqlx::query_as(
                "SELECT token, user_id, kek_id, wrapped_dek, pan_ciphertext FROM payment_methods \
                 WHERE kek_id <> $1 ORDER BY token LIMIT $2",
            )
            .bind(&active)
            .bind(ROTATE_BATCH)
            .fetch_all(pool)
            .await)?;
            if rows.is_empty() {
                break;
            }
            let mut updates = Vec::with_capacity(rows.len());
            for (token, user, kek_id, wrapped_dek, ciphertext) in rows {
                let sealed = Sealed { kek_id: kek_id.clone(), wrapped_dek, ciphertext };
                let rewrapped = self
                    .keys
                    .rewrap(&sealed, &token, &user)
                    .map_err(|e| Error::internal(anyhow::anyhow!("rotating {token}: {e}")))?;
                updates.push((token, kek_id, rewrapped));
            }
            let n = updates.len() as u64;
            with_db!(&self.writer, pool => {
                let mut tx = pool.begin().await?;
                for (token, old_kek, sealed) in &updates {
                    // Only if nobody rotated it meanwhile.
                    sqlx::query("UPDATE payment_methods SET kek_id = $2, wrapped_dek = $3 WHERE token = $1 AND kek_id = $4")
                        .bind(token)
                        .bind(&sealed.kek_id)
                        .bind(&sealed.wrapped_dek)
                        .bind(old_kek)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(())
            })?;
            total += n;
        }
        self.audit(actor, "vault.rotate", "*", "ok", &format!("{total} data keys re-wrapped under {active}")).await?;
        Ok(total)
    }
}
