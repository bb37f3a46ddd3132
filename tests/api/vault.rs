//! The card vault and the sandbox processor through the real server, on both backends.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use secrecy::SecretString;
use tonic::Code;
use tonic_types::StatusExt;

use dmpay::accounts::Accounts;
use dmpay::kernel::ids::UserId;
use dmpay::kernel::money::{Currency, Money};
use dmpay::processor::sandbox::{Sandbox, SandboxConfig};
use dmpay::processor::{CardDetails, CardProcessor, DeclineCode, ProcessorError};
use dmpay::vault::keys::{KeyRing, DEV_FINGERPRINT_KEY, DEV_KEKS};
use dmpay::vault::{Vault, VaultConfig};

use crate::backend_tests;
use crate::helpers::*;

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

async fn tokenize_link_default_and_remove(app: TestApp) {
    let t = app.token("alice", METHOD_SCOPES);
    let pm = app.tokenize(&t, "4242 4242 4242 4242").await.unwrap();
    assert_eq!(pm.status, pb::PaymentMethodStatus::Unlinked as i32);
    assert_eq!(pm.brand, pb::CardBrand::Visa as i32);
    assert_eq!(pm.last4, "4242");
    assert!(pm.token.starts_with("pm_") && pm.token.len() == 35, "{}", pm.token);
    assert!(!pm.is_default);

    let visa = app
        .methods()
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token.clone(), make_default: false }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(visa.status, pb::PaymentMethodStatus::Active as i32);
    assert!(visa.is_default, "the first linked method is the default");
    let mc = app.add_card(&t, "5555555555554444", false).await.unwrap();
    assert!(!mc.is_default);
    let amex = app.add_card(&t, "378282246310005", false).await.unwrap();
    assert_eq!(amex.brand, pb::CardBrand::Amex as i32);

    let set = app
        .methods()
        .set_default_payment_method(authed(pb::SetDefaultPaymentMethodRequest { token: mc.token.clone() }, &t))
        .await
        .unwrap()
        .into_inner();
    assert!(set.is_default);
    let list = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.payment_methods.len(), 3);
    assert_eq!(list.payment_methods.iter().filter(|m| m.is_default).count(), 1);

    // Removing the default promotes the most recently linked active method (amex).
    let removed = app
        .methods()
        .remove_payment_method(authed(pb::RemovePaymentMethodRequest { token: mc.token.clone() }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.status, pb::PaymentMethodStatus::Removed as i32);
    let list = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.payment_methods.len(), 2);
    let default = list.payment_methods.iter().find(|m| m.is_default).unwrap();
    assert_eq!(default.token, amex.token);
    let history = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest { include_removed: true }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.payment_methods.len(), 3);

    // A removed method can never be charged or linked again.
    let alice = UserId::parse("u", "alice").unwrap();
    let err = app.vault.chargeable(&alice, Some(&mc.token), "test").await.err().unwrap();
    assert!(err.to_string().contains("not linked or was removed"), "{err}");
    let err = app
        .methods()
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: mc.token.clone(), make_default: true }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The default is what one-click charges.
    let card = app.vault.chargeable(&alice, None, "test").await.unwrap();
    assert_eq!(card.token, amex.token);

    // Every access to card data is audited.
    let actions: Vec<String> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE target LIKE 'pm:%' ORDER BY id",
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    for expected in ["card.tokenize", "card.decrypt", "card.link", "card.set_default", "card.remove"] {
        assert!(actions.iter().any(|a| a == expected), "{expected} missing from {actions:?}");
    }
}

