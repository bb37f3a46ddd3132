//! The payment-method vault: tokenizes cards, keeps card numbers unreadable at rest,
//! links them to accounts after a verification at the processor, and hands a card to
//! the processor when money must be pulled. Every access to card data is audited.
//!
//! - `card`  secret types (PAN, CVC) and card validation
//! - `keys`  envelope encryption, key rotation, fingerprints
//! - `model` settings, payment methods, stored rows
//! - `methods` listing, the default card, removal
//! - `maintenance` purge of expired unlinked cards, key rotation

/// Writes the audit record of a vault action on card `$token` (see
/// `accounts::audit::insert_audit!`, the audit trail's one writer).
macro_rules! audit_card {
    ($executor:expr, $actor:expr, $action:expr, $token:expr, $result:expr, $detail:expr, $at_us:expr) => {
        $crate::accounts::audit::insert_audit!(
            $executor,
            $actor,
            $action,
            format!("pm:{}", $token),
            $detail,
            $result,
            $at_us
        )
    };
}

pub mod card;
pub mod keys;
mod maintenance;
mod methods;
mod model;

pub use model::{ChargeableCard, MethodStatus, PaymentMethod, TokenizeInput, VaultConfig};
use model::{MethodRow, METHOD_COLUMNS};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::RngCore;

use self::card::{Cvc, Pan};
use self::keys::{KeyRing, Sealed};
use crate::accounts::Accounts;
use crate::kernel::dates;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::reason::Reason;
use crate::kernel::text::parse_text;
use crate::processor::{CardDetails, CardProcessor, ProcessorError};
use crate::store::Db;
use crate::with_db;

/// Active (linked) methods per account.
pub const ACTIVE_METHODS_MAX: i64 = 10;
pub const HOLDER_NAME_LEN_MAX: usize = 100;
pub const POSTAL_CODE_LEN_MAX: usize = 16;
/// A validated card about to be stored, sealed before the transaction that stores it.
struct NewCard {
    token: String,
    sealed: Sealed,
    fingerprint: String,
    holder: String,
    postal: String,
    card: card::ValidCard,
}

/// How a tokenization's transaction ended.
enum Tokenized {
    /// Over the hourly limit: nothing written.
    RateLimited,
    /// The card was invalid: only the attempt's audit record was written.
    Invalid,
    /// This account already holds the card: its method.
    Existing(MethodRow),
    New(MethodRow),
}

/// CVCs held in memory between tokenization and link, at most. Past this the oldest are
/// dropped (their link asks for a new tokenization).
const CVC_CACHE_MAX: usize = 100_000;

pub struct Vault {
    /// Reads.
    db: Db,
    /// Writes (card rows and audit records): on SQLite the posting engine's pool, where
    /// they take turns with its batches (`Vault::with_writer`).
    writer: Db,
    keys: Arc<KeyRing>,
    processor: Arc<dyn CardProcessor>,
    accounts: Accounts,
    config: VaultConfig,
    /// CVCs between tokenization and link, in memory only (never stored), with the
    /// time they stop being usable. A std mutex: held for a map operation, never
    /// across an await.
    cvcs: Mutex<HashMap<String, (Cvc, Instant)>>,
}

fn not_found() -> Error {
    Error::NotFound("payment method not found (unknown, expired or another account's)".into())
}

fn method_limit() -> Error {
    Error::ResourceExhausted {
        reason: Reason::PaymentMethodLimit,
        message: format!("at most {ACTIVE_METHODS_MAX} active payment methods; remove one first"),
    }
}

fn new_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("pm_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn check_token(token: &str) -> Result<()> {
    if token.is_empty() {
        return Err(Error::invalid("token", "required"));
    }
    if token.len() != 35 || !token.starts_with("pm_") || !token[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
        // A malformed token cannot exist; NOT_FOUND keeps it indistinguishable from
        // another account's token.
        return Err(not_found());
    }
    Ok(())
}

fn today(now_us: i64) -> (u32, u32) {
    let (y, m, _) = dates::ymd(now_us);
    (y as u32, m)
}

