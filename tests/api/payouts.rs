//! Payouts (cash-out to a card) through the real server: speeds and fees, the sandbox's
//! payout test cards, returns reported by the processor, limits and the balance under
//! parallel calls, retries, bad input, events and reconciliation.

use std::sync::Arc;

use dmpay::processor::sandbox::{Sandbox, SandboxConfig};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;
use crate::{backend_fn_tests, backend_tests};

const DEBIT: &str = "4000056655665556";
const CREDIT: &str = "4000000000004202";
const DECLINES: &str = "4000000000004210";
const RETURNS: &str = "4000000000004228";

fn amt(m: &Option<pb::Money>) -> &str {
    m.as_ref().map(|m| m.amount.as_str()).unwrap_or("")
}

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status.get_error_details().bad_request().map(|b| b.field_violations[0].field.clone()).unwrap_or_default()
}

async fn payout(
    app: &TestApp,
    token: &str,
    key: &str,
    amount: &str,
    speed: pb::PayoutSpeed,
) -> Result<pb::Payout, tonic::Status> {
    app.payments()
        .create_payout(authed(
            pb::CreatePayoutRequest {
                idempotency_key: key.into(),
                amount: usd(amount),
                speed: speed as i32,
                payment_method_token: String::new(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn get(app: &TestApp, token: &str, id: &str) -> Result<pb::Payout, tonic::Status> {
    app.payments()
        .get_payout(authed(pb::GetPayoutRequest { payout_id: id.into() }, token))
        .await
        .map(|r| r.into_inner())
}

async fn list(app: &TestApp, token: &str, page_size: u32, page_token: &str) -> pb::ListPayoutsResponse {
    app.payments()
        .list_payouts(authed(pb::ListPayoutsRequest { page_size, page_token: page_token.into() }, token))
        .await
        .expect("list payouts")
        .into_inner()
}

/// `n` standard payouts of `amount` at once, each under its own key.
async fn parallel_payouts(
    app: &TestApp,
    token: &str,
    prefix: &str,
    amount: &str,
    n: usize,
) -> Vec<Result<pb::Payout, tonic::Status>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = app.payments();
            let req = authed(
                pb::CreatePayoutRequest {
                    idempotency_key: format!("{prefix}-{i}"),
                    amount: usd(amount),
                    speed: pb::PayoutSpeed::Standard as i32,
                    payment_method_token: String::new(),
                },
                token,
            );
            tokio::spawn(async move { client.create_payout(req).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Alice with `funds` USD in her wallet and `card` as her default card.
async fn alice_with(app: &TestApp, funds: &str, card: &str) -> String {
    app.users(CAST).await;
    let svc = app.token("svc", LEDGER_SCOPES);
    fund(app, &svc, "alice", funds).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, card, true).await.expect("link card");
    alice
}

async fn posted(app: &TestApp, code: &str) -> String {
    let svc = app.token("svc", LEDGER_SCOPES);
    amt(&balance(app, &svc, code).await.posted).to_owned()
}

/// Every event of `token`'s user after sequence 0, read until `n` have come.
async fn events(app: &TestApp, token: &str, n: usize) -> Vec<pb::PaymentEvent> {
    let mut stream = app
        .payments()
        .watch_payments(authed(pb::WatchPaymentsRequest { after_sequence: 0, ..Default::default() }, token))
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await.expect("event in time");
        out.push(next.expect("stream ok").expect("stream open"));
    }
    out
}

async fn a_standard_payout_pays_the_card_and_books_it(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let p = payout(&app, &alice, "po-1", "40.00", pb::PayoutSpeed::Standard).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Paid as i32);
    assert_eq!((amt(&p.amount), amt(&p.fee), amt(&p.net_amount)), ("40.00", "0.00", "40.00"));
    assert_eq!((p.card_last4.as_str(), p.speed), ("5556", pb::PayoutSpeed::Standard as i32));
    assert!(p.paid_at.is_some() && p.returned_at.is_none());

    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.pending), amt(&wallet.available)), ("60.00", "0.00", "60.00"));
    assert_eq!(posted(&app, "platform:payouts_in_transit:USD").await, "0.00");
    // The processor paid the card on dmpay's behalf: dmpay owes it the net.
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "-40.00");

    assert_eq!(get(&app, &alice, &p.payout_id).await.unwrap(), p);
    let page = list(&app, &alice, 0, "").await;
    assert_eq!(page.payouts, vec![p.clone()]);
    assert!(page.next_page_token.is_empty());

    let seen = events(&app, &alice, 2).await;
    let types: Vec<i32> = seen.iter().map(|e| e.r#type).collect();
    assert_eq!(types, vec![pb::PaymentEventType::PayoutCreated as i32, pb::PaymentEventType::PayoutPaid as i32]);
    let created = seen[0].payout.as_ref().expect("the payout on its event");
    assert_eq!((created.status, created.payout_id.as_str()), (pb::PayoutStatus::Pending as i32, p.payout_id.as_str()));
    assert_eq!(seen[1].payout.as_ref().unwrap().status, pb::PayoutStatus::Paid as i32);
    assert_books_balance(&app).await;
}

async fn an_instant_payout_takes_its_fee(app: TestApp) {
    let alice = alice_with(&app, "200.00", DEBIT).await;
    let p = payout(&app, &alice, "po-instant", "100.00", pb::PayoutSpeed::Instant).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Paid as i32);
    // 1.75% of 100.00.
    assert_eq!((amt(&p.fee), amt(&p.net_amount)), ("1.75", "98.25"));
    assert_eq!(amt(&app.wallet("alice").await.available), "100.00");
    assert_eq!(posted(&app, "platform:fees:USD").await, "1.75");
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "-98.25");
    // The minimum fee: 1.75% of 10.00 would be 0.18.
    let small = payout(&app, &alice, "po-small", "10.00", pb::PayoutSpeed::Instant).await.unwrap();
    assert_eq!((amt(&small.fee), amt(&small.net_amount)), ("0.25", "9.75"));
    // No more than the fee: refused with the field named, nothing written.
    let err = payout(&app, &alice, "po-tiny", "0.25", pb::PayoutSpeed::Instant).await.unwrap_err();
    assert_eq!((err.code(), field(&err)), (Code::InvalidArgument, "amount".to_string()));
    assert_eq!(app.count("payouts").await, 2);
    assert_books_balance(&app).await;
}