async fn same_card_is_one_method_and_sharing_is_a_signal(app: TestApp) {
    let alice = app.token("alice", METHOD_SCOPES);
    let bob = app.token("bob", METHOD_SCOPES);
    let first = app.tokenize(&alice, "4242424242424242").await.unwrap();
    let again = app.tokenize(&alice, "4242-4242-4242-4242").await.unwrap();
    assert_eq!(first.token, again.token);
    app.methods()
        .link_payment_method(authed(
            pb::LinkPaymentMethodRequest { token: first.token.clone(), make_default: false },
            &alice,
        ))
        .await
        .unwrap();
    let linked_again = app.tokenize(&alice, "4242424242424242").await.unwrap();
    assert_eq!(linked_again.token, first.token);
    assert_eq!(linked_again.status, pb::PaymentMethodStatus::Active as i32);
    let bobs = app.tokenize(&bob, "4242424242424242").await.unwrap();
    assert_ne!(bobs.token, first.token);
    assert_eq!(app.vault.accounts_sharing_card(&first.token).await.unwrap(), 2);
    assert_eq!(app.count("payment_methods").await, 2);

    // The same card tokenized concurrently by one account is still one method.
    let erin = app.token("erin", METHOD_SCOPES);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = app.methods();
        let t = erin.clone();
        tasks.push(tokio::spawn(async move {
            c.tokenize_card(authed(
                pb::TokenizeCardRequest {
                    card_number: "5555555555554444".into(),
                    exp_month: 12,
                    exp_year: 2034,
                    cvc: "123".into(),
                    ..Default::default()
                },
                &t,
            ))
            .await
            .map(|r| r.into_inner().token)
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap().expect("no error for a concurrent duplicate"));
    }
    assert_eq!(tokens.len(), 1);
}

async fn test_cards_at_link(app: TestApp) {
    let t = app.token("carol", METHOD_SCOPES);
    for approve in ["4242424242424242", "5555555555554444", "2223003122003222", "378282246310005", "4000000000000341"] {
        let pm = app.add_card(&t, approve, false).await.unwrap_or_else(|e| panic!("{approve}: {e:?}"));
        assert_eq!(pm.status, pb::PaymentMethodStatus::Active as i32);
    }
    for (card, expected) in [
        ("4000000000000002", "CARD_DECLINED"),
        ("4000000000009995", "INSUFFICIENT_FUNDS"),
        ("4000000000009987", "LOST_CARD"),
        ("4000000000009979", "STOLEN_CARD"),
        ("4000000000000069", "CARD_EXPIRED"),
        ("4000000000000127", "INCORRECT_CVC"),
        ("4100000000000019", "FRAUD_SUSPECTED"),
    ] {
        let err = app.add_card(&t, card, false).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{card}");
        assert_eq!(reason(&err), expected, "{card}");
    }
    // A processing error decides nothing: the link can be retried.
    let pm = app.tokenize(&t, "4000000000000119").await.unwrap();
    let err = app
        .methods()
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token.clone(), make_default: false }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let list = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.payment_methods.iter().filter(|m| m.status == pb::PaymentMethodStatus::Active as i32).count(), 5);
}

async fn charges_at_the_sandbox(app: TestApp) {
    let sandbox = Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone());
    let usd = Currency::from_code("USD").unwrap();
    let t = app.token("dave", METHOD_SCOPES);
    let dave = UserId::parse("u", "dave").unwrap();
    let cases = [("4242424242424242", None), ("4000000000000341", Some(DeclineCode::CardDeclined))];
    for (n, (number, expected)) in cases.iter().enumerate() {
        let pm = app.add_card(&t, number, true).await.unwrap();
        let card = app.vault.chargeable(&dave, Some(&pm.token), "test").await.unwrap();
        let result = sandbox.authorize(&format!("auth-{n}"), card.details(), Money::from_minor(usd, 1000)).await;
        match expected {
            None => {
                let auth = result.unwrap();
                let cap = sandbox.capture(&format!("cap-{n}"), &auth, Money::from_minor(usd, 1000)).await.unwrap();
                // Replays return the original outcome.
                assert_eq!(
                    sandbox.capture(&format!("cap-{n}"), &auth, Money::from_minor(usd, 1000)).await.unwrap(),
                    cap
                );
                let refund = sandbox.refund(&format!("ref-{n}"), &cap, Money::from_minor(usd, 400)).await.unwrap();
                assert!(refund.starts_with("sbx_"));
                assert!(sandbox.refund("ref-too-much", &cap, Money::from_minor(usd, 1001)).await.is_err());
            }
            Some(code) => assert_eq!(result.unwrap_err(), ProcessorError::Declined(*code)),
        }
    }
    // Every other decline card declines a charge the same way it declines a link.
    for (number, code) in [
        ("4000000000000002", DeclineCode::CardDeclined),
        ("4000000000009995", DeclineCode::InsufficientFunds),
        ("4000000000009987", DeclineCode::LostCard),
        ("4000000000009979", DeclineCode::StolenCard),
        ("4000000000000069", DeclineCode::CardExpired),
        ("4000000000000127", DeclineCode::IncorrectCvc),
        ("4100000000000019", DeclineCode::Fraud),
    ] {
        let card = dmpay::vault::card::validate(number, 12, 2034, "123", (2026, 1)).unwrap();
        let details = CardDetails { pan: &card.pan, exp_month: 12, exp_year: 2034, cvc: None };
        let err = sandbox.authorize(&format!("a-{number}"), details, Money::from_minor(usd, 500)).await.unwrap_err();
        assert_eq!(err, ProcessorError::Declined(code), "{number}");
    }
    let card = dmpay::vault::card::validate("4000000000000119", 12, 2034, "123", (2026, 1)).unwrap();
    let details = CardDetails { pan: &card.pan, exp_month: 12, exp_year: 2034, cvc: None };
    assert!(matches!(
        sandbox.authorize("a-err", details, Money::from_minor(usd, 500)).await,
        Err(ProcessorError::Failed(_))
    ));

    // The settlement report lists the capture and the refund of today, with fees.
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let report = sandbox.settlement_report(&format!("{:04}-{:02}-{:02}", today.0, today.1, today.2)).await.unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines[0], "processor_reference,type,amount,fee,net,currency,created_at");
    assert_eq!(lines.len(), 3, "{report}");
    assert!(lines[1].contains(",capture,10.00,0.59,9.41,USD,"), "{report}");
    assert!(lines[2].contains(",refund,-4.00,0.00,-4.00,USD,"), "{report}");
}

