//! Database outage under load (issue 8). PostgreSQL only, by nature: the server reaches
//! its database through a TCP proxy inside the test, which cuts the database off at a
//! moment when the posting engine has a statement in flight, in one of three ways (see
//! `Mode`): PostgreSQL stopped, connections dropped and new ones unanswered, or a silent
//! network partition. SQLite is a file in the process and cannot go away like this. The
//! machine's PostgreSQL is never touched: other tests run against it at the same time.
//!
//! Concurrent wallet-funded `SendPayment`s (each with its own idempotency key) and
//! reads run throughout. While the database is away every call answers UNAVAILABLE
//! within a bound (never INTERNAL, UNKNOWN, CANCELLED, a hang or a panic) and health
//! reports NOT_SERVING; once it is back the server recovers by itself, without a
//! restart, within 5 s (health SERVING and a send succeeds, which needs both the general
//! pool and the posting engine's own pool). Every call that failed is then retried with
//! its key and succeeds, every acknowledged one replays as the same payment, and each
//! payment is in the ledger exactly once with balances that add up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::*;
use crate::raw;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards to PostgreSQL.
    Up,
    /// PostgreSQL stopped: live connections told so (FATAL 57P01) and closed, new ones
    /// accepted and closed at once.
    Refuse,
    /// Live connections closed, new ones accepted and never answered.
    Blackhole,
    /// Nothing closed, nothing answered: live connections and new ones go silent, as
    /// when the network to the database fails.
    Partition,
}

/// One proxied connection.
struct Conn {
    /// The posting engine's (its startup message names `dmpay-engine`).
    engine: AtomicBool,
    /// Held while a chunk is forwarded.
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The client waits for the answer to a statement (not to its startup,
    /// authentication or a ping).
    awaiting: bool,
    /// The server's side is between messages: the client waits for an answer, or the
    /// last answer ended with ReadyForQuery.
    boundary: bool,
}

/// The test database's URL and a proxy in front of it. None without a test database:
/// the test then skips, or fails when CI requires PostgreSQL, exactly as every other.
async fn postgres_behind_proxy() -> Option<(String, Proxy)> {
    let Some(admin_url) = postgres_url() else {
        assert!(TestApp::spawn(Backend::Postgres).await.is_none());
        return None;
    };
    let proxy = Proxy::start(upstream_of(&admin_url)).await;
    Some((admin_url, proxy))
}

/// What PostgreSQL sends every client when it is stopped (fast shutdown), before it
/// closes the connection: ErrorResponse FATAL 57P01.
fn admin_shutdown() -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (b'M', "terminating connection due to administrator command"),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
    message.extend_from_slice(&fields);
    message
}

#[derive(Default)]
struct Shared {
    /// Connections accepted while the database was away, kept open and unanswered.
    held: Mutex<Vec<TcpStream>>,
    conns: Mutex<Vec<std::sync::Weak<Conn>>>,
}

