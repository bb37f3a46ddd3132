//! The `dmpay` command line: `serve`, `migrate`, `token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::server::{shutdown_signal, Application};
use crate::store::Db;
use crate::telemetry::init_logging;

#[derive(Parser)]
#[command(name = "dmpay", version, about = "One-click payments inside direct messages")]
struct Cli {
    /// Optional TOML file with settings (environment variables win).
    #[arg(long, global = true, env = "DMPAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (migrates first).
    Serve,
    /// Run the database migrations and exit.
    Migrate,
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Books for finance staff (talks to a running server).
    Finance {
        /// Server address.
        #[arg(long, global = true, env = "DMPAY_ADDR", default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Bearer token with scope `finance` (in development a dev token is minted).
        #[arg(long, global = true, env = "DMPAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        command: FinanceCommand,
    },
    /// The built-in sandbox card processor.
    Processor {
        #[command(subcommand)]
        command: ProcessorCommand,
    },
    /// Card vault maintenance.
    Vault {
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Print a development token signed with the configured HS256 secret.
    Token {
        /// Subject: the user or service id.
        #[arg(long)]
        sub: String,
        /// Space-separated scopes, e.g. "payments:write payments:read methods:write".
        #[arg(long, default_value = "")]
        scope: String,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute every balance from postings, check every entry; exit 1 if anything is off.
    Verify,
}

#[derive(Subcommand)]
enum FinanceCommand {
    /// Every account's debits, credits and balance; exit 1 if the books do not balance.
    TrialBalance {
        /// YYYY-MM-DD (end of that UTC day) or an RFC 3339 time; default now.
        #[arg(long)]
        as_of: Option<String>,
        #[arg(long)]
        currency: Option<String>,
    },
    /// Recompute every balance from postings and check every entry; exit 1 if anything is off.
    Verify,
    /// Import a processor's settlement report and reconcile it; exit 1 if items stay open.
    Reconcile {
        #[arg(long, default_value = "sandbox")]
        processor: String,
        /// The report (CSV).
        #[arg(long)]
        file: PathBuf,
        /// YYYY-MM-DD; default the date of the report's first row.
        #[arg(long)]
        date: Option<String>,
    },
    /// The items of a reconciliation run; exit 1 if any is open.
    Items {
        #[arg(long)]
        run: String,
        /// matched, amount_mismatch, missing_in_ledger, missing_in_report, duplicate or open.
        #[arg(long)]
        status: Option<String>,
    },
    /// Resolve an unmatched item: an adjusting entry to suspense, or explained.
    Resolve {
        item: String,
        #[arg(long, conflicts_with = "explained", required_unless_present = "explained")]
        suspense: bool,
        #[arg(long)]
        explained: bool,
        /// Why (recorded with who resolved it).
        #[arg(long)]
        note: String,
    },
    /// A user's wallet statement: opening balance, movements, closing balance.
    Statement {
        user: String,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// YYYY-MM-DD or an RFC 3339 time; default the beginning.
        #[arg(long)]
        from: Option<String>,
        /// YYYY-MM-DD (exclusive) or an RFC 3339 time; default now.
        #[arg(long)]
        to: Option<String>,
    },
    /// Every posting of the entries created in [--from, --to), as CSV or JSON lines.
    Export {
        /// YYYY-MM-DD (start of that UTC day) or an RFC 3339 time; default the beginning.
        #[arg(long)]
        from: Option<String>,
        /// YYYY-MM-DD (start of that UTC day, exclusive) or an RFC 3339 time; default now.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl"])]
        format: String,
        /// Write to this file (progress goes to standard error); default standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ProcessorCommand {
    /// The sandbox's settlement report (CSV) of one UTC day, optionally with injected
    /// discrepancies to practise reconciliation.
    Report {
        /// YYYY-MM-DD.
        #[arg(long)]
        date: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Leave out data row N (1-based).
        #[arg(long)]
        drop_row: Option<usize>,
        /// Add 1.00 (one major unit) to the amount of data row N.
        #[arg(long)]
        change_row: Option<usize>,
        /// Append a row the ledger has never seen.
        #[arg(long)]
        extra_row: bool,
    },
}

#[derive(Subcommand)]
enum VaultCommand {
    /// Re-wrap every card's data key under DMPAY_VAULT_ACTIVE_KEK. Online and resumable:
    /// run it again after an interruption. Afterwards the old KEK can be removed from
    /// DMPAY_VAULT_KEKS.
    Rotate,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drive a running server over gRPC like chat clients and measure payments.
    Payments {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// uniform, livestream or mixed.
        #[arg(long, default_value = "uniform")]
        scenario: String,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The server's process id, when it runs on this machine: its CPU is then
        /// reported beside the load generator's and PostgreSQL's.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// The whole benchmark (what `make bench` runs): on fresh PostgreSQL and SQLite
    /// databases, the naive-SQL baseline and a started release server driven over gRPC
    /// (uniform and livestream at each client count), written to a Markdown report.
    Report {
        /// A PostgreSQL URL whose user may create databases; `off` skips PostgreSQL.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres_url: String,
        /// Skip SQLite.
        #[arg(long)]
        no_sqlite: bool,
        /// Length of each payments run.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Length of each naive-baseline load.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        naive_duration: Duration,
        /// Comma-separated client counts.
        #[arg(long, default_value = "64,256")]
        clients: String,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Where the report goes.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
    },
    /// The posting engine in-process against naive per-transfer transactions, on the
    /// configured database (use a scratch database: it writes benchmark accounts).
    Ledger {
        /// Concurrent clients: one count, or a comma-separated list to run the whole
        /// comparison at each (a live-stream burst is hundreds of payers at once).
        #[arg(long, default_value = "64,256")]
        clients: String,
        /// Length of each of the four runs.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Accounts for the uniform load.
        #[arg(long, default_value_t = 1000)]
        accounts: usize,
        /// Which modes to run: `naive`, `engine` or both (the ratios need both).
        #[arg(long, default_value = "naive,engine")]
        modes: String,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dmpay: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Token { sub, scope, ttl } => {
            crate::auth::mint_dev_token(&config, &sub, &scope, ttl).map(|token| println!("{token}"))
        }
        Command::Serve => run_async(async move {
            init_logging(config.log_format);
            let result = async {
                let app = Application::build(config).await?;
                app.run_until(shutdown_signal()).await
            }
            .await;
            // Buffered log lines out before the process ends (an error is printed by
            // the caller below).
            crate::telemetry::flush_logs();
            result
        }),
        Command::Ledger { command: LedgerCommand::Verify } => {
            return match run_async(async move { ledger_verify(&config).await }) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("dmpay: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Bench {
            command: BenchCommand::Payments { addr, clients, duration, scenario, users, json, server_pid },
        } => run_async(async move {
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            anyhow::ensure!((2..=100_000).contains(&users), "--users must be 2 to 100000");
            let scenario = crate::bench_payments::Scenario::parse(&scenario)?;
            let options = crate::bench_payments::Options { addr, clients, duration, scenario, users, server_pid };
            let report = crate::bench_payments::run(&config, options).await?;
            print!("{}", report.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
            anyhow::ensure!(report.ledger_verified, "the ledger did not verify after the run");
            anyhow::ensure!(
                report.seller_balance_ok != Some(false),
                "the seller's balance does not match what was paid"
            );
            Ok(())
        }),
        Command::Bench {
            command: BenchCommand::Report { postgres_url, no_sqlite, duration, naive_duration, clients, users, out },
        } => run_async(async move {
            let clients: Vec<usize> = clients
                .split(',')
                .map(|c| c.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--clients is a comma-separated list of numbers"))?;
            anyhow::ensure!(
                !clients.is_empty() && clients.iter().all(|c| (1..=4096).contains(c)),
                "--clients: 1 to 4096 each"
            );
            anyhow::ensure!((2..=100_000).contains(&users), "--users must be 2 to 100000");
            let options = crate::bench_report::ReportOptions {
                postgres_url: (postgres_url != "off").then_some(postgres_url),
                sqlite: !no_sqlite,
                duration,
                naive_duration,
                clients,
                users,
                out,
            };
            let markdown = crate::bench_report::run(&config, options).await?;
            print!("{markdown}");
            Ok(())
        }),
        Command::Bench { command: BenchCommand::Ledger { clients, duration, accounts, modes, json } } => {
            run_async(async move {
                // The naive mode's lock waits are the point of the comparison, not news: keep
                // sqlx's slow-statement warnings out of the table (RUST_LOG still wins).
                crate::telemetry::init_logging_with(
                    config.log_format,
                    Some(std::env::var("RUST_LOG").as_deref().unwrap_or("warn,sqlx=error")),
                );
                let clients: Vec<usize> = clients
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| anyhow::anyhow!("--clients is a number or a comma-separated list of numbers"))?;
                anyhow::ensure!(
                    !clients.is_empty() && clients.iter().all(|c| (1..=1024).contains(c)),
                    "--clients: 1 to 1024 each"
                );
                anyhow::ensure!((2..=1_000_000).contains(&accounts), "--accounts must be 2 to 1000000");
                let modes: Vec<&str> = modes.split(',').map(str::trim).collect();
                anyhow::ensure!(
                    !modes.is_empty() && modes.iter().all(|m| matches!(*m, "naive" | "engine")),
                    "--modes is a comma-separated list of naive and engine"
                );
                let url = secrecy::ExposeSecret::expose_secret(&config.database_url).to_owned();
                let pool_size = config.db_pool_size.max(clients.iter().copied().max().unwrap_or(64).min(90) as u32);
                let db = Db::connect_url(&url, pool_size, Duration::from_secs(30)).await?;
                db.migrate().await?;
                let engine_db = Db::connect_role(
                    &url,
                    u32::try_from(config.engine.workers).unwrap_or(64).saturating_add(1),
                    Duration::from_secs(30),
                    crate::store::PoolRole::Engine,
                )
                .await?;
                let mut reports = Vec::with_capacity(clients.len());
                for clients in clients {
                    let options = crate::ledger::bench::BenchOptions {
                        clients,
                        duration,
                        accounts,
                        engine: config.engine.clone(),
                        run_naive: modes.contains(&"naive"),
                        run_engine: modes.contains(&"engine"),
                    };
                    let report = crate::ledger::bench::run(db.clone(), engine_db.clone(), options).await?;
                    println!("{}", report.table());
                    reports.push(report);
                }
                engine_db.close().await;
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&reports)?)?;
                }
                db.close().await;
                Ok(())
            })
        }
        Command::Finance { addr, token, command } => {
            let conn = crate::cli_finance::Connection { addr, token };
            return match run_async(async move {
                match command {
                    FinanceCommand::TrialBalance { as_of, currency } => {
                        crate::cli_finance::trial_balance(&config, &conn, as_of.as_deref(), currency.as_deref()).await
                    }
                    FinanceCommand::Verify => crate::cli_finance::verify(&config, &conn).await,
                    FinanceCommand::Reconcile { processor, file, date } => {
                        crate::cli_finance::reconcile(&config, &conn, &processor, &file, date.as_deref()).await
                    }
                    FinanceCommand::Items { run, status } => {
                        crate::cli_finance::items(&config, &conn, &run, status.as_deref()).await
                    }
                    FinanceCommand::Resolve { item, suspense, explained: _, note } => {
                        crate::cli_finance::resolve(
                            &config,
                            &conn,
                            &item,
                            if suspense { "suspense" } else { "explained" },
                            &note,
                        )
                        .await
                    }
                    FinanceCommand::Statement { user, currency, from, to } => {
                        crate::cli_finance::statement(&config, &conn, &user, &currency, from.as_deref(), to.as_deref())
                            .await
                            .map(|()| true)
                    }
                    FinanceCommand::Export { from, to, format, out } => crate::cli_finance::export(
                        &config,
                        &conn,
                        from.as_deref(),
                        to.as_deref(),
                        &format,
                        out.as_deref(),
                    )
                    .await
                    .map(|()| true),
                }
            }) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("dmpay: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Processor { command: ProcessorCommand::Report { date, out, drop_row, change_row, extra_row } } => {
            run_async(async move {
                let db = Db::connect(&config).await?;
                db.migrate().await?;
                let sandbox = crate::processor::sandbox::Sandbox::new(db.clone(), config.sandbox.clone());
                let csv = crate::processor::CardProcessor::settlement_report(&sandbox, &date)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let csv =
                    crate::processor::sandbox::inject_discrepancies(&csv, drop_row, change_row, extra_row, &date)?;
                match out {
                    // The processor's settlement report: readable by its owner only.
                    Some(path) => {
                        use std::io::Write;
                        crate::store::create_private_file(&path)?.write_all(csv.as_bytes())?
                    }
                    None => print!("{csv}"),
                }
                db.close().await;
                Ok(())
            })
        }
        Command::Vault { command: VaultCommand::Rotate } => run_async(async move {
            init_logging(config.log_format);
            // Production must not re-wrap every card under the published development key.
            config.check_for_serving()?;
            let db = Db::connect(&config).await?;
            db.migrate().await?;
            let keys = std::sync::Arc::new(config.key_ring()?);
            let active = keys.active_kek().to_owned();
            let processor =
                std::sync::Arc::new(crate::processor::sandbox::Sandbox::new(db.clone(), config.sandbox.clone()));
            let vault = crate::vault::Vault::new(
                db.clone(),
                keys,
                processor,
                crate::accounts::Accounts::new(db.clone()),
                config.vault.clone(),
            );
            let n = vault.rotate("cli:vault-rotate").await?;
            println!("re-wrapped {n} data keys under KEK {active}; every card is now under it");
            db.close().await;
            Ok(())
        }),
        Command::Migrate => run_async(async move {
            init_logging(config.log_format);
            let db = Db::connect(&config).await?;
            db.migrate().await?;
            tracing::info!(backend = db.backend(), "migrations applied");
            db.close().await;
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmpay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn ledger_verify(config: &Config) -> anyhow::Result<bool> {
    let db = Db::connect(config).await?;
    let report = crate::ledger::verify::verify(&db).await?;
    println!("accounts checked: {}", report.accounts_checked);
    println!("entries checked:  {}", report.entries_checked);
    if report.ok() {
        println!("ledger OK: every balance matches its postings, every entry balances, no sequence gaps");
    } else {
        println!("{} problem(s):", report.problems.len());
        for p in &report.problems {
            println!(
                "  {:<18} account={} entry={} {}",
                p.kind,
                p.account_code.as_deref().unwrap_or("-"),
                p.entry_id.as_deref().unwrap_or("-"),
                p.detail
            );
        }
    }
    db.close().await;
    Ok(report.ok())
}

fn run_async<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(fut)
}
