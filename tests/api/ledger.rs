//! The ledger through the real server, on both backends.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::backend_tests;
use crate::helpers::*;

const ALICE: &str = "user:alice:wallet:USD";
const BOB: &str = "user:bob:wallet:USD";

fn amount(m: &Option<pb::Money>) -> &str {
    &m.as_ref().expect("money").amount
}

async fn post_read_list_and_balance(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let deposit = fund(&app, &t, "alice", "100.00").await;
    assert_eq!(deposit.status, pb::EntryStatus::Posted as i32);
    assert_eq!(deposit.sequence, 1);
    assert_eq!(deposit.postings.len(), 2);

    let sent = app
        .ledger()
        .post_entry(authed(
            pb::PostEntryRequest {
                metadata: [("conversation_id".to_string(), "c1".to_string())].into(),
                description: "lunch".into(),
                ..transfer("t1", ALICE, BOB, "12.50")
            },
            &t,
        ))
        .await
        .expect("transfer")
        .into_inner();
    assert_eq!(sent.sequence, 2);

    let got = app
        .ledger()
        .get_entry(authed(pb::GetEntryRequest { entry_id: sent.entry_id.clone() }, &t))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, sent, "the stored entry is what the post returned");
    assert_eq!(got.metadata["conversation_id"], "c1");

    let a = balance(&app, &t, ALICE).await;
    assert_eq!(amount(&a.posted), "87.50");
    assert_eq!(amount(&a.available), "87.50");
    let b = balance(&app, &t, BOB).await;
    assert_eq!(amount(&b.posted), "12.50");
    // The treasury is an asset: debit-normal, so it shows what went out of it as positive.
    let treasury = balance(&app, &t, "platform:treasury:USD").await;
    assert_eq!(amount(&treasury.posted), "100.00");

    // Point in time: before the transfer, alice had everything.
    let as_of = app
        .ledger()
        .get_ledger_balance(authed(
            pb::GetLedgerBalanceRequest { account_code: ALICE.into(), as_of: deposit.created_at },
            &t,
        ))
        .await
        .expect("as_of")
        .into_inner();
    assert!(["100.00", "87.50"].contains(&amount(&as_of.posted)));
    let before = prost_types::Timestamp { seconds: deposit.created_at.unwrap().seconds - 1, nanos: 0 };
    let as_of = app
        .ledger()
        .get_ledger_balance(authed(pb::GetLedgerBalanceRequest { account_code: ALICE.into(), as_of: Some(before) }, &t))
        .await
        .expect("as_of")
        .into_inner();
    assert_eq!(amount(&as_of.posted), "0.00");

    // Pagination, newest first.
    for i in 0..5 {
        app.ledger().post_entry(authed(transfer(&format!("p{i}"), ALICE, BOB, "1.00"), &t)).await.expect("post");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .ledger()
            .list_entries(authed(
                pb::ListEntriesRequest {
                    account_code: ALICE.into(),
                    page_size: 3,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &t,
            ))
            .await
            .expect("list")
            .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries.iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}

async fn idempotency_replays_and_refuses_reuse(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    fund(&app, &t, "alice", "50.00").await;
    let first = app.ledger().post_entry(authed(transfer("k1", ALICE, BOB, "5.00"), &t)).await.unwrap().into_inner();
    let again = app.ledger().post_entry(authed(transfer("k1", ALICE, BOB, "5.00"), &t)).await.unwrap().into_inner();
    assert_eq!(first, again);
    let err = app.ledger().post_entry(authed(transfer("k1", ALICE, BOB, "6.00"), &t)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("k1"));
    // Keys are per caller: another service may use the same key.
    let other = app.token("svc-other", LEDGER_SCOPES);
    let theirs =
        app.ledger().post_entry(authed(transfer("k1", ALICE, BOB, "5.00"), &other)).await.unwrap().into_inner();
    assert_ne!(theirs.entry_id, first.entry_id);

    // Concurrent duplicates: exactly one effect.
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let mut client = app.ledger();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            client.post_entry(authed(transfer("burst", ALICE, BOB, "1.00"), &t)).await.map(|r| r.into_inner().entry_id)
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap().expect("duplicate returns the original"));
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(amount(&balance(&app, &t, BOB).await.posted), "11.00");
    assert!(app.verify().await.ok());
}

