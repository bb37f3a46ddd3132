//! `dmpay bench report`: the whole benchmark in one go, as `make bench` runs it.
//!
//! For each backend (PostgreSQL, then SQLite): the naive-SQL baseline of `dmpay bench
//! ledger` (one transaction per transfer, row locks), then, for the uniform and
//! livestream scenarios at each client count, a release server started as a child
//! process with its default settings, driven over gRPC by `dmpay bench payments`, with
//! the server's memory sampled throughout and the machine's CPU accounted for
//! (`bench::cpu`). Every run has a fresh database, except the grown-database run
//! (`grown`), which fills one with a million payments first. The figures, the ratios, where the CPU
//! went and the targets go into one Markdown report (BENCHMARKS.md) with a description
//! of the machine, so the file is regenerated, never typed.

mod grown;
mod render;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bench::ledger::{BenchOptions, BenchRow};
use crate::bench::payments::{self, Scenario};
use crate::config::Config;
use crate::store::{Db, PoolRole};

/// How long the started server may take to answer.
const SERVER_START_MAX: Duration = Duration::from_secs(30);

pub struct ReportOptions {
    /// A PostgreSQL URL whose user may create databases; `None` skips PostgreSQL.
    pub postgres_url: Option<String>,
    pub sqlite: bool,
    pub duration: Duration,
    pub naive_duration: Duration,
    pub clients: Vec<usize>,
    pub users: usize,
    pub out: PathBuf,
    /// PostgreSQL only: grow a database to at least this many payments and measure the
    /// uniform runs, bytes per payment and the export on it; 0 skips it.
    pub grown_payments: i64,
}

struct Run {
    scenario: Scenario,
    clients: usize,
    report: payments::Report,
    /// Payments per posting-engine batch in the server, from its metrics.
    batch_mean: Option<f64>,
}

struct Section {
    backend: &'static str,
    version: String,
    naive: Vec<BenchRow>,
    runs: Vec<Run>,
    /// The flash sales at each client count (`flash_run`): the first sale of a freshly
    /// started server, then a second sale on the same server (a new listing, new
    /// buyers), once the first has warmed it as a live server is warm when a stream's
    /// sale starts.
    flash: Vec<[crate::bench::flashsale::Report; 2]>,
    rss_peak_mib: f64,
    grown: Option<grown::Grown>,
}

pub async fn run(config: &Config, options: ReportOptions) -> anyhow::Result<String> {
    let mut sections = Vec::new();
    if let Some(url) = &options.postgres_url {
        sections.push(backend_section(config, &options, Backend::Postgres(url.clone())).await?);
    }
    if options.sqlite {
        sections.push(backend_section(config, &options, Backend::Sqlite).await?);
    }
    let markdown = render::render(&options, &sections);
    std::fs::write(&options.out, &markdown)?;
    Ok(markdown)
}

enum Backend {
    Postgres(String),
    Sqlite,
}

/// A fresh database for one backend, removed again by `drop_database`.
struct Scratch {
    url: String,
    admin: Option<(String, String)>,
    dir: Option<PathBuf>,
}

impl Scratch {
    async fn create(backend: &Backend) -> anyhow::Result<Scratch> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        match backend {
            Backend::Postgres(admin_url) => {
                let name = format!("dmpay_bench_{id}");
                let admin = sqlx::PgPool::connect(admin_url).await?;
                sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await?;
                admin.close().await;
                Ok(Scratch {
                    url: crate::store::with_database(admin_url, &name),
                    admin: Some((admin_url.clone(), name)),
                    dir: None,
                })
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("dmpay-bench-{id}"));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("dmpay.db").display());
                Ok(Scratch { url, admin: None, dir: Some(dir) })
            }
        }
    }

    async fn drop_database(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((admin_url, name)) = self.admin.take() {
            if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
                admin.close().await;
            }
        }
    }
}

