//! Money rules under concurrency: every limit is checked and consumed in one atomic
//! step whatever the funding path, and a request cannot close under a payment in flight.
//! Each test fires at least 50 calls at once, on both backends.

use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;
use crate::{backend_fn_tests, backend_tests};

use pb::FundingSource::{Auto, Card};

/// Parallel calls per test.
const PARALLEL: usize = 50;

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

fn minor(m: &Option<pb::Money>) -> i64 {
    let s = &m.as_ref().expect("money").amount;
    let (units, cents) = s.split_once('.').unwrap_or((s, "00"));
    units.parse::<i64>().unwrap() * 100 + cents.parse::<i64>().unwrap()
}

async fn fund_user(app: &TestApp, user: &str, amount: &str) {
    let t = app.token("svc-treasury", LEDGER_SCOPES);
    fund(app, &t, user, amount).await;
}

/// Counts the answers: settled payments and their total, and the refusals by reason.
struct Tally {
    settled: usize,
    settled_minor: i64,
    refused: std::collections::BTreeMap<String, usize>,
}

fn tally(answers: Vec<Result<pb::Payment, tonic::Status>>) -> Tally {
    let mut t = Tally { settled: 0, settled_minor: 0, refused: Default::default() };
    for a in answers {
        match a {
            Ok(p) => {
                assert_eq!(p.status, pb::PaymentStatus::Settled as i32, "{p:?}");
                t.settled += 1;
                t.settled_minor += minor(&p.amount);
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                *t.refused.entry(reason(&e)).or_default() += 1;
            }
        }
    }
    t
}

async fn join_all<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// What the sender has in the daily-limit buckets, and in settled payments, in minor
/// units: both must equal what the calls were told settled.
async fn sent_by(app: &TestApp, user: &str) -> (i64, i64) {
    let spend: Option<i64> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT CAST(SUM(amount) AS BIGINT) FROM payment_spend WHERE sender_id = $1"
    )
    .bind(user)
    .fetch_one(pool)
    .await)
    .unwrap();
    let paid: Option<i64> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT CAST(SUM(amount) AS BIGINT) FROM payments WHERE sender_id = $1 AND status = 'settled'"
    )
    .bind(user)
    .fetch_one(pool)
    .await)
    .unwrap();
    (spend.unwrap_or(0), paid.unwrap_or(0))
}

async fn send_many(app: &TestApp, user: &str, funding: pb::FundingSource, amount: &str) -> Tally {
    let token = app.token(user, PAY_SCOPES);
    let mut tasks = Vec::new();
    for i in 0..PARALLEL {
        let mut client = app.payments();
        let (t, amount) = (token.clone(), amount.to_owned());
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("burst-{i}"),
                        recipient_id: format!("shop{}", i % 5),
                        amount: usd(&amount),
                        funding_source: funding as i32,
                        ..Default::default()
                    },
                    &t,
                ))
                .await
                .map(|r| r.into_inner())
        }));
    }
    tally(join_all(tasks).await)
}

/// 50 card-funded sends of 20.00 at once from an unverified sender (500.00 a day):
/// exactly 25 settle, the rest are DAILY_LIMIT, and nothing of theirs is written.
async fn card_sends_hold_the_daily_limit(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let t = send_many(&app, "alice", Card, "20.00").await;
    assert_eq!(t.settled, 25, "refused: {:?}", t.refused);
    assert_eq!(t.settled_minor, 50_000);
    assert_eq!(t.refused.get("DAILY_LIMIT"), Some(&25), "{:?}", t.refused);
    assert_eq!(sent_by(&app, "alice").await, (50_000, 50_000));
    assert_eq!(app.count("payments").await, 25, "a refused send writes no payment row");
    assert!(app.verify().await.ok());
}

/// The same with AUTO funding and a wallet that covers five of them: wallet-funded sends
/// (decided in the engine's batch) and card-funded ones (the card path) of one sender
/// share one limit.
async fn split_sends_hold_the_daily_limit(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let t = send_many(&app, "alice", Auto, "20.00").await;
    assert_eq!(t.settled, 25, "refused: {:?}", t.refused);
    assert_eq!(t.settled_minor, 50_000);
    assert_eq!(sent_by(&app, "alice").await, (50_000, 50_000));
    // The wallet paid first; the card the rest.
    assert_eq!(app.wallet("alice").await.posted.unwrap().amount, "0.00");
    assert!(app.verify().await.ok());
}

