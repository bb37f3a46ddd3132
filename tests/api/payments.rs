//! DM payments through the real server, on both backends.

use std::sync::Arc;

use tonic::Code;
use tonic_types::StatusExt;

use dmpay::accounts::Accounts;
use dmpay::payments::{Payments, PaymentsConfig};
use dmpay::processor::sandbox::{Sandbox, SandboxConfig};
use dmpay::vault::{Vault, VaultConfig};

use crate::backend_tests;
use crate::helpers::*;

use pb::FundingSource::{Auto, Balance, Card};

fn amt(m: &Option<pb::Money>) -> &str {
    &m.as_ref().expect("money").amount
}

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

async fn fund_user(app: &TestApp, user: &str, amount: &str) {
    let t = app.token("svc-treasury", LEDGER_SCOPES);
    fund(app, &t, user, amount).await;
}

async fn send_from_balance_and_read_back(app: TestApp) {
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let p = app.send(&alice, "k1", "bob", "12.50", Balance).await.unwrap();
    assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
    assert_eq!(amt(&p.amount), "12.50");
    assert_eq!(amt(&p.card_funded_amount), "0.00");
    assert!(p.settled_at.is_some());
    assert_eq!(amt(&app.wallet("alice").await.available), "87.50");
    assert_eq!(amt(&app.wallet("bob").await.posted), "12.50");

    // Both participants can read it; nobody else can tell it exists.
    let bob = app.token("bob", PAY_SCOPES);
    let seen = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: p.payment_id.clone() }, &bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen, p);
    let carol = app.token("carol", PAY_SCOPES);
    let err = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: p.payment_id.clone() }, &carol))
        .await
        .unwrap_err();
    let missing = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: "pay_nope".into() }, &carol))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);

    // Listing, newest first, in pages, optionally by conversation.
    for i in 0..4 {
        app.send(&alice, &format!("k-list-{i}"), "bob", "1.00", Auto).await.unwrap();
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .payments()
            .list_payments(authed(
                pb::ListPaymentsRequest { page_size: 2, page_token: token.clone(), ..Default::default() },
                &bob,
            ))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.payments.iter().map(|p| p.payment_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 5);
    assert_eq!(ids.last(), Some(&p.payment_id), "newest first");
    let other = app
        .payments()
        .list_payments(authed(
            pb::ListPaymentsRequest { conversation_id: "another".into(), ..Default::default() },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(other.payments.is_empty());
    assert!(app.verify().await.ok());
}

async fn retries_are_idempotent_and_failures_recorded(app: TestApp) {
    fund_user(&app, "alice", "10.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let first = app.send(&alice, "same", "bob", "4.00", Balance).await.unwrap();
    let again = app.send(&alice, "same", "bob", "4.00", Balance).await.unwrap();
    assert_eq!(first, again);
    let err = app.send(&alice, "same", "bob", "5.00", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(amt(&app.wallet("bob").await.posted), "4.00");

    // Insufficient funds: FAILED, recorded, and the retry returns the same error.
    let err = app.send(&alice, "too-much", "bob", "7.00", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "INSUFFICIENT_FUNDS");
    let again = app.send(&alice, "too-much", "bob", "7.00", Balance).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(reason(&again), "INSUFFICIENT_FUNDS");
    let list =
        app.payments().list_payments(authed(pb::ListPaymentsRequest::default(), &alice)).await.unwrap().into_inner();
    let failed =
        list.payments.iter().find(|p| p.status == pb::PaymentStatus::Failed as i32).expect("failed payment listed");
    assert_eq!(failed.failure_reason, "INSUFFICIENT_FUNDS");
    assert_eq!(amt(&app.wallet("alice").await.available), "6.00");

    // Concurrent duplicates: one payment.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut client = app.payments();
        let t = alice.clone();
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: "dup".into(),
                        recipient_id: "bob".into(),
                        amount: usd("1.00"),
                        ..Default::default()
                    },
                    &t,
                ))
                .await
                .map(|r| r.into_inner().payment_id)
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(amt(&app.wallet("bob").await.posted), "5.00");
    assert!(app.verify().await.ok());
}

async fn card_funded_and_split(app: TestApp) {
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    // All from the card: the wallet is empty.
    let p = app.send(&alice, "card-1", "bob", "20.00", Auto).await.unwrap();
    assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
    assert_eq!(amt(&p.card_funded_amount), "20.00");
    // Split: 5.00 from the wallet, 15.00 from the card.
    fund_user(&app, "alice", "5.00").await;
    let p = app.send(&alice, "split-1", "bob", "20.00", Auto).await.unwrap();
    assert_eq!(amt(&p.card_funded_amount), "15.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "0.00");
    assert_eq!(amt(&app.wallet("alice").await.pending), "0.00", "the hold is released");
    assert_eq!(amt(&app.wallet("bob").await.posted), "40.00");
    // CARD even with money in the wallet.
    fund_user(&app, "alice", "50.00").await;
    let p = app.send(&alice, "card-2", "bob", "10.00", Card).await.unwrap();
    assert_eq!(amt(&p.card_funded_amount), "10.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "50.00");
    // The processor is owed what the cards paid: 20 + 15 + 10.
    let t = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &t, "processor:sandbox:clearing:USD").await.posted), "45.00");
    let captures: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM sandbox_processor_calls WHERE kind = 'capture'").fetch_one(pool).await).unwrap();
    assert_eq!(captures, 3);
    assert!(app.verify().await.ok());
}