async fn sandbox_fault_modes(app: TestApp) {
    let usd = Currency::from_code("USD").unwrap();
    let card = dmpay::vault::card::validate("4242424242424242", 12, 2034, "123", (2026, 1)).unwrap();
    let details = CardDetails { pan: &card.pan, exp_month: 12, exp_year: 2034, cvc: None };
    let timeouts =
        Sandbox::new(app.db.clone(), SandboxConfig { timeout_rate: 1.0, ..Default::default() }, app.clock.clone());
    let mut processed = 0;
    for i in 0..20 {
        let key = format!("t-{i}");
        let err = timeouts.authorize(&key, details, Money::from_minor(usd, 100)).await.unwrap_err();
        assert_eq!(err, ProcessorError::Unknown);
        // The outcome is found by lookup, never by retrying blindly.
        if let Some(record) = timeouts.lookup(&key).await.unwrap() {
            assert_eq!(record.outcome, Ok(()));
            processed += 1;
            // And a retry with the same key returns the recorded outcome, not a second charge.
            let calm = Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone());
            assert_eq!(calm.authorize(&key, details, Money::from_minor(usd, 100)).await.unwrap(), record.reference);
        }
    }
    assert!(processed > 0 && processed < 20, "timeouts both before and after processing: {processed}");
    let errors =
        Sandbox::new(app.db.clone(), SandboxConfig { error_rate: 1.0, ..Default::default() }, app.clock.clone());
    assert!(matches!(
        errors.authorize("e-1", details, Money::from_minor(usd, 100)).await,
        Err(ProcessorError::Failed(_))
    ));
    assert!(errors.lookup("e-1").await.unwrap().is_none(), "a processing error charges nothing");
    let slow = Sandbox::new(
        app.db.clone(),
        SandboxConfig { latency: Duration::from_millis(150), ..Default::default() },
        app.clock.clone(),
    );
    let started = std::time::Instant::now();
    slow.authorize("slow-1", details, Money::from_minor(usd, 100)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
}

