//! The posting engine's transaction on PostgreSQL: row locks in id order and set-based
//! statements over arrays (`UNNEST`), so a batch costs the same handful of round trips
//! whatever its size. Runs at READ COMMITTED: every row the decision depends on is
//! locked (`FOR UPDATE`) or read after the locks are held, and each statement sees
//! what concurrent batches committed before it.

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;

use super::engine::{AccountState, BatchResult, Decision, Draft, KeyRecord, Plan};
use super::model::Balance;

pub(crate) async fn lookup_keys(pool: &PgPool, pairs: &[(String, String)]) -> Result<Vec<KeyRecord>, sqlx::Error> {
    let (callers, keys): (Vec<&str>, Vec<&str>) = pairs.iter().map(|(c, k)| (c.as_str(), k.as_str())).unzip();
    sqlx::query_as(
        "SELECT caller, key, operation, request_hash, result_id FROM idempotency_keys \
         WHERE (caller, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
    )
    .bind(callers)
    .bind(keys)
    .fetch_all(pool)
    .await
}

pub(crate) async fn commit(pool: &PgPool, plan: &Plan<'_>) -> BatchResult {
    let mut tx = pool.begin().await?;

    // 1. Lock every account of the batch, in ascending id order.
    let rows: Vec<(i64, bool, bool, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, credit_normal, allow_negative, posted_debits, posted_credits, pending_debits, pending_credits \
         FROM ledger_accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&plan.account_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut accounts: HashMap<i64, AccountState> = rows
        .into_iter()
        .map(|(id, credit_normal, allow_negative, pd, pc, qd, qc)| {
            (
                id,
                AccountState {
                    credit_normal,
                    allow_negative,
                    balance: Balance { posted_debits: pd, posted_credits: pc, pending_debits: qd, pending_credits: qc },
                    delta: Balance::default(),
                },
            )
        })
        .collect();

    // 2. Targets already resolved or reversed (read under the account locks, which
    //    every resolver and reverser of those entries also takes).
    let resolved: HashSet<String> = if plan.resolve_targets.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>("SELECT pending_entry_id FROM ledger_entries WHERE pending_entry_id = ANY($1)")
            .bind(&plan.resolve_targets)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    let reversed: HashSet<String> = if plan.reverse_targets.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>(
            "SELECT reverses_entry_id FROM ledger_entries WHERE reverses_entry_id = ANY($1)",
        )
        .bind(&plan.reverse_targets)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };

    // 3. Idempotency keys, sorted. A key another transaction holds makes this one wait
    //    for it; if that one commits, the key is reported as taken.
    let mut keys_taken = HashSet::new();
    if !plan.keyed.is_empty() {
        let mut callers = Vec::with_capacity(plan.keyed.len());
        let mut keys = Vec::with_capacity(plan.keyed.len());
        let mut ops = Vec::with_capacity(plan.keyed.len());
        let mut hashes = Vec::with_capacity(plan.keyed.len());
        let mut results = Vec::with_capacity(plan.keyed.len());
        for &i in &plan.keyed {
            let cmd = plan.cmds[i];
            if let Some(idem) = &cmd.idem {
                callers.push(cmd.caller.as_str());
                keys.push(idem.key.as_str());
                ops.push(idem.operation);
                hashes.push(idem.request_hash.as_str());
                results.push(plan.entry_ids[i].as_str());
            }
        }
        let inserted: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO idempotency_keys (caller, key, operation, request_hash, result_id, created_at_us) \
             SELECT c, k, o, h, r, $6 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS t(c, k, o, h, r) \
             ON CONFLICT (caller, key) DO NOTHING RETURNING caller, key",
        )
        .bind(&callers)
        .bind(&keys)
        .bind(&ops)
        .bind(&hashes)
        .bind(&results)
        .bind(plan.now_us)
        .fetch_all(&mut *tx)
        .await?;
        let inserted: HashSet<(String, String)> = inserted.into_iter().collect();
        for &i in &plan.keyed {
            let cmd = plan.cmds[i];
            if let Some(idem) = &cmd.idem {
                if !inserted.contains(&(cmd.caller.clone(), idem.key.clone())) {
                    keys_taken.insert(i);
                }
            }
        }
    }

    // 4. Decide, in memory.
    let mut decisions = plan.decide(&mut accounts, &resolved, &reversed, &keys_taken);

    // 5. Sequence numbers for the accepted entries, one contiguous block.
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
        write_postings(&mut tx, &drafts, plan.now_us).await?;
        write_entries(&mut tx, &drafts, plan.now_us).await?;
        write_balances(&mut tx, &accounts).await?;
    }

    // 6. Rejected commands leave no key behind: a retry may succeed later.
    let (rej_callers, rej_keys): (Vec<&str>, Vec<&str>) = plan
        .keyed
        .iter()
        .filter(|i| matches!(decisions[**i], Decision::Reject(_)))
        .filter_map(|i| plan.cmds[*i].idem.as_ref().map(|k| (plan.cmds[*i].caller.as_str(), k.key.as_str())))
        .unzip();
    if !rej_keys.is_empty() {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE (caller, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(&rej_callers)
        .bind(&rej_keys)
        .execute(&mut *tx)
        .await?;
    }

    tx.commit().await?;
    Ok(decisions)
}