async fn declines_and_missing_cards(app: TestApp) {
    let alice = app.token("alice", PAY_SCOPES);
    // No card and no balance.
    let err = app.send(&alice, "none", "bob", "5.00", Auto).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "NO_PAYMENT_METHOD");
    // A card that links but declines every charge; the wallet part is released.
    app.add_card(&alice, "4000000000000341", true).await.unwrap();
    fund_user(&app, "alice", "3.00").await;
    let err = app.send(&alice, "declined", "bob", "10.00", Auto).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "CARD_DECLINED");
    let w = app.wallet("alice").await;
    assert_eq!(amt(&w.available), "3.00");
    assert_eq!(amt(&w.pending), "0.00");
    assert_eq!(amt(&app.wallet("bob").await.posted), "0.00");
    // A token that is not the sender's is NOT_FOUND, and writes nothing.
    let before = app.count("payments").await;
    let err = app
        .payments()
        .send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "bad-token".into(),
                recipient_id: "bob".into(),
                amount: usd("1.00"),
                funding_source: Card as i32,
                payment_method_token: "pm_0123456789abcdef0123456789abcdef".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(app.count("payments").await, before);
    assert!(app.verify().await.ok());
}

async fn rules_limits_and_bad_input(app: TestApp) {
    fund_user(&app, "alice", "1000.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let err = app.send(&alice, "self", "alice", "1.00", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("recipient_id"));
    // Unverified: 250.00 per payment, 500.00 a day.
    let err = app.send(&alice, "big", "bob", "250.01", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "PAYMENT_LIMIT");
    app.send(&alice, "d1", "bob", "250.00", Balance).await.unwrap();
    app.send(&alice, "d2", "bob", "250.00", Balance).await.unwrap();
    let err = app.send(&alice, "d3", "bob", "0.01", Balance).await.unwrap_err();
    assert_eq!(reason(&err), "DAILY_LIMIT");
    // Verified accounts have more room.
    let admin = app.token("ops", "accounts:admin");
    app.accounts()
        .upsert_account(authed(
            pb::UpsertAccountRequest { user_id: "alice".into(), tier: pb::Tier::Verified as i32, ..Default::default() },
            &admin,
        ))
        .await
        .unwrap();
    app.send(&alice, "d4", "bob", "300.00", Balance).await.unwrap();
    // Frozen sender, frozen recipient.
    app.accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "carol".into(), reason: "review".into() }, &admin))
        .await
        .unwrap();
    let err = app.send(&alice, "to-frozen", "carol", "1.00", Balance).await.unwrap_err();
    assert_eq!(reason(&err), "RECIPIENT_FROZEN");
    app.accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "alice".into(), reason: "review".into() }, &admin))
        .await
        .unwrap();
    let err = app.send(&alice, "frozen", "bob", "1.00", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "ACCOUNT_FROZEN");

    let before = app.count("payments").await;
    let dave = app.token("dave", PAY_SCOPES);
    let base = || pb::SendPaymentRequest {
        idempotency_key: "x".into(),
        recipient_id: "bob".into(),
        amount: usd("1.00"),
        ..Default::default()
    };
    let cases = [
        (pb::SendPaymentRequest { idempotency_key: String::new(), ..base() }, "idempotency_key"),
        (pb::SendPaymentRequest { recipient_id: "no spaces".into(), ..base() }, "recipient_id"),
        (pb::SendPaymentRequest { amount: usd("1.001"), ..base() }, "amount.amount"),
        (pb::SendPaymentRequest { amount: None, ..base() }, "amount"),
        (pb::SendPaymentRequest { note: "n".repeat(281), ..base() }, "note"),
        (pb::SendPaymentRequest { conversation_id: "c".repeat(129), ..base() }, "conversation_id"),
        (pb::SendPaymentRequest { funding_source: 9, ..base() }, "funding_source"),
    ];
    for (req, field) in cases {
        let err = app.payments().send_payment(authed(req, &dave)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(err.get_error_details().bad_request().unwrap().field_violations[0].field, field);
    }
    assert_eq!(app.count("payments").await, before, "refused requests write nothing");
    let reader = app.token("dave", "payments:read");
    let err = app.payments().send_payment(authed(base(), &reader)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn concurrent_sends_never_overdraw(app: TestApp) {
    fund_user(&app, "alice", "50.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "5555555555554444", true).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut client = app.payments();
        let t = alice.clone();
        let funding = if i % 3 == 0 { Auto } else { Balance };
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("c{i}"),
                        recipient_id: format!("r{}", i % 4),
                        amount: usd("3.00"),
                        funding_source: funding as i32,
                        ..Default::default()
                    },
                    &t,
                ))
                .await
        }));
    }
    let mut settled = 0i64;
    let mut card_total = 0i64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(p) => {
                let p = p.into_inner();
                assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
                settled += 1;
                card_total += amt(&p.card_funded_amount).replace('.', "").parse::<i64>().unwrap();
            }
            Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_FUNDS", "{e:?}"),
        }
    }
    let w = app.wallet("alice").await;
    assert!(!amt(&w.available).starts_with('-'));
    let received: i64 = {
        let mut sum = 0;
        for r in 0..4 {
            sum += amt(&app.wallet(&format!("r{r}")).await.posted).replace('.', "").parse::<i64>().unwrap();
        }
        sum
    };
    assert_eq!(received, settled * 300, "every settled payment is in the ledger once");
    let spent_from_wallet = 5000 - amt(&w.posted).replace('.', "").parse::<i64>().unwrap();
    assert_eq!(spent_from_wallet + card_total, received);
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}

