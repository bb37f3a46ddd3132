//! Disputes (chargebacks) through the real server: the sandbox's dispute card, booking
//! and recovery from the recipient (wallet, then receivable), the debt blocking sends and
//! payouts and repaid by incoming money, won and lost decisions, the platform policy,
//! finance's reads and reconciliation.

use dmpay::processor::sandbox::{Sandbox, DISPUTED_CARD};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;
use crate::{backend_fn_tests, backend_tests};

fn amt(m: &Option<pb::Money>) -> &str {
    m.as_ref().map(|m| m.amount.as_str()).unwrap_or("")
}

fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

fn finance(app: &TestApp) -> (pb::finance_client::FinanceClient<tonic::transport::Channel>, String) {
    (pb::finance_client::FinanceClient::new(app.channel.clone()), app.token("finance-staff", "finance"))
}

async fn disputes(app: &TestApp, open_only: bool) -> pb::ListDisputesResponse {
    let (mut f, t) = finance(app);
    f.list_disputes(authed(pb::ListDisputesRequest { open_only, ..Default::default() }, &t))
        .await
        .expect("list disputes")
        .into_inner()
}

async fn receivables(app: &TestApp) -> Vec<(String, String)> {
    let (mut f, t) = finance(app);
    f.list_receivables(authed(pb::ListReceivablesRequest::default(), &t))
        .await
        .expect("list receivables")
        .into_inner()
        .receivables
        .into_iter()
        .map(|r| (r.user_id, amt(&r.owed).to_owned()))
        .collect()
}

async fn payment(app: &TestApp, token: &str, id: &str) -> pb::Payment {
    app.payments()
        .get_payment(authed(pb::GetPaymentRequest { payment_id: id.into() }, token))
        .await
        .expect("get payment")
        .into_inner()
}

async fn capture_ref(app: &TestApp, payment_id: &str) -> String {
    dmpay::with_db!(&app.db, pool => sqlx::query_scalar::<_, String>("SELECT capture_ref FROM payments WHERE payment_id = $1")
        .bind(payment_id)
        .fetch_one(pool)
        .await)
    .expect("capture ref")
}

async fn posted(app: &TestApp, code: &str) -> String {
    let svc = app.token("svc", LEDGER_SCOPES);
    amt(&balance(app, &svc, code).await.posted).to_owned()
}

fn sandbox(app: &TestApp) -> Sandbox {
    Sandbox::new(app.db.clone(), Default::default(), app.clock.clone())
}

/// Every event of `token`'s user after sequence 0, read until `n` have come.
async fn event_types(app: &TestApp, token: &str, n: usize) -> Vec<i32> {
    let mut stream = app
        .payments()
        .watch_payments(authed(pb::WatchPaymentsRequest { after_sequence: 0, ..Default::default() }, token))
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await.expect("event in time");
        out.push(next.expect("stream ok").expect("stream open").r#type);
    }
    out
}

