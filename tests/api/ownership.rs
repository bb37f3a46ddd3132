//! The payments module's ledger entries belong to it: the generic Ledger API can neither
//! reverse them nor post or void their holds, API callers' idempotency keys live in a
//! namespace of their own, and debiting a user's wallet through the API needs its own
//! scope.

use tonic::Code;
use tonic_types::StatusExt;

use crate::backend_tests;
use crate::helpers::*;

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

async fn entry_of(app: &TestApp, kind: &str) -> String {
    dmpay::with_db!(&app.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT id FROM ledger_entries WHERE kind = $1 ORDER BY sequence LIMIT 1"
    )
    .bind(kind)
    .fetch_one(pool)
    .await)
    .unwrap()
}

async fn reverse(app: &TestApp, token: &str, entry_id: &str, key: &str) -> Result<pb::Entry, tonic::Status> {
    app.ledger()
        .reverse_entry(authed(
            pb::ReverseEntryRequest { entry_id: entry_id.into(), idempotency_key: key.into(), reason: "undo".into() },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// A caller with every ledger scope cannot reverse a payment's entry nor post or void
/// its hold, whatever its `sub` (even `payments`); the payment and the balances stay as
/// they were.
async fn payment_entries_belong_to_payments(app: TestApp) {
    app.users(CAST).await;
    let svc = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &svc, "alice", "30.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    // A wallet payment (one entry) and a split one (a hold, then the card settlement).
    let wallet_paid = app.send(&alice, "w1", "bob", "10.00", pb::FundingSource::Balance).await.unwrap();
    let split = app.send(&alice, "s1", "bob", "25.00", pb::FundingSource::Auto).await.unwrap();
    assert_eq!(split.card_funded_amount.unwrap().amount, "5.00");
    let transfer = entry_of(&app, "dm_payment").await;
    let hold = entry_of(&app, "dm_payment_hold").await;
    let settle = entry_of(&app, "dm_payment_card").await;
    let before = (app.wallet("alice").await, app.wallet("bob").await);
    let rows_before = app.count("ledger_entries").await;

    for sub in ["svc-finance", "payments"] {
        let t = app.token(sub, LEDGER_SCOPES);
        for (entry, what) in [(&transfer, "transfer"), (&settle, "card-settlement")] {
            let e = reverse(&app, &t, entry, &format!("rev-{sub}-{what}")).await.unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{sub} reversing the {what}: {e:?}");
            assert_eq!(reason(&e), "ENTRY_OWNED_BY_MODULE");
            assert!(e.message().contains("RefundPayment"), "{}", e.message());
        }
        let e = app
            .ledger()
            .void_pending(authed(
                pb::VoidPendingRequest { entry_id: hold.clone(), idempotency_key: format!("void-{sub}") },
                &t,
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "ENTRY_OWNED_BY_MODULE", "{e:?}");
        let e = app
            .ledger()
            .post_pending(authed(
                pb::PostPendingRequest { entry_id: hold.clone(), idempotency_key: format!("post-{sub}"), amount: None },
                &t,
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "ENTRY_OWNED_BY_MODULE", "{e:?}");
    }
    assert_eq!(app.count("ledger_entries").await, rows_before, "nothing written");
    assert_eq!((app.wallet("alice").await, app.wallet("bob").await), before);
    let got = app
        .payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: wallet_paid.payment_id.clone() }, &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, pb::PaymentStatus::Settled as i32);
    // The owner's way still works: the recipient refunds.
    let bob = app.token("bob", PAY_SCOPES);
    let refunded = app
        .payments()
        .refund_payment(authed(
            pb::RefundPaymentRequest {
                payment_id: wallet_paid.payment_id,
                idempotency_key: "refund-1".into(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.status, pb::PaymentStatus::Refunded as i32);
    assert!(app.verify().await.ok());
}

/// An API caller whose `sub` is a module's name, using that module's own key, gets an
/// entry of its own: the namespaces never meet.
async fn api_keys_never_collide_with_module_keys(app: TestApp) {
    app.users(CAST).await;
    let svc = app.token("svc-treasury", LEDGER_SCOPES);
    fund(&app, &svc, "alice", "5.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let p = app.send(&alice, "s1", "bob", "25.00", pb::FundingSource::Auto).await.unwrap();
    let module_hold = entry_of(&app, "dm_payment_hold").await;
    let impostor = app.token("payments", LEDGER_SCOPES);
    // The payment's hold was written by `payments` under key pay:<id>:hold.
    let mine = app
        .ledger()
        .post_entry(authed(
            transfer(&format!("pay:{}:hold", p.payment_id), "platform:treasury:USD", "user:mallory:wallet:USD", "1.00"),
            &impostor,
        ))
        .await
        .expect("a new entry, not ALREADY_EXISTS nor the module's entry")
        .into_inner();
    assert_ne!(mine.entry_id, module_hold);
    let created_by: String = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT created_by FROM ledger_entries WHERE id = $1"
    )
    .bind(&mine.entry_id)
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(created_by, "api:payments");
    // And the impostor's own entry is an API entry it may reverse.
    reverse(&app, &impostor, &mine.entry_id, "undo-mine").await.unwrap();
    assert!(app.verify().await.ok());
}

/// `ledger:write` tops wallets up; taking money out of one needs `ledger:wallet_debit`,
/// for a posting and for the reversal of a top-up alike.
async fn debiting_a_wallet_needs_its_own_scope(app: TestApp) {
    let topup = app.token("svc-topup", "ledger:write ledger:read");
    let credited = fund(&app, &topup, "alice", "10.00").await;
    let entries = app.count("ledger_entries").await;
    let e = app
        .ledger()
        .post_entry(authed(transfer("take", "user:alice:wallet:USD", "platform:treasury:USD", "1.00"), &topup))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("ledger:wallet_debit") && e.message().contains("postings[0]"), "{}", e.message());
    let e = reverse(&app, &topup, &credited.entry_id, "undo-topup").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(app.count("ledger_entries").await, entries, "nothing written");
    assert_eq!(app.wallet("alice").await.posted.unwrap().amount, "10.00");
    let debit = app.token("svc-collections", "ledger:write ledger:read ledger:wallet_debit");
    app.ledger()
        .post_entry(authed(transfer("take", "user:alice:wallet:USD", "platform:treasury:USD", "1.00"), &debit))
        .await
        .unwrap();
    fund(&app, &topup, "alice", "5.00").await;
    let reversal = reverse(&app, &debit, &credited.entry_id, "undo-topup").await.unwrap();
    assert_eq!(reversal.reverses_entry_id, credited.entry_id);
    assert_eq!(app.wallet("alice").await.posted.unwrap().amount, "4.00");
}

backend_tests!(
    payment_entries_belong_to_payments,
    api_keys_never_collide_with_module_keys,
    debiting_a_wallet_needs_its_own_scope,
);
