//! Finance through the real server and the CLI, on both backends.

use tonic::Code;

use crate::backend_tests;
use crate::helpers::*;

fn amt(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

async fn trial_balance_now_and_in_the_past(app: TestApp) {
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
    // The library pages: a page of 5 rows across 24 postings.
    let mut cursor = dmpay::finance::export::Cursor::default();
    let mut pages = 0;
    let mut lines = 0;
    loop {
        let (data, rows, next) =
            dmpay::finance::export::page(&app.db, 0, i64::MAX, cursor, 5, dmpay::finance::export::Format::Csv)
                .await
                .unwrap();
        lines += String::from_utf8(data).unwrap().lines().count();
        assert!(lines % 5 == 0 || next.is_none());
        pages += 1;
        assert!(rows <= 5);
        match next {
            Some(c) => cursor = c,
            None => break,
        }
    }
    assert_eq!(lines, 24);
    assert_eq!(pages, 5);

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
    assert_eq!(rows[0], "entry_id,sequence,created_at,kind,status,account,direction,amount,currency,metadata");
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

backend_tests!(trial_balance_now_and_in_the_past, cli_prints_readable_tables, export_streams_every_posting);