/// Bob pays Alice 30.00 with the dispute test card; Alice cashes 20.00 of it out to her
/// card; the dispute takes her last 10.00 and books 20.00 as her debt (her wallet "goes
/// negative" into a receivable), which blocks her sends and payouts until incoming money
/// repays it; the won dispute gives the 30.00 back, to the debt first.
async fn a_dispute_is_recovered_from_the_recipient_and_won_back(app: TestApp) {
    app.users(CAST).await;
    let (alice, bob) = (app.token("alice", PAY_SCOPES), app.token("bob", PAY_SCOPES));
    app.add_card(&bob, DISPUTED_CARD, true).await.unwrap();
    let paid = app.send(&bob, "disputed", "alice", "30.00", pb::FundingSource::Card).await.unwrap();
    assert_eq!(paid.status, pb::PaymentStatus::Settled as i32);
    app.add_card(&alice, "4000056655665556", true).await.unwrap();
    let cashed = app
        .payments()
        .create_payout(authed(
            pb::CreatePayoutRequest { idempotency_key: "cash-out".into(), amount: usd("20.00"), ..Default::default() },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cashed.status, pb::PayoutStatus::Paid as i32);

    // The processor reported the dispute at the capture; the resolver applies it.
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 0, "applied once");
    let p = payment(&app, &alice, &paid.payment_id).await;
    assert_eq!(p.dispute_status, pb::DisputeStatus::Open as i32);
    assert_eq!(payment(&app, &bob, &paid.payment_id).await.dispute_status, pb::DisputeStatus::Open as i32);
    assert_eq!(amt(&app.wallet("alice").await.available), "0.00");
    assert_eq!(posted(&app, "user:alice:receivable:USD").await, "20.00");
    // 30.00 captured, 20.00 paid out to Alice's card, 30.00 taken back.
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "-20.00");
    assert_books_balance(&app).await;
    assert_eq!(receivables(&app).await, vec![("alice".to_string(), "20.00".to_string())]);
    let open = disputes(&app, true).await;
    assert_eq!(open.disputes.len(), 1);
    let d = &open.disputes[0];
    assert_eq!((d.payment_id.as_str(), d.recovered_from.as_str()), (paid.payment_id.as_str(), "alice"));
    assert_eq!(
        (amt(&d.amount), amt(&d.fee), amt(&d.from_wallet), amt(&d.to_receivable)),
        ("30.00", "15.00", "10.00", "20.00")
    );
    assert_eq!((open.at_risk.len(), amt(&open.at_risk[0].amount_at_risk)), (1, "30.00"));

    // Both parties hear of it.
    let disputed = pb::PaymentEventType::PaymentDisputed as i32;
    // Bob: created, settled, disputed; Alice: those and her payout's created and paid.
    assert_eq!(event_types(&app, &bob, 3).await[2], disputed);
    assert_eq!(event_types(&app, &alice, 5).await[4], disputed);

    // While she owes, Alice can neither send nor cash out.
    let svc = app.token("svc", LEDGER_SCOPES);
    fund(&app, &svc, "alice", "15.00").await;
    let err = app.send(&alice, "blocked", "carol", "1.00", pb::FundingSource::Balance).await.unwrap_err();
    assert_eq!((err.code(), reason(&err)), (Code::FailedPrecondition, "RECEIVABLE_OUTSTANDING".to_string()));
    let err = app
        .payments()
        .create_payout(authed(
            pb::CreatePayoutRequest { idempotency_key: "po".into(), amount: usd("1.00"), ..Default::default() },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "RECEIVABLE_OUTSTANDING");
    // A retry of what she did before the debt still gets its answer.
    let again = app
        .payments()
        .create_payout(authed(
            pb::CreatePayoutRequest { idempotency_key: "cash-out".into(), amount: usd("20.00"), ..Default::default() },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.payout_id, cashed.payout_id);
    // Nor can she move money out by refunding.
    let err = app
        .payments()
        .refund_payment(authed(
            pb::RefundPaymentRequest {
                payment_id: paid.payment_id.clone(),
                idempotency_key: "refund".into(),
                amount: usd("1.00"),
                reason: String::new(),
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "RECEIVABLE_OUTSTANDING");
    // Incoming money repays the debt first.
    assert_eq!(app.payments_service.collect_receivables().await.unwrap(), 1);
    assert_eq!(posted(&app, "user:alice:receivable:USD").await, "5.00");
    assert_eq!(amt(&app.wallet("alice").await.available), "0.00");

    // Won: 5.00 clears the rest of the debt, 25.00 comes back to the wallet.
    let dispute_ref = d.processor_reference.clone();
    sandbox(&app).decide_dispute(&dispute_ref, true).await.unwrap();
    assert!(sandbox(&app).decide_dispute(&dispute_ref, false).await.is_err(), "decided once");
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    assert_eq!(payment(&app, &alice, &paid.payment_id).await.dispute_status, pb::DisputeStatus::Won as i32);
    assert_eq!(posted(&app, "user:alice:receivable:USD").await, "0.00");
    assert_eq!(amt(&app.wallet("alice").await.available), "25.00");
    assert!(receivables(&app).await.is_empty());
    assert!(disputes(&app, true).await.disputes.is_empty());
    assert_eq!(disputes(&app, false).await.disputes[0].status, pb::DisputeStatus::Won as i32);
    // No longer owing, she can send again.
    app.payments_service.collect_receivables().await.unwrap();
    app.send(&alice, "free-again", "carol", "1.00", pb::FundingSource::Balance).await.unwrap();
    assert_books_balance(&app).await;
}

/// With `DMPAY_DISPUTE_RECOVERY=platform` the platform bears the dispute; a lost
/// dispute moves nothing more.
async fn the_platform_can_bear_a_lost_dispute(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_DISPUTE_RECOVERY", "platform")]).await else { return };
    app.users(CAST).await;
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let paid = app.send(&bob, "card", "alice", "12.00", pb::FundingSource::Card).await.unwrap();
    let capture = capture_ref(&app, &paid.payment_id).await;
    let dispute_ref = sandbox(&app).open_dispute(&capture).await.unwrap();
    assert_eq!(sandbox(&app).open_dispute(&capture).await.unwrap(), dispute_ref, "one dispute per capture");
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    assert_eq!(amt(&app.wallet("alice").await.available), "12.00", "the recipient keeps the money");
    assert_eq!(posted(&app, "platform:dispute_losses:USD").await, "12.00");
    assert!(receivables(&app).await.is_empty());
    let d = &disputes(&app, true).await.disputes[0];
    assert_eq!((d.recovered_from.as_str(), amt(&d.to_receivable)), ("", "0.00"));

    sandbox(&app).decide_dispute(&dispute_ref, false).await.unwrap();
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    let alice = app.token("alice", PAY_SCOPES);
    assert_eq!(payment(&app, &alice, &paid.payment_id).await.dispute_status, pb::DisputeStatus::Lost as i32);
    assert_eq!(posted(&app, "platform:dispute_losses:USD").await, "12.00");
    assert!(disputes(&app, true).await.at_risk.is_empty());
    assert_books_balance(&app).await;
    app.stop().await;
}

/// The settlement report carries the dispute (with its fee) and its reversal, and
/// reconciliation matches both against the ledger.
async fn disputes_reconcile_against_the_settlement_report(app: TestApp) {
    app.users(CAST).await;
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, DISPUTED_CARD, true).await.unwrap();
    app.send(&bob, "disputed", "alice", "30.00", pb::FundingSource::Card).await.unwrap();
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    let dispute_ref = disputes(&app, false).await.disputes[0].processor_reference.clone();
    sandbox(&app).decide_dispute(&dispute_ref, true).await.unwrap();
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);

    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let report = dmpay::processor::CardProcessor::settlement_report(&sandbox(&app), &date).await.unwrap();
    assert!(report.contains(",dispute,-30.00,15.00,-45.00,USD,"), "{report}");
    assert!(report.contains(",dispute_reversal,30.00,0.00,30.00,USD,"), "{report}");
    let (mut f, t) = finance(&app);
    let run = f
        .import_settlement_report(authed(
            pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv: report },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (run.rows, run.matched, run.amount_mismatch, run.missing_in_ledger, run.missing_in_report),
        (3, 3, 0, 0, 0)
    );
    // The dispute fee is a processor fee: with the capture's 1.17, 16.17 in all.
    assert_eq!(posted(&app, "platform:processor_fees:USD").await, "16.17");
    assert_eq!(posted(&app, "processor:sandbox:clearing:USD").await, "0.00");
    assert_books_balance(&app).await;
}

/// Finance's reads check their input, and need the finance scope.
async fn dispute_reads_check_their_input(app: TestApp) {
    let (mut f, t) = finance(&app);
    let err = f
        .list_disputes(authed(pb::ListDisputesRequest { page_token: "x".into(), ..Default::default() }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = f
        .list_receivables(authed(pb::ListReceivablesRequest { page_size: 501, ..Default::default() }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let user = app.token("alice", PAY_SCOPES);
    let err = f.list_disputes(authed(pb::ListDisputesRequest::default(), &user)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// `dmpay processor dispute open|decide` on the server's database, then `dmpay finance
/// disputes` and `receivables` against the running server.
async fn the_cli_opens_decides_and_lists_disputes(app: TestApp) {
    app.users(CAST).await;
    let bob = app.token("bob", PAY_SCOPES);
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let paid = app.send(&bob, "card", "alice", "20.00", pb::FundingSource::Card).await.unwrap();
    let capture = capture_ref(&app, &paid.payment_id).await;
    let url = secrecy::ExposeSecret::expose_secret(&app.config.database_url).to_owned();
    let fin = app.token("finance-staff", "finance");
    let addr = format!("http://{}", app.addr);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
            .args(args)
            .env("DMPAY_ENV", "development")
            .env("DMPAY_DATABASE_URL", &url)
            .env_remove("DMPAY_CONFIG")
            .output()
            .expect("run dmpay")
    };
    let out = cli(&["processor", "dispute", "open", "--capture", &capture]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let reference = text.split_whitespace().nth(1).expect("the dispute's reference").to_owned();
    assert!(reference.starts_with("sbx_"), "{text}");
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);

    let out = cli(&["finance", "disputes", "--open", "--addr", &addr, "--token", &fin]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&paid.payment_id) && text.contains(&reference) && text.contains("open"), "{text}");
    assert!(text.contains("amount at risk"), "{text}");
    // Alice's wallet covered it all: nobody owes.
    let out = cli(&["finance", "receivables", "--addr", &addr, "--token", &fin]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("owed") && !text.contains("alice"), "{text}");

    let out = cli(&["processor", "dispute", "decide", "--dispute", &reference, "--outcome", "lost"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["processor", "dispute", "decide", "--dispute", &reference, "--outcome", "won"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already decided"));
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 1);
    let alice = app.token("alice", PAY_SCOPES);
    assert_eq!(payment(&app, &alice, &paid.payment_id).await.dispute_status, pb::DisputeStatus::Lost as i32);
    assert_books_balance(&app).await;
}

/// A dispute on a partially refunded payment recovers from the recipient only what was
/// not refunded (the platform bears the refunded part); on a fully refunded payment,
/// and on a capture dmpay never made, dmpay books nothing and reconciliation shows the
/// report's dispute row as an exception.
async fn refunded_and_unknown_charges(app: TestApp) {
    app.users(CAST).await;
    let (alice, bob) = (app.token("alice", PAY_SCOPES), app.token("bob", PAY_SCOPES));
    app.add_card(&bob, "4242424242424242", true).await.unwrap();
    let partly = app.send(&bob, "partly", "alice", "30.00", pb::FundingSource::Card).await.unwrap();
    let fully = app.send(&bob, "fully", "alice", "8.00", pb::FundingSource::Card).await.unwrap();
    let refund = |id: String, key: &'static str, amount: Option<pb::Money>| {
        let mut c = app.payments();
        let alice = alice.clone();
        async move {
            c.refund_payment(authed(
                pb::RefundPaymentRequest { payment_id: id, idempotency_key: key.into(), amount, reason: String::new() },
                &alice,
            ))
            .await
            .unwrap()
        }
    };
    refund(partly.payment_id.clone(), "r1", usd("10.00")).await;
    refund(fully.payment_id.clone(), "r2", None).await;
    let sb = sandbox(&app);
    sb.open_dispute(&capture_ref(&app, &partly.payment_id).await).await.unwrap();
    sb.open_dispute(&capture_ref(&app, &fully.payment_id).await).await.unwrap();
    // A capture the sandbox made for someone else: dmpay never saw it.
    let card = dmpay::vault::card::validate("4242424242424242", 12, 2034, "123", (2026, 1)).unwrap();
    let details = dmpay::processor::CardDetails { pan: &card.pan, exp_month: 12, exp_year: 2034, cvc: None };
    let usd10 =
        dmpay::kernel::money::Money::from_minor(dmpay::kernel::money::Currency::from_code("USD").unwrap(), 1_000);
    use dmpay::processor::CardProcessor;
    let auth = sb.authorize("elsewhere:auth", details, usd10).await.unwrap();
    let stranger = sb.capture("elsewhere:capture", &auth, usd10).await.unwrap();
    sb.open_dispute(&stranger).await.unwrap();
    assert_eq!(app.payments_service.apply_processor_notifications().await.unwrap(), 3);

    // Partly refunded: 20.00 from Alice (her wallet holds 20.00 + 0.00), 10.00 the platform's.
    let listed = disputes(&app, false).await.disputes;
    assert_eq!(listed.len(), 1, "only the partly refunded payment's dispute is booked");
    let d = &listed[0];
    assert_eq!(d.payment_id, partly.payment_id);
    assert_eq!((amt(&d.from_wallet), amt(&d.to_receivable), amt(&d.platform_share)), ("20.00", "0.00", "10.00"));
    assert_eq!(posted(&app, "platform:dispute_losses:USD").await, "10.00");
    assert_eq!(amt(&app.wallet("alice").await.available), "0.00");
    let alice_fully = payment(&app, &alice, &fully.payment_id).await;
    assert_eq!(alice_fully.dispute_status, pb::DisputeStatus::Unspecified as i32);
    assert_books_balance(&app).await;

    // Reconciliation: the booked dispute matches; the fully refunded payment's dispute and
    // the stranger's capture and dispute are exceptions.
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let date = format!("{:04}-{:02}-{:02}", today.0, today.1, today.2);
    let report = dmpay::processor::CardProcessor::settlement_report(&sb, &date).await.unwrap();
    let (mut f, t) = finance(&app);
    let run = f
        .import_settlement_report(authed(
            pb::ImportSettlementReportRequest { processor: "sandbox".into(), report_date: date, csv: report },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    // Rows: two captures of dmpay's and the stranger's, three disputes.
    assert_eq!((run.rows, run.matched, run.missing_in_ledger, run.missing_in_report), (6, 3, 3, 0));
    let items = f
        .list_reconciliation_items(authed(
            pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), open: true, ..Default::default() },
            &t,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    let refs: Vec<&str> = items.iter().map(|i| i.processor_reference.as_str()).collect();
    assert!(refs.contains(&stranger.as_str()), "{refs:?}");
    assert_books_balance(&app).await;
}

backend_tests!(
    refunded_and_unknown_charges,
    the_cli_opens_decides_and_lists_disputes,
    a_dispute_is_recovered_from_the_recipient_and_won_back,
    disputes_reconcile_against_the_settlement_report,
    dispute_reads_check_their_input,
);

backend_fn_tests!(the_platform_can_bear_a_lost_dispute);
