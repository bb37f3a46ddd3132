//! `dmpay bench report`: the whole benchmark in one go, as `make bench` runs it.
//!
//! For each backend (PostgreSQL, then SQLite): the naive-SQL baseline of `dmpay bench
//! ledger` (one transaction per transfer, row locks), then, for the uniform and
//! livestream scenarios at each client count, a release server started as a child
//! process with its default settings, driven over gRPC by `dmpay bench payments`, with
//! the server's memory sampled throughout. Every run has a fresh database. The figures, the ratios
//! and the targets go into one Markdown report (BENCHMARKS.md) with a description of the
//! machine, so the file is regenerated, never typed.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bench_payments::{self, Scenario};
use crate::config::Config;
use crate::ledger::bench::{BenchOptions, BenchRow};
use crate::store::{Db, PoolRole};

/// The targets of issue 7, checked in the report.
const TARGET_UNIFORM_OVER_NAIVE: f64 = 3.0;
const TARGET_LIVESTREAM_OVER_UNIFORM: f64 = 0.9;
const TARGET_P99_MS_AT_256: f64 = 50.0;
const TARGET_RSS_MIB: f64 = 200.0;
const TARGET_SQLITE_UNIFORM: f64 = 5_000.0;
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
}

struct Run {
    scenario: Scenario,
    clients: usize,
    report: bench_payments::Report,
    /// Payments per posting-engine batch in the server, from its metrics.
    batch_mean: Option<f64>,
}

struct Section {
    backend: &'static str,
    version: String,
    naive: Vec<BenchRow>,
    runs: Vec<Run>,
    rss_peak_mib: f64,
}