/// A TCP proxy in front of PostgreSQL that can cut the database off and bring it back.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mode = Arc::new(watch::Sender::new(Mode::Up));
        let shared: Arc<Shared> = Arc::default();
        let task = tokio::spawn({
            let mode = mode.clone();
            let shared = shared.clone();
            async move {
                loop {
                    let inbound = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let now = *mode.borrow();
                    match now {
                        Mode::Up => {
                            tokio::spawn(forward(inbound, upstream.clone(), mode.subscribe(), shared.clone()));
                        }
                        Mode::Refuse => drop(inbound),
                        Mode::Blackhole | Mode::Partition => shared.held.lock().expect("held").push(inbound),
                    }
                }
            }
        });
        Proxy { addr, mode, shared, task }
    }

    /// Cuts the database off (see `Mode`), at a moment when the posting engine is in the
    /// middle of a statement, so the cut always meets a batch in flight.
    pub async fn cut(&self, mode: Mode) {
        self.cut_during(mode, true).await;
    }

    /// Cuts the database off while a statement is in flight on a connection of the
    /// posting engine (`engine`) or of the general pool (reads and non-batched writes).
    pub async fn cut_during(&self, mode: Mode, engine: bool) {
        assert_ne!(mode, Mode::Up);
        let t0 = Instant::now();
        loop {
            for c in self.live().iter().filter(|c| c.engine.load(Ordering::SeqCst) == engine) {
                if let Ok(state) = c.state.try_lock() {
                    if state.awaiting {
                        // Under the connection's lock: the statement's answer is not
                        // forwarded yet, and now never will be.
                        self.mode.send_replace(mode);
                        return;
                    }
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no statement in flight to cut (engine: {engine})");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Connections being forwarded now.
    fn live(&self) -> Vec<Arc<Conn>> {
        let mut all = self.shared.conns.lock().expect("conns");
        all.retain(|c| c.strong_count() > 0);
        all.iter().filter_map(|c| c.upgrade()).collect()
    }

    /// Drops every connection, as PostgreSQL does to its clients when it restarts or
    /// fails over, and forwards new ones again at once. Returns how many were dropped.
    pub async fn drop_connections(&self) -> usize {
        let live = self.live().len();
        self.mode.send_replace(Mode::Refuse);
        let t0 = Instant::now();
        while !self.live().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5), "connections still open after the drop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.restore();
        live
    }

    /// Forwards new connections again; connections held open meanwhile are closed.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Up);
        self.shared.held.lock().expect("held").clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Refuse);
        self.task.abort();
    }
}

async fn forward(inbound: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>, shared: Arc<Shared>) {
    let Ok(outbound) = TcpStream::connect(&upstream).await else { return };
    if *mode.borrow_and_update() != Mode::Up {
        return;
    }
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let conn = Arc::new(Conn { engine: AtomicBool::new(false), state: Default::default() });
    shared.conns.lock().expect("conns").push(Arc::downgrade(&conn));
    let (mut client_rx, mut client_tx) = inbound.into_split();
    let (mut server_rx, mut server_tx) = outbound.into_split();
    let up = pump(&mut client_rx, &mut server_tx, &conn, &mode, true);
    let down = pump(&mut server_rx, &mut client_tx, &conn, &mode, false);
    let mut changed = mode.clone();
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = changed.wait_for(|m| *m != Mode::Up) => {}
    }
    let now = *mode.borrow();
    match now {
        Mode::Partition => {
            // Silent until the network returns (the sockets stay open), then closed.
            let _ = mode.wait_for(|m| *m != Mode::Partition).await;
        }
        Mode::Refuse => {
            use tokio::io::AsyncWriteExt;
            let state = conn.state.lock().await;
            if state.boundary {
                let _ = client_tx.write_all(&admin_shutdown()).await;
            }
        }
        Mode::Up | Mode::Blackhole => {}
    }
    // Dropping both sides: the server sees its connection die mid-session.
}

/// Copies chunks one way until EOF, an error, or the database goes away.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    conn: &Conn,
    mode: &watch::Receiver<Mode>,
    from_client: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let mut state = conn.state.lock().await;
        if *mode.borrow() != Mode::Up {
            return;
        }
        if from_client && chunk.windows(13).any(|w| w == b"dmpay-engine\0") {
            conn.engine.store(true, Ordering::SeqCst);
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
        // A simple query, or a Parse or Bind of the extended protocol: a statement
        // whose answer the client now waits for.
        state.awaiting = from_client && matches!(chunk[0], b'Q' | b'P' | b'B');
        state.boundary =
            if from_client { state.awaiting } else { chunk.len() >= 6 && chunk[n - 6..n - 1] == *b"Z\0\0\0\x05" };
    }
}

/// `(start, end)` of the `host:port` part of a PostgreSQL URL's authority.
fn host_port_span(url: &str) -> (usize, usize) {
    let start = url.find("://").map(|i| i + 3).expect("a postgres:// URL");
    let end = url[start..].find(['/', '?']).map(|i| i + start).unwrap_or(url.len());
    let host_start = url[start..end].rfind('@').map(|i| i + start + 1).unwrap_or(start);
    assert!(host_start < end, "the PostgreSQL test URL must name a TCP host to proxy");
    (host_start, end)
}

