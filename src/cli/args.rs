//! The `dmpay` command line's arguments (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dmpay", version, about = "One-click payments inside direct messages")]
pub(super) struct Cli {
    /// Optional TOML file with settings (environment variables win).
    #[arg(long, global = true, env = "DMPAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Run the gRPC server (migrates first).
    Serve,
    /// Run the database migrations and exit.
    Migrate,
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Payments as a user: send, request, pay, refund, balance, watch (talks to a running server).
    Pay {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PayCommand,
    },
    /// A user's saved cards (talks to a running server).
    Cards {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: CardsCommand,
    },
    /// Platform accounts, as the platform's account service sets them (talks to a running server).
    Accounts {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Books for finance staff (talks to a running server).
    Finance {
        /// Server address: host:port or a URL.
        #[arg(long, global = true, env = "DMPAY_ADDR", default_value = "127.0.0.1:50051")]
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
    /// Write the API's descriptors (dmpay's, google.rpc's, health's) as a protoset file,
    /// for tools without server reflection.
    Protoset {
        /// Where to write it.
        #[arg(long, short, default_value = "dmpay.protoset")]
        out: PathBuf,
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

/// Where the server is and who calls it: shared by every client command.
#[derive(clap::Args)]
pub(super) struct ClientArgs {
    /// Server address: host:port or a URL.
    #[arg(long, global = true, env = "DMPAY_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token (in development, omit it and name the user with --user).
    #[arg(long, global = true, env = "DMPAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Development only: act as this user with a token minted with the dev secret.
    #[arg(long, global = true, env = "DMPAY_USER")]
    pub user: Option<String>,
}

#[derive(Subcommand)]
pub(super) enum PayCommand {
    /// Send money to a user, e.g. `dmpay pay send --to bob 12.50 --note lunch`.
    Send {
        /// The recipient's user id.
        #[arg(long)]
        to: String,
        /// The amount in major units, e.g. 12.50.
        amount: String,
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long, default_value = "")]
        note: String,
        /// Wallet first and the card for the rest (auto), the wallet only, or the card only.
        #[arg(long, default_value = "auto", value_parser = ["auto", "balance", "card"])]
        funding: String,
        /// A card token (default: the default card).
        #[arg(long)]
        card: Option<String>,
        /// The DM conversation it belongs to.
        #[arg(long)]
        conversation: Option<String>,
        /// Idempotency key: reuse it to retry safely (default: a new one, printed).
        #[arg(long)]
        key: Option<String>,
    },
    /// Ask a user for money, e.g. `dmpay pay request --from alice 7.25 --note tickets`.
    Request {
        /// Who is asked to pay.
        #[arg(long)]
        from: String,
        amount: String,
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        conversation: Option<String>,
        #[arg(long)]
        key: Option<String>,
    },
    /// Requests for money to you (or, with --asked, the ones you made), newest first.
    Requests {
        /// The requests you made instead.
        #[arg(long)]
        asked: bool,
        /// Only the open ones.
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Pay a request for money with one tap.
    Accept {
        /// The request's id (`req_...`).
        request: String,
        #[arg(long, default_value = "auto", value_parser = ["auto", "balance", "card"])]
        funding: String,
        #[arg(long)]
        card: Option<String>,
        #[arg(long)]
        key: Option<String>,
    },
    /// Decline a request for money.
    Decline { request: String },
    /// Refund a payment you received, in full or in part.
    Refund {
        /// The payment's id (`pay_...`).
        payment: String,
        /// The amount to refund (default: all that is left).
        amount: Option<String>,
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// Your wallet's balance.
    Balance {
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Your payments, newest first.
    List {
        #[arg(long)]
        conversation: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One payment.
    Get { payment: String },
    /// Your payment events as they happen (earlier ones first, after --after).
    Watch {
        #[arg(long)]
        conversation: Option<String>,
        /// Resume after this event sequence (0: from the oldest kept).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Stop after this many events (default: until interrupted).
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand)]
pub(super) enum CardsCommand {
    /// Save a card (tokenized and linked), e.g. `--number 4242424242424242 --exp 12/34 --cvc 123`.
    Add {
        /// The card number (also DMPAY_CARD_NUMBER, which keeps it out of the shell's
        /// history and the process list).
        #[arg(long, env = "DMPAY_CARD_NUMBER", hide_env_values = true)]
        number: String,
        /// MM/YY or MM/YYYY.
        #[arg(long)]
        exp: String,
        /// The security code (also DMPAY_CARD_CVC).
        #[arg(long, env = "DMPAY_CARD_CVC", hide_env_values = true)]
        cvc: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "")]
        postal_code: String,
        /// Make it the default card.
        #[arg(long)]
        default: bool,
    },
    /// Your saved cards.
    List {
        /// Removed ones too.
        #[arg(long)]
        all: bool,
    },
    /// Remove a card.
    Remove { card: String },
    /// Make a card the default.
    Default { card: String },
}

#[derive(Subcommand)]
pub(super) enum AccountsCommand {
    /// Create or update an account (scope accounts:admin).
    Upsert {
        user: String,
        /// The display name.
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "unverified", value_parser = ["unverified", "verified"])]
        tier: String,
    },
    /// Read an account.
    Get { user: String },
}

#[derive(Subcommand)]
pub(super) enum LedgerCommand {
    /// Recompute every balance from postings, check every entry; exit 1 if anything is off.
    Verify,
}

#[derive(Subcommand)]
pub(super) enum FinanceCommand {
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
        /// Only items of this status, or `open` (unmatched, unresolved, of the day's
        /// current report).
        #[arg(long, value_parser = ["matched", "amount_mismatch", "missing_in_ledger", "missing_in_report", "duplicate", "open"])]
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
    /// Disputes (chargebacks), newest first, and what the open ones put at risk.
    Disputes {
        /// Only the open ones.
        #[arg(long)]
        open: bool,
    },
    /// What users owe the platform for disputed payments their wallets could not cover.
    Receivables,
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
pub(super) enum ProcessorCommand {
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
    /// Open a dispute (chargeback) on a sandbox capture, or decide one.
    Dispute {
        #[command(subcommand)]
        command: DisputeCommand,
    },
}

#[derive(Subcommand)]
pub(super) enum DisputeCommand {
    /// The cardholder disputes the capture: the processor takes its amount and a fee
    /// back, and tells dmpay (applied by the running server's resolver).
    Open {
        /// The capture's processor reference (`sbx_...`, a payment's capture).
        #[arg(long)]
        capture: String,
    },
    /// Decide a dispute: won gives the amount back, lost closes it.
    Decide {
        /// The dispute's processor reference (printed by `open`).
        #[arg(long)]
        dispute: String,
        #[arg(long, value_parser = ["won", "lost"])]
        outcome: String,
    },
}

#[derive(Subcommand)]
pub(super) enum VaultCommand {
    /// Re-wrap every card's data key under DMPAY_VAULT_ACTIVE_KEK. Online and resumable:
    /// run it again after an interruption. Afterwards the old KEK can be removed from
    /// DMPAY_VAULT_KEKS.
    Rotate,
}

#[derive(Subcommand)]
pub(super) enum BenchCommand {
    /// Drive a running server over gRPC like chat clients and measure payments.
    Payments {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// uniform, livestream, mixed or flashsale.
        #[arg(long, default_value = "uniform")]
        scenario: String,
        /// Users (flashsale: buyers, each tapping once). Default 1000; flashsale 5000.
        #[arg(long)]
        users: Option<usize>,
        /// flashsale: units on sale.
        #[arg(long, default_value_t = 500)]
        units: usize,
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
        /// PostgreSQL: also grow a database to this many payments and measure uniform
        /// runs, bytes per payment and the export on it (0 skips it).
        #[arg(long, default_value_t = 1_000_000)]
        grown_payments: i64,
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
