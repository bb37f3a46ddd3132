//! One batch, from its commands to their answers: duplicates inside the batch follow
//! their first, the batch transaction runs on either backend (`backend::pg`,
//! `backend::sqlite`), keys another process committed first are looked up and answered as
//! replays, a concurrent duplicate reruns the batch, and a batch the database refuses is
//! retried command by command so only the culprit fails.

use std::collections::HashMap;
use std::time::Duration;

use super::backend::{self, BatchResult, Committed, KeyRecord};
use super::command::{Command, Idem, Outcome};
use super::decide::{Decision, Plan};
use super::health::DatabaseState;
use super::hook::BatchHook;
use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::store::Db;

/// What running a batch needs besides its commands.
pub(super) struct BatchContext<'a> {
    pub db: &'a Db,
    pub hook: Option<&'a dyn BatchHook>,
    pub timeout: Duration,
    pub database: &'a DatabaseState,
    pub clock: &'a Clock,
}

/// A command's part in its batch, by its idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Decided in the transaction: no key, or the first command of its (caller, key).
    Lead,
    /// The same request as an earlier command of the batch (its index): it gets the
    /// leader's answer, as a replay.
    Follow(usize),
    /// The key of an earlier command of the batch with another request: ALREADY_EXISTS.
    KeyReused,
}

/// Each command's role: the first of each (caller, key) leads; a later one with the same
/// request follows it, one with another request is refused.
pub(super) fn roles(batch: &[Command]) -> Vec<Role> {
    let mut leaders: HashMap<(&str, &str), usize> = HashMap::new();
    batch
        .iter()
        .enumerate()
        .map(|(i, cmd)| {
            let Some(idem) = &cmd.idem else { return Role::Lead };
            match leaders.get(&(cmd.caller.as_str(), idem.key.as_str())) {
                Some(&li) if batch[li].idem.as_ref().is_some_and(|l| l.request_hash == idem.request_hash) => {
                    Role::Follow(li)
                }
                Some(_) => Role::KeyReused,
                None => {
                    leaders.insert((cmd.caller.as_str(), idem.key.as_str()), i);
                    Role::Lead
                }
            }
        })
        .collect()
}

pub(super) async fn process_batch(ctx: &BatchContext<'_>, batch: Vec<Command>) {
    let db = ctx.db;
    let roles = roles(&batch);
    // Each leader's place in `lead`, by its index in the batch (a follower's leader
    // always comes before it).
    let mut lead_at: Vec<usize> = vec![usize::MAX; batch.len()];
    let mut followers: Vec<(Command, usize)> = Vec::new();
    let mut lead: Vec<Command> = Vec::with_capacity(batch.len());
    for (i, (cmd, role)) in batch.into_iter().zip(roles).enumerate() {
        match role {
            Role::Lead => {
                lead_at[i] = lead.len();
                lead.push(cmd);
            }
            Role::Follow(leader) => followers.push((cmd, lead_at[leader])),
            Role::KeyReused => {
                let key = cmd.idem.as_ref().map(|k| k.key.clone()).unwrap_or_default();
                let _ = cmd.reply.send(Err(key_reused(&key)));
            }
        }
    }

    // Keys committed earlier are found by the transaction itself (its key insert
    // conflicts) and answered after it; no separate lookup round trip up front.
    let mut results: Vec<Option<Result<Outcome>>> = (0..lead.len()).map(|_| None).collect();
    let to_run: Vec<usize> = (0..lead.len()).collect();

    if !to_run.is_empty() {
        let run: Vec<&Command> = to_run.iter().map(|i| &lead[*i]).collect();
        let outcomes = run_transaction(ctx, run).await;
        for (slot, outcome) in to_run.iter().zip(outcomes) {
            results[*slot] = Some(outcome);
        }
        // Keys committed before, by an earlier batch or another process: a replay of
        // the original result, or ALREADY_EXISTS for a different request.
        let taken: Vec<usize> =
            to_run.iter().copied().filter(|i| matches!(results[*i], Some(Err(Error::Aborted)))).collect();
        if !taken.is_empty() {
            let again: Vec<&Command> = taken.iter().map(|i| &lead[*i]).collect();
            match lookup_keys_of(db, &again).await {
                Ok(found) => {
                    for i in taken {
                        let cmd = &lead[i];
                        let answer = cmd
                            .idem
                            .as_ref()
                            .and_then(|k| found.get(&(cmd.caller.clone(), k.key.clone())).map(|r| replay(k, r)))
                            .unwrap_or_else(|| {
                                Err(Error::Unavailable("concurrent request with this key; retry".into()))
                            });
                        results[i] = Some(answer);
                    }
                }
                Err(e) => {
                    let err = crate::kernel::error::classify(e);
                    for i in taken {
                        results[i] = Some(Err(err.duplicate()));
                    }
                }
            }
        }
    }

    // Followers get what their leader got.
    let mut follower_answers: Vec<(Command, Result<Outcome>)> = Vec::with_capacity(followers.len());
    for (cmd, li) in followers {
        let answer = match &results[li] {
            Some(Ok(Outcome::Created { entry, .. })) => Ok(Outcome::Replayed(entry.id.clone())),
            Some(Ok(Outcome::Replayed(id))) => Ok(Outcome::Replayed(id.clone())),
            Some(Err(e)) => Err(e.duplicate()),
            None => Err(Error::internal(anyhow::anyhow!("leader without a result"))),
        };
        follower_answers.push((cmd, answer));
    }
    for (cmd, result) in lead.into_iter().zip(results) {
        let _ =
            cmd.reply.send(result.unwrap_or_else(|| Err(Error::internal(anyhow::anyhow!("command without a result")))));
    }
    for (cmd, answer) in follower_answers {
        let _ = cmd.reply.send(answer);
    }
}

