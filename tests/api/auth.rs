//! The auth matrix: every way a token can be wrong, on both backends.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tonic::Code;

use crate::backend_tests;
use crate::helpers::{authed, pb, Backend, TestApp};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(sub: &str, scope: &str) -> serde_json::Value {
    json!({"sub": sub, "scope": scope, "iss": "dmpay-dev", "aud": "dmpay", "iat": now(), "nbf": now() - 10, "exp": now() + 600})
}

fn sign_hs256(claims: &serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn dev_secret() -> &'static [u8] {
    dmpay::config::DEV_JWT_SECRET.as_bytes()
}

async fn get_self(app: &TestApp, token: Option<&str>) -> Result<pb::Account, tonic::Status> {
    let msg = pb::GetAccountRequest { user_id: "alice".into() };
    let req = match token {
        Some(t) => authed(msg, t),
        None => tonic::Request::new(msg),
    };
    app.accounts().get_account(req).await.map(|r| r.into_inner())
}

async fn token_matrix(app: TestApp) {
    // The good token works, so every failure below is about the token alone.
    let good = sign_hs256(&claims("alice", ""), dev_secret());
    get_self(&app, Some(&good)).await.expect("valid token");

    let mut expired = claims("alice", "");
    expired["exp"] = json!(now() - 3600);
    let mut not_yet = claims("alice", "");
    not_yet["nbf"] = json!(now() + 3600);
    let mut wrong_iss = claims("alice", "");
    wrong_iss["iss"] = json!("someone-else");
    let mut wrong_aud = claims("alice", "");
    wrong_aud["aud"] = json!("other-service");
    let mut no_exp = claims("alice", "");
    no_exp.as_object_mut().unwrap().remove("exp");
    // Claims of the wrong type are refused, not read as absent: jsonwebtoken alone skips
    // an `nbf` it cannot read as whole seconds and takes `iss` as a list naming ours.
    let mut nbf_text = claims("alice", "");
    nbf_text["nbf"] = json!((now() + 3600).to_string());
    let mut nbf_fraction = claims("alice", "");
    nbf_fraction["nbf"] = json!(now() as f64 + 3600.5);
    let mut nbf_null = claims("alice", "");
    nbf_null["nbf"] = serde_json::Value::Null;
    let mut iss_list = claims("alice", "");
    iss_list["iss"] = json!(["dmpay-dev", "someone-else"]);

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims("alice", "accounts:admin").to_string())
    );
    // A valid signature over a payload, with the payload then swapped.
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], b64.encode(claims("alice", "accounts:admin").to_string()), parts[2])
    };

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("garbage", Some("not-a-jwt".into())),
        ("expired", Some(sign_hs256(&expired, dev_secret()))),
        ("not yet valid", Some(sign_hs256(&not_yet, dev_secret()))),
        ("wrong iss", Some(sign_hs256(&wrong_iss, dev_secret()))),
        ("wrong aud", Some(sign_hs256(&wrong_aud, dev_secret()))),
        ("no exp", Some(sign_hs256(&no_exp, dev_secret()))),
        ("nbf as text", Some(sign_hs256(&nbf_text, dev_secret()))),
        ("nbf with a fraction", Some(sign_hs256(&nbf_fraction, dev_secret()))),
        ("nbf as null", Some(sign_hs256(&nbf_null, dev_secret()))),
        ("iss as a list", Some(sign_hs256(&iss_list, dev_secret()))),
        ("wrong secret", Some(sign_hs256(&claims("alice", ""), b"guessed-secret"))),
        ("alg none", Some(alg_none)),
        ("tampered payload", Some(tampered)),
        ("huge token", Some("a".repeat(9000))),
    ];
    for (name, token) in cases {
        let err = get_self(&app, token.as_deref()).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
    }

    // Not a Bearer scheme at all.
    let mut req = tonic::Request::new(pb::GetAccountRequest { user_id: "alice".into() });
    req.metadata_mut().insert("authorization", format!("Basic {good}").parse().unwrap());
    assert_eq!(app.accounts().get_account(req).await.unwrap_err().code(), Code::Unauthenticated);
}

