//! The posting engine's transaction on SQLite. `BEGIN IMMEDIATE` takes the database's
//! single write lock up front, so everything read in the transaction stays true until
//! commit and no two writers interleave. SQLite runs in-process, so one prepared
//! statement per row is cheap; the statements are cached by sqlx per connection.

use std::collections::{HashMap, HashSet};

use sqlx::SqlitePool;

use super::engine::{AccountState, BatchResult, Decision, Draft, KeyRecord, Plan};
use super::model::Balance;

/// Pairs looked up per statement; keeps the bind count well under SQLite's limit.
const LOOKUP_CHUNK: usize = 200;

pub(crate) async fn lookup_keys(pool: &SqlitePool, pairs: &[(String, String)]) -> Result<Vec<KeyRecord>, sqlx::Error> {
    let mut out = Vec::new();
    for chunk in pairs.chunks(LOOKUP_CHUNK) {
        let values =
            (0..chunk.len()).map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT caller, key, operation, request_hash, result_id FROM idempotency_keys \
             WHERE (caller, key) IN (VALUES {values})"
        );
        let mut q = sqlx::query_as::<_, KeyRecord>(&sql);
        for (c, k) in chunk {
            q = q.bind(c).bind(k);
        }
        out.extend(q.fetch_all(pool).await?);
    }
    Ok(out)
}

pub(crate) async fn commit(pool: &SqlitePool, plan: &Plan<'_>) -> BatchResult {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;

    let mut accounts: HashMap<i64, AccountState> = HashMap::with_capacity(plan.account_ids.len());
    for id in &plan.account_ids {
        let row: Option<(bool, bool, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT credit_normal, allow_negative, posted_debits, posted_credits, pending_debits, pending_credits \
             FROM ledger_accounts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((credit_normal, allow_negative, pd, pc, qd, qc)) = row {
            accounts.insert(
                *id,
                AccountState {
                    credit_normal,
                    allow_negative,
                    balance: Balance { posted_debits: pd, posted_credits: pc, pending_debits: qd, pending_credits: qc },
                    delta: Balance::default(),
                },
            );
        }
    }

    let mut resolved = HashSet::new();
    for id in &plan.resolve_targets {
        let hit: Option<String> =
            sqlx::query_scalar("SELECT pending_entry_id FROM ledger_entries WHERE pending_entry_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        resolved.extend(hit);
    }
    let mut reversed = HashSet::new();
    for id in &plan.reverse_targets {
        let hit: Option<String> =
            sqlx::query_scalar("SELECT reverses_entry_id FROM ledger_entries WHERE reverses_entry_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        reversed.extend(hit);
    }

    let mut keys_taken = HashSet::new();
    for &i in &plan.keyed {
        let cmd = plan.cmds[i];
        let Some(idem) = &cmd.idem else { continue };
        let done = sqlx::query(
            "INSERT INTO idempotency_keys (caller, key, operation, request_hash, result_id, created_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (caller, key) DO NOTHING",
        )
        .bind(&cmd.caller)
        .bind(&idem.key)
        .bind(idem.operation)
        .bind(&idem.request_hash)
        .bind(&plan.entry_ids[i])
        .bind(plan.now_us)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            keys_taken.insert(i);
        }
    }

    let mut decisions = plan.decide(&mut accounts, &resolved, &reversed, &keys_taken);

    let accepted = decisions.iter().filter(|d| matches!(d, Decision::Accept(_))).count() as i64;
    if accepted > 0 {
        let last: i64 = sqlx::query_scalar(
            "UPDATE ledger_sequence SET last_value = last_value + $1 WHERE id = 1 RETURNING last_value",
        )
        .bind(accepted)
        .fetch_one(&mut *tx)
        .await?;
        let mut next = last - accepted + 1;
        for d in decisions.iter_mut() {
            if let Decision::Accept(draft) = d {
                draft.sequence = next;
                next += 1;
            }
        }
        for d in &decisions {
            if let Decision::Accept(draft) = d {
                write_entry(&mut tx, draft, plan.now_us).await?;
            }
        }
        for (id, s) in &accounts {
            if s.delta == Balance::default() {
                continue;
            }
            sqlx::query(
                "UPDATE ledger_accounts SET posted_debits = posted_debits + $2, posted_credits = posted_credits + $3, \
                 pending_debits = pending_debits + $4, pending_credits = pending_credits + $5, version = version + 1 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(s.delta.posted_debits)
            .bind(s.delta.posted_credits)
            .bind(s.delta.pending_debits)
            .bind(s.delta.pending_credits)
            .execute(&mut *tx)
            .await?;
        }
    }

    for &i in &plan.keyed {
        if !matches!(decisions[i], Decision::Reject(_)) {
            continue;
        }
        if let Some(idem) = &plan.cmds[i].idem {
            sqlx::query("DELETE FROM idempotency_keys WHERE caller = $1 AND key = $2")
                .bind(&plan.cmds[i].caller)
                .bind(&idem.key)
                .execute(&mut *tx)
                .await?;
        }
    }

    tx.commit().await?;
    Ok(decisions)
}

/// Postings first, then the entry row, whose trigger checks that they balance.
async fn write_entry(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    draft: &Draft,
    now_us: i64,
) -> Result<(), sqlx::Error> {
    for p in &draft.postings {
        sqlx::query(
            "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&draft.id)
        .bind(p.idx)
        .bind(p.posting.account_id)
        .bind(p.posting.direction.as_db())
        .bind(p.posting.amount.minor())
        .bind(p.posting.amount.currency().code())
        .bind(p.pending)
        .bind(draft.sequence)
        .bind(now_us)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO ledger_entries (id, sequence, kind, description, metadata, status, pending_entry_id, \
         reverses_entry_id, expires_at_us, created_by, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&draft.id)
    .bind(draft.sequence)
    .bind(&draft.kind)
    .bind(&draft.description)
    .bind(&draft.metadata_json)
    .bind(draft.status.as_str())
    .bind(&draft.pending_entry_id)
    .bind(&draft.reverses_entry_id)
    .bind(draft.expires_at_us)
    .bind(&draft.created_by)
    .bind(now_us)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