async fn a_credit_card_takes_only_standard_payouts(app: TestApp) {
    let alice = alice_with(&app, "100.00", CREDIT).await;
    let err = payout(&app, &alice, "po-i", "20.00", pb::PayoutSpeed::Instant).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "INSTANT_PAYOUT_UNAVAILABLE".to_string()));
    assert_eq!(app.count("payouts").await, 0, "a refused payout writes nothing");
    let p = payout(&app, &alice, "po-s", "20.00", pb::PayoutSpeed::Standard).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Paid as i32);
}

async fn a_declined_payout_fails_and_moves_nothing(app: TestApp) {
    let alice = alice_with(&app, "100.00", DECLINES).await;
    let err = payout(&app, &alice, "po-d", "30.00", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "CARD_DECLINED".to_string()));
    // A retry answers the same.
    let again = payout(&app, &alice, "po-d", "30.00", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!(reason(&again), "CARD_DECLINED");
    let page = list(&app, &alice, 10, "").await;
    assert_eq!(page.payouts.len(), 1);
    assert_eq!(page.payouts[0].status, pb::PayoutStatus::Failed as i32);
    assert_eq!(page.payouts[0].failure_reason, "CARD_DECLINED");
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.pending), amt(&wallet.available)), ("100.00", "0.00", "100.00"));
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "0.00");
    let types: Vec<i32> = events(&app, &alice, 2).await.iter().map(|e| e.r#type).collect();
    assert_eq!(types, vec![pb::PaymentEventType::PayoutCreated as i32, pb::PaymentEventType::PayoutFailed as i32]);
    assert_books_balance(&app).await;
}

async fn a_returned_payout_credits_the_wallet_back(app: TestApp) {
    let alice = alice_with(&app, "100.00", RETURNS).await;
    let p = payout(&app, &alice, "po-r", "50.00", pb::PayoutSpeed::Instant).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Paid as i32);
    assert_eq!(amt(&app.wallet("alice").await.available), "50.00");
    // The processor reports the return; dmpay applies it once.
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 0);
    let returned = get(&app, &alice, &p.payout_id).await.unwrap();
    assert_eq!(returned.status, pb::PayoutStatus::Returned as i32);
    assert!(returned.returned_at.is_some());
    // The whole amount, fee included, is back; clearing and fee income are as before.
    assert_eq!(amt(&app.wallet("alice").await.available), "100.00");
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "0.00");
    assert_eq!(posted(&app, "platform:fees:USD").await, "0.00");
    let seen = events(&app, &alice, 3).await;
    assert_eq!(seen[2].r#type, pb::PaymentEventType::PayoutReturned as i32);
    assert_eq!(seen[2].payout.as_ref().unwrap().status, pb::PayoutStatus::Returned as i32);
    assert_books_balance(&app).await;
}

