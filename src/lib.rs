//! dmpay: one-click payments inside direct messages.
//!
//! The modules in layers, top to bottom. A module imports from its own layer and those
//! below, never from above, and no two modules import each other (`tests/layers.rs`
//! checks both, and that no domain, infra or kernel module names tonic):
//!
//! ```text
//! shell   cli        the `dmpay` command line, one function per subcommand
//!         server     startup: build, bind, serve, graceful shutdown
//!         bench      `dmpay bench` and `make bench`
//!         config     settings from the environment and an optional TOML file
//! edge    api        tonic services: protobuf <-> domain, errors -> gRPC status,
//!                    rate limits, watch streams, the listener's connections
//!         auth       bearer-JWT verification, scopes, dev token minting
//! domain  payments   one-click DM payments: sends, requests, refunds, limits, outbox;
//!                    live shopping: listings, purchases, stream tabs, sellers' holds
//!         finance    trial balance, verification, reconciliation, exports, statements
//!         vault      card validation, envelope encryption, fingerprints, methods
//!         ledger     the double-entry ledger and its batching posting engine
//!         processor  the card-processor trait and the built-in sandbox processor
//!         accounts   platform users: tier, frozen status, audit trail
//! infra   telemetry  logs, Prometheus metrics, the per-call log line
//!         store      the SQLite and PostgreSQL backends, migrations
//! kernel  kernel     errors, money, ids, text, dates, the clock, stored enums, card
//!                    data in memory, list pages
//! ```

pub mod accounts;
pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod finance;
pub mod kernel;
pub mod ledger;
pub mod payments;
pub mod processor;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod vault;