async fn tokens_belong_to_their_account(app: TestApp) {
    let alice = app.token("alice", METHOD_SCOPES);
    let bob = app.token("bob", METHOD_SCOPES);
    let pm = app.add_card(&alice, "4242424242424242", false).await.unwrap();
    let unknown = "pm_0123456789abcdef0123456789abcdef".to_string();
    for token in [pm.token.clone(), unknown, "pm_bad".to_string()] {
        let e1 = app
            .methods()
            .set_default_payment_method(authed(pb::SetDefaultPaymentMethodRequest { token: token.clone() }, &bob))
            .await
            .unwrap_err();
        let e2 = app
            .methods()
            .remove_payment_method(authed(pb::RemovePaymentMethodRequest { token: token.clone() }, &bob))
            .await
            .unwrap_err();
        let e3 = app
            .methods()
            .link_payment_method(authed(
                pb::LinkPaymentMethodRequest { token: token.clone(), make_default: false },
                &bob,
            ))
            .await
            .unwrap_err();
        for e in [e1, e2, e3] {
            assert_eq!(e.code(), Code::NotFound, "{token}: {e:?}");
            assert_eq!(e.message(), "payment method not found (unknown, expired or another account's)");
        }
    }
    let list = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &bob))
        .await
        .unwrap()
        .into_inner();
    assert!(list.payment_methods.is_empty());
    // Without the scope.
    let no_scope = app.token("alice", "payments:read");
    let err = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &no_scope))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn bad_cards_name_the_field_and_write_nothing(app: TestApp) {
    let t = app.token("erin", METHOD_SCOPES);
    let good = || pb::TokenizeCardRequest {
        card_number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
        holder_name: "Erin".into(),
        postal_code: "10115".into(),
    };
    let cases = [
        (pb::TokenizeCardRequest { card_number: "4242424242424241".into(), ..good() }, "card_number"),
        (pb::TokenizeCardRequest { card_number: "42424242".into(), ..good() }, "card_number"),
        (pb::TokenizeCardRequest { card_number: "4242a24242424242".into(), ..good() }, "card_number"),
        (pb::TokenizeCardRequest { exp_month: 13, ..good() }, "exp_month"),
        (pb::TokenizeCardRequest { exp_year: 2020, ..good() }, "exp_year"),
        (pb::TokenizeCardRequest { exp_year: 2090, ..good() }, "exp_year"),
        (pb::TokenizeCardRequest { cvc: "12".into(), ..good() }, "cvc"),
        (pb::TokenizeCardRequest { card_number: "378282246310005".into(), ..good() }, "cvc"),
        (pb::TokenizeCardRequest { holder_name: "x\u{0}y".into(), ..good() }, "holder_name"),
        (pb::TokenizeCardRequest { postal_code: "<script>".into(), ..good() }, "postal_code"),
    ];
    for (req, field) in cases {
        let number = req.card_number.clone();
        let err = app.methods().tokenize_card(authed(req, &t)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(err.get_error_details().bad_request().unwrap().field_violations[0].field, field);
        assert!(!err.message().contains(&number), "the error echoes the card number: {}", err.message());
    }
    assert_eq!(app.count("payment_methods").await, 0);
}

async fn tokenization_is_rate_limited_and_methods_are_capped(app: TestApp) {
    let t = app.token("frank", METHOD_SCOPES);
    for n in 0..10 {
        app.add_card(&t, &visa(n), false).await.unwrap_or_else(|e| panic!("card {n}: {e:?}"));
    }
    let err = app.add_card(&t, &visa(10), false).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "PAYMENT_METHOD_LIMIT");
    // 11 tokenizations so far; the default limit is 20 an hour, failures included.
    for n in 11..20 {
        let _ = app.tokenize(&t, &visa(n)).await;
    }
    let err = app.tokenize(&t, &visa(30)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "TOKENIZE_RATE_LIMIT");
}

async fn ciphertext_moved_to_another_row_does_not_decrypt(app: TestApp) {
    let t = app.token("gina", METHOD_SCOPES);
    let a = app.add_card(&t, "4242424242424242", true).await.unwrap();
    let b = app.add_card(&t, "5555555555554444", false).await.unwrap();
    dmpay::with_db!(&app.db, pool => {
        let (dek, ct): (Vec<u8>, Vec<u8>) = sqlx::query_as("SELECT wrapped_dek, pan_ciphertext FROM payment_methods WHERE token = $1")
            .bind(&a.token)
            .fetch_one(pool)
            .await
            .unwrap();
        sqlx::query("UPDATE payment_methods SET wrapped_dek = $1, pan_ciphertext = $2 WHERE token = $3")
            .bind(dek)
            .bind(ct)
            .bind(&b.token)
            .execute(pool)
            .await
            .unwrap();
    });
    let gina = UserId::parse("u", "gina").unwrap();
    assert!(app.vault.chargeable(&gina, Some(&b.token), "test").await.is_err());
    assert!(app.vault.chargeable(&gina, Some(&a.token), "test").await.is_ok());
    let failed: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'card.decrypt' AND result = 'failed'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(failed, 1);
}