async fn unknown_card_outcome_resolves_to_one_charge(app: TestApp) {
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let flaky = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig { timeout_rate: 1.0, ..Default::default() }));
    let calm = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default()));
    let payments_with = |processor: Arc<Sandbox>| {
        let keys = Arc::new(app.config.key_ring().unwrap());
        let vault = Arc::new(Vault::new(
            app.db.clone(),
            keys,
            processor,
            Accounts::new(app.db.clone()),
            VaultConfig::default(),
        ));
        Payments::new(
            app.db.clone(),
            app.ledger_handle.clone(),
            vault,
            Accounts::new(app.db.clone()),
            PaymentsConfig { resolve_after_s: 0, ..Default::default() },
        )
    };
    let sender = dmpay::accounts::UserId::parse("u", "alice").unwrap();
    let input = || dmpay::payments::SendInput {
        idempotency_key: "flaky-1".into(),
        recipient: dmpay::accounts::UserId::parse("u", "bob").unwrap(),
        amount: dmpay::money::Money::from_minor(dmpay::money::Currency::from_code("USD").unwrap(), 700),
        note: String::new(),
        conversation_id: String::new(),
        message_id: String::new(),
        funding: dmpay::payments::FundingSource::Card,
        payment_method_token: None,
    };
    let pending = payments_with(flaky.clone()).send(&sender, input()).await.unwrap();
    assert_eq!(pending.status, dmpay::payments::PaymentStatus::Pending);
    // The resolver finishes it against a processor that answers again.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let resolver = payments_with(calm);
    assert_eq!(resolver.resolve_pending().await.unwrap(), 1);
    let done = resolver.get(&sender, &pending.payment_id).await.unwrap();
    assert_eq!(done.status, dmpay::payments::PaymentStatus::Settled);
    let captures: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM sandbox_processor_calls WHERE kind = 'capture' AND idempotency_key LIKE $1",
    )
    .bind(format!("pay:{}:%", pending.payment_id))
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(captures, 1, "exactly one charge");
    // A retry of the original request returns the settled payment.
    let again = resolver.send(&sender, input()).await.unwrap();
    assert_eq!(again.payment_id, pending.payment_id);
    assert_eq!(amt(&app.wallet("bob").await.posted), "7.00");
    assert!(app.verify().await.ok());
}

backend_tests!(
    send_from_balance_and_read_back,
    retries_are_idempotent_and_failures_recorded,
    card_funded_and_split,
    declines_and_missing_cards,
    rules_limits_and_bad_input,
    concurrent_sends_never_overdraw,
    unknown_card_outcome_resolves_to_one_charge,
);
