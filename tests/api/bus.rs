//! Events on NATS JetStream (DMPAY_NATS_URL), against a real broker: every outbox event
//! once on its type's subject, in sequence order with its sequence as the message id,
//! a copy per user; another replica takes over when the publisher stops; and a broker
//! killed and restarted in the middle of a burst loses and duplicates nothing.
//!
//! The broker is the local NATS (`DMPAY_TEST_NATS_URL`, started by `make test` when it
//! is down); the restart test runs a `nats-server` of its own (`DMPAY_TEST_NATS_SERVER`,
//! default /usr/sbin/nats-server) so that it can kill it. Each test has a stream and a
//! subject prefix of its own.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use crate::backend_fn_tests;
use crate::helpers::*;

/// The broker the tests publish to; `None` skips (unless CI requires NATS).
fn nats_url() -> Option<String> {
    match std::env::var("DMPAY_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("DMPAY_TEST_REQUIRE_NATS").is_none(),
                "DMPAY_TEST_REQUIRE_NATS is set but DMPAY_TEST_NATS_URL is not"
            );
            eprintln!("skipped: set DMPAY_TEST_NATS_URL to run the NATS tests");
            None
        }
    }
}

/// A stream and subject prefix of the test's own.
fn names() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (format!("T_{id}"), format!("t{}", &id[..12]))
}

/// One message as stored: subject, Nats-Msg-Id, Dmpay-Sequence, JSON payload.
struct Stored {
    subject: String,
    msg_id: String,
    sequence: i64,
    json: serde_json::Value,
}

async fn stored(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    let mut s = js.get_stream(stream).await.expect("the stream exists");
    let last = s.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for n in 1..=last {
        let m = s.get_raw_message(n).await.unwrap();
        let header = |k: &str| m.headers.get(k).map(|v| v.as_str().to_owned()).unwrap_or_default();
        out.push(Stored {
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            sequence: header("Dmpay-Sequence").parse().unwrap(),
            json: serde_json::from_slice(&m.payload).unwrap(),
        });
    }
    out
}