/// 50 parallel payouts of 5.00 from a wallet of 100.00: exactly 20 are paid, the rest
/// refused, and the wallet never goes below zero.
async fn payouts_never_overdraw_under_parallel_calls(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let results = parallel_payouts(&app, &alice, "par", "5.00", 50).await;
    let paid = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(paid, 20);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!((r.code(), reason(r)), (Code::FailedPrecondition, "INSUFFICIENT_FUNDS".to_string()), "{r:?}");
    }
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.available)), ("0.00", "0.00"));
    assert_eq!(app.count("payouts").await, 20, "refused payouts write nothing");
    assert_books_balance(&app).await;
}

/// 50 parallel payouts of 20.00 against the unverified tier's 500.00 a day: exactly 25
/// are paid.
async fn the_daily_payout_limit_holds_under_parallel_calls(app: TestApp) {
    let alice = alice_with(&app, "2000.00", DEBIT).await;
    let results = parallel_payouts(&app, &alice, "day", "20.00", 50).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 25);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!((r.code(), reason(r)), (Code::ResourceExhausted, "PAYOUT_DAILY_LIMIT".to_string()), "{r:?}");
    }
    assert_eq!(amt(&app.wallet("alice").await.available), "1500.00");
    // Over the per-payout limit (250.00 unverified).
    let err = payout(&app, &alice, "big", "250.01", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::ResourceExhausted, "PAYOUT_LIMIT".to_string()));
    assert_books_balance(&app).await;
}