async fn request(app: &TestApp, requester: &str, key: &str, payer: &str, amount: &str) -> pb::Bill {
    let t = app.token(requester, PAY_SCOPES);
    app.payments()
        .request_payment(authed(
            pb::RequestPaymentRequest {
                idempotency_key: key.into(),
                payer_id: payer.into(),
                amount: usd(amount),
                conversation_id: format!("conv-{key}"),
                ..Default::default()
            },
            &t,
        ))
        .await
        .expect("request")
        .into_inner()
}

/// 50 requests of 20.00 paid at once by one unverified payer: 25 are paid.
async fn request_pays_hold_the_daily_limit(app: TestApp) {
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..PARALLEL {
        ids.push(request(&app, &format!("friend{}", i % 10), &format!("rq-{i}"), "bob", "20.00").await.bill_id);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut client = app.payments();
        let t = bob.clone();
        tasks.push(tokio::spawn(async move {
            client
                .pay_bill(authed(
                    pb::PayBillRequest { bill_id: id, idempotency_key: format!("tap-{i}"), ..Default::default() },
                    &t,
                ))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let t = tally(join_all(tasks).await);
    assert_eq!(t.settled, 25, "refused: {:?}", t.refused);
    assert_eq!(sent_by(&app, "bob").await, (50_000, 50_000));
    let paid: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM payment_requests WHERE status = 'paid'"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(paid, 25);
    assert!(app.verify().await.ok());
}

/// 50 requests, each paid by its payer while its requester cancels it (half of them) or
/// its payer declines it (the other half), all at once, with a card that takes a moment
/// to charge. Whatever the order, a request ends PAID with its settled payment, or
/// closed with no settled payment for it: money never moves for a closed request.
async fn a_request_never_closes_under_its_payment(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_SANDBOX_LATENCY", "40ms")]).await else { return };
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let alice = app.token("alice", PAY_SCOPES);
    let mut ids = Vec::new();
    for i in 0..PARALLEL {
        ids.push(request(&app, "alice", &format!("race-{i}"), "bob", "1.00").await.bill_id);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut pay_client, mut close_client) = (app.payments(), app.payments());
        let (b, a, id, db) = (bob.clone(), alice.clone(), id.clone(), app.db.clone());
        tasks.push(tokio::spawn(async move {
            let pay = pay_client.pay_bill(authed(
                pb::PayBillRequest {
                    bill_id: id.clone(),
                    idempotency_key: format!("p-{i}"),
                    funding_source: Card as i32,
                    ..Default::default()
                },
                &b,
            ));
            let close = async {
                // Every other close waits until the payment is recorded, so that it meets
                // the payment in flight; the rest go at once and race it.
                if i % 4 < 2 {
                    for _ in 0..400 {
                        let recorded: i64 = dmpay::with_db!(&db, pool => sqlx::query_scalar(
                            "SELECT COUNT(*) FROM payments WHERE request_id = $1"
                        )
                        .bind(&id)
                        .fetch_one(pool)
                        .await)
                        .unwrap();
                        if recorded > 0 {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                if i % 2 == 0 {
                    close_client.cancel_bill(authed(pb::CancelBillRequest { bill_id: id.clone() }, &a)).await
                } else {
                    close_client.decline_bill(authed(pb::DeclineBillRequest { bill_id: id.clone() }, &b)).await
                }
            };
            let (paid, closed) = tokio::join!(pay, close);
            (paid.map(|r| r.into_inner()), closed.map(|r| r.into_inner()))
        }));
    }
    let mut in_progress = 0;
    for (id, (paid, closed)) in ids.iter().zip(join_all(tasks).await) {
        let t = app.token("alice", PAY_SCOPES);
        let now =
            app.payments().get_bill(authed(pb::GetBillRequest { bill_id: id.clone() }, &t)).await.unwrap().into_inner();
        let settled: Vec<String> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
            "SELECT payment_id FROM payments WHERE request_id = $1 AND status = 'settled'"
        )
        .bind(id)
        .fetch_all(pool)
        .await)
        .unwrap();
        match pb::BillStatus::try_from(now.status).unwrap() {
            pb::BillStatus::Paid => {
                assert_eq!(settled, vec![now.payment_id.clone()], "{id}");
                let p = paid.expect("the pay that paid it answered with its payment");
                assert_eq!(p.payment_id, now.payment_id);
                let e = closed.expect_err("a paid request was not closed");
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                if reason(&e) == "REQUEST_PAYMENT_IN_PROGRESS" {
                    in_progress += 1;
                } else {
                    assert_eq!(reason(&e), "REQUEST_NOT_OPEN", "{e:?}");
                }
            }
            pb::BillStatus::Cancelled | pb::BillStatus::Declined => {
                assert!(settled.is_empty(), "money moved for closed request {id}: {settled:?}");
                let e = paid.expect_err("a closed request was not paid");
                assert_eq!(reason(&e), "REQUEST_NOT_OPEN", "{e:?}");
                assert!(closed.is_ok());
            }
            other => panic!("request {id} ended {other:?}"),
        }
    }
    // The rule, not the ordering, is under test; the interleaving where the close meets
    // a payment in flight is the one that used to lose money, so it must have happened.
    assert!(in_progress > 0, "no close met a payment in flight; the test did not race");
    assert!(app.verify().await.ok());
}

/// A request whose payment is pending (a card outcome still unknown) cannot be
/// cancelled or declined; once the payment fails, it can.
async fn a_pending_request_payment_blocks_the_close(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else { return };
    app.users(CAST).await;
    let (alice, bob) = (app.token("alice", PAY_SCOPES), app.token("bob", PAY_SCOPES));
    let r = request(&app, "alice", "pending-r", "bob", "3.00").await;
    // The payment in flight, as the card path leaves one whose processor outcome is
    // unknown: a pending row for the request, claimed by its (live) attempt, so that the
    // resolver's first pass, which may run only now on a busy machine, leaves it alone.
    dmpay::with_db!(&app.db, pool => sqlx::query(
        "INSERT INTO payments (payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, \
         fee_amount, status, funding_source, note, conversation_id, message_id, request_id, failure_reason, \
         failure_message, idempotency_key, request_hash, created_at_us, updated_at_us, claimed_until_us) \
         VALUES ('pay_inflight', 'bob', 'alice', 'USD', 300, 0, 300, 0, 'pending', 'card', '', '', '', $1, '', '', 'k', 'h', \
         1, 1, 9000000000000000)"
    )
    .bind(&r.bill_id)
    .execute(pool)
    .await
    .map(|_| ()))
    .unwrap();
    let events_before = app.count("payment_events").await;
    let e = app
        .payments()
        .cancel_bill(authed(pb::CancelBillRequest { bill_id: r.bill_id.clone() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "REQUEST_PAYMENT_IN_PROGRESS");
    assert!(e.message().contains("pay_inflight"), "{}", e.message());
    let e = app
        .payments()
        .decline_bill(authed(pb::DeclineBillRequest { bill_id: r.bill_id.clone() }, &bob))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "REQUEST_PAYMENT_IN_PROGRESS");
    // Nor does it expire under the payment.
    dmpay::with_db!(&app.db, pool => sqlx::query("UPDATE payment_requests SET expires_at_us = 1 WHERE request_id = $1")
        .bind(&r.bill_id)
        .execute(pool)
        .await
        .map(|_| ()))
    .unwrap();
    assert_eq!(app.payments_service.expire_requests().await.unwrap(), 0);
    // Nothing changed: still open, no event.
    assert_eq!(app.count("payment_events").await, events_before);
    let now = app
        .payments()
        .get_bill(authed(pb::GetBillRequest { bill_id: r.bill_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.status, pb::BillStatus::Open as i32);
    // The payment fails: the request can close.
    dmpay::with_db!(&app.db, pool => sqlx::query("UPDATE payments SET status = 'failed' WHERE payment_id = 'pay_inflight'")
        .execute(pool)
        .await
        .map(|_| ()))
    .unwrap();
    let closed = app
        .payments()
        .cancel_bill(authed(pb::CancelBillRequest { bill_id: r.bill_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.status, pb::BillStatus::Cancelled as i32);
}

/// `PayRequest` replays check the body: the same key with another funding source or
/// card is ALREADY_EXISTS, not the old payment.
async fn pay_request_replays_check_the_body(app: TestApp) {
    fund_user(&app, "bob", "50.00").await;
    let bob = app.token("bob", PAY_SCOPES);
    let card = app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let r = request(&app, "alice", "body-r", "bob", "5.00").await;
    let pay = |funding: pb::FundingSource, token: &str| {
        let mut c = app.payments();
        let req = pb::PayBillRequest {
            bill_id: r.bill_id.clone(),
            idempotency_key: "tap".into(),
            funding_source: funding as i32,
            payment_method_token: token.into(),
        };
        let t = bob.clone();
        async move { c.pay_bill(authed(req, &t)).await.map(|p| p.into_inner()) }
    };
    let first = pay(Auto, "").await.unwrap();
    assert_eq!(pay(Auto, "").await.unwrap().payment_id, first.payment_id, "a true retry replays");
    let e = pay(Card, "").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = pay(Auto, &card.token).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // The same key for another request is refused too.
    let other = request(&app, "alice", "body-r2", "bob", "5.00").await;
    let e = app
        .payments()
        .pay_bill(authed(
            pb::PayBillRequest { bill_id: other.bill_id, idempotency_key: "tap".into(), ..Default::default() },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(app.count("payments").await, 1);
}

/// 50 tokenizations at once (half of them invalid cards, which count too) against the
/// default 20 an hour: exactly 20 are served, the rest are TOKENIZE_RATE_LIMIT and write
/// nothing.
async fn tokenization_limit_holds_under_parallel_calls(app: TestApp) {
    let t = app.token("carder", METHOD_SCOPES);
    let mut tasks = Vec::new();
    for n in 0..PARALLEL as u32 {
        let mut client = app.methods();
        let t = t.clone();
        // Odd ones fail Luhn: card testing is mostly failures.
        let mut number = visa(n);
        if n % 2 == 1 {
            let check = number.pop().and_then(|c| c.to_digit(10)).unwrap();
            number.push(char::from_digit((check + 1) % 10, 10).unwrap());
        }
        tasks.push(tokio::spawn(async move {
            client
                .tokenize_card(authed(
                    pb::TokenizeCardRequest {
                        card_number: number,
                        exp_month: 12,
                        exp_year: 2034,
                        cvc: "731".into(),
                        holder_name: "Card Tester".into(),
                        postal_code: "10115".into(),
                    },
                    &t,
                ))
                .await
        }));
    }
    let (mut served, mut limited) = (0, 0);
    for r in join_all(tasks).await {
        match r {
            Ok(_) => served += 1,
            Err(e) if e.code() == Code::InvalidArgument => served += 1,
            Err(e) => {
                assert_eq!(reason(&e), "TOKENIZE_RATE_LIMIT", "{e:?}");
                limited += 1;
            }
        }
    }
    assert_eq!((served, limited), (20, 30));
    let attempts: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE actor = 'carder' AND action = 'card.tokenize'"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(attempts, 20, "one record per served attempt, none for a refused one");
}

/// 50 cards linked at once against the cap of 10 active methods: exactly 10 are active.
async fn card_cap_holds_under_parallel_links(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_VAULT_TOKENIZE_PER_HOUR_MAX", "1000")]).await else {
        return;
    };
    let t = app.token("hoarder", METHOD_SCOPES);
    let mut tokens = Vec::new();
    for n in 0..PARALLEL as u32 {
        tokens.push(app.tokenize(&t, &visa(n)).await.unwrap().token);
    }
    let mut tasks = Vec::new();
    for token in tokens {
        let mut client = app.methods();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            client.link_payment_method(authed(pb::LinkPaymentMethodRequest { token, make_default: false }, &t)).await
        }));
    }
    let (mut linked, mut capped) = (0, 0);
    for r in join_all(tasks).await {
        match r {
            Ok(_) => linked += 1,
            Err(e) => {
                assert_eq!(reason(&e), "PAYMENT_METHOD_LIMIT", "{e:?}");
                capped += 1;
            }
        }
    }
    assert_eq!((linked, capped), (10, 40));
    let active: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM payment_methods WHERE user_id = 'hoarder' AND status = 'active'"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(active, 10);
    let defaults: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM payment_methods WHERE user_id = 'hoarder' AND is_default"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(defaults, 1, "exactly one default");
}

backend_tests!(
    card_sends_hold_the_daily_limit,
    split_sends_hold_the_daily_limit,
    request_pays_hold_the_daily_limit,
    pay_request_replays_check_the_body,
    tokenization_limit_holds_under_parallel_calls,
);

backend_fn_tests!(
    a_request_never_closes_under_its_payment,
    a_pending_request_payment_blocks_the_close,
    card_cap_holds_under_parallel_links,
);
