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
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
use sqlx::ConnectOptions;

use crate::kernel::error::Error;

mod sqlite;

pub use sqlite::{owner_only, SqliteWal};

pub static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Where the database is and how its pool behaves (`DMPAY_DATABASE_URL`,
/// `DMPAY_DB_POOL_SIZE`, `DMPAY_DB_ACQUIRE_TIMEOUT`).
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `sqlite://PATH` or `postgres://...`; a secret, since it may carry a password.
    pub url: secrecy::SecretString,
    pub pool_size: u32,
    pub acquire_timeout: Duration,
}

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

/// A PostgreSQL connection idle in its pool for at least this long is tested (a round
/// trip) before it is handed out; one used more recently is handed out as it is, as
/// HikariCP does within its `aliveBypassWindowMs` (500 ms). sqlx's default tests every
/// connection on every acquire: under load that is a round trip on each posting-engine
/// batch's one-at-a-time path on a hot account, and 7% of the server's CPU in a flash
/// sale. A connection dropped by PostgreSQL (a restart, a failover) is found by the
/// test once it has sat here this long; one met sooner fails the one call that takes it
/// with UNAVAILABLE (retried with its key) and is closed when it returns to the pool,
/// where sqlx tests every connection.
pub const CONNECTION_TEST_IDLE_MIN: Duration = Duration::from_millis(500);

/// What a pool's connections are for, which decides their PostgreSQL session settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolRole {
    /// Reads and the non-batched writes. Plans are made for each execution
    /// (`plan_cache_mode = force_custom_plan`): a generic plan cached while a table was
    /// nearly empty (a sequential scan is cheapest then) would otherwise be kept by the
    /// connection until the table is analyzed, and scan the whole table on every call
    /// once it has grown. Planning a point query costs tens of microseconds.
    General,
    /// The posting engine's batch transactions. Every statement they run is a keyed
    /// probe, insert or update, for which an index scan is always right, so sequential
    /// scans are ruled out (`enable_seqscan = off`) and generic plans stay cheap and
    /// safe however small a table was when they were made. For the same reason no plan
    /// may be parallel (`max_parallel_workers_per_gather = 0`): once the tables had
    /// grown, the payments' rules read was planned as a parallel append, and starting
    /// two worker processes for it made it take 14 ms instead of about 4, on the path
    /// that runs one batch at a time on a live stream's seller. A pool of its own also
    /// keeps ledger writes from waiting behind a burst of reads for a connection.
    Engine,
}

impl Db {
    /// Opens the pool described by `DMPAY_DATABASE_URL`. For SQLite the file and its
    /// folder are created when missing.
    pub async fn connect(settings: &StoreSettings) -> anyhow::Result<Db> {
        Self::connect_url(settings.url.expose_secret(), settings.pool_size, settings.acquire_timeout).await
    }

    /// The posting engine's own pool: one connection per worker and one spare. On
    /// SQLite, one connection for its one worker: every batch then finds that
    /// connection's page cache warm, where alternating connections would each see the
    /// other's commits as a changed file and drop their caches.
    pub async fn connect_engine(settings: &StoreSettings, engine_workers: usize) -> anyhow::Result<Db> {
        let url = settings.url.expose_secret();
        let size =
            if url.starts_with("sqlite:") { 1 } else { u32::try_from(engine_workers).unwrap_or(64).saturating_add(1) };
        Self::connect_role(url, size, settings.acquire_timeout, PoolRole::Engine).await
    }

    pub async fn connect_url(url: &str, pool_size: u32, acquire_timeout: Duration) -> anyhow::Result<Db> {
        Self::connect_role(url, pool_size, acquire_timeout, PoolRole::General).await
    }

