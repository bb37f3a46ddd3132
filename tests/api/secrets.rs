//! Card data never lands anywhere in clear: a run that tokenizes and links cards through
//! the real server, with logging at TRACE, leaves no PAN or CVC in any table (both
//! backends, SQLite's raw file and WAL included) or any log line, and no credential
//! either (the caller's JWT, the JWT secret, the vault keys, the database password).
//! `.ci/secrets-scan` checks the logs of the whole suite the same way.

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;

use crate::helpers::*;

/// Cards with their CVCs. Only the 4-digit CVC is searched for as a bare token in the
/// database dump: 3 digits on their own occur in any dump by chance.
const CARDS: [(&str, &str); 3] =
    [("4242424242424242", "731"), ("5555555555554444", "852"), ("378282246310005", "9637")];

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

/// The most log text the capture keeps: the newest, so a suite run in one process
/// (plain `cargo test`, every test's logs at TRACE once this one has started) cannot
/// grow it without bound, and this test's own lines, written last, are kept.
const CAPTURE_BYTES_MAX: usize = 64 << 20;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut kept = self.0.lock().unwrap();
        kept.extend_from_slice(buf);
        if kept.len() > CAPTURE_BYTES_MAX {
            let excess = kept.len() - CAPTURE_BYTES_MAX / 2;
            kept.drain(..excess);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter(self.0.clone())
    }
}

/// Replaces UUIDs (8-4-4-4-12 hex) so their digit groups cannot look like a CVC.
fn strip_uuids(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let is_uuid = |s: &[u8]| {
        s.len() == 36
            && s.iter()
                .enumerate()
                .all(|(k, c)| if [8, 13, 18, 23].contains(&k) { *c == b'-' } else { c.is_ascii_hexdigit() })
    };
    while i < b.len() {
        if i + 36 <= b.len() && is_uuid(&b[i..i + 36]) {
            out.push_str("uuid");
            i += 36;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Whether `needle` occurs as a token of its own (no letter or digit on either side).
fn has_token(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).enumerate().any(|(i, w)| {
        w == needle
            && (i == 0 || !hay[i - 1].is_ascii_alphanumeric())
            && hay.get(i + needle.len()).is_none_or(|c| !c.is_ascii_alphanumeric())
    })
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

async fn dump_database(app: &TestApp) -> Vec<u8> {
    match &app.db {
        dmpay::store::Db::Postgres(pool) => {
            let tables: Vec<String> =
                sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let mut out = Vec::new();
            for t in tables {
                let text: Option<String> =
                    sqlx::query_scalar(&format!("SELECT string_agg(t::text, E'\\n') FROM \"{t}\" t"))
                        .fetch_one(pool)
                        .await
                        .unwrap();
                out.extend_from_slice(text.unwrap_or_default().as_bytes());
                out.push(b'\n');
            }
            out
        }
        dmpay::store::Db::Sqlite(pool) => {
            // The raw pages, and the WAL that has not been checkpointed: everything on disk.
            let path: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(pool)
                .await
                .unwrap();
            let mut out = std::fs::read(&path).unwrap();
            if let Ok(wal) = std::fs::read(format!("{path}-wal")) {
                out.extend(wal);
            }
            out
        }
    }
}

/// The process's log subscriber, at TRACE, into one capture: installed by the first of
/// this file's tests to run, shared by both (a process has one global subscriber, and
/// the server logs from every runtime thread).
fn capture() -> Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(capture.clone())
                .try_init()
                .expect("this test installs the process's log subscriber (run it without TEST_LOG)");
            capture
        })
        .clone()
}