async fn write_postings(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    drafts: &[&Draft],
    now_us: i64,
) -> Result<(), sqlx::Error> {
    let n: usize = drafts.iter().map(|d| d.postings.len()).sum();
    if n == 0 {
        return Ok(());
    }
    let mut entry_ids = Vec::with_capacity(n);
    let mut idxs = Vec::with_capacity(n);
    let mut account_ids = Vec::with_capacity(n);
    let mut directions = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut pendings = Vec::with_capacity(n);
    let mut sequences = Vec::with_capacity(n);
    for d in drafts {
        for p in &d.postings {
            entry_ids.push(d.id.as_str());
            idxs.push(p.idx);
            account_ids.push(p.posting.account_id);
            directions.push(p.posting.direction.as_db());
            amounts.push(p.posting.amount.minor());
            currencies.push(p.posting.amount.currency().code());
            pendings.push(p.pending);
            sequences.push(d.sequence);
        }
    }
    sqlx::query(
        "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
         SELECT e, i, a, d, m, c, p, s, $9 FROM UNNEST($1::text[], $2::int2[], $3::int8[], $4::text[], $5::int8[], $6::text[], $7::bool[], $8::int8[]) \
         AS t(e, i, a, d, m, c, p, s)",
    )
    .bind(&entry_ids)
    .bind(&idxs)
    .bind(&account_ids)
    .bind(&directions)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&pendings)
    .bind(&sequences)
    .bind(now_us)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_entries(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    drafts: &[&Draft],
    now_us: i64,
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = drafts.iter().map(|d| d.id.as_str()).collect();
    let sequences: Vec<i64> = drafts.iter().map(|d| d.sequence).collect();
    let kinds: Vec<&str> = drafts.iter().map(|d| d.kind.as_str()).collect();
    let descriptions: Vec<&str> = drafts.iter().map(|d| d.description.as_str()).collect();
    let metadata: Vec<&str> = drafts.iter().map(|d| d.metadata_json.as_str()).collect();
    let statuses: Vec<&str> = drafts.iter().map(|d| d.status.as_str()).collect();
    let pending_ids: Vec<Option<&str>> = drafts.iter().map(|d| d.pending_entry_id.as_deref()).collect();
    let reverses: Vec<Option<&str>> = drafts.iter().map(|d| d.reverses_entry_id.as_deref()).collect();
    let expires: Vec<Option<i64>> = drafts.iter().map(|d| d.expires_at_us).collect();
    let created_by: Vec<&str> = drafts.iter().map(|d| d.created_by.as_str()).collect();
    sqlx::query(
        "INSERT INTO ledger_entries (id, sequence, kind, description, metadata, status, pending_entry_id, \
         reverses_entry_id, expires_at_us, created_by, created_at_us) \
         SELECT i, s, k, d, m, st, p, r, x, c, $11 FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], \
         $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[]) AS t(i, s, k, d, m, st, p, r, x, c)",
    )
    .bind(&ids)
    .bind(&sequences)
    .bind(&kinds)
    .bind(&descriptions)
    .bind(&metadata)
    .bind(&statuses)
    .bind(&pending_ids)
    .bind(&reverses)
    .bind(&expires)
    .bind(&created_by)
    .bind(now_us)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One net update per account, whatever number of entries touched it.
async fn write_balances(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    accounts: &HashMap<i64, AccountState>,
) -> Result<(), sqlx::Error> {
    let changed: Vec<(i64, Balance)> =
        accounts.iter().filter(|(_, s)| s.delta != Balance::default()).map(|(id, s)| (*id, s.delta)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = changed.iter().map(|c| c.0).collect();
    let pd: Vec<i64> = changed.iter().map(|c| c.1.posted_debits).collect();
    let pc: Vec<i64> = changed.iter().map(|c| c.1.posted_credits).collect();
    let qd: Vec<i64> = changed.iter().map(|c| c.1.pending_debits).collect();
    let qc: Vec<i64> = changed.iter().map(|c| c.1.pending_credits).collect();
    sqlx::query(
        "UPDATE ledger_accounts a SET posted_debits = a.posted_debits + d.pd, posted_credits = a.posted_credits + d.pc, \
         pending_debits = a.pending_debits + d.qd, pending_credits = a.pending_credits + d.qc, version = a.version + 1 \
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) AS d(id, pd, pc, qd, qc) WHERE a.id = d.id",
    )
    .bind(&ids)
    .bind(&pd)
    .bind(&pc)
    .bind(&qd)
    .bind(&qc)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
