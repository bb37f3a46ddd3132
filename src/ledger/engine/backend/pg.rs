//! The posting engine's transaction on PostgreSQL: row locks in id order and set-based
//! statements over arrays (`UNNEST`), so a batch costs the same handful of round trips
//! whatever its size. Runs at READ COMMITTED: every row the decision depends on is
//! locked (`FOR UPDATE`) or read after the locks are held, and each statement sees
//! what concurrent batches committed before it.
//!
//! Lock order, the same in every process: idempotency keys (sorted), then balance rows
//! (ascending id), then the rows of the batch hook's first write (the senders' limit
//! buckets, sorted), then the sequence row, then the hook's counter (the outbox's,
//! taken by its second write, after the journal's statement). The
//! keys come first so that their inserts run before the batch holds any balance row:
//! concurrent batches overlap on balance rows far more often than on keys, and the time
//! between the first balance lock and commit is what serializes them. The sequence row
//! comes as late as it can because every batch takes it: the engine schedules
//! concurrent batches onto disjoint accounts where it can (`intake::Intake`), and then
//! only the work done while holding that row runs one batch at a time.

use std::collections::{HashMap, HashSet};

use sqlx::error::BoxDynError;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgPool};

use super::{BatchResult, Committed, KeyRecord};
use crate::ledger::engine::decide::{accepted, number_accepted, AccountState, Decision, Draft, Plan};
use crate::ledger::engine::hook::{BatchHook, Conn};
use crate::ledger::model::Balance;
use crate::store::bind_pg as bind_step;

pub(crate) async fn lookup_keys(pool: &PgPool, pairs: &[(String, String)]) -> Result<Vec<KeyRecord>, sqlx::Error> {
    let (callers, keys): (Vec<&str>, Vec<&str>) = pairs.iter().map(|(c, k)| (c.as_str(), k.as_str())).unzip();
    sqlx::query_as(
        // LATERAL keeps this one primary-key probe per key, never a scan of the table.
        "SELECT i.caller, i.key, i.operation, i.request_hash, i.result_id \
         FROM UNNEST($1::text[], $2::text[]) AS t(c, k) \
         CROSS JOIN LATERAL (SELECT * FROM idempotency_keys WHERE caller = t.c AND key = t.k LIMIT 1) i",
    )
    .bind(callers)
    .bind(keys)
    .fetch_all(pool)
    .await
}

/// Runs the batch transaction on a connection of its own, for at most `timeout`. A
/// connection whose database stops answering without closing it (a network partition)
/// would otherwise hold the engine, and every command queued behind it, until the
/// operating system gives up on the socket, many minutes later. On expiry the
/// connection is dropped, not returned to the pool, and the batch's callers hear
/// UNAVAILABLE: the outcome is unknown, and a retry with the same key settles it.
pub(crate) async fn commit(
    pool: &PgPool,
    hook: Option<&dyn BatchHook>,
    plan: &Plan<'_>,
    timeout: std::time::Duration,
) -> BatchResult {
    let mut conn = pool.acquire().await?;
    match tokio::time::timeout(timeout, transaction(&mut conn, hook, plan)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "ledger batch got no answer from the database in time; dropping its connection"
            );
            drop(conn.detach());
            Err(sqlx::Error::PoolTimedOut)
        }
    }
}

