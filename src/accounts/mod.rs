//! Platform accounts: who can pay and be paid, their verification tier and whether they
//! are frozen. Every change by an admin lands in the append-only audit log in the same
//! transaction.

use std::fmt;

use crate::error::{Error, Result};
use crate::store::{now_us, Db};
use crate::with_db;

/// Longest user id; also bounds ledger account codes built from it.
pub const USER_ID_LEN_MAX: usize = 128;
pub const DISPLAY_NAME_LEN_MAX: usize = 100;
pub const REASON_LEN_MAX: usize = 500;

/// A platform user id: 1 to 128 characters of `[A-Za-z0-9_.-]`. The alphabet keeps ids
/// safe inside ledger account codes (`user:<id>:wallet:USD`) and log lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn parse(field: &str, raw: &str) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::invalid(field, "required"));
        }
        if raw.len() > USER_ID_LEN_MAX {
            return Err(Error::invalid(field, format!("at most {USER_ID_LEN_MAX} characters")));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(Error::invalid(field, "only letters, digits, '_', '.' and '-' are allowed"));
        }
        Ok(UserId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
}

/// A display name or reason: bounded, no control characters.
pub fn parse_text(field: &str, raw: &str, len_max: usize, required: bool) -> Result<String> {
    if required && raw.trim().is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if raw.chars().count() > len_max {
        return Err(Error::invalid(field, format!("at most {len_max} characters")));
    }
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid(field, "control characters are not allowed"));
    }
    if let Some(c) = spoofing_char(raw) {
        return Err(Error::invalid(
            field,
            format!("invisible or direction-changing characters are not allowed (U+{:04X})", u32::from(c)),
        ));
    }
    Ok(raw.to_owned())
}

/// The first character that could make text in a chat bubble read other than it is:
/// a bidirectional embedding, override or isolate (which reorders what follows, so
/// "pay 100" can show as "pay 001"), a direction mark, or a zero-width or invisible
/// character (which hides text or splits a word a reader would match). A zero-width
/// joiner between two pictographs is allowed: it is how emoji such as 🏳️‍🌈 are built.
pub fn spoofing_char(text: &str) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    let pictograph =
        |c: char| matches!(u32::from(c), 0x2190..=0x2BFF | 0x1F000..=0x1FAFF | 0xFE0F) && !c.is_alphanumeric();
    chars.iter().enumerate().find_map(|(i, &c)| {
        let forbidden = match u32::from(c) {
            // Embeddings and overrides, isolates, marks.
            0x202A..=0x202E | 0x2066..=0x2069 | 0x200E | 0x200F | 0x061C => true,
            // Zero-width space and non-joiner, word joiner and invisible operators,
            // zero-width no-break space, Mongolian vowel separator, soft hyphen,
            // Hangul fillers.
            0x200B | 0x200C | 0x2060..=0x2064 | 0xFEFF | 0x180E | 0x00AD | 0x115F | 0x1160 | 0x3164 | 0xFFA0 => true,
            // Combining grapheme joiner, line and paragraph separators.
            0x034F | 0x2028 | 0x2029 => true,
            // Tags are invisible; they belong only in a flag's tag sequence (🏴 then
            // tags, as in the flags of England or Scotland).
            0xE0000..=0xE007F => {
                let before = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
                !before.is_some_and(|b| b == '\u{1F3F4}' || matches!(u32::from(b), 0xE0020..=0xE007E))
            }
            0x200D => {
                let before = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
                let after = chars.get(i + 1).copied();
                !(before.is_some_and(pictograph) && after.is_some_and(pictograph))
            }
            _ => false,
        };
        forbidden.then_some(c)
    })
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    user_id: String,
    display_name: String,
    tier: String,
    status: String,
    created_at_us: i64,
}

impl TryFrom<AccountRow> for Account {
    type Error = Error;
    fn try_from(row: AccountRow) -> Result<Self> {
        Ok(Account {
            user_id: UserId(row.user_id),
            display_name: row.display_name,
            tier: Tier::from_db(&row.tier)?,
            status: Status::from_db(&row.status)?,
            created_at_us: row.created_at_us,
        })
    }
}

const SELECT_ACCOUNT: &str =
    "SELECT user_id, display_name, tier, status, created_at_us FROM accounts WHERE user_id = $1";

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
}

