//! The server and its maintenance: `serve`, `migrate`, `token`, `ledger verify`,
//! `processor report`, `vault rotate`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::server::{shutdown_signal, Application};
use crate::store::Db;
use crate::telemetry::init_logging;

/// `dmpay token`: a development token.
pub(super) fn token(config: &Config, sub: &str, scope: &str, ttl: Duration) -> anyhow::Result<()> {
    let token = crate::auth::mint_dev_token(&config.jwt(), sub, scope, ttl)?;
    println!("{token}");
    Ok(())
}

/// `dmpay protoset`: the descriptors reflection serves, as a file.
pub(super) fn protoset(out: &std::path::Path) -> anyhow::Result<()> {
    let bytes = crate::api::descriptors::protoset();
    std::fs::write(out, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}

/// `dmpay serve`: until SIGINT or SIGTERM.
pub(super) async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let result = async {
        let app = Application::build(config).await?;
        app.run_until(shutdown_signal()).await
    }
    .await;
    // Buffered log lines out before the process ends (an error is printed by the caller).
    crate::telemetry::flush_logs();
    result
}

/// `dmpay migrate`.
pub(super) async fn migrate(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let db = Db::connect(&config.store()).await?;
    db.migrate().await?;
    tracing::info!(backend = db.backend(), "migrations applied");
    db.close().await;
    Ok(())
}

/// `dmpay ledger verify`: true when the books are right.
pub(super) async fn ledger_verify(config: Config) -> anyhow::Result<bool> {
    let db = Db::connect(&config.store()).await?;
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

/// `dmpay processor report`: the sandbox's settlement CSV of a day.
pub(super) async fn processor_report(
    config: Config,
    date: String,
    out: Option<PathBuf>,
    drop_row: Option<usize>,
    change_row: Option<usize>,
    extra_row: bool,
) -> anyhow::Result<()> {
    let db = Db::connect(&config.store()).await?;
    db.migrate().await?;
    let sandbox = crate::processor::sandbox::Sandbox::new(
        db.clone(),
        config.sandbox.clone(),
        crate::kernel::clock::Clock::system(),
    );
    let csv = crate::processor::CardProcessor::settlement_report(&sandbox, &date)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let csv = crate::processor::sandbox::inject_discrepancies(&csv, drop_row, change_row, extra_row, &date)?;
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
}

/// `dmpay processor dispute open|decide`: a dispute in the sandbox, which the running
/// server hears of through the processor's notifications.
pub(super) async fn processor_dispute(
    config: Config,
    capture: Option<String>,
    decision: Option<(String, bool)>,
) -> anyhow::Result<()> {
    let db = Db::connect(&config.store()).await?;
    db.migrate().await?;
    let sandbox = crate::processor::sandbox::Sandbox::new(
        db.clone(),
        config.sandbox.clone(),
        crate::kernel::clock::Clock::system(),
    );
    let result = match (capture, decision) {
        (Some(capture), _) => sandbox.open_dispute(&capture).await.map(|reference| {
            println!("dispute {reference} opened on capture {capture}");
        }),
        (None, Some((dispute, won))) => sandbox.decide_dispute(&dispute, won).await.map(|()| {
            println!("dispute {dispute} {}", if won { "won" } else { "lost" });
        }),
        (None, None) => Ok(()),
    };
    db.close().await;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// `dmpay vault rotate`: every card's data key under the active KEK.
pub(super) async fn vault_rotate(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    // Production must not re-wrap every card under the published development key.
    config.check_for_serving()?;
    let db = Db::connect(&config.store()).await?;
    db.migrate().await?;
    let keys = Arc::new(config.key_ring()?);
    let active = keys.active_kek().to_owned();
    let processor = Arc::new(crate::processor::sandbox::Sandbox::new(
        db.clone(),
        config.sandbox.clone(),
        crate::kernel::clock::Clock::system(),
    ));
    let vault = crate::vault::Vault::new(
        db.clone(),
        keys,
        processor,
        crate::accounts::Accounts::new(db.clone(), crate::kernel::clock::Clock::system()),
        config.vault.clone(),
    );
    let n = vault.rotate("cli:vault-rotate").await?;
    println!("re-wrapped {n} data keys under KEK {active}; every card is now under it");
    db.close().await;
    Ok(())
}
