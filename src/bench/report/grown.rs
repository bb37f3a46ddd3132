//! The grown-database run of `make bench` (PostgreSQL): the database is filled with at
//! least `grown_payments` payments by the load generator itself, analyzed as
//! production's autovacuum would, and then the same uniform runs as on a fresh database
//! are measured, with what a payment costs on disk and how fast `ExportEntries` streams
//! the whole journal.

use std::time::{Duration, Instant};

use super::{payments_run, ReportOptions, Run, Server};
use crate::api::pb;
use crate::bench::payments::{self, Scenario};
use crate::config::Config;
use crate::store::Db;

/// The unmeasured growing runs are this long each, so progress shows between them.
const GROW_RUN: Duration = Duration::from_secs(60);
/// At most this many growing runs: a server slower than about 300 payments/s does not
/// keep `make bench` busy for hours.
const GROW_RUNS_MAX: u32 = 60;

/// The tables a payment writes to, whose size on disk (rows and indexes) is what it
/// costs.
const PAYMENT_TABLES: &[&str] = &["payments", "payment_events", "ledger_entries", "ledger_postings"];

pub(super) struct Grown {
    /// Payments in the database when the measured runs started.
    pub payments: i64,
    pub runs: Vec<Run>,
    /// Bytes on disk per payment, table and indexes, by table, after the measured runs.
    pub bytes_per_payment: Vec<(&'static str, i64)>,
    pub export: Option<ExportRate>,
}

pub(super) struct ExportRate {
    pub postings: i64,
    pub seconds: f64,
    /// Postings per second over the first and the last tenth of the export: a page that
    /// costs more the further it is shows as the second falling below the first.
    pub first_tenth_per_s: f64,
    pub last_tenth_per_s: f64,
}

impl ExportRate {
    pub fn per_s(&self) -> f64 {
        self.postings as f64 / self.seconds.max(1e-9)
    }
}

/// Grows the database at `url` to `options.grown_payments` payments, then measures.
pub(super) async fn run(config: &Config, options: &ReportOptions, url: &str) -> anyhow::Result<Grown> {
    let db = Db::connect_url(url, 2, Duration::from_secs(30)).await?;
    let result = grow_and_measure(config, options, url, &db).await;
    db.close().await;
    result
}

async fn grow_and_measure(config: &Config, options: &ReportOptions, url: &str, db: &Db) -> anyhow::Result<Grown> {
    let clients = options.clients.iter().copied().max().unwrap_or(256);
    let server = Server::start(url).await?;
    let grown = async {
        let mut runs = 0;
        loop {
            let have = payments_count(db).await?;
            if have >= options.grown_payments {
                break;
            }
            anyhow::ensure!(
                runs < GROW_RUNS_MAX,
                "the database grew to only {have} payments in {GROW_RUNS_MAX} runs of {GROW_RUN:?}"
            );
            eprintln!("== postgres, growing: {have} of {} payments", options.grown_payments);
            payments::run(
                config,
                payments::Options {
                    addr: server.addr.clone(),
                    clients,
                    duration: GROW_RUN,
                    scenario: Scenario::Uniform,
                    users: options.users,
                    server_pid: None,
                },
            )
            .await?;
            runs += 1;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    server.stop().await;
    grown?;
    // What autovacuum does on a production server after this much growth; the
    // benchmark's PostgreSQL runs without it.
    analyze(db).await?;
    let payments = payments_count(db).await?;

    let mut runs = Vec::new();
    for &clients in &options.clients {
        eprintln!("== postgres, grown to {payments} payments: uniform with {clients} clients");
        let (run, _rss) = payments_run(config, options, url, Scenario::Uniform, clients).await?;
        runs.push(run);
    }
    let bytes_per_payment = bytes_per_payment(db).await?;
    eprintln!("== postgres, grown: the whole export");
    let server = Server::start(url).await?;
    let export = export_rate(config, &server.addr).await;
    server.stop().await;
    Ok(Grown { payments, runs, bytes_per_payment, export: Some(export?) })
}

async fn payments_count(db: &Db) -> anyhow::Result<i64> {
    let Db::Postgres(pool) = db else { anyhow::bail!("the grown-database run is PostgreSQL's") };
    // The planner's estimate would do for the loop, but the report states the count.
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM payments").fetch_one(pool).await?)
}

async fn analyze(db: &Db) -> anyhow::Result<()> {
    let Db::Postgres(pool) = db else { return Ok(()) };
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

async fn bytes_per_payment(db: &Db) -> anyhow::Result<Vec<(&'static str, i64)>> {
    let Db::Postgres(pool) = db else { anyhow::bail!("the grown-database run is PostgreSQL's") };
    let payments = payments_count(db).await?.max(1);
    let mut out = Vec::with_capacity(PAYMENT_TABLES.len());
    for table in PAYMENT_TABLES {
        let bytes: i64 =
            sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)").bind(*table).fetch_one(pool).await?;
        out.push((*table, bytes / payments));
    }
    Ok(out)
}

/// The whole journal through `Finance.ExportEntries`, as `dmpay finance export` reads
/// it, timed by tenths.
async fn export_rate(config: &Config, addr: &str) -> anyhow::Result<ExportRate> {
    let token = crate::auth::mint_dev_token(&config.jwt(), "bench-finance", "finance", Duration::from_secs(3600))?;
    let channel = tonic::transport::Channel::from_shared(addr.to_owned())?.connect().await?;
    let mut client = pb::finance_client::FinanceClient::new(channel).max_decoding_message_size(4 << 20);
    let mut request =
        tonic::Request::new(pb::ExportEntriesRequest { format: pb::ExportFormat::Csv as i32, ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let started = Instant::now();
    let mut stream = client.export_entries(request).await?.into_inner();
    // (seconds since the start, postings so far) after each chunk.
    let mut marks: Vec<(f64, i64)> = Vec::new();
    let mut postings = 0i64;
    while let Some(chunk) = stream.message().await? {
        postings += chunk.rows;
        marks.push((started.elapsed().as_secs_f64(), postings));
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate_between = |from: i64, to: i64| {
        let at = |n: i64| marks.iter().find(|(_, p)| *p >= n).map_or(seconds, |(t, _)| *t);
        let (t0, t1) = (if from == 0 { 0.0 } else { at(from) }, at(to));
        (to - from) as f64 / (t1 - t0).max(1e-9)
    };
    let tenth = postings / 10;
    Ok(ExportRate {
        postings,
        seconds,
        first_tenth_per_s: rate_between(0, tenth),
        last_tenth_per_s: rate_between(postings - tenth, postings),
    })
}
