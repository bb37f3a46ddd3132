//! Production fails closed: a binary started with no mode set refuses the published
//! development secrets, naming the setting; a complete production configuration serves,
//! and one that runs the sandbox processor by explicit choice says so on /metrics.

use std::time::Duration;

use crate::helpers::*;

fn production(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let b64 = |byte: u8| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [byte; 32]);
    let mut env = vec![
        ("DMPAY_ENV", "production".to_string()),
        ("DMPAY_JWT_HS256_SECRET", "a-production-secret-of-at-least-32-bytes".to_string()),
        ("DMPAY_VAULT_KEKS", format!("prod-1:{}", b64(7))),
        ("DMPAY_VAULT_FINGERPRINT_KEY", b64(8)),
        ("DMPAY_PROCESSOR", "sandbox".to_string()),
        ("DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION", "true".to_string()),
    ];
    env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    env.extend(extra.iter().cloned());
    env
}

/// `dmpay serve` with nothing set: production, which refuses the development secret and
/// names the variable; it never serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_with_no_mode_set_refuses_the_dev_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DMPAY_DATABASE_URL", format!("sqlite://{}", dir.path().join("dmpay.db").display()))
            .env("DMPAY_GRPC_ADDR", "127.0.0.1:0")
            .env("DMPAY_METRICS_ADDR", "off")
            .output(),
    )
    .await
    .expect("it exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DMPAY_ENV=production") && stderr.contains("DMPAY_JWT_HS256_SECRET"), "{stderr}");
    // Nor does the token command mint anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .args(["token", "--sub", "x", "--scope", "finance"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

/// Each refusal, through the server's own startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_each_weak_setting_by_name() {
    for (extra, name) in [
        (vec![("DMPAY_JWT_HS256_SECRET", dmpay::config::DEV_JWT_SECRET.to_string())], "DMPAY_JWT_HS256_SECRET"),
        (vec![("DMPAY_JWT_HS256_SECRET", "short".to_string())], "DMPAY_JWT_HS256_SECRET"),
        (vec![("DMPAY_JWT_HS256_SECRET", "Off".to_string())], "DMPAY_JWT_HS256_SECRET"),
        (
            vec![("DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION", "false".to_string())],
            "DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION",
        ),
        (vec![("DMPAY_VAULT_KEKS", dmpay::vault::keys::DEV_KEKS.to_string())], "DMPAY_VAULT_KEKS"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut env: std::collections::HashMap<String, String> =
            production(&extra).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        env.insert("DMPAY_DATABASE_URL".into(), format!("sqlite://{}", dir.path().join("d.db").display()));
        env.insert("DMPAY_GRPC_ADDR".into(), "127.0.0.1:0".into());
        env.insert("DMPAY_METRICS_ADDR".into(), "off".into());
        let err = match dmpay::config::Config::load_from(&env, None) {
            Err(e) => e.to_string(),
            Ok(config) => match dmpay::server::Application::build(config).await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{extra:?} served"),
            },
        };
        assert!(err.contains(name), "{extra:?}: {err}");
    }
}

/// The sandbox serving production by explicit choice: it serves, and /metrics says so.
async fn the_sandbox_in_production_is_on_the_metrics(backend: Backend) {
    let env = production(&[]);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let Some(app) = TestApp::spawn_with(backend, &pairs).await else { return };
    assert_eq!(app.metric("dmpay_sandbox_processor_in_production").await, 1.0);
    // It serves tokens signed with its secret, and refuses the development secret's.
    let sign = |secret: &str| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({
            "sub": "alice", "scope": PAY_SCOPES, "iss": "dmpay-dev", "aud": "dmpay",
            "iat": now, "exp": now + 600,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let secret = env.iter().find(|(k, _)| *k == "DMPAY_JWT_HS256_SECRET").unwrap().1.clone();
    app.wallet_of(&sign(&secret)).await.expect("a production token is served");
    let e = app.wallet_of(&sign(dmpay::config::DEV_JWT_SECRET)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // A development server reports 0.
    let Some(dev_app) = TestApp::spawn(backend).await else { return };
    assert_eq!(dev_app.metric("dmpay_sandbox_processor_in_production").await, 0.0);
}

crate::backend_fn_tests!(the_sandbox_in_production_is_on_the_metrics);
