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
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::ConnectOptions;

use crate::kernel::error::Error;

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

/// How long a statement may wait for SQLite's single write lock before failing as
/// UNAVAILABLE. Writes are short, so a long wait means something is stuck.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the write-ahead log is copied back into the SQLite file.
const SQLITE_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Log pages not yet copied back beyond which the checkpointer truncates the log and
/// makes writers wait: 512 MiB at 2 KiB pages (1 GiB for a database made with 4 KiB
/// pages). Above `SQLITE_WAL_RESTART_BYTES`, so that in a burst the engine's restarts
/// keep the log short and this last resort stays unused.
const SQLITE_WAL_PAGES_MAX: i64 = 262_144;

/// Size of SQLite's write-ahead log file past which the posting engine has SQLite write
/// the log from its start again (`SqliteWal`): 256 MiB, a few seconds of a burst.
const SQLITE_WAL_RESTART_BYTES: u64 = 256 << 20;

/// Page size of a new SQLite database, in bytes. A batch dirties one page per row it
/// touches in most indexes (payments by sender and by recipient, postings by account,
/// events by party, ...), scattered over large trees, and SQLite writes each dirty page
/// in full to the log at commit: 2 KiB pages halve those bytes against the default
/// 4 KiB (measured: about 5-10% more payments/s under uniform load) for a slightly
/// deeper tree. Fixed when the database is created; an existing file keeps its own.
const SQLITE_PAGE_SIZE: u32 = 2048;

/// The page cache of each posting-engine connection on SQLite, in KiB (a negative
/// `cache_size` is KiB): 32 MiB, room for the hot index pages of a busy ledger while the
/// server stays far under its memory budget.
const SQLITE_ENGINE_CACHE_KIB: &str = "-32768";

