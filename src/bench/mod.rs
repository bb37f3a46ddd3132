//! `dmpay bench` and `make bench`: the application's own benchmarks, part of the shell.
//!
//! - `payments` `dmpay bench payments`: the gRPC load generator
//! - `ledger`   `dmpay bench ledger`: the posting engine against naive per-transfer SQL
//! - `report`   `dmpay bench report` (`make bench`): baseline, server runs, BENCHMARKS.md
//! - `cpu`      where a benchmark's CPU goes (server, PostgreSQL, load, idle), from /proc

pub mod cpu;
pub mod flashsale;
pub mod ledger;
pub mod payments;
pub mod report;
