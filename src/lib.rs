//! dmpay: one-click payments inside direct messages.
//!
//! Module map (domain modules never import tonic; `api` is the only place that knows
//! the wire):
//!
//! - `config`    settings from the environment and an optional TOML file
//! - `error`     the domain error shared by every module
//! - `auth`      bearer-JWT verification, scopes, dev token minting
//! - `store`     the two database backends (SQLite, PostgreSQL), migrations, error mapping
//! - `money`     currencies, exact amounts in minor units, strict parsing
//! - `accounts`  platform users: tier, frozen status, audit trail
//! - `ledger`    the double-entry ledger and its batching posting engine
//! - `vault`     card validation, envelope encryption, fingerprints, payment methods
//! - `processor` the card-processor trait and the built-in sandbox processor
//! - `payments`  one-click DM payments: sends, limits, settlement, event outbox
//! - `finance`   trial balance and the books' checks for finance staff
//! - `cli_finance` the `dmpay finance ...` commands: gRPC client with readable tables
//! - `dates`     UTC calendar arithmetic for expiries, reports and timestamps
//! - `api`       tonic services: protobuf <-> domain, errors -> gRPC status
//! - `telemetry` logs, Prometheus metrics, the per-call log line
//! - `server`    startup: build, bind, serve, graceful shutdown
//! - `connections` the gRPC listener's connections: a cap on open ones, an idle timeout
//! - `bench_payments` `dmpay bench payments`: the gRPC load generator
//! - `bench_report` `dmpay bench report` (`make bench`): baseline, server runs, BENCHMARKS.md
//! - `bench_cpu` where a benchmark's CPU goes (server, PostgreSQL, load, idle), from /proc
//! - `cli`       the `dmpay` command line

pub mod accounts;
pub mod api;
pub mod auth;
pub mod bench_cpu;
pub mod bench_payments;
pub mod bench_report;
pub mod cli;
pub mod cli_finance;
pub mod config;
pub mod connections;
pub mod dates;
pub mod error;
pub mod finance;
pub mod ledger;
pub mod money;
pub mod payments;
pub mod processor;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod vault;
