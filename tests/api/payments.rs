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
    app.users(CAST).await;
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
    app.users(CAST).await;
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
    // Its batch moved no money, yet its thread still hears it fail: one event, as for the
    // settled payment (created and finished in one commit), numbered after that one's.
    let events: Vec<(i64, String)> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT sequence, event_type FROM payment_events WHERE payment_id = $1 ORDER BY sequence")
        .bind(&failed.payment_id).fetch_all(pool).await)
    .unwrap();
    assert_eq!(events, vec![(2, "payment.failed".to_owned())], "the failed payment's events");

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
    app.users(CAST).await;
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
    // Unspecified funding is AUTO: the 50.00 in the wallet, 10.00 from the card. A retry
    // that says AUTO is the same request, and gets the same payment.
    let p = app.send(&alice, "unspecified-1", "bob", "60.00", pb::FundingSource::Unspecified).await.unwrap();
    assert_eq!(amt(&p.card_funded_amount), "10.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "0.00");
    let again = app.send(&alice, "unspecified-1", "bob", "60.00", Auto).await.unwrap();
    assert_eq!(again.payment_id, p.payment_id);
    // The processor is owed what the cards paid: 20 + 15 + 10 + 10.
    let t = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &t, "processor:sandbox:clearing:USD").await.posted), "55.00");
    let captures: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM sandbox_processor_calls WHERE kind = 'capture'").fetch_one(pool).await).unwrap();
    assert_eq!(captures, 4);
    // Each card entry names its capture, for reconciliation with the processor's report.
    let linked: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM ledger_entries e JOIN sandbox_processor_calls c \
         ON e.metadata LIKE '%\"processor_reference\":\"' || c.reference || '\"%' \
         WHERE e.kind = 'dm_payment_card' AND c.kind = 'capture'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(linked, 4);
    assert!(app.verify().await.ok());
}

async fn declines_and_missing_cards(app: TestApp) {
    app.users(CAST).await;
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
    app.users(CAST).await;
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
    assert_eq!(reason(&err), "RECIPIENT_UNAVAILABLE");
    assert!(!err.message().contains("frozen"), "{}", err.message());
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
    app.users(CAST).await;
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
    // The engine hands back every wallet send's ticket once its batch is answered.
    let hook = app.payments_service.hook();
    for _ in 0..100 {
        if hook.held() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(hook.held(), 0, "the hook still holds sends the engine answered");
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
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let flaky = Arc::new(Sandbox::new(
        app.db.clone(),
        SandboxConfig { timeout_rate: 1.0, ..Default::default() },
        app.clock.clone(),
    ));
    let calm = Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone()));
    let payments_with = |processor: Arc<Sandbox>| {
        let keys = Arc::new(app.config.key_ring().unwrap());
        let vault = Arc::new(Vault::new(
            app.db.clone(),
            keys,
            processor,
            Accounts::new(app.db.clone(), app.clock.clone()),
            VaultConfig::default(),
        ));
        Payments::new(
            app.db.clone(),
            app.ledger_handle.clone(),
            vault,
            Accounts::new(app.db.clone(), app.clock.clone()),
            std::sync::Arc::new(PaymentsConfig { resolve_after_s: 0, ..Default::default() }),
            app.payments_service.hook().clone(),
        )
    };
    let sender = dmpay::kernel::ids::UserId::parse("u", "alice").unwrap();
    let input = || dmpay::payments::SendInput {
        idempotency_key: "flaky-1".into(),
        recipient: dmpay::kernel::ids::UserId::parse("u", "bob").unwrap(),
        amount: dmpay::kernel::money::Money::from_minor(dmpay::kernel::money::Currency::from_code("USD").unwrap(), 700),
        note: String::new(),
        conversation_id: String::new(),
        message_id: String::new(),
        funding: dmpay::payments::FundingSource::Card,
        payment_method_token: None,
        request_id: None,
    };
    let pending = payments_with(flaky.clone()).send(&sender, input()).await.unwrap();
    assert_eq!(pending.status, dmpay::payments::PaymentStatus::Pending);
    // The resolver finishes it against a processor that answers again. (The server's
    // own resolver makes one pass when it starts; under a loaded machine that pass can
    // come late enough to take this payment first, against the same calm processor:
    // then this pass finds it claimed, and the test waits for that pass to finish it.
    // The outcome checked below is the same either way.)
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let resolver = payments_with(calm);
    assert!(resolver.resolve_pending().await.unwrap() <= 1);
    let mut done = resolver.get(&sender, &pending.payment_id).await.unwrap();
    for _ in 0..100 {
        if done.status != dmpay::payments::PaymentStatus::Pending {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        resolver.resolve_pending().await.unwrap();
        done = resolver.get(&sender, &pending.payment_id).await.unwrap();
    }
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

/// Concurrent sends of one sender are checked against the rolling limit together: the
/// batch that decides them sees what the earlier ones in it and before it used.
async fn daily_limit_holds_under_concurrency(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "2000.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    // Unverified: 500.00 a day; 30 concurrent sends of 40.00 can only fit 12 of them.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut client = app.payments();
        let t = alice.clone();
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("lim-{i}"),
                        recipient_id: format!("shop{}", i % 3),
                        amount: usd("40.00"),
                        funding_source: Balance as i32,
                        ..Default::default()
                    },
                    &t,
                ))
                .await
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(reason(&e), "DAILY_LIMIT", "{e:?}");
                limited += 1;
            }
        }
    }
    assert_eq!((ok, limited), (12, 18));
    assert_eq!(amt(&app.wallet("alice").await.posted), "1520.00");
    // A refused send wrote nothing: twelve payments, one event each (created and
    // settled in one commit).
    assert_eq!(app.count("payments").await, 12);
    assert_eq!(app.count("payment_events").await, 12);
    assert!(app.verify().await.ok());
}

