//! Access control across every RPC: a token missing the required scope is refused with
//! PERMISSION_DENIED before anything happens, and another user's resources answer
//! NOT_FOUND exactly like missing ones.

use tonic::Code;

use crate::backend_tests;
use crate::helpers::*;

/// Calls one RPC with `token` and returns its status code (OK when it succeeded).
async fn call(app: &TestApp, rpc: &str, token: &str) -> Code {
    let ch = app.channel.clone();
    let r = match rpc {
        "Accounts/UpsertAccount" => pb::accounts_client::AccountsClient::new(ch)
            .upsert_account(authed(pb::UpsertAccountRequest { user_id: "zed".into(), ..Default::default() }, token))
            .await
            .map(|_| ()),
        "Accounts/FreezeAccount" => pb::accounts_client::AccountsClient::new(ch)
            .freeze_account(authed(pb::FreezeAccountRequest { user_id: "zed".into(), reason: "x".into() }, token))
            .await
            .map(|_| ()),
        "Accounts/UnfreezeAccount" => pb::accounts_client::AccountsClient::new(ch)
            .unfreeze_account(authed(pb::UnfreezeAccountRequest { user_id: "zed".into(), reason: "x".into() }, token))
            .await
            .map(|_| ()),
        "Ledger/CreateLedgerAccount" => pb::ledger_client::LedgerClient::new(ch)
            .create_ledger_account(authed(
                pb::CreateLedgerAccountRequest {
                    code: "x:y".into(),
                    r#type: 1,
                    currency: "USD".into(),
                    allow_negative: true,
                },
                token,
            ))
            .await
            .map(|_| ()),
        "Ledger/PostEntry" => pb::ledger_client::LedgerClient::new(ch)
            .post_entry(authed(transfer("acl", "platform:treasury:USD", "user:zed:wallet:USD", "1.00"), token))
            .await
            .map(|_| ()),
        "Ledger/GetLedgerBalance" => pb::ledger_client::LedgerClient::new(ch)
            .get_ledger_balance(authed(
                pb::GetLedgerBalanceRequest { account_code: "platform:fees:USD".into(), as_of: None },
                token,
            ))
            .await
            .map(|_| ()),
        "Ledger/ListEntries" => pb::ledger_client::LedgerClient::new(ch)
            .list_entries(authed(
                pb::ListEntriesRequest { account_code: "platform:fees:USD".into(), ..Default::default() },
                token,
            ))
            .await
            .map(|_| ()),
        "PaymentMethods/ListPaymentMethods" => pb::payment_methods_client::PaymentMethodsClient::new(ch)
            .list_payment_methods(authed(pb::ListPaymentMethodsRequest::default(), token))
            .await
            .map(|_| ()),
        "Payments/SendPayment" => pb::payments_client::PaymentsClient::new(ch)
            .send_payment(authed(
                pb::SendPaymentRequest {
                    idempotency_key: "acl".into(),
                    recipient_id: "bob".into(),
                    amount: usd("1.00"),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ()),
        "Payments/RequestPayment" => pb::payments_client::PaymentsClient::new(ch)
            .request_payment(authed(
                pb::RequestPaymentRequest {
                    idempotency_key: "acl".into(),
                    payer_id: "bob".into(),
                    amount: usd("1.00"),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ()),
        "Payments/ListPayments" => pb::payments_client::PaymentsClient::new(ch)
            .list_payments(authed(pb::ListPaymentsRequest::default(), token))
            .await
            .map(|_| ()),
        "Payments/GetBalance" => pb::payments_client::PaymentsClient::new(ch)
            .get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, token))
            .await
            .map(|_| ()),
        "Finance/GetTrialBalance" => pb::finance_client::FinanceClient::new(ch)
            .get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), token))
            .await
            .map(|_| ()),
        "Finance/VerifyLedger" => pb::finance_client::FinanceClient::new(ch)
            .verify_ledger(authed(pb::VerifyLedgerRequest {}, token))
            .await
            .map(|_| ()),
        "Finance/GetStatement" => pb::finance_client::FinanceClient::new(ch)
            .get_statement(authed(
                pb::GetStatementRequest { user_id: "zed".into(), currency: "USD".into(), ..Default::default() },
                token,
            ))
            .await
            .map(|_| ()),
        other => panic!("no case for {other}"),
    };
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