async fn payout_calls_are_idempotent_and_checked(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let first = payout(&app, &alice, "same", "10.00", pb::PayoutSpeed::Standard).await.unwrap();
    let again = payout(&app, &alice, "same", "10.00", pb::PayoutSpeed::Standard).await.unwrap();
    assert_eq!(again, first);
    let err = payout(&app, &alice, "same", "11.00", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(amt(&app.wallet("alice").await.available), "90.00");

    // Bad input names its field and writes nothing.
    let bad = |amount: Option<pb::Money>, speed: i32, key: &str, token: &str| pb::CreatePayoutRequest {
        idempotency_key: key.into(),
        amount,
        speed,
        payment_method_token: token.into(),
    };
    for (req, name) in [
        (bad(None, 1, "k1", ""), "amount"),
        (bad(usd("-1.00"), 1, "k2", ""), "amount.amount"),
        (bad(usd("1.001"), 1, "k3", ""), "amount.amount"),
        (bad(usd("1.00"), 9, "k4", ""), "speed"),
        (bad(usd("1.00"), 1, "", ""), "idempotency_key"),
    ] {
        let err = app.payments().create_payout(authed(req, &alice)).await.unwrap_err();
        assert_eq!((err.code(), field(&err)), (Code::InvalidArgument, name.to_string()), "{err:?}");
    }
    let err = app.payments().create_payout(authed(bad(usd("1.00"), 1, "k5", "pm_nobody"), &alice)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(app.count("payouts").await, 1);

    // Reads: only one's own payouts; a malformed page token is refused.
    let bob = app.token("bob", PAY_SCOPES);
    assert_eq!(get(&app, &bob, &first.payout_id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(field(&get(&app, &alice, "").await.unwrap_err()), "payout_id");
    let err = app
        .payments()
        .list_payouts(authed(pb::ListPayoutsRequest { page_size: 0, page_token: "nope".into() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_token");
    let err = app
        .payments()
        .list_payouts(authed(pb::ListPayoutsRequest { page_size: 201, page_token: String::new() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_size");
    // A read-only token cannot cash out.
    let reader = app.token("alice", "payments:read");
    let err = payout(&app, &reader, "ro", "1.00", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// What a payout cannot be paid to or from is refused with its reason, writing nothing.
async fn payouts_refuse_what_they_cannot_pay(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let with_token = |key: &str, amount: Option<pb::Money>, token: &str| pb::CreatePayoutRequest {
        idempotency_key: key.into(),
        amount,
        speed: pb::PayoutSpeed::Standard as i32,
        payment_method_token: token.into(),
    };
    // Another user's card is not found, as a missing one.
    let bob = app.token("bob", PAY_SCOPES);
    let bobs = app.add_card(&bob, &visa(7), true).await.unwrap();
    let err =
        app.payments().create_payout(authed(with_token("a", usd("1.00"), &bobs.token), &alice)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A removed card.
    let second = app.add_card(&alice, &visa(8), false).await.unwrap();
    app.methods()
        .remove_payment_method(authed(pb::RemovePaymentMethodRequest { token: second.token.clone() }, &alice))
        .await
        .unwrap();
    let err =
        app.payments().create_payout(authed(with_token("b", usd("1.00"), &second.token), &alice)).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "PAYMENT_METHOD_NOT_ACTIVE".to_string()));
    // More than the wallet holds.
    let err = payout(&app, &alice, "c", "100.01", pb::PayoutSpeed::Standard).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "INSUFFICIENT_FUNDS".to_string()));
    // Another currency: a wallet in it holds nothing; one not enabled is bad input.
    let eur = Some(pb::Money { currency: "EUR".into(), amount: "1.00".into() });
    let err = app.payments().create_payout(authed(with_token("d", eur, ""), &alice)).await.unwrap_err();
    assert!(
        (err.code(), reason(&err)) == (Code::FailedPrecondition, "INSUFFICIENT_FUNDS".to_string())
            || (err.code(), field(&err)) == (Code::InvalidArgument, "amount.currency".to_string()),
        "{err:?}"
    );
    let xxx = Some(pb::Money { currency: "XXX".into(), amount: "1.00".into() });
    let err = app.payments().create_payout(authed(with_token("e", xxx, ""), &alice)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(app.count("payouts").await, 0);
    assert_eq!(amt(&app.wallet("alice").await.available), "100.00");
    assert_books_balance(&app).await;
}

/// 25 payouts and 25 wallet sends of 4.00 at once from a wallet of 100.00: exactly 25
/// go through, whichever they are, and the wallet ends at zero, never below.
async fn payouts_and_sends_together_never_overdraw(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let mut tasks = Vec::new();
    for i in 0..25 {
        let mut c = app.payments();
        let req = authed(
            pb::CreatePayoutRequest {
                idempotency_key: format!("mix-po-{i}"),
                amount: usd("4.00"),
                speed: pb::PayoutSpeed::Standard as i32,
                payment_method_token: String::new(),
            },
            &alice,
        );
        tasks.push(tokio::spawn(async move { c.create_payout(req).await.map(|_| ()) }));
        let mut c = app.payments();
        let req = authed(
            pb::SendPaymentRequest {
                idempotency_key: format!("mix-send-{i}"),
                recipient_id: "bob".into(),
                amount: usd("4.00"),
                funding_source: pb::FundingSource::Balance as i32,
                ..Default::default()
            },
            &alice,
        );
        tasks.push(tokio::spawn(async move { c.send_payment(req).await.map(|_| ()) }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_FUNDS", "{e:?}"),
        }
    }
    assert_eq!(ok, 25);
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.available)), ("0.00", "0.00"));
    assert_books_balance(&app).await;
}

async fn payouts_page_newest_first(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(payout(&app, &alice, &format!("pg-{i}"), "1.00", pb::PayoutSpeed::Standard).await.unwrap().payout_id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(&app, &alice, 2, &token).await;
        seen.extend(page.payouts.into_iter().map(|p| p.payout_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
}

/// With `DMPAY_PAYOUT_INSTANT_HOLD` set, money received from a card-funded payment
/// cannot be cashed out instantly; the rest of the wallet and standard payouts can.
async fn card_money_waits_for_instant_payouts(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_PAYOUT_INSTANT_HOLD", "24h")]).await else { return };
    let alice = alice_with(&app, "20.00", DEBIT).await;
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    app.send(&bob, "card-to-alice", "alice", "30.00", pb::FundingSource::Card).await.unwrap();
    let err = payout(&app, &alice, "i-30", "30.00", pb::PayoutSpeed::Instant).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "FUNDS_ON_HOLD".to_string()));
    assert_eq!(app.count("payouts").await, 0);
    payout(&app, &alice, "i-20", "20.00", pb::PayoutSpeed::Instant).await.unwrap();
    payout(&app, &alice, "s-30", "30.00", pb::PayoutSpeed::Standard).await.unwrap();
    assert_eq!(amt(&app.wallet("alice").await.available), "0.00");
    app.stop().await;
}

/// A push whose outcome never came back leaves the payout PENDING with its money held;
/// the resolver looks the push up and finishes it, paying the card once.
async fn a_payout_with_an_unknown_outcome_is_finished_once(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    // Every call times out after the processor has done it.
    let silent = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { timeout_rate: 1.0, ..Default::default() },
        app.clock.clone(),
    ));
    let working = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone()));
    let user = dmpay::kernel::ids::UserId::parse("user", "alice").unwrap();
    let input = || dmpay::payments::payouts::PayoutInput {
        idempotency_key: "unknown".into(),
        amount: dmpay::kernel::money::Money::from_minor(
            dmpay::kernel::money::Currency::from_code("USD").unwrap(),
            4_000,
        ),
        speed: dmpay::payments::payouts::PayoutSpeed::Standard,
        payment_method_token: None,
    };
    let pending = payments_over(&app, silent).create_payout(&user, input()).await.unwrap();
    assert_eq!(pending.status, dmpay::payments::payouts::PayoutStatus::Pending);
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.pending), amt(&wallet.available)), ("40.00", "60.00"));
    // The resolver (whose claims run out at once) finishes it.
    let resolver = payments_over(&app, working);
    let mut done = 0;
    for _ in 0..20 {
        done += resolver.resolve_payouts().await.unwrap();
        if done > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(done, 1);
    let p = get(&app, &alice, pending.payout_id.as_str()).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Paid as i32);
    let calls = app.count("sandbox_processor_calls WHERE kind = 'payout'").await;
    assert_eq!(calls, 1, "the card was paid once");
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.pending), amt(&wallet.available)), ("60.00", "0.00", "60.00"));
    // A retry of the call answers the finished payout.
    let again = resolver.create_payout(&user, input()).await.unwrap();
    assert_eq!(again.status, dmpay::payments::payouts::PayoutStatus::Paid);
    assert_books_balance(&app).await;
}

