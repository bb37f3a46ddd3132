//! Tier lookups of first callers, read together: the first call of each new viewer in a
//! live stream needs the caller's tier (its write rate), and a burst of them would be a
//! burst of one-row reads. Lookups that arrive while one read is in flight queue up and
//! are answered by the next read, one statement for all of them, so the statements per
//! second stay at what the database answers in a row, whatever the burst.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{Accounts, Tier};
use crate::kernel::ids::UserId;
use crate::store::Db;

/// Lookups one read answers at most; more wait for the next read.
const READ_USERS_MAX: usize = 500;
/// Lookups queued at most; past this a caller reads alone.
const QUEUE_MAX: usize = 10_000;

type Reply = oneshot::Sender<Option<Option<Tier>>>;

#[derive(Debug, Default)]
pub(super) struct Lookups(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    queue: Vec<(String, Reply)>,
    /// A reader task is running; it takes the queue until it finds it empty.
    reading: bool,
}

impl Accounts {
    /// The tier of `user`'s account (`None`: no account), read with the lookups of other
    /// callers that arrive meanwhile. `Err` when the read failed.
    pub async fn tier_of(&self, user: &UserId) -> Result<Option<Tier>, ()> {
        let (tx, rx) = oneshot::channel();
        // `None`: the queue is full, read alone.
        let start = {
            let mut state = self.lookups.0.lock().map_err(|_| ())?;
            if state.queue.len() >= QUEUE_MAX {
                None
            } else {
                state.queue.push((user.as_str().to_owned(), tx));
                Some(!std::mem::replace(&mut state.reading, true))
            }
        };
        let Some(start) = start else {
            return self.get(user).await.map(|a| a.map(|a| a.tier)).map_err(|_| ());
        };
        if start {
            // A task of its own, so a caller that goes away cannot strand the others.
            let accounts = self.clone();
            tokio::spawn(async move { accounts.read_queued().await });
        }
        rx.await.map_err(|_| ())?.ok_or(())
    }

    /// Answers queued lookups, a read at a time, until the queue is empty.
    async fn read_queued(self) {
        loop {
            let batch: Vec<(String, Reply)> = {
                let Ok(mut state) = self.lookups.0.lock() else { return };
                if state.queue.is_empty() {
                    state.reading = false;
                    return;
                }
                let n = state.queue.len().min(READ_USERS_MAX);
                state.queue.drain(..n).collect()
            };
            let ids: Vec<&str> = batch.iter().map(|(u, _)| u.as_str()).collect();
            let found = tiers(&self.db, &ids).await;
            for (user, reply) in batch {
                let answer = match &found {
                    Ok(tiers) => {
                        let tier = tiers.get(&user).copied();
                        if tier.is_some() {
                            self.known.insert(&user);
                        }
                        Some(tier)
                    }
                    Err(_) => None,
                };
                let _ = reply.send(answer);
            }
        }
    }
}

/// The tiers of these users' accounts, by user.
async fn tiers(db: &Db, users: &[&str]) -> Result<HashMap<String, Tier>, sqlx::Error> {
    let rows: Vec<(String, String)> = match db {
        Db::Postgres(pool) => {
            // One primary-key probe per user (LATERAL, kept apart by the LIMIT). As
            // `user_id = ANY($1)` the planner, costing pages as if read from disk,
            // scanned the whole table for a few dozen users once it held some
            // thousands: 5 to 10 ms of the database's CPU per read in a flash sale,
            // where every buyer's first tap is a lookup.
            sqlx::query_as(
                "SELECT a.user_id, a.tier FROM UNNEST($1::text[]) AS t(u) \
                 CROSS JOIN LATERAL (SELECT user_id, tier FROM accounts WHERE user_id = t.u LIMIT 1) a",
            )
            .bind(users)
            .fetch_all(pool)
            .await?
        }
        Db::Sqlite(pool) => {
            sqlx::query_as("SELECT user_id, tier FROM accounts WHERE user_id IN (SELECT value FROM json_each($1))")
                .bind(crate::store::json_rows(users)?)
                .fetch_all(pool)
                .await?
        }
    };
    Ok(rows.into_iter().filter_map(|(u, t)| Some((u, Tier::from_db(&t).ok()?))).collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kernel::clock::Clock;

    /// Fifty lookups at once, of accounts of both tiers and of none, each get their own
    /// answer, however they were grouped into reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_read_together_answer_each_caller() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let url = format!("sqlite://{}/lookups.db", dir.path().display());
        let db = Db::connect_url(&url, 4, Duration::from_secs(5)).await.expect("pool");
        db.migrate().await.expect("migrations");
        let accounts = Accounts::new(db, Clock::system());
        let user = |s: &str| UserId::parse("user", s).expect("a user id");
        accounts.upsert("test", &user("vera"), "", Some(Tier::Verified)).await.expect("vera");
        accounts.upsert("test", &user("uma"), "", Some(Tier::Unverified)).await.expect("uma");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (accounts, name) = (accounts.clone(), ["vera", "uma", "nobody"][i % 3]);
            tasks.spawn(async move { (name, accounts.tier_of(&user(name)).await) });
        }
        while let Some(r) = tasks.join_next().await {
            let (name, tier) = r.expect("task");
            let expected = match name {
                "vera" => Some(Tier::Verified),
                "uma" => Some(Tier::Unverified),
                _ => None,
            };
            assert_eq!(tier, Ok(expected), "{name}");
        }
        assert!(accounts.known.contains("vera") && !accounts.known.contains("nobody"));
        // The reader stops once it finds the queue empty (just after its last answers).
        let mut stopped = false;
        for _ in 0..100 {
            if !accounts.lookups.0.lock().expect("lock").reading {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped, "the reader stops when the queue is empty");
    }
}