const MATRIX: &[(&str, &str)] = &[
    ("Accounts/UpsertAccount", "accounts:admin"),
    ("Accounts/FreezeAccount", "accounts:admin"),
    ("Accounts/UnfreezeAccount", "accounts:admin"),
    ("Ledger/CreateLedgerAccount", "ledger:write"),
    ("Ledger/PostEntry", "ledger:write"),
    ("Ledger/GetLedgerBalance", "ledger:read"),
    ("Ledger/ListEntries", "ledger:read"),
    ("PaymentMethods/ListPaymentMethods", "methods:write"),
    ("Payments/SendPayment", "payments:write"),
    ("Payments/RequestPayment", "payments:write"),
    ("Payments/ListPayments", "payments:read"),
    ("Payments/GetBalance", "payments:read"),
    ("Finance/GetTrialBalance", "finance"),
    ("Finance/VerifyLedger", "finance"),
    ("Finance/GetStatement", "finance"),
];

const ALL_SCOPES: &[&str] = &[
    "accounts:admin",
    "ledger:write",
    "ledger:read",
    "methods:write",
    "payments:write",
    "payments:read",
    "payments:watch_all",
    "finance",
];

async fn every_rpc_needs_its_scope(app: TestApp) {
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "zed", "100.00").await;
    for (rpc, needed) in MATRIX {
        // Every scope but the one it needs: refused, and nothing done.
        let others: Vec<&str> = ALL_SCOPES.iter().copied().filter(|s| s != needed).collect();
        let token = app.token("zed", &others.join(" "));
        assert_eq!(call(&app, rpc, &token).await, Code::PermissionDenied, "{rpc} without {needed}");
        // With it: allowed.
        let token = app.token("zed", needed);
        let code = call(&app, rpc, &token).await;
        assert_ne!(code, Code::PermissionDenied, "{rpc} with {needed}");
        assert_ne!(code, Code::Unauthenticated, "{rpc} with {needed}");
        assert_ne!(code, Code::Internal, "{rpc} with {needed}");
    }
    // Expired and tampered tokens are UNAUTHENTICATED everywhere.
    let good = app.token("zed", &ALL_SCOPES.join(" "));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    for (rpc, _) in MATRIX {
        assert_eq!(call(&app, rpc, &tampered).await, Code::Unauthenticated, "{rpc} with a tampered token");
    }
}

async fn others_resources_are_not_found(app: TestApp) {
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let mallory = app.token("mallory", PAY_SCOPES);
    let p = app.send(&alice, "acl-1", "bob", "5.00", pb::FundingSource::Balance).await.unwrap();
    let req = app
        .payments()
        .request_payment(authed(
            pb::RequestPaymentRequest {
                idempotency_key: "acl-r".into(),
                payer_id: "bob".into(),
                amount: usd("1.00"),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let pm = app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let mut c = app.payments();
    let checks = [
        c.get_payment(authed(pb::GetPaymentRequest { payment_id: p.payment_id.clone() }, &mallory)).await.map(|_| ()),
        c.get_payment(authed(pb::GetPaymentRequest { payment_id: "pay_missing".into() }, &mallory)).await.map(|_| ()),
        c.get_payment_request(authed(pb::GetPaymentRequestRequest { request_id: req.request_id.clone() }, &mallory))
            .await
            .map(|_| ()),
        c.pay_request(authed(
            pb::PayRequestRequest {
                request_id: req.request_id.clone(),
                idempotency_key: "m".into(),
                ..Default::default()
            },
            &mallory,
        ))
        .await
        .map(|_| ()),
        c.refund_payment(authed(
            pb::RefundPaymentRequest {
                payment_id: p.payment_id.clone(),
                idempotency_key: "m".into(),
                ..Default::default()
            },
            &mallory,
        ))
        .await
        .map(|_| ()),
        c.send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "m".into(),
                recipient_id: "bob".into(),
                amount: usd("1.00"),
                funding_source: 2,
                payment_method_token: pm.token.clone(),
                ..Default::default()
            },
            &mallory,
        ))
        .await
        .map(|_| ()),
    ];
    for (i, r) in checks.into_iter().enumerate() {
        assert_eq!(r.unwrap_err().code(), Code::NotFound, "check {i}");
    }
    // A user token without watch_all sees only its own events.
    let mut stream = app
        .payments()
        .watch_payments(authed(pb::WatchPaymentsRequest::default(), &mallory))
        .await
        .unwrap()
        .into_inner();
    assert!(tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await.is_err());
}

backend_tests!(every_rpc_needs_its_scope, others_resources_are_not_found);