impl Vault {
    pub fn new(
        db: Db,
        keys: Arc<KeyRing>,
        processor: Arc<dyn CardProcessor>,
        accounts: Accounts,
        config: VaultConfig,
    ) -> Self {
        Vault { writer: db.clone(), db, keys, processor, accounts, config, cvcs: Mutex::new(HashMap::new()) }
    }

    /// Writes on `writer` instead (`EngineHandle::writer`): on SQLite the engine's one
    /// connection, so that a card payment's audit record during a burst takes its turn
    /// between batches instead of polling for the write lock. No vault write holds its
    /// connection while it waits for the engine or the processor.
    pub fn with_writer(mut self, writer: Db) -> Self {
        self.writer = writer;
        self
    }

    pub fn processor(&self) -> &Arc<dyn CardProcessor> {
        &self.processor
    }

    /// Now, by the clock the vault's rows are stamped with (its accounts' clock).
    fn now_us(&self) -> i64 {
        self.accounts.clock().now_us()
    }

    async fn audit(&self, actor: &str, action: &str, token: &str, result: &str, detail: &str) -> Result<()> {
        with_db!(&self.writer, pool => audit_card!(pool, actor, action, token, result, detail, self.now_us())
            .await
            .map(|_| ()))?;
        Ok(())
    }

