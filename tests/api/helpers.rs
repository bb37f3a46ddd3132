//! The test harness: every test starts the real server in-process on 127.0.0.1:0 with a
//! fresh database (a new SQLite file, or a new PostgreSQL database when
//! `DMPAY_TEST_POSTGRES_URL` is set) and talks to it through the generated clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use dmpay::config::Config;
use dmpay::server::Application;
use tonic::transport::Channel;
use tonic::Request;

pub use dmpay::api::pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub channel: Channel,
    pub config: Config,
    pub backend: Backend,
    pub db: dmpay::store::Db,
    pub vault: std::sync::Arc<dmpay::vault::Vault>,
    pub ledger_handle: dmpay::ledger::Ledger,
    pub payments_service: std::sync::Arc<dmpay::payments::Payments>,
    /// This server's clock: a test moves it (`set_offset_us`) to book rows on another
    /// day; no other server in the process sees the shift.
    pub clock: dmpay::kernel::clock::Clock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pg_database: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

/// `TEST_LOG` turns the server's logs on: `TEST_LOG=1` at `RUST_LOG` (or the default
/// filter), `TEST_LOG=trace` (or any filter) at that level unless `RUST_LOG` says
/// otherwise. `.ci/secrets-scan` runs the suite with `TEST_LOG=trace`.
fn log_init() {
    let Some(level) = std::env::var("TEST_LOG").ok() else { return };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .or_else(|| (!matches!(level.as_str(), "" | "1" | "true" | "yes")).then_some(level));
    dmpay::telemetry::init_logging_with(dmpay::config::LogFormat::Pretty, filter.as_deref());
}

pub fn postgres_url() -> Option<String> {
    std::env::var("DMPAY_TEST_POSTGRES_URL").ok().filter(|s| !s.is_empty())
}