/// The `host:port` the URL connects to (PostgreSQL's 5432 when none is given).
pub fn upstream_of(url: &str) -> String {
    let (s, e) = host_port_span(url);
    let hp = &url[s..e];
    if hp.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty()) {
        hp.to_owned()
    } else {
        format!("{hp}:5432")
    }
}

/// The URL with its `host:port` replaced by `addr`; user, password, database and
/// parameters kept.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (s, e) = host_port_span(url);
    format!("{}{addr}{}", &url[..s], &url[e..])
}

#[test]
fn urls_are_rerouted_through_the_proxy() {
    let addr: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let url = "postgres://postgres:p%40ss@db.example:6543/dmpay_t_1?sslmode=disable";
    assert_eq!(upstream_of(url), "db.example:6543");
    assert_eq!(via(url, addr), "postgres://postgres:p%40ss@127.0.0.1:40001/dmpay_t_1?sslmode=disable");
    assert_eq!(upstream_of("postgres://postgres@127.0.0.1/x"), "127.0.0.1:5432");
    assert_eq!(via("postgres://127.0.0.1:5432/x", addr), "postgres://127.0.0.1:40001/x");
}

const SENDERS: usize = 6;
const RECIPIENTS: usize = 3;
const FUNDED: &str = "300.00";
const FUNDED_MINOR: i64 = 30_000;
const AMOUNT: &str = "0.25";
const AMOUNT_MINOR: i64 = 25;
/// The longest any call may take, outage or not (the server waits at most 1 s for a
/// connection): a call that takes longer hangs. Generous on purpose (a shared CI
/// machine); what is checked is that calls end.
const CALL_BOUND: Duration = Duration::from_secs(5);
/// How long the database stays away: longer than `CALL_BOUND`, so a call that waits
/// for the database instead of failing is caught.
const OUTAGE: Duration = Duration::from_secs(6);
/// After this the client gives up and records "no answer".
const CLIENT_LIMIT: Duration = Duration::from_secs(20);
/// The promise: back by itself within 5 s of the database.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// Phases of the run, in order.
const BEFORE: u8 = 0;
const DOWN: u8 = 1;
const RESTORED: u8 = 2;
const RECOVERED: u8 = 3;

fn phase_name(p: u8) -> &'static str {
    ["before", "outage", "restored", "recovered"][p as usize]
}

/// One call of the load.
struct Call {
    what: String,
    started: u8,
    ended: u8,
    elapsed: Duration,
    /// None: no answer within `CLIENT_LIMIT`. Ok: the payment id (or "" for reads).
    answer: Option<Result<String, tonic::Status>>,
}

fn send_request(key: &str, to: &str) -> pb::SendPaymentRequest {
    pb::SendPaymentRequest {
        idempotency_key: key.into(),
        recipient_id: to.into(),
        amount: usd(AMOUNT),
        note: "outage".into(),
        conversation_id: "conv-outage".into(),
        message_id: format!("m-{key}"),
        funding_source: pb::FundingSource::Balance as i32,
        payment_method_token: String::new(),
    }
}

/// A balance's posted amount in minor units.
fn minor(b: pb::Balance) -> i64 {
    b.posted.expect("posted").amount.replace('.', "").parse().expect("minor units")
}

fn sender(s: usize) -> String {
    format!("sender{s}")
}

fn recipient_of(s: usize) -> String {
    format!("rcpt{}", s % RECIPIENTS)
}

