//! Reaching the server from every client, through the real server: the Connect
//! protocol with JSON (what `curl` and browsers send), gRPC-Web over HTTP/1.1, CORS,
//! both reflection versions with the error-detail descriptors, `ListBills`, and the
//! `dmpay` client commands walking the README's DM story.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

use crate::helpers::*;
use crate::{backend_fn_tests, backend_tests};

/// An HTTP/1.1 answer: status, headers (lower-case names) and the body, de-chunked.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on its own connection (`connection: close`), read to the end.
async fn http1(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.expect("answer in time").unwrap();
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Answer { status, headers, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// A Connect unary JSON call.
async fn connect_json(app: &TestApp, path: &str, token: Option<&str>, body: serde_json::Value) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    http1(app.addr, "POST", path, &headers, body.to_string().as_bytes()).await
}

/// A length-prefixed message: gRPC's frame, gRPC-Web's and Connect's envelope.
fn frame(flags: u8, msg: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Splits a body into its frames: (flags, message).
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}

/// curl's view: accounts, a send and its errors as JSON, each with the right HTTP status
/// and Connect code, the field at fault named in the decoded details.
async fn connect_json_calls_the_services(app: TestApp) {
    let admin = app.token("ops", "accounts:admin");
    for user in ["alice", "bob"] {
        let a = connect_json(
            &app,
            "/dmpay.v1.Accounts/UpsertAccount",
            Some(&admin),
            serde_json::json!({"user_id": user, "display_name": user, "tier": "TIER_VERIFIED"}),
        )
        .await;
        assert_eq!((a.status, a.header("content-type")), (200, Some("application/json")));
        assert_eq!(a.json()["user_id"], user);
        assert_eq!(a.json()["tier"], "TIER_VERIFIED");
    }
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "50.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let sent = connect_json(
        &app,
        "/dmpay.v1.Payments/SendPayment",
        Some(&alice),
        serde_json::json!({
            "idempotency_key": "curl-1", "recipient_id": "bob",
            "amount": {"currency": "USD", "amount": "12.50"}, "funding_source": "FUNDING_SOURCE_BALANCE",
        }),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", String::from_utf8_lossy(&sent.body));
    assert_eq!(sent.json()["status"], "PAYMENT_STATUS_SETTLED");
    assert_eq!(sent.json()["amount"]["amount"], "12.50");
    // The camelCase names of the proto3 JSON mapping are accepted too; a retry answers
    // the same payment.
    let again = connect_json(
        &app,
        "/dmpay.v1.Payments/SendPayment",
        Some(&alice),
        serde_json::json!({
            "idempotencyKey": "curl-1", "recipientId": "bob",
            "amount": {"currency": "USD", "amount": "12.50"}, "fundingSource": "FUNDING_SOURCE_BALANCE",
        }),
    )
    .await;
    assert_eq!(again.json()["payment_id"], sent.json()["payment_id"]);
    assert_eq!(amt(&app.wallet("bob").await.available), "12.50");

    // The caller's mistakes: each a Connect error with the field named.
    let bad = connect_json(
        &app,
        "/dmpay.v1.Payments/SendPayment",
        Some(&alice),
        serde_json::json!({"idempotency_key": "curl-2", "recipient_id": "bob", "amount": {"currency": "USD", "amount": "-1"}}),
    )
    .await;
    assert_eq!(bad.status, 400);
    let j = bad.json();
    assert_eq!(j["code"], "invalid_argument");
    let detail = j["details"].as_array().unwrap().iter().find(|d| d["type"] == "google.rpc.BadRequest").unwrap();
    assert_eq!(detail["debug"]["field_violations"][0]["field"], "amount.amount", "{j}");
    assert!(detail["value"].as_str().is_some_and(|v| !v.is_empty()), "the encoded detail too");

    let unknown_field =
        connect_json(&app, "/dmpay.v1.Payments/GetBalance", Some(&alice), serde_json::json!({"currencyy": "USD"}))
            .await;
    assert_eq!((unknown_field.status, unknown_field.json()["code"].as_str()), (400, Some("invalid_argument")));
    assert!(unknown_field.json()["message"].as_str().unwrap().contains("currencyy"));
    let not_json =
        http1(app.addr, "POST", "/dmpay.v1.Payments/GetBalance", &[("content-type", "application/json")], b"{not json")
            .await;
    assert_eq!(not_json.status, 400);
    let anonymous = connect_json(&app, "/dmpay.v1.Payments/GetBalance", None, serde_json::json!({})).await;
    assert_eq!((anonymous.status, anonymous.json()["code"].as_str()), (401, Some("unauthenticated")));
    let no_method = connect_json(&app, "/dmpay.v1.Payments/Nope", Some(&alice), serde_json::json!({})).await;
    assert_eq!((no_method.status, no_method.json()["code"].as_str()), (501, Some("unimplemented")));
    let stream_as_unary =
        connect_json(&app, "/dmpay.v1.Payments/WatchPayments", Some(&alice), serde_json::json!({})).await;
    assert_eq!(stream_as_unary.status, 501);
    let huge = "x".repeat(app.config.grpc_message_size_max + 1);
    let too_big =
        connect_json(&app, "/dmpay.v1.Payments/GetBalance", Some(&alice), serde_json::json!({"currency": huge})).await;
    assert_eq!((too_big.status, too_big.json()["code"].as_str()), (429, Some("resource_exhausted")));
    assert_eq!(app.count("payments").await, 1, "only the one good send wrote anything");
    assert_books_balance(&app).await;
}

/// A server stream over Connect: WatchPayments as JSON envelopes, live.
async fn connect_streams_watch_payments(app: TestApp) {
    app.users(&["alice", "bob"]).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "20.00").await;
    let bob = app.token("bob", PAY_SCOPES);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let body = frame(0, br#"{"after_sequence": "0"}"#);
    let head = format!(
        "POST /dmpay.v1.Payments/WatchPayments HTTP/1.1\r\nhost: x\r\ncontent-type: application/connect+json\r\n\
         authorization: Bearer {bob}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let alice = app.token("alice", PAY_SCOPES);
    app.send(&alice, "live", "bob", "3.00", pb::FundingSource::Balance).await.unwrap();
    // Read until the settled payment's envelope has arrived.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
            if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let a = parse_answer(&raw);
                let head = String::from_utf8_lossy(&raw[..split]).to_string();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                assert_eq!(a.header("content-type"), Some("application/connect+json"));
                // The body so far, without its last (maybe partial) chunk's framing.
                let events: Vec<serde_json::Value> = frames(&dechunk(&raw[split + 4..]))
                    .into_iter()
                    .filter(|(flags, _)| *flags == 0)
                    .map(|(_, m)| serde_json::from_slice(&m).unwrap())
                    .collect();
                if let Some(e) = events.iter().find(|e| e["type"] == "PAYMENT_EVENT_TYPE_PAYMENT_SETTLED") {
                    return e.clone();
                }
            }
        }
    })
    .await
    .expect("the settled event in time");
    assert_eq!(found["payment"]["amount"]["amount"], "3.00");
    assert_eq!(found["payment"]["sender_id"], "alice");

    // A refused stream ends with Connect's end-of-stream envelope carrying the error.
    let refused = http1(
        app.addr,
        "POST",
        "/dmpay.v1.Payments/WatchPayments",
        &[("content-type", "application/connect+json"), ("authorization", "Bearer nope")],
        &frame(0, b"{}"),
    )
    .await;
    let end = frames(&refused.body);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].0, 2, "the end-of-stream flag");
    let j: serde_json::Value = serde_json::from_slice(&end[0].1).unwrap();
    assert_eq!(j["error"]["code"], "unauthenticated");
}

