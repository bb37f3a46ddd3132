//! The crash test (`make chaos`; docs/testing.md "Crash test"). For each backend, a fresh
//! PostgreSQL database and a fresh SQLite file, the server binary runs as a child
//! process while concurrent clients send money (from the wallet, a card, or both), pay
//! requests with one tap, refund payments, cash wallet money out to cards (payouts,
//! standard and instant) and top wallets up through the Ledger API, every call with an
//! idempotency key. The server is SIGKILLed at random moments and
//! restarted on the same database; a call that got no answer (transport error,
//! UNAVAILABLE, deadline) is retried with the same key and the same request until it
//! gets one. A tenth of the calls are sent again once answered, and one in twenty as two
//! copies at the same time (a client's retry after its deadline while the first attempt
//! still runs); every copy must get the same answer.
//!
//! Afterwards the server is killed and restarted a last time and the test waits until
//! the resolver has finished every pending payment and refund. Every call is then
//! replayed once more, and:
//! - every retry, copy and replay returned the original outcome (same payment, request
//!   or entry id, or the same status code and reason), and the replays wrote nothing;
//! - every payment row belongs to exactly one acknowledged call, and none is pending;
//! - every settled payment is in the ledger exactly once (its recipient credited with
//!   its amount, its sender debited with its wallet part, its card part booked by one
//!   card entry), a failed one moved nothing, every completed refund is one entry and a
//!   failed one none, every acknowledged top-up is one entry; every payout row belongs to
//!   one call and none is pending, a paid one took its amount from the wallet (its fee to
//!   fee income, its net to the processor) and a failed one moved nothing, and the
//!   sandbox pushed exactly as many payouts to cards as are paid;
//! - every wallet equals what the acknowledged calls say it should hold, and none is
//!   negative or left with a reservation;
//! - the ledger verifies (`dmpay::ledger::verify` and `dmpay finance verify`);
//! - the sandbox processor's captures and the ledger's card entries match one to one
//!   (each capture reference in exactly one card entry's `processor_reference`, of the
//!   same amount, on a settled payment; no card entry without its capture);
//! - stream tabs (viewers open a tab for a live stream, buy on it, close it, while the
//!   server is killed): every tab is closed, its spend is the sum of the purchases drawn
//!   on it, captured exactly once at the processor (a tab that spent nothing is voided,
//!   never captured) and booked once against the viewer's tab account, which is back to
//!   zero; every purchase row belongs to one acknowledged purchase. Purchases paid by
//!   card go through a tab of their own and are held to the same: one capture of the
//!   card part and fee for a purchase made, none for an attempt refused or cut short by
//!   a crash, every such tab closed (a crash's by the resolver once it expires), and the
//!   fee booked once to fee income.
//!
//! The tests are `#[ignore]`d: they need the release binary, which `make chaos` builds
//! before running them with `cargo test --test chaos -- --ignored`. Knobs, from the
//! environment:
//!
//! | variable | default | |
//! |---|---|---|
//! | CHAOS_KILLS | 10 | SIGKILLs during the load phase (one more before the final check) |
//! | CHAOS_SECONDS | 60 | length of the load phase, per backend |
//! | CHAOS_CLIENTS | 12 | concurrent clients |
//! | CHAOS_USERS | 16 | users (every eighth has no card) |
//! | CHAOS_SEED | random | the seed of every random choice (printed; kill times included) |
//! | CHAOS_BIN | target/release/dmpay | the server binary |
//! | CHAOS_POSTGRES_URL | DMPAY_TEST_POSTGRES_URL, else postgres://postgres@127.0.0.1:5432/postgres | where the fresh database is created |
//! | CHAOS_SANDBOX_LATENCY | 5ms | added to each sandbox processor call (widens the windows inside a card charge) |
//! | CHAOS_KEEP | unset | keep the work folder on success too, and the PostgreSQL database (dropped otherwise) |
//!
//! The server's log (JSON) and the SQLite file are in `target/chaos/<backend>-<seed>/`,
//! kept when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmpay::api::pb;
use dmpay::store::Db;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;

