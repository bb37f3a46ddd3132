//! The SQLite backend's side of `store`: how its pools are opened (WAL, durable
//! commits, the engine's page cache), the background checkpointer, the posting
//! engine's log restarts between batches (`SqliteWal`), and the database file's
//! permissions.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::ConnectOptions;

use super::PoolRole;

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

/// Opens a pool on the SQLite database of `url`, creating the file and its folder when
/// missing, readable by their owner only.
pub(super) async fn connect(
    url: &str,
    pool_size: u32,
    acquire_timeout: Duration,
    role: PoolRole,
) -> anyhow::Result<SqlitePool> {
    let path = sqlite_path(url);
    if let Some(parent) = Path::new(path).parent() {
        if !parent.as_os_str().is_empty() && path != ":memory:" && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
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
    Ok(pool)
}

/// The background checkpointer (`Db::run_sqlite_checkpointer`), until the task is dropped.
pub(super) async fn run_checkpointer(pool: &SqlitePool) {
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

fn sqlite_path(url: &str) -> &str {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    rest.split('?').next().unwrap_or(rest)
}
