//! Integration tests: one binary, every test against the real server on both backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod helpers;

mod access;
mod accounts;
mod at_rest;
mod auth;
mod bench;
mod bus;
mod callers;
mod card_purchases;
mod clients;
mod disputes;
mod finance;
mod hostile;
mod hostile_load;
mod ledger;
mod ledger_checks;
mod ledger_props;
mod limits;
mod ops;
mod outage;
mod ownership;
mod payments;
mod payouts;
mod processor_faults;
mod production;
mod races;
mod raw;
mod secrets;
mod shopping;
mod vault;
mod watchers;
