//! A user's saved methods after linking: listing, the default, removal.

use super::model::{MethodRow, METHOD_COLUMNS};
use super::{check_token, not_found, PaymentMethod, Vault};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::reason::Reason;
use crate::with_db;

impl Vault {
    pub async fn list(&self, user: &UserId, include_removed: bool) -> Result<Vec<PaymentMethod>> {
        let sql = format!(
            "SELECT {METHOD_COLUMNS} FROM payment_methods WHERE user_id = $1 ORDER BY created_at_us DESC, token LIMIT 200"
        );
        let rows: Vec<MethodRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(user.as_str()).fetch_all(pool).await)?;
        let now = self.now_us();
        rows.into_iter()
            .filter(|r| !r.expired(now) && (include_removed || r.status != "removed"))
            .map(MethodRow::into_method)
            .collect()
    }

    pub async fn set_default(&self, user: &UserId, token: &str) -> Result<PaymentMethod> {
        check_token(token)?;
        let row = self.row(user, token).await?.ok_or_else(not_found)?;
        if row.status != "active" {
            return Err(Error::FailedPrecondition {
                reason: Reason::PaymentMethodNotActive,
                message: "only a linked, active payment method can be the default".into(),
            });
        }
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE payment_methods SET is_default = FALSE WHERE user_id = $1 AND is_default")
                .bind(user.as_str())
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE payment_methods SET is_default = TRUE WHERE token = $1 AND user_id = $2")
                .bind(token)
                .bind(user.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        })?;
        self.audit(user.as_str(), "card.set_default", token, "ok", "").await?;
        self.row(user, token).await?.ok_or_else(not_found)?.into_method()
    }

    /// Removes a method (kept for history, never charged again). Removing the default
    /// promotes the most recently linked active method.
    pub async fn remove(&self, user: &UserId, token: &str) -> Result<PaymentMethod> {
        check_token(token)?;
        let row = self.row(user, token).await?.ok_or_else(not_found)?;
        if row.status == "removed" {
            return row.into_method();
        }
        let now = self.now_us();
        with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "UPDATE payment_methods SET status = 'removed', is_default = FALSE, removed_at_us = $3, expires_at_us = NULL \
                 WHERE token = $1 AND user_id = $2",
            )
            .bind(token)
            .bind(user.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if row.is_default {
                let next: Option<String> = sqlx::query_scalar(
                    "SELECT token FROM payment_methods WHERE user_id = $1 AND status = 'active' \
                     ORDER BY linked_at_us DESC, token DESC LIMIT 1",
                )
                .bind(user.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(next) = next {
                    sqlx::query("UPDATE payment_methods SET is_default = TRUE WHERE token = $1")
                        .bind(next)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            audit_card!(&mut *tx, user.as_str(), "card.remove", token, "ok", "", now).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        })?;
        self.row(user, token).await?.ok_or_else(not_found)?.into_method()
    }
}