/// The same key sent many times at once is one payment: every caller gets it back.
async fn concurrent_duplicates_are_one_payment(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let mut client = app.payments();
        let t = alice.clone();
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: "once".into(),
                        recipient_id: "bob".into(),
                        amount: usd("7.00"),
                        funding_source: Balance as i32,
                        ..Default::default()
                    },
                    &t,
                ))
                .await
                .map(|r| r.into_inner().payment_id)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one payment for one key: {ids:?}");
    assert_eq!(amt(&app.wallet("bob").await.posted), "7.00");
    // The same key with another amount is refused and changes nothing.
    let err = app.send(&alice, "once", "bob", "8.00", Balance).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("idempotency_key"));
    assert_eq!(app.count("payments").await, 1);
    assert!(app.verify().await.ok());
}

/// A sender short of funds gets a recorded failure (replayed on retry) while the other
/// sends of the same batch go through.
async fn a_short_sender_fails_alone(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "10.00").await;
    for u in ["u1", "u2", "u3"] {
        fund_user(&app, u, "10.00").await;
    }
    let tasks = ["alice", "u1", "u2", "u3"]
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let amount = if u == "alice" { "10.01" } else { "5.00" };
            spawn_send_to_seller(&app, u, format!("s{i}"), amount, "")
        })
        .collect();
    let results: Vec<_> = futures_join(tasks).await;
    let err = results[0].as_ref().unwrap_err();
    assert_eq!(reason(err), "INSUFFICIENT_FUNDS");
    assert!(results[1..].iter().all(|r| r.is_ok()));
    assert_eq!(amt(&app.wallet("seller").await.posted), "15.00");
    // The failure was recorded: a retry replays it, even once the money is there.
    fund_user(&app, "alice", "5.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let again = app
        .payments()
        .send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "s0".into(),
                recipient_id: "seller".into(),
                amount: usd("10.01"),
                funding_source: Balance as i32,
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&again), "INSUFFICIENT_FUNDS");
    assert_eq!(amt(&app.wallet("alice").await.posted), "15.00");
    assert!(app.verify().await.ok());
}