const CARD: &str = "4242424242424242";
const DISPUTED_CARD: &str = "4000000000000259";
/// The refusal of a user who owes for a disputed payment.
const OWING: &str = "RECEIVABLE_OUTSTANDING";
/// What each user's wallet starts with, in cents: small enough that wallets run dry and
/// AUTO sends fall back to the card, and BALANCE sends fail for want of funds.
const FUNDING_CENTS: i64 = 10_000;
const PAY_SCOPES: &str = "payments:write payments:read methods:write";
const SERVICE: &str = "chaos-treasury";
const SERVICE_SCOPES: &str = "ledger:write ledger:read finance accounts:admin";
const TOPUP_KIND: &str = "chaos_topup";
const TREASURY: &str = "platform:treasury:USD";
const CLEARING: &str = "processor:sandbox:clearing:USD";
const FEES: &str = "platform:fees:USD";
const IN_TRANSIT: &str = "platform:payouts_in_transit:USD";
/// The live stream the tab workload buys in, and its listing's unit price in cents.
const STREAM: &str = "chaos-live";
const UNIT_CENTS: i64 = 250;
/// The deadline of one attempt; the server's own is 10 s.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a call may go without an answer before the test gives up on the server.
const ANSWER_WAIT_MAX: Duration = Duration::from_secs(120);
/// How long the resolver gets to finish every pending payment and refund.
const RESOLVE_WAIT_MAX: Duration = Duration::from_secs(90);
const READY_WAIT_MAX: Duration = Duration::from_secs(60);
/// Share of calls sent again once answered, to compare the duplicate's answer.
const DUPLICATE_PERCENT: u32 = 10;
/// Share of calls sent as two copies at the same time.
const CONCURRENT_PERCENT: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the release binary; run with `make chaos`"]
async fn chaos_sqlite() {
    run(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the release binary; run with `make chaos`"]
async fn chaos_postgres() {
    run(Backend::Postgres).await;
}

// ---------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    kills: usize,
    load: Duration,
    clients: usize,
    users: usize,
    seed: u64,
    bin: PathBuf,
    postgres_url: String,
    sandbox_latency: String,
    keep: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value"))
        }
        _ => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        let bin = std::env::var_os("CHAOS_BIN")
            .filter(|b| !b.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/dmpay"));
        assert!(
            bin.is_file(),
            "no server binary at {} (CHAOS_BIN): build it first with `cargo build --release`, or run `make chaos`",
            bin.display()
        );
        let postgres_url = ["CHAOS_POSTGRES_URL", "DMPAY_TEST_POSTGRES_URL"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let seconds: f64 = env_or("CHAOS_SECONDS", 60.0);
        assert!(seconds > 0.0, "CHAOS_SECONDS must be positive");
        let users = env_or("CHAOS_USERS", 16usize);
        assert!(users >= 3, "CHAOS_USERS: at least 3");
        Knobs {
            kills: env_or("CHAOS_KILLS", 10usize),
            load: Duration::from_secs_f64(seconds),
            clients: env_or("CHAOS_CLIENTS", 12usize).max(1),
            users,
            seed: env_or("CHAOS_SEED", rand::random::<u64>()),
            bin,
            postgres_url,
            sandbox_latency: env_or("CHAOS_SANDBOX_LATENCY", "5ms".to_string()),
            keep: std::env::var_os("CHAOS_KEEP").is_some_and(|v| !v.is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server as a child process

struct Server {
    bin: PathBuf,
    env: Vec<(String, String)>,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
    kills: usize,
}

impl Server {
    fn start(&mut self) {
        assert!(self.child.is_none(), "start: the server is running");
        self.starts += 1;
        let mut out = OpenOptions::new().create(true).append(true).open(&self.log).expect("open the server log");
        let _ = writeln!(out, "{{\"chaos\":\"start #{}\"}}", self.starts);
        let err = out.try_clone().expect("log handle");
        let child = Command::new(&self.bin)
            .arg("serve")
            .env_remove("DMPAY_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// SIGKILL (`Child::kill`): no shutdown, no draining, no flushing. The crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.kills += 1;
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WAIT_MAX;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("the server exited while starting ({status}); see {}", self.log.display()));
                }
            }
            if serving(self.addr).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the server was not SERVING within {READY_WAIT_MAX:?}; see {}",
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn serving(addr: SocketAddr) -> bool {
    let Ok(endpoint) = Channel::from_shared(format!("http://{addr}")) else { return false };
    let Ok(channel) = endpoint.connect_timeout(Duration::from_millis(500)).connect().await else { return false };
    let mut health = HealthClient::new(channel);
    let check = health.check(HealthCheckRequest { service: String::new() });
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A fresh PostgreSQL database, dropped when this is dropped (unless kept).
struct PgDatabase {
    admin_url: String,
    name: String,
    keep: bool,
}

impl PgDatabase {
    async fn create(admin_url: &str, keep: bool) -> PgDatabase {
        let name = format!("dmpay_chaos_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {admin_url} (CHAOS_POSTGRES_URL): {e}"));
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.expect("create database");
        admin.close().await;
        PgDatabase { admin_url: admin_url.to_owned(), name, keep }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("[chaos] kept PostgreSQL database {}", self.name);
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------
// Calls and their outcomes

#[derive(Clone, Debug)]
enum CallReq {
    Send(pb::SendPaymentRequest),
    Request(pb::RequestPaymentRequest),
    Pay(pb::PayBillRequest),
    Refund(pb::RefundPaymentRequest),
    Topup(pb::PostEntryRequest),
    Payout(pb::CreatePayoutRequest),
    OpenTab(pb::OpenTabRequest),
    Buy(pb::PurchaseRequest),
    CloseTab(pb::CloseTabRequest),
}

impl CallReq {
    fn key(&self) -> &str {
        match self {
            CallReq::Send(r) => &r.idempotency_key,
            CallReq::Request(r) => &r.idempotency_key,
            CallReq::Pay(r) => &r.idempotency_key,
            CallReq::Refund(r) => &r.idempotency_key,
            CallReq::Topup(r) => &r.idempotency_key,
            CallReq::Payout(r) => &r.idempotency_key,
            CallReq::OpenTab(r) => &r.idempotency_key,
            CallReq::Buy(r) => &r.idempotency_key,
            CallReq::CloseTab(r) => &r.tab_id,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            CallReq::Send(_) => "SendPayment",
            CallReq::Request(_) => "RequestPayment",
            CallReq::Pay(_) => "PayRequest",
            CallReq::Refund(_) => "RefundPayment",
            CallReq::Topup(_) => "PostEntry",
            CallReq::Payout(_) => "CreatePayout",
            CallReq::OpenTab(_) => "OpenTab",
            CallReq::Buy(_) => "Purchase",
            CallReq::CloseTab(_) => "CloseTab",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Payment { id: String, status: i32, amount: i64, card: i64, fee: i64 },
    Request { id: String },
    Entry { id: String },
    Payout { id: String, status: i32 },
    Tab { id: String, status: i32 },
    Purchase { id: String },
    Error { code: Code, reason: String, message: String },
}

impl Outcome {
    fn from_status(s: &Status) -> Outcome {
        let reason = s.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default();
        Outcome::Error { code: s.code(), reason, message: s.message().to_owned() }
    }

    fn payment(p: pb::Payment) -> Outcome {
        Outcome::Payment {
            id: p.payment_id,
            status: p.status,
            amount: cents(&p.amount),
            card: cents(&p.card_funded_amount),
            fee: cents(&p.fee),
        }
    }

    fn short(&self) -> String {
        match self {
            Outcome::Payment { id, status, .. } => {
                let status = pb::PaymentStatus::try_from(*status).map(|s| s.as_str_name()).unwrap_or("?");
                format!("payment {id} {status}")
            }
            Outcome::Request { id } => format!("request {id}"),
            Outcome::Entry { id } => format!("entry {id}"),
            Outcome::Payout { id, status } => {
                let status = pb::PayoutStatus::try_from(*status).map(|s| s.as_str_name()).unwrap_or("?");
                format!("payout {id} {status}")
            }
            Outcome::Tab { id, status } => {
                let status = pb::TabStatus::try_from(*status).map(|s| s.as_str_name()).unwrap_or("?");
                format!("tab {id} {status}")
            }
            Outcome::Purchase { id } => format!("purchase {id}"),
            Outcome::Error { code, reason, message } => format!("{code:?} {reason} ({message})"),
        }
    }
}

/// Who makes a call: a user (index) or the treasury service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    User(usize),
    Service,
}

#[derive(Clone, Debug)]
struct Call {
    caller: Caller,
    req: CallReq,
    outcome: Outcome,
}

/// A call without an answer: the server never answered (the connection broke, it was
/// down, the deadline passed), so the outcome is unknown and the call must be retried.
/// dmpay's own answers carry no transport source; UNAVAILABLE is its "retry".
fn unanswered(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
        || matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

fn cents(m: &Option<pb::Money>) -> i64 {
    let Some(m) = m else { return 0 };
    assert_eq!(m.currency, "USD", "only USD here");
    let (negative, digits) = match m.amount.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, m.amount.as_str()),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(frac.len() <= 2, "amount {:?}", m.amount);
    let v = int.parse::<i64>().expect("amount") * 100 + format!("{frac:0<2}").parse::<i64>().expect("amount");
    if negative {
        -v
    } else {
        v
    }
}

fn usd(cents: i64) -> Option<pb::Money> {
    Some(pb::Money { currency: "USD".into(), amount: format!("{}.{:02}", cents / 100, cents % 100) })
}

fn wallet(user: &str) -> String {
    format!("user:{user}:wallet:USD")
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    req.set_timeout(CALL_TIMEOUT);
    req
}

/// One attempt.
async fn execute(channel: &Channel, token: &str, req: &CallReq) -> Result<Outcome, Status> {
    let mut payments = pb::payments_client::PaymentsClient::new(channel.clone());
    match req {
        CallReq::Send(m) => {
            payments.send_payment(authed(m.clone(), token)).await.map(|r| Outcome::payment(r.into_inner()))
        }
        CallReq::Request(m) => payments
            .request_payment(authed(m.clone(), token))
            .await
            .map(|r| Outcome::Request { id: r.into_inner().bill_id }),
        CallReq::Pay(m) => payments.pay_bill(authed(m.clone(), token)).await.map(|r| Outcome::payment(r.into_inner())),
        CallReq::Refund(m) => {
            payments.refund_payment(authed(m.clone(), token)).await.map(|r| Outcome::payment(r.into_inner()))
        }
        CallReq::Topup(m) => pb::ledger_client::LedgerClient::new(channel.clone())
            .post_entry(authed(m.clone(), token))
            .await
            .map(|r| Outcome::Entry { id: r.into_inner().entry_id }),
        CallReq::Payout(m) => payments.create_payout(authed(m.clone(), token)).await.map(|r| {
            let p = r.into_inner();
            Outcome::Payout { id: p.payout_id, status: p.status }
        }),
        CallReq::OpenTab(m) => pb::shopping_client::ShoppingClient::new(channel.clone())
            .open_tab(authed(m.clone(), token))
            .await
            .map(|r| {
                let t = r.into_inner();
                Outcome::Tab { id: t.tab_id, status: t.status }
            }),
        CallReq::Buy(m) => pb::shopping_client::ShoppingClient::new(channel.clone())
            .purchase(authed(m.clone(), token))
            .await
            .map(|r| Outcome::Purchase { id: r.into_inner().purchase_id }),
        CallReq::CloseTab(m) => pb::shopping_client::ShoppingClient::new(channel.clone())
            .close_tab(authed(m.clone(), token))
            .await
            .map(|r| {
                let t = r.into_inner();
                Outcome::Tab { id: t.tab_id, status: t.status }
            }),
    }
}

// ---------------------------------------------------------------------------------------
// The load

struct User {
    name: String,
    token: String,
    has_card: bool,
    /// Pays with the sandbox's dispute test card: every capture is disputed, and the
    /// recipient bears it (their wallet, then a debt that blocks their sends).
    disputes: bool,
}

/// A settled payment that may still be refunded, by its recipient.
#[derive(Clone, Debug)]
struct Refundable {
    payment_id: String,
    recipient: usize,
    left: i64,
}

struct Ctx {
    users: Vec<User>,
    /// The live-stream listing the tab workload buys from.
    listing_id: Mutex<String>,
    service_token: String,
    channels: Vec<Channel>,
    calls: Mutex<Vec<Call>>,
    refundable: Mutex<Vec<Refundable>>,
    problems: Mutex<Vec<(&'static str, String)>>,
    /// Attempts that got no answer, by what happened.
    unanswered: Mutex<BTreeMap<String, u64>>,
    /// Calls that needed more than one attempt.
    retried_calls: AtomicU64,
    duplicates: AtomicU64,
    concurrent: AtomicU64,
    fatal: AtomicBool,
}

impl Ctx {
    fn token(&self, caller: Caller) -> &str {
        match caller {
            Caller::User(i) => &self.users[i].token,
            Caller::Service => &self.service_token,
        }
    }

    /// A broken guarantee, with its kind (for the summary by kind).
    fn problem(&self, kind: &'static str, p: String) {
        self.problems.lock().expect("lock").push((kind, p));
    }

    /// A call went unanswered for good: the server is stuck, so the load stops. (Other
    /// problems are collected and the load goes on, so one run shows them all.)
    fn fatal(&self, p: String) {
        self.fatal.store(true, Ordering::Relaxed);
        self.problem("no answer", p);
    }

    fn failed(&self) -> bool {
        self.fatal.load(Ordering::Relaxed)
    }

    /// Sends `req` until the server answers: an attempt without an answer is retried with
    /// the same key and the same request.
    async fn until_answered(&self, channel: &Channel, caller: Caller, req: &CallReq) -> Result<Outcome, String> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match tokio::time::timeout(
                CALL_TIMEOUT + Duration::from_secs(5),
                execute(channel, self.token(caller), req),
            )
            .await
            {
                Ok(Ok(outcome)) => {
                    if attempts > 1 {
                        self.retried_calls.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(outcome);
                }
                Ok(Err(status)) if !unanswered(&status) => {
                    if attempts > 1 {
                        self.retried_calls.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Outcome::from_status(&status));
                }
                Ok(Err(status)) => {
                    let kind = if std::error::Error::source(&status).is_some() {
                        format!("{:?} (transport)", status.code())
                    } else {
                        format!("{:?}", status.code())
                    };
                    *self.unanswered.lock().expect("lock").entry(kind).or_default() += 1;
                    format!("{:?}: {}", status.code(), status.message())
                }
                Err(_) => {
                    *self.unanswered.lock().expect("lock").entry("client deadline".into()).or_default() += 1;
                    "client deadline".to_string()
                }
            };
            if started.elapsed() > ANSWER_WAIT_MAX {
                return Err(format!(
                    "{} {} by {caller:?}: no answer after {attempts} attempts in {:?} (last: {last})",
                    req.name(),
                    req.key(),
                    started.elapsed()
                ));
            }
            let backoff = Duration::from_millis((20 * u64::from(attempts)).min(500));
            tokio::time::sleep(backoff).await;
        }
    }

    /// Makes one call (until answered), sometimes sends it again at once to compare the
    /// duplicate's answer, and records it.
    async fn call(&self, rng: &mut StdRng, channel: &Channel, caller: Caller, req: CallReq) -> Result<Outcome, String> {
        let roll = rng.gen_range(0..100);
        let (outcome, again) = if roll < CONCURRENT_PERCENT {
            // Two copies at once: one effect, one answer.
            self.concurrent.fetch_add(1, Ordering::Relaxed);
            let (a, b) =
                tokio::join!(self.until_answered(channel, caller, &req), self.until_answered(channel, caller, &req));
            (a?, Some((b?, "a concurrent copy")))
        } else if roll < CONCURRENT_PERCENT + DUPLICATE_PERCENT {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            let a = self.until_answered(channel, caller, &req).await?;
            (a, Some((self.until_answered(channel, caller, &req).await?, "a duplicate")))
        } else {
            (self.until_answered(channel, caller, &req).await?, None)
        };
        if let Some((again, what)) = again {
            if !wrote_nothing(&req, &outcome) && !same_outcome(&outcome, &again, None) {
                self.problem(
                    "duplicate answered differently",
                    format!(
                        "{what} of {} {} by {caller:?} answered {} where the original answered {}",
                        req.name(),
                        req.key(),
                        again.short(),
                        outcome.short()
                    ),
                );
            }
        }
        self.calls.lock().expect("lock").push(Call { caller, req, outcome: outcome.clone() });
        Ok(outcome)
    }
}

/// Whether a retry's answer is the original one: the same payment, request or entry, or
/// the same error. A payment acknowledged PENDING may since have failed: its replay is
/// that failure (`final_failure`, the failed row's reason).
/// A refusal that wrote nothing (as a refusal for a limit does): a later attempt with
/// the same key may go through. A payout refused before its row (no funds, no card, its
/// limit) and any call refused for a debt are such refusals.
fn wrote_nothing(req: &CallReq, outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Error { reason, code, .. } => {
            reason == OWING
                // A purchase refused writes nothing, and so does a tab refused because
                // the viewer has one open already.
                || matches!(req, CallReq::Buy(_))
                || (matches!(req, CallReq::OpenTab(_)) && *code == Code::AlreadyExists)
                || (matches!(req, CallReq::Payout(_))
                    && matches!(reason.as_str(), "INSUFFICIENT_FUNDS" | "PAYOUT_DAILY_LIMIT" | "NO_PAYMENT_METHOD"))
        }
        _ => false,
    }
}

fn same_outcome(original: &Outcome, again: &Outcome, final_failure: Option<&str>) -> bool {
    match (original, again) {
        (Outcome::Payment { id: a, .. }, Outcome::Payment { id: b, .. }) => a == b,
        (Outcome::Request { id: a }, Outcome::Request { id: b }) => a == b,
        (Outcome::Entry { id: a }, Outcome::Entry { id: b }) => a == b,
        (Outcome::Payout { id: a, .. }, Outcome::Payout { id: b, .. }) => a == b,
        (Outcome::Tab { id: a, .. }, Outcome::Tab { id: b, .. }) => a == b,
        (Outcome::Purchase { id: a }, Outcome::Purchase { id: b }) => a == b,
        // A payout answered PENDING (its push's answer lost with a killed server) may
        // since have failed; the payout rows' check holds it to its row.
        (Outcome::Payout { status, .. }, Outcome::Error { code: Code::FailedPrecondition, .. }) => {
            *status == pb::PayoutStatus::Pending as i32
        }
        (Outcome::Error { code: c1, reason: r1, .. }, Outcome::Error { code: c2, reason: r2, .. }) => {
            c1 == c2 && r1 == r2
        }
        (Outcome::Payment { status, .. }, Outcome::Error { code: Code::FailedPrecondition, reason, .. }) => {
            *status == pb::PaymentStatus::Pending as i32 && final_failure == Some(reason.as_str())
        }
        _ => false,
    }
}

fn two_users(rng: &mut StdRng, n: usize) -> (usize, usize) {
    let a = rng.gen_range(0..n);
    let mut b = rng.gen_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

fn funding(rng: &mut StdRng) -> pb::FundingSource {
    match rng.gen_range(0..3) {
        0 => pb::FundingSource::Auto,
        1 => pb::FundingSource::Balance,
        _ => pb::FundingSource::Card,
    }
}

fn topup(key: String, user: &str, cents: i64) -> CallReq {
    CallReq::Topup(pb::PostEntryRequest {
        idempotency_key: key,
        kind: TOPUP_KIND.into(),
        postings: vec![
            pb::Posting { account_code: TREASURY.into(), direction: pb::Direction::Debit as i32, amount: usd(cents) },
            pb::Posting { account_code: wallet(user), direction: pb::Direction::Credit as i32, amount: usd(cents) },
        ],
        ..Default::default()
    })
}

fn note_settled(ctx: &Ctx, outcome: &Outcome, recipient: usize) {
    if let Outcome::Payment { id, status, amount, .. } = outcome {
        if *status == pb::PaymentStatus::Settled as i32 {
            ctx.refundable.lock().expect("lock").push(Refundable { payment_id: id.clone(), recipient, left: *amount });
        }
    }
}

/// Client `w`'s viewer for the tab workload: the `w`th user with a card that is not the
/// dispute test card (a disputed tab capture is not part of this workload), if any.
fn viewer_of(ctx: &Ctx, w: usize) -> Option<usize> {
    ctx.users.iter().enumerate().filter(|(_, u)| u.has_card && !u.disputes).map(|(i, _)| i).nth(w)
}

/// One client: random operations until `until`.
async fn client(ctx: Arc<Ctx>, w: usize, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let channel = ctx.channels[w % ctx.channels.len()].clone();
    let n_users = ctx.users.len();
    let mut n = 0u64;
    while Instant::now() < until && !ctx.failed() {
        n += 1;
        let roll = rng.gen_range(0..100);
        let result: Result<(), String> = async {
            match roll {
                // A send: from the wallet, a card, or the wallet first and a card for the rest.
                0..=54 => {
                    let (from, to) = two_users(&mut rng, n_users);
                    let funding = match roll {
                        0..=19 => pb::FundingSource::Balance,
                        20..=39 => pb::FundingSource::Auto,
                        _ => pb::FundingSource::Card,
                    };
                    let key = format!("s-{w}-{n}");
                    let req = pb::SendPaymentRequest {
                        idempotency_key: key.clone(),
                        recipient_id: ctx.users[to].name.clone(),
                        amount: usd(rng.gen_range(10..=2_500)),
                        note: "chaos".into(),
                        conversation_id: format!("dm-{}-{}", from.min(to), from.max(to)),
                        message_id: key,
                        funding_source: funding as i32,
                        payment_method_token: String::new(),
                    };
                    let outcome = ctx.call(&mut rng, &channel, Caller::User(from), CallReq::Send(req)).await?;
                    note_settled(&ctx, &outcome, to);
                }
                // A request, paid with one tap by its payer.
                55..=74 => {
                    let (requester, payer) = two_users(&mut rng, n_users);
                    let key = format!("r-{w}-{n}");
                    let req = pb::RequestPaymentRequest {
                        idempotency_key: key.clone(),
                        payer_id: ctx.users[payer].name.clone(),
                        amount: usd(rng.gen_range(10..=2_500)),
                        note: "chaos request".into(),
                        conversation_id: format!("dm-{}-{}", requester.min(payer), requester.max(payer)),
                        message_id: key,
                        expires_in_seconds: 0,
                    };
                    let requested =
                        ctx.call(&mut rng, &channel, Caller::User(requester), CallReq::Request(req)).await?;
                    if let Outcome::Request { id } = requested {
                        let pay = pb::PayBillRequest {
                            bill_id: id,
                            idempotency_key: format!("p-{w}-{n}"),
                            funding_source: funding(&mut rng) as i32,
                            payment_method_token: String::new(),
                        };
                        let outcome = ctx.call(&mut rng, &channel, Caller::User(payer), CallReq::Pay(pay)).await?;
                        note_settled(&ctx, &outcome, requester);
                    }
                }
                // A refund of a settled payment by its recipient, all or part of what is left.
                75..=89 => {
                    let picked = {
                        let mut pool = ctx.refundable.lock().expect("lock");
                        if pool.is_empty() {
                            None
                        } else {
                            let i = rng.gen_range(0..pool.len());
                            Some(pool.swap_remove(i))
                        }
                    };
                    let Some(mut r) = picked else { return Ok(()) };
                    let amount = if rng.gen_bool(0.5) { None } else { Some(rng.gen_range(1..=r.left)) };
                    let req = pb::RefundPaymentRequest {
                        payment_id: r.payment_id.clone(),
                        idempotency_key: format!("f-{w}-{n}"),
                        amount: amount.and_then(usd),
                        reason: "chaos refund".into(),
                    };
                    let outcome = ctx.call(&mut rng, &channel, Caller::User(r.recipient), CallReq::Refund(req)).await?;
                    match outcome {
                        Outcome::Payment { .. } => {
                            r.left -= amount.unwrap_or(r.left);
                            if r.left > 0 {
                                ctx.refundable.lock().expect("lock").push(r);
                            }
                        }
                        // The recipient's wallet could not cover it: it may later.
                        Outcome::Error { reason, .. } if reason == "INSUFFICIENT_FUNDS" => {
                            ctx.refundable.lock().expect("lock").push(r)
                        }
                        // Anything else is a problem of its own (see `check`); what is
                        // left of the payment is unknown, so it is not refunded again.
                        _ => {}
                    }
                }
                // A cash-out of wallet money to the user's card, standard or instant.
                90..=92 => {
                    let user = rng.gen_range(0..n_users);
                    let req = pb::CreatePayoutRequest {
                        idempotency_key: format!("o-{w}-{n}"),
                        amount: usd(rng.gen_range(100..=2_500)),
                        speed: if rng.gen_bool(0.5) { pb::PayoutSpeed::Standard } else { pb::PayoutSpeed::Instant }
                            as i32,
                        payment_method_token: String::new(),
                    };
                    ctx.call(&mut rng, &channel, Caller::User(user), CallReq::Payout(req)).await?;
                }
                // A viewer's stream tab: open it (one authorization), buy on it a few
                // times, close it (one capture). Each client has its own viewer, so no
                // two clients' tabs meet on the one-tab-per-stream rule.
                93..=95 if viewer_of(&ctx, w).is_some() => {
                    let Some(user) = viewer_of(&ctx, w) else { return Ok(()) };
                    let open = pb::OpenTabRequest {
                        idempotency_key: format!("tab-{w}-{n}"),
                        stream_id: STREAM.into(),
                        cap: usd(rng.gen_range(3 * UNIT_CENTS..=4_000)),
                        payment_method_token: String::new(),
                    };
                    let opened = ctx.call(&mut rng, &channel, Caller::User(user), CallReq::OpenTab(open)).await?;
                    let Outcome::Tab { id, status } = opened else { return Ok(()) };
                    if status == pb::TabStatus::Open as i32 {
                        let listing_id = ctx.listing_id.lock().expect("lock").clone();
                        for k in 0..rng.gen_range(0..=3) {
                            let buy = pb::PurchaseRequest {
                                idempotency_key: format!("tb-{w}-{n}-{k}"),
                                listing_id: listing_id.clone(),
                                quantity: 1,
                                tab_id: id.clone(),
                                ..Default::default()
                            };
                            ctx.call(&mut rng, &channel, Caller::User(user), CallReq::Buy(buy)).await?;
                        }
                    }
                    let close = pb::CloseTabRequest { tab_id: id };
                    ctx.call(&mut rng, &channel, Caller::User(user), CallReq::CloseTab(close)).await?;
                }
                // A purchase paid by card: one authorization through a tab of its own,
                // captured at once (or voided when refused), the wallet untouched. A
                // crash between the steps leaves the tab to the resolver.
                96 if viewer_of(&ctx, w).is_some() => {
                    let Some(user) = viewer_of(&ctx, w) else { return Ok(()) };
                    let listing_id = ctx.listing_id.lock().expect("lock").clone();
                    let buy = pb::PurchaseRequest {
                        idempotency_key: format!("cp-{w}-{n}"),
                        listing_id,
                        quantity: rng.gen_range(1..=2),
                        funding_source: pb::PurchaseFundingSource::Card as i32,
                        ..Default::default()
                    };
                    ctx.call(&mut rng, &channel, Caller::User(user), CallReq::Buy(buy)).await?;
                }
                // A top-up from the treasury through the Ledger API.
                _ => {
                    let user = rng.gen_range(0..n_users);
                    let req = topup(format!("t-{w}-{n}"), &ctx.users[user].name, rng.gen_range(1_000..=5_000));
                    ctx.call(&mut rng, &channel, Caller::Service, req).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            ctx.fatal(e);
            return;
        }
    }
}

/// Kills the server at each of `schedule`'s moments (from `started`) and starts it
/// again after the pause; hands the server back when done.
async fn killer(
    name: &'static str,
    mut server: Server,
    schedule: Vec<(Duration, Duration)>,
    started: Instant,
    ctx: Arc<Ctx>,
) -> Server {
    for (i, (at, pause)) in schedule.into_iter().enumerate() {
        tokio::time::sleep_until((started + at).into()).await;
        server.kill();
        let answered = ctx.calls.lock().expect("lock").len();
        eprintln!(
            "[chaos] {name}: kill #{} at {:.2}s ({answered} calls answered so far); restart in {}ms",
            i + 1,
            started.elapsed().as_secs_f64(),
            pause.as_millis()
        );
        tokio::time::sleep(pause).await;
        server.start();
    }
    server
}

/// `kills` moments spread over `load`, each at a random place in its own slot (so they
/// never bunch up entirely), each followed by a random pause before the restart.
fn kill_schedule(rng: &mut StdRng, kills: usize, load: Duration) -> Vec<(Duration, Duration)> {
    let slot = load.as_secs_f64() / (kills as f64 + 0.5);
    (0..kills)
        .map(|i| {
            let at = slot * (i as f64 + 0.25 + rng.gen_range(0.0..1.0));
            (Duration::from_secs_f64(at), Duration::from_millis(rng.gen_range(0..300)))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// What the database holds

#[derive(sqlx::FromRow, Clone, Debug)]
struct PaymentRow {
    payment_id: String,
    sender_id: String,
    recipient_id: String,
    amount: i64,
    wallet_amount: i64,
    card_amount: i64,
    fee_amount: i64,
    refunded_amount: i64,
    status: String,
    failure_reason: String,
    idempotency_key: String,
    request_id: Option<String>,
    capture_ref: Option<String>,
}

impl PaymentRow {
    fn settled(&self) -> bool {
        matches!(self.status.as_str(), "settled" | "partially_refunded" | "refunded")
    }
}

#[derive(sqlx::FromRow, Clone, Debug)]
struct RefundRow {
    refund_id: String,
    payment_id: String,
    amount: i64,
    status: String,
    idempotency_key: String,
    created_by: String,
}

#[derive(sqlx::FromRow, Clone, Debug)]
struct RequestRow {
    request_id: String,
    requester_id: String,
    status: String,
    payment_id: Option<String>,
    idempotency_key: String,
}

#[derive(sqlx::FromRow, Clone, Debug)]
struct ProcessorCall {
    idempotency_key: String,
    kind: String,
    reference: String,
    amount: Option<i64>,
    status: String,
}

async fn payment_rows(db: &Db) -> Vec<PaymentRow> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, PaymentRow>(
        "SELECT payment_id, sender_id, recipient_id, amount, wallet_amount, card_amount, fee_amount, refunded_amount, \
         status, failure_reason, idempotency_key, request_id, capture_ref FROM payments",
    )
    .fetch_all(pool)
    .await)
    .expect("payments")
}

#[derive(sqlx::FromRow)]
struct DisputeRow {
    dispute_id: String,
    payment_id: String,
    amount: i64,
    recovered_from: String,
    from_wallet: i64,
    to_receivable: i64,
}

async fn dispute_rows(db: &Db) -> Vec<DisputeRow> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, DisputeRow>(
        "SELECT dispute_id, payment_id, amount, recovered_from, from_wallet, to_receivable FROM disputes",
    )
    .fetch_all(pool)
    .await)
    .expect("disputes")
}

#[derive(sqlx::FromRow)]
struct PayoutRow {
    payout_id: String,
    user_id: String,
    amount: i64,
    fee: i64,
    status: String,
    failure_reason: String,
    idempotency_key: String,
    processor_ref: Option<String>,
}

async fn payout_rows(db: &Db) -> Vec<PayoutRow> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, PayoutRow>(
        "SELECT payout_id, user_id, amount, fee, status, failure_reason, idempotency_key, processor_ref FROM payouts",
    )
    .fetch_all(pool)
    .await)
    .expect("payouts")
}

async fn refund_rows(db: &Db) -> Vec<RefundRow> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, RefundRow>(
        "SELECT refund_id, payment_id, amount, status, idempotency_key, created_by FROM payment_refunds",
    )
    .fetch_all(pool)
    .await)
    .expect("refunds")
}

async fn request_rows(db: &Db) -> Vec<RequestRow> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, RequestRow>(
        "SELECT request_id, requester_id, status, payment_id, idempotency_key FROM payment_requests",
    )
    .fetch_all(pool)
    .await)
    .expect("requests")
}

async fn processor_calls(db: &Db) -> Vec<ProcessorCall> {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, ProcessorCall>(
        "SELECT idempotency_key, kind, reference, amount, status FROM sandbox_processor_calls",
    )
    .fetch_all(pool)
    .await)
    .expect("processor calls")
}

/// Rows of the tables a call could write to, to prove a replay wrote nothing.
async fn row_counts(db: &Db) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in [
        "payments",
        "payment_refunds",
        "payment_requests",
        "ledger_entries",
        "ledger_postings",
        "sandbox_processor_calls",
        "purchases",
        "stream_tabs",
    ] {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        let n = dmpay::with_db!(db, pool => sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await).expect("count");
        out.push((table, n));
    }
    out
}

/// Payments and payouts, and refunds and the processor's notifications not yet applied,
/// still pending, and ledger reservations not yet posted or voided.
async fn unfinished(db: &Db) -> (i64, i64, i64) {
    dmpay::with_db!(db, pool => sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT (SELECT COUNT(*) FROM payments WHERE status = 'pending') \
                  + (SELECT COUNT(*) FROM payouts WHERE status = 'pending') \
                  + (SELECT COUNT(*) FROM stream_tabs WHERE status IN ('opening', 'closing') \
                     OR (kind = 'purchase' AND status = 'open')), \
                (SELECT COUNT(*) FROM payment_refunds WHERE status = 'pending') \
                  + (SELECT COUNT(*) FROM sandbox_processor_notifications \
                     WHERE sequence > COALESCE((SELECT MAX(last_sequence) FROM processor_cursors), 0)), \
                (SELECT COUNT(*) FROM ledger_entries e WHERE e.status = 'pending' \
                   AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.pending_entry_id = e.id))",
    )
    .fetch_one(pool)
    .await)
    .expect("pending counts")
}