/// Sends from one sender, one call at a time, until `stop`.
async fn send_loop(app: &TestApp, s: usize, phase: Arc<AtomicU8>, stop: Arc<AtomicBool>) -> Vec<Call> {
    let token = app.token(&sender(s), PAY_SCOPES);
    let mut client = app.payments();
    let mut calls = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = format!("k{s}-{i}");
        i += 1;
        let started = phase.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let answer = tokio::time::timeout(
            CLIENT_LIMIT,
            client.send_payment(authed(send_request(&key, &recipient_of(s)), &token)),
        )
        .await
        .ok()
        .map(|r| r.map(|p| p.into_inner().payment_id));
        let elapsed = t0.elapsed();
        let ok = matches!(answer, Some(Ok(_)));
        calls.push(Call { what: key, started, ended: phase.load(Ordering::SeqCst), elapsed, answer });
        if !ok {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    calls
}

/// Reads (balance and the payment list) until `stop`: the general pool's paths.
async fn read_loop(app: &TestApp, phase: Arc<AtomicU8>, stop: Arc<AtomicBool>) -> Vec<Call> {
    let token = app.token(&sender(0), PAY_SCOPES);
    let mut client = app.payments();
    let mut calls = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let started = phase.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let (what, answer) = if i % 2 == 0 {
            let r = tokio::time::timeout(
                CLIENT_LIMIT,
                client.get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &token)),
            )
            .await;
            ("GetBalance", r.ok().map(|r| r.map(|_| String::new())))
        } else {
            let r = tokio::time::timeout(
                CLIENT_LIMIT,
                client.list_payments(authed(pb::ListPaymentsRequest { page_size: 5, ..Default::default() }, &token)),
            )
            .await;
            ("ListPayments", r.ok().map(|r| r.map(|_| String::new())))
        };
        let elapsed = t0.elapsed();
        let ok = matches!(answer, Some(Ok(_)));
        calls.push(Call { what: what.into(), started, ended: phase.load(Ordering::SeqCst), elapsed, answer });
        tokio::time::sleep(Duration::from_millis(if ok { 20 } else { 50 })).await;
    }
    calls
}

async fn health(app: &TestApp) -> Option<i32> {
    let mut client = HealthClient::new(app.channel.clone());
    let check = client.check(HealthCheckRequest { service: String::new() });
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(r)) => Some(r.into_inner().status),
        _ => None,
    }
}