/// Waits for the server's background resolver to finish its first pass, which runs at
/// once whatever the interval. Tests set the interval to a day so that the resolver
/// stays out of the way, and assert what their own calls to its jobs did (say, that one
/// processor notification was applied); a first pass still running behind a loaded
/// machine would take that work from them.
async fn resolver_started(payments: &dmpay::payments::Payments) {
    let stats = payments.resolver_stats();
    for _ in 0..3_000 {
        if stats.passes.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the background resolver did not finish its first pass within 30 s");
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Option<TestApp> {
        Self::spawn_with(backend, &[]).await
    }

    /// Starts a server with extra `DMPAY_*` settings. Returns None (the test skips) for
    /// PostgreSQL when no test database is configured, unless CI requires it.
    pub async fn spawn_with(backend: Backend, extra: &[(&str, &str)]) -> Option<TestApp> {
        Self::spawn_routed(backend, extra, |url| url).await
    }

    /// `spawn_with`, with the server's `DMPAY_DATABASE_URL` passed through `route` (for
    /// one that reaches the fresh database through a proxy). Creating and dropping the
    /// database keep the direct URL.
    pub async fn spawn_routed(
        backend: Backend,
        extra: &[(&str, &str)],
        route: impl FnOnce(String) -> String,
    ) -> Option<TestApp> {
        log_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pg_database = None;
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("dmpay.db").display()),
            Backend::Postgres => {
                let Some(admin_url) = postgres_url() else {
                    if std::env::var_os("DMPAY_TEST_REQUIRE_POSTGRES").is_some() {
                        panic!("DMPAY_TEST_REQUIRE_POSTGRES is set but DMPAY_TEST_POSTGRES_URL is not");
                    }
                    eprintln!("skipped: set DMPAY_TEST_POSTGRES_URL to run the PostgreSQL tests");
                    return None;
                };
                let name = format!("dmpay_t_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&admin_url).await.expect("connect to DMPAY_TEST_POSTGRES_URL");
                sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.expect("create database");
                admin.close().await;
                pg_database = Some((admin_url.clone(), name.clone()));
                dmpay::store::with_database(&admin_url, &name)
            }
        };
        let mut env: HashMap<String, String> = HashMap::from([
            ("DMPAY_ENV".into(), "development".into()),
            ("DMPAY_GRPC_ADDR".into(), "127.0.0.1:0".into()),
            ("DMPAY_METRICS_ADDR".into(), "127.0.0.1:0".into()),
            ("DMPAY_DATABASE_URL".into(), route(url)),
            ("DMPAY_DB_POOL_SIZE".into(), "8".into()),
            ("DMPAY_LEDGER_EXPIRY_INTERVAL".into(), "200ms".into()),
            // The background resolver stays out of the way: tests that finish, expire or
            // resolve by hand assert what their own call did. Tests of the background
            // resolver turn it back on.
            ("DMPAY_PAYMENTS_RESOLVE_INTERVAL".into(), "24h".into()),
            // Tests fire bursts of writes from one user on purpose (limits under
            // concurrency); the rate limit has its own tests, with its own settings.
            ("DMPAY_RATE_UNVERIFIED_BURST".into(), "100000".into()),
            ("DMPAY_RATE_VERIFIED_BURST".into(), "100000".into()),
        ]);
        for (k, v) in extra {
            env.insert((*k).into(), (*v).into());
        }
        let config = Config::load_from(&env, None).expect("config");
        let clock = dmpay::kernel::clock::Clock::system();
        let app = Application::build_with_clock(config.clone(), clock.clone()).await.expect("build app");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let db = app.db().clone();
        let vault = app.vault().clone();
        let ledger_handle = app.ledger().clone();
        let payments_service = app.payments().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = stop_rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        resolver_started(&payments_service).await;
        Some(TestApp {
            addr,
            metrics_addr,
            channel,
            config,
            backend,
            db,
            vault,
            ledger_handle,
            payments_service,
            clock,
            stop: Some(stop_tx),
            server: Some(server),
            pg_database,
            _dir: dir,
        })
    }

    /// A second server on this one's database, as another replica behind the same load
    /// balancer would be. It leaves the database to this app.
    pub async fn spawn_replica(&self) -> TestApp {
        let mut config = self.config.clone();
        config.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        // The same clock: replicas of one deployment read one time.
        let app = Application::build_with_clock(config.clone(), self.clock.clone()).await.expect("build replica");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let (db, vault, ledger_handle, payments_service) =
            (app.db().clone(), app.vault().clone(), app.ledger().clone(), app.payments().clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = stop_rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
        resolver_started(&payments_service).await;
        TestApp {
            addr,
            metrics_addr,
            channel,
            config,
            backend: self.backend,
            db,
            vault,
            ledger_handle,
            payments_service,
            clock: self.clock.clone(),
            stop: Some(stop_tx),
            server: Some(server),
            pg_database: None,
            _dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Platform users: their dmpay accounts, as the platform creates them when they sign
    /// up. A payment or request to a name without one is refused (NOT_FOUND), so a test
    /// creates the users it pays.
    pub async fn users(&self, names: &[&str]) {
        let accounts = dmpay::accounts::Accounts::new(self.db.clone(), self.clock.clone());
        for name in names {
            let user = dmpay::kernel::ids::UserId::parse("user_id", name).expect("a user id");
            accounts.ensure(&user).await.expect("create the platform account");
        }
    }

    /// The server's `/metrics` text.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.expect("metrics on");
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
        socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        socket.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
    }

    /// A counter or gauge without labels from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = self.scrape().await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// A token for `sub` with `scope`, signed with the server's dev secret.
    pub fn token(&self, sub: &str, scope: &str) -> String {
        dmpay::auth::mint_dev_token(&self.config.jwt(), sub, scope, Duration::from_secs(600)).expect("mint")
    }

    pub fn accounts(&self) -> pb::accounts_client::AccountsClient<Channel> {
        pb::accounts_client::AccountsClient::new(self.channel.clone())
    }

    /// Stops the server gracefully and waits for it, keeping its database (a replica
    /// made from this app goes on serving).
    pub async fn stop_server(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("join").expect("server result");
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("join").expect("server result");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some((admin_url, name)) = self.pg_database.take() {
            // Drop the per-test database from a thread of its own: Drop cannot await,
            // and the test's runtime may already be shutting down.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&admin)
                            .await;
                        admin.close().await;
                    }
                });
            })
            .join();
        }
    }
}

/// Wraps a message with a bearer token.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    req
}

/// The platform users most tests pay (`TestApp::users` creates them).
pub const CAST: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "dave",
    "paul",
    "seller",
    "neighbour",
    "shop0",
    "shop1",
    "shop2",
    "shop3",
    "shop4",
    "r0",
    "r1",
    "r2",
    "r3",
];