async fn transaction(conn: &mut sqlx::PgConnection, hook: Option<&dyn BatchHook>, plan: &Plan<'_>) -> BatchResult {
    let mut tx = sqlx::Connection::begin(conn).await?;

    // 1. Idempotency keys, sorted. A key another transaction holds makes this one wait
    //    for it; if that one commits, the key is reported as taken. No balance row is
    //    held yet, so the wait blocks nobody else.
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

    // 2. Lock every account of the batch, in ascending id order.
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

    // 3. Targets already resolved or reversed (read under the account locks, which
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

    // 4. The batch hook reads what its rules need, under the same locks; then decide,
    //    in memory.
    let attached = plan.attached();
    let mut hook_batch = match hook {
        Some(h) if !attached.is_empty() => Some(h.prepare(&mut Conn::Postgres(&mut tx), &attached, plan.now_us).await?),
        _ => None,
    };
    let mut decisions = plan.decide(&mut accounts, &resolved, &reversed, &keys_taken, hook_batch.as_deref_mut());

    // 5. The hook's rows that need no shared counter (payment rows, limit buckets),
    //    with its own statement, before the sequence row is taken: every batch needs
    //    that row, so the work done while holding it is what serializes batches whose
    //    accounts do not overlap.
    if let Some(h) = hook_batch.as_mut() {
        h.write_rows(&mut Conn::Postgres(&mut tx), plan.now_us).await?;
    }

    // 6. Sequence block, postings, entries and the balances (locked in step 2) in one
    //    statement: one round trip while the batch holds the sequence row, whatever the
    //    batch size. Its AFTER STATEMENT triggers see all of it. Then the hook's
    //    numbered rows (outbox events), whose counter is so always taken after the
    //    sequence row.
    let balances = balance_changes(&accounts);
    let drafts = accepted(&decisions);
    let mut created_at_us = plan.now_us;
    if let Some((base, at)) = write_journal(&mut tx, &drafts, &balances, plan.now_us).await? {
        number_accepted(&mut decisions, base + 1);
        created_at_us = at;
    }
    if let Some(h) = hook_batch.as_mut() {
        h.write_numbered(&mut Conn::Postgres(&mut tx), plan.now_us).await?;
    }

    // 7. Rejected commands leave no key behind: a retry may succeed later.
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
    Ok(Committed { decisions, created_at_us })
}

/// Writes every accepted entry of the batch and the balances, and returns the sequence
/// base (entry `k`, 1-based in decision order, gets sequence `base + k`) and the
/// entries' time (`batch::Committed`). `None` when the batch accepted nothing (it then
/// takes no sequence block, and changed no balance).
async fn write_journal(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    drafts: &[&Draft],
    balances: &[(i64, Balance)],
    now_us: i64,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    if drafts.is_empty() {
        return Ok(None);
    }
    let mut args = PgArguments::default();
    let mut sql = String::from(JOURNAL_STEPS);
    add_journal_args(&mut args, drafts, now_us).map_err(sqlx::Error::Encode)?;
    if !balances.is_empty() {
        sql.push_str(", ");
        sql.push_str(&balances_step(&mut args, balances).map_err(sqlx::Error::Encode)?);
    }
    // The main query reads the sequence block, so the journal's sequence row is locked
    // before any other step runs (PostgreSQL runs the steps the main query does not read
    // after it).
    let sql = format!("WITH {sql} SELECT base, at FROM seq");
    let (base, at) = sqlx::query_as_with::<_, (i64, i64), _>(&sql, args).fetch_one(&mut **tx).await?;
    Ok(Some((base, at)))
}

/// The journal's own steps: the sequence block and the entries' time (the later of the
/// batch's clock, `$2`, and the last batch's time), postings and entries. Parameters
/// `$1` to `$20` (`add_journal_args`).
const JOURNAL_STEPS: &str = "seq AS ( \
       UPDATE ledger_sequence SET last_value = last_value + $1, last_at_us = GREATEST(last_at_us, $2) \
       WHERE id = 1 RETURNING last_value - $1 AS base, last_at_us AS at \
     ), postings AS ( \
       INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
       SELECT t.e, t.i, t.a, t.d, t.m, t.c, t.p, seq.base + t.o, seq.at \
       FROM UNNEST($3::text[], $4::int2[], $5::int8[], $6::text[], $7::int8[], $8::text[], $9::bool[], $10::int8[]) \
         AS t(e, i, a, d, m, c, p, o), seq \
     ), entries AS ( \
       INSERT INTO ledger_entries (id, sequence, kind, description, metadata, status, pending_entry_id, \
         reverses_entry_id, expires_at_us, created_by, created_at_us) \
       SELECT t.i, seq.base + t.o, t.k, t.d, t.m, t.st, t.p, t.r, t.x, t.c, seq.at \
       FROM UNNEST($11::text[], $12::int8[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], \
         $18::text[], $19::int8[], $20::text[]) AS t(i, o, k, d, m, st, p, r, x, c), seq \
     )";

/// The net change of each account the batch's decisions changed, one row per account
/// whatever number of entries touched it.
fn balance_changes(accounts: &HashMap<i64, AccountState>) -> Vec<(i64, Balance)> {
    accounts.iter().filter(|(_, s)| s.delta != Balance::default()).map(|(id, s)| (*id, s.delta)).collect()
}