async fn no_card_data_in_clear(backend: Backend) {
    let capture = capture();
    let Some(app) = TestApp::spawn(backend).await else { return };
    let t = app.token("pat", METHOD_SCOPES);
    for (number, cvc) in CARDS {
        let pm = app
            .methods()
            .tokenize_card(authed(
                pb::TokenizeCardRequest {
                    card_number: number.into(),
                    exp_month: 12,
                    exp_year: 2034,
                    cvc: cvc.into(),
                    holder_name: "Pat".into(),
                    postal_code: "10115".into(),
                },
                &t,
            ))
            .await
            .unwrap()
            .into_inner();
        app.methods()
            .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default: false }, &t))
            .await
            .unwrap();
    }
    // A declined card and a bad one go through other paths.
    let _ = app.add_card(&t, "4000000000000002", false).await;
    let _ = app.tokenize(&t, "4242424242424241").await;
    let pat = dmpay::kernel::ids::UserId::parse("u", "pat").unwrap();
    let _ = app.vault.chargeable(&pat, None, "test").await.unwrap();

    let db = dump_database(&app).await;
    let db_text = strip_uuids(&String::from_utf8_lossy(&db));
    assert!(db_text.contains("4242"), "the dump is real: last four digits are stored");
    for (number, cvc) in CARDS.iter().chain([("4000000000000002", "731"), ("4242424242424241", "731")].iter()) {
        assert!(!db_text.contains(number), "PAN {number} in clear in the database");
        assert!(!db_text.contains(&hex(number)), "PAN {number} as hex bytes in the database");
        if cvc.len() == 4 {
            assert!(!has_token(db_text.as_bytes(), cvc.as_bytes()), "CVC {cvc} in the database");
        }
    }
    // No column could hold a CVC.
    let schema = String::from_utf8_lossy(&db).to_lowercase();
    let columns: Vec<String> = match &app.db {
        dmpay::store::Db::Postgres(pool) => {
            sqlx::query_scalar("SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public'")
                .fetch_all(pool)
                .await
                .unwrap()
        }
        dmpay::store::Db::Sqlite(pool) => sqlx::query_scalar(
            "SELECT p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    };
    assert!(columns.iter().any(|c| c == "pan_ciphertext"), "{columns:?}");
    assert!(!columns.iter().any(|c| c.contains("cvc") || c.contains("cvv") || c == "pan" || c == "card_number"));
    drop(schema);

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("grpc call"), "logging was captured");
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "at trace level");
    for (number, cvc) in CARDS {
        assert!(!logs.contains(number), "PAN {number} in the logs");
        assert!(!logs.contains(&format!("\"{cvc}\"")), "CVC {cvc} quoted in the logs");
        assert!(
            !logs.to_lowercase().contains(&format!("cvc: {cvc}"))
                && !logs.to_lowercase().contains(&format!("cvc={cvc}"))
        );
    }

    // Nor any credential: the caller's JWT, the JWT secret, the vault keys (as configured
    // and decoded), the database password.
    let db_text = String::from_utf8_lossy(&db);
    let mut credentials = vec![("the caller's JWT".to_owned(), t.clone())];
    credentials.push(("the JWT secret".into(), dmpay::config::DEV_JWT_SECRET.into()));
    let b64 = base64::engine::general_purpose::STANDARD;
    for key in [dmpay::vault::keys::DEV_FINGERPRINT_KEY, dmpay::vault::keys::DEV_KEKS.split_once(':').unwrap().1] {
        credentials.push((format!("vault key {key}"), key.to_owned()));
        credentials.push((format!("vault key {key}, decoded"), String::from_utf8(b64.decode(key).unwrap()).unwrap()));
    }
    if let Some(password) = postgres_url().and_then(|u| url_password(&u)) {
        credentials.push(("the database password".into(), password));
    }
    for (what, secret) in credentials {
        assert!(!logs.contains(&secret), "{what} in the logs");
        assert!(!db_text.contains(&secret), "{what} in the database");
    }
    assert!(!logs.contains("eyJ"), "a JWT in the logs");
}

/// The password of a `postgres://user:password@host/...` URL.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| p.to_owned()).filter(|p| !p.is_empty())
}

mod no_card_data {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::no_card_data_in_clear(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::no_card_data_in_clear(super::Backend::Postgres).await;
    }
}