async fn outage_under_load(mode: Mode) {
    let Some((_, proxy)) = postgres_behind_proxy().await else { return };
    raw::panics::watch();
    let panics_before = raw::panics::count();
    let app = TestApp::spawn_routed(
        Backend::Postgres,
        // Calls wait at most this long for a connection, so they fail fast.
        &[("DMPAY_DB_ACQUIRE_TIMEOUT", "1s")],
        |url| via(&url, proxy.addr),
    )
    .await
    .expect("postgres app");
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    for s in 0..SENDERS {
        fund(&app, &treasury, &sender(s), FUNDED).await;
    }
    fund(&app, &treasury, "prober", FUNDED).await;
    let recipients: Vec<String> = (0..SENDERS).map(recipient_of).collect();
    app.users(&recipients.iter().map(String::as_str).collect::<Vec<_>>()).await;
    app.users(CAST).await;
    assert_eq!(health(&app).await, Some(ServingStatus::Serving as i32));

    let app = Arc::new(app);
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (app, phase, stop) = (app.clone(), phase.clone(), stop.clone());
        senders.push(tokio::spawn(async move { send_loop(&app, s, phase, stop).await }));
    }
    let reader = {
        let (app, phase, stop) = (app.clone(), phase.clone(), stop.clone());
        tokio::spawn(async move { read_loop(&app, phase, stop).await })
    };

    // Load against a healthy database first.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The database goes away. (Calls that started just before count as "before",
    // where UNAVAILABLE is as good as OK.)
    proxy.cut(mode).await;
    phase.store(DOWN, Ordering::SeqCst);
    let cut_at = Instant::now();
    let mut not_serving = None;
    while cut_at.elapsed() < OUTAGE {
        if health(&app).await == Some(ServingStatus::NotServing as i32) {
            not_serving.get_or_insert(cut_at.elapsed());
        } else {
            assert!(not_serving.is_none(), "health flipped back to SERVING while the database was away");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let not_serving = not_serving.expect("health never reported NOT_SERVING while the database was away");
    eprintln!("{mode:?}: health NOT_SERVING {not_serving:?} after the cut");

    // It comes back: the server recovers by itself.
    phase.store(RESTORED, Ordering::SeqCst);
    proxy.restore();
    let restored_at = Instant::now();
    let prober = app.token("prober", PAY_SCOPES);
    let mut probe_keys = Vec::new();
    let (mut serving_in, mut sent_in) = (None, None);
    while (serving_in.is_none() || sent_in.is_none()) && restored_at.elapsed() < RECOVERY_BOUND * 3 {
        if serving_in.is_none() && health(&app).await == Some(ServingStatus::Serving as i32) {
            serving_in = Some(restored_at.elapsed());
        }
        if sent_in.is_none() {
            let key = format!("probe-{}", probe_keys.len());
            probe_keys.push(key.clone());
            let sent = tokio::time::timeout(
                CALL_BOUND,
                app.payments().send_payment(authed(send_request(&key, "rcpt0"), &prober)),
            )
            .await;
            if matches!(sent, Ok(Ok(_))) {
                sent_in = Some(restored_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{mode:?}: after the database returned, SERVING in {serving_in:?}, a send succeeded in {sent_in:?}");
    let serving_in = serving_in.expect("health never returned to SERVING");
    let sent_in = sent_in.expect("no send succeeded after the database returned");
    assert!(serving_in <= RECOVERY_BOUND, "health SERVING only {serving_in:?} after the database returned");
    assert!(sent_in <= RECOVERY_BOUND, "a send succeeded only {sent_in:?} after the database returned");
    phase.store(RECOVERED, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);

    let mut sends: Vec<(usize, Call)> = Vec::new();
    for (s, task) in senders.into_iter().enumerate() {
        sends.extend(task.await.expect("sender task").into_iter().map(|c| (s, c)));
    }
    let reads = reader.await.expect("reader task");

    // What happened, for the record (and for any failure below).
    let all = || sends.iter().map(|(_, c)| c).chain(reads.iter());
    let code_of = |call: &Call| match &call.answer {
        None => None,
        Some(Ok(_)) => Some(Code::Ok),
        Some(Err(status)) => Some(status.code()),
    };
    let mut per_phase: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut slowest: BTreeMap<&str, Duration> = BTreeMap::new();
    for call in all() {
        let code = code_of(call).map_or("no answer".to_owned(), |c| format!("{c:?}"));
        *per_phase.entry((phase_name(call.started), code)).or_default() += 1;
        let e = slowest.entry(phase_name(call.started)).or_default();
        *e = (*e).max(call.elapsed);
    }
    eprintln!("{mode:?}: calls by the phase they started in, and answer: {per_phase:?}");
    eprintln!("{mode:?}: slowest call by the phase it started in: {slowest:?}");

    // Every answer: in time, and OK or UNAVAILABLE; UNAVAILABLE while the database was
    // away; OK once the server had recovered.
    for call in all() {
        let Some(code) = code_of(call) else {
            panic!("{}: no answer within {CLIENT_LIMIT:?} ({})", call.what, phase_name(call.started))
        };
        assert!(
            call.elapsed <= CALL_BOUND,
            "{}: answered {code:?} only after {:?} ({} -> {})",
            call.what,
            call.elapsed,
            phase_name(call.started),
            phase_name(call.ended)
        );
        assert!(
            matches!(code, Code::Ok | Code::Unavailable),
            "{}: {:?} ({} -> {})",
            call.what,
            call.answer,
            phase_name(call.started),
            phase_name(call.ended)
        );
        if call.started == DOWN && call.ended == DOWN {
            assert_eq!(code, Code::Unavailable, "{} during the outage: {:?}", call.what, call.answer);
        }
        if call.started == RECOVERED {
            assert_eq!(code, Code::Ok, "{} after recovery: {:?}", call.what, call.answer);
        }
    }
    let during = sends.iter().filter(|(_, c)| c.started == DOWN && c.ended == DOWN).count();
    assert!(during >= SENDERS, "too few sends during the outage to say anything ({during})");
    assert!(reads.iter().any(|c| c.started == DOWN && c.ended == DOWN), "no reads during the outage");
    assert!(sends.iter().filter(|(_, c)| c.started == RECOVERED).count() >= SENDERS, "too few sends after recovery");

    // Retry every send with its key: what failed goes through now, what was
    // acknowledged replays as the same payment.
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut by_sender: Vec<Vec<String>> = vec![Vec::new(); SENDERS];
    for (s, call) in &sends {
        if let Some(Ok(id)) = &call.answer {
            acked.insert(call.what.clone(), id.clone());
        }
        by_sender[*s].push(call.what.clone());
    }
    let mut retries = Vec::new();
    for (s, keys) in by_sender.iter().cloned().enumerate() {
        let app = app.clone();
        retries.push(tokio::spawn(async move {
            let token = app.token(&sender(s), PAY_SCOPES);
            let mut client = app.payments();
            let mut out = Vec::new();
            for key in keys {
                let p = client
                    .send_payment(authed(send_request(&key, &recipient_of(s)), &token))
                    .await
                    .unwrap_or_else(|e| panic!("retry of {key} after recovery: {e:?}"))
                    .into_inner();
                assert_eq!(p.status, pb::PaymentStatus::Settled as i32, "{key}: {p:?}");
                out.push((key, p.payment_id));
            }
            out
        }));
    }
    let mut final_ids: HashMap<String, String> = HashMap::new();
    for r in retries {
        final_ids.extend(r.await.expect("retry task"));
    }
    for (key, id) in &acked {
        assert_eq!(final_ids.get(key), Some(id), "{key}: the retry of an acknowledged send is the same payment");
    }
    let prober_ok: Vec<String> = {
        let mut ids = Vec::new();
        for key in &probe_keys {
            let p = app
                .payments()
                .send_payment(authed(send_request(key, "rcpt0"), &prober))
                .await
                .unwrap_or_else(|e| panic!("retry of {key}: {e:?}"))
                .into_inner();
            ids.push(p.payment_id);
        }
        ids
    };

    // The books: one payment per key, each in the ledger exactly once.
    let rows: Vec<(String, String, String, String, String)> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT payment_id, sender_id, recipient_id, idempotency_key, status FROM payments",
    )
    .fetch_all(pool)
    .await)
    .expect("payments");
    let expected = final_ids.len() + probe_keys.len();
    assert_eq!(rows.len(), expected, "one payment per idempotency key");
    let ids: HashSet<&String> = rows.iter().map(|r| &r.0).collect();
    for id in final_ids.values().chain(prober_ok.iter()) {
        assert!(ids.contains(id), "payment {id} answered but not stored");
    }
    assert!(rows.iter().all(|r| r.4 == "settled"), "every payment settled");
    let metadata: Vec<String> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT metadata FROM ledger_entries WHERE kind = 'dm_payment'",
    )
    .fetch_all(pool)
    .await)
    .expect("entries");
    let mut in_ledger: HashMap<String, usize> = HashMap::new();
    for m in metadata {
        let v: serde_json::Value = serde_json::from_str(&m).expect("metadata json");
        *in_ledger.entry(v["payment_id"].as_str().expect("payment_id").to_owned()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(in_ledger.get(*id), Some(&1), "payment {id} is in the ledger exactly once");
    }
    assert_eq!(in_ledger.len(), ids.len(), "no ledger entry without a payment");

    // Balances add up.
    for (s, keys) in by_sender.iter().enumerate() {
        let sent = keys.len() as i64;
        assert_eq!(minor(app.wallet(&sender(s)).await), FUNDED_MINOR - sent * AMOUNT_MINOR, "{}", sender(s));
    }
    assert_eq!(minor(app.wallet("prober").await), FUNDED_MINOR - probe_keys.len() as i64 * AMOUNT_MINOR);
    for r in 0..RECIPIENTS {
        let mut expected = (0..SENDERS).filter(|s| s % RECIPIENTS == r).map(|s| by_sender[s].len() as i64).sum::<i64>();
        if r == 0 {
            expected += probe_keys.len() as i64;
        }
        assert_eq!(minor(app.wallet(&format!("rcpt{r}")).await), expected * AMOUNT_MINOR, "rcpt{r}");
    }
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(raw::panics::count(), panics_before, "the server panicked (see the output above)");
}

/// Live connections cut, new ones refused: PostgreSQL stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load() {
    outage_under_load(Mode::Refuse).await;
}

/// Live connections cut, new ones never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_under_load() {
    outage_under_load(Mode::Blackhole).await;
}

