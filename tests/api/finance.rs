//! Finance through the real server and the CLI, on both backends.

use tonic::Code;
use tonic_types::StatusExt;

use crate::backend_tests;
use crate::helpers::*;

fn amt(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

async fn trial_balance_now_and_in_the_past(app: TestApp) {
    app.users(CAST).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "100.00").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let then = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let then = prost_types::Timestamp { seconds: then.as_secs() as i64, nanos: then.subsec_nanos() as i32 };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.send(&alice, "tb-1", "bob", "30.00", pb::FundingSource::Balance).await.unwrap();

    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let now = client.get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), &fin)).await.unwrap().into_inner();
    assert!(now.balanced);
    let row = |tb: &pb::TrialBalance, code: &str| tb.rows.iter().find(|r| r.account_code == code).cloned();
    assert_eq!(amt(&row(&now, "user:alice:wallet:USD").unwrap().balance), "70.00");
    assert_eq!(amt(&row(&now, "user:bob:wallet:USD").unwrap().balance), "30.00");
    let usd = now.totals.iter().find(|t| t.currency == "USD").unwrap();
    assert_eq!(amt(&usd.debits), amt(&usd.credits));
    assert_eq!(amt(&usd.debits), "130.00");

    // As of the moment between the two: yesterday's books, not today's.
    let past = client
        .get_trial_balance(authed(pb::GetTrialBalanceRequest { as_of: Some(then), currency: "USD".into() }, &fin))
        .await
        .unwrap()
        .into_inner();
    assert!(past.balanced);
    assert_eq!(amt(&row(&past, "user:alice:wallet:USD").unwrap().balance), "100.00");
    assert!(row(&past, "user:bob:wallet:USD").is_none());

    let report = client.verify_ledger(authed(pb::VerifyLedgerRequest {}, &fin)).await.unwrap().into_inner();
    assert!(report.ok, "{:?}", report.problems);
    assert!(report.entries_checked >= 2);
    let err = client.verify_ledger(authed(pb::VerifyLedgerRequest {}, &alice)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .get_trial_balance(authed(pb::GetTrialBalanceRequest { currency: "XYZ".into(), ..Default::default() }, &fin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn cli_prints_readable_tables(app: TestApp) {
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "1234.56").await;
    let fin = app.token("finance-staff", "finance");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
            .args(["finance"])
            .args(args)
            .args(["--addr", &format!("http://{}", app.addr), "--token", &fin])
            .output()
            .expect("run dmpay")
    };
    let out = run(&["trial-balance"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("balanced"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("account")).expect("header");
    let width = lines[header].len();
    // Every row is as wide as the header: amounts line up on the right.
    for l in &lines[header + 2..] {
        if l.is_empty() {
            break;
        }
        assert_eq!(l.len(), width, "{l:?}");
    }
    assert!(text.contains("user:alice:wallet:USD") && text.contains("1234.56") && text.contains("TOTAL"), "{text}");
    let out = run(&["verify"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ledger OK"));
    // Without the finance scope the command fails with a clear message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .args(["finance", "verify", "--addr", &format!("http://{}", app.addr), "--token", &app.token("x", "")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("finance"));
}

async fn export_streams_every_posting(app: TestApp) {
    let t = app.token("svc", LEDGER_SCOPES);
    for i in 0..12 {
        fund(&app, &t, &format!("u{i}"), &format!("{i}.05")).await;
    }
    // The library pages: pages of 5 entries (10 postings) across 12 entries.
    let mut cursor = dmpay::finance::export::Cursor::default();
    let mut pages = 0;
    let mut lines = 0;
    loop {
        let (data, rows, next) =
            dmpay::finance::export::page(&app.db, 0, i64::MAX, cursor, 5, dmpay::finance::export::Format::Csv)
                .await
                .unwrap();
        lines += String::from_utf8(data).unwrap().lines().count();
        assert!(lines % 10 == 0 || next.is_none());
        pages += 1;
        assert!(rows <= 10);
        match next {
            Some(c) => cursor = c,
            None => break,
        }
    }
    assert_eq!(lines, 24);
    assert_eq!(pages, 3);

    // Over gRPC, CSV: the header, then one row per posting, exact amounts.
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let mut stream = client
        .export_entries(authed(
            pb::ExportEntriesRequest { format: pb::ExportFormat::Csv as i32, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        csv.extend(chunk.data);
    }
    let csv = String::from_utf8(csv).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], dmpay::finance::export::CSV_HEADER.trim_end());
    assert_eq!(rows.len(), 25);
    assert!(rows.iter().any(|r| r.contains(",user:u7:wallet:USD,credit,7.05,USD,")), "{csv}");
    // JSON lines.
    let mut stream = client
        .export_entries(authed(
            pb::ExportEntriesRequest { format: pb::ExportFormat::Jsonl as i32, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        jsonl.extend(chunk.data);
    }
    let objects: Vec<serde_json::Value> =
        String::from_utf8(jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 24);
    assert_eq!(objects[0]["sequence"], 1);
    let err = client.export_entries(authed(pb::ExportEntriesRequest::default(), &fin)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The CLI writes the same file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.csv");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .args(["finance", "export", "--format", "csv", "--out", path.to_str().unwrap()])
        .args(["--addr", &format!("http://{}", app.addr), "--token", &fin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), csv);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported 24 postings"));
}

async fn reconcile_clean_and_with_discrepancies(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    for (i, amount) in ["10.00", "20.00", "30.00"].iter().enumerate() {
        app.send(&alice, &format!("card-{i}"), "bob", amount, pb::FundingSource::Card).await.unwrap();
    }
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let sandbox = dmpay::processor::sandbox::Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let report = dmpay::processor::CardProcessor::settlement_report(&sandbox, &date).await.unwrap();
    assert_eq!(report.lines().count(), 4);
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let import_client = client.clone();
    let import = |csv: String| {
        let mut c = import_client.clone();
        let fin = fin.clone();
        let date = date.clone();
        async move {
            c.import_settlement_report(authed(
                pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv },
                &fin,
            ))
            .await
            .map(|r| r.into_inner())
        }
    };

    // A clean day reconciles fully, and importing it again is the same run.
    let clean = import(report.clone()).await.unwrap();
    assert_eq!(
        (clean.rows, clean.matched, clean.amount_mismatch, clean.missing_in_ledger, clean.missing_in_report),
        (3, 3, 0, 0, 0)
    );
    assert_eq!(import(report.clone()).await.unwrap().run_id, clean.run_id);
    let t = app.token("svc", LEDGER_SCOPES);
    // Fees went to the expense account, the net to the bank; clearing is empty.
    assert_eq!(amt(&balance(&app, &t, "processor:sandbox:clearing:USD").await.posted), "0.00");
    assert_eq!(amt(&balance(&app, &t, "platform:processor_fees:USD").await.posted), "2.64");
    assert_eq!(amt(&balance(&app, &t, "platform:settlement_bank:USD").await.posted), "57.36");

    // A report with a missing row, a changed amount and an extra row reports exactly those.
    let altered = dmpay::processor::sandbox::inject_discrepancies(&report, Some(1), Some(2), true, &date).unwrap();
    let dropped_ref = report.lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    let changed_ref = report.lines().nth(2).unwrap().split(',').next().unwrap().to_string();
    let run = import(altered.clone()).await.unwrap();
    assert_ne!(run.run_id, clean.run_id);
    assert_eq!(
        (run.rows, run.matched, run.amount_mismatch, run.missing_in_ledger, run.missing_in_report),
        (3, 1, 1, 1, 1)
    );
    let items = client
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), open: true, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 3);
    let by_status = |s: pb::ReconciliationItemStatus| items.iter().find(|i| i.status == s as i32).unwrap().clone();
    assert_eq!(by_status(pb::ReconciliationItemStatus::MissingInReport).processor_reference, dropped_ref);
    assert_eq!(by_status(pb::ReconciliationItemStatus::AmountMismatch).processor_reference, changed_ref);
    assert!(by_status(pb::ReconciliationItemStatus::MissingInLedger).processor_reference.starts_with("sbx_extra_"));

    // Resolve: two by suspense entries, one explained; each records who and why, once.
    for (item, how) in [
        (by_status(pb::ReconciliationItemStatus::MissingInReport), pb::ReconciliationResolution::Suspense),
        (by_status(pb::ReconciliationItemStatus::AmountMismatch), pb::ReconciliationResolution::Suspense),
        (by_status(pb::ReconciliationItemStatus::MissingInLedger), pb::ReconciliationResolution::Explained),
    ] {
        let done = client
            .resolve_reconciliation_item(authed(
                pb::ResolveReconciliationItemRequest {
                    item_id: item.item_id.clone(),
                    resolution: how as i32,
                    note: "checked with the processor".into(),
                },
                &fin,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.resolution, how as i32);
        assert_eq!(done.resolved_by, "finance-staff");
        if how == pb::ReconciliationResolution::Suspense {
            assert!(!done.entry_id.is_empty());
        }
    }
    let err = client
        .resolve_reconciliation_item(authed(
            pb::ResolveReconciliationItemRequest {
                item_id: by_status(pb::ReconciliationItemStatus::MissingInLedger).item_id,
                resolution: pb::ReconciliationResolution::Explained as i32,
                note: "again".into(),
            },
            &fin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let open = client
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), open: true, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(open.items.is_empty());
    // The enums are checked at the edge, naming the field, and change nothing.
    let resolutions_before = app.count("recon_resolutions").await;
    for (msg, field) in [
        (
            pb::ListReconciliationItemsRequest {
                run_id: run.run_id.clone(),
                open: true,
                status: pb::ReconciliationItemStatus::Matched as i32,
                ..Default::default()
            },
            "open",
        ),
        (pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), status: 99, ..Default::default() }, "status"),
    ] {
        let err = client.list_reconciliation_items(authed(msg, &fin)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(&format!("{field}: ")), "{field}: {}", err.message());
    }
    for raw in [pb::ReconciliationResolution::Unspecified as i32, 7] {
        let err = client
            .resolve_reconciliation_item(authed(
                pb::ResolveReconciliationItemRequest {
                    item_id: items[0].item_id.clone(),
                    resolution: raw,
                    note: "n".into(),
                },
                &fin,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("resolution: "), "{}", err.message());
    }
    assert_eq!(app.count("recon_resolutions").await, resolutions_before);
    let tb = client.get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), &fin)).await.unwrap().into_inner();
    assert!(tb.balanced);
    let report = client.verify_ledger(authed(pb::VerifyLedgerRequest {}, &fin)).await.unwrap().into_inner();
    assert!(report.ok, "{:?}", report.problems);

    // Malformed reports name the line and column and write nothing.
    let runs_before = app.count("recon_runs").await;
    let header = "processor_reference,type,amount,fee,net,currency,created_at";
    for (csv, expect) in [
        ("processor_reference,type,amount\n".to_string(), "line 1, column fee"),
        (format!("{header}\nsbx_1,capture,1.001,0.00,1.001,USD,2026-11-24T00:00:00Z\n"), "line 2, column amount"),
        (format!("{header}\nsbx_1,capture,1.00,0.00,1.00,XYZ,2026-11-24T00:00:00Z\n"), "line 2, column currency"),
        (format!("{header}\nsbx_1,capture,1.00,0.00,1.00,USD,2026-11-24T00:00:00Z\nsbx_1,capture,1.00,0.00,1.00,USD,2026-11-24T00:00:00Z\n"), "line 3, column processor_reference"),
        (format!("{header}\nsbx_1,capture,1.00,0.10,1.00,USD,2026-11-24T00:00:00Z\n"), "line 2, column net"),
    ] {
        let err = import(csv).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(expect), "{expect}: {}", err.message());
    }
    assert_eq!(app.count("recon_runs").await, runs_before);
}

async fn statements_show_every_movement(app: TestApp) {
    app.users(CAST).await;
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "50.00").await;
    let mid = app.clock.now_us();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let alice = app.token("alice", PAY_SCOPES);
    let bob = app.token("bob", PAY_SCOPES);
    let p = app.send(&alice, "s1", "bob", "12.00", pb::FundingSource::Balance).await.unwrap();
    app.send(&bob, "s2", "alice", "2.00", pb::FundingSource::Balance).await.unwrap();
    app.payments()
        .refund_payment(authed(
            pb::RefundPaymentRequest {
                payment_id: p.payment_id,
                idempotency_key: "r".into(),
                amount: usd("1.00"),
                reason: "partial".into(),
            },
            &bob,
        ))
        .await
        .unwrap();
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let all = client
        .get_statement(authed(
            pb::GetStatementRequest { user_id: "alice".into(), currency: "USD".into(), ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amt(&all.opening_balance), "0.00");
    let lines: Vec<(String, String, String)> =
        all.movements.iter().map(|m| (amt(&m.amount), m.counterparty.clone(), m.note.clone())).collect();
    assert_eq!(lines[0].0, "50.00");
    assert_eq!(lines[0].1, "platform:treasury:USD");
    assert_eq!((lines[1].0.as_str(), lines[1].1.as_str()), ("-12.00", "bob"));
    assert_eq!(lines[2].0, "2.00");
    assert_eq!(lines[3].0, "1.00");
    assert_eq!(amt(&all.closing_balance), "41.00");
    // From the middle: the opening balance is what came before.
    let from = prost_types::Timestamp { seconds: mid / 1_000_000, nanos: ((mid % 1_000_000) * 1000) as i32 };
    let part = client
        .get_statement(authed(
            pb::GetStatementRequest {
                user_id: "alice".into(),
                currency: "USD".into(),
                from_time: Some(from),
                to_time: None,
            },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amt(&part.opening_balance), "50.00");
    assert_eq!(part.movements.len(), 3);
    assert_eq!(amt(&part.closing_balance), "41.00");
    let err = client
        .get_statement(authed(
            pb::GetStatementRequest { user_id: "alice".into(), currency: "USD".into(), ..Default::default() },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Card payments over two days, each day's report imported: the clean day reconciles
/// fully; the day with injected discrepancies reports exactly those; resolving them
/// leaves the books balanced and verified. The test moves its own
/// server's clock.
async fn two_days_of_card_payments_reconcile(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let day_us = 86_400_000_000;
    // Yesterday.
    app.clock.set_offset_us(-day_us);
    let yesterday = dmpay::kernel::dates::ymd(app.clock.now_us());
    for i in 0..2 {
        app.send(&alice, &format!("d1-{i}"), "bob", "10.00", pb::FundingSource::Card).await.unwrap();
    }
    app.clock.set_offset_us(0);
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    for i in 0..3 {
        app.send(&alice, &format!("d2-{i}"), "bob", "20.00", pb::FundingSource::Card).await.unwrap();
    }
    let day = |d: (i32, u32, u32)| format!("{:04}-{:02}-{:02}", d.0, d.1, d.2);
    let sandbox = dmpay::processor::sandbox::Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let report1 = dmpay::processor::CardProcessor::settlement_report(&sandbox, &day(yesterday)).await.unwrap();
    let report2 = dmpay::processor::CardProcessor::settlement_report(&sandbox, &day(today)).await.unwrap();
    assert_eq!((report1.lines().count(), report2.lines().count()), (3, 4));
    let altered =
        dmpay::processor::sandbox::inject_discrepancies(&report2, Some(3), Some(1), true, &day(today)).unwrap();
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let import = |date: String, csv: String| {
        let mut c = client.clone();
        let fin = fin.clone();
        async move {
            c.import_settlement_report(authed(
                pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv },
                &fin,
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let clean = import(day(yesterday), report1).await;
    assert_eq!(
        (clean.rows, clean.matched, clean.amount_mismatch, clean.missing_in_ledger, clean.missing_in_report),
        (2, 2, 0, 0, 0)
    );
    let run = import(day(today), altered).await;
    assert_eq!(
        (run.rows, run.matched, run.amount_mismatch, run.missing_in_ledger, run.missing_in_report),
        (3, 1, 1, 1, 1)
    );
    let items = client
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), open: true, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    let dropped = report2.lines().nth(3).unwrap().split(',').next().unwrap();
    let changed = report2.lines().nth(1).unwrap().split(',').next().unwrap();
    assert_eq!(
        items
            .iter()
            .find(|i| i.status == pb::ReconciliationItemStatus::MissingInReport as i32)
            .unwrap()
            .processor_reference,
        dropped
    );
    assert_eq!(
        items
            .iter()
            .find(|i| i.status == pb::ReconciliationItemStatus::AmountMismatch as i32)
            .unwrap()
            .processor_reference,
        changed
    );
    for item in items {
        client
            .resolve_reconciliation_item(authed(
                pb::ResolveReconciliationItemRequest {
                    item_id: item.item_id,
                    resolution: pb::ReconciliationResolution::Suspense as i32,
                    note: "investigated".into(),
                },
                &fin,
            ))
            .await
            .unwrap();
    }
    let tb = client.get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), &fin)).await.unwrap().into_inner();
    assert!(tb.balanced);
    let report = client.verify_ledger(authed(pb::VerifyLedgerRequest {}, &fin)).await.unwrap().into_inner();
    assert!(report.ok, "{:?}", report.problems);
    let t = app.token("svc", LEDGER_SCOPES);
    // Every cent the processor owed is settled or parked in suspense: clearing is empty.
    assert_eq!(amt(&balance(&app, &t, "processor:sandbox:clearing:USD").await.posted), "0.00");
}

/// 100,000 postings stream out in bounded chunks, every one of them, with exact amounts.
async fn export_of_a_large_range_streams(app: TestApp) {
    use dmpay::kernel::money::{Currency, Money};
    use dmpay::ledger::{AccountCode, Direction, PostEntryInput, PostingInput};
    let usd = Currency::from_code("USD").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    // 1,000 entries of 100 postings: one debit of 99.00 and 99 credits of 1.00.
    for batch in 0..8 {
        let ledger = app.ledger_handle.clone();
        tasks.spawn(async move {
            for e in 0..125 {
                let mut postings = vec![PostingInput {
                    account_code: AccountCode::parse("c", "platform:treasury:USD").unwrap(),
                    direction: Direction::Debit,
                    amount: Money::from_minor(usd, 9_900),
                }];
                for w in 0..99 {
                    postings.push(PostingInput {
                        account_code: AccountCode::parse("c", &format!("user:w{w}:wallet:USD")).unwrap(),
                        direction: Direction::Credit,
                        amount: Money::from_minor(usd, 100),
                    });
                }
                let input = PostEntryInput {
                    idempotency_key: format!("big-{batch}-{e}"),
                    kind: "bulk".into(),
                    description: String::new(),
                    postings,
                    metadata: Default::default(),
                    pending: false,
                    pending_timeout_s: 0,
                };
                ledger.post_entry("svc", input).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let mut stream = client
        .export_entries(authed(
            pb::ExportEntriesRequest { format: pb::ExportFormat::Csv as i32, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    let (mut rows, mut chunks, mut biggest, mut credits) = (0i64, 0, 0, 0i64);
    let mut header = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks += 1;
        biggest = biggest.max(chunk.data.len());
        rows += chunk.rows;
        let text = String::from_utf8(chunk.data).unwrap();
        for line in text.lines() {
            if header.is_none() {
                header = Some(line.to_string());
                continue;
            }
            let cols: Vec<&str> = line.split(',').collect();
            assert_eq!(cols.len(), 13, "{line}");
            if cols[6] == "credit" {
                assert_eq!(cols[7], "1.00");
                credits += 1;
            } else {
                assert_eq!(cols[7], "99.00");
            }
        }
    }
    assert_eq!(header.as_deref(), Some(dmpay::finance::export::CSV_HEADER.trim_end()));
    assert_eq!(rows, 100_000);
    assert_eq!(credits, 99_000);
    // Streamed in pages, never as one blob.
    assert!(chunks >= 40, "{chunks} chunks");
    assert!(biggest <= dmpay::finance::export::CHUNK_BYTES_MAX, "largest chunk {biggest} bytes");
}

/// A report row without a processor reference matches by amount, currency and time.
async fn rows_without_reference_match_by_amount_and_time(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    app.send(&alice, "nr-1", "bob", "10.00", pb::FundingSource::Card).await.unwrap();
    app.send(&alice, "nr-2", "bob", "20.00", pb::FundingSource::Card).await.unwrap();
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let sandbox = dmpay::processor::sandbox::Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let report = dmpay::processor::CardProcessor::settlement_report(&sandbox, &date).await.unwrap();
    // Blank every reference.
    let blanked: String = report
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{l}\n")
            } else {
                format!("{}\n", l.split_once(',').map(|(_, rest)| format!(",{rest}")).unwrap())
            }
        })
        .collect();
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let run = client
        .import_settlement_report(authed(
            pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv: blanked },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((run.rows, run.matched, run.missing_in_ledger, run.missing_in_report), (2, 2, 0, 0));
    let items = client
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: run.run_id, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    // The match names the ledger's reference.
    assert!(items.iter().all(|i| i.processor_reference.starts_with("sbx_")), "{items:?}");
}

/// Fees and net of a settlement CSV, in minor units.
fn report_totals(csv: &str) -> (i64, i64) {
    let minor = |s: &str| {
        let (units, cents) = s.split_once('.').unwrap();
        units.parse::<i64>().unwrap() * 100 + cents.parse::<i64>().unwrap()
    };
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .fold((0, 0), |(f, n), c| (f + minor(c[3]), n + minor(c[4])))
}

fn cents(m: &Option<pb::Money>) -> i64 {
    let s = amt(m);
    let negative = s.starts_with('-');
    let (units, frac) = s.trim_start_matches('-').split_once('.').unwrap();
    let v = units.parse::<i64>().unwrap() * 100 + frac.parse::<i64>().unwrap();
    if negative {
        -v
    } else {
        v
    }
}

/// Four reports for one day, each superseding the one before: every run books the
/// difference from the last (so the fee and bank accounts hold exactly the current
/// report's totals), a resolution carries over to the same discrepancy in the next
/// report and is reversed once a report no longer has it, a superseded run's items can
/// no longer be resolved, and with the current run's items resolved the clearing
/// account is at zero, to the cent, after every report.
async fn a_later_report_supersedes_the_days_books(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    for (i, amount) in ["10.00", "20.00", "30.00"].iter().enumerate() {
        app.send(&alice, &format!("card-{i}"), "bob", amount, pb::FundingSource::Card).await.unwrap();
    }
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let sandbox = dmpay::processor::sandbox::Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let clean = dmpay::processor::CardProcessor::settlement_report(&sandbox, &date).await.unwrap();
    let fin = app.token("finance-staff", "finance");
    let svc = app.token("svc", LEDGER_SCOPES);
    let client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let import = |csv: String| {
        let (mut c, fin, date) = (client.clone(), fin.clone(), date.clone());
        async move {
            c.import_settlement_report(authed(
                pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv },
                &fin,
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let open_items = |run_id: String| {
        let (mut c, fin) = (client.clone(), fin.clone());
        async move {
            c.list_reconciliation_items(authed(
                pb::ListReconciliationItemsRequest { run_id, open: true, ..Default::default() },
                &fin,
            ))
            .await
            .unwrap()
            .into_inner()
            .items
        }
    };
    let resolve = |item_id: String| {
        let (mut c, fin) = (client.clone(), fin.clone());
        async move {
            c.resolve_reconciliation_item(authed(
                pb::ResolveReconciliationItemRequest {
                    item_id,
                    resolution: pb::ReconciliationResolution::Suspense as i32,
                    note: "booked to suspense pending the processor's answer".into(),
                },
                &fin,
            ))
            .await
        }
    };
    // After each report, with its items resolved: the books hold its totals, clearing
    // is zero, and the ledger verifies.
    let books_follow = |csv: String| {
        let (app, svc) = (&app, svc.clone());
        async move {
            let (fees, net) = report_totals(&csv);
            assert_eq!(cents(&balance(app, &svc, "platform:processor_fees:USD").await.posted), fees);
            assert_eq!(cents(&balance(app, &svc, "platform:settlement_bank:USD").await.posted), net);
            assert_eq!(amt(&balance(app, &svc, "processor:sandbox:clearing:USD").await.posted), "0.00");
            assert!(app.verify().await.ok());
        }
    };

    // 1. The first row is missing: resolved to suspense.
    let r1_csv = dmpay::processor::sandbox::inject_discrepancies(&clean, Some(1), None, false, &date).unwrap();
    let r1 = import(r1_csv.clone()).await;
    assert!(r1.current && r1.created && r1.superseded_run_id.is_empty());
    assert_eq!(r1.bookings.len(), 2, "fees and settlement: {:?}", r1.bookings);
    let items = open_items(r1.run_id.clone()).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].status, pb::ReconciliationItemStatus::MissingInReport as i32);
    let first_adjustment = resolve(items[0].item_id.clone()).await.unwrap().into_inner().adjustment_entry_id;
    assert!(!first_adjustment.is_empty());
    books_follow(r1_csv.clone()).await;

    // 2. Still missing, and the second row changed: the resolution carries over (no new
    // adjustment), the change is open; the books move by the change only.
    let r2_csv = dmpay::processor::sandbox::inject_discrepancies(&clean, Some(1), Some(2), false, &date).unwrap();
    let entries_before = app.count("ledger_entries").await;
    let r2 = import(r2_csv.clone()).await;
    assert_eq!(r2.superseded_run_id, r1.run_id);
    assert_eq!(r2.carried_resolutions, 1);
    assert_eq!(
        r2.bookings.iter().map(|b| (b.kind(), amt(&b.amount))).collect::<Vec<_>>(),
        [(pb::ReconciliationBookingKind::ProcessorSettlement, "1.00".to_string())],
        "the changed row's net grew by 1.00; its fee did not change"
    );
    assert_eq!(app.count("ledger_entries").await, entries_before + 1);
    let items = open_items(r2.run_id.clone()).await;
    assert_eq!(items.iter().map(|i| i.status()).collect::<Vec<_>>(), [pb::ReconciliationItemStatus::AmountMismatch]);
    // The superseded run answers as such, and its items are closed.
    let again = import(r1_csv.clone()).await;
    assert_eq!((again.run_id.as_str(), again.current, again.created), (r1.run_id.as_str(), false, false));
    assert_eq!(app.count("ledger_entries").await, entries_before + 1, "re-importing booked nothing new");
    let r1_items: Vec<pb::ReconciliationItem> = client
        .clone()
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: r1.run_id.clone(), ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(r1_items.iter().all(|i| i.superseded));
    resolve(items[0].item_id.clone()).await.unwrap();
    books_follow(r2_csv.clone()).await;

    // 3. The full, clean report: nothing open, and both adjustments are reversed.
    let r3 = import(clean.clone()).await;
    assert_eq!(r3.superseded_run_id, r2.run_id);
    assert!(open_items(r3.run_id.clone()).await.is_empty());
    let reversals: Vec<&pb::ReconciliationBooking> =
        r3.bookings.iter().filter(|b| b.kind == pb::ReconciliationBookingKind::AdjustmentReversal as i32).collect();
    assert_eq!(reversals.len(), 2, "{:?}", r3.bookings);
    books_follow(clean.clone()).await;

    // 4. A changed row and an extra one, resolved.
    let r4_csv = dmpay::processor::sandbox::inject_discrepancies(&clean, None, Some(3), true, &date).unwrap();
    let r4 = import(r4_csv.clone()).await;
    let items = open_items(r4.run_id.clone()).await;
    assert_eq!(items.len(), 2);
    for i in items {
        resolve(i.item_id).await.unwrap();
    }
    books_follow(r4_csv).await;
    let tb = client.clone().get_trial_balance(authed(pb::GetTrialBalanceRequest::default(), &fin)).await.unwrap();
    assert!(tb.into_inner().balanced);
}

/// An open item of a superseded run cannot be resolved: ITEM_SUPERSEDED, nothing written.
async fn a_superseded_item_cannot_be_resolved(app: TestApp) {
    app.users(CAST).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, "4242424242424242", true).await.unwrap();
    app.send(&alice, "c1", "bob", "10.00", pb::FundingSource::Card).await.unwrap();
    app.send(&alice, "c2", "bob", "20.00", pb::FundingSource::Card).await.unwrap();
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let sandbox = dmpay::processor::sandbox::Sandbox::new(app.db.clone(), Default::default(), app.clock.clone());
    let clean = dmpay::processor::CardProcessor::settlement_report(&sandbox, &date).await.unwrap();
    let fin = app.token("finance-staff", "finance");
    let mut client = pb::finance_client::FinanceClient::new(app.channel.clone());
    let dropped = dmpay::processor::sandbox::inject_discrepancies(&clean, Some(1), None, false, &date).unwrap();
    for csv in [dropped, clean] {
        client
            .import_settlement_report(authed(
                pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date.clone(), csv },
                &fin,
            ))
            .await
            .unwrap();
    }
    let stale: String = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT i.item_id FROM recon_items i JOIN recon_runs r ON r.run_id = i.run_id \
         WHERE i.status = 'missing_in_report' ORDER BY r.created_at_us LIMIT 1"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    let (entries, resolutions) = (app.count("ledger_entries").await, app.count("recon_resolutions").await);
    let e = client
        .resolve_reconciliation_item(authed(
            pb::ResolveReconciliationItemRequest {
                item_id: stale,
                resolution: pb::ReconciliationResolution::Suspense as i32,
                note: "late".into(),
            },
            &fin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.get_error_details().error_info().unwrap().reason, "ITEM_SUPERSEDED");
    assert_eq!((app.count("ledger_entries").await, app.count("recon_resolutions").await), (entries, resolutions));
}

/// The export shows what the ledger says as it runs: a hold later voided is `voided`
/// (not `pending`), names the void, and the void is a row of its own; a hold later
/// posted is `posted` and the entry that posted it names it.
async fn export_shows_holds_as_they_ended(app: TestApp) {
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "50.00").await;
    let hold = |key: &str, amount: &str| pb::PostEntryRequest {
        pending: true,
        ..transfer(key, "user:alice:wallet:USD", "platform:treasury:USD", amount)
    };
    let voided = app.ledger().post_entry(authed(hold("h1", "5.00"), &t)).await.unwrap().into_inner();
    let posted = app.ledger().post_entry(authed(hold("h2", "7.00"), &t)).await.unwrap().into_inner();
    let open = app.ledger().post_entry(authed(hold("h3", "1.00"), &t)).await.unwrap().into_inner();
    let void = app
        .ledger()
        .void_pending(authed(
            pb::VoidPendingRequest { entry_id: voided.entry_id.clone(), idempotency_key: "v1".into() },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let post = app
        .ledger()
        .post_pending(authed(
            pb::PostPendingRequest { entry_id: posted.entry_id.clone(), idempotency_key: "p1".into(), amount: None },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let fin = app.token("finance-staff", "finance");
    let mut stream = pb::finance_client::FinanceClient::new(app.channel.clone())
        .export_entries(authed(
            pb::ExportEntriesRequest { format: pb::ExportFormat::Jsonl as i32, ..Default::default() },
            &fin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        jsonl.extend(chunk.data);
    }
    let rows: Vec<serde_json::Value> =
        String::from_utf8(jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |id: &str| rows.iter().filter(|r| r["entry_id"] == id).cloned().collect::<Vec<_>>();
    let h1 = of(&voided.entry_id);
    assert_eq!(h1.len(), 2, "the hold's two postings");
    assert!(
        h1.iter().all(|r| r["status"] == "voided" && r["resolved_by_entry_id"] == void.entry_id.as_str()),
        "{h1:?}"
    );
    assert!(h1.iter().all(|r| r["reservation"] == true), "a hold's postings reserve, they moved nothing");
    let v = of(&void.entry_id);
    assert_eq!(v.len(), 1, "the void is a row of its own");
    assert_eq!(v[0]["status"], "voided");
    assert_eq!(v[0]["resolves_entry_id"], voided.entry_id.as_str());
    assert_eq!((v[0]["account"].as_str(), v[0]["amount"].as_str()), (Some(""), Some("")));
    assert!(of(&posted.entry_id)
        .iter()
        .all(|r| r["status"] == "posted" && r["resolved_by_entry_id"] == post.entry_id.as_str()));
    assert!(of(&post.entry_id).iter().all(|r| r["resolves_entry_id"] == posted.entry_id.as_str()));
    assert!(of(&post.entry_id).iter().all(|r| r["reservation"] == false));
    // The money moved: the rows that are not reservations. The posted hold's 7.00 counts
    // once (through the entry that posted it), the voided and the open hold not at all.
    let moved_out_of_alice: Vec<&str> = rows
        .iter()
        .filter(|r| r["reservation"] == false && r["account"] == "user:alice:wallet:USD" && r["direction"] == "debit")
        .map(|r| r["amount"].as_str().unwrap())
        .collect();
    assert_eq!(moved_out_of_alice, ["7.00"]);
    assert!(of(&open.entry_id).iter().all(|r| r["status"] == "pending" && r["resolved_by_entry_id"] == ""));
    // The sequence order holds: every entry, once, in order.
    let mut seqs: Vec<i64> = rows.iter().map(|r| r["sequence"].as_i64().unwrap()).collect();
    seqs.dedup();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs.len() as i64, app.count("ledger_entries").await);
}

backend_tests!(
    export_shows_holds_as_they_ended,
    a_later_report_supersedes_the_days_books,
    a_superseded_item_cannot_be_resolved,
    rows_without_reference_match_by_amount_and_time,
    export_of_a_large_range_streams,
    two_days_of_card_payments_reconcile,
    statements_show_every_movement,
    trial_balance_now_and_in_the_past,
    cli_prints_readable_tables,
    export_streams_every_posting,
    reconcile_clean_and_with_discrepancies
);