async fn entries_of(channel: &Channel, token: &str, code: &str) -> Vec<pb::Entry> {
    let mut out = Vec::new();
    let mut page = String::new();
    loop {
        let r = pb::ledger_client::LedgerClient::new(channel.clone())
            .list_entries(authed(
                pb::ListEntriesRequest {
                    account_code: code.into(),
                    page_size: 500,
                    page_token: page.clone(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .unwrap_or_else(|e| panic!("listing the entries of {code}: {e}"))
            .into_inner();
        out.extend(r.entries);
        if r.next_page_token.is_empty() {
            return out;
        }
        page = r.next_page_token;
    }
}

/// Whether an entry's postings moved money: not a reservation (its postings are
/// pending; the entry that posted it carries the posted ones).
fn moved_money(e: &pb::Entry) -> bool {
    !(e.expires_at.is_some() && e.pending_entry_id.is_empty())
}

/// Credit-normal net per account code (credits minus debits).
fn net(entries: &[&pb::Entry]) -> HashMap<String, i64> {
    let mut out: HashMap<String, i64> = HashMap::new();
    for e in entries {
        for p in &e.postings {
            let v = cents(&p.amount);
            let signed = if p.direction == pb::Direction::Credit as i32 { v } else { -v };
            *out.entry(p.account_code.clone()).or_default() += signed;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// One run

async fn run(backend: Backend) {
    let knobs = Knobs::from_env();
    let name = backend.name();
    eprintln!(
        "[chaos] {name}: seed {} (CHAOS_SEED={} reproduces the choices), {} kills, {:?} load, {} clients, {} users, {}",
        knobs.seed,
        knobs.seed,
        knobs.kills,
        knobs.load,
        knobs.clients,
        knobs.users,
        knobs.bin.display()
    );
    let t0 = Instant::now();
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos").join(format!("{name}-{}", knobs.seed));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work folder");
    let mut pg: Option<PgDatabase> = None;
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", work.join("dmpay.db").display()),
        Backend::Postgres => {
            let db = PgDatabase::create(&knobs.postgres_url, knobs.keep).await;
            let url = dmpay::store::with_database(&knobs.postgres_url, &db.name);
            pg = Some(db);
            url
        }
    };
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let env: Vec<(String, String)> = [
        ("DMPAY_ENV", "development"),
        // The crash test is about crashes: its clients write as fast as they can, which a
        // production rate limit would (rightly) refuse.
        ("DMPAY_RATE_VERIFIED_PER_SECOND", "1000000"),
        ("DMPAY_RATE_VERIFIED_BURST", "1000000"),
        ("DMPAY_RATE_SERVICE_PER_SECOND", "1000000"),
        ("DMPAY_RATE_SERVICE_BURST", "1000000"),
        ("DMPAY_DATABASE_URL", url.as_str()),
        ("DMPAY_GRPC_ADDR", &addr.to_string()),
        ("DMPAY_METRICS_ADDR", "off"),
        ("DMPAY_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,dmpay::telemetry=warn"),
        // The resolver (every 2 s) takes payments idle this long.
        ("DMPAY_PAYMENTS_RESOLVE_AFTER", "1s"),
        ("DMPAY_SANDBOX_LATENCY", &knobs.sandbox_latency),
        // A card fee, so the fee's path is crashed too.
        ("DMPAY_CARD_FEE_BPS", "290"),
        ("DMPAY_CARD_FEE_FIXED_MINOR", "30"),
        // No daily limit in reach: a refusal by the limit writes nothing, so a retry of
        // it could rightly succeed later and no longer be the original outcome.
        ("DMPAY_LIMIT_VERIFIED_DAILY_MAX", "1000000000"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let mut server =
        Server { bin: knobs.bin.clone(), env, addr, log: work.join("server.log"), child: None, starts: 0, kills: 0 };
    server.start();
    server.wait_ready().await.unwrap_or_else(|e| panic!("{e}"));
    let db = Db::connect_url(&url, 4, Duration::from_secs(10)).await.expect("the test's own connection");

    let dev = HashMap::from([("DMPAY_ENV".to_string(), "development".to_string())]);
    let config = dmpay::config::Config::load_from(&dev, None).expect("dev config");
    let ttl = knobs.load + Duration::from_secs(3600);
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let users: Vec<User> = (0..knobs.users)
        .map(|i| {
            let name = format!("chaos-{run_id}-u{i}");
            let token = dmpay::auth::mint_dev_token(&config.jwt(), &name, PAY_SCOPES, ttl).expect("mint");
            User { name, token, has_card: i % 8 != 7, disputes: i % 8 == 3 }
        })
        .collect();
    let service_token = dmpay::auth::mint_dev_token(&config.jwt(), SERVICE, SERVICE_SCOPES, ttl).expect("mint");
    let mut channels = Vec::new();
    for _ in 0..knobs.clients.div_ceil(4) {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        );
    }
    let ctx = Arc::new(Ctx {
        users,
        listing_id: Mutex::new(String::new()),
        service_token,
        channels,
        calls: Mutex::new(Vec::new()),
        refundable: Mutex::new(Vec::new()),
        problems: Mutex::new(Vec::new()),
        unanswered: Mutex::new(BTreeMap::new()),
        retried_calls: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        concurrent: AtomicU64::new(0),
        fatal: AtomicBool::new(false),
    });

    // Setup, before any crash: verified accounts, funded wallets, linked cards.
    let mut rng = StdRng::seed_from_u64(knobs.seed);
    let channel = ctx.channels[0].clone();
    for (i, u) in ctx.users.iter().enumerate() {
        pb::accounts_client::AccountsClient::new(channel.clone())
            .upsert_account(authed(
                pb::UpsertAccountRequest {
                    user_id: u.name.clone(),
                    display_name: u.name.clone(),
                    tier: pb::Tier::Verified as i32,
                },
                &ctx.service_token,
            ))
            .await
            .expect("upsert account");
        let funded =
            ctx.call(&mut rng, &channel, Caller::Service, topup(format!("fund-{i}"), &u.name, FUNDING_CENTS)).await;
        assert!(matches!(funded, Ok(Outcome::Entry { .. })), "funding {}: {funded:?}", u.name);
        if u.has_card {
            let mut methods = pb::payment_methods_client::PaymentMethodsClient::new(channel.clone());
            let pm = methods
                .tokenize_card(authed(
                    pb::TokenizeCardRequest {
                        card_number: if u.disputes { DISPUTED_CARD } else { CARD }.into(),
                        exp_month: 12,
                        exp_year: 2034,
                        cvc: "123".into(),
                        holder_name: "Chaos Tester".into(),
                        postal_code: "10115".into(),
                    },
                    &u.token,
                ))
                .await
                .expect("tokenize")
                .into_inner();
            methods
                .link_payment_method(authed(
                    pb::LinkPaymentMethodRequest { token: pm.token, make_default: true },
                    &u.token,
                ))
                .await
                .expect("link card");
        }
    }
    // The live stream's seller and listing (unlimited units) for the tab workload.
    let seller = format!("chaos-{run_id}-seller");
    let seller_token = dmpay::auth::mint_dev_token(&config.jwt(), &seller, PAY_SCOPES, ttl).expect("mint");
    let mut accounts = pb::accounts_client::AccountsClient::new(channel.clone());
    accounts
        .upsert_account(authed(
            pb::UpsertAccountRequest { user_id: seller.clone(), display_name: "seller".into(), tier: 0 },
            &ctx.service_token,
        ))
        .await
        .expect("seller account");
    accounts
        .set_seller(authed(
            pb::SetSellerRequest {
                user_id: seller.clone(),
                seller: true,
                commission_bps: None,
                reason: "chaos".into(),
            },
            &ctx.service_token,
        ))
        .await
        .expect("set seller");
    let listing = pb::shopping_client::ShoppingClient::new(channel.clone())
        .create_listing(authed(
            pb::CreateListingRequest {
                idempotency_key: "chaos-listing".into(),
                stream_id: STREAM.into(),
                title: "Chaos mug".into(),
                unit_price: usd(UNIT_CENTS),
                unlimited: true,
                per_buyer_max: 1_000_000,
                ..Default::default()
            },
            &seller_token,
        ))
        .await
        .expect("create listing")
        .into_inner();
    *ctx.listing_id.lock().expect("lock") = listing.listing_id;
    let setup_s = t0.elapsed().as_secs_f64();

    // The load, with crashes.
    let schedule = kill_schedule(&mut rng, knobs.kills, knobs.load);
    let started = Instant::now();
    let until = started + knobs.load;
    let killer_task = tokio::spawn(killer(name, server, schedule, started, ctx.clone()));
    let mut clients = tokio::task::JoinSet::new();
    for w in 0..knobs.clients {
        clients.spawn(client(ctx.clone(), w, knobs.seed, until));
    }
    // The killer finishes within the load phase; clients finish their last call, which
    // needs the server up.
    let mut server = killer_task.await.expect("killer");
    while let Some(r) = clients.join_next().await {
        r.expect("client task");
    }
    let load_s = started.elapsed().as_secs_f64();

    // The last crash, then the resolver finishes whatever was left pending.
    let resolve_started = Instant::now();
    server.kill();
    eprintln!("[chaos] {name}: final kill #{}; restarting and waiting for the resolver", server.kills);
    server.start();
    server.wait_ready().await.unwrap_or_else(|e| panic!("{e}"));
    let mut left = unfinished(&db).await;
    while left != (0, 0, 0) && resolve_started.elapsed() < RESOLVE_WAIT_MAX {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = unfinished(&db).await;
    }
    if left != (0, 0, 0) {
        ctx.problem(
            "resolver left work",
            format!(
                "after {RESOLVE_WAIT_MAX:?} the resolver left {} payments and payouts pending, {} refunds pending and \
             processor notifications unapplied, and {} ledger reservations open",
                left.0, left.1, left.2
            ),
        );
    }
    let resolve_s = resolve_started.elapsed().as_secs_f64();

    // Every call once more: each must answer as it did, and write nothing.
    let checks_started = Instant::now();
    let rows = payment_rows(&db).await;
    let failure_of: HashMap<&str, &str> = rows
        .iter()
        .filter(|r| r.status == "failed")
        .map(|r| (r.payment_id.as_str(), r.failure_reason.as_str()))
        .collect();
    let before = row_counts(&db).await;
    let calls: Vec<Call> = ctx.calls.lock().expect("lock").clone();
    let replays = {
        let sem = Arc::new(tokio::sync::Semaphore::new(knobs.clients));
        let mut set = tokio::task::JoinSet::new();
        for (i, call) in calls.iter().cloned().enumerate() {
            let (ctx, sem) = (ctx.clone(), sem.clone());
            let channel = ctx.channels[i % ctx.channels.len()].clone();
            set.spawn(async move {
                // A refusal that wrote nothing has nothing to replay: sent again now, it
                // would be a new request (and write).
                if wrote_nothing(&call.req, &call.outcome) {
                    return (i, Ok(call.outcome.clone()));
                }
                let _permit = sem.acquire_owned().await.expect("semaphore");
                (i, ctx.until_answered(&channel, call.caller, &call.req).await)
            });
        }
        let mut out = vec![None; calls.len()];
        while let Some(r) = set.join_next().await {
            let (i, outcome) = r.expect("replay task");
            out[i] = Some(outcome);
        }
        out
    };
    for (call, replay) in calls.iter().zip(&replays) {
        match replay {
            Some(Ok(again)) => {
                let final_failure = match &call.outcome {
                    Outcome::Payment { id, .. } => failure_of.get(id.as_str()).copied(),
                    _ => None,
                };
                if !wrote_nothing(&call.req, &call.outcome) && !same_outcome(&call.outcome, again, final_failure) {
                    ctx.problem(
                        "replay answered differently",
                        format!(
                            "replay of {} {} by {:?}: answered {} where the original answered {}",
                            call.req.name(),
                            call.req.key(),
                            call.caller,
                            again.short(),
                            call.outcome.short()
                        ),
                    );
                }
            }
            Some(Err(e)) => ctx.problem("no answer", format!("replay: {e}")),
            None => ctx.problem("no answer", "a replay did not run".into()),
        }
    }
    let after = row_counts(&db).await;
    if before != after {
        ctx.problem(
            "replay wrote",
            format!("replaying the calls wrote to the database: rows before {before:?}, after {after:?}"),
        );
    }

    let stats = check(&ctx, &db, &server, &calls).await;
    let kills = server.kills;
    server.kill();
    let checks_s = checks_started.elapsed().as_secs_f64();

    let problems = ctx.problems.lock().expect("lock").clone();
    let unanswered = ctx.unanswered.lock().expect("lock").clone();
    eprintln!(
        "[chaos] {name}: seed {}, {} kills, {} calls ({} needed a retry after no answer; attempts without an answer: {:?}; \
         {} duplicates sent after the answer, {} pairs sent at once, {} replays); {}; setup {setup_s:.1}s, load {load_s:.1}s, resolve {resolve_s:.1}s, \
         checks {checks_s:.1}s, total {:.1}s",
        knobs.seed,
        kills,
        calls.len(),
        ctx.retried_calls.load(Ordering::Relaxed),
        unanswered,
        ctx.duplicates.load(Ordering::Relaxed),
        ctx.concurrent.load(Ordering::Relaxed),
        calls.len(),
        stats,
        t0.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        if !knobs.keep {
            let _ = std::fs::remove_dir_all(&work);
        }
        drop(pg);
        return;
    }
    let listing = work.join("problems.txt");
    let all: Vec<String> = problems.iter().map(|(kind, p)| format!("[{kind}] {p}")).collect();
    let _ = std::fs::write(&listing, all.join("\n") + "\n");
    let mut by_kind: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (kind, p) in &problems {
        by_kind.entry(kind).or_default().push(p);
    }
    eprintln!(
        "[chaos] {name}: {} problems (seed {}; all of them in {}, the server log{} in {}); by kind, with examples:",
        problems.len(),
        knobs.seed,
        listing.display(),
        if backend == Backend::Sqlite { " and the database" } else { "" },
        work.display()
    );
    for (kind, list) in &by_kind {
        eprintln!("  {kind}: {}", list.len());
        for p in list.iter().take(4) {
            eprintln!("    - {p}");
        }
    }
    panic!("chaos {name}: {} problems, seed {} (CHAOS_SEED={} to rerun)", problems.len(), knobs.seed, knobs.seed);
}

/// Everything the crash must not have broken. Problems go to `ctx`; returns a summary.
async fn check(ctx: &Ctx, db: &Db, server: &Server, calls: &[Call]) -> String {
    let channel = &ctx.channels[0];
    let token = &ctx.service_token;
    let problem = |kind: &'static str, p: String| ctx.problem(kind, p);

    // 1. Every answer is one the workload can get: payments, requests, entries, and
    // payment failures for want of funds or of a card.
    for c in calls {
        if let Outcome::Error { code, reason, message } = &c.outcome {
            let expected = match &c.req {
                // A payout may also run into the day's payout limit.
                // A recipient of a disputed payment may owe: they cannot move money out.
                CallReq::Send(_) | CallReq::Pay(_) | CallReq::Refund(_)
                    if *code == Code::FailedPrecondition && reason == OWING =>
                {
                    true
                }
                CallReq::Payout(_) => {
                    (*code == Code::FailedPrecondition
                        && matches!(reason.as_str(), "INSUFFICIENT_FUNDS" | "NO_PAYMENT_METHOD" | OWING))
                        || (*code == Code::ResourceExhausted && reason == "PAYOUT_DAILY_LIMIT")
                }
                // A viewer who owes for a disputed payment cannot open a tab or buy.
                CallReq::OpenTab(_) | CallReq::Buy(_) => *code == Code::FailedPrecondition && reason == OWING,
                _ => {
                    *code == Code::FailedPrecondition
                        && match &c.req {
                            CallReq::Send(_) | CallReq::Pay(_) => {
                                matches!(reason.as_str(), "INSUFFICIENT_FUNDS" | "NO_PAYMENT_METHOD")
                            }
                            CallReq::Refund(_) => reason == "INSUFFICIENT_FUNDS",
                            _ => false,
                        }
                }
            };
            if !expected {
                problem(
                    "unexpected answer",
                    format!(
                        "{} {} by {:?} answered {code:?} {reason} ({message})",
                        c.req.name(),
                        c.req.key(),
                        c.caller
                    ),
                );
            }
        }
    }

    // 2. Payment rows against the calls: each row belongs to one call, and each answer
    // matches its row.
    let rows = payment_rows(db).await;
    let by_key: HashMap<(&str, &str), &PaymentRow> =
        rows.iter().map(|r| ((r.sender_id.as_str(), r.idempotency_key.as_str()), r)).collect();
    let by_id: HashMap<&str, &PaymentRow> = rows.iter().map(|r| (r.payment_id.as_str(), r)).collect();
    let mut payment_calls: HashSet<(String, String)> = HashSet::new();
    let mut acked_payment_ids: HashMap<&str, usize> = HashMap::new();
    let mut acked_pending = 0;
    for c in calls {
        let (Caller::User(u), CallReq::Send(_) | CallReq::Pay(_)) = (c.caller, &c.req) else { continue };
        let sender = ctx.users[u].name.as_str();
        payment_calls.insert((sender.to_owned(), c.req.key().to_owned()));
        let row = by_key.get(&(sender, c.req.key())).copied();
        match (&c.outcome, row) {
            (Outcome::Payment { id, status, amount, card, fee }, Some(row)) => {
                *acked_payment_ids.entry(id.as_str()).or_default() += 1;
                if row.payment_id != *id {
                    problem(
                        "payment answer vs row",
                        format!(
                            "{} {} by {sender} answered payment {id} but its key holds payment {}",
                            c.req.name(),
                            c.req.key(),
                            row.payment_id
                        ),
                    );
                }
                if (row.amount, row.card_amount, row.fee_amount) != (*amount, *card, *fee) {
                    problem(
                        "payment answer vs row",
                        format!(
                            "payment {id}: answered amount/card/fee {amount}/{card}/{fee}, stored {}/{}/{}",
                            row.amount, row.card_amount, row.fee_amount
                        ),
                    );
                }
                if *status == pb::PaymentStatus::Pending as i32 {
                    acked_pending += 1;
                } else if *status == pb::PaymentStatus::Settled as i32 && !row.settled() {
                    problem(
                        "payment answer vs row",
                        format!("payment {id} was answered SETTLED but is {} ({})", row.status, row.failure_reason),
                    );
                } else if *status == pb::PaymentStatus::Failed as i32 {
                    problem(
                        "payment answer vs row",
                        format!("payment {id} was answered as a FAILED payment instead of an error"),
                    );
                }
            }
            (Outcome::Payment { id, .. }, None) => problem(
                "payment answer vs row",
                format!("{} {} by {sender} answered payment {id}, which is not stored", c.req.name(), c.req.key()),
            ),
            (Outcome::Error { reason, .. }, Some(row)) => {
                // A refusal for a debt wrote nothing; a later attempt of the call, once
                // the debt was repaid, made the row.
                if reason != OWING && (row.status != "failed" || row.failure_reason != *reason) {
                    problem(
                        "payment answer vs row",
                        format!(
                            "{} {} by {sender} answered {reason} but its payment {} is {} ({})",
                            c.req.name(),
                            c.req.key(),
                            row.payment_id,
                            row.status,
                            row.failure_reason
                        ),
                    );
                }
            }
            (Outcome::Error { .. }, None) => {}
            (other, _) => {
                problem("payment answer vs row", format!("{} {} answered {}", c.req.name(), c.req.key(), other.short()))
            }
        }
    }
    for (id, n) in &acked_payment_ids {
        if *n > 1 {
            problem("payment answer vs row", format!("payment {id} was answered to {n} different calls"));
        }
    }
    for r in &rows {
        if !payment_calls.contains(&(r.sender_id.clone(), r.idempotency_key.clone())) {
            problem(
                "payment without a call",
                format!(
                    "payment {} ({} from {} with key {}) belongs to no call: a duplicate",
                    r.payment_id, r.status, r.sender_id, r.idempotency_key
                ),
            );
        }
        if r.status == "pending" {
            problem("resolver left work", format!("payment {} is still pending", r.payment_id));
        }
    }

    // 3. Requests: each answered once, paid by the payment its pay answered.
    let requests = request_rows(db).await;
    let request_by_key: HashMap<(&str, &str), &RequestRow> =
        requests.iter().map(|r| ((r.requester_id.as_str(), r.idempotency_key.as_str()), r)).collect();
    let mut request_calls = HashSet::new();
    for c in calls {
        let (Caller::User(u), CallReq::Request(req)) = (c.caller, &c.req) else { continue };
        let requester = ctx.users[u].name.as_str();
        request_calls.insert((requester.to_owned(), req.idempotency_key.clone()));
        match (&c.outcome, request_by_key.get(&(requester, req.idempotency_key.as_str()))) {
            (Outcome::Request { id }, Some(row)) if row.request_id == *id => {}
            (outcome, row) => problem(
                "request answer vs row",
                format!(
                    "RequestPayment {} by {requester} answered {} but stored {:?}",
                    req.idempotency_key,
                    outcome.short(),
                    row.map(|r| &r.request_id)
                ),
            ),
        }
    }
    for r in &requests {
        if !request_calls.contains(&(r.requester_id.clone(), r.idempotency_key.clone())) {
            problem("request without a call", format!("request {} belongs to no call: a duplicate", r.request_id));
        }
        if let Some(pid) = &r.payment_id {
            match by_id.get(pid.as_str()) {
                Some(p) if p.settled() && p.request_id.as_deref() == Some(r.request_id.as_str()) => {}
                other => problem(
                    "request paid wrongly",
                    format!(
                        "request {} ({}) is paid by {pid}, which is {:?}",
                        r.request_id,
                        r.status,
                        other.map(|p| (&p.status, &p.request_id))
                    ),
                ),
            }
        }
    }
    let mut live_per_request: HashMap<&str, usize> = HashMap::new();
    for p in &rows {
        if let (Some(rid), true) = (&p.request_id, p.settled()) {
            *live_per_request.entry(rid.as_str()).or_default() += 1;
        }
    }
    for (rid, n) in live_per_request {
        if n > 1 {
            problem("request paid wrongly", format!("request {rid} was paid {n} times"));
        }
        if !requests.iter().any(|r| r.request_id == rid && r.status == "paid") {
            problem("request paid wrongly", format!("request {rid} has a settled payment but is not paid"));
        }
    }

    // 4. Refunds: each row belongs to one call, completed if answered with the payment,
    // failed if answered with an error.
    let refunds = refund_rows(db).await;
    let refund_by_key: HashMap<(&str, &str), &RefundRow> =
        refunds.iter().map(|r| ((r.created_by.as_str(), r.idempotency_key.as_str()), r)).collect();
    let mut refund_calls = HashSet::new();
    for c in calls {
        let (Caller::User(u), CallReq::Refund(req)) = (c.caller, &c.req) else { continue };
        let recipient = ctx.users[u].name.as_str();
        refund_calls.insert((recipient.to_owned(), req.idempotency_key.clone()));
        let row = refund_by_key.get(&(recipient, req.idempotency_key.as_str()));
        let ok = match (&c.outcome, row) {
            (Outcome::Payment { id, .. }, Some(r)) => {
                r.status == "completed"
                    && r.payment_id == *id
                    && req.amount.as_ref().is_none_or(|_| cents(&req.amount) == r.amount)
            }
            (Outcome::Error { reason, .. }, Some(r)) => r.status == "failed" || reason == OWING,
            (Outcome::Error { .. }, None) => true,
            _ => false,
        };
        if !ok {
            problem(
                "refund answer vs row",
                format!(
                    "RefundPayment {} by {recipient} of {} answered {} but stored {:?}",
                    req.idempotency_key,
                    req.payment_id,
                    c.outcome.short(),
                    row.map(|r| (&r.refund_id, &r.status, r.amount))
                ),
            );
        }
    }
    let mut refunded: HashMap<&str, i64> = HashMap::new();
    for r in &refunds {
        if !refund_calls.contains(&(r.created_by.clone(), r.idempotency_key.clone())) {
            problem("refund without a call", format!("refund {} belongs to no call: a duplicate", r.refund_id));
        }
        if r.status == "completed" {
            *refunded.entry(r.payment_id.as_str()).or_default() += r.amount;
        }
    }
    for p in &rows {
        let sum = refunded.get(p.payment_id.as_str()).copied().unwrap_or(0);
        if sum != p.refunded_amount {
            problem(
                "refunded amount",
                format!(
                    "payment {}: refunded_amount {} but completed refunds total {sum}",
                    p.payment_id, p.refunded_amount
                ),
            );
        }
    }

    // 4b. Payouts: each row belongs to one call, answered with it (or its failure; a
    // PENDING answer may end either way), and none is left pending.
    let payouts = payout_rows(db).await;
    let payout_by_key: HashMap<(&str, &str), &PayoutRow> =
        payouts.iter().map(|r| ((r.user_id.as_str(), r.idempotency_key.as_str()), r)).collect();
    let mut payout_calls = HashSet::new();
    for c in calls {
        let (Caller::User(u), CallReq::Payout(req)) = (c.caller, &c.req) else { continue };
        let user = ctx.users[u].name.as_str();
        payout_calls.insert((user.to_owned(), req.idempotency_key.clone()));
        let row = payout_by_key.get(&(user, req.idempotency_key.as_str()));
        let ok = match (&c.outcome, row) {
            // PENDING promises nothing yet: a retry of a call whose first attempt died
            // with the server answers the row as it stands, before its hold, and the
            // resolver may then find the wallet spent meanwhile (INSUFFICIENT_FUNDS) or
            // the push declined.
            (Outcome::Payout { id, status }, Some(r)) => {
                r.payout_id == *id && (r.status != "failed" || *status == pb::PayoutStatus::Pending as i32)
            }
            // A refusal before the row: a later attempt of the call made the row.
            (outcome @ Outcome::Error { reason, .. }, Some(r)) => {
                wrote_nothing(&c.req, outcome) || (r.status == "failed" && r.failure_reason == *reason)
            }
            (Outcome::Error { .. }, None) => true,
            _ => false,
        };
        if !ok {
            problem(
                "payout answer vs row",
                format!(
                    "CreatePayout {} by {user} answered {} but stored {:?}",
                    req.idempotency_key,
                    c.outcome.short(),
                    row.map(|r| (&r.payout_id, &r.status, &r.failure_reason))
                ),
            );
        }
    }
    for r in &payouts {
        if !payout_calls.contains(&(r.user_id.clone(), r.idempotency_key.clone())) {
            problem("payout without a call", format!("payout {} belongs to no call: a duplicate", r.payout_id));
        }
        if r.status == "pending" {
            problem("resolver left work", format!("payout {} is still pending", r.payout_id));
        }
    }

    // 5. The ledger: every entry that touched a wallet, the clearing account or the
    // treasury.
    let mut entries: BTreeMap<String, pb::Entry> = BTreeMap::new();
    let mut codes: Vec<String> = ctx.users.iter().map(|u| wallet(&u.name)).collect();
    codes.extend([CLEARING.to_owned(), TREASURY.to_owned(), FEES.to_owned()]);
    for code in &codes {
        for e in entries_of(channel, token, code).await {
            entries.entry(e.entry_id.clone()).or_insert(e);
        }
    }
    let mut per_payment: HashMap<&str, Vec<&pb::Entry>> = HashMap::new();
    let mut per_refund: HashMap<&str, Vec<&pb::Entry>> = HashMap::new();
    let mut topup_entries: HashMap<&str, &pb::Entry> = HashMap::new();
    let mut per_payout: HashMap<&str, Vec<&pb::Entry>> = HashMap::new();
    let mut per_dispute: HashMap<&str, Vec<&pb::Entry>> = HashMap::new();
    let mut repayments: Vec<&pb::Entry> = Vec::new();
    for e in entries.values().filter(|e| moved_money(e)) {
        if let Some(d) = e.metadata.get("dispute_id") {
            per_dispute.entry(d.as_str()).or_default().push(e);
        } else if e.kind == "receivable_repayment" {
            repayments.push(e);
        } else if let Some(po) = e.metadata.get("payout_id") {
            per_payout.entry(po.as_str()).or_default().push(e);
        } else if let Some(rid) = e.metadata.get("refund_id") {
            per_refund.entry(rid.as_str()).or_default().push(e);
        } else if let Some(pid) = e.metadata.get("payment_id") {
            per_payment.entry(pid.as_str()).or_default().push(e);
            if !by_id.contains_key(pid.as_str()) {
                problem(
                    "ledger booking",
                    format!("entry {} ({}) books payment {pid}, which does not exist", e.entry_id, e.kind),
                );
            }
        } else if e.kind == TOPUP_KIND {
            topup_entries.insert(e.entry_id.as_str(), e);
        } else if (e.kind == "tab_capture" && e.metadata.contains_key("tab_id"))
            || (e.kind == "shop_purchase" && e.metadata.contains_key("purchase_id"))
        {
            // Checked with the tabs (`check_tabs`): a tab's capture, and a purchase by
            // card, whose fee reaches fee income.
        } else {
            problem(
                "ledger booking",
                format!("entry {} ({}) moved money for no payment, refund or top-up", e.entry_id, e.kind),
            );
        }
    }
    let mut card_entries = 0;
    for p in &rows {
        let booked = per_payment.get(p.payment_id.as_str()).cloned().unwrap_or_default();
        let nets = net(&booked);
        let get = |code: &str| nets.get(code).copied().unwrap_or(0);
        let (sender, recipient) = (wallet(&p.sender_id), wallet(&p.recipient_id));
        let card: Vec<&&pb::Entry> = booked.iter().filter(|e| e.kind == "dm_payment_card").collect();
        card_entries += card.len();
        if p.settled() {
            let expected_entries = usize::from(p.wallet_amount > 0) + usize::from(p.card_amount > 0);
            let ok = get(&recipient) == p.amount
                && get(&sender) == -p.wallet_amount
                && get(CLEARING) == -(p.card_amount + p.fee_amount)
                && get(FEES) == p.fee_amount
                && booked.len() == expected_entries
                && card.len() == usize::from(p.card_amount > 0);
            if !ok {
                problem(
                    "ledger booking",
                    format!(
                        "settled payment {} ({} = wallet {} + card {}, fee {}) is booked as {:?} in entries {:?}",
                        p.payment_id,
                        p.amount,
                        p.wallet_amount,
                        p.card_amount,
                        p.fee_amount,
                        nets,
                        booked.iter().map(|e| (&e.entry_id, &e.kind)).collect::<Vec<_>>()
                    ),
                );
            }
            if p.card_amount > 0 {
                let reference = card.first().and_then(|e| e.metadata.get("processor_reference"));
                if reference.is_none() || reference != p.capture_ref.as_ref() {
                    problem(
                        "processor vs ledger",
                        format!(
                            "payment {}: capture {:?} but its card entry names {reference:?}",
                            p.payment_id, p.capture_ref
                        ),
                    );
                }
            }
        } else if !booked.is_empty() {
            problem(
                "ledger booking",
                format!(
                    "{} payment {} ({}) moved money: {:?} in entries {:?}",
                    p.status,
                    p.payment_id,
                    p.failure_reason,
                    nets,
                    booked.iter().map(|e| (&e.entry_id, &e.kind)).collect::<Vec<_>>()
                ),
            );
        }
    }
    for r in &refunds {
        let booked = per_refund.get(r.refund_id.as_str()).cloned().unwrap_or_default();
        let payment = by_id.get(r.payment_id.as_str());
        let ok = match (r.status.as_str(), payment) {
            ("completed", Some(p)) => {
                let nets = net(&booked);
                booked.len() == 1
                    && nets.get(&wallet(&p.recipient_id)).copied() == Some(-r.amount)
                    && nets.get(&wallet(&p.sender_id)).copied() == Some(r.amount)
            }
            ("failed", Some(_)) => booked.is_empty(),
            _ => false,
        };
        if !ok {
            problem(
                "ledger booking",
                format!(
                    "{} refund {} of {} ({}) is booked in {:?}",
                    r.status,
                    r.refund_id,
                    r.payment_id,
                    r.amount,
                    booked.iter().map(|e| (&e.entry_id, net(&[e]))).collect::<Vec<_>>()
                ),
            );
        }
    }
    // A paid payout moved its amount out of the wallet, its fee to fee income and its
    // net to the processor (in-transit and back); a failed one moved nothing.
    for r in &payouts {
        let booked = per_payout.get(r.payout_id.as_str()).cloned().unwrap_or_default();
        let nets = net(&booked);
        let get = |code: &str| nets.get(code).copied().unwrap_or(0);
        let ok = match r.status.as_str() {
            "paid" => {
                get(&wallet(&r.user_id)) == -r.amount
                    && get(FEES) == r.fee
                    && get(CLEARING) == r.amount - r.fee
                    && get(IN_TRANSIT) == 0
                    && r.processor_ref.is_some()
            }
            _ => nets.values().all(|v| *v == 0),
        };
        if !ok {
            problem(
                "ledger booking",
                format!(
                    "{} payout {} ({}, fee {}) is booked as {nets:?} in entries {:?}",
                    r.status,
                    r.payout_id,
                    r.amount,
                    r.fee,
                    booked.iter().map(|e| (&e.entry_id, &e.kind)).collect::<Vec<_>>()
                ),
            );
        }
    }
    // Each dispute is booked once, as its row says: the amount taken back through
    // clearing, from the recipient's wallet and receivable (and the platform's share).
    let disputes = dispute_rows(db).await;
    for d in &disputes {
        let booked: Vec<&pb::Entry> = per_dispute
            .get(d.dispute_id.as_str())
            .map(|v| v.iter().copied().filter(|e| e.kind == "dispute").collect())
            .unwrap_or_default();
        let nets = net(&booked);
        let get = |code: &str| nets.get(code).copied().unwrap_or(0);
        let receivable = format!("user:{}:receivable:USD", d.recovered_from);
        let ok = booked.len() == 1
            && get(CLEARING) == d.amount
            && get(&wallet(&d.recovered_from)) == -d.from_wallet
            && get(&receivable) == -d.to_receivable;
        if !ok {
            problem(
                "ledger booking",
                format!(
                    "dispute {} of payment {} ({}: wallet {}, receivable {}) is booked as {nets:?} in {} entries",
                    d.dispute_id,
                    d.payment_id,
                    d.amount,
                    d.from_wallet,
                    d.to_receivable,
                    booked.len()
                ),
            );
        }
    }
    let mut acked_topups = 0;
    let mut expected: HashMap<String, i64> = HashMap::new();
    // Disputes and the repayments of debts move wallet money without a call of their
    // own: what they booked (checked above) is expected.
    for e in per_dispute.values().flatten().chain(repayments.iter()) {
        for (code, v) in net(&[*e]) {
            if code.ends_with(":wallet:USD") {
                *expected.entry(code).or_default() += v;
            }
        }
    }
    for c in calls {
        let CallReq::Topup(req) = &c.req else { continue };
        if let Outcome::Entry { id } = &c.outcome {
            acked_topups += 1;
            match topup_entries.get(id.as_str()) {
                Some(e) => {
                    for (code, v) in net(&[*e]) {
                        if code != TREASURY {
                            *expected.entry(code).or_default() += v;
                        }
                    }
                }
                None => problem(
                    "ledger booking",
                    format!("top-up {} answered entry {id}, which is not in the ledger", req.idempotency_key),
                ),
            }
        }
    }
    if topup_entries.len() != acked_topups {
        problem(
            "ledger booking",
            format!("{} top-up entries in the ledger for {acked_topups} acknowledged top-ups", topup_entries.len()),
        );
    }

    // 6. Every wallet holds what the acknowledged calls say, has nothing reserved, and
    // is not negative.
    for p in rows.iter().filter(|p| p.settled()) {
        *expected.entry(wallet(&p.recipient_id)).or_default() += p.amount;
        *expected.entry(wallet(&p.sender_id)).or_default() -= p.wallet_amount;
    }
    for r in payouts.iter().filter(|r| r.status == "paid") {
        *expected.entry(wallet(&r.user_id)).or_default() -= r.amount;
    }
    for r in refunds.iter().filter(|r| r.status == "completed") {
        if let Some(p) = by_id.get(r.payment_id.as_str()) {
            *expected.entry(wallet(&p.recipient_id)).or_default() -= r.amount;
            *expected.entry(wallet(&p.sender_id)).or_default() += r.amount;
        }
    }
    let mut total_wallets = 0;
    for u in &ctx.users {
        let code = wallet(&u.name);
        let b = pb::ledger_client::LedgerClient::new(channel.clone())
            .get_ledger_balance(authed(pb::GetLedgerBalanceRequest { account_code: code.clone(), as_of: None }, token))
            .await
            .unwrap_or_else(|e| panic!("balance of {code}: {e}"))
            .into_inner();
        let (posted, available) = (cents(&b.posted), cents(&b.available));
        let (pd, pc) = (cents(&b.pending_debits), cents(&b.pending_credits));
        total_wallets += posted;
        let want = expected.get(&code).copied().unwrap_or(0);
        if posted != want || available != posted || pd != 0 || pc != 0 {
            problem("wallet balance", format!(
                "wallet {code}: posted {posted}, available {available}, pending -{pd}/+{pc}; the acknowledged calls make it {want}"
            ));
        }
        if posted < 0 || available < 0 {
            problem("negative wallet", format!("wallet {code} is negative: posted {posted}, available {available}"));
        }
    }

    // 7. The sandbox processor's captures against the ledger's card entries.
    let processor = processor_calls(db).await;
    let mut captures = 0;
    let mut capture_refs: HashSet<&str> = HashSet::new();
    let mut auths_without_capture = 0;
    let succeeded: HashSet<&str> =
        processor.iter().filter(|c| c.status == "succeeded").map(|c| c.idempotency_key.as_str()).collect();
    let card_refs: Vec<(&str, &str, i64)> = entries
        .values()
        .filter(|e| e.kind == "dm_payment_card")
        .map(|e| {
            let nets = net(&[e]);
            (
                e.metadata.get("processor_reference").map(String::as_str).unwrap_or(""),
                e.metadata.get("payment_id").map(String::as_str).unwrap_or(""),
                -nets.get(CLEARING).copied().unwrap_or(0),
            )
        })
        .collect();
    for call in processor.iter().filter(|c| !c.idempotency_key.starts_with("tab:")) {
        match call.kind.as_str() {
            "capture" if call.status == "succeeded" => {
                captures += 1;
                capture_refs.insert(call.reference.as_str());
                let payment_id =
                    call.idempotency_key.strip_prefix("pay:").and_then(|k| k.strip_suffix(":capture")).unwrap_or("");
                let booked: Vec<&(&str, &str, i64)> =
                    card_refs.iter().filter(|(reference, _, _)| *reference == call.reference).collect();
                let ok = booked.len() == 1
                    && booked[0].1 == payment_id
                    && Some(booked[0].2) == call.amount
                    && by_id.get(payment_id).is_some_and(|p| p.settled());
                if !ok {
                    problem(
                        "processor vs ledger",
                        format!(
                            "capture {} ({}, {:?}) is booked {} times in the ledger: {booked:?}; its payment is {:?}",
                            call.reference,
                            call.idempotency_key,
                            call.amount,
                            booked.len(),
                            by_id.get(payment_id).map(|p| (&p.status, &p.failure_reason))
                        ),
                    );
                }
            }
            "authorize" if call.status == "succeeded" => {
                let capture_key = call.idempotency_key.replace(":auth", ":capture");
                if !succeeded.contains(capture_key.as_str()) {
                    auths_without_capture += 1;
                }
            }
            "refund" | "void" => problem(
                "processor vs ledger",
                format!("unexpected processor call {} ({}, {})", call.idempotency_key, call.kind, call.status),
            ),
            _ => {}
        }
    }
    for (reference, payment_id, amount) in &card_refs {
        if !capture_refs.contains(reference) {
            problem(
                "processor vs ledger",
                format!("card entry of payment {payment_id} ({amount}) names {reference:?}, which is no capture"),
            );
        }
    }
    let pushed = processor.iter().filter(|c| c.kind == "payout" && c.status == "succeeded").count();
    let paid_payouts = payouts.iter().filter(|r| r.status == "paid").count();
    if pushed != paid_payouts {
        problem("processor vs ledger", format!("{pushed} payouts pushed to cards for {paid_payouts} paid payouts"));
    }
    if card_entries != captures {
        problem("processor vs ledger", format!("{captures} captures for {card_entries} card entries of payments"));
    }
    if auths_without_capture > 0 {
        problem("processor vs ledger", format!("{auths_without_capture} card authorizations were never captured"));
    }

    // 7b. Stream tabs: closed, their spend the sum of their purchases, captured once.
    let tabs_summary = check_tabs(ctx, db, calls, &processor, &entries).await;

    // 8. The ledger verifies, in the library and through `dmpay finance verify`.
    match dmpay::ledger::verify::verify(db).await {
        Ok(report) if report.ok() => {}
        Ok(report) => problem("ledger verify", format!("ledger verify: {:?}", report.problems)),
        Err(e) => problem("ledger verify", format!("ledger verify failed to run: {e}")),
    }
    let out = Command::new(&server.bin)
        .args(["finance", "verify", "--addr", &format!("http://{}", server.addr)])
        .env("DMPAY_ENV", "development")
        .env_remove("DMPAY_CONFIG")
        .env_remove("DMPAY_TOKEN")
        .output()
        .expect("run dmpay finance verify");
    if !out.status.success() {
        problem(
            "ledger verify",
            format!(
                "dmpay finance verify exited {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }

    let settled = rows.iter().filter(|p| p.settled()).count();
    let failed = rows.iter().filter(|p| p.status == "failed").count();
    let card = rows.iter().filter(|p| p.settled() && p.card_amount > 0).count();
    let completed_refunds = refunds.iter().filter(|r| r.status == "completed").count();
    format!(
        "payments {settled} settled ({card} with a card) and {failed} failed, {acked_pending} answered PENDING; \
         {captures} captures; {completed_refunds} of {} refunds completed; {paid_payouts} of {} payouts paid; {} disputes ({} with a debt); {} requests; {acked_topups} top-ups; \
         {tabs_summary}; {} ledger entries; wallets hold {total_wallets} cents",
        refunds.len(),
        payouts.len(),
        disputes.len(),
        disputes.iter().filter(|d| d.to_receivable > 0).count(),
        requests.len(),
        entries.len()
    )
}

/// The stream tabs against their purchases, the processor and the ledger.
async fn check_tabs(
    ctx: &Ctx,
    db: &Db,
    calls: &[Call],
    processor: &[ProcessorCall],
    entries: &BTreeMap<String, pb::Entry>,
) -> String {
    let problem = |p: String| ctx.problem("stream tabs", p);
    type TabRow = (String, String, i64, Option<i64>, Option<String>, String);
    let tabs: Vec<TabRow> = dmpay::with_db!(db, pool => sqlx::query_as(
        "SELECT tab_id, status, spent, captured, capture_ref, kind FROM stream_tabs"
    )
    .fetch_all(pool)
    .await)
    .expect("tabs");
    let rows: Vec<(String, Option<String>, i64, i64, i64)> = dmpay::with_db!(db, pool => sqlx::query_as(
        "SELECT purchase_id, tab_id, amount, card_amount, fee_amount FROM purchases"
    )
    .fetch_all(pool)
    .await)
    .expect("purchases");
    // A card purchase's fee is booked once, to fee income, by its own entry (`entries`
    // holds every entry that touched fee income; the crash test's card fee is never 0).
    for (id, _, _, card, fee) in rows.iter().filter(|r| r.3 > 0) {
        let booked: Vec<&pb::Entry> = entries
            .values()
            .filter(|e| e.kind == "shop_purchase" && e.metadata.get("purchase_id") == Some(id))
            .collect();
        let fees = net(&booked).get(FEES).copied().unwrap_or(0);
        if booked.len() != 1 || fees != *fee {
            problem(format!(
                "card purchase {id} ({card} by card, fee {fee}): {} entries booking {fees} to fee income",
                booked.len()
            ));
        }
    }
    // What each purchase drew on its tab: a stream tab pays the whole amount, a card
    // purchase's own tab its card part and the card fee (`Purchase::tab_draw`).
    let purchases: Vec<(String, Option<String>, i64)> = rows
        .into_iter()
        .map(|(id, tab, amount, card, fee)| (id, tab, if card == 0 { amount } else { card + fee }))
        .collect();
    // Every purchase row belongs to one acknowledged purchase, and every acknowledged
    // purchase has its row.
    let acked: HashSet<&str> = calls
        .iter()
        .filter_map(|c| match (&c.req, &c.outcome) {
            (CallReq::Buy(_), Outcome::Purchase { id }) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let rows: HashSet<&str> = purchases.iter().map(|(id, _, _)| id.as_str()).collect();
    for id in acked.difference(&rows) {
        problem(format!("acknowledged purchase {id} has no row"));
    }
    for id in rows.difference(&acked) {
        problem(format!("purchase row {id} belongs to no acknowledged call"));
    }
    let mut on_tab: HashMap<&str, i64> = HashMap::new();
    for (_, tab, amount) in &purchases {
        match tab {
            Some(t) => *on_tab.entry(t.as_str()).or_default() += amount,
            None => problem("a purchase not drawn on a tab".into()),
        }
    }
    let mut captured_total = 0;
    for (id, status, spent, captured, capture_ref, _) in &tabs {
        let drawn = on_tab.get(id.as_str()).copied().unwrap_or(0);
        if *spent != drawn {
            problem(format!("tab {id}: spent {spent} but its purchases drew {drawn}"));
        }
        if status != "closed" {
            problem(format!("tab {id} is {status}, not closed"));
            continue;
        }
        if *captured != Some(*spent) {
            problem(format!("tab {id}: captured {captured:?} for {spent} spent"));
        }
        let key = format!("tab:{id}:capture");
        let captures: Vec<&ProcessorCall> =
            processor.iter().filter(|c| c.kind == "capture" && c.idempotency_key == key).collect();
        let booked: Vec<&pb::Entry> =
            entries.values().filter(|e| e.kind == "tab_capture" && e.metadata.get("tab_id") == Some(id)).collect();
        if *spent == 0 {
            if !captures.is_empty() || !booked.is_empty() {
                problem(format!("tab {id} spent nothing but was captured {} times", captures.len()));
            }
            continue;
        }
        captured_total += spent;
        let once = captures.len() == 1
            && captures[0].status == "succeeded"
            && captures[0].amount == Some(*spent)
            && capture_ref.as_deref() == Some(captures[0].reference.as_str());
        if !once {
            problem(format!("tab {id}: {} captures for {spent} spent", captures.len()));
        }
        let clearing: i64 = booked.iter().map(|e| -net(&[e]).get(CLEARING).copied().unwrap_or(0)).sum();
        if booked.len() != 1 || clearing != *spent {
            problem(format!("tab {id}: booked {} times, {clearing} to clearing, for {spent} spent", booked.len()));
        }
    }
    let owed: Vec<(String, i64)> = dmpay::with_db!(db, pool => sqlx::query_as(
        "SELECT code, posted_debits - posted_credits FROM ledger_accounts WHERE code LIKE 'user:%:tab:%'"
    )
    .fetch_all(pool)
    .await)
    .expect("tab accounts");
    for (code, balance) in owed {
        if balance != 0 {
            problem(format!("{code} is left at {balance} with every tab closed"));
        }
    }
    let by_card = tabs.iter().filter(|t| t.5 == "purchase").count();
    format!(
        "{} tabs ({by_card} of card purchases), {} purchases on them, {captured_total} cents captured",
        tabs.len(),
        purchases.len()
    )
}