pub async fn run(config: &Config, options: ReportOptions) -> anyhow::Result<String> {
    let mut sections = Vec::new();
    if let Some(url) = &options.postgres_url {
        sections.push(backend_section(config, &options, Backend::Postgres(url.clone())).await?);
    }
    if options.sqlite {
        sections.push(backend_section(config, &options, Backend::Sqlite).await?);
    }
    let markdown = render(&options, &sections);
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
    Ok(Section { backend: name, version, naive, runs, rss_peak_mib })
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
    let naive = crate::ledger::bench::run(
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
        let report = bench_payments::run(
            config,
            bench_payments::Options {
                addr: server.addr.clone(),
                clients,
                duration: options.duration,
                scenario,
                users: options.users,
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
        let value = |name: &str| {
            body.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        };
        Some((value("dmpay_ledger_batches_total ")?, value("dmpay_ledger_commands_total ")?))
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

/// Resident memory of a process, from /proc (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({model}), {mem_gib:.0} GiB memory, Linux {}", kernel.trim())
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

fn render(options: &ReportOptions, sections: &[Section]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# dmpay benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `make bench` (`dmpay bench report`) on {} UTC at commit `{}`; do not edit by hand.\n",
        crate::dates::rfc3339(crate::store::now_us()).chars().take(19).collect::<String>().replace('T', " "),
        commit()
    );
    let _ = writeln!(md, "- Machine: {}", machine());
    for s in sections {
        let _ = writeln!(md, "- {}: {}", s.backend, s.version);
    }
    let _ = writeln!(
        md,
        "- Load generator on the same machine, {} users, {} s per run; server started with its default \
         settings (durable commits, default logging); naive baseline {} s per load.\n",
        options.users,
        options.duration.as_secs(),
        options.naive_duration.as_secs()
    );
    let _ = writeln!(
        md,
        "The naive baseline is `dmpay bench ledger --modes naive`: each transfer is one transaction that \
         records its idempotency key, locks both balance rows, inserts the entry and two postings and \
         updates both balances (the same rows the engine writes), called in-process without gRPC. \
         The payment runs go through the whole real path: gRPC, JWT check, idempotency, limits, the \
         posting engine, the outbox, and commit to disk.\n"
    );
    for s in sections {
        let _ = writeln!(md, "## {}\n", s.backend);
        let rate =
            |rows: &[BenchRow], load: &str| rows.iter().find(|r| r.load == load).map_or(0.0, |r| r.entries_per_s);
        let naive_uniform = rate(&s.naive, "uniform");
        let _ = writeln!(
            md,
            "| run | clients | per second | x naive | p50 ms | p90 ms | p99 ms | max ms | batch mean | errors | ledger check |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for r in &s.naive {
            let _ = writeln!(
                md,
                "| naive SQL, {} | {} | {:.0} | {:.2} | {:.2} | | {:.2} | | | {} | |",
                r.load,
                options.clients.first().copied().unwrap_or(64),
                r.entries_per_s,
                r.entries_per_s / naive_uniform.max(1e-9),
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
        }
        for run in &s.runs {
            let r = &run.report;
            let errors = if r.errors.is_empty() {
                "none".to_owned()
            } else {
                r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            };
            let check = match (r.ledger_verified, r.seller_balance_ok) {
                (true, Some(true)) => "verify OK, seller balance matches",
                (true, None) => "verify OK",
                (true, Some(false)) => "verify OK, **seller balance differs**",
                (false, _) => "**verify FAILED**",
            };
            let _ = writeln!(
                md,
                "| SendPayment, {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                run.scenario.name(),
                run.clients,
                r.payments_per_s,
                r.payments_per_s / naive_uniform.max(1e-9),
                r.latency_ms_p50,
                r.latency_ms_p90,
                r.latency_ms_p99,
                r.latency_ms_max,
                run.batch_mean.map_or_else(String::new, |b| format!("{b:.1}")),
                errors,
                check
            );
        }
        let _ = writeln!(md, "\nServer memory (peak resident set during the runs): {:.1} MiB.\n", s.rss_peak_mib);
        let _ = writeln!(md, "| target | measured | |");
        let _ = writeln!(md, "|---|---|---|");
        let find = |scenario: Scenario, clients: usize| {
            s.runs.iter().find(|r| r.scenario == scenario && r.clients == clients).map(|r| &r.report)
        };
        for &clients in &options.clients {
            let (Some(u), Some(l)) = (find(Scenario::Uniform, clients), find(Scenario::Livestream, clients)) else {
                continue;
            };
            if s.backend == "postgres" {
                let ratio = u.payments_per_s / naive_uniform.max(1e-9);
                let _ = writeln!(
                    md,
                    "| uniform at {clients} clients >= {TARGET_UNIFORM_OVER_NAIVE:.0}x naive | {ratio:.2}x | {} |",
                    verdict(ratio >= TARGET_UNIFORM_OVER_NAIVE)
                );
            }
            let hot = l.payments_per_s / u.payments_per_s.max(1e-9);
            let _ = writeln!(
                md,
                "| livestream at {clients} clients >= {TARGET_LIVESTREAM_OVER_UNIFORM} x uniform | {hot:.2} | {} |",
                verdict(hot >= TARGET_LIVESTREAM_OVER_UNIFORM)
            );
            if s.backend == "sqlite" {
                let _ = writeln!(
                    md,
                    "| uniform at {clients} clients >= {TARGET_SQLITE_UNIFORM:.0}/s | {:.0}/s | {} |",
                    u.payments_per_s,
                    verdict(u.payments_per_s >= TARGET_SQLITE_UNIFORM)
                );
            }
        }
        if s.backend == "postgres" {
            if let Some(p99) =
                s.runs.iter().filter(|r| r.clients == 256).map(|r| r.report.latency_ms_p99).reduce(f64::max)
            {
                let _ = writeln!(
                    md,
                    "| p99 < {TARGET_P99_MS_AT_256:.0} ms at 256 clients | {p99:.2} ms | {} |",
                    verdict(p99 < TARGET_P99_MS_AT_256)
                );
            }
            let _ = writeln!(
                md,
                "| server memory < {TARGET_RSS_MIB:.0} MiB | {:.1} MiB | {} |",
                s.rss_peak_mib,
                verdict(s.rss_peak_mib < TARGET_RSS_MIB)
            );
        }
        let all_checked = s.runs.iter().all(|r| r.report.ledger_verified && r.report.seller_balance_ok != Some(false));
        let _ = writeln!(
            md,
            "| ledger check after every run | {} | {} |\n",
            if all_checked { "passed" } else { "failed" },
            verdict(all_checked)
        );
    }
    md
}