/// Runs each named `async fn(TestApp)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Sqlite).await.expect("sqlite app");
                    super::$name(app).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Postgres).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
    };
}

/// Runs each named `async fn(Backend)` (a test that starts its own server, with
/// settings of its own) once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! backend_fn_tests {
    ($($name:ident),* $(,)?) => {
        mod by_backend {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name($crate::helpers::Backend::Sqlite).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name($crate::helpers::Backend::Postgres).await;
                    }
                )*
            }
        }
    };
}

/// A ledger service that may also debit wallets (transfers between users in tests).
pub const LEDGER_SCOPES: &str = "ledger:write ledger:read ledger:wallet_debit";

impl TestApp {
    pub fn ledger(&self) -> pb::ledger_client::LedgerClient<Channel> {
        pb::ledger_client::LedgerClient::new(self.channel.clone())
    }

    /// Counts rows of a table.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        dmpay::with_db!(&self.db, pool => sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await).expect("count")
    }

    /// Runs the ledger verification against this app's database.
    pub async fn verify(&self) -> dmpay::ledger::verify::Report {
        dmpay::ledger::verify::verify(&self.db).await.expect("verify")
    }

    /// Runs `call` while the posting engine's connection is held by the test. Writes
    /// outside the engine's batches share that one connection on SQLite and use the
    /// shared pool on PostgreSQL: so on SQLite the call must still be waiting after a
    /// moment, with no new row in `table`, and finishes once the connection is freed;
    /// on PostgreSQL it must finish without it.
    pub async fn with_engine_connection_held<F: std::future::Future>(&self, table: &str, call: F) -> F::Output {
        let held = match self.ledger_handle.engine().writer(&self.db) {
            dmpay::store::Db::Sqlite(pool) => Some(pool.acquire().await.expect("the engine's one connection")),
            dmpay::store::Db::Postgres(_) => None,
        };
        let rows_before = self.count(table).await;
        tokio::pin!(call);
        let wait = Duration::from_millis(if held.is_some() { 300 } else { 10_000 });
        let early = tokio::time::timeout(wait, &mut call).await;
        match (held, early) {
            (Some(held), Err(_)) => {
                assert_eq!(self.count(table).await, rows_before, "nothing was written to {table} meanwhile");
                drop(held);
                call.await
            }
            (Some(_), Ok(_)) => panic!("on SQLite the call went through without the engine's connection"),
            (None, Ok(answer)) => answer,
            (None, Err(_)) => panic!("on PostgreSQL the call waited for the engine's connection"),
        }
    }
}

pub fn usd(amount: &str) -> Option<pb::Money> {
    Some(pb::Money { currency: "USD".into(), amount: amount.into() })
}

pub fn posting(code: &str, debit: bool, amount: &str) -> pb::Posting {
    pb::Posting {
        account_code: code.into(),
        direction: if debit { pb::Direction::Debit } else { pb::Direction::Credit } as i32,
        amount: usd(amount),
    }
}

/// A two-posting USD entry from `from` (debited) to `to` (credited).
pub fn transfer(key: &str, from: &str, to: &str, amount: &str) -> pb::PostEntryRequest {
    pb::PostEntryRequest {
        idempotency_key: key.into(),
        kind: "transfer".into(),
        postings: vec![posting(from, true, amount), posting(to, false, amount)],
        ..Default::default()
    }
}

/// Funds a user's USD wallet from the treasury (a platform user: see `TestApp::users`).
pub async fn fund(app: &TestApp, token: &str, user: &str, amount: &str) -> pb::Entry {
    app.users(&[user]).await;
    app.ledger()
        .post_entry(authed(
            transfer(
                &format!("fund-{user}-{amount}"),
                "platform:treasury:USD",
                &format!("user:{user}:wallet:USD"),
                amount,
            ),
            token,
        ))
        .await
        .expect("fund")
        .into_inner()
}

pub async fn balance(app: &TestApp, token: &str, code: &str) -> pb::LedgerBalance {
    app.ledger()
        .get_ledger_balance(authed(pb::GetLedgerBalanceRequest { account_code: code.into(), as_of: None }, token))
        .await
        .expect("balance")
        .into_inner()
}

pub const METHOD_SCOPES: &str = "methods:write";

