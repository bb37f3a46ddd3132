//! Storage: one `Db` handle over the two real backends, SQLite (embedded default) and
//! PostgreSQL (production), their migrations, and the mapping of driver errors.
//!
//! Queries are runtime queries written once where both dialects agree (`$1`
//! placeholders, `ON CONFLICT`, `RETURNING`, `CAST(.. AS BIGINT)`), and run on either
//! pool through `with_db!`, which type-checks the body once per backend. Times are
//! stored as i64 microseconds since the Unix epoch and money as i64 minor units in both
//! backends, so nothing depends on a dialect's date or decimal types.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::ConnectOptions;

use crate::config::Config;
use crate::error::Error;

pub static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// A connection pool on one of the two backends. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the backend's native pool. The body is compiled
/// once per backend, so one query text serves both where the dialects agree.
#[macro_export]
macro_rules! with_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Postgres($pool) => $body,
            $crate::store::Db::Sqlite($pool) => $body,
        }
    };
}

/// How long a statement may wait for SQLite's single write lock before failing as
/// UNAVAILABLE. Writes are short, so a long wait means something is stuck.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Db {
    /// Opens the pool described by `DMPAY_DATABASE_URL`. For SQLite the file and its
    /// folder are created when missing.
    pub async fn connect(config: &Config) -> anyhow::Result<Db> {
        Self::connect_url(config.database_url.expose_secret(), config.db_pool_size, config.db_acquire_timeout).await
    }

    pub async fn connect_url(url: &str, pool_size: u32, acquire_timeout: Duration) -> anyhow::Result<Db> {
        if url.starts_with("sqlite:") {
            let path = sqlite_path(url);
            if let Some(parent) = Path::new(path).parent() {
                if !parent.as_os_str().is_empty() && path != ":memory:" {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
                }
            }
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk before the caller hears "ok". The posting
                // engine commits many entries per fsync, so this costs little.
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .log_statements(tracing::log::LevelFilter::Trace)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
            let pool = SqlitePoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            // Options are parsed from the URL without formatting it anywhere, so the
            // password never reaches a log line.
            let options = PgConnectOptions::from_str(url)?
                .application_name("dmpay")
                .log_statements(tracing::log::LevelFilter::Trace)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
            let pool = PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await?;
            Ok(Db::Postgres(pool))
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Db::Postgres(pool) => POSTGRES_MIGRATOR.run(pool).await?,
            Db::Sqlite(pool) => SQLITE_MIGRATOR.run(pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Connections currently checked out of the pool.
    pub fn connections_in_use(&self) -> u32 {
        match self {
            Db::Postgres(p) => p.size().saturating_sub(p.num_idle() as u32),
            Db::Sqlite(p) => p.size().saturating_sub(p.num_idle() as u32),
        }
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), Error> {
        with_db!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()).map_err(Error::from))
    }

    pub async fn close(&self) {
        with_db!(self, pool => pool.close().await)
    }
}

fn sqlite_path(url: &str) -> &str {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    rest.split('?').next().unwrap_or(rest)
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    real.saturating_add(CLOCK_OFFSET_US.load(std::sync::atomic::Ordering::Relaxed))
}

/// Shifts this process's clock (see `now_us`), for tests that need events on other days.
/// Zero unless a test sets it; nothing in dmpay sets it.
static CLOCK_OFFSET_US: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

#[doc(hidden)]
pub fn set_clock_offset_for_tests(offset_us: i64) {
    CLOCK_OFFSET_US.store(offset_us, std::sync::atomic::Ordering::Relaxed);
}

/// Turns a driver error into a domain error: outages and lock contention the caller may
/// retry become UNAVAILABLE; everything else is INTERNAL (and is logged by the api layer).
pub fn classify(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            Error::Unavailable("database unavailable, retry later".into())
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: 40001 serialization failure, 40P01 deadlock, 08* connection,
            // 57P0* shutdown, 53* insufficient resources. SQLite: 5 BUSY, 6 LOCKED.
            let retryable = matches!(code.as_ref(), "40001" | "40P01" | "5" | "6" | "517" | "261")
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53");
            if retryable {
                Error::Unavailable("database busy or unavailable, retry later".into())
            } else {
                Error::Internal(err.into())
            }
        }
        _ => Error::Internal(err.into()),
    }
}

/// The SQLSTATE / SQLite code of a database error, if it is one.
pub fn db_code(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether the error is a unique-constraint violation (PostgreSQL 23505, SQLite 2067/1555).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(db_code(err).as_deref(), Some("23505" | "2067" | "1555"))
}