/// One backend's figures. Every run (the baseline, and each scenario at each client
/// count) gets a fresh database and, for the payment runs, a freshly started server, so
/// no run pays for the rows an earlier one left behind.
async fn backend_section(config: &Config, options: &ReportOptions, backend: Backend) -> anyhow::Result<Section> {
    let name = match backend {
        Backend::Postgres(_) => "postgres",
        Backend::Sqlite => "sqlite",
    };
    eprintln!("== {name}: naive-SQL baseline ({} s per load)", options.naive_duration.as_secs());
    let mut scratch = Scratch::create(&backend).await?;
    let baseline = naive_baseline(config, options, &scratch.url).await;
    scratch.drop_database().await;
    let (version, naive) = baseline?;

    let mut runs = Vec::new();
    let mut rss_peak_mib: f64 = 0.0;
    for &clients in &options.clients {
        for scenario in [Scenario::Uniform, Scenario::Livestream] {
            eprintln!("== {name}: {} with {clients} clients", scenario.name());
            let mut scratch = Scratch::create(&backend).await?;
            let run = payments_run(config, options, &scratch.url, scenario, clients).await;
            scratch.drop_database().await;
            let (run, rss) = run?;
            rss_peak_mib = rss_peak_mib.max(rss);
            runs.push(run);
        }
    }
    let mut flash = Vec::new();
    for &clients in &options.clients {
        eprintln!("== {name}: flash sale with {clients} clients");
        let mut scratch = Scratch::create(&backend).await?;
        let run = flash_run(config, &scratch.url, clients).await;
        scratch.drop_database().await;
        let (sales, rss) = run?;
        rss_peak_mib = rss_peak_mib.max(rss);
        flash.push(sales);
    }
    let grown = match &backend {
        Backend::Postgres(_) if options.grown_payments > 0 => {
            eprintln!("== {name}: the grown database ({} payments)", options.grown_payments);
            let mut scratch = Scratch::create(&backend).await?;
            let grown = grown::run(config, options, &scratch.url).await;
            scratch.drop_database().await;
            Some(grown?)
        }
        _ => None,
    };
    Ok(Section { backend: name, version, naive, runs, flash, rss_peak_mib, grown })
}

async fn naive_baseline(
    config: &Config,
    options: &ReportOptions,
    url: &str,
) -> anyhow::Result<(String, Vec<BenchRow>)> {
    let clients = options.clients.first().copied().unwrap_or(64);
    let db = Db::connect_url(url, clients.min(90) as u32, Duration::from_secs(30)).await?;
    db.migrate().await?;
    let version = database_version(&db).await;
    let engine_db = Db::connect_role(url, 2, Duration::from_secs(30), PoolRole::Engine).await?;
    let naive = crate::bench::ledger::run(
        db.clone(),
        engine_db.clone(),
        BenchOptions {
            clients,
            duration: options.naive_duration,
            accounts: 1000,
            engine: config.engine.clone(),
            run_naive: true,
            run_engine: false,
        },
    )
    .await;
    engine_db.close().await;
    db.close().await;
    Ok((version, naive?.rows))
}

/// One scenario at one client count against a server started for it; returns the run
/// and the server's peak memory in MiB.
async fn payments_run(
    config: &Config,
    options: &ReportOptions,
    url: &str,
    scenario: Scenario,
    clients: usize,
) -> anyhow::Result<(Run, f64)> {
    let server = Server::start(url).await?;
    let outcome = async {
        let before = server.engine_counters().await;
        let report = payments::run(
            config,
            payments::Options {
                addr: server.addr.clone(),
                clients,
                duration: options.duration,
                scenario,
                users: options.users,
                server_pid: server.child.id(),
            },
        )
        .await?;
        eprint!("{}", report.table());
        let after = server.engine_counters().await;
        let batch_mean = match (before, after) {
            (Some((b0, c0)), Some((b1, c1))) if b1 > b0 => Some((c1 - c0) as f64 / (b1 - b0) as f64),
            _ => None,
        };
        Ok::<_, anyhow::Error>(Run { scenario, clients, report, batch_mean })
    }
    .await;
    let rss = server.rss_peak_mib();
    server.stop().await;
    Ok((outcome?, rss))
}

/// Units and buyers of the report's flash sale: 2,000 units, five buyers for each, so the
/// sale lasts long enough (about half a second) for its rate not to be its ramp-up.
pub(super) const FLASH_UNITS: usize = 2_000;
pub(super) const FLASH_BUYERS: usize = 10_000;