/// A Connect stream whose client goes away frees its watcher's place, also when no
/// event comes: five streams (the per-caller cap) opened and dropped, then a sixth is
/// admitted.
async fn a_dropped_connect_stream_frees_its_place(app: TestApp) {
    app.users(&["carol"]).await;
    let carol = app.token("carol", PAY_SCOPES);
    let open = || async {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        let body = frame(0, b"{}");
        let head = format!(
            "POST /dmpay.v1.Payments/WatchPayments HTTP/1.1\r\nhost: x\r\ncontent-type: application/connect+json\r\n\
             authorization: Bearer {carol}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        stream
    };
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(open().await);
    }
    let watch = || {
        let mut c = app.payments();
        let t = carol.clone();
        async move { c.watch_payments(authed(pb::WatchPaymentsRequest::default(), &t)).await.map(|r| r.into_inner()) }
    };
    let refused = watch().await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "the cap holds: {refused:?}");
    drop(streams);
    let mut admitted = false;
    for _ in 0..100 {
        if watch().await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the dropped streams still hold their places");
}

/// gRPC-Web over HTTP/1.1 (what browsers send): a message frame, then the trailers as a
/// frame of their own; a refusal from the headers alone still reads the body first.
async fn grpc_web_over_http1(app: TestApp) {
    app.users(&["alice"]).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "7.00").await;
    let alice = format!("Bearer {}", app.token("alice", PAY_SCOPES));
    let msg = pb::GetBalanceRequest { currency: "USD".into() }.encode_to_vec();
    let a = http1(
        app.addr,
        "POST",
        "/dmpay.v1.Payments/GetBalance",
        &[("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1"), ("authorization", &alice)],
        &frame(0, &msg),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.header("content-type").unwrap().starts_with("application/grpc-web"));
    let parts = frames(&a.body);
    let balance = pb::Balance::decode(parts[0].1.as_slice()).unwrap();
    assert_eq!(amt(&balance.available), "7.00");
    let trailers = String::from_utf8_lossy(&parts.iter().find(|(f, _)| f & 0x80 != 0).unwrap().1).to_string();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    let refused = http1(
        app.addr,
        "POST",
        "/dmpay.v1.Payments/GetBalance",
        &[("content-type", "application/grpc-web+proto"), ("authorization", "Bearer nope")],
        &frame(0, &msg),
    )
    .await;
    let status = refused
        .header("grpc-status")
        .map(str::to_owned)
        .or_else(|| {
            frames(&refused.body).into_iter().find(|(f, _)| f & 0x80 != 0).map(|(_, t)| {
                String::from_utf8_lossy(&t)
                    .lines()
                    .find_map(|l| l.strip_prefix("grpc-status:").map(str::to_owned))
                    .unwrap()
            })
        })
        .unwrap();
    assert_eq!(status.trim(), (Code::Unauthenticated as i32).to_string());
}

