//! `WatchPayments` at scale: a cap per caller besides the server's, one shared reader of
//! the outbox per process (an idle watcher reads nothing), and a watcher on one replica
//! sees what another commits.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::backend_tests;
use crate::helpers::*;

async fn watch(app: &TestApp, token: &str, after: i64) -> Result<tonic::Streaming<pb::PaymentEvent>, tonic::Status> {
    app.payments()
        .watch_payments(authed(pb::WatchPaymentsRequest { after_sequence: after, ..Default::default() }, token))
        .await
        .map(|r| r.into_inner())
}

async fn fund_user(app: &TestApp, user: &str, amount: &str) {
    let t = app.token("svc-treasury", LEDGER_SCOPES);
    fund(app, &t, user, amount).await;
}

/// Waits until a metric reaches `value` (the server counts asynchronously).
async fn metric_reaches(app: &TestApp, name: &str, value: f64) {
    for _ in 0..100 {
        if app.metric(name).await >= value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never reached {value}: {}", app.metric(name).await);
}

/// One caller cannot take every slot: 50 streams opened at once by one user get
/// exactly the per-caller cap (5 by default); another user still gets in; a closed
/// stream frees its place.
async fn one_caller_cannot_take_every_watcher_slot(app: TestApp) {
    let alice = app.token("alice", PAY_SCOPES);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (app_payments, t) = (app.payments(), alice.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = app_payments;
            c.watch_payments(authed(pb::WatchPaymentsRequest::default(), &t)).await.map(|r| r.into_inner())
        }));
    }
    let mut open = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => open.push(s),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(e.get_error_details().error_info().unwrap().reason, "WATCHERS_PER_USER");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (5, 45));
    assert_eq!(app.metric("dmpay_watchers_open").await, 5.0);
    let bob = app.token("bob", PAY_SCOPES);
    let _bobs = watch(&app, &bob, 0).await.expect("another caller still gets a stream");
    // Closing one of alice's frees her place once the server sees the stream end.
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..100 {
        if let Ok(s) = watch(&app, &alice, 0).await {
            reopened = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed stream's place was never given back");
}

/// Idle watchers cost no query: 40 users each watch their thread; each reads the table
/// once to catch up, and then 30 payments between other users are fanned out by the
/// shared reader without another read of the table by any watcher. The watcher whose
/// user gets paid sees it at once.
async fn idle_watchers_read_nothing(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "payer", "100.00").await;
    app.users(&["quiet7"]).await;
    let mut streams = Vec::new();
    for i in 0..40 {
        let t = app.token(&format!("quiet{i}"), PAY_SCOPES);
        streams.push(watch(&app, &t, 0).await.unwrap());
    }
    metric_reaches(&app, "dmpay_watch_table_reads_total", 40.0).await;
    let reads_before = app.metric("dmpay_watch_table_reads_total").await;
    let feed_before = app.metric("dmpay_event_feed_reads_total").await;
    let payer = app.token("payer", PAY_SCOPES);
    for i in 0..30 {
        app.send(&payer, &format!("p{i}"), &format!("shop{}", i % 3), "1.00", pb::FundingSource::Balance)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.metric("dmpay_watch_table_reads_total").await, reads_before, "an idle watcher read the table");
    // The shared reader read once per commit or poll, not once per watcher.
    let feed_reads = app.metric("dmpay_event_feed_reads_total").await - feed_before;
    assert!(feed_reads <= 40.0, "{feed_reads} feed reads for 30 payments and 40 watchers");
    // A payment to one of them reaches that watcher, and only it.
    app.send(&payer, "to-quiet7", "quiet7", "1.00", pb::FundingSource::Balance).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), streams[7].message()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.payment.unwrap().recipient_id, "quiet7");
    for (i, s) in streams.iter_mut().enumerate().filter(|(i, _)| *i != 7).take(5) {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.message()).await.is_err(),
            "watcher {i} got someone else's event"
        );
    }
}

/// A watcher on one replica sees what another replica commits.
async fn a_watcher_sees_another_replicas_commits(app: TestApp) {
    app.users(CAST).await;
    fund_user(&app, "alice", "10.00").await;
    let replica = app.spawn_replica().await;
    let bob = replica.token("bob", PAY_SCOPES);
    let mut stream = watch(&replica, &bob, 0).await.unwrap();
    let alice = app.token("alice", PAY_SCOPES);
    let paid = app.send(&alice, "x-replica", "bob", "2.50", pb::FundingSource::Balance).await.unwrap();
    // A wallet payment is created and settled in one commit: one event.
    let e = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("in time").unwrap().unwrap();
    assert_eq!(e.payment.as_ref().unwrap().payment_id, paid.payment_id);
    assert_eq!(e.r#type(), pb::PaymentEventType::PaymentSettled);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await.is_err(),
        "a second event for a payment that changed state once"
    );
    replica.stop().await;
}

/// Shutdown ends open watch streams at once, each with UNAVAILABLE and the sequence to
/// resume from, rather than keeping the drain waiting for its whole grace period.
async fn shutdown_ends_watch_streams_with_a_resume_point(app: TestApp) {
    app.users(&["alice", "bob"]).await;
    fund_user(&app, "alice", "10.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    app.send(&alice, "one", "bob", "1.00", pb::FundingSource::Balance).await.unwrap();
    let bob = app.token("bob", PAY_SCOPES);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = watch(&app, &bob, 0).await.unwrap();
        let first = s.message().await.unwrap().unwrap();
        streams.push((s, first.sequence));
    }
    let started = std::time::Instant::now();
    app.stop().await;
    for (mut s, seen) in streams {
        let end = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
        assert!(end.message().contains(&format!("after_sequence={seen}")), "{end:?}");
    }
    // The drain's grace is 10 s; a stream that kept it waiting would take all of it.
    assert!(started.elapsed() < Duration::from_secs(9), "shutdown waited for the streams: {:?}", started.elapsed());
}

backend_tests!(
    shutdown_ends_watch_streams_with_a_resume_point,
    one_caller_cannot_take_every_watcher_slot,
    idle_watchers_read_nothing,
    a_watcher_sees_another_replicas_commits,
);
