//! Platform accounts: who can pay and be paid, their verification tier and whether they
//! are frozen. Every change by an admin lands in the append-only audit log in the same
//! transaction.

pub mod audit;
mod lookup;

use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::store::Db;
use crate::with_db;

pub const DISPLAY_NAME_LEN_MAX: usize = 100;
pub const REASON_LEN_MAX: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Unverified,
    Verified,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Unverified => "unverified",
            Tier::Verified => "verified",
        }
    }

    pub(crate) fn from_db(s: &str) -> Result<Self> {
        match s {
            "unverified" => Ok(Tier::Unverified),
            "verified" => Ok(Tier::Verified),
            other => Err(Error::internal(anyhow::anyhow!("unknown tier {other:?} in accounts"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Frozen,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Frozen => "frozen",
        }
    }

    pub(crate) fn from_db(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Status::Active),
            "frozen" => Ok(Status::Frozen),
            other => Err(Error::internal(anyhow::anyhow!("unknown status {other:?} in accounts"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user_id: UserId,
    pub display_name: String,
    pub tier: Tier,
    pub status: Status,
    pub created_at_us: i64,
    /// Sells in live streams (set by the platform, `set_seller`).
    pub seller: bool,
    /// The seller's own commission in basis points; `None` is the configured default.
    pub commission_bps: Option<u32>,
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    user_id: String,
    display_name: String,
    tier: String,
    status: String,
    created_at_us: i64,
    seller: bool,
    commission_bps: Option<i32>,
}

impl TryFrom<AccountRow> for Account {
    type Error = Error;
    fn try_from(row: AccountRow) -> Result<Self> {
        Ok(Account {
            user_id: UserId::from_db(row.user_id),
            display_name: row.display_name,
            tier: Tier::from_db(&row.tier)?,
            status: Status::from_db(&row.status)?,
            created_at_us: row.created_at_us,
            seller: row.seller,
            commission_bps: row.commission_bps.and_then(|b| u32::try_from(b).ok()),
        })
    }
}

/// The columns an `AccountRow` reads.
macro_rules! ACCOUNT_COLUMNS {
    () => {
        "user_id, display_name, tier, status, created_at_us, seller, commission_bps"
    };
}

const SELECT_ACCOUNT: &str = concat!("SELECT ", ACCOUNT_COLUMNS!(), " FROM accounts WHERE user_id = $1");

/// The largest commission: the whole price.
pub const COMMISSION_BPS_MAX: u32 = 10_000;

/// The account store.
#[derive(Clone, Debug)]
pub struct Accounts {
    /// Reads.
    db: Db,
    /// Writes: on SQLite the posting engine's pool (`EngineHandle::writer`), so that a
    /// first payment's account row takes its turn between the engine's batches instead
    /// of polling for SQLite's write lock, which the engine holds nearly all the time
    /// during a burst (the new viewers of a live stream are all first payments).
    writer: Db,
    clock: Clock,
    /// Users whose account this process has seen, shared by every clone: accounts are
    /// never deleted, so once seen an account exists for good. A live stream's viewers
    /// are mostly first callers, and the rate limiter's read of their tier then also
    /// answers whether their account exists (`known`), instead of a second read.
    known: std::sync::Arc<Known>,
    /// Tier lookups waiting to be read together (`lookup`), shared by every clone.
    lookups: std::sync::Arc<lookup::Lookups>,
}

/// A set of user ids, bounded: past `KNOWN_MAX` it starts over.
#[derive(Debug, Default)]
struct Known(std::sync::Mutex<std::collections::HashSet<String>>);

/// Users remembered as existing.
const KNOWN_MAX: usize = 200_000;

impl Known {
    fn contains(&self, user: &str) -> bool {
        self.0.lock().map(|s| s.contains(user)).unwrap_or(false)
    }

    fn insert(&self, user: &str) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() >= KNOWN_MAX {
                s.clear();
            }
            s.insert(user.to_owned());
        }
    }
}

impl Accounts {
    /// Reads and writes on `db`.
    pub fn new(db: Db, clock: Clock) -> Self {
        Accounts { writer: db.clone(), db, clock, known: Default::default(), lookups: Default::default() }
    }

    /// Reads on `db`, writes on `writer`. No write holds its connection while it waits
    /// for anything but the database, so sharing the engine's pool cannot deadlock.
    pub fn with_writer(db: Db, writer: Db, clock: Clock) -> Self {
        Accounts { db, writer, clock, known: Default::default(), lookups: Default::default() }
    }

    /// Whether this process has seen `user`'s account (so it exists), without a read.
    pub fn known(&self, user: &UserId) -> bool {
        self.known.contains(user.as_str())
    }

    /// Whether `user`'s account exists, from memory when this process has seen it
    /// (accounts are never deleted), else read.
    pub async fn exists(&self, user: &UserId) -> Result<bool> {
        if self.known.contains(user.as_str()) {
            return Ok(true);
        }
        Ok(self.get(user).await?.is_some())
    }

    /// The clock account rows are stamped with.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub async fn get(&self, user_id: &UserId) -> Result<Option<Account>> {
        let row: Option<AccountRow> = with_db!(&self.db, pool => sqlx::query_as(SELECT_ACCOUNT)
            .bind(user_id.as_str())
            .fetch_optional(pool)
            .await)?;
        let account = row.map(Account::try_from).transpose()?;
        if account.is_some() {
            self.known.insert(user_id.as_str());
        }
        Ok(account)
    }

    /// Returns the account, creating it unverified and active on first use.
    pub async fn ensure(&self, user_id: &UserId) -> Result<Account> {
        let now = self.clock.now_us();
        with_db!(&self.writer, pool => sqlx::query(
            "INSERT INTO accounts (user_id, display_name, tier, status, created_at_us, updated_at_us) \
             VALUES ($1, '', 'unverified', 'active', $2, $2) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.get(user_id).await?.ok_or_else(|| Error::internal(anyhow::anyhow!("account vanished after insert")))
    }

    /// Creates or updates an account. An empty display name or no tier keeps the
    /// current value. Audited.
    pub async fn upsert(
        &self,
        actor: &str,
        user_id: &UserId,
        display_name: &str,
        tier: Option<Tier>,
    ) -> Result<Account> {
        let now = self.clock.now_us();
        let tier_new = tier.map(Tier::as_str);
        let row: AccountRow = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query_as(concat!(
                "INSERT INTO accounts (user_id, display_name, tier, status, created_at_us, updated_at_us) \
                 VALUES ($1, $2, COALESCE($3, 'unverified'), 'active', $4, $4) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                   display_name = CASE WHEN excluded.display_name = '' THEN accounts.display_name \
                                       ELSE excluded.display_name END, \
                   tier = COALESCE($3, accounts.tier), \
                   updated_at_us = excluded.updated_at_us \
                 RETURNING ", ACCOUNT_COLUMNS!()
            ))
            .bind(user_id.as_str())
            .bind(display_name)
            .bind(tier_new)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let detail = format!("tier={}", tier_new.unwrap_or("unchanged"));
            audit::insert_audit!(&mut *tx, actor, "account.upsert", format!("account:{user_id}"), detail, "ok", now)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        Account::try_from(row)
    }

    /// Sets the status and writes the audit record in one transaction. The account is
    /// created first if the platform never upserted it.
    pub async fn set_status(&self, actor: &str, user_id: &UserId, status: Status, reason: &str) -> Result<Account> {
        self.ensure(user_id).await?;
        let now = self.clock.now_us();
        let action = match status {
            Status::Frozen => "account.freeze",
            Status::Active => "account.unfreeze",
        };
        let row: AccountRow = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query_as(concat!(
                "UPDATE accounts SET status = $2, updated_at_us = $3 WHERE user_id = $1 \
                 RETURNING ", ACCOUNT_COLUMNS!()
            ))
            .bind(user_id.as_str())
            .bind(status.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert_audit!(&mut *tx, actor, action, format!("account:{user_id}"), reason, "ok", now).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        Account::try_from(row)
    }

    /// Makes `user_id` a seller or not, with a commission override (`None`: the
    /// default), and writes the audit record in one transaction. The account must exist.
    pub async fn set_seller(
        &self,
        actor: &str,
        user_id: &UserId,
        seller: bool,
        commission_bps: Option<u32>,
        reason: &str,
    ) -> Result<Account> {
        if commission_bps.is_some_and(|b| b > COMMISSION_BPS_MAX) {
            return Err(Error::invalid("commission_bps", format!("0 to {COMMISSION_BPS_MAX} basis points")));
        }
        let now = self.clock.now_us();
        let bps = commission_bps.map(|b| b as i32);
        let row: Option<AccountRow> = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row: Option<AccountRow> = sqlx::query_as(concat!(
                "UPDATE accounts SET seller = $2, commission_bps = $3, updated_at_us = $4 WHERE user_id = $1 \
                 RETURNING ", ACCOUNT_COLUMNS!()
            ))
            .bind(user_id.as_str())
            .bind(seller)
            .bind(bps)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                let detail = format!(
                    "seller={seller} commission_bps={}; {reason}",
                    bps.map_or_else(|| "default".to_owned(), |b| b.to_string())
                );
                audit::insert_audit!(&mut *tx, actor, "account.set_seller", format!("account:{user_id}"), detail, "ok", now)
                    .await?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(row)
        })?;
        row.map(Account::try_from).transpose()?.ok_or_else(|| Error::not_found(format!("account {user_id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("user_id", "alice-01.x_y").is_ok());
        for bad in ["", "a b", "al:ice", "ünï", &"x".repeat(129)] {
            let err = UserId::parse("user_id", bad).unwrap_err();
            assert!(err.to_string().contains("user_id"), "{bad:?}: {err}");
        }
    }

    /// On SQLite the writes go through the writer pool (the engine's one connection in the
    /// server) and wait their turn there; reads do not.
    #[tokio::test]
    async fn writes_take_turns_on_the_writer_pool() {
        use std::time::Duration;

        use crate::store::PoolRole;

        let dir = tempfile::tempdir().expect("a scratch directory");
        let url = format!("sqlite://{}/accounts.db", dir.path().display());
        let db = Db::connect_url(&url, 4, Duration::from_secs(5)).await.expect("general pool");
        db.migrate().await.expect("migrations");
        let writer = Db::connect_role(&url, 1, Duration::from_secs(5), PoolRole::Engine).await.expect("writer pool");
        let accounts = Accounts::with_writer(db.clone(), writer.clone(), Clock::system());
        let Db::Sqlite(pool) = &writer else { panic!("a SQLite pool") };
        let held = pool.acquire().await.expect("the writer's one connection");

        let user = UserId::parse("user_id", "viewer-1").expect("a user id");
        let ensure = accounts.ensure(&user);
        tokio::pin!(ensure);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut ensure).await.is_err(),
            "the write waits for the writer's connection"
        );
        assert!(accounts.get(&user).await.expect("a read").is_none(), "reads do not wait, and nothing is written yet");
        drop(held);
        let account = ensure.await.expect("written once the connection is free");
        assert_eq!(account.user_id, user);
        assert_eq!(account.status, Status::Active);
    }
}
