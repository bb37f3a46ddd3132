//! Property tests of the ledger's invariants, through the real server on both backends:
//! random concurrent mixes of transfers, holds, posts, voids, expiries, reversals and
//! repeated idempotency keys always leave every currency summing to zero, no protected
//! account below zero (available included), materialized balances equal to the
//! postings, and each key applied once.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::Mutex;

use crate::helpers::*;

const WALLETS: usize = 4;

#[derive(Debug, Clone)]
enum OpSpec {
    Transfer { from: usize, to: usize, cents: u32, key: u8 },
    Hold { from: usize, to: usize, cents: u32, key: u8, short_timeout: bool },
    Post { hold: usize, percent: Option<u8>, key: u8 },
    Void { hold: usize, key: u8 },
    Reverse { entry: usize, key: u8 },
}

fn op_strategy() -> impl Strategy<Value = OpSpec> {
    let wallet = 0..WALLETS;
    prop_oneof![
        4 => (wallet.clone(), 0..WALLETS, 1u32..3000, 0u8..16).prop_map(|(from, to, cents, key)| OpSpec::Transfer { from, to, cents, key }),
        2 => (wallet.clone(), 0..WALLETS, 1u32..3000, 0u8..16, any::<bool>())
            .prop_map(|(from, to, cents, key, short_timeout)| OpSpec::Hold { from, to, cents, key, short_timeout }),
        2 => (0usize..8, proptest::option::of(1u8..=100), 0u8..16).prop_map(|(hold, percent, key)| OpSpec::Post { hold, percent, key }),
        1 => (0usize..8, 0u8..16).prop_map(|(hold, key)| OpSpec::Void { hold, key }),
        1 => (0usize..8, 0u8..16).prop_map(|(entry, key)| OpSpec::Reverse { entry, key }),
    ]
}

fn wallet(i: usize) -> String {
    format!("user:w{i}:wallet:USD")
}

fn cents(c: u32) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

#[derive(Default)]
struct Seen {
    holds: Vec<pb::Entry>,
    posted: Vec<pb::Entry>,
    /// Entry id returned for each key that succeeded; a key must always map to one.
    by_key: HashMap<String, String>,
}

async fn run_op(app: &TestApp, token: &str, op: OpSpec, seen: &Mutex<Seen>) {
    let mut client = app.ledger();
    let (key, result) = match op {
        OpSpec::Transfer { from, to, cents: c, key } => {
            let key = format!("k{key}");
            let r = client.post_entry(authed(transfer(&key, &wallet(from), &wallet(to), &cents(c)), token)).await;
            (key, r)
        }
        OpSpec::Hold { from, to, cents: c, key, short_timeout } => {
            let key = format!("k{key}");
            let req = pb::PostEntryRequest {
                pending: true,
                pending_timeout_seconds: if short_timeout { 1 } else { 0 },
                ..transfer(&key, &wallet(from), &wallet(to), &cents(c))
            };
            let r = client.post_entry(authed(req, token)).await;
            (key, r)
        }
        OpSpec::Post { hold, percent, key } => {
            let Some(h) = seen.lock().await.holds.get(hold).cloned() else { return };
            let key = format!("k{key}");
            let amount = percent.map(|p| {
                let reserved: u64 = h.postings[0].amount.as_ref().unwrap().amount.replace('.', "").parse().unwrap();
                cents((reserved * u64::from(p) / 100).max(1) as u32)
            });
            let req = pb::PostPendingRequest {
                entry_id: h.entry_id.clone(),
                idempotency_key: key.clone(),
                amount: amount.and_then(|a| usd(&a)),
            };
            (key, client.post_pending(authed(req, token)).await)
        }
        OpSpec::Void { hold, key } => {
            let Some(h) = seen.lock().await.holds.get(hold).cloned() else { return };
            let key = format!("k{key}");
            let req = pb::VoidPendingRequest { entry_id: h.entry_id.clone(), idempotency_key: key.clone() };
            (key, client.void_pending(authed(req, token)).await)
        }
        OpSpec::Reverse { entry, key } => {
            let Some(e) = seen.lock().await.posted.get(entry).cloned() else { return };
            let key = format!("k{key}");
            let req = pb::ReverseEntryRequest {
                entry_id: e.entry_id.clone(),
                idempotency_key: key.clone(),
                reason: "prop".into(),
            };
            (key, client.reverse_entry(authed(req, token)).await)
        }
    };
    match result {
        Ok(resp) => {
            let entry = resp.into_inner();
            let mut seen = seen.lock().await;
            if let Some(previous) = seen.by_key.insert(key.clone(), entry.entry_id.clone()) {
                assert_eq!(previous, entry.entry_id, "key {key} produced two different entries");
            }
            if entry.status == pb::EntryStatus::Pending as i32
                && !seen.holds.iter().any(|h| h.entry_id == entry.entry_id)
            {
                seen.holds.push(entry);
            } else if entry.status == pb::EntryStatus::Posted as i32
                && !entry.postings.is_empty()
                && !seen.posted.iter().any(|p| p.entry_id == entry.entry_id)
            {
                seen.posted.push(entry);
            }
        }
        Err(status) => {
            // Every refusal is one of the caller-facing outcomes, never INTERNAL.
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists | tonic::Code::InvalidArgument
                ),
                "unexpected status {status:?}"
            );
        }
    }
}

