//! Data at rest: a removed card's number is destroyed after its retention, the SQLite
//! files and what dmpay writes out are readable by their owner only, and text that
//! lands in a chat bubble cannot be made to read other than it is.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

/// A card removed longer ago than DMPAY_VAULT_REMOVED_RETENTION has its wrapped data
/// key and ciphertext emptied by the background task (audited), its row kept; the
/// account's other card still pays, and key rotation passes the destroyed one by.
async fn removed_cards_are_destroyed_after_retention(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[("DMPAY_VAULT_REMOVED_RETENTION", "1s"), ("DMPAY_VAULT_PURGE_INTERVAL", "200ms")],
    )
    .await
    else {
        return;
    };
    app.users(&["bob"]).await;
    let alice = app.token("alice", PAY_SCOPES);
    let old = app.add_card(&alice, "4242424242424242", true).await.unwrap();
    let kept = app.add_card(&alice, "5555555555554444", false).await.unwrap();
    app.methods()
        .remove_payment_method(authed(pb::RemovePaymentMethodRequest { token: old.token.clone() }, &alice))
        .await
        .unwrap();
    let sealed = |token: String| {
        let db = app.db.clone();
        async move {
            dmpay::with_db!(&db, pool => sqlx::query_as::<_, (Vec<u8>, Vec<u8>, String, Option<i64>)>(
                "SELECT wrapped_dek, pan_ciphertext, kek_id, destroyed_at_us FROM payment_methods WHERE token = $1"
            )
            .bind(token)
            .fetch_one(pool)
            .await)
            .unwrap()
        }
    };
    assert!(!sealed(old.token.clone()).await.0.is_empty(), "kept during the retention");
    let mut destroyed = None;
    for _ in 0..100 {
        let s = sealed(old.token.clone()).await;
        if s.3.is_some() {
            destroyed = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dek, ciphertext, kek, _) = destroyed.expect("the removed card was destroyed");
    assert!(dek.is_empty() && ciphertext.is_empty(), "no key, no ciphertext");
    assert_eq!(kek, "destroyed");
    let audits: i64 = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'card.destroy' AND target = $1"
    )
    .bind(format!("pm:{}", old.token))
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(audits, 1);
    // The row stays, for history.
    let listed = app
        .methods()
        .list_payment_methods(authed(pb::ListPaymentMethodsRequest { include_removed: true }, &alice))
        .await
        .unwrap()
        .into_inner()
        .payment_methods;
    assert!(listed.iter().any(|m| m.token == old.token && m.last4 == "4242"));
    // The other card is untouched and pays.
    assert!(!sealed(kept.token.clone()).await.0.is_empty());
    let p = app
        .payments()
        .send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "after".into(),
                recipient_id: "bob".into(),
                amount: usd("3.00"),
                funding_source: pb::FundingSource::Card as i32,
                payment_method_token: kept.token.clone(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, pb::PaymentStatus::Settled as i32);
    // Rotation re-wraps the live key and passes the destroyed card by.
    assert_eq!(app.vault.rotate("test").await.unwrap(), 0, "everything is under the active key already");
}

/// The SQLite database, its log and shared memory, and the files dmpay writes out are
/// readable and writable by their owner only.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let treasury = app.token("svc", LEDGER_SCOPES);
    fund(&app, &treasury, "alice", "5.00").await;
    let url = secrecy::ExposeSecret::expose_secret(&app.config.database_url).to_owned();
    let path = url.trim_start_matches("sqlite://").to_owned();
    let mode = |p: &str| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&path).unwrap(), 0o600, "{path}");
    for suffix in ["-wal", "-shm"] {
        let file = format!("{path}{suffix}");
        assert_eq!(mode(&file).unwrap(), 0o600, "{file}");
    }
    // The processor's settlement report written by the CLI.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.csv");
    let today = dmpay::kernel::dates::ymd(app.clock.now_us());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .args(["processor", "report", "--date", &format!("{:04}-{:02}-{:02}", today.0, today.1, today.2)])
        .args(["--out", report.to_str().unwrap()])
        .env("DMPAY_ENV", "development")
        .env("DMPAY_DATABASE_URL", &url)
        .env_remove("DMPAY_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(report.to_str().unwrap()).unwrap(), 0o600);
    // A database made in a folder dmpay creates: the folder is the owner's only.
    let fresh = dir.path().join("var").join("dmpay.db");
    let db = dmpay::store::Db::connect_url(&format!("sqlite://{}", fresh.display()), 1, Duration::from_secs(5))
        .await
        .unwrap();
    db.close().await;
    assert_eq!(mode(fresh.to_str().unwrap()).unwrap(), 0o600);
    assert_eq!(mode(fresh.parent().unwrap().to_str().unwrap()).unwrap(), 0o700);
}

/// Notes and display names refuse bidirectional overrides and invisible characters
/// (what a chat bubble would show reordered or hidden), naming the field, and write
/// nothing; emoji built with a zero-width joiner pass.
async fn text_cannot_spoof_a_chat_bubble(app: TestApp) {
    app.users(&["bob"]).await;
    let treasury = app.token("svc", LEDGER_SCOPES);
    fund(&app, &treasury, "alice", "10.00").await;
    let alice = app.token("alice", PAY_SCOPES);
    let payments = app.count("payments").await;
    for note in ["refund \u{202E}001 ", "pay\u{200B}pal", "\u{2067}evil\u{2069}", "x\u{FEFF}"] {
        let e = app
            .payments()
            .send_payment(authed(
                pb::SendPaymentRequest {
                    idempotency_key: format!("n{}", note.len()),
                    recipient_id: "bob".into(),
                    amount: usd("1.00"),
                    note: note.into(),
                    ..Default::default()
                },
                &alice,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{note:?}");
        assert_eq!(e.get_error_details().bad_request().unwrap().field_violations[0].field, "note");
        let e = app
            .payments()
            .request_payment(authed(
                pb::RequestPaymentRequest {
                    idempotency_key: "r".into(),
                    payer_id: "bob".into(),
                    amount: usd("1.00"),
                    note: note.into(),
                    ..Default::default()
                },
                &alice,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    assert_eq!(app.count("payments").await, payments);
    assert_eq!(app.count("payment_requests").await, 0);
    let admin = app.token("platform", "accounts:admin");
    let e = app
        .accounts()
        .upsert_account(authed(
            pb::UpsertAccountRequest { user_id: "carol".into(), display_name: "Ca\u{200D}rol".into(), tier: 0 },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.get_error_details().bad_request().unwrap().field_violations[0].field, "display_name");
    // An emoji made with a zero-width joiner is fine.
    let ok = app
        .payments()
        .send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "emoji".into(),
                recipient_id: "bob".into(),
                amount: usd("1.00"),
                note: "for the 🏳️\u{200D}🌈 party".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.note.contains('\u{200D}'));
}

crate::backend_tests!(text_cannot_spoof_a_chat_bubble);
crate::backend_fn_tests!(removed_cards_are_destroyed_after_retention);