/// Browsers call only from the configured origins.
async fn cors_allows_only_the_configured_origins(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_CORS_ORIGINS", "https://chat.example.com")]).await else {
        return;
    };
    let preflight = |origin: &'static str| {
        let addr = app.addr;
        async move {
            http1(
                addr,
                "OPTIONS",
                "/dmpay.v1.Payments/SendPayment",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "authorization,content-type,x-grpc-web"),
                ],
                b"",
            )
            .await
        }
    };
    let ok = preflight("https://chat.example.com").await;
    assert_eq!(ok.header("access-control-allow-origin"), Some("https://chat.example.com"));
    assert!(ok.header("access-control-allow-headers").unwrap().contains("authorization"));
    let evil = preflight("https://evil.example.net").await;
    assert_eq!(evil.header("access-control-allow-origin"), None);
    app.stop().await;
    // None by default.
    let Some(plain) = TestApp::spawn(backend).await else { return };
    let a = http1(
        plain.addr,
        "OPTIONS",
        "/dmpay.v1.Payments/SendPayment",
        &[("origin", "https://chat.example.com"), ("access-control-request-method", "POST")],
        b"",
    )
    .await;
    assert_eq!(a.header("access-control-allow-origin"), None);
    plain.stop().await;
}

/// grpcurl before 1.9 and grpcio-reflection speak v1alpha: both versions list every
/// service and serve the google.rpc error details' file.
async fn reflection_speaks_both_versions(app: TestApp) {
    use tonic_reflection::pb::{v1, v1alpha};
    let list = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let mut answers = client.server_reflection_info(tokio_stream::iter(vec![list])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(services)) =
        answer.message_response
    else {
        panic!("{answer:?}")
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    for s in ["dmpay.v1.Payments", "dmpay.v1.Shopping", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == s), "{s} in {names:?}");
    }
    let by_symbol = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "google.rpc.BadRequest".into(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let mut answers = client.server_reflection_info(tokio_stream::iter(vec![by_symbol])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    assert!(
        matches!(
            answer.message_response,
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
        ),
        "{answer:?}"
    );
}

/// ListBills: as payer (the default) or requester, open only, paged.
async fn bills_list_by_role(app: TestApp) {
    app.users(&["alice", "bob"]).await;
    let bob = app.token("bob", PAY_SCOPES);
    let mut ids = Vec::new();
    for i in 0..3 {
        let b = app
            .payments()
            .request_payment(authed(
                pb::RequestPaymentRequest {
                    idempotency_key: format!("r{i}"),
                    payer_id: "alice".into(),
                    amount: usd("1.00"),
                    ..Default::default()
                },
                &bob,
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(b.bill_id);
    }
    let alice = app.token("alice", PAY_SCOPES);
    app.payments().decline_bill(authed(pb::DeclineBillRequest { bill_id: ids[0].clone() }, &alice)).await.unwrap();
    let list = |token: String, role: pb::BillRole, open_only: bool, page_size: u32, page_token: String| {
        let mut c = app.payments();
        async move {
            c.list_bills(authed(pb::ListBillsRequest { role: role as i32, open_only, page_size, page_token }, &token))
                .await
                .map(|r| r.into_inner())
        }
    };
    let to_pay = list(alice.clone(), pb::BillRole::Unspecified, false, 0, String::new()).await.unwrap();
    let got: Vec<&str> = to_pay.bills.iter().map(|b| b.bill_id.as_str()).collect();
    assert_eq!(got, [&ids[2], &ids[1], &ids[0]], "newest first");
    let open = list(alice.clone(), pb::BillRole::Payer, true, 0, String::new()).await.unwrap();
    assert_eq!(open.bills.len(), 2, "the declined one is not open");
    let first = list(alice.clone(), pb::BillRole::Payer, false, 2, String::new()).await.unwrap();
    assert_eq!(first.bills.len(), 2);
    let rest = list(alice.clone(), pb::BillRole::Payer, false, 2, first.next_page_token).await.unwrap();
    assert_eq!((rest.bills.len(), rest.next_page_token.as_str()), (1, ""));
    assert!(list(bob.clone(), pb::BillRole::Payer, false, 0, String::new()).await.unwrap().bills.is_empty());
    assert_eq!(list(bob.clone(), pb::BillRole::Requester, false, 0, String::new()).await.unwrap().bills.len(), 3);
    let bad = list(bob, pb::BillRole::Payer, false, 0, "garbage".into()).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let bad_role = app
        .payments()
        .list_bills(authed(pb::ListBillsRequest { role: 9, ..Default::default() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(bad_role.code(), Code::InvalidArgument);
}

/// Runs `dmpay` with `args` against the app, as the README's walk-through does.
async fn dmpay(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DMPAY_ENV", "development")
        .env("DMPAY_ADDR", app.addr.to_string())
        .output()
        .await
        .expect("run dmpay");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn ok(app: &TestApp, args: &[&str]) -> String {
    let (success, out, err) = dmpay(app, args).await;
    assert!(success, "dmpay {args:?} failed: {err}{out}");
    out
}

/// The first word of the output's line that starts with `prefix`.
fn id_in(out: &str, prefix: &str) -> String {
    out.split_whitespace().find(|w| w.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in {out}")).to_owned()
}

/// The README's "Calling it", through the `dmpay` client commands: accounts, a card,
/// a send, a request paid with one tap, a refund, balances, the list and the watch.
async fn the_cli_walks_a_dm_story(app: TestApp) {
    ok(&app, &["accounts", "upsert", "alice", "--name", "Alice", "--tier", "verified"]).await;
    let bob = ok(&app, &["accounts", "upsert", "bob", "--name", "Bob"]).await;
    assert!(bob.contains("bob") && bob.contains("unverified"), "{bob}");
    assert!(ok(&app, &["accounts", "get", "alice"]).await.contains("verified"));
    let card = ok(
        &app,
        &[
            "cards",
            "add",
            "--user",
            "alice",
            "--number",
            "4242424242424242",
            "--exp",
            "12/34",
            "--cvc",
            "123",
            "--default",
        ],
    )
    .await;
    assert!(card.contains("ending 4242") && card.contains("default"), "{card}");
    assert!(ok(&app, &["cards", "list", "--user", "alice"]).await.contains("4242"));

    let sent = ok(&app, &["pay", "send", "--user", "alice", "--to", "bob", "12.50", "--note", "lunch"]).await;
    assert!(sent.contains("12.50 USD") && sent.contains("settled"), "{sent}");
    let payment = id_in(&sent, "pay_");
    let asked = ok(&app, &["pay", "request", "--user", "bob", "--from", "alice", "7.25", "--note", "tickets"]).await;
    let bill = id_in(&asked, "req_");
    let open = ok(&app, &["pay", "requests", "--user", "alice", "--open"]).await;
    assert!(open.contains(&bill) && open.contains("open"), "{open}");
    let paid = ok(&app, &["pay", "accept", "--user", "alice", &bill]).await;
    assert!(paid.contains("7.25 USD") && paid.contains("settled"), "{paid}");
    let refunded = ok(&app, &["pay", "refund", "--user", "bob", &payment, "2.50", "--reason", "change"]).await;
    assert!(refunded.contains("refunded 2.50 USD"), "{refunded}");
    let balance = ok(&app, &["pay", "balance", "--user", "bob"]).await;
    assert!(balance.starts_with("17.25 USD available"), "12.50 + 7.25 - 2.50: {balance}");
    let list = ok(&app, &["pay", "list", "--user", "alice"]).await;
    assert_eq!(list.lines().count(), 2, "{list}");
    let watch = ok(&app, &["pay", "watch", "--user", "bob", "--count", "3"]).await;
    assert_eq!(watch.lines().count(), 3, "{watch}");
    // The card-funded send: recorded while the card is charged, then settled.
    assert!(watch.lines().next().unwrap().contains("payment_created"), "{watch}");
    assert!(watch.lines().nth(1).unwrap().contains("payment_settled"), "{watch}");

    // Mistakes read as such: the field named, the address and its setting named.
    let (success, _, err) = dmpay(&app, &["pay", "send", "--user", "alice", "--to", "bob", "1.001"]).await;
    assert!(!success && err.contains("InvalidArgument") && err.contains("field amount.amount"), "{err}");
    let (success, _, err) = dmpay(&app, &["pay", "balance", "--user", "bob", "--addr", "127.0.0.1:1"]).await;
    assert!(!success && err.contains("http://127.0.0.1:1") && err.contains("DMPAY_ADDR"), "{err}");
    let (success, _, err) = dmpay(&app, &["pay", "balance"]).await;
    assert!(!success && err.contains("--user"), "{err}");
    assert_books_balance(&app).await;
}

/// The code blocks of the README's "Calling it" in `lang`, in order.
fn readme_blocks(lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Calling it").nth(1).unwrap().split("\n## ").next().unwrap();
    let fence = format!("```{lang}\n");
    section.split(&fence).skip(1).map(|b| b.split("```").next().unwrap().to_owned()).collect()
}

/// Runs a README block with bash against the app, `dmpay` on the PATH.
async fn run_block(app: &TestApp, block: &str) -> String {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_dmpay")).parent().unwrap().display().to_string();
    // The server the README starts with `make run` is this test's; `make install` is
    // the test binary's directory on the PATH.
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("make "))
        .map(|l| l.replace("127.0.0.1:50051", &app.addr.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default()))
        .env("DMPAY_ADDR", app.addr.to_string())
        .env_remove("DMPAY_TOKEN")
        .env_remove("DMPAY_USER")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{script}\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The README's walk-through as printed: the CLI story, then the curl calls.
async fn the_readme_walk_through_runs_as_printed(app: TestApp) {
    let sh = readme_blocks("sh");
    // One shell session, as a reader's terminal: the story's exports hold for the curl
    // calls.
    let out = run_block(&app, &format!("{}\necho '--- curl'\n{}", sh[0], sh[1])).await;
    let (story, curl) = out.split_once("--- curl\n").unwrap();
    let lines: Vec<&str> = story.lines().collect();
    assert_eq!(lines.len(), 14, "{story}");
    assert!(lines[6].starts_with("17.25 USD available"), "{story}");
    assert!(lines[5].contains("partially_refunded  (refunded 2.50 USD)"), "{story}");
    assert!(lines[13].contains("payment_settled") && lines[13].contains("7.25 USD"), "{story}");
    // The printed output is what the commands print, but for the ids.
    let printed = &readme_blocks("text")[0];
    let shape =
        |l: &str| l.split_whitespace().filter(|w| !w.contains('_') || w.len() < 12).collect::<Vec<_>>().join(" ");
    let want: Vec<String> = printed.lines().map(shape).collect();
    let got: Vec<String> = lines.iter().map(|l| shape(l)).collect();
    assert_eq!(got, want);
    assert!(curl.contains("PAYMENT_STATUS_SETTLED") && curl.contains("\"code\":\"invalid_argument\""), "{curl}");
    assert!(curl.contains("\"field\":\"amount.amount\""), "{curl}");
}

fn amt(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

backend_tests!(
    connect_json_calls_the_services,
    connect_streams_watch_payments,
    grpc_web_over_http1,
    a_dropped_connect_stream_frees_its_place,
    reflection_speaks_both_versions,
    bills_list_by_role,
    the_cli_walks_a_dm_story,
    the_readme_walk_through_runs_as_printed,
);
backend_fn_tests!(cors_allows_only_the_configured_origins);
