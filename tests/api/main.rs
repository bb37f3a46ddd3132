//! Integration tests: one binary, every test against the real server on both backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod helpers;

mod access;
mod accounts;
mod auth;
mod bench;
mod finance;
mod ledger;
mod ledger_props;
mod ops;
mod payments;
mod secrets;
mod vault;
