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
            let app = Application::build(config).await?;
            app.run_until(shutdown_signal()).await
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

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(fut)
}
