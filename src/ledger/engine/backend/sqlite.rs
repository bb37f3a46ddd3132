//! The posting engine's transaction on SQLite. `BEGIN IMMEDIATE` takes the database's
//! single write lock up front, so everything read in the transaction stays true until
//! commit and no two writers interleave. A batch's rows travel as one JSON array
//! parameter per statement (`store::json_rows`, read back with `json_each`), so a batch
//! costs a handful of statements in three calls, each prepared once per connection.

use std::collections::{HashMap, HashSet};

use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments, Sqlite, SqliteConnection, SqlitePool};

use super::{BatchResult, Committed, KeyRecord};
use crate::ledger::engine::decide::{accepted, number_accepted, AccountState, Decision, Draft, Plan};
use crate::ledger::engine::hook::{BatchHook, Conn};
use crate::ledger::model::Balance;
use crate::store::{from_json_rows, json_rows};

pub(crate) async fn lookup_keys(pool: &SqlitePool, pairs: &[(String, String)]) -> Result<Vec<KeyRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.caller, i.key, i.operation, i.request_hash, i.result_id FROM json_each(?1) AS j \
         JOIN idempotency_keys i ON i.caller = j.value ->> 0 AND i.key = j.value ->> 1",
    )
    .bind(json_rows(pairs)?)
    .fetch_all(pool)
    .await
}

/// A batch on SQLite is three calls to SQLite's thread: `BEGIN IMMEDIATE` with the
/// batch's accounts, the hook's reads, and one last call that writes everything and
/// commits. Every call is a hand-off to that thread and back, and while the engine's
/// worker wakes up and builds the next call, the database's one writer sits idle; the
/// rarer steps (ledger idempotency keys, pending entries' targets) add calls of their
/// own only when a batch has them. The transaction is opened and closed by these
/// statements rather than by a sqlx `Transaction`, whose begin and commit would each be
/// a call of its own: an error rolls it back here, and a batch dropped half way closes
/// its connection (`OpenTx`), which rolls it back too.
pub(crate) async fn commit(pool: &SqlitePool, hook: Option<&dyn BatchHook>, plan: &Plan<'_>) -> BatchResult {
    let mut tx = OpenTx { conn: pool.acquire().await?, open: true };
    let result = run(&mut tx.conn, hook, plan).await;
    if result.is_err() {
        // Undo what the batch's statements did before one failed. After some errors
        // (I/O, a full disk) SQLite has rolled back by itself and refuses this with "no
        // transaction is active", which leaves nothing to undo.
        let _ = sqlx::query("ROLLBACK").execute(&mut *tx.conn).await;
    }
    tx.open = false;
    result
}

/// The engine's connection while its batch's transaction may be open. Dropped while
/// `open` (the batch's future cancelled half way), it closes the connection rather than
/// returning it to the pool with the transaction open; closing rolls it back.
struct OpenTx {
    conn: PoolConnection<Sqlite>,
    open: bool,
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

async fn run(conn: &mut SqliteConnection, hook: Option<&dyn BatchHook>, plan: &Plan<'_>) -> BatchResult {
    // The journal's sequence as it stands, and the batch's accounts. `BEGIN IMMEDIATE`
    // takes SQLite's write lock first, so nothing moves the sequence before this batch
    // does. The accounts come back as one JSON array in one row: SQLite's thread hands
    // each row over on its own, waking the engine's worker each time (a few microseconds
    // of the writer's time per row, for a batch's hundred or more rows).
    let (sequence_last, last_at_us, rows): (i64, i64, String) = sqlx::query_as(
        "BEGIN IMMEDIATE; \
         SELECT last_value, last_at_us, \
         (SELECT json_group_array(json_array(id, credit_normal, allow_negative, posted_debits, posted_credits, \
         pending_debits, pending_credits)) FROM ledger_accounts WHERE id IN (SELECT value FROM json_each(?))) \
         FROM ledger_sequence WHERE id = 1",
    )
    .bind(json_rows(&plan.account_ids)?)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| sqlx::Error::Protocol("the ledger_sequence row is missing".into()))?;
    // The entries' time never goes backwards in sequence order (`batch::Committed`).
    let created_at_us = plan.now_us.max(last_at_us);
    let rows: Vec<(i64, i64, i64, i64, i64, i64, i64)> = from_json_rows(&rows)?;
    let mut accounts: HashMap<i64, AccountState> = rows
        .into_iter()
        .map(|(id, credit_normal, allow_negative, pd, pc, qd, qc)| {
            (
                id,
                AccountState {
                    credit_normal: credit_normal != 0,
                    allow_negative: allow_negative != 0,
                    balance: Balance { posted_debits: pd, posted_credits: pc, pending_debits: qd, pending_credits: qc },
                    delta: Balance::default(),
                },
            )
        })
        .collect();

