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

backend_tests!(trial_balance_now_and_in_the_past, cli_prints_readable_tables);
