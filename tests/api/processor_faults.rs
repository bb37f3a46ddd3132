//! Processor faults under load (issue 8), on both backends: the sandbox processor times
//! out on 20% of calls (half of those after processing them) and fails 10% with a
//! processing error, while card-funded, split and wallet sends run concurrently. Once
//! the resolver has run every payment is SETTLED or FAILED; no card is charged twice or
//! charged without the ledger knowing; no money is created; every retry replays the
//! original outcome.
//!
//! `race::*` pins down one interleaving the load cannot reach on purpose: the resolver
//! taking a payment whose own request is still waiting for a slow processor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmpay::kernel::ids::UserId;
use dmpay::kernel::money::{Currency, Money};
use dmpay::payments::{FundingSource, SendInput};
use dmpay::processor::sandbox::{Sandbox, SandboxConfig};

use tonic::Code;
use tonic_types::StatusExt;

use crate::backend_tests;
use crate::helpers::*;
use crate::raw;

use pb::FundingSource::{Auto, Card};

const SENDERS: usize = 6;
const RECIPIENTS: usize = 3;
/// Parallel streams of sends per sender, so a sender's sends race for its wallet.
const STREAMS: usize = 3;
const SENDS_PER_STREAM: usize = 10;
const FUNDED: &str = "30.00";
const FUNDED_MINOR: i64 = 3_000;
/// A card that links, then declines every charge.
const DECLINING_CARD: &str = "4000000000000341";
/// How long the resolver may take to finish every pending payment.
const RESOLVE_BOUND: Duration = Duration::from_secs(60);

fn minor(amount: &str) -> i64 {
    let (sign, digits) = amount.strip_prefix('-').map_or((1, amount), |d| (-1, d));
    let (whole, frac) = digits.split_once('.').expect("two decimals");
    assert_eq!(frac.len(), 2, "{amount}");
    sign * (whole.parse::<i64>().expect("whole") * 100 + frac.parse::<i64>().expect("fraction"))
}

fn sender(s: usize) -> String {
    format!("payer{s}")
}

fn recipient(r: usize) -> String {
    format!("payee{r}")
}

/// What the i-th send of a stream is: card only, or AUTO (the wallet first, the card
/// for the rest) of several sizes, so some are split and some wallet-only.
fn plan(i: usize) -> (pb::FundingSource, &'static str) {
    match i % 3 {
        0 => (Card, "7.00"),
        1 => (Auto, "9.00"),
        _ => (Auto, "4.00"),
    }
}

fn request(key: &str, to: &str, funding: pb::FundingSource, amount: &str) -> pb::SendPaymentRequest {
    pb::SendPaymentRequest {
        idempotency_key: key.into(),
        recipient_id: to.into(),
        amount: usd(amount),
        note: "faults".into(),
        conversation_id: "conv-faults".into(),
        message_id: format!("m-{key}"),
        funding_source: funding as i32,
        payment_method_token: String::new(),
    }
}

/// Tokenizes and links a card, retrying the link while the processor does not answer
/// (the verification is subject to the injected faults too; the CVC is kept for a retry).
async fn link_card(app: &TestApp, token: &str, number: &str) {
    let pm = app.tokenize(token, number).await.expect("tokenize");
    for _ in 0..50 {
        match app
            .methods()
            .link_payment_method(authed(
                pb::LinkPaymentMethodRequest { token: pm.token.clone(), make_default: true },
                token,
            ))
            .await
        {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable => continue,
            Err(e) => panic!("link {number}: {e:?}"),
        }
    }
    panic!("link {number}: the processor never answered in 50 attempts");
}

/// The answer to a send, reduced to what a retry must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Payment { id: String, status: i32 },
    Refused { code: Code, reason: String },
}