/// A batch whose last statements the database refuses (here a test trigger on the
/// payment rows, which are written after the batch's entries) is undone whole: the
/// command at fault fails alone, the others commit when retried one by one, no entry of
/// the refused payment remains, and the engine's connection takes the next batch.
async fn a_batch_refused_part_way_writes_nothing(app: TestApp) {
    app.users(CAST).await;
    let trigger: &[&str] = match app.backend {
        Backend::Sqlite => &["CREATE TRIGGER poison BEFORE INSERT ON payments WHEN NEW.note = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned payment row'); END"],
        Backend::Postgres => &[
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.note = 'poison' THEN RAISE EXCEPTION 'poisoned payment row'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION poison()",
        ],
    };
    for sql in trigger {
        dmpay::with_db!(&app.db, pool => sqlx::query(sql).execute(pool).await.map(|_| ())).expect("trigger");
    }
    let users = ["u1", "u2", "u3", "u4"];
    for u in users {
        fund_user(&app, u, "10.00").await;
    }
    let (entries, events) = (app.count("ledger_entries").await, app.count("payment_events").await);
    let tasks = users
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            spawn_send_to_seller(&app, u, format!("p{i}"), "5.00", if u == "u2" { "poison" } else { "lunch" })
        })
        .collect();
    let results = futures_join(tasks).await;
    assert_eq!(results[1].as_ref().unwrap_err().code(), Code::Internal, "{:?}", results[1]);
    for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!(r.is_ok(), "send {i}: {r:?}");
    }
    assert_eq!(amt(&app.wallet("seller").await.posted), "15.00");
    assert_eq!(amt(&app.wallet("u2").await.posted), "10.00");
    assert_eq!(app.count("payments").await, 3);
    assert_eq!(app.count("ledger_entries").await, entries + 3);
    assert_eq!(app.count("payment_events").await, events + 3);
    assert!(app.verify().await.ok());
    // The engine goes on: u2's next send, without the poisoned note, commits.
    let u2 = app.token("u2", PAY_SCOPES);
    let p = app.send(&u2, "p9", "seller", "5.00", Balance).await.unwrap();
    assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
    assert_eq!(amt(&app.wallet("seller").await.posted), "20.00");
    assert!(app.verify().await.ok());
}