async fn scopes_and_ownership(app: TestApp) {
    let alice = app.token("alice", "payments:read payments:write");
    // Another user's account.
    let err =
        app.accounts().get_account(authed(pb::GetAccountRequest { user_id: "bob".into() }, &alice)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A missing scope, for each admin RPC.
    let err = app
        .accounts()
        .upsert_account(authed(pb::UpsertAccountRequest { user_id: "alice".into(), ..Default::default() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("accounts:admin"));
    let err = app
        .accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "alice".into(), reason: "x".into() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = app
        .accounts()
        .unfreeze_account(authed(pb::UnfreezeAccountRequest { user_id: "alice".into(), reason: "x".into() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn rs256_only(backend: Backend) {
    let public = format!("{FIXTURES}/rs256-public.pem");
    let Some(app) =
        TestApp::spawn_with(backend, &[("DMPAY_JWT_PUBLIC_KEYS", public.as_str()), ("DMPAY_JWT_HS256_SECRET", "off")])
            .await
    else {
        return;
    };
    let private = std::fs::read(format!("{FIXTURES}/rs256-private.pem")).unwrap();
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("alice", ""),
        &EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    get_self(&app, Some(&rs)).await.expect("RS256 token is accepted");

    // Algorithm confusion: an HS256 token whose HMAC key is the RSA public key.
    let public_bytes = std::fs::read(&public).unwrap();
    let confused = sign_hs256(&claims("alice", ""), &public_bytes);
    let err = get_self(&app, Some(&confused)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // And HS256 with the dev secret is off too.
    let dev = sign_hs256(&claims("alice", ""), dev_secret());
    assert_eq!(get_self(&app, Some(&dev)).await.unwrap_err().code(), Code::Unauthenticated);
}

mod rs256 {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::rs256_only(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::rs256_only(super::Backend::Postgres).await;
    }
}

backend_tests!(token_matrix, scopes_and_ownership);

fn sign_rs256(claims: &serde_json::Value, private_pem: &str, kid: &str) -> String {
    let private = std::fs::read(format!("{FIXTURES}/{private_pem}")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&private).unwrap()).unwrap()
}

/// A token lives at most DMPAY_JWT_LIFETIME_MAX (exp - iat), must say when it was
/// issued, not in the future, and a header with critical extensions is refused.
async fn lifetime_iat_and_crit(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_JWT_LIFETIME_MAX", "1h")]).await else { return };
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = claims("alice", "").as_object().unwrap().clone();
        f(&mut c);
        sign_hs256(&serde_json::Value::Object(c), dev_secret())
    };
    let ok = with(&|c| {
        c.insert("exp".into(), json!(now() + 3000));
    });
    get_self(&app, Some(&ok)).await.expect("50 minutes is within the hour");
    let cases: [(&str, String); 5] = [
        (
            "lifetime",
            with(&|c| {
                c.insert("exp".into(), json!(now() + 7200));
            }),
        ),
        (
            "lifetime",
            with(&|c| {
                c.insert("iat".into(), json!(now() - 86_400));
                c.insert("exp".into(), json!(now() + 60));
            }),
        ),
        (
            "lacks iat",
            with(&|c| {
                c.remove("iat");
            }),
        ),
        (
            "iat",
            with(&|c| {
                c.insert("iat".into(), json!("yesterday"));
            }),
        ),
        (
            "future",
            with(&|c| {
                c.insert("iat".into(), json!(now() + 600));
            }),
        ),
    ];
    for (why, token) in cases {
        let e = get_self(&app, Some(&token)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{why}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }
    // A header with `crit`, correctly signed: refused.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}).to_string());
    let payload = b64.encode(claims("alice", "").to_string());
    let mac = {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(dev_secret()).unwrap();
        m.update(format!("{header}.{payload}").as_bytes());
        b64.encode(m.finalize().into_bytes())
    };
    let e = get_self(&app, Some(&format!("{header}.{payload}.{mac}"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("crit"), "{}", e.message());
}

async fn wait_until_accepted(app: &TestApp, token: &str, accepted: bool) {
    for _ in 0..100 {
        if get_self(app, Some(token)).await.is_ok() == accepted {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the token was never {}", if accepted { "accepted" } else { "refused" });
}

/// Public keys are read again on SIGHUP and on an interval, without a restart; a broken
/// file keeps the keys in use.
async fn public_keys_reload_without_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::copy(format!("{FIXTURES}/jwks-a.json"), &path).unwrap();
    let keys = path.to_str().unwrap().to_owned();
    let Some(app) = TestApp::spawn_with(
        backend,
        &[("DMPAY_JWT_PUBLIC_KEYS", keys.as_str()), ("DMPAY_JWT_KEYS_RELOAD_INTERVAL", "1h")],
    )
    .await
    else {
        return;
    };
    let a = sign_rs256(&claims("alice", ""), "rs256-private.pem", "key-a");
    let b = sign_rs256(&claims("alice", ""), "rs256-b-private.pem", "key-b");
    get_self(&app, Some(&a)).await.expect("key A is in the file");
    assert_eq!(get_self(&app, Some(&b)).await.unwrap_err().code(), Code::Unauthenticated);
    // Rotate at the identity service: the file now holds key B only. An hour-long
    // interval: only SIGHUP makes the server read it.
    std::fs::copy(format!("{FIXTURES}/jwks-b.json"), &path).unwrap();
    let hup = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(hup.success());
    wait_until_accepted(&app, &b, true).await;
    assert_eq!(get_self(&app, Some(&a)).await.unwrap_err().code(), Code::Unauthenticated, "key A was rotated out");
    // A broken file: the keys in use stay.
    std::fs::write(&path, "{ not json").unwrap();
    let hup = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(hup.success());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    get_self(&app, Some(&b)).await.expect("a broken key file keeps the keys in use");
    app.stop().await;

    // The interval: a server that reads the file every second picks key A up by itself.
    std::fs::copy(format!("{FIXTURES}/jwks-b.json"), &path).unwrap();
    let Some(app) = TestApp::spawn_with(
        backend,
        &[("DMPAY_JWT_PUBLIC_KEYS", keys.as_str()), ("DMPAY_JWT_KEYS_RELOAD_INTERVAL", "1s")],
    )
    .await
    else {
        return;
    };
    get_self(&app, Some(&b)).await.expect("key B is in the file");
    std::fs::copy(format!("{FIXTURES}/jwks-a.json"), &path).unwrap();
    wait_until_accepted(&app, &a, true).await;
    wait_until_accepted(&app, &b, false).await;
}

crate::backend_fn_tests!(lifetime_iat_and_crit, public_keys_reload_without_a_restart);