    pub async fn connect_role(
        url: &str,
        pool_size: u32,
        acquire_timeout: Duration,
        role: PoolRole,
    ) -> anyhow::Result<Db> {
        if url.starts_with("sqlite:") {
            let pool = sqlite::connect(url, pool_size, acquire_timeout, role).await?;
            Ok(Db::Sqlite(pool))
        } else {
            // Options are parsed from the URL without formatting it anywhere, so the
            // password never reaches a log line.
            let settings: &[(&str, &str)] = match role {
                PoolRole::General => &[("plan_cache_mode", "force_custom_plan")],
                PoolRole::Engine => &[("enable_seqscan", "off"), ("max_parallel_workers_per_gather", "0")],
            };
            let options = PgConnectOptions::from_str(url)?
                .application_name(match role {
                    PoolRole::General => "dmpay",
                    PoolRole::Engine => "dmpay-engine",
                })
                .options(settings.iter().copied())
                .log_statements(tracing::log::LevelFilter::Trace)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
            let pool = PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(acquire_timeout)
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= CONNECTION_TEST_IDLE_MIN {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
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

    /// On SQLite, copies the write-ahead log back into the database file in the
    /// background until the task is dropped (nothing to do on PostgreSQL). Connections
    /// never checkpoint on their own (`wal_autocheckpoint = 0`): SQLite would otherwise
    /// run each checkpoint inside a commit of the posting engine, holding its batch for
    /// as long as the copy and its fsync take. A passive checkpoint here runs beside the
    /// writer; should the log still grow past `SQLITE_WAL_PAGES_MAX` (readers holding
    /// old snapshots), a truncating one makes the writer wait once instead.
    pub async fn run_sqlite_checkpointer(&self) {
        let Db::Sqlite(pool) = self else { return };
        sqlite::run_checkpointer(pool).await
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), Error> {
        with_db!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()).map_err(Error::from))
    }

    pub async fn close(&self) {
        with_db!(self, pool => pool.close().await)
    }
}

/// Creates (or truncates) a file for data dmpay writes out (a settlement report, an
/// export), readable by its owner only.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

impl Db {
    /// The statement that opens a transaction whose reads decide its writes (a limit
    /// counted, then consumed). On SQLite `BEGIN IMMEDIATE` takes the database's one write
    /// lock at once, so no commit of another connection can come between the reads and
    /// the writes (a deferred transaction would instead fail with SQLITE_BUSY_SNAPSHOT
    /// when it first wrote after such a commit). On PostgreSQL a plain `BEGIN`: the
    /// transaction locks the row its decision hangs on itself (`lock_user_sql`).
    pub fn begin_deciding_sql(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "BEGIN",
            Db::Sqlite(_) => "BEGIN IMMEDIATE",
        }
    }

    /// A statement that locks platform account `$1` until the transaction ends, so that
    /// one user's limit checks take turns: `SELECT ... FOR UPDATE` on PostgreSQL; on
    /// SQLite none is needed (`begin_deciding_sql` holds the whole database), and a
    /// harmless read stands in.
    pub fn lock_user_sql(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "SELECT user_id FROM accounts WHERE user_id = $1 FOR UPDATE",
            Db::Sqlite(_) => "SELECT user_id FROM accounts WHERE user_id = $1",
        }
    }
}

/// Appends `value` to a PostgreSQL statement's parameters and returns its placeholder,
/// `$n`: for statements put together from steps (common table expressions), each step
/// binding its own parameters.
pub fn bind_pg<'q, T>(args: &mut sqlx::postgres::PgArguments, value: T) -> Result<String, sqlx::error::BoxDynError>
where
    T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    sqlx::Arguments::add(args, value)?;
    Ok(format!("${}", sqlx::Arguments::len(args)))
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

/// A JSON array of rows, bound as one parameter and read back with `json_each`: one
/// statement text whatever the batch size, so SQLite prepares it once per connection.
/// (A multi-row `VALUES` list has a different text for every row count; with batch sizes
/// varying from 1 to hundreds, its prepared statements never stayed in the cache.)
pub fn json_rows<T: serde::Serialize>(rows: &[T]) -> Result<String, sqlx::Error> {
    serde_json::to_string(rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Reads back rows that SQLite returned as one JSON array of arrays
/// (`json_group_array(json_array(...))`): one row handed over by SQLite's thread instead
/// of one per row.
pub fn from_json_rows<T: serde::de::DeserializeOwned>(json: &str) -> Result<Vec<T>, sqlx::Error> {
    serde_json::from_str(json).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Replaces the database name of a PostgreSQL URL, keeping its query string.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..].find('/').map_or(base.len(), |i| i + scheme_end);
    let mut out = format!("{}/{}", &base[..host_end], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced_keeping_the_query() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}