async fn rotation_rewraps_every_key(app: TestApp) {
    let t = app.token("hank", METHOD_SCOPES);
    for n in 0..5 {
        app.add_card(&t, &visa(n), n == 0).await.unwrap();
    }
    let k2 = format!("k2:{}", base64::engine::general_purpose::STANDARD.encode([42u8; 32]));
    let vault_with = |keks: String, active: Option<&str>| {
        let ring = KeyRing::new(&SecretString::from(keks), active, &SecretString::from(DEV_FINGERPRINT_KEY)).unwrap();
        Vault::new(
            app.db.clone(),
            Arc::new(ring),
            Arc::new(Sandbox::new(app.db.clone(), SandboxConfig::default(), app.clock.clone())),
            Accounts::new(app.db.clone(), app.clock.clone()),
            VaultConfig::default(),
        )
    };
    let rotating = vault_with(format!("{DEV_KEKS},{k2}"), Some("k2"));
    assert_eq!(rotating.rotate("test").await.unwrap(), 5);
    assert_eq!(rotating.rotate("test").await.unwrap(), 0, "resumable: nothing left the second time");
    // The old KEK can go: the new one alone opens every card.
    let new_only = vault_with(k2, None);
    let hank = UserId::parse("u", "hank").unwrap();
    for m in new_only.list(&hank, false).await.unwrap() {
        new_only.chargeable(&hank, Some(&m.token), "test").await.unwrap();
    }
    let old_only = vault_with(DEV_KEKS.into(), None);
    assert!(old_only.chargeable(&hank, None, "test").await.is_err());
}

/// On SQLite the vault's writes take turns on the engine's one connection (see
/// `Vault::with_writer`); on PostgreSQL they use the shared pool. With the engine's
/// connection held, changing the default card waits on SQLite and not on PostgreSQL;
/// on both it is written once, with its audit record, afterwards.
async fn vault_writes_take_turns_with_the_engine(app: TestApp) {
    let t = app.token("vera", METHOD_SCOPES);
    app.add_card(&t, "4242424242424242", true).await.unwrap();
    let mc = app.add_card(&t, "5555555555554444", false).await.unwrap();
    let audits_before = app.count("audit_log").await;
    let mut methods = app.methods();
    let call =
        methods.set_default_payment_method(authed(pb::SetDefaultPaymentMethodRequest { token: mc.token.clone() }, &t));
    let set = app.with_engine_connection_held("audit_log", call).await.expect("written");
    assert!(set.into_inner().is_default);
    assert_eq!(app.count("audit_log").await, audits_before + 1, "one audit record for the change");
}

backend_tests!(
    vault_writes_take_turns_with_the_engine,
    tokenize_link_default_and_remove,
    same_card_is_one_method_and_sharing_is_a_signal,
    test_cards_at_link,
    charges_at_the_sandbox,
    sandbox_fault_modes,
    tokens_belong_to_their_account,
    bad_cards_name_the_field_and_write_nothing,
    tokenization_is_rate_limited_and_methods_are_capped,
    ciphertext_moved_to_another_row_does_not_decrypt,
    rotation_rewraps_every_key,
);

async fn unlinked_tokens_expire(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_VAULT_UNLINKED_TTL", "1s")]).await else { return };
    let t = app.token("ivan", METHOD_SCOPES);
    let pm = app.tokenize(&t, "4242424242424242").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = app
        .methods()
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token.clone(), make_default: false }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let list = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), &t))
        .await
        .unwrap()
        .into_inner();
    assert!(list.payment_methods.is_empty());
    assert_eq!(app.vault.purge(None).await.unwrap(), 1, "expired card data is deleted");
    // The same card can be tokenized again afterwards.
    let again = app.tokenize(&t, "4242424242424242").await.unwrap();
    assert_ne!(again.token, pm.token);
}

mod expiry {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::unlinked_tokens_expire(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::unlinked_tokens_expire(super::Backend::Postgres).await;
    }
}

#[test]
fn tokenize_request_debug_masks_card_data() {
    let req = pb::TokenizeCardRequest {
        card_number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "987".into(),
        holder_name: "Zed".into(),
        postal_code: "10115".into(),
    };
    let shown = format!("{req:?}");
    assert!(!shown.contains("4242424242424242") && !shown.contains("987"), "{shown}");
}