impl Accounts {
    /// Reads and writes on `db`.
    pub fn new(db: Db) -> Self {
        Accounts { writer: db.clone(), db }
    }

    /// Reads on `db`, writes on `writer`. No write holds its connection while it waits
    /// for anything but the database, so sharing the engine's pool cannot deadlock.
    pub fn with_writer(db: Db, writer: Db) -> Self {
        Accounts { db, writer }
    }

    pub async fn get(&self, user_id: &UserId) -> Result<Option<Account>> {
        let row: Option<AccountRow> = with_db!(&self.db, pool => sqlx::query_as(SELECT_ACCOUNT)
            .bind(user_id.as_str())
            .fetch_optional(pool)
            .await)?;
        row.map(Account::try_from).transpose()
    }

    /// Returns the account, creating it unverified and active on first use.
    pub async fn ensure(&self, user_id: &UserId) -> Result<Account> {
        let now = now_us();
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
        let now = now_us();
        let tier_new = tier.map(Tier::as_str);
        let row: AccountRow = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query_as(
                "INSERT INTO accounts (user_id, display_name, tier, status, created_at_us, updated_at_us) \
                 VALUES ($1, $2, COALESCE($3, 'unverified'), 'active', $4, $4) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                   display_name = CASE WHEN excluded.display_name = '' THEN accounts.display_name \
                                       ELSE excluded.display_name END, \
                   tier = COALESCE($3, accounts.tier), \
                   updated_at_us = excluded.updated_at_us \
                 RETURNING user_id, display_name, tier, status, created_at_us",
            )
            .bind(user_id.as_str())
            .bind(display_name)
            .bind(tier_new)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let detail = format!("tier={}", tier_new.unwrap_or("unchanged"));
            sqlx::query("INSERT INTO audit_log (actor, action, target, reason, at_us) VALUES ($1, 'account.upsert', $2, $3, $4)")
                .bind(actor)
                .bind(format!("account:{user_id}"))
                .bind(detail)
                .bind(now)
                .execute(&mut *tx)
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
        let now = now_us();
        let action = match status {
            Status::Frozen => "account.freeze",
            Status::Active => "account.unfreeze",
        };
        let row: AccountRow = with_db!(&self.writer, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query_as(
                "UPDATE accounts SET status = $2, updated_at_us = $3 WHERE user_id = $1 \
                 RETURNING user_id, display_name, tier, status, created_at_us",
            )
            .bind(user_id.as_str())
            .bind(status.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO audit_log (actor, action, target, reason, at_us) VALUES ($1, $2, $3, $4, $5)")
                .bind(actor)
                .bind(action)
                .bind(format!("account:{user_id}"))
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        Account::try_from(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoofing_characters_are_refused_and_emoji_kept() {
        for bad in [
            "pay \u{202E}001",
            "a\u{2066}b",
            "zero\u{200B}width",
            "a\u{200D}b",
            "\u{FEFF}x",
            "l\u{200F}r",
            "x\u{00AD}y",
        ] {
            let err = parse_text("note", bad, 280, false).unwrap_err();
            assert!(err.to_string().contains("note"), "{bad:?}: {err}");
        }
        for bad in ["a\u{E0041}", "x\u{2028}y", "c\u{034F}d"] {
            assert!(parse_text("note", bad, 280, false).is_err(), "{bad:?}");
        }
        let scotland = "\u{1F3F4}\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}";
        for good in ["lunch 🍕", "🏳️\u{200D}🌈", "👨\u{200D}👩\u{200D}👧", "café", "שלום", "مرحبا", "日本語", scotland]
        {
            assert!(parse_text("note", good, 280, false).is_ok(), "{good:?}");
        }
    }

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
        let accounts = Accounts::with_writer(db.clone(), writer.clone());
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

    #[test]
    fn text_rejects_control_characters_and_length() {
        assert!(parse_text("reason", "fraud\n", 10, true).is_err());
        assert!(parse_text("reason", "  ", 10, true).is_err());
        assert!(parse_text("reason", &"é".repeat(11), 10, true).is_err());
        assert_eq!(parse_text("reason", "é".repeat(10).as_str(), 10, true).unwrap(), "é".repeat(10));
    }
}
