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
    "ledger:wallet_debit",
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
    app.users(CAST).await;
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
        c.get_bill(authed(pb::GetBillRequest { bill_id: req.bill_id.clone() }, &mallory)).await.map(|_| ()),
        c.pay_bill(authed(
            pb::PayBillRequest { bill_id: req.bill_id.clone(), idempotency_key: "m".into(), ..Default::default() },
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

// ---------------------------------------------------------------------------------------
// Every RPC, table-driven from `raw::RPCS` (which `hostile::every_rpc_is_listed` checks
// against the proto): bad tokens, each missing scope, other users' resources, watch_all.
// ---------------------------------------------------------------------------------------

mod every_rpc {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use prost::bytes::Bytes;
    use prost::Message;
    use serde_json::json;
    use tonic::Code;

    use crate::backend_tests;
    use crate::helpers::*;
    use crate::raw::{self, call_raw, Rpc, ALL_SCOPES, RPCS};

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({"sub": sub, "scope": ALL_SCOPES.join(" "), "iss": "dmpay-dev", "aud": "dmpay",
               "iat": now(), "nbf": now() - 10, "exp": now() + 600})
    }

    /// Tokens that must never get past authentication, each carrying every scope.
    fn bad_tokens() -> Vec<(&'static str, Option<String>)> {
        let dev = dmpay::config::DEV_JWT_SECRET.as_bytes();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let good = sign(&claims("alice"), dev);
        let parts: Vec<&str> = good.split('.').collect();
        let mut expired = claims("alice");
        expired["exp"] = json!(now() - 3600);
        expired["iat"] = json!(now() - 7200);
        expired["nbf"] = json!(now() - 7200);
        let mut early = claims("alice");
        early["nbf"] = json!(now() + 3600);
        let mut other_iss = claims("alice");
        other_iss["iss"] = json!("someone-else");
        let mut other_aud = claims("alice");
        other_aud["aud"] = json!("another-service");
        // A payload naming another user under the original signature.
        let swapped = format!("{}.{}.{}", parts[0], b64.encode(claims("mallory").to_string()), parts[2]);
        // One flipped character in the signature.
        let mut sig = parts[2].to_owned();
        let flipped = if sig.ends_with('A') { 'B' } else { 'A' };
        sig.pop();
        sig.push(flipped);
        let bad_sig = format!("{}.{}.{sig}", parts[0], parts[1]);
        let alg_none = format!("{}.{}.", b64.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        vec![
            ("no token", None),
            ("expired", Some(sign(&expired, dev))),
            ("not yet valid", Some(sign(&early, dev))),
            ("other issuer", Some(sign(&other_iss, dev))),
            ("other audience", Some(sign(&other_aud, dev))),
            ("payload swapped", Some(swapped)),
            ("signature flipped", Some(bad_sig)),
            ("truncated", Some(format!("{}.{}", parts[0], parts[1]))),
            ("wrong secret", Some(sign(&claims("alice"), b"a-guessed-secret"))),
            ("alg none", Some(alg_none)),
            ("garbage", Some("not.a.jwt".into())),
        ]
    }

    /// Calls `rpc` with a default (empty) request and returns its status (OK for success).
    async fn call(app: &TestApp, rpc: Rpc, body: Vec<u8>, token: Option<&str>) -> tonic::Status {
        match call_raw(&app.channel, rpc, Bytes::from(body), token).await {
            Ok(_) => tonic::Status::ok(""),
            Err(s) => s,
        }
    }

    async fn bad_tokens_are_unauthenticated_everywhere(app: TestApp) {
        let tokens = bad_tokens();
        for rpc in RPCS {
            for (name, token) in &tokens {
                let status = call(&app, *rpc, Vec::new(), token.as_deref()).await;
                assert_eq!(status.code(), Code::Unauthenticated, "{} with a {name} token: {status:?}", rpc.path);
                // The answer says what is wrong with the token, nothing about the RPC.
                assert!(!status.message().contains("internal"), "{}: {status:?}", rpc.path);
            }
        }
        // Nothing got through: no account, entry or payment was written.
        assert_eq!(app.count("payments").await, 0);
        assert_eq!(app.count("ledger_entries").await, 0);
    }

    /// The scopes that admit a caller to `rpc`: its own, and for WatchPayments also
    /// `payments:watch_all` (a service watching everyone needs no user scope).
    fn admitting(rpc: &Rpc) -> Vec<&'static str> {
        match (rpc.path, rpc.scope) {
            ("/dmpay.v1.Payments/WatchPayments", Some(s)) => vec![s, "payments:watch_all"],
            // The platform's stream service acts for any seller; a buyer's tap is theirs.
            (p, Some(s))
                if p.starts_with("/dmpay.v1.Shopping/")
                    && s != "shopping:admin"
                    && !p.ends_with("/Purchase")
                    && !p.ends_with("/OpenTab") =>
            {
                vec![s, "shopping:admin"]
            }
            (_, Some(s)) => vec![s],
            (_, None) => vec![],
        }
    }

    /// Each RPC with every scope but the ones that admit it is PERMISSION_DENIED, before
    /// it even looks at the (empty) request; with only its scope it gets past the check.
    async fn each_missing_scope_is_permission_denied(app: TestApp) {
        for rpc in RPCS {
            let admitting = admitting(rpc);
            if admitting.is_empty() {
                continue;
            }
            let others: Vec<&str> = ALL_SCOPES.iter().copied().filter(|s| !admitting.contains(s)).collect();
            let token = app.token("zed", &others.join(" "));
            let status = call(&app, *rpc, Vec::new(), Some(&token)).await;
            assert_eq!(status.code(), Code::PermissionDenied, "{} without {admitting:?}: {status:?}", rpc.path);
            assert!(status.message().contains(admitting[0]), "{}: {status:?}", rpc.path);
            // No scope at all: the same.
            let token = app.token("zed", "");
            let status = call(&app, *rpc, Vec::new(), Some(&token)).await;
            assert_eq!(status.code(), Code::PermissionDenied, "{} with no scope: {status:?}", rpc.path);
            for scope in admitting {
                let token = app.token("zed", scope);
                let status = call(&app, *rpc, Vec::new(), Some(&token)).await;
                assert!(
                    !matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated | Code::Internal),
                    "{} with {scope}: {status:?}",
                    rpc.path
                );
            }
        }
        assert_eq!(app.count("payments").await, 0);
    }

    /// The same id with its last character changed: the shape of a real one, naming nothing.
    fn missing(id: &str) -> String {
        let mut s = id.to_owned();
        let last = s.pop().unwrap();
        s.push(if last == '0' { '1' } else { '0' });
        s
    }

    /// Another user's payment, request or card answers exactly as a missing one: the
    /// same code (NOT_FOUND) and the same message once the id is blanked out.
    async fn others_resources_answer_like_missing_ones(app: TestApp) {
        app.users(CAST).await;
        app.users(&["mallory"]).await;
        let treasury = app.token("treasury", LEDGER_SCOPES);
        fund(&app, &treasury, "alice", "100.00").await;
        let alice = app.token("alice", PAY_SCOPES);
        let mallory = app.token("mallory", PAY_SCOPES);
        let payment = app.send(&alice, "own-1", "bob", "5.00", pb::FundingSource::Balance).await.unwrap().payment_id;
        let request = |payer: &'static str, key: &'static str| {
            let app = &app;
            let alice = alice.clone();
            async move {
                app.payments()
                    .request_payment(authed(
                        pb::RequestPaymentRequest {
                            idempotency_key: key.into(),
                            payer_id: payer.into(),
                            amount: usd("1.00"),
                            ..Default::default()
                        },
                        &alice,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .bill_id
            }
        };
        let to_bob = request("bob", "own-r1").await;
        let to_mallory = request("mallory", "own-r2").await;
        let linked = app.add_card(&alice, "4242424242424242", true).await.unwrap().token;
        let unlinked = app.tokenize(&alice, "5555555555554444").await.unwrap().token;

        // (rpc, request with alice's id, the same request with a missing id)
        type Build = Box<dyn Fn(&str) -> Vec<u8>>;
        let cases: Vec<(&str, String, Build)> = vec![
            (
                "/dmpay.v1.Payments/GetPayment",
                payment.clone(),
                Box::new(|id| pb::GetPaymentRequest { payment_id: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.Payments/RefundPayment",
                payment.clone(),
                Box::new(|id| {
                    pb::RefundPaymentRequest {
                        payment_id: id.into(),
                        idempotency_key: "m".into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                }),
            ),
            (
                "/dmpay.v1.Payments/GetBill",
                to_bob.clone(),
                Box::new(|id| pb::GetBillRequest { bill_id: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.Payments/PayBill",
                to_bob.clone(),
                Box::new(|id| {
                    pb::PayBillRequest { bill_id: id.into(), idempotency_key: "m".into(), ..Default::default() }
                        .encode_to_vec()
                }),
            ),
            (
                "/dmpay.v1.Payments/DeclineBill",
                to_bob.clone(),
                Box::new(|id| pb::DeclineBillRequest { bill_id: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.Payments/CancelBill",
                to_bob.clone(),
                Box::new(|id| pb::CancelBillRequest { bill_id: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.PaymentMethods/LinkPaymentMethod",
                unlinked.clone(),
                Box::new(|id| pb::LinkPaymentMethodRequest { token: id.into(), make_default: true }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.PaymentMethods/SetDefaultPaymentMethod",
                linked.clone(),
                Box::new(|id| pb::SetDefaultPaymentMethodRequest { token: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.PaymentMethods/RemovePaymentMethod",
                linked.clone(),
                Box::new(|id| pb::RemovePaymentMethodRequest { token: id.into() }.encode_to_vec()),
            ),
            (
                "/dmpay.v1.Payments/SendPayment",
                linked.clone(),
                Box::new(|id| {
                    pb::SendPaymentRequest {
                        idempotency_key: format!("m-{id}"),
                        recipient_id: "bob".into(),
                        amount: usd("1.00"),
                        funding_source: pb::FundingSource::Card as i32,
                        payment_method_token: id.into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                }),
            ),
            (
                "/dmpay.v1.Payments/PayBill",
                linked.clone(),
                Box::new({
                    let to_mallory = to_mallory.clone();
                    move |id| {
                        pb::PayBillRequest {
                            bill_id: to_mallory.clone(),
                            idempotency_key: format!("m-{id}"),
                            funding_source: pb::FundingSource::Card as i32,
                            payment_method_token: id.into(),
                        }
                        .encode_to_vec()
                    }
                }),
            ),
        ];
        for (path, theirs, build) in &cases {
            let rpc = raw::find(path);
            let nothing = missing(theirs);
            let got = call(&app, rpc, build(theirs), Some(&mallory)).await;
            let absent = call(&app, rpc, build(&nothing), Some(&mallory)).await;
            assert_eq!(got.code(), Code::NotFound, "{path} on alice's {theirs}: {got:?}");
            assert_eq!(absent.code(), Code::NotFound, "{path} on missing {nothing}: {absent:?}");
            assert_eq!(
                got.message().replace(theirs.as_str(), "<id>"),
                absent.message().replace(nothing.as_str(), "<id>"),
                "{path}: the answers differ"
            );
            assert_eq!(got.details(), absent.details(), "{path}: the details differ");
        }
        // Nothing of alice's moved or changed.
        let p = app
            .payments()
            .get_payment(authed(pb::GetPaymentRequest { payment_id: payment.clone() }, &alice))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
        let r = app
            .payments()
            .get_bill(authed(pb::GetBillRequest { bill_id: to_bob.clone() }, &alice))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, pb::BillStatus::Open as i32);
        let methods = app
            .methods()
            .list_payment_methods(authed(pb::ListPaymentMethodsRequest { include_removed: true }, &alice))
            .await
            .unwrap()
            .into_inner()
            .payment_methods;
        let card = methods.iter().find(|m| m.token == linked).unwrap();
        assert!(card.is_default && card.status == pb::PaymentMethodStatus::Active as i32, "{card:?}");
        let pending = methods.iter().find(|m| m.token == unlinked).unwrap();
        assert_eq!(pending.status, pb::PaymentMethodStatus::Unlinked as i32);
        assert_eq!(app.wallet("mallory").await.posted.unwrap().amount, "0.00");

        // Mallory's own lists show nothing of alice's.
        let mine = app
            .payments()
            .list_payments(authed(pb::ListPaymentsRequest::default(), &mallory))
            .await
            .unwrap()
            .into_inner();
        assert!(mine.payments.iter().all(|p| p.sender_id == "mallory" || p.recipient_id == "mallory"), "{mine:?}");
        let cards = app
            .methods()
            .list_payment_methods(authed(pb::ListPaymentMethodsRequest { include_removed: true }, &mallory))
            .await
            .unwrap()
            .into_inner();
        assert!(cards.payment_methods.is_empty(), "{cards:?}");
        // Another user's account is refused alike whether or not it exists.
        let mut accounts = app.accounts();
        let existing = accounts
            .get_account(authed(pb::GetAccountRequest { user_id: "alice".into() }, &mallory))
            .await
            .unwrap_err();
        let absent = accounts
            .get_account(authed(pb::GetAccountRequest { user_id: "nobody-at-all".into() }, &mallory))
            .await
            .unwrap_err();
        assert_eq!(existing.code(), Code::PermissionDenied);
        assert_eq!((existing.code(), existing.message()), (absent.code(), absent.message()));
    }

    async fn next(s: &mut tonic::Streaming<pb::PaymentEvent>) -> pb::PaymentEvent {
        tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("an event")
            .expect("stream ok")
            .expect("stream open")
    }

    /// Watching: a user sees only their own events, a service token without
    /// `payments:watch_all` only its own (none of the users'), one with it everyone's.
    /// Each restricted watcher's first event is its own, made after everyone else's, so
    /// skipping the others is proved without waiting for silence.
    async fn only_watch_all_sees_other_users(app: TestApp) {
        app.users(CAST).await;
        let treasury = app.token("treasury", LEDGER_SCOPES);
        fund(&app, &treasury, "alice", "100.00").await;
        let alice = app.token("alice", PAY_SCOPES);
        for i in 0..3 {
            app.send(&alice, &format!("w-{i}"), "bob", "1.00", pb::FundingSource::Balance).await.unwrap();
        }
        let watch = |token: String| {
            let client = app.payments();
            async move {
                let mut c = client;
                c.watch_payments(authed(pb::WatchPaymentsRequest::default(), &token)).await.unwrap().into_inner()
            }
        };
        app.users(&["chat-svc", "mallory"]).await;
        let mut all = watch(app.token("chat-backend", "payments:watch_all")).await;
        let mut svc = watch(app.token("chat-svc", "payments:read")).await;
        let mut user = watch(app.token("mallory", "payments:read")).await;
        let first = next(&mut all).await;
        assert!(first.payment.as_ref().is_some_and(|p| p.sender_id == "alice"), "{first:?}");
        // Now something for each restricted watcher.
        app.send(&alice, "w-svc", "chat-svc", "0.50", pb::FundingSource::Balance).await.unwrap();
        app.send(&alice, "w-mallory", "mallory", "0.50", pb::FundingSource::Balance).await.unwrap();
        let e = next(&mut svc).await;
        assert_eq!(e.payment.as_ref().unwrap().recipient_id, "chat-svc", "the service saw another user's event: {e:?}");
        let e = next(&mut user).await;
        assert_eq!(e.payment.as_ref().unwrap().recipient_id, "mallory", "mallory saw another user's event: {e:?}");
        // Neither scope: refused.
        let err = app
            .payments()
            .watch_payments(authed(pb::WatchPaymentsRequest::default(), &app.token("chat-svc", "payments:write")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }

    backend_tests!(
        bad_tokens_are_unauthenticated_everywhere,
        each_missing_scope_is_permission_denied,
        others_resources_answer_like_missing_ones,
        only_watch_all_sees_other_users,
    );
}