    let mut resolved = HashSet::new();
    for id in &plan.resolve_targets {
        let hit: Option<String> =
            sqlx::query_scalar("SELECT pending_entry_id FROM ledger_entries WHERE pending_entry_id = ?1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        resolved.extend(hit);
    }
    let mut reversed = HashSet::new();
    for id in &plan.reverse_targets {
        let hit: Option<String> =
            sqlx::query_scalar("SELECT reverses_entry_id FROM ledger_entries WHERE reverses_entry_id = ?1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        reversed.extend(hit);
    }

    let mut keys_taken = HashSet::new();
    if !plan.keyed.is_empty() {
        let keys: Vec<(&str, &str, &str, &str, &str)> = plan
            .keyed
            .iter()
            .filter_map(|&i| {
                let cmd = plan.cmds[i];
                cmd.idem.as_ref().map(|k| {
                    (
                        cmd.caller.as_str(),
                        k.key.as_str(),
                        k.operation,
                        k.request_hash.as_str(),
                        plan.entry_ids[i].as_str(),
                    )
                })
            })
            .collect();
        // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT.
        let inserted: HashSet<(String, String)> = sqlx::query_as::<_, (String, String)>(
            "WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?1)) INSERT INTO idempotency_keys (caller, key, operation, request_hash, result_id, created_at_us) \
             SELECT r.v ->> 0, r.v ->> 1, r.v ->> 2, r.v ->> 3, r.v ->> 4, ?2 \
             FROM r WHERE true \
             ON CONFLICT (caller, key) DO NOTHING RETURNING caller, key",
        )
        .bind(json_rows(&keys)?)
        .bind(plan.now_us)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        for &i in &plan.keyed {
            let cmd = plan.cmds[i];
            if let Some(idem) = &cmd.idem {
                if !inserted.contains(&(cmd.caller.clone(), idem.key.clone())) {
                    keys_taken.insert(i);
                }
            }
        }
    }

    let attached = plan.attached();
    let mut hook_batch = match hook {
        Some(h) if !attached.is_empty() => {
            Some(h.prepare(&mut Conn::Sqlite(&mut *conn), &attached, plan.now_us).await?)
        }
        _ => None,
    };
    let mut decisions = plan.decide(&mut accounts, &resolved, &reversed, &keys_taken, hook_batch.as_deref_mut());

    // The hook's rows, all of them (one writer holds the whole database, so their order
    // against the entries does not matter), with its own statements.
    if let Some(h) = hook_batch.as_mut() {
        h.write_rows(&mut Conn::Sqlite(&mut *conn), plan.now_us).await?;
        h.write_numbered(&mut Conn::Sqlite(&mut *conn), plan.now_us).await?;
    }

    number_accepted(&mut decisions, sequence_last + 1);
    let drafts = accepted(&decisions);
    // The last call: entries, keys given back, and the commit.
    let mut args = SqliteArguments::default();
    let mut sql = String::new();
    if !drafts.is_empty() {
        // One net update per account, whatever number of entries touched it.
        let changed: Vec<(i64, i64, i64, i64, i64)> = accounts
            .iter()
            .filter(|(_, s)| s.delta != Balance::default())
            .map(|(id, s)| {
                (*id, s.delta.posted_debits, s.delta.posted_credits, s.delta.pending_debits, s.delta.pending_credits)
            })
            .collect();
        sql.push_str(entries_steps(&mut args, &drafts, &changed, created_at_us).map_err(sqlx::Error::Encode)?);
        sql.push_str("; ");
    }
    // Keys of refused ledger calls are given back, so the caller may retry with them.
    let refused: Vec<(&str, &str)> = plan
        .keyed
        .iter()
        .filter(|&&i| matches!(decisions[i], Decision::Reject(_)))
        .filter_map(|&i| plan.cmds[i].idem.as_ref().map(|k| (plan.cmds[i].caller.as_str(), k.key.as_str())))
        .collect();
    if !refused.is_empty() {
        args.add(json_rows(&refused)?).map_err(sqlx::Error::Encode)?;
        sql.push_str(
            "DELETE FROM idempotency_keys WHERE (caller, key) IN \
             (SELECT value ->> 0, value ->> 1 FROM json_each(?)); ",
        );
    }
    sql.push_str("COMMIT");
    sqlx::query_with(&sql, args).execute(&mut *conn).await?;
    Ok(Committed { decisions, created_at_us })
}

/// All postings of the batch first, then the entry rows, whose trigger checks that each
/// entry's postings balance, then one net balance update per account and the
/// sequence's advance past the batch, with the entries' time: four statements of the
/// batch's last call. The parameters are positional (`?`), appended to `args` in the
/// order the statements take them.
fn entries_steps(
    args: &mut SqliteArguments<'static>,
    drafts: &[&Draft],
    changed: &[(i64, i64, i64, i64, i64)],
    created_at_us: i64,
) -> Result<&'static str, BoxDynError> {
    type PostingRow<'a> = (&'a str, i16, i64, &'a str, i64, &'a str, bool, i64);
    let postings: Vec<PostingRow<'_>> = drafts
        .iter()
        .flat_map(|d| {
            d.postings.iter().map(move |p| {
                (
                    d.id.as_str(),
                    p.idx,
                    p.posting.account_id,
                    p.posting.direction.as_db(),
                    p.posting.amount.minor(),
                    p.posting.amount.currency().code(),
                    p.pending,
                    d.sequence,
                )
            })
        })
        .collect();
    type EntryRow<'a> =
        (&'a str, i64, &'a str, &'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>, Option<i64>, &'a str);
    let entries: Vec<EntryRow<'_>> = drafts
        .iter()
        .map(|d| {
            (
                d.id.as_str(),
                d.sequence,
                d.kind.as_str(),
                d.description.as_str(),
                d.metadata_json.as_str(),
                d.status.as_str(),
                d.pending_entry_id.as_deref(),
                d.reverses_entry_id.as_deref(),
                d.expires_at_us,
                d.created_by.as_str(),
            )
        })
        .collect();
    args.add(json_rows(&postings)?)?;
    args.add(created_at_us)?;
    args.add(json_rows(&entries)?)?;
    args.add(created_at_us)?;
    args.add(json_rows(changed)?)?;
    args.add(drafts.len() as i64)?;
    args.add(created_at_us)?;
    Ok("WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) \
        INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, \
        created_at_us) \
        SELECT r.v ->> 0, r.v ->> 1, r.v ->> 2, r.v ->> 3, r.v ->> 4, r.v ->> 5, r.v ->> 6, r.v ->> 7, ? FROM r; \
        WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) \
        INSERT INTO ledger_entries (id, sequence, kind, description, metadata, status, pending_entry_id, \
        reverses_entry_id, expires_at_us, created_by, created_at_us) \
        SELECT r.v ->> 0, r.v ->> 1, r.v ->> 2, r.v ->> 3, r.v ->> 4, r.v ->> 5, \
        r.v ->> 6, r.v ->> 7, r.v ->> 8, r.v ->> 9, ? FROM r; \
        WITH r(v) AS MATERIALIZED (SELECT value FROM json_each(?)) \
        UPDATE ledger_accounts SET posted_debits = posted_debits + (r.v ->> 1), \
        posted_credits = posted_credits + (r.v ->> 2), pending_debits = pending_debits + (r.v ->> 3), \
        pending_credits = pending_credits + (r.v ->> 4), version = version + 1 \
        FROM r WHERE ledger_accounts.id = r.v ->> 0; \
        UPDATE ledger_sequence SET last_value = last_value + ?, last_at_us = ? WHERE id = 1")
}
