//! The ledger's tables, written here and nowhere else: the batch transaction on each
//! backend (`pg`, `sqlite`: entries, postings, balances, the journal's sequence and
//! idempotency keys), and the few writes outside a batch, below (new accounts, the key
//! tombstone, the key purge). Reads live with the ledger's read side (`ledger::read`).

pub(super) mod pg;
pub(super) mod sqlite;

use super::decide::Decision;
use crate::ledger::model::{AccountCode, AccountType};
use crate::store::Db;
use crate::with_db;

/// The outcome of one batch transaction: a decision per command of the plan.
/// The batch's decisions, and the time its entries were written with (`Committed`).
pub(crate) type BatchResult = std::result::Result<Committed, sqlx::Error>;

/// A committed batch: its decisions, and its entries' `created_at_us`. That time is
/// assigned under the journal's sequence row, as the later of the batch's clock reading
/// and the last batch's time, so entries' times never go backwards in sequence order
/// (two concurrent batches read the clock before either takes the row) and a time range
/// of the journal is a sequence range (`read::sequence_before`).
pub(crate) struct Committed {
    pub decisions: Vec<Decision>,
    pub created_at_us: i64,
}

/// A committed idempotency record.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct KeyRecord {
    pub caller: String,
    pub key: String,
    pub operation: String,
    pub request_hash: String,
    pub result_id: String,
}

/// A ledger account to create.
pub(crate) struct NewAccount<'a> {
    pub code: &'a AccountCode,
    pub account_type: AccountType,
    pub currency: &'a str,
    pub allow_negative: bool,
    pub created_at_us: i64,
}

/// Inserts an account. With `if_missing`, an existing code is left as it is; without,
/// it is a unique violation for the caller to interpret.
pub(crate) async fn insert_account(db: &Db, a: &NewAccount<'_>, if_missing: bool) -> Result<(), sqlx::Error> {
    let sql = if if_missing {
        "INSERT INTO ledger_accounts (code, type, currency, allow_negative, credit_normal, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (code) DO NOTHING"
    } else {
        "INSERT INTO ledger_accounts (code, type, currency, allow_negative, credit_normal, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6)"
    };
    with_db!(db, pool => sqlx::query(sql)
        .bind(a.code.as_str())
        .bind(a.account_type.as_str())
        .bind(a.currency)
        .bind(a.allow_negative)
        .bind(a.account_type.credit_normal())
        .bind(a.created_at_us)
        .execute(pool)
        .await
        .map(|_| ()))
}

/// Deletes idempotency keys created before `cutoff_us`; returns how many.
pub(crate) async fn delete_keys_before(db: &Db, cutoff_us: i64) -> Result<u64, sqlx::Error> {
    with_db!(db, pool => sqlx::query("DELETE FROM idempotency_keys WHERE created_at_us < $1")
        .bind(cutoff_us)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))
}

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