/// Live connections and new ones silent: the network to PostgreSQL fails while the
/// posting engine is in the middle of a statement.
///
/// Regression test: nothing used to bound a statement in time (sqlx has no socket or
/// query timeout and TCP keepalive is off), so the engine's batch waited for an answer
/// that never came until the TCP connection died (up to ~15 min in a real partition),
/// with every wallet send queued behind it until the gRPC deadline (CANCELLED). Now a
/// batch transaction is bounded by DMPAY_LEDGER_BATCH_TIMEOUT and its connection dropped,
/// and the engine refuses writes at once while the database is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partitioned_under_load() {
    outage_under_load(Mode::Partition).await;
}

/// A read in flight on the general pool when the network to PostgreSQL goes silent:
/// its statement never gets an answer, and nothing in sqlx or TCP ends it for many
/// minutes. It must still answer UNAVAILABLE within the bound, as soon as the database
/// is declared unreachable, and every read after it too, until the database is back.
///
/// Regression test: the read used to wait for DMPAY_GRPC_CALL_TIMEOUT (10 s) and then
/// answer CANCELLED (`api::gate` now answers it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partition_answers_reads_in_flight() {
    let Some((_, proxy)) = postgres_behind_proxy().await else { return };
    let app =
        TestApp::spawn_routed(Backend::Postgres, &[("DMPAY_DB_ACQUIRE_TIMEOUT", "1s")], |url| via(&url, proxy.addr))
            .await
            .expect("postgres app");
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &treasury, "reader", FUNDED).await;
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    // Readers keep statements in flight on the general pool, so the cut meets one.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (app, stop) = (app.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let token = app.token("reader", PAY_SCOPES);
            let mut calls = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let answer = tokio::time::timeout(
                    CLIENT_LIMIT,
                    app.payments().get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &token)),
                )
                .await;
                let code = match answer {
                    Ok(Ok(_)) => Some(Code::Ok),
                    Ok(Err(status)) => Some(status.code()),
                    Err(_) => None,
                };
                calls.push((started.elapsed(), code));
            }
            calls
        }));
    }
    proxy.cut_during(Mode::Partition, false).await;
    let cut_at = Instant::now();
    // Longer than the bound, so a read left waiting is caught.
    tokio::time::sleep(OUTAGE).await;
    stop.store(true, Ordering::SeqCst);
    let mut calls = Vec::new();
    for r in readers {
        calls.extend(r.await.expect("reader"));
    }
    eprintln!("{} reads, cut {:?} ago", calls.len(), cut_at.elapsed());
    let unavailable = calls.iter().filter(|(_, code)| *code == Some(Code::Unavailable)).count();
    assert!(unavailable > 0, "no read heard of the outage: {calls:?}");
    for (took, code) in &calls {
        assert!(
            matches!(code, Some(Code::Ok | Code::Unavailable)) && *took <= CALL_BOUND,
            "a read answered {code:?} after {took:?} (bound {CALL_BOUND:?})"
        );
    }
    proxy.restore();
}

