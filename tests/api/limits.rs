//! Limits, on both backends: a message over DMPAY_GRPC_MESSAGE_SIZE_MAX, more streams
//! than DMPAY_GRPC_CONCURRENT_STREAMS_MAX on one connection, a WatchPayments stream the
//! client never reads and huge tokens are each refused with a clear status, and a huge
//! id quoted back in an error stays small, while the server keeps answering everyone
//! else and its memory (this process's RSS, server included) stays bounded. (Tokens
//! just over 8 KiB are in `auth::token_matrix`.)

use std::time::Duration;

use prost::bytes::Bytes;
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::backend_tests;
use crate::helpers::*;
use crate::raw::{self, call_raw, ALL_SCOPES};

/// Resident memory of this process (server and test client together), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A generous ceiling: the suite's servers idle at a few tens of MiB.
const RSS_MAX_KIB: u64 = 1024 * 1024;

async fn connect(app: &TestApp) -> Channel {
    Endpoint::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.expect("connect")
}

async fn still_answers(app: &TestApp, channel: Channel) {
    let t = app.token("probe", "payments:read");
    pb::payments_client::PaymentsClient::new(channel)
        .get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &t))
        .await
        .expect("the server answers other calls");
}

/// Over the limit: RESOURCE_EXHAUSTED without reading the body, many times over on the
/// same connection, which keeps working; just under it the message is read and judged
/// on its fields.
async fn oversized_messages_are_resource_exhausted(app: TestApp) {
    let t = app.token("ops", &ALL_SCOPES.join(" "));
    let limit = app.config.grpc_message_size_max;
    let upsert = raw::find("/dmpay.v1.Accounts/UpsertAccount");
    let message = |size: usize| {
        let mut m = pb::UpsertAccountRequest { user_id: "big".into(), display_name: String::new(), tier: 0 };
        let overhead = m.encoded_len() + 2 + 4; // tag and a length varint of up to 4 bytes
        m.display_name = "x".repeat(size - overhead);
        let bytes = m.encode_to_vec();
        assert!(bytes.len() <= size && bytes.len() + 3 >= size, "{} for {size}", bytes.len());
        Bytes::from(bytes)
    };
    let before = rss_kib();
    let over = message(limit + 4);
    assert!(over.len() > limit);
    for i in 0..20 {
        let err = call_raw(&app.channel, upsert, over.clone(), Some(&t)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "attempt {i}: {err:?}");
        assert!(err.message().contains("too large"), "{err:?}");
        // The same connection goes on working between the refusals.
        still_answers(&app, app.channel.clone()).await;
    }
    // Far over it (16 MiB), from several clients at once.
    let huge = Bytes::from(vec![0x0a; 16 << 20]);
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let channel = app.channel.clone();
            let huge = huge.clone();
            let t = t.clone();
            tokio::spawn(async move { call_raw(&channel, upsert, huge, Some(&t)).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap_err().code(), Code::ResourceExhausted);
    }
    // At the limit the message is decoded: a display name that long is refused for
    // what it is.
    let at = message(limit);
    assert!(at.len() <= limit);
    let err = call_raw(&app.channel, upsert, at, Some(&t)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("display_name"), "{err:?}");
    still_answers(&app, connect(&app).await).await;
    let after = rss_kib();
    assert!(after < RSS_MAX_KIB, "RSS {before} KiB before, {after} KiB after");
}

/// A connection may hold DMPAY_GRPC_CONCURRENT_STREAMS_MAX streams. A client that
/// opens more anyway (raw HTTP/2, as no well-behaved client would) has the extra ones
/// refused with REFUSED_STREAM, which gRPC clients report as UNAVAILABLE and may retry;
/// its open streams, and other connections, are unaffected.
async fn streams_over_the_limit_are_refused(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_GRPC_CONCURRENT_STREAMS_MAX", "4")]).await else {
        return;
    };
    let t = app.token("watcher", "payments:read");
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    h2::handshake(&mut conn).await;
    // Six WatchPayments streams whose request body never ends: the first four are
    // admitted and stay open, the last two are refused.
    for i in 0..6u32 {
        h2::open_stream(&mut conn, 2 * i + 1, "/dmpay.v1.Payments/WatchPayments", &t).await;
    }
    let resets =
        h2::read_resets(&mut conn, Duration::from_secs(10), |r| r.contains_key(&9) && r.contains_key(&11)).await;
    assert_eq!(resets.get(&9), Some(&h2::REFUSED_STREAM), "{resets:?}");
    assert_eq!(resets.get(&11), Some(&h2::REFUSED_STREAM), "{resets:?}");
    for admitted in [1, 3, 5, 7] {
        assert!(!resets.contains_key(&admitted), "stream {admitted} was admitted: {resets:?}");
    }
    // Another connection is served meanwhile.
    still_answers(&app, connect(&app).await).await;

    // A well-behaved client over the limit: its extra calls wait for a free stream
    // instead of failing, and all complete.
    let channel = connect(&app).await;
    let mut watches = Vec::new();
    for _ in 0..4 {
        let s = pb::payments_client::PaymentsClient::new(channel.clone())
            .watch_payments(authed(pb::WatchPaymentsRequest::default(), &t))
            .await
            .expect("watch");
        watches.push(s.into_inner());
    }
    let queued = tokio::spawn(still_answers_owned(app.token("probe", "payments:read"), channel.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "a fifth stream on a connection limited to four ran at once");
    watches.pop();
    queued.await.unwrap();
    drop(conn);
}