/// A payout to the returning card whose push's answer was lost: the processor's return
/// notification may come before the payout has learnt its reference. It waits until the
/// resolver has finished the payout, and is then applied: never skipped.
async fn a_return_before_the_payout_knows_its_reference_waits(app: TestApp) {
    let alice = alice_with(&app, "100.00", RETURNS).await;
    let silent = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { timeout_rate: 1.0, ..Default::default() },
        app.clock.clone(),
    ));
    let working = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone()));
    let user = dmpay::kernel::ids::UserId::parse("user", "alice").unwrap();
    let input = dmpay::payments::payouts::PayoutInput {
        idempotency_key: "lost-answer".into(),
        amount: dmpay::kernel::money::Money::from_minor(
            dmpay::kernel::money::Currency::from_code("USD").unwrap(),
            4_000,
        ),
        speed: dmpay::payments::payouts::PayoutSpeed::Standard,
        payment_method_token: None,
    };
    let pending = payments_over(&app, silent).create_payout(&user, input).await.unwrap();
    assert_eq!(pending.status, dmpay::payments::payouts::PayoutStatus::Pending);
    // Applied now, the return (if the push went through) cannot find a paid payout yet.
    let early = app.payments_service.apply_processor_notifications().await;
    assert!(matches!(early, Ok(0) | Err(_)), "{early:?}");
    let resolver = payments_over(&app, working);
    for _ in 0..20 {
        if resolver.resolve_payouts().await.unwrap() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    let p = get(&app, &alice, pending.payout_id.as_str()).await.unwrap();
    assert_eq!(p.status, pb::PayoutStatus::Returned as i32);
    assert_eq!(amt(&app.wallet("alice").await.available), "100.00");
    assert_books_balance(&app).await;
}

