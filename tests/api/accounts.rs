use tonic::Code;

use crate::backend_tests;
use crate::helpers::{authed, pb, TestApp};

const ADMIN: &str = "accounts:admin";

async fn upsert_get_freeze_unfreeze(app: TestApp) {
    let admin = app.token("platform-accounts", ADMIN);
    let mut client = app.accounts();

    let created = client
        .upsert_account(authed(
            pb::UpsertAccountRequest {
                user_id: "alice".into(),
                display_name: "Alice".into(),
                tier: pb::Tier::Verified as i32,
            },
            &admin,
        ))
        .await
        .expect("upsert")
        .into_inner();
    assert_eq!(created.user_id, "alice");
    assert_eq!(created.display_name, "Alice");
    assert_eq!(created.tier, pb::Tier::Verified as i32);
    assert_eq!(created.status, pb::AccountStatus::Active as i32);
    assert!(created.created_at.is_some());

    // An empty name and an unspecified tier keep what is there.
    let again = client
        .upsert_account(authed(pb::UpsertAccountRequest { user_id: "alice".into(), ..Default::default() }, &admin))
        .await
        .expect("upsert again")
        .into_inner();
    assert_eq!(again.display_name, "Alice");
    assert_eq!(again.tier, pb::Tier::Verified as i32);
    assert_eq!(again.created_at, created.created_at);

    let frozen = client
        .freeze_account(authed(
            pb::FreezeAccountRequest { user_id: "alice".into(), reason: "chargeback ring".into() },
            &admin,
        ))
        .await
        .expect("freeze")
        .into_inner();
    assert_eq!(frozen.status, pb::AccountStatus::Frozen as i32);

    let alice = app.token("alice", "");
    let seen = client
        .get_account(authed(pb::GetAccountRequest { user_id: "alice".into() }, &alice))
        .await
        .expect("self get")
        .into_inner();
    assert_eq!(seen.status, pb::AccountStatus::Frozen as i32);

    let thawed = client
        .unfreeze_account(authed(
            pb::UnfreezeAccountRequest { user_id: "alice".into(), reason: "cleared".into() },
            &admin,
        ))
        .await
        .expect("unfreeze")
        .into_inner();
    assert_eq!(thawed.status, pb::AccountStatus::Active as i32);

    // Every admin change is in the audit trail, with actor and reason.
    let rows: Vec<(String, String, String)> = dmpay::with_db!(&app.db, pool => sqlx::query_as(
        "SELECT actor, action, reason FROM audit_log WHERE target = 'account:alice' ORDER BY id",
    )
    .fetch_all(pool)
    .await)
    .expect("audit rows");
    let actions: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(actions, ["account.upsert", "account.upsert", "account.freeze", "account.unfreeze"]);
    assert!(rows.iter().all(|r| r.0 == "platform-accounts"));
    assert_eq!(rows[2].2, "chargeback ring");
}

async fn first_use_creates_an_unverified_account(app: TestApp) {
    let bob = app.token("bob", "");
    let account = app
        .accounts()
        .get_account(authed(pb::GetAccountRequest { user_id: "bob".into() }, &bob))
        .await
        .expect("get own account")
        .into_inner();
    assert_eq!(account.tier, pb::Tier::Unverified as i32);
    assert_eq!(account.status, pb::AccountStatus::Active as i32);

    // An admin asking for a user nobody has seen gets NOT_FOUND.
    let admin = app.token("ops", ADMIN);
    let err = app
        .accounts()
        .get_account(authed(pb::GetAccountRequest { user_id: "nobody".into() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn bad_input_names_the_field_and_writes_nothing(app: TestApp) {
    let admin = app.token("ops", ADMIN);
    let mut client = app.accounts();
    let cases = [
        (pb::UpsertAccountRequest { user_id: "".into(), ..Default::default() }, "user_id"),
        (pb::UpsertAccountRequest { user_id: "has space".into(), ..Default::default() }, "user_id"),
        (pb::UpsertAccountRequest { user_id: "x".repeat(129), ..Default::default() }, "user_id"),
        (pb::UpsertAccountRequest { user_id: "carol".into(), display_name: "a\u{7}b".into(), tier: 0 }, "display_name"),
        (pb::UpsertAccountRequest { user_id: "carol".into(), display_name: "n".repeat(101), tier: 0 }, "display_name"),
        (pb::UpsertAccountRequest { user_id: "carol".into(), display_name: String::new(), tier: 42 }, "tier"),
    ];
    for (req, field) in cases {
        let err = client.upsert_account(authed(req, &admin)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        let details = tonic_types::StatusExt::get_error_details(&err);
        let bad = details.bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations[0].field, field);
    }
    let err = client
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "carol".into(), reason: "".into() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("reason"));

    let count: i64 =
        dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM accounts").fetch_one(pool).await)
            .expect("count");
    assert_eq!(count, 0, "rejected requests must not write");
    let audits: i64 =
        dmpay::with_db!(&app.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM audit_log").fetch_one(pool).await)
            .expect("count");
    assert_eq!(audits, 0);
}

async fn audit_log_is_append_only(app: TestApp) {
    let admin = app.token("ops", ADMIN);
    app.accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "dave".into(), reason: "test".into() }, &admin))
        .await
        .expect("freeze");
    let update = dmpay::with_db!(&app.db, pool => sqlx::query("UPDATE audit_log SET reason = 'edited'").execute(pool).await.map(|_| ()));
    assert!(update.is_err(), "UPDATE on audit_log must fail");
    let delete = dmpay::with_db!(&app.db, pool => sqlx::query("DELETE FROM audit_log").execute(pool).await.map(|_| ()));
    assert!(delete.is_err(), "DELETE on audit_log must fail");
}

backend_tests!(
    upsert_get_freeze_unfreeze,
    first_use_creates_an_unverified_account,
    bad_input_names_the_field_and_writes_nothing,
    audit_log_is_append_only,
);
