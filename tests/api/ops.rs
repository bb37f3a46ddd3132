//! Operations: health, reflection, request ids, metrics, graceful shutdown.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::backend_tests;
use crate::helpers::{authed, pb, postgres_url, Backend, TestApp};

async fn health_and_reflection_need_no_token(app: TestApp) {
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "dmpay.v1.Accounts"] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.expect("reflection").into_inner();
    let response = stream.message().await.expect("message").expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "dmpay.v1.Accounts"), "{names:?}");
}

async fn request_id_is_echoed_and_metrics_count_calls(app: TestApp) {
    let token = app.token("alice", "");
    let mut req = authed(pb::GetAccountRequest { user_id: "alice".into() }, &token);
    req.metadata_mut().insert("x-request-id", "req-12345".parse().unwrap());
    let resp = app.accounts().get_account(req).await.expect("call");
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-12345");

    // Without one, the server makes one up.
    let resp = app
        .accounts()
        .get_account(authed(pb::GetAccountRequest { user_id: "alice".into() }, &token))
        .await
        .expect("call");
    assert!(!resp.metadata().get("x-request-id").unwrap().is_empty());
    let _ = app.accounts().get_account(pb::GetAccountRequest { user_id: "alice".into() }).await;

    let body = scrape(app.metrics_addr.expect("metrics on")).await;
    assert!(body.contains("dmpay_grpc_calls_total{method=\"/dmpay.v1.Accounts/GetAccount\",code=\"OK\"} 2"), "{body}");
    assert!(body.contains("code=\"UNAUTHENTICATED\"} 1"), "{body}");
    assert!(body.contains("dmpay_grpc_call_seconds_bucket"), "{body}");
    assert!(body.contains("dmpay_db_connections_in_use"), "{body}");
    // The resolver's first pass runs at start (the test server waits for it), and the
    // next only a day later.
    assert!(body.contains("dmpay_payments_resolver_passes_total 1.0\n"), "{body}");
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    socket.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

backend_tests!(health_and_reflection_need_no_token, request_id_is_echoed_and_metrics_count_calls);

/// SIGTERM while calls are in flight: they complete, and the process exits 0. The calls
/// are held in flight by taking SQLite's write lock from the test, so the server's
/// writes wait on it when the signal arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("dmpay.db");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .arg("serve")
        .env("DMPAY_ENV", "development")
        .env("DMPAY_GRPC_ADDR", "127.0.0.1:0")
        .env("DMPAY_METRICS_ADDR", "off")
        .env("DMPAY_DATABASE_URL", format!("sqlite://{}", db_path.display()))
        .env("DMPAY_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dmpay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(addr) = v.get("addr").and_then(|a| a.as_str()) {
                if v.get("message").and_then(|m| m.as_str()).is_some_and(|m| m.contains("serving gRPC")) {
                    return addr.to_string();
                }
            }
        }
        panic!("server exited before serving");
    })
    .await
    .expect("server start");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let dev = std::collections::HashMap::from([("DMPAY_ENV".to_string(), "development".to_string())]);
    let config = dmpay::config::Config::load_from(&dev, None).unwrap();
    let token = dmpay::auth::mint_dev_token(&config.jwt(), "ops", "accounts:admin", Duration::from_secs(600)).unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    // Hold the write lock.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db_path);
    let mut blocker = sqlx::ConnectOptions::connect(&options).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();

    let mut calls = Vec::new();
    for i in 0..4 {
        let mut client = pb::accounts_client::AccountsClient::new(channel.clone());
        let token = token.clone();
        calls.push(tokio::spawn(async move {
            client
                .upsert_account(authed(
                    pb::UpsertAccountRequest { user_id: format!("u{i}"), ..Default::default() },
                    &token,
                ))
                .await
        }));
    }
    // The calls reach the server and wait on the lock; a second is ample even on a
    // loaded machine (they are local and the server answers nothing until COMMIT).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();

    for call in calls {
        let account = call.await.unwrap().expect("in-flight call completes");
        assert!(account.into_inner().user_id.starts_with('u'));
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("exit in time").unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// A port already taken stops the server with the address and the setting named, and
/// the startup log says which mode and database it runs on and warns about the
/// published development secrets (without printing any secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_names_the_mode_the_database_and_a_taken_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dmpay"))
        .arg("serve")
        .env("DMPAY_ENV", "development")
        .env("DMPAY_GRPC_ADDR", &addr)
        .env("DMPAY_METRICS_ADDR", "off")
        .env("DMPAY_DATABASE_URL", format!("sqlite://{}", dir.path().join("d.db").display()))
        .env("DMPAY_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{addr} is already in use")) && stderr.contains("DMPAY_GRPC_ADDR"), "{stderr}");
    let log = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let start =
        lines.iter().find(|l| l["message"] == "dmpay starting").unwrap_or_else(|| panic!("no start line in {log}"));
    assert_eq!(start["mode"], "Development");
    assert!(start["database"].as_str().unwrap().starts_with("sqlite://"), "{start}");
    let warnings: Vec<&str> =
        lines.iter().filter(|l| l["level"] == "WARN").filter_map(|l| l["message"].as_str()).collect();
    assert!(warnings.iter().any(|w| w.contains("development JWT secret")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("development vault keys")), "{warnings:?}");
    assert!(!log.contains(dmpay::config::DEV_JWT_SECRET), "the secret itself is never logged");
    drop(taken);
}

/// The session settings each PostgreSQL pool gives its connections (`store::PoolRole`):
/// the engine's batches plan every statement as index probes, never as a sequential
/// scan and never as a parallel plan, whose worker processes cost more than the
/// batch's keyed reads; the other pool plans each execution afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pools_set_their_planner_settings() {
    let Some(url) = postgres_url() else {
        assert!(TestApp::spawn(Backend::Postgres).await.is_none());
        return;
    };
    let pool = |role| dmpay::store::Db::connect_role(&url, 1, Duration::from_secs(5), role);
    let (engine, general) = (
        pool(dmpay::store::PoolRole::Engine).await.expect("engine pool"),
        pool(dmpay::store::PoolRole::General).await.expect("general pool"),
    );
    let show = |db: &dmpay::store::Db, setting: &'static str| {
        let dmpay::store::Db::Postgres(pool) = db else { panic!("a PostgreSQL pool") };
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, String>(&format!("SHOW {setting}")).fetch_one(&pool).await.expect("SHOW") }
    };
    assert_eq!(show(&engine, "enable_seqscan").await, "off");
    assert_eq!(show(&engine, "max_parallel_workers_per_gather").await, "0");
    assert_eq!(show(&engine, "plan_cache_mode").await, "auto");
    assert_eq!(show(&general, "plan_cache_mode").await, "force_custom_plan");
    engine.close().await;
    general.close().await;
}