/// The resolver gives up on a payout whose card was removed while the attempt it took
/// over still waits for its push, and the push then succeeds: the card was paid, so the
/// payout ends PAID (after a FAILED), its money moved once.
async fn a_push_that_lands_after_the_resolver_gave_up_is_paid(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    let slow = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { latency: std::time::Duration::from_secs(2), ..Default::default() },
        app.clock.clone(),
    ));
    let working = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone()));
    let user = dmpay::kernel::ids::UserId::parse("user", "alice").unwrap();
    let input = dmpay::payments::payouts::PayoutInput {
        idempotency_key: "slow-push".into(),
        amount: dmpay::kernel::money::Money::from_minor(
            dmpay::kernel::money::Currency::from_code("USD").unwrap(),
            4_000,
        ),
        speed: dmpay::payments::payouts::PayoutSpeed::Standard,
        payment_method_token: None,
    };
    let live = payments_over(&app, slow);
    let attempt = tokio::spawn(async move { live.create_payout(&user, input).await });
    // The push is under way once the payout's row and hold exist.
    for _ in 0..50 {
        if app.count("payouts WHERE hold_entry_id IS NOT NULL").await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Meanwhile the card is removed, and the resolver (whose claims run out at once)
    // takes the payout over and gives up on it.
    let cards = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest { include_removed: false }, &alice))
        .await
        .unwrap()
        .into_inner()
        .payment_methods;
    app.methods()
        .remove_payment_method(authed(pb::RemovePaymentMethodRequest { token: cards[0].token.clone() }, &alice))
        .await
        .unwrap();
    assert_eq!(payments_over(&app, working).resolve_payouts().await.unwrap(), 1);
    let failed = list(&app, &alice, 1, "").await.payouts.remove(0);
    assert_eq!(
        (failed.status, failed.failure_reason.as_str()),
        (pb::PayoutStatus::Failed as i32, "PAYMENT_METHOD_NOT_ACTIVE")
    );
    // The push lands: the attempt books it and the payout is PAID.
    let paid = attempt.await.unwrap().unwrap();
    assert_eq!(paid.status, dmpay::payments::payouts::PayoutStatus::Paid);
    assert_eq!(get(&app, &alice, paid.payout_id.as_str()).await.unwrap().status, pb::PayoutStatus::Paid as i32);
    assert_eq!(app.count("sandbox_processor_calls WHERE kind = 'payout'").await, 1, "the card was paid once");
    let wallet = app.wallet("alice").await;
    assert_eq!((amt(&wallet.posted), amt(&wallet.pending), amt(&wallet.available)), ("60.00", "0.00", "60.00"));
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "-40.00");
    assert_books_balance(&app).await;
}

/// The sandbox's settlement report carries payout and payout-return rows, and
/// reconciliation matches them against the ledger.
async fn payouts_reconcile_against_the_settlement_report(app: TestApp) {
    let alice = alice_with(&app, "100.00", DEBIT).await;
    payout(&app, &alice, "rec-1", "30.00", pb::PayoutSpeed::Instant).await.unwrap();
    let bob = app.token("bob", PAY_SCOPES);
    let svc = app.token("svc", LEDGER_SCOPES);
    fund(&app, &svc, "bob", "50.00").await;
    app.add_card(&bob, RETURNS, true).await.unwrap();
    payout(&app, &bob, "rec-2", "20.00", pb::PayoutSpeed::Standard).await.unwrap();
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);

    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let sandbox = Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let report = dmpay::processor::CardProcessor::settlement_report(&sandbox, &date).await.unwrap();
    let kinds: Vec<&str> = report.lines().skip(1).map(|l| l.split(',').nth(1).unwrap()).collect();
    let mut sorted = kinds.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec!["payout", "payout", "payout_return"], "{report}");
    assert!(report.contains(",payout,-29.47,0.00,-29.47,USD,"), "{report}");
    let fin = app.token("finance-staff", "finance");
    let run = pb::finance_client::FinanceClient::new(app.channel.clone())
        .import_settlement_report(authed(
            pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv: report },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (run.rows, run.matched, run.amount_mismatch, run.missing_in_ledger, run.missing_in_report),
        (3, 3, 0, 0, 0)
    );
    assert_books_balance(&app).await;
}

backend_tests!(
    a_standard_payout_pays_the_card_and_books_it,
    an_instant_payout_takes_its_fee,
    a_credit_card_takes_only_standard_payouts,
    a_declined_payout_fails_and_moves_nothing,
    a_returned_payout_credits_the_wallet_back,
    payouts_never_overdraw_under_parallel_calls,
    the_daily_payout_limit_holds_under_parallel_calls,
    payout_calls_are_idempotent_and_checked,
    payouts_page_newest_first,
    payouts_refuse_what_they_cannot_pay,
    payouts_and_sends_together_never_overdraw,
    a_payout_with_an_unknown_outcome_is_finished_once,
    a_return_before_the_payout_knows_its_reference_waits,
    a_push_that_lands_after_the_resolver_gave_up_is_paid,
    payouts_reconcile_against_the_settlement_report,
);

backend_fn_tests!(card_money_waits_for_instant_payouts);