async fn still_answers_owned(token: String, channel: Channel) {
    pb::payments_client::PaymentsClient::new(channel)
        .get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, &token))
        .await
        .expect("answers once a stream is free");
}

mod concurrent_streams {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::streams_over_the_limit_are_refused(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::streams_over_the_limit_are_refused(super::Backend::Postgres).await;
    }
}

/// Tokens far over the 8 KiB cap: refused as UNAUTHENTICATED (or, past what HTTP/2
/// lets a header list be, refused by the transport without harm), and the server keeps
/// answering on a fresh connection.
async fn huge_tokens_are_refused(app: TestApp) {
    let get = raw::find("/dmpay.v1.Accounts/GetAccount");
    let body = Bytes::from(pb::GetAccountRequest { user_id: "alice".into() }.encode_to_vec());
    let before = rss_kib();
    // Under HTTP/2's header-list limit (16 KiB): read, and refused by the 8 KiB cap.
    for size in [9 * 1024, 15 * 1024] {
        let token = "e".repeat(size);
        let err = call_raw(&app.channel, get, body.clone(), Some(&token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{size}-byte token: {err:?}");
    }
    // Over it: the transport refuses the header list (431, or GOAWAY ENHANCE_YOUR_CALM
    // for a flood of CONTINUATION frames) before any of it is buffered or parsed; the
    // client sees RESOURCE_EXHAUSTED, or a dropped connection if it was still writing.
    for size in [64 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
        let token = "e".repeat(size);
        let channel = connect(&app).await;
        let err = call_raw(&channel, get, body.clone(), Some(&token)).await.unwrap_err();
        let refused = matches!(err.code(), Code::Unauthenticated | Code::ResourceExhausted | Code::Unavailable)
            || (err.code() == Code::Unknown && err.message().contains("transport error"));
        assert!(refused, "{size}-byte token: {err:?}");
        still_answers(&app, connect(&app).await).await;
    }
    let after = rss_kib();
    assert!(after < RSS_MAX_KIB, "RSS {before} KiB before, {after} KiB after");
}

/// A WatchPayments consumer that never reads: the server stops feeding it once the
/// stream's buffers are full, disconnects it after 10 s without progress (docs/api.md: "one
/// that does not take an event for 10 s, is disconnected with RESOURCE_EXHAUSTED"), and
/// what the client finally reads is the events that were buffered, then
/// RESOURCE_EXHAUSTED naming the sequence to resume from; resuming there yields the
/// rest, none twice. Meanwhile other clients are served and memory stays bounded.
async fn a_watcher_that_never_reads_is_cut_off(app: TestApp) {
    app.users(CAST).await;
    const SENDS: usize = 600;
    let ledger_token = app.token("treasury", LEDGER_SCOPES);
    fund(&app, &ledger_token, "alice", "100.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    // 600 events (one per wallet payment) of about 800 bytes: well beyond what the
    // stream can buffer.
    let note = "n".repeat(280);
    let mut tasks = Vec::new();
    for w in 0..6 {
        let client = app.payments();
        let alice = alice.clone();
        let note = note.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            for i in (w..SENDS).step_by(6) {
                c.send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("slow-{i}"),
                        recipient_id: "bob".into(),
                        amount: usd("0.01"),
                        note: note.clone(),
                        conversation_id: format!("{i:0>128}"),
                        message_id: format!("{i:m>128}"),
                        funding_source: pb::FundingSource::Balance as i32,
                        ..Default::default()
                    },
                    &alice,
                ))
                .await
                .expect("send");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rss_before = rss_kib();

    // The watcher's connection grants the server a 1 KiB stream window and never reads.
    let slow = Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let backend = app.token("chat-backend", "payments:watch_all");
    let mut stream = pb::payments_client::PaymentsClient::new(slow)
        .watch_payments(authed(pb::WatchPaymentsRequest::default(), &backend))
        .await
        .expect("watch")
        .into_inner();
    // Others are served while it is stuck.
    for _ in 0..3 {
        still_answers(&app, connect(&app).await).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Past the server's patience (10 s without the client taking an event).
    tokio::time::sleep(Duration::from_secs(13)).await;
    let rss_stuck = rss_kib();
    assert!(rss_stuck < RSS_MAX_KIB, "RSS {rss_before} KiB before the watch, {rss_stuck} KiB while it was stuck");

    let mut seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(event))) => seen.push(event.sequence),
            Ok(Ok(None)) => panic!("the stream ended without a status after {} events", seen.len()),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the server kept the stuck watcher: {} events and still open", seen.len()),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let last = *seen.last().expect("some events were buffered");
    assert!(seen.len() < SENDS, "all {} events fit in the buffers: the test proves nothing", seen.len());
    assert!(status.message().contains(&format!("after_sequence={last}")), "{status:?} after {last}");
    // Resuming from there delivers the rest, in order, none twice.
    let mut resumed = pb::payments_client::PaymentsClient::new(connect(&app).await)
        .watch_payments(authed(pb::WatchPaymentsRequest { after_sequence: last, ..Default::default() }, &backend))
        .await
        .expect("resume")
        .into_inner();
    while seen.len() < SENDS {
        let event = tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("the rest of the events")
            .expect("stream ok")
            .expect("stream open");
        seen.push(event.sequence);
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, none twice");
}

/// Answers quote what the caller sent ("payment <id> not found"); a huge id must not
/// come back as a huge `grpc-message` header, which HTTP/2 clients refuse (16 KiB is
/// common) by failing the caller's connection. Regression: a 27 KB payment id broke
/// the connection for every call after it.
async fn answers_to_huge_ids_stay_small(app: TestApp) {
    let t = app.token("alice", &ALL_SCOPES.join(" "));
    let id = "\u{1F4A9}".repeat(200_000); // 800 KB, under the message limit
    let channel = app.channel.clone();
    let mut payments = pb::payments_client::PaymentsClient::new(channel.clone());
    let err = payments.get_payment(authed(pb::GetPaymentRequest { payment_id: id.clone() }, &t)).await.unwrap_err();
    assert!(matches!(err.code(), Code::NotFound | Code::InvalidArgument), "{err:?}");
    assert!(err.message().chars().count() <= dmpay::api::status::MESSAGE_CHARS_MAX + 1, "{}", err.message().len());
    let err = payments.get_bill(authed(pb::GetBillRequest { bill_id: id.clone() }, &t)).await.unwrap_err();
    assert!(err.message().chars().count() <= dmpay::api::status::MESSAGE_CHARS_MAX + 1);
    let err = app
        .ledger()
        .get_ledger_balance(authed(pb::GetLedgerBalanceRequest { account_code: id.clone(), as_of: None }, &t))
        .await
        .unwrap_err();
    assert!(err.message().chars().count() <= dmpay::api::status::MESSAGE_CHARS_MAX + 1);
    // The same connection carries on.
    still_answers(&app, channel).await;
}

/// HTTP/2 by hand: just enough to open streams the way a misbehaving client would.
mod h2 {
    use std::collections::HashMap;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const REFUSED_STREAM: u32 = 0x7;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK string literal, without Huffman coding.
    fn string(out: &mut Vec<u8>, s: &str) {
        integer(out, 0x00, 7, s.len());
        out.extend_from_slice(s.as_bytes());
    }

    fn integer(out: &mut Vec<u8>, high: u8, prefix: u8, mut n: usize) {
        let max = (1usize << prefix) - 1;
        if n < max {
            out.push(high | n as u8);
            return;
        }
        out.push(high | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }

    /// A literal header field without indexing, with a literal name.
    fn header(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        string(out, name);
        string(out, value);
    }

    pub async fn handshake(conn: &mut TcpStream) {
        conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        conn.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS, none
    }

    /// HEADERS for a POST to `path`, without END_STREAM: the request body stays open.
    pub async fn open_stream(conn: &mut TcpStream, stream: u32, path: &str, token: &str) {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
        integer(&mut block, 0x00, 4, 4); // :path, name from the static table
        string(&mut block, path);
        integer(&mut block, 0x00, 4, 1); // :authority
        string(&mut block, "dmpay");
        header(&mut block, "content-type", "application/grpc");
        header(&mut block, "te", "trailers");
        header(&mut block, "authorization", &format!("Bearer {token}"));
        conn.write_all(&frame(0x1, 0x4, stream, &block)).await.unwrap(); // END_HEADERS
    }

    /// Reads frames (acknowledging SETTINGS) until `done` holds or `wait` has passed,
    /// and returns each stream's RST_STREAM error code.
    pub async fn read_resets(
        conn: &mut TcpStream,
        wait: Duration,
        done: impl Fn(&HashMap<u32, u32>) -> bool,
    ) -> HashMap<u32, u32> {
        let mut resets = HashMap::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if done(&resets) {
                return resets;
            }
            let mut head = [0u8; 9];
            match tokio::time::timeout_at(deadline, conn.read_exact(&mut head)).await {
                Err(_) => return resets,
                Ok(Err(_)) => return resets,
                Ok(Ok(_)) => {}
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
            let mut payload = vec![0u8; len];
            if tokio::time::timeout_at(deadline, conn.read_exact(&mut payload)).await.is_err() {
                return resets;
            }
            match kind {
                0x4 if flags & 0x1 == 0 => {
                    conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(); // SETTINGS ACK
                }
                0x3 => {
                    resets.insert(stream, u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
                }
                0x7 => return resets, // GOAWAY
                _ => {}
            }
        }
    }
}

backend_tests!(
    oversized_messages_are_resource_exhausted,
    huge_tokens_are_refused,
    answers_to_huge_ids_stay_small,
    a_watcher_that_never_reads_is_cut_off,
);