/// Waits until the stream holds the outbox's newest event (the publisher goes in order,
/// so then it holds all of them).
async fn caught_up(app: &TestApp, js: &jetstream::Context, stream: &str) {
    let latest = dmpay::payments::events::latest(&app.db).await.unwrap();
    for _ in 0..600 {
        if let Ok(mut s) = js.get_stream(stream).await {
            let last = s.info().await.unwrap().state.last_sequence;
            if latest == 0 {
                return;
            }
            if last > 0 {
                let m = s.get_raw_message(last).await.unwrap();
                let seq: i64 = m.headers.get("Dmpay-Sequence").unwrap().as_str().parse().unwrap();
                if seq >= latest {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the stream never reached sequence {latest}");
}

/// Every event exactly once on its type subject, in sequence order from 1 without a
/// gap, its message id its sequence, its JSON the event; and a copy on each party's
/// user subject. Answers the events' count.
fn assert_complete(all: &[Stored], prefix: &str, latest: i64) -> usize {
    let events: Vec<&Stored> = all.iter().filter(|m| m.subject.starts_with(&format!("{prefix}.events."))).collect();
    let sequences: Vec<i64> = events.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, (1..=latest).collect::<Vec<_>>(), "each event once, in order, none skipped");
    let mut copies: HashMap<i64, Vec<&str>> = HashMap::new();
    for m in all.iter().filter(|m| m.subject.starts_with(&format!("{prefix}.users."))) {
        copies.entry(m.sequence).or_default().push(m.subject.as_str());
        assert!(m.msg_id.starts_with(&format!("{}:", m.sequence)), "{} for {}", m.msg_id, m.sequence);
    }
    for e in &events {
        assert_eq!(e.msg_id, e.sequence.to_string());
        assert_eq!(e.json["sequence"], e.sequence.to_string(), "the payload is the event");
        let kind = e.subject.trim_start_matches(&format!("{prefix}.events.")).to_owned();
        // The sender and the recipient of a payment each get their copy.
        if let Some(p) = e.json.get("payment") {
            let users = copies.get(&e.sequence).cloned().unwrap_or_default();
            for party in [&p["sender_id"], &p["recipient_id"]] {
                let subject = format!("{prefix}.users.{}.{kind}", party.as_str().unwrap().replace('.', "~"));
                assert!(users.contains(&subject.as_str()), "{subject} in {users:?}");
            }
        }
    }
    events.len()
}

/// The publisher's lag metric comes down to zero once it has recorded the last event.
async fn lag_reaches_zero(app: &TestApp) {
    for _ in 0..200 {
        if app.metric("dmpay_nats_lag_events").await == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("dmpay_nats_lag_events stayed at {}", app.metric("dmpay_nats_lag_events").await);
}

async fn pay(app: &TestApp, from: &str, to: &str, n: usize, tag: &str) {
    let t = app.token(from, PAY_SCOPES);
    for i in 0..n {
        app.send(&t, &format!("{tag}-{i}"), to, "1.00", pb::FundingSource::Balance).await.unwrap();
    }
}

/// Events reach JetStream in order, once, per type and per user; when the publishing
/// process stops, another replica takes the lease and resumes from the cursor.
async fn events_reach_jetstream_once_in_order(backend: Backend) {
    let Some(url) = nats_url() else { return };
    let (stream, prefix) = names();
    let settings = [
        ("DMPAY_NATS_URL", url.as_str()),
        ("DMPAY_NATS_STREAM", stream.as_str()),
        ("DMPAY_NATS_SUBJECT_PREFIX", prefix.as_str()),
        ("DMPAY_NATS_IN_FLIGHT_MAX", "4"),
    ];
    let Some(mut app) = TestApp::spawn_with(backend, &settings).await else { return };
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    app.users(&["alice", "bob.b"]).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "100.00").await;
    pay(&app, "alice", "bob.b", 10, "first").await;
    let replica = app.spawn_replica().await;
    caught_up(&app, &js, &stream).await;
    assert!(app.metric("dmpay_nats_published_events_total").await >= 10.0, "{}", app.scrape().await);

    // The publishing process stops; the replica, which waited, publishes from there.
    app.stop_server().await;
    pay(&replica, "alice", "bob.b", 10, "second").await;
    caught_up(&replica, &js, &stream).await;
    let latest = dmpay::payments::events::latest(&replica.db).await.unwrap();
    let all = stored(&js, &stream).await;
    assert!(assert_complete(&all, &prefix, latest) >= 20);
    // bob.b's subject token: the `.` of the id written `~`.
    assert!(all.iter().any(|m| m.subject == format!("{prefix}.users.bob~b.payment.settled")));
    lag_reaches_zero(&replica).await;
    replica.stop().await;
    js.delete_stream(&stream).await.unwrap();
}

/// A private broker the test can kill: `nats-server` with JetStream on a free port.
struct Broker {
    child: tokio::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Broker {
    async fn start(port: u16, dir: &std::path::Path) -> Broker {
        let bin = std::env::var("DMPAY_TEST_NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = tokio::process::Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (set DMPAY_TEST_NATS_SERVER)"));
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Broker { child, port, dir: dir.to_owned() }
    }
}

/// The broker is killed and restarted in the middle of a burst of sends: once it is
/// back, the publisher resumes from its last acknowledged event, and the stream holds
/// every event once, in order.
async fn a_broker_restart_mid_burst_loses_nothing(backend: Backend) {
    if nats_url().is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = tempfile::tempdir().unwrap();
    let broker = Broker::start(port, store.path()).await;
    let url = format!("nats://127.0.0.1:{port}");
    let (stream, prefix) = names();
    let settings = [
        ("DMPAY_NATS_URL", url.as_str()),
        ("DMPAY_NATS_STREAM", stream.as_str()),
        ("DMPAY_NATS_SUBJECT_PREFIX", prefix.as_str()),
        ("DMPAY_NATS_IN_FLIGHT_MAX", "8"),
    ];
    let Some(app) = TestApp::spawn_with(backend, &settings).await else { return };
    app.users(&["alice", "bob", "carol"]).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "500.00").await;
    fund(&app, &t, "bob", "500.00").await;
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    caught_up(&app, &js, &stream).await;

    let app = Arc::new(app);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst: Vec<_> = [("alice", "carol"), ("bob", "carol")]
        .into_iter()
        .map(|(from, to)| {
            let (app, done) = (app.clone(), done.clone());
            tokio::spawn(async move {
                let t = app.token(from, PAY_SCOPES);
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 400 {
                    app.send(&t, &format!("{from}-{n}"), to, "0.50", pb::FundingSource::Balance).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Mid-burst: some events are out, more are coming; the broker dies, stays down a
    // while the sends go on, and comes back while they still do.
    while app.metric("dmpay_nats_published_events_total").await < 10.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut broker = broker;
    broker.child.kill().await.unwrap();
    let at_kill = dmpay::payments::events::latest(&app.db).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let at_restart = dmpay::payments::events::latest(&app.db).await.unwrap();
    assert!(at_restart > at_kill, "events were committed while the broker was down");
    let broker = Broker::start(broker.port, &broker.dir).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for b in burst {
        sent += b.await.unwrap();
    }
    assert!(sent >= 20, "the burst went on through the outage: {sent}");
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    caught_up(&app, &js, &stream).await;
    let latest = dmpay::payments::events::latest(&app.db).await.unwrap();
    let all = stored(&js, &stream).await;
    assert!(assert_complete(&all, &prefix, latest) >= sent);
    lag_reaches_zero(&app).await;
    drop(broker);
}

backend_fn_tests!(events_reach_jetstream_once_in_order, a_broker_restart_mid_burst_loses_nothing);