/// The flash sale at one client count against a server started for it, twice: the
/// first sale of the fresh process, then a second one (a new listing, new buyers).
/// The first pays for the process's warm-up (each connection's first statements, the
/// engine's first plans of the purchase statements) inside a sale of about half a
/// second; the second is a sale on a server that is already running, as a stream's
/// sale meets it.
async fn flash_run(
    config: &Config,
    url: &str,
    clients: usize,
) -> anyhow::Result<([crate::bench::flashsale::Report; 2], f64)> {
    let server = Server::start(url).await?;
    let options = crate::bench::flashsale::Options {
        addr: server.addr.clone(),
        clients,
        buyers: FLASH_BUYERS,
        units: FLASH_UNITS,
        server_pid: server.child.id(),
    };
    let outcome = async {
        let first = crate::bench::flashsale::run(config, options.clone()).await?;
        eprint!("{}", first.table());
        let second = crate::bench::flashsale::run(config, options).await?;
        eprint!("{}", second.table());
        Ok::<_, anyhow::Error>([first, second])
    }
    .await;
    let rss = server.rss_peak_mib();
    server.stop().await;
    Ok((outcome?, rss))
}

async fn database_version(db: &Db) -> String {
    let v: Result<String, _> = match db {
        Db::Postgres(p) => sqlx::query_scalar("SELECT version()").fetch_one(p).await,
        Db::Sqlite(p) => sqlx::query_scalar("SELECT 'SQLite ' || sqlite_version()").fetch_one(p).await,
    };
    v.unwrap_or_else(|_| "unknown".into())
}

/// A release server started as a child process with its default settings, on a free
/// port, its memory sampled every 100 ms until it stops.
struct Server {
    child: tokio::process::Child,
    addr: String,
    metrics_port: u16,
    rss_peak_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(url: &str) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::env::temp_dir().join(format!("dmpay-bench-server-{port}.log"));
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .env("DMPAY_ENV", "development")
            .env("DMPAY_DATABASE_URL", url)
            .env("DMPAY_GRPC_ADDR", format!("127.0.0.1:{port}"))
            .env("DMPAY_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or_else(|| anyhow::anyhow!("the server exited at once; see {}", log.display()))?;
        let addr = format!("http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < SERVER_START_MAX,
                "the server did not listen within {SERVER_START_MAX:?}; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss_peak_kib = Arc::new(AtomicU64::new(0));
        let peak = rss_peak_kib.clone();
        let sampler = tokio::spawn(async move {
            loop {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Server { child, addr, metrics_port, rss_peak_kib, sampler })
    }

    /// The engine's (batches, commands) counters from the server's /metrics.
    async fn engine_counters(&self) -> Option<(u64, u64)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await.ok()?;
        socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.ok()?;
        let mut body = String::new();
        socket.read_to_string(&mut body).await.ok()?;
        Some((counter(&body, "dmpay_ledger_batches_total")?, counter(&body, "dmpay_ledger_commands_total")?))
    }

    fn rss_peak_mib(&self) -> f64 {
        self.rss_peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// SIGTERM (a graceful stop), then a kill if it takes longer than its grace.
    async fn stop(mut self) {
        self.sampler.abort();
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(crate::server::SHUTDOWN_GRACE * 2, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// A counter without labels from a Prometheus text exposition. prometheus-client writes
/// every value as a float (`12.0`).
fn counter(body: &str, name: &str) -> Option<u64> {
    let line = body.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    let value: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value as u64)
}

/// Resident memory of a process, from /proc (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_read_from_the_exposition_as_the_server_writes_it() {
        let body = "# HELP dmpay_ledger_batches_total Posting-engine batch transactions\n\
                    # TYPE dmpay_ledger_batches_total counter\n\
                    dmpay_ledger_batches_total 1234.0\n\
                    dmpay_ledger_batches_total_other 9.0\n\
                    dmpay_ledger_commands_total 56789.0\n";
        assert_eq!(super::counter(body, "dmpay_ledger_batches_total"), Some(1234));
        assert_eq!(super::counter(body, "dmpay_ledger_commands_total"), Some(56789));
        assert_eq!(super::counter(body, "dmpay_missing_total"), None);
    }
}