/// A balance-funded send of `amount` USD from `user` to "seller", started at once.
fn spawn_send_to_seller(
    app: &TestApp,
    user: &str,
    key: String,
    amount: &str,
    note: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::Payment>, tonic::Status>> {
    let mut client = app.payments();
    let t = app.token(user, PAY_SCOPES);
    let request = pb::SendPaymentRequest {
        idempotency_key: key,
        recipient_id: "seller".into(),
        amount: usd(amount),
        note: note.into(),
        funding_source: Balance as i32,
        ..Default::default()
    };
    tokio::spawn(async move { client.send_payment(authed(request, &t)).await })
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

backend_tests!(
    a_batch_refused_part_way_writes_nothing,
    daily_limit_holds_under_concurrency,
    concurrent_duplicates_are_one_payment,
    a_short_sender_fails_alone,
    send_from_balance_and_read_back,
    retries_are_idempotent_and_failures_recorded,
    card_funded_and_split,
    declines_and_missing_cards,
    rules_limits_and_bad_input,
    concurrent_sends_never_overdraw,
    unknown_card_outcome_resolves_to_one_charge,
);

async fn request(
    app: &TestApp,
    requester: &str,
    key: &str,
    payer: &str,
    amount: &str,
    expires_s: u32,
) -> Result<pb::Bill, tonic::Status> {
    let t = app.token(requester, PAY_SCOPES);
    app.payments()
        .request_payment(authed(
            pb::RequestPaymentRequest {
                idempotency_key: key.into(),
                payer_id: payer.into(),
                amount: usd(amount),
                note: "dinner".into(),
                conversation_id: "conv-r".into(),
                message_id: format!("m-{key}"),
                expires_in_seconds: expires_s,
            },
            &t,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn pay(app: &TestApp, payer: &str, bill_id: &str, key: &str) -> Result<pb::Payment, tonic::Status> {
    let t = app.token(payer, PAY_SCOPES);
    app.payments()
        .pay_bill(authed(
            pb::PayBillRequest { bill_id: bill_id.into(), idempotency_key: key.into(), ..Default::default() },
            &t,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn requests_pay_decline_cancel_expire(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "bob", "100.00").await;
    let r = request(&app, "alice", "r1", "bob", "30.00", 0).await.unwrap();
    assert_eq!(r.status, pb::BillStatus::Open as i32);
    let week = r.expires_at.unwrap().seconds - r.created_at.unwrap().seconds;
    assert_eq!(week, 7 * 86_400);
    assert_eq!(request(&app, "alice", "r1", "bob", "30.00", 0).await.unwrap().bill_id, r.bill_id, "idempotent");
    // Only the payer pays; outsiders do not even see it.
    let err = pay(&app, "alice", &r.bill_id, "p0").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = pay(&app, "mallory", &r.bill_id, "p0").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let paid = pay(&app, "bob", &r.bill_id, "p1").await.unwrap();
    assert_eq!(paid.status, pb::PaymentStatus::Settled as i32);
    assert_eq!(paid.bill_id, r.bill_id);
    assert_eq!(paid.recipient_id, "alice");
    // The retry returns the same payment; a second pay is refused.
    assert_eq!(pay(&app, "bob", &r.bill_id, "p1").await.unwrap().payment_id, paid.payment_id);
    let err = pay(&app, "bob", &r.bill_id, "p2").await.unwrap_err();
    assert_eq!(reason(&err), "REQUEST_NOT_OPEN");
    let alice = app.token("alice", PAY_SCOPES);
    let seen = app
        .payments()
        .get_bill(authed(pb::GetBillRequest { bill_id: r.bill_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.status, pb::BillStatus::Paid as i32);
    assert_eq!(seen.payment_id, paid.payment_id);
    assert_eq!(amt(&app.wallet("alice").await.posted), "30.00");

    // Decline by the payer; cancel by the requester; each only by its party.
    let d = request(&app, "alice", "r2", "bob", "5.00", 0).await.unwrap();
    let bob = app.token("bob", PAY_SCOPES);
    let err = app
        .payments()
        .cancel_bill(authed(pb::CancelBillRequest { bill_id: d.bill_id.clone() }, &bob))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let declined = app
        .payments()
        .decline_bill(authed(pb::DeclineBillRequest { bill_id: d.bill_id.clone() }, &bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(declined.status, pb::BillStatus::Declined as i32);
    assert_eq!(reason(&pay(&app, "bob", &d.bill_id, "p3").await.unwrap_err()), "REQUEST_NOT_OPEN");
    let c = request(&app, "alice", "r3", "bob", "5.00", 0).await.unwrap();
    let cancelled = app
        .payments()
        .cancel_bill(authed(pb::CancelBillRequest { bill_id: c.bill_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, pb::BillStatus::Cancelled as i32);

    // Expiry: a request that lived one second.
    let e = request(&app, "alice", "r4", "bob", "5.00", 1).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(reason(&pay(&app, "bob", &e.bill_id, "p4").await.unwrap_err()), "REQUEST_EXPIRED");
    assert_eq!(app.payments_service.expire_requests().await.unwrap(), 1);
    let expired = app
        .payments()
        .get_bill(authed(pb::GetBillRequest { bill_id: e.bill_id.clone() }, &bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expired.status, pb::BillStatus::Expired as i32);

    // Bad input.
    let err = request(&app, "alice", "r5", "alice", "5.00", 0).await.unwrap_err();
    assert!(err.message().contains("payer_id"));
    let err = request(&app, "alice", "r6", "bob", "5.00", 31 * 86_400).await.unwrap_err();
    assert!(err.message().contains("expires_in_seconds"));
    // Every change wrote its event, in one gap-free sequence.
    let (n, max): (i64, Option<i64>) = dmpay::with_db!(&app.db, pool => sqlx::query_as("SELECT COUNT(*), MAX(sequence) FROM payment_events").fetch_one(pool).await).unwrap();
    assert_eq!(Some(n), max);
    let types: Vec<String> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT DISTINCT event_type FROM payment_events").fetch_all(pool).await).unwrap();
    for t in [
        "request.created",
        "request.paid",
        "request.declined",
        "request.cancelled",
        "request.expired",
        "payment.settled",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} missing from {types:?}");
    }
}

async fn refunds_full_partial_and_never_more(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let bob = app.token("bob", PAY_SCOPES);
    let p = app.send(&alice, "r-1", "bob", "40.00", Balance).await.unwrap();
    let refund = |key: &'static str, amount: Option<&'static str>, who: String| {
        let app_payments = app.payments();
        let id = p.payment_id.clone();
        async move {
            let mut c = app_payments;
            c.refund_payment(authed(
                pb::RefundPaymentRequest {
                    payment_id: id,
                    idempotency_key: key.into(),
                    amount: amount.and_then(usd),
                    reason: "returned".into(),
                },
                &who,
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    // Only the recipient refunds.
    assert_eq!(refund("x", None, alice.clone()).await.unwrap_err().code(), Code::PermissionDenied);
    let part = refund("rf1", Some("15.00"), bob.clone()).await.unwrap();
    assert_eq!(part.status, pb::PaymentStatus::PartiallyRefunded as i32);
    assert_eq!(amt(&part.refunded_amount), "15.00");
    assert_eq!(
        refund("rf1", Some("15.00"), bob.clone()).await.unwrap().refunded_amount,
        part.refunded_amount,
        "idempotent"
    );
    let err = refund("rf2", Some("25.01"), bob.clone()).await.unwrap_err();
    assert_eq!(reason(&err), "REFUND_EXCEEDS_PAYMENT");
    let full = refund("rf3", None, bob.clone()).await.unwrap();
    assert_eq!(full.status, pb::PaymentStatus::Refunded as i32);
    assert_eq!(amt(&full.refunded_amount), "40.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "100.00");
    assert_eq!(amt(&app.wallet("bob").await.posted), "0.00");
    let err = refund("rf4", Some("0.01"), bob.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Concurrent refunds can never exceed the payment.
    let p2 = app.send(&alice, "r-2", "bob", "10.00", Balance).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = app.payments();
        let t = bob.clone();
        let id = p2.payment_id.clone();
        tasks.push(tokio::spawn(async move {
            c.refund_payment(authed(
                pb::RefundPaymentRequest {
                    payment_id: id,
                    idempotency_key: format!("c{i}"),
                    amount: usd("3.00"),
                    reason: String::new(),
                },
                &t,
            ))
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "3 x 3.00 fit in 10.00, a fourth does not");
    // A recipient who spent the money cannot refund it.
    let p3 = app.send(&alice, "r-3", "carol", "5.00", Balance).await.unwrap();
    let carol = app.token("carol", PAY_SCOPES);
    app.send(&carol, "spend", "dave", "5.00", Balance).await.unwrap();
    let err = app
        .payments()
        .refund_payment(authed(
            pb::RefundPaymentRequest {
                payment_id: p3.payment_id.clone(),
                idempotency_key: "k".into(),
                ..Default::default()
            },
            &carol,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INSUFFICIENT_FUNDS");
    let after = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: p3.payment_id.clone() }, &carol))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amt(&after.refunded_amount), "0.00");
    assert_eq!(after.status, pb::PaymentStatus::Settled as i32);
    assert!(app.verify().await.ok());
}

/// Copies of one refund call (same key, same request) sent at the same moment all get
/// the refund, whichever commits first: the loser must not be told there is nothing left
/// to refund (found by the crash test, which sends duplicates concurrently).
async fn concurrent_duplicate_refunds_get_one_answer(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let bob = app.token("bob", PAY_SCOPES);
    for (round, amount) in [(0, None), (1, Some("2.00"))] {
        let p = app.send(&alice, &format!("dup-{round}"), "bob", "5.00", Balance).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut client = app.payments();
            let req = pb::RefundPaymentRequest {
                payment_id: p.payment_id.clone(),
                idempotency_key: format!("r{round}"),
                amount: amount.and_then(usd),
                reason: "returned".into(),
            };
            let t = bob.clone();
            tasks.push(tokio::spawn(async move { client.refund_payment(authed(req, &t)).await }));
        }
        let expected = if amount.is_some() { "2.00" } else { "5.00" };
        for t in tasks {
            let refunded = t.await.unwrap().expect("every copy gets the refund").into_inner();
            assert_eq!(amt(&refunded.refunded_amount), expected);
        }
    }
    // One refund row each, and the money moved once each.
    assert_eq!(app.count("payment_refunds").await, 2);
    assert_eq!(amt(&app.wallet("bob").await.posted), "3.00");
    assert!(app.verify().await.ok());
}

/// Copies of one one-tap pay (same key) sent at the same moment all get the payment; a
/// copy that finds the request already paid by another copy replays it.
async fn concurrent_duplicate_pays_get_one_answer(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "bob", "100.00").await;
    let r = request(&app, "alice", "dup-r", "bob", "12.00", 0).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let app_payments = app.payments();
        let (t, id) = (app.token("bob", PAY_SCOPES), r.bill_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = app_payments;
            c.pay_bill(authed(
                pb::PayBillRequest { bill_id: id, idempotency_key: "tap".into(), ..Default::default() },
                &t,
            ))
            .await
            .map(|p| p.into_inner().payment_id)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().expect("every copy gets the payment"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(amt(&app.wallet("alice").await.posted), "12.00");
    assert!(app.verify().await.ok());
}

/// A refund refused because the recipient's wallet could not cover it stays refused. A
/// finisher that read the refund as pending before the refusal (a concurrent retry of
/// the call, or the resolver) and posts the refund's entry after the wallet is refilled
/// must be turned away: otherwise the refund would be both failed (its reservation
/// undone, so the payment could be refunded again) and paid.
async fn a_failed_refund_is_never_paid_later(app: TestApp) {
    app.users(CAST).await;
    use dmpay::ledger::{AccountCode, Direction, PostEntryInput, PostingInput};
    fund_user(&app, "alice", "10.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let carol = app.token("carol", PAY_SCOPES);
    let p = app.send(&alice, "fr-1", "carol", "5.00", Balance).await.unwrap();
    app.send(&carol, "fr-spend", "dave", "5.00", Balance).await.unwrap();
    let refund = |key: &'static str| {
        let mut c = app.payments();
        let req = pb::RefundPaymentRequest {
            payment_id: p.payment_id.clone(),
            idempotency_key: key.into(),
            reason: "returned".into(),
            ..Default::default()
        };
        let t = carol.clone();
        async move { c.refund_payment(authed(req, &t)).await.map(|r| r.into_inner()) }
    };
    assert_eq!(reason(&refund("k").await.unwrap_err()), "INSUFFICIENT_FUNDS");
    fund_user(&app, "carol", "5.00").await;

    // The late finisher's post, exactly as the payments service makes it.
    let refund_id: String = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT refund_id FROM payment_refunds WHERE payment_id = $1",
    )
    .bind(&p.payment_id)
    .fetch_one(pool)
    .await)
    .expect("refund row");
    let usd = dmpay::kernel::money::Currency::from_code("USD").unwrap();
    let five = dmpay::kernel::money::Money::from_minor(usd, 500);
    let wallet = |u: &str| AccountCode::wallet(&dmpay::kernel::ids::UserId::parse("u", u).unwrap(), usd);
    let late = app
        .ledger_handle
        .post_entry(
            "payments",
            PostEntryInput {
                idempotency_key: format!("refund:{refund_id}"),
                kind: "dm_refund".into(),
                description: String::new(),
                postings: vec![
                    PostingInput { account_code: wallet("carol"), direction: Direction::Debit, amount: five },
                    PostingInput { account_code: wallet("alice"), direction: Direction::Credit, amount: five },
                ],
                metadata: [
                    ("payment_id".to_string(), p.payment_id.clone()),
                    ("refund_id".to_string(), refund_id.clone()),
                ]
                .into(),
                pending: false,
                pending_timeout_s: 0,
            },
        )
        .await;
    assert!(matches!(late, Err(dmpay::kernel::error::Error::AlreadyExists(_))), "the late post went through: {late:?}");
    assert_eq!(amt(&app.wallet("carol").await.posted), "5.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "5.00");

    // A retry answers as the first call did; a new refund goes through, once.
    assert_eq!(reason(&refund("k").await.unwrap_err()), "INSUFFICIENT_FUNDS");
    let done = refund("k2").await.expect("the refilled wallet covers a new refund");
    assert_eq!(amt(&done.refunded_amount), "5.00");
    assert_eq!(amt(&app.wallet("carol").await.posted), "0.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "10.00");
    assert!(app.verify().await.ok());
}

/// Writes outside the engine's batches (account rows, requests, refunds, the card path's
/// payment rows) go through the engine's pool on SQLite, where they take turns with the
/// batches instead of polling for the one write lock, and through the shared pool on
/// PostgreSQL. So with the engine's connection held, declining a request (a write of
/// the payments module alone: no account row is touched) waits on SQLite and does not
/// on PostgreSQL; on both it is written once, afterwards, with its event.
async fn request_writes_take_turns_with_the_engine(app: TestApp) {
    app.users(CAST).await;
    let r = request(&app, "rita", "r1", "paul", "2.00", 3600).await.expect("a request");
    let events_before = app.count("payment_events").await;
    let paul = app.token("paul", PAY_SCOPES);
    let mut payments = app.payments();
    let call = payments.decline_bill(authed(pb::DeclineBillRequest { bill_id: r.bill_id.clone() }, &paul));
    let declined = app.with_engine_connection_held("payment_events", call).await.expect("declined");
    assert_eq!(declined.into_inner().status, pb::BillStatus::Declined as i32);
    assert_eq!(app.count("payment_events").await, events_before + 1, "one event for the decline");
}

mod requests_and_refunds {
    use super::*;
    backend_tests!(
        requests_pay_decline_cancel_expire,
        refunds_full_partial_and_never_more,
        concurrent_duplicate_refunds_get_one_answer,
        concurrent_duplicate_pays_get_one_answer,
        a_failed_refund_is_never_paid_later,
        request_writes_take_turns_with_the_engine
    );
}

async fn next_events(stream: &mut tonic::Streaming<pb::PaymentEvent>, n: usize) -> Vec<pb::PaymentEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await.expect("event in time");
        out.push(next.expect("stream ok").expect("stream open"));
    }
    out
}

async fn watch(app: &TestApp, token: &str, after: i64, conversation: &str) -> tonic::Streaming<pb::PaymentEvent> {
    app.payments()
        .watch_payments(authed(
            pb::WatchPaymentsRequest {
                conversation_id: conversation.into(),
                after_sequence: after,
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("watch")
        .into_inner()
}

async fn watchers_see_their_events_once_in_order(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "500.00").await;
    fund_user(&app, "carol", "500.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let bob = app.token("bob", PAY_SCOPES);
    let carol = app.token("carol", PAY_SCOPES);
    // Events before the watcher connects.
    for i in 0..3 {
        app.send(&alice, &format!("before-{i}"), "bob", "1.00", Balance).await.unwrap();
    }
    // Someone else's traffic, which bob must never see.
    app.send(&carol, "other-0", "dave", "1.00", Balance).await.unwrap();
    let mut stream = watch(&app, &bob, 0, "").await;
    // During and after: a burst while connected.
    let burst = {
        let app_alice = alice.clone();
        let client = app.payments();
        tokio::spawn(async move {
            let mut c = client;
            for i in 0..10 {
                c.send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("burst-{i}"),
                        recipient_id: "bob".into(),
                        amount: usd("1.00"),
                        conversation_id: "conv-1".into(),
                        ..Default::default()
                    },
                    &app_alice,
                ))
                .await
                .unwrap();
            }
        })
    };
    app.send(&carol, "other-1", "dave", "1.00", Balance).await.unwrap();
    burst.await.unwrap();
    // 13 payments to bob, each created and settled in one commit: 13 events.
    let first = next_events(&mut stream, 10).await;
    drop(stream);
    let last_seen = first.last().unwrap().sequence;
    // Resume from the last sequence seen.
    let mut resumed = watch(&app, &bob, last_seen, "").await;
    let rest = next_events(&mut resumed, 3).await;
    let all: Vec<pb::PaymentEvent> = first.into_iter().chain(rest).collect();
    let seqs: Vec<i64> = all.iter().map(|e| e.sequence).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seqs, sorted, "in order, no duplicates");
    assert_eq!(all.len(), 13);
    for e in &all {
        let p = e.payment.as_ref().expect("payment event");
        assert!(p.sender_id == "bob" || p.recipient_id == "bob", "bob saw someone else's event: {e:?}");
    }
    assert_eq!(all.iter().filter(|e| e.r#type() == pb::PaymentEventType::PaymentSettled).count(), 13);
    // Nothing more for bob.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(600), resumed.message()).await.is_err());

    // One conversation only.
    let mut conv = watch(&app, &bob, 0, "conv-1").await;
    let in_conv = next_events(&mut conv, 10).await;
    assert!(in_conv.iter().all(|e| e.payment.as_ref().unwrap().conversation_id == "conv-1"));
    // The chat backend with payments:watch_all sees everyone's, carol's included.
    let backend = app.token("chat-backend", "payments:watch_all");
    let mut all_users = watch(&app, &backend, 0, "").await;
    let everything = next_events(&mut all_users, 15).await;
    assert!(everything.iter().any(|e| e.payment.as_ref().is_some_and(|p| p.sender_id == "carol")));
    // A bill's events are typed like a payment's and carry the bill.
    let bill = request(&app, "bob", "w-bill", "alice", "3.00", 0).await.unwrap();
    pay(&app, "alice", &bill.bill_id, "w-bill-pay").await.unwrap();
    let mut bill_conv = watch(&app, &bob, 0, "conv-r").await;
    let mut types = Vec::new();
    while !types.contains(&pb::PaymentEventType::BillPaid) {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), bill_conv.message()).await;
        let e = next.expect("the bill's events arrive").unwrap().expect("the stream stays open");
        if let Some(b) = &e.bill {
            assert_eq!(b.bill_id, bill.bill_id);
        }
        types.push(e.r#type());
    }
    assert_eq!(types[0], pb::PaymentEventType::BillCreated, "{types:?}");
    assert!(!types.contains(&pb::PaymentEventType::Unspecified), "{types:?}");
    // Without payments:read, no stream.
    let none = app.token("bob", "payments:write");
    let err = app.payments().watch_payments(authed(pb::WatchPaymentsRequest::default(), &none)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// A payment settled by a batch whose clock reads earlier than the last batch's time
/// (two workers read the clock before either takes the journal's sequence row; here the
/// server's clock is set an hour back) reports one settlement time: in the answer, in
/// GetPayment and in its settled event. The entry's own time is clamped forward to keep
/// the journal's times in sequence order, so it is later than the payment's.
async fn settled_at_agrees_when_the_clock_is_behind_the_journal(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.clock.set_offset_us(-3_600_000_000);
    let sent = app.send(&alice, "behind-1", "bob", "2.00", Balance).await;
    app.clock.set_offset_us(0);
    let sent = sent.unwrap();
    let settled_at = sent.settled_at.expect("settled_at");
    let seen = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: sent.payment_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen, sent, "GetPayment agrees with SendPayment's answer");
    let mut stream = watch(&app, &alice, 0, "").await;
    let events = next_events(&mut stream, 1).await;
    assert_eq!(events[0].r#type(), pb::PaymentEventType::PaymentSettled);
    assert_eq!(events[0].payment.as_ref().unwrap().settled_at, Some(settled_at), "the settled event agrees");
    // The journal kept its order: the entry is no earlier than the funding entry, an
    // hour after the payment's clock reading.
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let mut entries = app
        .ledger()
        .list_entries(authed(
            pb::ListEntriesRequest { account_code: "user:alice:wallet:USD".into(), ..Default::default() },
            &t,
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    entries.sort_by_key(|e| e.sequence);
    let times: Vec<i64> = entries.iter().map(|e| e.created_at.unwrap().seconds).collect();
    assert_eq!(times.len(), 2, "the funding entry and the payment's");
    assert!(times[0] <= times[1], "{times:?}");
    assert!(times[1] > settled_at.seconds + 3000, "the entry's time was clamped forward: {times:?} {settled_at:?}");
}

mod watch_stream {
    use super::*;
    backend_tests!(watchers_see_their_events_once_in_order, settled_at_agrees_when_the_clock_is_behind_the_journal);
}

async fn card_fee_is_charged_and_parts_sum(backend: Backend) {
    let Some(app) =
        TestApp::spawn_with(backend, &[("DMPAY_CARD_FEE_BPS", "290"), ("DMPAY_CARD_FEE_FIXED_MINOR", "30")]).await
    else {
        return;
    };
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    fund_user(&app, "alice", "2.50").await;
    // 10.00 = 2.50 from the wallet + 7.50 from the card; fee 2.9% of 7.50 = 0.2175 -> 0.22, + 0.30.
    let p = app.send(&alice, "fee-1", "bob", "10.00", Auto).await.unwrap();
    assert_eq!(amt(&p.card_funded_amount), "7.50");
    assert_eq!(amt(&p.fee), "0.52");
    assert_eq!(amt(&app.wallet("bob").await.posted), "10.00");
    assert_eq!(amt(&app.wallet("alice").await.posted), "0.00");
    let t = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &t, "platform:fees:USD").await.posted), "0.52");
    // The card paid exactly the card part plus the fee.
    assert_eq!(amt(&balance(&app, &t, "processor:sandbox:clearing:USD").await.posted), "8.02");
    let charged: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT amount FROM sandbox_processor_calls WHERE kind = 'capture'").fetch_one(pool).await).unwrap();
    assert_eq!(charged, 802);
    assert!(app.verify().await.ok());
}

mod fees {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::card_fee_is_charged_and_parts_sum(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::card_fee_is_charged_and_parts_sum(super::Backend::Postgres).await;
    }
}
