//! Keeping stored card data minimal and its keys current: unlinked methods are deleted
//! when they expire, a removed card's number is destroyed once its retention has
//! passed, and data keys are re-wrapped under the active KEK.

use super::keys::Sealed;
use super::model::SealedRow;
use super::Vault;
use crate::kernel::error::{Error, Result};
use crate::with_db;

/// Records re-wrapped per transaction by `rotate`.
const ROTATE_BATCH: i64 = 200;
/// Cards destroyed per transaction by `destroy_removed`.
const DESTROY_BATCH: i64 = 200;
/// What a destroyed card's `kek_id` reads: no key wraps anything any more.
pub const DESTROYED_KEK: &str = "destroyed";

impl Vault {
    /// Deletes unlinked methods past their expiry (all, or one token). They never held
    /// money, and deleting unneeded card data is the point.
    pub async fn purge(&self, token: Option<&str>) -> Result<u64> {
        let now = self.now_us();
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

    /// Destroys the numbers of cards removed longer ago than the retention: empties the
    /// wrapped data key and the ciphertext (crypto-shredding: without the key no copy of
    /// the ciphertext can be read), each with a `card.destroy` audit record. The row
    /// stays, with brand, last four and expiry, for the payments that used it. Returns
    /// how many were destroyed.
    pub async fn destroy_removed(&self) -> Result<u64> {
        let retention = i64::try_from(self.config.removed_retention.as_micros()).unwrap_or(i64::MAX);
        let cutoff = self.now_us().saturating_sub(retention);
        let mut total = 0u64;
        let begin = self.writer.begin_deciding_sql();
        loop {
            let now = self.now_us();
            let tokens: Vec<String> = with_db!(&self.writer, pool => async {
                let mut tx = pool.begin_with(begin).await?;
                let tokens: Vec<String> = sqlx::query_scalar(
                    "SELECT token FROM payment_methods WHERE status = 'removed' AND destroyed_at_us IS NULL \
                     AND removed_at_us <= $1 ORDER BY removed_at_us LIMIT $2",
                )
                .bind(cutoff)
                .bind(DESTROY_BATCH)
                .fetch_all(&mut *tx)
                .await?;
                for token in &tokens {
                    sqlx::query(
                        "UPDATE payment_methods SET wrapped_dek = $2, pan_ciphertext = $2, kek_id = $3, destroyed_at_us = $4 \
                         WHERE token = $1 AND status = 'removed' AND destroyed_at_us IS NULL",
                    )
                    .bind(token)
                    .bind(Vec::<u8>::new())
                    .bind(DESTROYED_KEK)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    audit_card!(&mut *tx, "system:vault", "card.destroy", token, "ok", "retention passed", now).await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(tokens)
            }
            .await)?;
            total += tokens.len() as u64;
            if (tokens.len() as i64) < DESTROY_BATCH {
                return Ok(total);
            }
        }
    }

    /// Re-wraps every data key not under the active KEK, in batches; resumable (it
    /// picks up whatever is left) and online (one short transaction per batch).
    pub async fn rotate(&self, actor: &str) -> Result<u64> {
        let active = self.keys.active_kek().to_owned();
        let mut total = 0u64;
        loop {
            let rows: Vec<SealedRow> = with_db!(&self.db, pool => sqlx::query_as(
                "SELECT token, user_id, kek_id, wrapped_dek, pan_ciphertext FROM payment_methods \
                 WHERE kek_id <> $1 AND destroyed_at_us IS NULL ORDER BY token LIMIT $2",
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
