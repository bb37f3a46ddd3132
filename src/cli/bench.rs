//! `dmpay bench payments|report|ledger`.

use std::time::Duration;

use super::args::BenchCommand;
use crate::config::Config;
use crate::store::Db;

pub(super) async fn run(config: Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Payments { addr, clients, duration, scenario, users, units, json, server_pid } => {
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            let scenario = crate::bench::payments::Scenario::parse(&scenario)?;
            if scenario == crate::bench::payments::Scenario::Flashsale {
                let buyers = users.unwrap_or(5000);
                anyhow::ensure!((2..=100_000).contains(&buyers), "--users must be 2 to 100000");
                anyhow::ensure!((1..buyers).contains(&units), "--units must be 1 to fewer than --users");
                let options = crate::bench::flashsale::Options { addr, clients, buyers, units, server_pid };
                let report = crate::bench::flashsale::run(&config, options).await?;
                print!("{}", report.table());
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
                }
                anyhow::ensure!(report.ok(), "the flash sale's outcome is wrong (see the checks above)");
                return Ok(());
            }
            let users = users.unwrap_or(1000);
            anyhow::ensure!((2..=100_000).contains(&users), "--users must be 2 to 100000");
            let options = crate::bench::payments::Options { addr, clients, duration, scenario, users, server_pid };
            let report = crate::bench::payments::run(&config, options).await?;
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
        }
        BenchCommand::Report {
            postgres_url,
            no_sqlite,
            duration,
            naive_duration,
            clients,
            users,
            out,
            grown_payments,
        } => {
            let clients = client_counts(&clients, 4096)?;
            anyhow::ensure!((2..=100_000).contains(&users), "--users must be 2 to 100000");
            let options = crate::bench::report::ReportOptions {
                postgres_url: (postgres_url != "off").then_some(postgres_url),
                sqlite: !no_sqlite,
                duration,
                naive_duration,
                clients,
                users,
                out,
                grown_payments: grown_payments.max(0),
            };
            let markdown = crate::bench::report::run(&config, options).await?;
            print!("{markdown}");
            Ok(())
        }
        BenchCommand::Ledger { clients, duration, accounts, modes, json } => {
            ledger(config, &clients, duration, accounts, &modes, json).await
        }
    }
}

/// `--clients`: one count or a comma-separated list, each 1 to `max`.
fn client_counts(raw: &str, max: usize) -> anyhow::Result<Vec<usize>> {
    let clients: Vec<usize> = raw
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--clients is a number or a comma-separated list of numbers"))?;
    anyhow::ensure!(!clients.is_empty() && clients.iter().all(|c| (1..=max).contains(c)), "--clients: 1 to {max} each");
    Ok(clients)
}

async fn ledger(
    config: Config,
    clients: &str,
    duration: Duration,
    accounts: usize,
    modes: &str,
    json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    // The naive mode's lock waits are the point of the comparison, not news: keep sqlx's
    // slow-statement warnings out of the table (RUST_LOG still wins).
    crate::telemetry::init_logging_with(
        config.log_format,
        Some(std::env::var("RUST_LOG").as_deref().unwrap_or("warn,sqlx=error")),
    );
    let clients = client_counts(clients, 1024)?;
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
        let options = crate::bench::ledger::BenchOptions {
            clients,
            duration,
            accounts,
            engine: config.engine.clone(),
            run_naive: modes.contains(&"naive"),
            run_engine: modes.contains(&"engine"),
        };
        let report = crate::bench::ledger::run(db.clone(), engine_db.clone(), options).await?;
        println!("{}", report.table());
        reports.push(report);
    }
    engine_db.close().await;
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&reports)?)?;
    }
    db.close().await;
    Ok(())
}
