//! The database's own checks of the journal, on both backends: rows written by hand,
//! bypassing the code, in the order each backend's checks expect (PostgreSQL: the entry
//! and its postings in one statement, as the engine writes them; SQLite: the postings,
//! then their entry). Every forged entry that breaks a rule is refused, and the same
//! entry with the rule kept is accepted, so each refusal is the rule's doing. Every
//! write is rolled back.

use crate::backend_tests;
use crate::helpers::*;

const ALICE: &str = "user:alice:wallet:USD";
const TREASURY: &str = "platform:treasury:USD";
const EUR_A: &str = "test:eur:a";
const EUR_B: &str = "test:eur:b";

/// One posting of a forged entry: account code, direction, amount, currency, pending.
type Row = (&'static str, &'static str, i64, &'static str, bool);

/// The usual forged postings: the treasury debited, alice credited, both flagged
/// `pending`.
fn pair(debit: i64, credit: i64, pending: bool) -> [Row; 2] {
    [(TREASURY, "D", debit, "USD", pending), (ALICE, "C", credit, "USD", pending)]
}

/// A forged entry: its status, the pending entry it resolves (voided, expired) and its
/// postings.
struct Forged<'a> {
    status: &'a str,
    resolves: Option<&'a str>,
    postings: &'a [Row],
}

fn posted(postings: &[Row]) -> Forged<'_> {
    Forged { status: "posted", resolves: None, postings }
}

fn pending(postings: &[Row]) -> Forged<'_> {
    Forged { status: "pending", resolves: None, postings }
}

fn voided<'a>(resolves: &'a str, postings: &'a [Row]) -> Forged<'a> {
    Forged { status: "voided", resolves: Some(resolves), postings }
}

/// Writes `f` by hand in a transaction that is then rolled back, and says whether the
/// database accepted it.
async fn accepted(app: &TestApp, f: &Forged<'_>) -> Result<(), String> {
    let quote = |s: Option<&str>| s.map_or("NULL".to_string(), |s| format!("'{s}'"));
    let expires = if f.status == "pending" { "4000000000000000" } else { "NULL" };
    let entry = format!(
        "INSERT INTO ledger_entries (id, sequence, kind, status, pending_entry_id, expires_at_us, created_by, created_at_us) \
         VALUES ('forged', 1000000, 'forged', '{}', {}, {expires}, 'attacker', 0)",
        f.status,
        quote(f.resolves)
    );
    let rows: Vec<String> = f
        .postings
        .iter()
        .enumerate()
        .map(|(i, (code, dir, amount, cur, pending))| format!("({i}, '{code}', '{dir}', {amount}, '{cur}', {pending})"))
        .collect();
    let postings_from_t =
        "INSERT INTO ledger_postings (entry_id, idx, account_id, direction, amount, currency, pending, \
         sequence, created_at_us) \
         SELECT 'forged', t.idx, a.id, t.dir, t.amount, t.cur, t.pending, 1000000, 0 \
         FROM t JOIN ledger_accounts a ON a.code = t.code";
    let t = format!("t(idx, code, dir, amount, cur, pending) AS (VALUES {})", rows.join(", "));
    let accounts = format!(
        "INSERT INTO ledger_accounts (code, type, currency, allow_negative, credit_normal, created_at_us) \
         VALUES ('{EUR_A}', 'asset', 'EUR', TRUE, FALSE, 0), ('{EUR_B}', 'liability', 'EUR', TRUE, TRUE, 0)"
    );
    // The statements in the order the backend's checks expect: PostgreSQL's AFTER
    // STATEMENT checks see the entry and its postings written by one statement;
    // SQLite's row trigger on the entry checks the postings written before it.
    let mut statements = vec![accounts];
    match (&app.db, rows.is_empty()) {
        (_, true) => statements.push(entry),
        (dmpay::store::Db::Postgres(_), false) => {
            statements.push(format!("WITH {t}, e AS ({entry}), p AS ({postings_from_t}) SELECT 1"))
        }
        (dmpay::store::Db::Sqlite(_), false) => statements.extend([format!("WITH {t} {postings_from_t}"), entry]),
    }
    let err = |e: sqlx::Error| e.to_string();
    dmpay::with_db!(&app.db, pool => {
        let mut tx = pool.begin().await.map_err(err)?;
        let mut r = Ok(());
        for sql in &statements {
            r = sqlx::query(sql).execute(&mut *tx).await.map(|_| ()).map_err(err);
            if r.is_err() {
                break;
            }
        }
        tx.rollback().await.map_err(err)?;
        r
    })
}

async fn ok(app: &TestApp, f: Forged<'_>, what: &str) {
    if let Err(e) = accepted(app, &f).await {
        panic!("{what}: a valid entry was refused: {e}");
    }
}

async fn refused(app: &TestApp, f: Forged<'_>, what: &str) {
    assert!(accepted(app, &f).await.is_err(), "{what}: must be refused");
}

async fn every_forged_entry_is_refused_by_the_database(app: TestApp) {
    let t = app.token("svc-ledger", LEDGER_SCOPES);
    let funded = fund(&app, &t, "alice", "10.00").await;
    ok(&app, posted(&pair(500, 500, false)), "balanced").await;
    refused(&app, posted(&pair(500, 400, false)), "debits over credits").await;
    refused(&app, posted(&[(ALICE, "C", 500, "USD", false)]), "one posting").await;
    refused(&app, posted(&[]), "a posted entry without postings").await;

    // Several currencies: each balances on its own, not only in sum.
    ok(
        &app,
        posted(&[
            (TREASURY, "D", 500, "USD", false),
            (ALICE, "C", 500, "USD", false),
            (EUR_A, "D", 100, "EUR", false),
            (EUR_B, "C", 100, "EUR", false),
        ]),
        "two currencies, each balanced",
    )
    .await;
    refused(
        &app,
        posted(&[(TREASURY, "D", 500, "USD", false), (ALICE, "C", 400, "USD", false), (EUR_B, "C", 100, "EUR", false)]),
        "balanced in sum, not per currency",
    )
    .await;
    refused(
        &app,
        posted(&[(TREASURY, "D", 500, "USD", false), (ALICE, "C", 500, "EUR", false)]),
        "a posting in a currency other than its account's",
    )
    .await;

    // Postings are flagged like their entry.
    ok(&app, pending(&pair(500, 500, true)), "pending").await;
    refused(&app, pending(&pair(500, 500, false)), "pending, posted flags").await;
    refused(&app, posted(&pair(500, 500, true)), "posted, pending flags").await;
    refused(
        &app,
        posted(&[(TREASURY, "D", 500, "USD", false), (ALICE, "C", 500, "USD", true)]),
        "posted, one pending flag",
    )
    .await;

    // A resolution has no postings.
    ok(&app, voided(&funded.entry_id, &[]), "a resolution without postings").await;
    refused(&app, voided(&funded.entry_id, &pair(500, 500, false)), "a resolution with postings").await;

    // Nothing of it stayed.
    assert!(app.verify().await.ok());
}

backend_tests!(every_forged_entry_is_refused_by_the_database);
