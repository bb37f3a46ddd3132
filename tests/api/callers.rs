//! Bounded cost per caller: a token bucket per caller on every write, and no rows for a
//! call that is refused (a payment or request to a made-up user writes nothing).

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

async fn send_all(app: &TestApp, token: &str, n: usize, prefix: &str) -> Vec<Result<pb::Payment, tonic::Status>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = app.payments();
        let (t, key) = (token.to_owned(), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            client
                .send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: key,
                        recipient_id: "bob".into(),
                        amount: usd("0.10"),
                        funding_source: pb::FundingSource::Balance as i32,
                        ..Default::default()
                    },
                    &t,
                ))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// 50 parallel sends from one unverified caller against a burst of 10 and 2 a second:
/// 10 go through and the rest are RESOURCE_EXHAUSTED `RATE_LIMITED` with a retry delay,
/// writing nothing; reads and other callers are not held back; a verified caller and a
/// service get their own tier's rate; after the delay the caller may write again.
async fn writes_are_rate_limited_per_caller(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[
            ("DMPAY_RATE_UNVERIFIED_PER_SECOND", "2"),
            ("DMPAY_RATE_UNVERIFIED_BURST", "10"),
            ("DMPAY_RATE_VERIFIED_PER_SECOND", "2"),
            ("DMPAY_RATE_VERIFIED_BURST", "20"),
        ],
    )
    .await
    else {
        return;
    };
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    for u in ["alice", "carol", "erin"] {
        fund(&app, &treasury, u, "100.00").await;
    }
    app.users(&["bob"]).await;
    let alice = app.token("alice", PAY_SCOPES);
    let answers = send_all(&app, &alice, 50, "a").await;
    let mut delay = Duration::ZERO;
    let (mut ok, mut limited) = (0, 0);
    for a in &answers {
        match a {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason(e), "RATE_LIMITED");
                let retry = e.get_error_details().retry_info().expect("RetryInfo").retry_delay.expect("a delay");
                assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1), "{retry:?}");
                delay = delay.max(retry);
                limited += 1;
            }
        }
    }
    // Ten from the burst, and perhaps one refilled while the calls arrived.
    assert!((10..=11).contains(&ok), "{ok} went through");
    assert_eq!(ok + limited, 50);
    assert_eq!(app.count("payments").await, ok as i64, "a refused call writes nothing");
    // Reads are not limited; nor is another caller.
    for _ in 0..20 {
        app.wallet("alice").await;
    }
    let erin = app.token("erin", PAY_SCOPES);
    assert!(send_all(&app, &erin, 5, "e").await.iter().all(Result::is_ok));
    // A verified caller has its tier's burst.
    let admin = app.token("platform", "accounts:admin");
    app.accounts()
        .upsert_account(authed(
            pb::UpsertAccountRequest { user_id: "carol".into(), tier: pb::Tier::Verified as i32, ..Default::default() },
            &admin,
        ))
        .await
        .unwrap();
    let carol = app.token("carol", PAY_SCOPES);
    let carols = send_all(&app, &carol, 30, "c").await;
    let carol_ok = carols.iter().filter(|r| r.is_ok()).count();
    assert!((20..=21).contains(&carol_ok), "{carol_ok}");
    // After the delay it told, the caller writes again.
    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    assert!(app.send(&alice, "after", "bob", "0.10", pb::FundingSource::Balance).await.is_ok());
    assert!(app.metric("dmpay_rate_limited_total").await >= 40.0);
}

/// A caller with an empty wallet sending to made-up names, and requesting from them:
/// every call is NOT_FOUND naming the field, and no account, wallet, payment, request
/// or event is written. A send to a real new user (whose account the platform created)
/// is still one tap.
async fn calls_to_made_up_users_write_nothing(app: TestApp) {
    let mallory = app.token("mallory", PAY_SCOPES);
    // mallory's own account exists from her first call.
    app.payments().get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &mallory)).await.unwrap();
    let before = (
        app.count("accounts").await,
        app.count("ledger_accounts").await,
        app.count("payments").await,
        app.count("payment_requests").await,
        app.count("payment_events").await,
    );
    for i in 0..100 {
        let to = format!("ghost{i}");
        for funding in [pb::FundingSource::Auto, pb::FundingSource::Balance, pb::FundingSource::Card] {
            let e = app.send(&mallory, &format!("k{i}-{}", funding as i32), &to, "1.00", funding).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{e:?}");
            assert!(e.message().contains("recipient_id"), "{}", e.message());
        }
        let e = app
            .payments()
            .request_payment(authed(
                pb::RequestPaymentRequest {
                    idempotency_key: format!("r{i}"),
                    payer_id: to.clone(),
                    amount: usd("1.00"),
                    ..Default::default()
                },
                &mallory,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("payer_id"), "{}", e.message());
    }
    let after = (
        app.count("accounts").await,
        app.count("ledger_accounts").await,
        app.count("payments").await,
        app.count("payment_requests").await,
        app.count("payment_events").await,
    );
    assert_eq!(after, before, "(accounts, ledger accounts, payments, requests, events)");

    // The platform creates a new user's account at sign-up: one tap pays them.
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &treasury, "alice", "10.00").await;
    let admin = app.token("platform", "accounts:admin");
    app.accounts()
        .upsert_account(authed(
            pb::UpsertAccountRequest { user_id: "newbie".into(), display_name: "New".into(), ..Default::default() },
            &admin,
        ))
        .await
        .unwrap();
    let alice = app.token("alice", PAY_SCOPES);
    let paid = app.send(&alice, "welcome", "newbie", "2.00", pb::FundingSource::Auto).await.unwrap();
    assert_eq!(paid.status, pb::PaymentStatus::Settled as i32);
    assert_eq!(app.wallet("newbie").await.posted.unwrap().amount, "2.00");
}

/// A payment to a frozen account is refused like any refusal the sender cannot act on;
/// the owner (and finance) still see the status.
async fn a_frozen_recipient_is_not_revealed(app: TestApp) {
    let treasury = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &treasury, "alice", "10.00").await;
    app.users(&["bob"]).await;
    let admin = app.token("platform", "accounts:admin");
    app.accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "bob".into(), reason: "aml review".into() }, &admin))
        .await
        .unwrap();
    let alice = app.token("alice", PAY_SCOPES);
    for funding in [pb::FundingSource::Balance, pb::FundingSource::Auto, pb::FundingSource::Card] {
        let e = app.send(&alice, &format!("f{}", funding as i32), "bob", "1.00", funding).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(reason(&e), "RECIPIENT_UNAVAILABLE");
        let text = format!("{} {:?}", e.message(), e.get_error_details());
        assert!(!text.to_lowercase().contains("frozen"), "{text}");
    }
    let bob = app.token("bob", "");
    let own = app.accounts().get_account(authed(pb::GetAccountRequest { user_id: "bob".into() }, &bob)).await.unwrap();
    assert_eq!(own.into_inner().status, pb::AccountStatus::Frozen as i32);
}

crate::backend_tests!(calls_to_made_up_users_write_nothing, a_frozen_recipient_is_not_revealed);
crate::backend_fn_tests!(writes_are_rate_limited_per_caller);
