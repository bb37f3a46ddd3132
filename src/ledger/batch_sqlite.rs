//! The posting engine's transaction on SQLite. `BEGIN IMMEDIATE` takes the database's
//! single write lock up front, so everything read in the transaction stays true until
//! commit and no two writers interleave. Rows are written with multi-row statements of
//! up to `ROWS_PER_STATEMENT` rows, so a batch costs a handful of statements.

use std::collections::{HashMap, HashSet};

use sqlx::SqlitePool;

use super::engine::{AccountState, BatchResult, Decision, Draft, KeyRecord, Plan};
use super::model::Balance;

/// Pairs looked up per statement; keeps the bind count well under SQLite's limit.
const LOOKUP_CHUNK: usize = 200;
/// Rows per multi-row statement: at 11 columns, 1,100 bound values, far below SQLite's
/// limit of 32,766.
const ROWS_PER_STATEMENT: usize = 100;

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
    for chunk in plan.account_ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT id, credit_normal, allow_negative, posted_debits, posted_credits, pending_debits, pending_credits \
             FROM ledger_accounts WHERE id IN ({})",
            placeholders(chunk.len(), 1, 1)
        );
        let mut q = sqlx::query_as::<_, (i64, bool, bool, i64, i64, i64, i64)>(&sql);
        for id in chunk {
            q = q.bind(id);
        }
        for (id, credit_normal, allow_negative, pd, pc, qd, qc) in q.fetch_all(&mut *tx).await? {
            accounts.insert(
                id,
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
    for chunk in plan.keyed.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO idempotency_keys (caller, key, operation, request_hash, result_id, created_at_us) VALUES {} \
             ON CONFLICT (caller, key) DO NOTHING RETURNING caller, key",
            placeholders(chunk.len(), 6, 1)
        );
        let mut q = sqlx::query_as::<_, (String, String)>(&sql);
        for &i in chunk {
            let cmd = plan.cmds[i];
            let (key, operation, hash) =
                cmd.idem.as_ref().map(|k| (k.key.as_str(), k.operation, k.request_hash.as_str())).unwrap_or_default();
            q = q.bind(&cmd.caller).bind(key).bind(operation).bind(hash).bind(&plan.entry_ids[i]).bind(plan.now_us);
        }
        let inserted: HashSet<(String, String)> = q.fetch_all(&mut *tx).await?.into_iter().collect();
        for &i in chunk {
            let cmd = plan.cmds[i];
            if let Some(idem) = &cmd.idem {
                if !inserted.contains(&(cmd.caller.clone(), idem.key.clone())) {
                    keys_taken.insert(i);
                }
            }
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
        let drafts: Vec<&Draft> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Accept(draft) => Some(draft),
                _ => None,
            })
            .collect();
        write_entries(&mut tx, &drafts, plan.now_us).await?;
        let changed: Vec<(i64, Balance)> =
            accounts.iter().filter(|(_, s)| s.delta != Balance::default()).map(|(id, s)| (*id, s.delta)).collect();
        for chunk in changed.chunks(ROWS_PER_STATEMENT) {
            // One net update per account, whatever number of entries touched it.
            let sql = format!(
                "UPDATE ledger_accounts SET posted_debits = posted_debits + d.column2, \
                 posted_credits = posted_credits + d.column3, pending_debits = pending_debits + d.column4, \
                 pending_credits = pending_credits + d.column5, version = version + 1 \
                 FROM (VALUES {}) AS d WHERE ledger_accounts.id = d.column1",
                placeholders(chunk.len(), 5, 1)
            );
            let mut q = sqlx::query(&sql);
            for (id, delta) in chunk {
                q = q
                    .bind(id)
                    .bind(delta.posted_debits)
                    .bind(delta.posted_credits)
                    .bind(delta.pending_debits)
                    .bind(delta.pending_credits);
            }
            q.execute(&mut *tx).await?;
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

/// `($1, $2, ..), ($k, ..)`: `rows` groups of `cols` numbered placeholders from `first`.
fn placeholders(rows: usize, cols: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        if cols > 1 {
            out.push('(');
        }
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", first + r * cols + c));
        }
        if cols > 1 {
            out.push(')');
        }
    }
    out
}

/// All postings of the batch first, then the entry rows, whose trigger checks that each
/// entry's postings balance. Multi-row statements keep the statement count per batch
/// small.
async fn write_entries(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    drafts: &[&Draft],
    now_us: i64,
) -> Result<(), sqlx::Error> {
    let postings: Vec<(&Draft, &super::decide::PostingRow)> =
        drafts.iter().flat_map(|d| d.postings.iter().map(move |p| (*d, p))).collect();
    for chunk in postings.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, \
             created_at_us) VALUES {}",
            placeholders(chunk.len(), 9, 1)
        );
        let mut q = sqlx::query(&sql);
        for (d, p) in chunk {
            q = q
                .bind(&d.id)
                .bind(p.idx)
                .bind(p.posting.account_id)
                .bind(p.posting.direction.as_db())
                .bind(p.posting.amount.minor())
                .bind(p.posting.amount.currency().code())
                .bind(p.pending)
                .bind(d.sequence)
                .bind(now_us);
        }
        q.execute(&mut **tx).await?;
    }
    for chunk in drafts.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO ledger_entries (id, sequence, kind, description, metadata, status, pending_entry_id, \
             reverses_entry_id, expires_at_us, created_by, created_at_us) VALUES {}",
            placeholders(chunk.len(), 11, 1)
        );
        let mut q = sqlx::query(&sql);
        for d in chunk {
            q = q
                .bind(&d.id)
                .bind(d.sequence)
                .bind(&d.kind)
                .bind(&d.description)
                .bind(&d.metadata_json)
                .bind(d.status.as_str())
                .bind(&d.pending_entry_id)
                .bind(&d.reverses_entry_id)
                .bind(d.expires_at_us)
                .bind(&d.created_by)
                .bind(now_us);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}