    fn remember_cvc(&self, token: &str, cvc: Cvc) {
        if let Ok(mut cache) = self.cvcs.lock() {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CVC_CACHE_MAX {
                if let Some(oldest) = cache.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone()) {
                    cache.remove(&oldest);
                }
            }
            cache.insert(token.to_owned(), (cvc, now + self.config.unlinked_ttl));
        }
    }

    fn take_cvc(&self, token: &str) -> Option<Cvc> {
        let mut cache = self.cvcs.lock().ok()?;
        let (cvc, until) = cache.remove(token)?;
        (until > Instant::now()).then_some(cvc)
    }

    async fn row(&self, user: &UserId, token: &str) -> Result<Option<MethodRow>> {
        let sql = format!("SELECT {METHOD_COLUMNS} FROM payment_methods WHERE token = $1 AND user_id = $2");
        let row: Option<MethodRow> = with_db!(&self.db, pool => sqlx::query_as(&sql).bind(token).bind(user.as_str()).fetch_optional(pool).await)?;
        Ok(row.filter(|r| !r.expired(self.now_us())))
    }

    /// The account's method for this card that is not removed (at most one: a unique
    /// index).
    async fn live_by_fingerprint(&self, user: &UserId, fingerprint: &str) -> Result<Option<MethodRow>> {
        let sql = format!(
            "SELECT {METHOD_COLUMNS} FROM payment_methods WHERE user_id = $1 AND fingerprint = $2 AND status <> 'removed'"
        );
        let row = with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(user.as_str())
            .bind(fingerprint)
            .fetch_optional(pool)
            .await)?;
        Ok(row)
    }

    /// `TokenizeCard`: validates, encrypts and stores the card unlinked. The same card
    /// tokenized again by the same account returns its existing method.
    ///
    /// Every attempt, failed ones included (card testing is many failures), counts
    /// against `DMPAY_VAULT_TOKENIZE_PER_HOUR_MAX`, as one `card.tokenize` audit record.
    /// The count and the record are one atomic step: one transaction that holds the
    /// account's row lock (PostgreSQL) or the write lock (SQLite) counts the records of
    /// the last hour and writes this attempt's, so parallel calls cannot all pass the
    /// same count. An attempt over the limit writes nothing.
    pub async fn tokenize(&self, user: &UserId, input: TokenizeInput<'_>) -> Result<PaymentMethod> {
        let validated =
            card::validate(input.card_number, input.exp_month, input.exp_year, input.cvc, today(self.now_us()))
                .and_then(|c| {
                    let holder = parse_text("holder_name", input.holder_name, HOLDER_NAME_LEN_MAX, false)?;
                    let postal = input.postal_code.trim();
                    if postal.len() > POSTAL_CODE_LEN_MAX
                        || !postal.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'-')
                    {
                        return Err(Error::invalid(
                            "postal_code",
                            format!("up to {POSTAL_CODE_LEN_MAX} letters, digits, spaces and dashes"),
                        ));
                    }
                    Ok((c, holder, postal.to_owned()))
                });
        self.accounts.ensure(user).await?;
        let now = self.now_us();
        // What the transaction writes: for an invalid card only the attempt's record,
        // naming the field, never the value; for a valid one the sealed card, unless this
        // account already holds it. The sealing happens before the transaction.
        let (card, invalid) = match validated {
            Ok((card, holder, postal)) => {
                let fingerprint = self.keys.fingerprint(&card.pan);
                // An expired unlinked copy of the card would block the insert: clear it.
                if let Some(row) = self.live_by_fingerprint(user, &fingerprint).await? {
                    if row.expired(now) {
                        self.purge(Some(&row.token)).await?;
                    }
                }
                let token = new_token();
                let sealed = self.keys.seal_pan(&card.pan, &token, user.as_str());
                (Some(NewCard { token, sealed, fingerprint, holder, postal, card }), None)
            }
            Err(e) => (None, Some(e)),
        };
        let invalid_field = match &invalid {
            Some(Error::InvalidArgument(v)) => v.first().map(|f| f.field.clone()).unwrap_or_default(),
            _ => String::new(),
        };
        let expires = now + i64::try_from(self.config.unlinked_ttl.as_micros()).unwrap_or(i64::MAX);
        let max = self.config.tokenize_per_hour_max;
        let insert_sql = format!(
            "INSERT INTO payment_methods (token, user_id, brand, last4, exp_month, exp_year, holder_name, postal_code, \
             fingerprint, status, is_default, kek_id, wrapped_dek, pan_ciphertext, created_at_us, expires_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'unlinked', FALSE, $10, $11, $12, $13, $14) \
             RETURNING {METHOD_COLUMNS}"
        );
        let live_sql = format!(
            "SELECT {METHOD_COLUMNS} FROM payment_methods WHERE user_id = $1 AND fingerprint = $2 AND status <> 'removed'"
        );
        let (begin, lock) = (self.writer.begin_deciding_sql(), self.writer.lock_user_sql());
        let outcome: std::result::Result<Tokenized, sqlx::Error> = with_db!(&self.writer, pool => async {
            let mut tx = pool.begin_with(begin).await?;
            sqlx::query(lock).bind(user.as_str()).execute(&mut *tx).await?;
            let attempts: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM audit_log WHERE actor = $1 AND action = 'card.tokenize' AND at_us > $2",
            )
            .bind(user.as_str())
            .bind(now - 3_600_000_000)
            .fetch_one(&mut *tx)
            .await?;
            if attempts >= max {
                return Ok(Tokenized::RateLimited);
            }
            let Some(new) = &card else {
                audit_card!(&mut *tx, user.as_str(), "card.tokenize", "-", "invalid", &invalid_field, now).await?;
                tx.commit().await?;
                return Ok(Tokenized::Invalid);
            };
            // The same card on this account: reuse it (dedup by fingerprint).
            let existing: Option<MethodRow> =
                sqlx::query_as(&live_sql).bind(user.as_str()).bind(&new.fingerprint).fetch_optional(&mut *tx).await?;
            let existing = match existing {
                Some(row) if row.expired(now) => {
                    // Expired since the purge above: it goes now, as the purge would.
                    sqlx::query("DELETE FROM payment_methods WHERE token = $1 AND status = 'unlinked'")
                        .bind(&row.token)
                        .execute(&mut *tx)
                        .await?;
                    None
                }
                other => other,
            };
            if let Some(row) = existing {
                audit_card!(&mut *tx, user.as_str(), "card.tokenize", &row.token, "duplicate", "same card already vaulted", now)
                    .await?;
                tx.commit().await?;
                return Ok(Tokenized::Existing(row));
            }
            let row: MethodRow = sqlx::query_as(&insert_sql)
                .bind(&new.token)
                .bind(user.as_str())
                .bind(new.card.brand.as_str())
                .bind(new.card.pan.last4())
                .bind(new.card.exp_month as i32)
                .bind(new.card.exp_year as i32)
                .bind(&new.holder)
                .bind(&new.postal)
                .bind(&new.fingerprint)
                .bind(&new.sealed.kek_id)
                .bind(&new.sealed.wrapped_dek)
                .bind(&new.sealed.ciphertext)
                .bind(now)
                .bind(expires)
                .fetch_one(&mut *tx)
                .await?;
            let detail = format!("{} ****{}", new.card.brand.as_str(), new.card.pan.last4());
            audit_card!(&mut *tx, user.as_str(), "card.tokenize", &new.token, "ok", &detail, now).await?;
            tx.commit().await?;
            Ok(Tokenized::New(row))
        }
        .await);
        let row = match outcome {
            Ok(Tokenized::RateLimited) => {
                return Err(Error::ResourceExhausted {
                    reason: Reason::TokenizeRateLimit,
                    message: format!("at most {max} card tokenizations per hour per account; try again later"),
                })
            }
            Ok(Tokenized::Invalid) => {
                return Err(invalid.unwrap_or_else(|| Error::internal(anyhow::anyhow!("invalid card without an error"))))
            }
            Ok(Tokenized::Existing(row) | Tokenized::New(row)) => row,
            Err(e) => return Err(e.into()),
        };
        if let (Some(new), "unlinked") = (card, row.status.as_str()) {
            self.remember_cvc(&row.token, new.card.cvc);
        }
        row.into_method()
    }

    /// Decrypts a method's PAN for one processor call, and audits the access.
    async fn open(&self, actor: &str, token: &str, user: &str, purpose: &str) -> Result<Pan> {
        let sealed: Option<(String, Vec<u8>, Vec<u8>)> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT kek_id, wrapped_dek, pan_ciphertext FROM payment_methods WHERE token = $1 AND user_id = $2",
        )
        .bind(token)
        .bind(user)
        .fetch_optional(pool)
        .await)?;
        let (kek_id, wrapped_dek, ciphertext) = sealed.ok_or_else(not_found)?;
        let result = self.keys.open_pan(&Sealed { kek_id, wrapped_dek, ciphertext }, token, user);
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.audit(actor, "card.decrypt", token, outcome, purpose).await?;
        result.map_err(|e| Error::internal(anyhow::anyhow!("vault decrypt of {token}: {e}")))
    }

    /// `LinkPaymentMethod`: verifies the card at the processor with the CVC given at
    /// tokenization, then links it. The first linked method becomes the default.
    pub async fn link(&self, user: &UserId, token: &str, make_default: bool) -> Result<PaymentMethod> {
        check_token(token)?;
        let row = self.row(user, token).await?.ok_or_else(not_found)?;
        match row.status.as_str() {
            "removed" => {
                return Err(Error::FailedPrecondition {
                    reason: Reason::PaymentMethodRemoved,
                    message: "this payment method was removed; tokenize the card again".into(),
                })
            }
            "active" => {
                // Linking twice is a retry.
                return if make_default { self.set_default(user, token).await } else { row.into_method() };
            }
            _ => {}
        }
        let active: i64 = with_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM payment_methods WHERE user_id = $1 AND status = 'active'",
        )
        .bind(user.as_str())
        .fetch_one(pool)
        .await)?;
        if active >= ACTIVE_METHODS_MAX {
            return Err(method_limit());
        }
        let cvc = self.take_cvc(token).ok_or_else(|| Error::FailedPrecondition {
            reason: Reason::CvcUnavailable,
            message: "the security code is no longer available; tokenize the card again".into(),
        })?;
        let pan = self.open(user.as_str(), token, user.as_str(), "verify").await?;
        let details =
            CardDetails { pan: &pan, exp_month: row.exp_month as u32, exp_year: row.exp_year as u32, cvc: Some(&cvc) };
        let key = format!("verify:{token}");
        let verified = match self.processor.verify(&key, details).await {
            Err(ProcessorError::Unknown) => match self.processor.lookup(&key).await {
                Ok(Some(record)) => record.outcome.map(|()| record.reference),
                _ => Err(ProcessorError::Unknown),
            },
            other => other,
        };
        match verified {
            Ok(_) => {}
            Err(ProcessorError::Declined(code)) => {
                self.audit(user.as_str(), "card.link", token, "declined", code.reason().as_str()).await?;
                return Err(Error::FailedPrecondition { reason: code.reason(), message: code.message().into() });
            }
            Err(e) => {
                // Nothing was decided: keep the CVC so the user can simply retry.
                self.remember_cvc(token, cvc);
                self.audit(user.as_str(), "card.link", token, "error", &e.to_string()).await?;
                return Err(Error::Unavailable("the card processor did not answer; retry".into()));
            }
        }
        drop(cvc);
        let now = self.now_us();
        // The cap is counted and the card linked in one transaction that holds the
        // account's row lock (PostgreSQL) or the write lock (SQLite): parallel links of
        // one account take turns, so they cannot all pass the same count.
        let (begin, lock) = (self.writer.begin_deciding_sql(), self.writer.lock_user_sql());
        let linked: bool = with_db!(&self.writer, pool => async {
            let mut tx = pool.begin_with(begin).await?;
            sqlx::query(lock).bind(user.as_str()).execute(&mut *tx).await?;
            let active: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM payment_methods WHERE user_id = $1 AND status = 'active'",
            )
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if active >= ACTIVE_METHODS_MAX {
                return Ok(false);
            }
            let has_default: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM payment_methods WHERE user_id = $1 AND is_default",
            )
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
            let default = make_default || has_default == 0;
            if default {
                sqlx::query("UPDATE payment_methods SET is_default = FALSE WHERE user_id = $1 AND is_default")
                    .bind(user.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "UPDATE payment_methods SET status = 'active', is_default = $3, linked_at_us = $4, expires_at_us = NULL \
                 WHERE token = $1 AND user_id = $2 AND status = 'unlinked'",
            )
            .bind(token)
            .bind(user.as_str())
            .bind(default)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            audit_card!(&mut *tx, user.as_str(), "card.link", token, "ok", "", now).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        }
        .await)?;
        if !linked {
            return Err(method_limit());
        }
        self.row(user, token).await?.ok_or_else(not_found)?.into_method()
    }

    /// The card to charge: the given token, else the default. Only active methods.
    pub async fn chargeable(&self, user: &UserId, token: Option<&str>, purpose: &str) -> Result<ChargeableCard> {
        let row = match token {
            Some(t) => {
                check_token(t)?;
                self.row(user, t).await?.ok_or_else(not_found)?
            }
            None => {
                let sql = format!("SELECT {METHOD_COLUMNS} FROM payment_methods WHERE user_id = $1 AND is_default");
                let row: Option<MethodRow> =
                    with_db!(&self.db, pool => sqlx::query_as(&sql).bind(user.as_str()).fetch_optional(pool).await)?;
                row.ok_or_else(|| Error::FailedPrecondition {
                    reason: Reason::NoPaymentMethod,
                    message: "no default payment method; link a card first".into(),
                })?
            }
        };
        if row.status != "active" {
            return Err(Error::FailedPrecondition {
                reason: Reason::PaymentMethodNotActive,
                message: "this payment method is not linked or was removed".into(),
            });
        }
        let pan = self.open(user.as_str(), &row.token, user.as_str(), purpose).await?;
        Ok(ChargeableCard { token: row.token, pan, exp_month: row.exp_month as u32, exp_year: row.exp_year as u32 })
    }

    /// A risk signal: how many distinct accounts hold the card behind this token.
    pub async fn accounts_sharing_card(&self, token: &str) -> Result<i64> {
        let n = with_db!(&self.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(DISTINCT user_id) FROM payment_methods WHERE fingerprint = \
             (SELECT fingerprint FROM payment_methods WHERE token = $1)",
        )
        .bind(token)
        .fetch_one(pool)
        .await)?;
        Ok(n)
    }
}