/// The pools test a connection before handing it out only when it has sat idle for
/// `store::CONNECTION_TEST_IDLE_MIN` (500 ms): one PostgreSQL dropped while it sat
/// there longer is found by the test and replaced, and the caller never sees it; one
/// used more recently is handed out untested, fails the one statement that meets it
/// with UNAVAILABLE, and is closed, so the next statement gets a new connection. One
/// connection in the pool and nothing else using it, so the statements here are the
/// ones that meet the dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pools_test_connections_idle_past_the_bound() {
    let Some((admin_url, proxy)) = postgres_behind_proxy().await else { return };
    for role in [dmpay::store::PoolRole::Engine, dmpay::store::PoolRole::General] {
        let db = dmpay::store::Db::connect_role(&via(&admin_url, proxy.addr), 1, Duration::from_secs(2), role)
            .await
            .expect("pool");
        // The connection is used, back in the pool (sqlx returns a connection in a task
        // of its own, after a ping), dropped, and met again, all within the bound; on a
        // machine too busy for that, the round starts over.
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds <= 5, "{role:?}: five rounds each took longer than the bound");
            db.ping().await.expect("first statement");
            let used = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(proxy.drop_connections().await, 1, "{role:?}");
            if used.elapsed() < dmpay::store::CONNECTION_TEST_IDLE_MIN - Duration::from_millis(100) {
                break;
            }
            // Past the bound, so the next round's first statement gets a tested one.
            tokio::time::sleep(dmpay::store::CONNECTION_TEST_IDLE_MIN).await;
        }
        let met_at_once = db.ping().await;
        assert!(
            matches!(met_at_once, Err(dmpay::kernel::error::Error::Unavailable(_))),
            "{role:?}: a connection used 100 ms ago is handed out untested: {met_at_once:?}"
        );
        db.ping().await.unwrap_or_else(|e| panic!("{role:?}: the next statement opens a new connection: {e:?}"));

        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(proxy.drop_connections().await, 1, "{role:?}");
        tokio::time::sleep(dmpay::store::CONNECTION_TEST_IDLE_MIN + Duration::from_millis(200)).await;
        db.ping().await.unwrap_or_else(|e| panic!("{role:?}: a connection dropped while idle reached a caller: {e:?}"));
        db.close().await;
    }
}