/// The balance updates, as a step (`balances AS (...)`) of the statement whose
/// parameters `args` holds.
fn balances_step(args: &mut PgArguments, changed: &[(i64, Balance)]) -> Result<String, BoxDynError> {
    let id = bind_step(args, changed.iter().map(|c| c.0).collect::<Vec<i64>>())?;
    let pd = bind_step(args, changed.iter().map(|c| c.1.posted_debits).collect::<Vec<i64>>())?;
    let pc = bind_step(args, changed.iter().map(|c| c.1.posted_credits).collect::<Vec<i64>>())?;
    let qd = bind_step(args, changed.iter().map(|c| c.1.pending_debits).collect::<Vec<i64>>())?;
    let qc = bind_step(args, changed.iter().map(|c| c.1.pending_credits).collect::<Vec<i64>>())?;
    Ok(format!(
        "balances AS ( \
           UPDATE ledger_accounts a SET posted_debits = a.posted_debits + d.pd, \
             posted_credits = a.posted_credits + d.pc, pending_debits = a.pending_debits + d.qd, \
             pending_credits = a.pending_credits + d.qc, version = a.version + 1 \
           FROM UNNEST({id}::int8[], {pd}::int8[], {pc}::int8[], {qd}::int8[], {qc}::int8[]) AS d(id, pd, pc, qd, qc) \
           WHERE a.id = d.id AND a.id = ANY ({id}::int8[]) \
         )"
    ))
}

fn add_journal_args(args: &mut PgArguments, drafts: &[&Draft], now_us: i64) -> Result<(), BoxDynError> {
    let n: usize = drafts.iter().map(|d| d.postings.len()).sum();
    let mut p_entry = Vec::with_capacity(n);
    let mut p_idx = Vec::with_capacity(n);
    let mut p_account = Vec::with_capacity(n);
    let mut p_direction = Vec::with_capacity(n);
    let mut p_amount = Vec::with_capacity(n);
    let mut p_currency = Vec::with_capacity(n);
    let mut p_pending = Vec::with_capacity(n);
    let mut p_ordinal = Vec::with_capacity(n);
    for (k, d) in drafts.iter().enumerate() {
        for p in &d.postings {
            p_entry.push(d.id.as_str());
            p_idx.push(p.idx);
            p_account.push(p.posting.account_id);
            p_direction.push(p.posting.direction.as_db());
            p_amount.push(p.posting.amount.minor());
            p_currency.push(p.posting.amount.currency().code());
            p_pending.push(p.pending);
            p_ordinal.push(k as i64 + 1);
        }
    }
    let e_id: Vec<&str> = drafts.iter().map(|d| d.id.as_str()).collect();
    let e_ordinal: Vec<i64> = (1..=drafts.len() as i64).collect();
    let e_kind: Vec<&str> = drafts.iter().map(|d| d.kind.as_str()).collect();
    let e_description: Vec<&str> = drafts.iter().map(|d| d.description.as_str()).collect();
    let e_metadata: Vec<&str> = drafts.iter().map(|d| d.metadata_json.as_str()).collect();
    let e_status: Vec<&str> = drafts.iter().map(|d| d.status.as_str()).collect();
    let e_pending: Vec<Option<&str>> = drafts.iter().map(|d| d.pending_entry_id.as_deref()).collect();
    let e_reverses: Vec<Option<&str>> = drafts.iter().map(|d| d.reverses_entry_id.as_deref()).collect();
    let e_expires: Vec<Option<i64>> = drafts.iter().map(|d| d.expires_at_us).collect();
    let e_by: Vec<&str> = drafts.iter().map(|d| d.created_by.as_str()).collect();
    args.add(drafts.len() as i64)?;
    args.add(now_us)?;
    args.add(p_entry)?;
    args.add(p_idx)?;
    args.add(p_account)?;
    args.add(p_direction)?;
    args.add(p_amount)?;
    args.add(p_currency)?;
    args.add(p_pending)?;
    args.add(p_ordinal)?;
    args.add(e_id)?;
    args.add(e_ordinal)?;
    args.add(e_kind)?;
    args.add(e_description)?;
    args.add(e_metadata)?;
    args.add(e_status)?;
    args.add(e_pending)?;
    args.add(e_reverses)?;
    args.add(e_expires)?;
    args.add(e_by)?;
    Ok(())
}