impl TestApp {
    pub fn methods(&self) -> pb::payment_methods_client::PaymentMethodsClient<Channel> {
        pb::payment_methods_client::PaymentMethodsClient::new(self.channel.clone())
    }

    /// Tokenizes a card for the token's owner; CVC 4 digits for Amex, else 3.
    pub async fn tokenize(&self, token: &str, number: &str) -> Result<pb::PaymentMethod, tonic::Status> {
        let amex = number.starts_with("34") || number.starts_with("37");
        self.methods()
            .tokenize_card(authed(
                pb::TokenizeCardRequest {
                    card_number: number.into(),
                    exp_month: 12,
                    exp_year: 2034,
                    cvc: if amex { "7314".into() } else { "731".into() },
                    holder_name: "Test Holder".into(),
                    postal_code: "10115".into(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Tokenizes and links a card.
    pub async fn add_card(
        &self,
        token: &str,
        number: &str,
        make_default: bool,
    ) -> Result<pb::PaymentMethod, tonic::Status> {
        let pm = self.tokenize(token, number).await?;
        self.methods()
            .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default }, token))
            .await
            .map(|r| r.into_inner())
    }
}

/// A Luhn-valid 16-digit Visa number distinct for each `n`.
pub fn visa(n: u32) -> String {
    let body = format!("4{:014}", 100_000 + n);
    let mut sum = 0;
    for (i, c) in body.chars().rev().enumerate() {
        let mut d = c.to_digit(10).unwrap();
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    format!("{body}{}", (10 - sum % 10) % 10)
}

pub const PAY_SCOPES: &str = "payments:write payments:read methods:write";

impl TestApp {
    pub fn payments(&self) -> pb::payments_client::PaymentsClient<Channel> {
        pb::payments_client::PaymentsClient::new(self.channel.clone())
    }

    /// Sends `amount` USD from the token's owner to `to`.
    pub async fn send(
        &self,
        token: &str,
        key: &str,
        to: &str,
        amount: &str,
        funding: pb::FundingSource,
    ) -> Result<pb::Payment, tonic::Status> {
        self.payments()
            .send_payment(authed(
                pb::SendPaymentRequest {
                    idempotency_key: key.into(),
                    recipient_id: to.into(),
                    amount: usd(amount),
                    note: "lunch".into(),
                    conversation_id: "conv-1".into(),
                    message_id: format!("msg-{key}"),
                    funding_source: funding as i32,
                    payment_method_token: String::new(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// GetBalance with `token` (which may be refused).
    pub async fn wallet_of(&self, token: &str) -> Result<pb::Balance, tonic::Status> {
        self.payments()
            .get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, token))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn wallet(&self, user: &str) -> pb::Balance {
        let t = self.token(user, PAY_SCOPES);
        self.payments()
            .get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &t))
            .await
            .expect("balance")
            .into_inner()
    }
}

/// The books after a step: the ledger verifies (every balance equals its postings, every
/// entry balances) and the trial balance balances in every currency.
pub async fn assert_books_balance(app: &TestApp) {
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
    let fin = app.token("finance-staff", "finance");
    let trial = pb::finance_client::FinanceClient::new(app.channel.clone())
        .get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), &fin))
        .await
        .expect("trial balance")
        .into_inner();
    assert!(trial.balanced, "the trial balance does not balance: {:?}", trial.totals);
}

/// The payments service of `app`'s database and ledger over another sandbox (its own
/// faults), its resolver picking up any pending payment or payout at once.
pub fn payments_over(
    app: &TestApp,
    processor: std::sync::Arc<dmpay::processor::sandbox::Sandbox>,
) -> dmpay::payments::Payments {
    use std::sync::Arc;
    let keys = Arc::new(app.config.key_ring().expect("key ring"));
    let vault = Arc::new(dmpay::vault::Vault::new(
        app.db.clone(),
        keys,
        processor,
        dmpay::accounts::Accounts::new(app.db.clone(), app.clock.clone()),
        dmpay::vault::VaultConfig::default(),
    ));
    dmpay::payments::Payments::new(
        app.db.clone(),
        app.ledger_handle.clone(),
        vault,
        dmpay::accounts::Accounts::new(app.db.clone(), app.clock.clone()),
        Arc::new(dmpay::payments::PaymentsConfig { resolve_after_s: 0, ..Default::default() }),
        app.payments_service.hook().clone(),
    )
}