fn answer(r: Result<tonic::Response<pb::Payment>, tonic::Status>) -> Answer {
    match r {
        Ok(p) => {
            let p = p.into_inner();
            Answer::Payment { id: p.payment_id, status: p.status }
        }
        Err(e) => {
            let reason = e.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default();
            Answer::Refused { code: e.code(), reason }
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
struct PaymentRow {
    payment_id: String,
    sender_id: String,
    recipient_id: String,
    idempotency_key: String,
    status: String,
    amount: i64,
    wallet_amount: i64,
    card_amount: i64,
    fee_amount: i64,
    failure_reason: String,
    capture_ref: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct CaptureRow {
    idempotency_key: String,
    reference: String,
    amount: Option<i64>,
    status: String,
}

async fn faults_end_settled_or_failed_once(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[
            ("DMPAY_SANDBOX_TIMEOUT_RATE", "0.2"),
            ("DMPAY_SANDBOX_ERROR_RATE", "0.1"),
            ("DMPAY_PAYMENTS_RESOLVE_AFTER", "1s"),
            ("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "500ms"),
            ("DMPAY_CARD_FEE_BPS", "290"),
            ("DMPAY_CARD_FEE_FIXED_MINOR", "30"),
        ],
    )
    .await
    else {
        return;
    };
    raw::panics::watch();
    let panics_before = raw::panics::count();
    let payees: Vec<String> = (0..RECIPIENTS).map(recipient).collect();
    app.users(&payees.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    // Payer 0 holds the card that declines every charge; the others approve.
    for s in 0..SENDERS {
        let t = app.token(&sender(s), PAY_SCOPES);
        let card = if s == 0 { DECLINING_CARD.to_owned() } else { visa(s as u32) };
        link_card(&app, &t, &card).await;
        fund(&app, &treasury, &sender(s), FUNDED).await;
    }

    // The load: every payer's streams at once.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        for stream in 0..STREAMS {
            let mut client = app.payments();
            let token = app.token(&sender(s), PAY_SCOPES);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..SENDS_PER_STREAM {
                    let key = format!("f{s}-{stream}-{i}");
                    let (funding, amount) = plan(i + stream);
                    let to = recipient((s + i) % RECIPIENTS);
                    let r = client.send_payment(authed(request(&key, &to, funding, amount), &token)).await;
                    out.push((s, key, to, funding, amount, answer(r)));
                }
                out
            }));
        }
    }
    let mut sends = Vec::new();
    for t in tasks {
        sends.extend(t.await.expect("send task"));
    }
    let mut first_answers: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (_, key, _, _, _, a) in &sends {
        let label = match a {
            Answer::Payment { status, .. } if *status == pb::PaymentStatus::Settled as i32 => ("OK", "SETTLED"),
            Answer::Payment { status, .. } if *status == pb::PaymentStatus::Pending as i32 => ("OK", "PENDING"),
            Answer::Payment { status, .. } => panic!("{key}: a new payment answered with status {status}"),
            Answer::Refused { code: Code::FailedPrecondition, reason } => ("FAILED_PRECONDITION", reason.as_str()),
            Answer::Refused { code: Code::Unavailable, .. } => ("UNAVAILABLE", ""),
            Answer::Refused { code, reason } => panic!("{key}: answered {code:?} {reason}"),
        };
        *first_answers.entry(label).or_default() += 1;
    }
    eprintln!("{backend:?}: {} sends in {:?}: {first_answers:?}", sends.len(), started.elapsed());

    // UNAVAILABLE means "outcome unknown, retry": a client retries with the same key
    // (bounded here), and each such send then ends as one payment like the others.
    for (s, key, to, funding, amount, first) in sends.iter_mut() {
        let mut tries = 0;
        while matches!(first, Answer::Refused { code: Code::Unavailable, .. }) {
            tries += 1;
            assert!(tries <= 50, "{key}: still UNAVAILABLE after 50 retries");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t = app.token(&sender(*s), PAY_SCOPES);
            *first = answer(app.payments().send_payment(authed(request(key, to, *funding, amount), &t)).await);
        }
    }

    // The resolver finishes whatever was left pending.
    let waited = Instant::now();
    loop {
        let pending: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM payments WHERE status = 'pending'",
        )
        .fetch_one(pool)
        .await)
        .expect("pending");
        if pending == 0 {
            break;
        }
        assert!(waited.elapsed() < RESOLVE_BOUND, "{pending} payments still PENDING after {RESOLVE_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{backend:?}: no payment pending after another {:?}", waited.elapsed());

    let payments: Vec<PaymentRow> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT payment_id, sender_id, recipient_id, idempotency_key, status, amount, wallet_amount, card_amount, \
         fee_amount, failure_reason, capture_ref FROM payments",
    )
    .fetch_all(pool)
    .await)
    .expect("payments");
    let by_key: HashMap<(String, String), &PaymentRow> =
        payments.iter().map(|p| ((p.sender_id.clone(), p.idempotency_key.clone()), p)).collect();

    // Every send is one payment, now SETTLED or FAILED; a retry with its key answers
    // with that outcome.
    assert_eq!(payments.len(), sends.len(), "one payment per send");
    let mut outcomes: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (s, key, to, funding, amount, first) in &sends {
        let p = by_key.get(&(sender(*s), key.clone())).unwrap_or_else(|| panic!("{key}: no payment"));
        assert!(p.status == "settled" || p.status == "failed", "{key}: {}", p.status);
        *outcomes.entry((p.status.as_str(), p.failure_reason.as_str())).or_default() += 1;
        if let Answer::Payment { id, .. } = first {
            assert_eq!(id, &p.payment_id, "{key}");
        }
        let token = app.token(&sender(*s), PAY_SCOPES);
        let again = answer(app.payments().send_payment(authed(request(key, to, *funding, amount), &token)).await);
        let expected = if p.status == "settled" {
            Answer::Payment { id: p.payment_id.clone(), status: pb::PaymentStatus::Settled as i32 }
        } else {
            Answer::Refused { code: Code::FailedPrecondition, reason: p.failure_reason.clone() }
        };
        assert_eq!(again, expected, "{key}: the retry replays the final outcome");
    }
    eprintln!("{backend:?}: outcomes {outcomes:?}");
    assert!(outcomes.keys().any(|(s, _)| *s == "settled"), "nothing settled: {outcomes:?}");
    assert!(outcomes.contains_key(&("failed", "CARD_DECLINED")), "the declining card failed nothing: {outcomes:?}");

    // The processor's captures and the ledger's card entries, one to one.
    let captures: Vec<CaptureRow> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT idempotency_key, reference, amount, status FROM sandbox_processor_calls WHERE kind = 'capture'",
    )
    .fetch_all(pool)
    .await)
    .expect("captures");
    let card_entries: Vec<(String, String)> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT id, metadata FROM ledger_entries WHERE kind = 'dm_payment_card'",
    )
    .fetch_all(pool)
    .await)
    .expect("card entries");
    let by_id: HashMap<&str, &PaymentRow> = payments.iter().map(|p| (p.payment_id.as_str(), p)).collect();
    let mut captured: HashMap<String, &CaptureRow> = HashMap::new();
    let mut captured_total = 0i64;
    for c in captures.iter().filter(|c| c.status == "succeeded") {
        let id = c
            .idempotency_key
            .strip_prefix("pay:")
            .and_then(|k| k.strip_suffix(":capture"))
            .unwrap_or_else(|| panic!("capture under an unexpected key {}", c.idempotency_key));
        let p = by_id.get(id).unwrap_or_else(|| panic!("capture {} of no payment", c.reference));
        assert_eq!(p.status, "settled", "payment {id} was captured ({}) but is {}", c.reference, p.status);
        assert_eq!(c.amount, Some(p.card_amount + p.fee_amount), "capture of {id}: card part and fee");
        assert_eq!(p.capture_ref.as_deref(), Some(c.reference.as_str()), "payment {id} names its capture");
        assert!(captured.insert(id.to_owned(), c).is_none(), "payment {id} captured twice");
        captured_total += c.amount.unwrap_or(0);
    }
    let mut booked: HashMap<String, String> = HashMap::new();
    for (entry_id, metadata) in &card_entries {
        let m: serde_json::Value = serde_json::from_str(metadata).expect("metadata json");
        let id = m["payment_id"].as_str().unwrap_or_else(|| panic!("card entry {entry_id} without payment_id"));
        let reference =
            m["processor_reference"].as_str().unwrap_or_else(|| panic!("card entry {entry_id}: no reference"));
        let c = captured.get(id).unwrap_or_else(|| panic!("card entry {entry_id} of payment {id} without a capture"));
        assert_eq!(c.reference, reference, "card entry {entry_id} names the capture of its payment");
        assert!(booked.insert(id.to_owned(), entry_id.clone()).is_none(), "payment {id} booked twice");
    }
    for p in &payments {
        let card = p.status == "settled" && p.card_amount > 0;
        assert_eq!(captured.contains_key(&p.payment_id), card, "{}: {} card {}", p.payment_id, p.status, p.card_amount);
        assert_eq!(booked.contains_key(&p.payment_id), card, "{}: {} card {}", p.payment_id, p.status, p.card_amount);
    }

    // Where the money is.
    let svc = app.token("svc", LEDGER_SCOPES);
    let clearing = balance(&app, &svc, "processor:sandbox:clearing:USD").await;
    assert_eq!(minor(&clearing.posted.expect("posted").amount), captured_total, "clearing = the captures");
    let fees = minor(&balance(&app, &svc, "platform:fees:USD").await.posted.expect("posted").amount);
    let settled: Vec<&PaymentRow> = payments.iter().filter(|p| p.status == "settled").collect();
    assert_eq!(fees, settled.iter().map(|p| p.fee_amount).sum::<i64>(), "fees = the settled payments' fees");
    let mut expected: HashMap<String, i64> = HashMap::new();
    for s in 0..SENDERS {
        expected.insert(sender(s), FUNDED_MINOR);
    }
    for r in 0..RECIPIENTS {
        expected.insert(recipient(r), 0);
    }
    for p in &settled {
        *expected.get_mut(&p.sender_id).expect("sender") -= p.wallet_amount;
        *expected.get_mut(&p.recipient_id).expect("recipient") += p.amount;
    }
    let mut wallets_total = 0;
    let users: HashSet<String> = expected.keys().cloned().collect();
    for user in &users {
        let w = app.wallet(user).await;
        let posted = minor(&w.posted.expect("posted").amount);
        let available = minor(&w.available.expect("available").amount);
        let pending = minor(&w.pending.expect("pending").amount);
        assert!(posted >= 0 && available >= 0, "{user}: posted {posted} available {available}");
        assert_eq!(pending, 0, "{user}: no hold left");
        assert_eq!(posted, expected[user], "{user}: funded, minus what was sent from the wallet, plus what came in");
        wallets_total += posted;
    }
    // Money in (treasury funding, card captures) = money out (wallets, fees).
    assert_eq!(wallets_total + fees, SENDERS as i64 * FUNDED_MINOR + captured_total, "no money created or lost");
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(raw::panics::count(), panics_before, "the server panicked (see the output above)");
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processor_faults_under_load() {
        super::faults_end_settled_or_failed_once(super::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processor_faults_under_load() {
        super::faults_end_settled_or_failed_once(super::Backend::Postgres).await;
    }
}

/// The resolver picks up a payment whose own request is still waiting for the
/// processor (a processor call slower than DMPAY_PAYMENTS_RESOLVE_AFTER). The request's
/// authorization then fails with a processing error (the sandbox records injected errors
/// nowhere, so the key stays free) while the resolver's authorization and capture under
/// the same keys succeed. Whatever the order, the payment must end in one state that
/// agrees with the money and with what the caller was told: SETTLED with one capture
/// and one card entry, or FAILED with neither.
///
/// Regression test: the request used to mark the payment FAILED (PROCESSING_ERROR, and
/// that is what the caller heard) while the resolver captured the card and booked the
/// card entry, leaving a failed payment that charged the card and paid the recipient.
/// Now an attempt holds a claim on the payment, renewed before every processor call and
/// before it fails the payment; the resolver takes over only an expired claim, and the
/// attempt that lost it stops and answers with the payment as it stands (pending, then
/// settled by the resolver).
async fn resolver_racing_a_live_send_agrees_with_the_caller(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    link_card(&app, &alice, "4242424242424242").await;
    // The request's processor answers after 3 s with a processing error; the resolver's
    // after 2 s per call, successfully.
    let failing = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { latency: Duration::from_secs(3), error_rate: 1.0, ..Default::default() },
        app.clock.clone(),
    ));
    let working = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { latency: Duration::from_secs(2), ..Default::default() },
        app.clock.clone(),
    ));
    let live = payments_over(&app, failing);
    let resolver = payments_over(&app, working);
    let sender = UserId::parse("u", "alice").expect("user");
    let input = SendInput {
        idempotency_key: "race-1".into(),
        recipient: UserId::parse("u", "bob").expect("user"),
        amount: Money::from_minor(Currency::from_code("USD").expect("USD"), 700),
        note: String::new(),
        conversation_id: String::new(),
        message_id: String::new(),
        funding: FundingSource::Card,
        payment_method_token: None,
        request_id: None,
    };
    let request = {
        let sender = sender.clone();
        tokio::spawn(async move { live.send(&sender, input).await })
    };
    // Once the payment is stored (and the request is at the processor), the resolver runs.
    let t0 = Instant::now();
    let payment_id = loop {
        let id: Option<String> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
            "SELECT payment_id FROM payments WHERE idempotency_key = 'race-1' AND status = 'pending'",
        )
        .fetch_optional(pool)
        .await)
        .expect("payment");
        if let Some(id) = id {
            break id;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the payment was never stored as pending");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The claim lease is zero here, so the live attempt's claim is always stale, but the
    // attempt renews it before each processor call: a renewal landing between the
    // resolver's read and its take-over makes that take-over miss, which is correct (the
    // resolver never takes a claim renewed after it looked). The resolver therefore tries
    // again until it holds the payment; the request is at the processor for three
    // seconds, so a retry a few milliseconds later finds the claim stale.
    let mut resolved = 0;
    for _ in 0..50 {
        resolved = resolver.resolve_pending().await.expect("resolver");
        if resolved > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let told = request.await.expect("request task");
    assert_eq!(resolved, 1, "the resolver took the pending payment");

    let (status, reason): (String, String) = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT status, failure_reason FROM payments WHERE payment_id = $1",
    )
    .bind(&payment_id)
    .fetch_one(pool)
    .await)
    .expect("payment");
    let captures: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM sandbox_processor_calls WHERE kind = 'capture' AND status = 'succeeded' \
         AND idempotency_key = $1",
    )
    .bind(format!("pay:{payment_id}:capture"))
    .fetch_one(pool)
    .await)
    .expect("captures");
    let card_entries: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'dm_payment_card' AND metadata LIKE $1",
    )
    .bind(format!("%\"payment_id\":\"{payment_id}\"%"))
    .fetch_one(pool)
    .await)
    .expect("card entries");
    let bob = minor(&app.wallet("bob").await.posted.expect("posted").amount);
    eprintln!(
        "{:?}: caller told {:?}; payment {status} {reason}; captures {captures}; card entries {card_entries}; bob {bob}",
        app.backend,
        told.as_ref().map(|p| p.status).map_err(|e| e.to_string())
    );
    match status.as_str() {
        "settled" => {
            assert!(told.is_ok(), "the caller heard {told:?} but the payment settled");
            assert_eq!((captures, card_entries, bob), (1, 1, 700), "a settled payment: one capture, one entry");
        }
        "failed" => {
            assert!(told.is_err(), "the caller heard {told:?} but the payment failed");
            assert_eq!(
                (captures, card_entries, bob),
                (0, 0, 0),
                "a FAILED payment ({reason}) charged the card and paid the recipient"
            );
        }
        other => panic!("payment {payment_id} left {other}"),
    }
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}

mod race {
    use super::*;
    backend_tests!(resolver_racing_a_live_send_agrees_with_the_caller);
}
