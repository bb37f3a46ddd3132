//! The `dmpay` command line: one function per subcommand, grouped by what they touch.
//!
//! - `args`     the arguments (clap)
//! - `ops`      `serve`, `migrate`, `token`, `ledger verify`, `processor report`, `vault rotate`
//! - `bench`    `bench payments`, `bench report`, `bench ledger`
//! - `client`   what the client commands share: address, token, readable errors
//! - `pay`      `pay ...`, `cards ...`, `accounts ...`: a chat client's calls from the shell
//! - `finance`  `finance ...`: a gRPC client of a running server, with readable tables

mod args;
mod bench;
pub mod client;
pub mod finance;
mod ops;
mod pay;

use std::process::ExitCode;

use clap::Parser;

use crate::config::Config;
use args::{Cli, Command, DisputeCommand, LedgerCommand, ProcessorCommand, VaultCommand};

/// What a command ends with: done, or a check that found something (exit 1).
enum Outcome {
    Done,
    Check(bool),
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
    // A check that could not run exits 2, so a script can tell it from a check that ran
    // and found something (1).
    let checks = matches!(cli.command, Command::Ledger { .. } | Command::Finance { .. });
    let result = match cli.command {
        Command::Token { sub, scope, ttl } => ops::token(&config, &sub, &scope, ttl).map(|()| Outcome::Done),
        Command::Serve => run_async(ops::serve(config)).map(|()| Outcome::Done),
        Command::Migrate => run_async(ops::migrate(config)).map(|()| Outcome::Done),
        Command::Ledger { command: LedgerCommand::Verify } => run_async(ops::ledger_verify(config)).map(Outcome::Check),
        Command::Processor { command: ProcessorCommand::Report { date, out, drop_row, change_row, extra_row } } => {
            run_async(ops::processor_report(config, date, out, drop_row, change_row, extra_row)).map(|()| Outcome::Done)
        }
        Command::Processor { command: ProcessorCommand::Dispute { command } } => {
            let (capture, decision) = match command {
                DisputeCommand::Open { capture } => (Some(capture), None),
                DisputeCommand::Decide { dispute, outcome } => (None, Some((dispute, outcome == "won"))),
            };
            run_async(ops::processor_dispute(config, capture, decision)).map(|()| Outcome::Done)
        }
        Command::Vault { command: VaultCommand::Rotate } => {
            run_async(ops::vault_rotate(config)).map(|()| Outcome::Done)
        }
        Command::Bench { command } => run_async(bench::run(config, command)).map(|()| Outcome::Done),
        Command::Pay { client, command } => run_async(pay::pay(&config, client, command)).map(|()| Outcome::Done),
        Command::Cards { client, command } => run_async(pay::cards(&config, client, command)).map(|()| Outcome::Done),
        Command::Accounts { client, command } => {
            run_async(pay::accounts(&config, client, command)).map(|()| Outcome::Done)
        }
        Command::Protoset { out } => ops::protoset(&out).map(|()| Outcome::Done),
        Command::Finance { addr, token, command } => {
            let conn = finance::Connection { addr, token };
            run_async(finance::run(config, conn, command)).map(Outcome::Check)
        }
    };
    match result {
        Ok(Outcome::Done | Outcome::Check(true)) => ExitCode::SUCCESS,
        Ok(Outcome::Check(false)) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dmpay: {e:#}");
            if checks {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_async<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(fut)
}