fn key_reused(key: &str) -> Error {
    Error::AlreadyExists(format!(
        "idempotency_key {key:?} was already used with a different request; use a new key for a new request"
    ))
}

pub(super) fn replay(idem: &Idem, record: &KeyRecord) -> Result<Outcome> {
    if record.request_hash == idem.request_hash && record.operation == idem.operation {
        Ok(Outcome::Replayed(record.result_id.clone()))
    } else {
        Err(key_reused(&idem.key))
    }
}

async fn lookup_keys_of(
    db: &Db,
    cmds: &[&Command],
) -> std::result::Result<HashMap<(String, String), KeyRecord>, sqlx::Error> {
    let pairs: Vec<(String, String)> =
        cmds.iter().filter_map(|c| c.idem.as_ref().map(|k| (c.caller.clone(), k.key.clone()))).collect();
    if pairs.is_empty() {
        return Ok(HashMap::new());
    }
    let records = match db {
        Db::Postgres(pool) => backend::pg::lookup_keys(pool, &pairs).await?,
        Db::Sqlite(pool) => backend::sqlite::lookup_keys(pool, &pairs).await?,
    };
    Ok(records.into_iter().map(|r| ((r.caller.clone(), r.key.clone()), r)).collect())
}

/// Runs the batch transaction and turns decisions into answers. Keys another process
/// took first come back as `Error::Aborted` for the caller above to look up.
async fn run_transaction(ctx: &BatchContext<'_>, cmds: Vec<&Command>) -> Vec<Result<Outcome>> {
    let (db, hook, timeout) = (ctx.db, ctx.hook, ctx.timeout);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let plan = Plan::new(cmds.clone(), ctx.clock.now_us());
        let result: BatchResult = match db {
            Db::Postgres(pool) => backend::pg::commit(pool, hook, &plan, timeout).await,
            Db::Sqlite(pool) => backend::sqlite::commit(pool, hook, &plan).await,
        };
        let err = match result {
            Ok(Committed { decisions, created_at_us }) => {
                return decisions
                    .into_iter()
                    .map(|d| match d {
                        Decision::Accept(draft) => Ok(Outcome::Created {
                            entry: Box::new(draft.to_entry(created_at_us)),
                            batch_clock_us: plan.now_us,
                        }),
                        Decision::Reject(e) => Err(e),
                        Decision::KeyTaken => Err(Error::Aborted),
                        Decision::Answered(answer) => answer,
                    })
                    .collect()
            }
            Err(e) => e,
        };
        // On PostgreSQL only: a SQLite file does not go away, and there a pool timeout
        // means its one connection was busy (an account insert waiting for the lock).
        if matches!(err, sqlx::Error::PoolTimedOut) && matches!(db, Db::Postgres(_)) {
            // No connection, or no answer in time: refuse what is queued until the
            // health probe reaches the database again.
            ctx.database.set_reachable(false);
        }
        // A unique violation means another process committed a row this batch also
        // wrote (a concurrent duplicate of a hook's idempotency key): the rerun sees it
        // and answers that command as a replay.
        if attempt < 3 && crate::store::is_unique_violation(&err) {
            tracing::debug!(size = cmds.len(), "ledger batch met a concurrent duplicate; running it again");
            continue;
        }
        let err = crate::kernel::error::classify(err);
        if cmds.len() > 1 && matches!(err, Error::Internal(_)) {
            // The database refused the batch. Retry one by one so only the command at
            // fault fails.
            tracing::error!(error = %format!("{err:#}"), size = cmds.len(), "ledger batch refused; retrying commands one by one");
            let mut out = Vec::with_capacity(cmds.len());
            for cmd in cmds {
                out.extend(Box::pin(run_transaction(ctx, vec![cmd])).await);
            }
            return out;
        }
        return cmds.iter().map(|_| Err(err.duplicate())).collect();
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