async fn run_case(backend: Backend, ops: Vec<OpSpec>) {
    let Some(app) = TestApp::spawn(backend).await else { return };
    let token = app.token("svc-prop", LEDGER_SCOPES);
    for i in 0..WALLETS {
        fund(&app, &token, &format!("w{i}"), "50.00").await;
    }
    let seen = Mutex::new(Seen::default());
    // Waves of concurrent operations; later waves can refer to entries of earlier ones.
    for wave in ops.chunks(6) {
        let futures = wave.iter().cloned().map(|op| run_op(&app, &token, op, &seen));
        futures_join(futures).await;
    }
    // Every short hold is past its timeout after 1 s; then wait (bounded) until the
    // expiry sweeper has resolved all of them, however loaded the machine is.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cutoff = app.clock.now_us();
    let waited = std::time::Instant::now();
    loop {
        let overdue: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM ledger_entries e WHERE e.status = 'pending' AND e.expires_at_us < $1 \
             AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.pending_entry_id = e.id)",
        )
        .bind(cutoff)
        .fetch_one(pool)
        .await)
        .unwrap();
        if overdue == 0 {
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(15), "{overdue} holds outlived their timeout by 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let report = app.verify().await;
    assert!(report.ok(), "verify: {:?}", report.problems);
    let (pd, pc, qd, qc): (i64, i64, i64, i64) = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT CAST(SUM(posted_debits) AS BIGINT), CAST(SUM(posted_credits) AS BIGINT), \
         CAST(SUM(pending_debits) AS BIGINT), CAST(SUM(pending_credits) AS BIGINT) FROM ledger_accounts WHERE currency = 'USD'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(pd, pc, "posted debits and credits sum to the same in USD");
    assert_eq!(qd, qc, "pending debits and credits sum to the same in USD");
    // Each key applied once: one entry per stored key, plus expiries, which carry none.
    // One statement, so a hold expiring meanwhile cannot fall between the counts.
    let (entries, keys, expiries): (i64, i64, i64) = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM ledger_entries), (SELECT COUNT(*) FROM idempotency_keys), \
         (SELECT COUNT(*) FROM ledger_entries WHERE status = 'expired')",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(entries, keys + expiries);
    let seen = seen.lock().await;
    for (key, entry_id) in &seen.by_key {
        let stored: String = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
            "SELECT result_id FROM idempotency_keys WHERE caller = 'api:svc-prop' AND key = $1",
        )
        .bind(key)
        .fetch_one(pool)
        .await)
        .unwrap();
        assert_eq!(&stored, entry_id, "key {key}");
    }
}

async fn futures_join<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut set = futures;
    // Poll them all at once so the engine sees them together.
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(6))]
    #[test]
    fn sqlite_ledger_invariants(ops in proptest::collection::vec(op_strategy(), 8..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_case(Backend::Sqlite, ops));
    }
}

proptest! {
    #![proptest_config(config(4))]
    #[test]
    fn postgres_ledger_invariants(ops in proptest::collection::vec(op_strategy(), 8..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_case(Backend::Postgres, ops));
    }
}