/// Rows SQLite's thread may hand back ahead of the engine's reading them, per statement.
/// sqlx's default (50) is smaller than a batch's reads (a batch of 40 payments reads 81
/// account rows, then about 120 rows of payment rules), and each time it fills, SQLite's
/// thread stops until the engine's worker wakes and drains it: two or three extra
/// hand-offs per batch while the database's one writer sits idle. 2048 holds the largest
/// read of a full batch (`DMPAY_LEDGER_BATCH_SIZE_MAX` 256: 513 account rows; 256 keys,
/// 512 parties and their senders' spend), a few hundred KiB at most.
const SQLITE_ENGINE_ROW_BUFFER: usize = 2048;

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
            let path = sqlite_path(url);
            if let Some(parent) = Path::new(path).parent() {
                if !parent.as_os_str().is_empty() && path != ":memory:" && !parent.exists() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
                    // A folder dmpay made (./var by default) is its owner's only.
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                            .map_err(|e| anyhow::anyhow!("restricting {}: {e}", parent.display()))?;
                    }
                }
            }
            if path != ":memory:" && !path.is_empty() {
                owner_only(Path::new(path))?;
            }
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk before the caller hears "ok". The posting
                // engine commits many entries per fsync, so this costs little.
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                // Statement journals of multi-row statements in memory, not in a temporary
                // file created and deleted per statement.
                .page_size(SQLITE_PAGE_SIZE)
                .pragma("temp_store", "memory")
                // Checkpoints run in the background (`run_sqlite_checkpointer`), not in
                // the commit that happens to cross the threshold.
                .pragma("wal_autocheckpoint", "0")
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .log_statements(tracing::log::LevelFilter::Trace)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
            // The engine's connections touch every hot index page of the ledger and the
            // payments on each batch: a page cache of their own that holds them saves a
            // read system call per page (SQLite's default is 2 MiB per connection).
            let options = match role {
                PoolRole::Engine => {
                    options.pragma("cache_size", SQLITE_ENGINE_CACHE_KIB).row_buffer_size(SQLITE_ENGINE_ROW_BUFFER)
                }
                PoolRole::General => options,
            };
            let pool = SqlitePoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await?;
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
        let mut tick = tokio::time::interval(SQLITE_CHECKPOINT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // (busy, pages in the log, pages checkpointed)
            let passive: Result<(i64, i64, i64), sqlx::Error> =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(pool).await;
            match passive {
                Ok((_, log, done)) if log - done > SQLITE_WAL_PAGES_MAX => {
                    tracing::warn!(log_pages = log, checkpointed = done, "SQLite log too long; truncating it");
                    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(pool).await {
                        tracing::warn!(error = %e, "SQLite checkpoint failed; will retry");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed; will retry"),
            }
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

/// Keeps SQLite's write-ahead log from growing without bound; the posting engine's one
/// SQLite worker owns one and calls `between_batches` after each batch.
///
/// The background checkpointer copies the log back into the database file, but SQLite
/// writes the log from its beginning again only when a checkpoint has copied all of it
/// and no reader still uses it as the next write transaction begins. Under a steady
/// stream of batches that moment never comes: the log grew by 2.5 GB in 30 s of burst,
/// and would fill the disk in a long one. A RESTART checkpoint makes it come, but it
/// needs the write lock: from the checkpointer's connection it would poll for that
/// lock against the engine, which holds it nearly all the time, and stall for seconds.
/// The engine is the writer, so it asks between its batches, once the file has grown
/// past `SQLITE_WAL_RESTART_BYTES`, and again whenever the reused log outgrows the file
/// it had then. Most of the log is copied back already, so it costs tens of
/// milliseconds every few seconds of burst (measured: no change in payments/s or p99).
#[derive(Debug, Default)]
pub struct SqliteWal {
    /// Size of the log file at the last restart: the log is rewritten from its start
    /// inside it, so only growth past it means the log needs restarting again.
    restarted_at_bytes: u64,
    /// No new attempt before this, after one that found the log in use.
    retry_after: Option<std::time::Instant>,
    /// The log file's path, worked out on the first call.
    wal: Option<std::ffi::OsString>,
}

/// How long the engine leaves the log alone after a restart found it in use (a reader
/// on an older snapshot, or the background checkpointer at work).
const SQLITE_WAL_RESTART_RETRY: Duration = Duration::from_secs(1);

impl SqliteWal {
    pub async fn between_batches(&mut self, pool: &sqlx::SqlitePool) {
        if self.retry_after.is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        let wal = self.wal.get_or_insert_with(|| {
            let mut wal = pool.connect_options().get_filename().as_os_str().to_owned();
            wal.push("-wal");
            wal
        });
        // In-memory databases have no log file.
        let Ok(meta) = std::fs::metadata(&*wal) else { return };
        if meta.len() <= SQLITE_WAL_RESTART_BYTES.max(self.restarted_at_bytes) {
            return;
        }
        let started = std::time::Instant::now();
        let Ok(mut conn) = pool.acquire().await else { return };
        // Without waiting: a RESTART holds the write lock while it waits for readers of
        // the log, so with the usual busy timeout a long reader (a verification, an
        // export, a shell) would stop every write for seconds. If it cannot restart at
        // once it copies what it can, like a passive checkpoint, and says busy.
        let restart = async {
            sqlx::query("PRAGMA busy_timeout = 0").execute(&mut *conn).await?;
            let result =
                sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(RESTART)").fetch_one(&mut *conn).await;
            sqlx::query(&format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis()))
                .execute(&mut *conn)
                .await?;
            result
        };
        match restart.await {
            Ok((busy, log, done)) => {
                if busy == 0 {
                    self.restarted_at_bytes = meta.len();
                    self.retry_after = None;
                } else {
                    self.retry_after = Some(std::time::Instant::now() + SQLITE_WAL_RESTART_RETRY);
                }
                tracing::debug!(
                    busy,
                    log_pages = log,
                    checkpointed = done,
                    elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "SQLite log restart between batches"
                );
            }
            Err(e) => {
                // The connection may be left without its busy timeout: replace it.
                conn.close_on_drop();
                self.retry_after = Some(std::time::Instant::now() + SQLITE_WAL_RESTART_RETRY);
                tracing::warn!(error = %e, "SQLite log restart failed; will retry");
            }
        }
    }
}

/// Makes the SQLite database file readable and writable by its owner only (0600),
/// creating it so if missing, and tightens its write-ahead log and shared-memory files
/// if they exist. SQLite creates those with the database file's permissions, so they
/// follow. The file holds every card's ciphertext and every payment: nobody else on the
/// machine has a reason to read it.
pub fn owner_only(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let created = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path);
        created.map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| anyhow::anyhow!("restricting {}: {e}", file.display()))?;
            }
        }
    }
    Ok(())
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

fn sqlite_path(url: &str) -> &str {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    rest.split('?').next().unwrap_or(rest)
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