async fn overdraft_rejects_only_that_entry(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    fund(&app, &t, "alice", "10.00").await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut client = app.ledger();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            client.post_entry(authed(transfer(&format!("od{i}"), ALICE, BOB, "3.00"), &t)).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition);
                assert_eq!(status.get_error_details().error_info().unwrap().reason, "INSUFFICIENT_FUNDS");
            }
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(amount(&balance(&app, &t, ALICE).await.posted), "1.00");
    assert!(app.verify().await.ok());
}

async fn rejected_key_can_be_retried(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let err = app.ledger().post_entry(authed(transfer("retry-me", ALICE, BOB, "3.00"), &t)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    fund(&app, &t, "alice", "3.00").await;
    app.ledger().post_entry(authed(transfer("retry-me", ALICE, BOB, "3.00"), &t)).await.expect("retry succeeds");
    assert_eq!(amount(&balance(&app, &t, BOB).await.posted), "3.00");
}

async fn two_phase_holds(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    fund(&app, &t, "alice", "20.00").await;
    let hold = |key: &str, amt: &str| pb::PostEntryRequest { pending: true, ..transfer(key, ALICE, BOB, amt) };

    let h1 = app.ledger().post_entry(authed(hold("h1", "15.00"), &t)).await.unwrap().into_inner();
    assert_eq!(h1.status, pb::EntryStatus::Pending as i32);
    assert!(h1.expires_at.is_some());
    let a = balance(&app, &t, ALICE).await;
    assert_eq!(amount(&a.posted), "20.00");
    assert_eq!(amount(&a.pending_debits), "15.00");
    assert_eq!(amount(&a.available), "5.00");
    // A hold beyond what is available is refused, and so is a transfer.
    let err = app.ledger().post_entry(authed(hold("h2", "6.00"), &t)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = app.ledger().post_entry(authed(transfer("t-over", ALICE, BOB, "5.01"), &t)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Partial post: 10 of the 15 move, the rest is released.
    let posted = app
        .ledger()
        .post_pending(authed(
            pb::PostPendingRequest {
                entry_id: h1.entry_id.clone(),
                idempotency_key: "pp1".into(),
                amount: usd("10.00"),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(posted.status, pb::EntryStatus::Posted as i32);
    assert_eq!(posted.pending_entry_id, h1.entry_id);
    assert_eq!(amount(&posted.postings[0].amount), "10.00");
    let a = balance(&app, &t, ALICE).await;
    assert_eq!(amount(&a.posted), "10.00");
    assert_eq!(amount(&a.pending_debits), "0.00");
    assert_eq!(amount(&a.available), "10.00");
    let h1_now = app
        .ledger()
        .get_entry(authed(pb::GetEntryRequest { entry_id: h1.entry_id.clone() }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h1_now.status, pb::EntryStatus::Posted as i32);
    // Replay of the post returns the same entry; a second resolution is refused.
    let replay = app
        .ledger()
        .post_pending(authed(
            pb::PostPendingRequest {
                entry_id: h1.entry_id.clone(),
                idempotency_key: "pp1".into(),
                amount: usd("10.00"),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, posted);
    let err = app
        .ledger()
        .void_pending(authed(
            pb::VoidPendingRequest { entry_id: h1.entry_id.clone(), idempotency_key: "v1".into() },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // More than reserved is refused.
    let h3 = app.ledger().post_entry(authed(hold("h3", "4.00"), &t)).await.unwrap().into_inner();
    let err = app
        .ledger()
        .post_pending(authed(
            pb::PostPendingRequest {
                entry_id: h3.entry_id.clone(),
                idempotency_key: "pp3".into(),
                amount: usd("4.01"),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Void releases.
    let voided = app
        .ledger()
        .void_pending(authed(
            pb::VoidPendingRequest { entry_id: h3.entry_id.clone(), idempotency_key: "v3".into() },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(voided.status, pb::EntryStatus::Voided as i32);
    assert!(voided.postings.is_empty());
    assert_eq!(amount(&balance(&app, &t, ALICE).await.available), "10.00");
    assert!(app.verify().await.ok());
}

async fn holds_expire(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    fund(&app, &t, "alice", "20.00").await;
    let h = app
        .ledger()
        .post_entry(authed(
            // 3 s: the hold must still be there for the balance read below, however slow
            // the machine is between the two calls.
            pb::PostEntryRequest { pending: true, pending_timeout_seconds: 3, ..transfer("exp", ALICE, BOB, "7.00") },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&balance(&app, &t, ALICE).await.available), "13.00");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let e = app
            .ledger()
            .get_entry(authed(pb::GetEntryRequest { entry_id: h.entry_id.clone() }, &t))
            .await
            .unwrap()
            .into_inner();
        if e.status == pb::EntryStatus::Expired as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hold never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(amount(&balance(&app, &t, ALICE).await.available), "20.00");
    let err = app
        .ledger()
        .post_pending(authed(
            pb::PostPendingRequest { entry_id: h.entry_id.clone(), idempotency_key: "late".into(), amount: None },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(app.verify().await.ok());
}

async fn reversal_once(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    fund(&app, &t, "alice", "20.00").await;
    let e = app.ledger().post_entry(authed(transfer("r", ALICE, BOB, "8.00"), &t)).await.unwrap().into_inner();
    let rev = app
        .ledger()
        .reverse_entry(authed(
            pb::ReverseEntryRequest {
                entry_id: e.entry_id.clone(),
                idempotency_key: "rev1".into(),
                reason: "mistake".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rev.reverses_entry_id, e.entry_id);
    assert_eq!(rev.postings[0].direction, pb::Direction::Credit as i32);
    assert_eq!(amount(&balance(&app, &t, ALICE).await.posted), "20.00");
    let err = app
        .ledger()
        .reverse_entry(authed(
            pb::ReverseEntryRequest {
                entry_id: e.entry_id.clone(),
                idempotency_key: "rev2".into(),
                reason: "again".into(),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.get_error_details().error_info().unwrap().reason, "ALREADY_REVERSED");
    // A reversal that would overdraw a wallet is refused like any other entry.
    let d = fund(&app, &t, "carol", "5.00").await;
    app.ledger().post_entry(authed(transfer("spend", "user:carol:wallet:USD", BOB, "5.00"), &t)).await.unwrap();
    let err = app
        .ledger()
        .reverse_entry(authed(
            pb::ReverseEntryRequest {
                entry_id: d.entry_id.clone(),
                idempotency_key: "rev3".into(),
                reason: "chargeback".into(),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = app
        .ledger()
        .reverse_entry(authed(
            pb::ReverseEntryRequest { entry_id: "nope".into(), idempotency_key: "rev4".into(), reason: "x".into() },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(app.verify().await.ok());
}

async fn sixty_four_payers_one_recipient(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    for i in 0..64 {
        fund(&app, &t, &format!("viewer{i}"), "20.00").await;
    }
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut client = app.ledger();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..20 {
                client
                    .post_entry(authed(
                        transfer(
                            &format!("v{i}-{n}"),
                            &format!("user:viewer{i}:wallet:USD"),
                            "user:seller:wallet:USD",
                            "1.00",
                        ),
                        &t,
                    ))
                    .await
                    .expect("every payment succeeds");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(amount(&balance(&app, &t, "user:seller:wallet:USD").await.posted), "1280.00");
    assert_eq!(amount(&balance(&app, &t, "user:viewer7:wallet:USD").await.posted), "0.00");
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries_checked, 64 + 64 * 20);
}

async fn bad_input_writes_nothing(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let base = || transfer("bad", "platform:treasury:USD", ALICE, "1.00");
    let jpy = pb::PostEntryRequest {
        postings: vec![
            pb::Posting {
                account_code: "platform:treasury:JPY".into(),
                direction: 1,
                amount: Some(pb::Money { currency: "USD".into(), amount: "1.00".into() }),
            },
            posting(ALICE, false, "1.00"),
        ],
        ..base()
    };
    let mut too_many = base();
    too_many.postings = (0..101).map(|i| posting("platform:treasury:USD", i % 2 == 0, "1.00")).collect();
    let mut metadata_big = base();
    metadata_big.metadata = [("k".to_string(), "v".repeat(600))].into();
    let cases: Vec<(&str, pb::PostEntryRequest, Code, &str)> = vec![
        (
            "unknown account",
            transfer("bad", "platform:nope:USD", ALICE, "1.00"),
            Code::NotFound,
            "postings[0].account_code",
        ),
        ("currency differs", jpy, Code::InvalidArgument, "postings[0].amount.currency"),
        (
            "three decimals",
            transfer("bad", "platform:treasury:USD", ALICE, "1.001"),
            Code::InvalidArgument,
            "postings[0].amount.amount",
        ),
        (
            "zero",
            transfer("bad", "platform:treasury:USD", ALICE, "0.00"),
            Code::InvalidArgument,
            "postings[0].amount.amount",
        ),
        (
            "negative",
            transfer("bad", "platform:treasury:USD", ALICE, "-1.00"),
            Code::InvalidArgument,
            "postings[0].amount.amount",
        ),
        (
            "overflow",
            transfer("bad", "platform:treasury:USD", ALICE, "92233720368547758.07"),
            Code::InvalidArgument,
            "postings[0].amount.amount",
        ),
        (
            "exponent",
            transfer("bad", "platform:treasury:USD", ALICE, "1e3"),
            Code::InvalidArgument,
            "postings[0].amount.amount",
        ),
        (
            "unknown currency",
            pb::PostEntryRequest {
                postings: vec![
                    pb::Posting {
                        account_code: ALICE.into(),
                        direction: 1,
                        amount: Some(pb::Money { currency: "XYZ".into(), amount: "1".into() }),
                    },
                    posting(BOB, false, "1.00"),
                ],
                ..base()
            },
            Code::InvalidArgument,
            "postings[0].amount.currency",
        ),
        (
            "unbalanced",
            pb::PostEntryRequest {
                postings: vec![posting("platform:treasury:USD", true, "2.00"), posting(ALICE, false, "1.00")],
                ..base()
            },
            Code::InvalidArgument,
            "postings",
        ),
        (
            "one posting",
            pb::PostEntryRequest { postings: vec![posting("platform:treasury:USD", true, "2.00")], ..base() },
            Code::InvalidArgument,
            "postings",
        ),
        ("more than 100 postings", too_many, Code::InvalidArgument, "postings"),
        (
            "no direction",
            pb::PostEntryRequest {
                postings: vec![
                    pb::Posting { direction: 0, ..posting("platform:treasury:USD", true, "1.00") },
                    posting(ALICE, false, "1.00"),
                ],
                ..base()
            },
            Code::InvalidArgument,
            "postings[0].direction",
        ),
        (
            "empty key",
            pb::PostEntryRequest { idempotency_key: String::new(), ..base() },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            "oversized key",
            pb::PostEntryRequest { idempotency_key: "k".repeat(129), ..base() },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        ("oversized metadata", metadata_big, Code::InvalidArgument, "metadata.k"),
        ("bad kind", pb::PostEntryRequest { kind: "Not A Kind".into(), ..base() }, Code::InvalidArgument, "kind"),
        (
            "timeout without pending",
            pb::PostEntryRequest { pending_timeout_seconds: 5, ..base() },
            Code::InvalidArgument,
            "pending_timeout_seconds",
        ),
        (
            "bad wallet user",
            transfer("bad", "platform:treasury:USD", "user:a b:wallet:USD", "1.00"),
            Code::InvalidArgument,
            "postings[1].account_code",
        ),
    ];
    for (name, req, code, field) in cases {
        let err = app.ledger().post_entry(authed(req, &t)).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(field), "{name}: message {:?} should name {field}", err.message());
        if code == Code::InvalidArgument {
            let details = err.get_error_details();
            assert_eq!(details.bad_request().expect(name).field_violations[0].field, field, "{name}");
        }
    }
    assert_eq!(app.count("ledger_entries").await, 0);
    assert_eq!(app.count("ledger_postings").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    // Scopes.
    let reader = app.token("svc-reader", "ledger:read");
    let err = app.ledger().post_entry(authed(base(), &reader)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let writer = app.token("svc-writer", "ledger:write");
    let err = app.ledger().get_entry(authed(pb::GetEntryRequest { entry_id: "x".into() }, &writer)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn create_ledger_account(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let req = pb::CreateLedgerAccountRequest {
        code: "platform:promotions:EUR".into(),
        r#type: pb::AccountType::Expense as i32,
        currency: "EUR".into(),
        allow_negative: false,
    };
    let a = app.ledger().create_ledger_account(authed(req.clone(), &t)).await.unwrap().into_inner();
    assert_eq!(a.code, "platform:promotions:EUR");
    // Same settings again is a retry; other settings are a conflict.
    app.ledger().create_ledger_account(authed(req.clone(), &t)).await.expect("retry");
    let err = app
        .ledger()
        .create_ledger_account(authed(pb::CreateLedgerAccountRequest { allow_negative: true, ..req.clone() }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    for (bad, field) in [
        (pb::CreateLedgerAccountRequest { code: "user:x:wallet:EUR".into(), ..req.clone() }, "code"),
        (pb::CreateLedgerAccountRequest { code: "has space".into(), ..req.clone() }, "code"),
        (pb::CreateLedgerAccountRequest { r#type: 0, code: "a:b".into(), ..req.clone() }, "type"),
        (pb::CreateLedgerAccountRequest { currency: "EURO".into(), code: "a:c".into(), ..req.clone() }, "currency"),
    ] {
        let err = app.ledger().create_ledger_account(authed(bad, &t)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
}

/// Entries' times never go backwards in sequence order, even when the clock does (an
/// NTP step): the engine writes a batch with the later of its clock and the last batch's
/// time, and answers with the time it wrote. A point-in-time balance reads the journal
/// up to the last entry at that time. The test moves its own server's
/// clock.
async fn entry_times_never_go_backwards(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let first = fund(&app, &t, "alice", "10.00").await;
    let at = |e: &pb::Entry| {
        let ts = e.created_at.expect("created_at");
        ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000
    };
    app.clock.set_offset_us(-3_600_000_000);
    let second = fund(&app, &t, "alice", "5.00").await;
    app.clock.set_offset_us(0);
    assert_eq!(second.sequence, first.sequence + 1);
    assert_eq!(at(&second), at(&first), "an hour back on the clock is not an hour back in the journal");
    let stored = app
        .ledger()
        .get_entry(authed(pb::GetEntryRequest { entry_id: second.entry_id.clone() }, &t))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(stored, second, "the answer carries the time that was written");
    let third = fund(&app, &t, "alice", "1.00").await;
    assert!(at(&third) >= at(&second));
    let posted_at = |us: i64| {
        let app = &app;
        let t = &t;
        async move {
            let ts = prost_types::Timestamp { seconds: us / 1_000_000, nanos: ((us % 1_000_000) * 1000) as i32 };
            let b = app
                .ledger()
                .get_ledger_balance(authed(
                    pb::GetLedgerBalanceRequest { account_code: ALICE.into(), as_of: Some(ts) },
                    t,
                ))
                .await
                .expect("as_of")
                .into_inner();
            amount(&b.posted).to_owned()
        }
    };
    assert_eq!(posted_at(at(&first) - 1).await, "0.00");
    assert_eq!(posted_at(at(&second)).await, if at(&third) == at(&second) { "16.00" } else { "15.00" });
    assert_eq!(posted_at(at(&third)).await, "16.00");
    assert!(app.verify().await.ok());
}

async fn tampering_is_refused_by_the_database(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let e = fund(&app, &t, "alice", "10.00").await;
    let exec = |sql: String| {
        let db = app.db.clone();
        async move { dmpay::with_db!(&db, pool => sqlx::query(&sql).execute(pool).await.map(|_| ())) }
    };
    assert!(exec("UPDATE ledger_entries SET kind = 'edited'".into()).await.is_err(), "UPDATE entries");
    assert!(exec("DELETE FROM ledger_entries".into()).await.is_err(), "DELETE entries");
    assert!(exec("UPDATE ledger_postings SET amount = 1".into()).await.is_err(), "UPDATE postings");
    assert!(exec("DELETE FROM ledger_postings".into()).await.is_err(), "DELETE postings");
    // Adding a posting to an existing entry.
    let add = format!(
        "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
         SELECT '{}', 9, id, 'D', 100, 'USD', FALSE, 1, 0 FROM ledger_accounts WHERE code = '{ALICE}'",
        e.entry_id
    );
    assert!(exec(add).await.is_err(), "posting added to a sealed entry");
    // An unbalanced entry written by hand, bypassing the code, in one transaction.
    let unbalanced = dmpay::with_db!(&app.db, pool => {
        let mut tx = pool.begin().await.unwrap();
        let r1 = sqlx::query(
            "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
             SELECT 'forged', 0, id, 'D', 500, 'USD', FALSE, 2, 0 FROM ledger_accounts WHERE code = 'platform:treasury:USD'"
        )
        .execute(&mut *tx)
        .await;
        let r2 = sqlx::query(&format!(
            "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
             SELECT 'forged', 1, id, 'C', 400, 'USD', FALSE, 2, 0 FROM ledger_accounts WHERE code = '{ALICE}'"
        ))
        .execute(&mut *tx)
        .await;
        let r3 = sqlx::query(
            "INSERT INTO ledger_entries (id, sequence, kind, status, created_by, created_at_us) \
             VALUES ('forged', 2, 'forged', 'posted', 'attacker', 0)",
        )
        .execute(&mut *tx)
        .await;
        let committed = if r1.is_ok() && r2.is_ok() && r3.is_ok() { tx.commit().await.is_ok() } else { false };
        committed
    });
    assert!(!unbalanced, "an unbalanced entry must not commit");
    // Postings without their entry cannot commit either.
    let orphan = dmpay::with_db!(&app.db, pool => {
        let mut tx = pool.begin().await.unwrap();
        let r = sqlx::query(&format!(
            "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, sequence, created_at_us) \
             SELECT 'orphan', 0, id, 'D', 500, 'USD', FALSE, 2, 0 FROM ledger_accounts WHERE code = '{ALICE}'"
        ))
        .execute(&mut *tx)
        .await;
        r.is_ok() && tx.commit().await.is_ok()
    });
    assert!(!orphan, "postings without an entry must not commit");
    // A wallet pushed below zero by hand violates the balance check.
    assert!(exec(format!("UPDATE ledger_accounts SET posted_debits = posted_credits + 1 WHERE code = '{ALICE}'"))
        .await
        .is_err());
    // Verification notices a materialized balance that disagrees with the postings.
    exec(format!("UPDATE ledger_accounts SET posted_credits = posted_credits + 5 WHERE code = '{ALICE}'"))
        .await
        .unwrap();
    let report = app.verify().await;
    assert!(!report.ok());
    assert_eq!(report.problems[0].kind, "balance_mismatch");
    assert_eq!(report.problems[0].account_code.as_deref(), Some(ALICE));
}

backend_tests!(
    post_read_list_and_balance,
    idempotency_replays_and_refuses_reuse,
    overdraft_rejects_only_that_entry,
    rejected_key_can_be_retried,
    two_phase_holds,
    holds_expire,
    reversal_once,
    sixty_four_payers_one_recipient,
    bad_input_writes_nothing,
    create_ledger_account,
    tampering_is_refused_by_the_database,
    entry_times_never_go_backwards,
);