/// A connection PostgreSQL dropped and met again at once (see above) costs a call
/// through the server at most an UNAVAILABLE, which its retry with the same key turns
/// into one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropped_connections_cost_a_retry_at_most() {
    let Some((_, proxy)) = postgres_behind_proxy().await else { return };
    let app = TestApp::spawn_routed(Backend::Postgres, &[], |url| via(&url, proxy.addr)).await.expect("postgres app");
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &treasury, "dropper", FUNDED).await;
    app.users(&["rcpt0"]).await;
    let token = app.token("dropper", PAY_SCOPES);
    let mut client = app.payments();
    let mut sent = 0i64;
    for round in 0..3 {
        // Connections for several calls at once in both pools, back in their pools
        // (sqlx returns one in a task of its own, after a ping) when they are dropped.
        let mut warm = tokio::task::JoinSet::new();
        for i in 0..4 {
            let mut client = app.payments();
            let req = authed(send_request(&format!("warm-{round}-{i}"), "rcpt0"), &token);
            warm.spawn(async move { client.send_payment(req).await });
        }
        while let Some(r) = warm.join_next().await {
            r.expect("join").expect("warm send");
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let dropped = proxy.drop_connections().await;
        assert!(dropped >= 2, "both pools had connections open ({dropped})");
        // Each dead connection fails at most the one call that takes it (and is then
        // closed), so the retries end, and each ends in one payment.
        let mut unavailable = 0;
        for i in 0..10 {
            let key = format!("fresh-{round}-{i}");
            loop {
                match client.send_payment(authed(send_request(&key, "rcpt0"), &token)).await {
                    Ok(_) => break,
                    Err(s) if s.code() == Code::Unavailable => {
                        unavailable += 1;
                        assert!(
                            unavailable <= dropped,
                            "{unavailable} UNAVAILABLE answers for {dropped} dropped connections"
                        );
                    }
                    Err(s) => panic!("{key}: a dropped connection answered {:?}: {}", s.code(), s.message()),
                }
            }
            sent += 1;
        }
    }
    let balance = client.get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &token)).await;
    assert!(balance.is_ok(), "a read after the drops: {balance:?}");

    assert_eq!(minor(app.wallet("rcpt0").await), sent * AMOUNT_MINOR, "one payment per key");
    assert_eq!(minor(app.wallet("dropper").await), FUNDED_MINOR - sent * AMOUNT_MINOR);
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}
