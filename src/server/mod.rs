//! Startup: builds the application from a `Config`, binds its own listeners (so tests ask
//! for port 0 and get the real server) and serves until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::Layer;

use crate::accounts::Accounts;
use crate::api::pb::accounts_server::AccountsServer;
use crate::api::pb::finance_server::FinanceServer;
use crate::api::pb::ledger_server::LedgerServer;
use crate::api::pb::payment_methods_server::PaymentMethodsServer;
use crate::api::pb::payments_server::PaymentsServer;
use crate::api::pb::shopping_server::ShoppingServer;
use crate::api::wire::UnreadableRequestLayer;
use crate::api::{AccountsApi, FinanceApi, LedgerApi, PaymentMethodsApi, PaymentsApi, ShoppingApi};
use crate::auth::{AuthInterceptor, Verifier};
use crate::config::Config;
use crate::kernel::clock::Clock;
use crate::ledger::engine::DatabaseState;
use crate::ledger::{maintenance, Engine, Ledger};
use crate::payments::batch::PaymentsHook;
use crate::payments::Payments;
use crate::processor::sandbox::Sandbox;
use crate::processor::CardProcessor;
use crate::store::Db;
use crate::telemetry::{serve_metrics, CallLogLayer, Metrics};
use crate::vault::Vault;

/// How long shutdown waits for in-flight calls before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the database is pinged to keep the health status true.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A built, bound, migrated server that has not started serving yet.
pub struct Application {
    config: Config,
    db: Db,
    /// The posting engine's own pool (see `PoolRole::Engine`).
    engine_db: Db,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    metrics: Metrics,
    verifier: Verifier,
    engine: Engine,
    ledger: Ledger,
    /// Platform accounts, writing where `EngineHandle::writer` says.
    accounts: Accounts,
    vault: Arc<Vault>,
    payments: Arc<Payments>,
}

/// Every dmpay service, for health reporting.
const SERVICE_NAMES: &[&str] = &[
    <AccountsServer<AccountsApi> as tonic::server::NamedService>::NAME,
    <LedgerServer<LedgerApi> as tonic::server::NamedService>::NAME,
    <PaymentMethodsServer<PaymentMethodsApi> as tonic::server::NamedService>::NAME,
    <PaymentsServer<PaymentsApi> as tonic::server::NamedService>::NAME,
    <FinanceServer<FinanceApi> as tonic::server::NamedService>::NAME,
    <ShoppingServer<ShoppingApi> as tonic::server::NamedService>::NAME,
];

impl Application {
    /// Connects to the database, runs migrations and binds the listeners.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        Application::build_with_clock(config, Clock::system()).await
    }

    /// As `build`, with every row stamped by `clock` (tests move it to book payments on
    /// another day).
    pub async fn build_with_clock(config: Config, clock: Clock) -> anyhow::Result<Application> {
        config.check_for_serving()?;
        {
            use secrecy::ExposeSecret;
            tracing::info!(
                mode = ?config.env,
                database = %crate::config::url_for_logs(config.database_url.expose_secret()),
                processor = ?config.processor,
                "dmpay starting"
            );
        }
        for warning in config.startup_warnings() {
            tracing::warn!("{warning}");
        }
        let verifier = Verifier::new(&config.jwt())?;
        let db = Db::connect(&config.store()).await?;
        db.migrate().await?;
        let listener = crate::api::connections::bind(config.grpc_addr)
            .map_err(|e| listen_error(config.grpc_addr, "DMPAY_GRPC_ADDR", e))?;
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| listen_error(addr, "DMPAY_METRICS_ADDR", e))?),
            None => None,
        };
        let metrics = Metrics::new(crate::api::known_methods());
        metrics.set_sandbox_in_production(config.sandbox_in_production());
        metrics.set_db(db.clone());
        // Wallet-funded sends commit their payment rows in the engine's batches.
        let payments_config = Arc::new(config.payments.clone());
        let hook = Arc::new(PaymentsHook::new(payments_config.clone()));
        let engine_db = Db::connect_engine(&config.store(), config.engine.workers).await?;
        let (engine, engine_handle) =
            Engine::start(engine_db.clone(), config.engine.clone(), Some(hook.clone()), clock.clone())?;
        metrics.set_engine(engine_handle.stats().clone());
        let ledger = Ledger::new(db.clone(), config.currencies.clone(), engine_handle);
        ledger.accounts().ensure_system_accounts().await?;
        let keys = Arc::new(config.key_ring()?);
        let processor: Arc<dyn CardProcessor> =
            Arc::new(Sandbox::new(db.clone(), config.sandbox.clone(), clock.clone()));
        let writer = ledger.engine().writer(&db).clone();
        let accounts = Accounts::with_writer(db.clone(), writer.clone(), clock.clone());
        let vault = Arc::new(
            Vault::new(db.clone(), keys, processor, accounts.clone(), config.vault.clone()).with_writer(writer),
        );
        let payments =
            Arc::new(Payments::new(db.clone(), ledger.clone(), vault.clone(), accounts.clone(), payments_config, hook));
        Ok(Application {
            config,
            db,
            engine_db,
            listener,
            metrics_listener,
            metrics,
            verifier,
            engine,
            ledger,
            accounts,
            vault,
            payments,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    pub fn payments(&self) -> &Arc<Payments> {
        &self.payments
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls
    /// finish (up to `SHUTDOWN_GRACE`) and closes the pool.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application {
            config,
            db,
            engine_db,
            listener,
            metrics_listener,
            metrics,
            verifier,
            engine,
            ledger,
            accounts,
            vault,
            payments,
        } = self;
        let addr = listener.local_addr()?;

        let metrics_task = metrics_listener.map(|l| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "metrics on http://{a}/metrics");
            }
            tokio::spawn(serve_metrics(l, metrics.clone()))
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        // The background tasks, stopped together when serving ends.
        let mut tasks = vec![verifier.clone().spawn_reloader(config.jwt_keys_reload_interval)];
        let auth = AuthInterceptor::new(verifier);
        // Inside the interceptor, so that it sees the verified caller.
        let rate = crate::api::rate::RateLimitLayer::new(crate::api::rate::Limiter::new(
            config.rate_limits,
            accounts.clone(),
            metrics.clone(),
        ));
        let size_max = config.grpc_message_size_max;
        let accounts = AccountsServer::new(AccountsApi::new(accounts, config.payments.shop.commission_bps))
            .max_decoding_message_size(size_max)
            .max_encoding_message_size(size_max);
        let ledger_api = LedgerServer::new(LedgerApi::new(ledger.clone()))
            .max_decoding_message_size(size_max)
            .max_encoding_message_size(size_max);
        let methods_api = PaymentMethodsServer::new(PaymentMethodsApi::new(vault.clone()))
            .max_decoding_message_size(size_max)
            .max_encoding_message_size(size_max);
        tasks.push(tokio::spawn(purge_unlinked(vault.clone(), config.vault.purge_interval)));
        tasks.push({
            let db = db.clone();
            tokio::spawn(async move { db.run_sqlite_checkpointer().await })
        });
        let feed =
            crate::payments::feed::Feed::start(db.clone(), payments.events_hub().clone(), metrics.clone()).await?;
        // Events on NATS JetStream, when configured; its lease is given up at a clean stop.
        let publisher = config.nats.clone().map(|settings| {
            let p = crate::api::bus::Publisher::new(settings, payments.clone(), metrics.clone());
            let cursor = p.cursor();
            (tokio::spawn(p.run(feed.clone())), cursor)
        });
        let watchers = crate::api::watch::Watchers::new(config.watch, metrics.clone());
        let watch_stop = watchers.stopper();
        let payments_api = PaymentsServer::new(PaymentsApi::new(payments.clone(), feed, watchers))
            .max_decoding_message_size(size_max)
            .max_encoding_message_size(size_max);
        let shopping_api = ShoppingServer::new(ShoppingApi::new(payments.clone()))
            .max_decoding_message_size(size_max)
            .max_encoding_message_size(size_max);
        let finance_api = FinanceServer::new(FinanceApi::new(
            db.clone(),
            ledger.clone(),
            payments.clone(),
            config.recon_time_tolerance,
        ))
        .max_decoding_message_size(size_max)
        .max_encoding_message_size(size_max);
        metrics.set_resolver(payments.resolver_stats().clone());
        tasks.push(tokio::spawn(payments.as_ref().clone().run_resolver(config.payments_resolve_interval)));
        tasks.push(tokio::spawn(maintenance::run(
            db.clone(),
            ledger.engine().clone(),
            config.ledger_expiry_interval,
            config.idempotency_retention,
        )));
        // Both reflection versions: grpcurl before 1.9 and Python's grpcio-reflection
        // speak v1alpha. The google.rpc and health descriptors let tools decode error
        // details and call health.
        let reflection = crate::api::descriptors::reflection().build_v1()?;
        let reflection_v1alpha = crate::api::descriptors::reflection().build_v1alpha()?;
        // The demo page and its tokens, in development mode only.
        let demo = (config.env == crate::config::Environment::Development).then(|| config.jwt());

        set_serving(&health, true).await;
        // The probe pings through the posting engine's pool: its spare connection is free
        // whatever a burst of reads does to the general pool, so a miss means the
        // database, not a busy pool.
        tasks.push(tokio::spawn(health_probe(engine_db.clone(), health.clone(), ledger.engine().database().clone())));

        tracing::info!(addr = %addr, backend = db.backend(), "dmpay serving gRPC on {addr}");

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .timeout(config.grpc_call_timeout)
            .max_concurrent_streams(Some(config.grpc_concurrent_streams_max))
            .http2_keepalive_interval(Some(config.grpc_keepalive_interval))
            .http2_keepalive_timeout(Some(config.grpc_keepalive_timeout))
            .tcp_nodelay(true)
            // HTTP/1.1 too, for browsers (gRPC-Web) and curl (Connect).
            .accept_http1(true)
            .layer(cors_layer(&config.cors_origins))
            // Connect before gRPC-Web: the gRPC-Web layer refuses any other HTTP/1 call,
            // and the gRPC request Connect makes of one passes through it.
            .layer(crate::api::connect::ConnectLayer::new(size_max, demo))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(CallLogLayer::new(metrics.clone()))
            .layer(UnreadableRequestLayer)
            .layer(crate::api::gate::DatabaseGateLayer::new(&db, ledger.engine().database().clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(rate.layer(accounts), auth.clone()))
            .add_service(InterceptedService::new(rate.layer(ledger_api), auth.clone()))
            .add_service(InterceptedService::new(rate.layer(methods_api), auth.clone()))
            .add_service(InterceptedService::new(rate.layer(payments_api), auth.clone()))
            .add_service(InterceptedService::new(rate.layer(finance_api), auth.clone()))
            .add_service(InterceptedService::new(rate.layer(shopping_api), auth.clone()))
            .serve_with_incoming_shutdown(
                crate::api::connections::incoming(listener, config.connections, metrics.clone()),
                async move {
                    let _ = stop_rx.await;
                },
            );
        let mut server = tokio::spawn(server);

        // Serve until asked to stop (or until the server fails on its own).
        let stopped_by_itself = tokio::select! {
            result = &mut server => Some(result),
            () = shutdown => None,
        };
        let served = match stopped_by_itself {
            Some(result) => result,
            None => {
                tracing::info!("shutdown requested: draining in-flight calls");
                set_serving(&health, false).await;
                // Open watch streams never end on their own: end them now, each with
                // the sequence to resume from, so that draining waits for calls only.
                watch_stop.stop();
                let _ = stop_tx.send(());
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("in-flight calls did not finish within {SHUTDOWN_GRACE:?}; stopping anyway");
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        // The calls are done: stop the background tasks, then commit whatever is still
        // queued in the posting engine (its last handles go with `payments` and
        // `ledger`), then close the pools.
        for task in tasks.into_iter().chain(metrics_task) {
            task.abort();
        }
        if let Some((task, cursor)) = publisher {
            // Stopped for good before the lease is given up, so that an advance still
            // running cannot renew it after the release.
            task.abort();
            let _ = task.await;
            if let Err(e) = cursor.release().await {
                tracing::warn!(error = %e, "could not give up the NATS publishing lease; it expires on its own");
            }
        }
        drop(payments);
        drop(ledger);
        engine.shutdown().await;
        engine_db.close().await;
        db.close().await;
        served??;
        tracing::info!("dmpay stopped");
        Ok(())
    }
}

/// A listener that could not be opened, with the address and the setting that chose it.
fn listen_error(addr: std::net::SocketAddr, setting: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "{addr} is already in use (another dmpay, or another program, listens there): stop it or set {setting} \
             to a free address"
        )
    } else {
        anyhow::anyhow!("cannot listen on {addr} ({setting}): {e}")
    }
}

/// CORS for the configured browser origins (`DMPAY_CORS_ORIGINS`): with none, no
/// preflight is answered with an allowed origin, so browsers refuse every page.
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use http::header::{HeaderName, AUTHORIZATION, CONTENT_TYPE};
    let origins: Vec<http::HeaderValue> = origins.iter().filter_map(|o| http::HeaderValue::from_str(o).ok()).collect();
    let h = HeaderName::from_static;
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::list(origins))
        .allow_methods([http::Method::POST, http::Method::GET, http::Method::OPTIONS])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            h("x-grpc-web"),
            h("x-user-agent"),
            h("grpc-timeout"),
            h("connect-protocol-version"),
            h("connect-timeout-ms"),
        ])
        .expose_headers([h("grpc-status"), h("grpc-message"), h("grpc-status-details-bin")])
        .max_age(std::time::Duration::from_secs(3600))
}

async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        health.set_service_status(*name, status).await;
    }
}

/// Consecutive failed pings before the database counts as unreachable. One slow ping
/// can be a busy pool (every connection taken by a burst for over a second) rather than
/// an outage, and declaring an outage refuses every ledger write; two in a row (about
/// 2 to 3 s) is still well inside the 5 s a caller may wait for the verdict. A timed-out
/// engine batch marks the database unreachable at once, without waiting for the probe.
const HEALTH_PROBE_MISSES_MAX: u32 = 2;

/// Keeps health true to the database: NOT_SERVING while it cannot be reached, SERVING
/// again as soon as it answers, without a restart.
async fn health_probe(db: Db, health: HealthReporter, engine: Arc<DatabaseState>) {
    let mut serving = true;
    let mut misses = 0u32;
    let mut tick = tokio::time::interval(HEALTH_PROBE_INTERVAL);
    loop {
        tick.tick().await;
        let pinged = tokio::time::timeout(HEALTH_PROBE_INTERVAL, db.ping()).await.is_ok_and(|r| r.is_ok());
        misses = if pinged { 0 } else { misses.saturating_add(1) };
        let ok = misses < HEALTH_PROBE_MISSES_MAX;
        // The posting engine refuses commands at once while the database is away, and
        // takes them again from the first good ping. A single miss changes nothing: it
        // neither refuses writes nor lifts a refusal a timed-out batch has set.
        if pinged {
            engine.set_reachable(true);
            engine.set_outage(false);
        } else if !ok {
            engine.set_reachable(false);
            engine.set_outage(true);
        }
        if ok != serving {
            if ok {
                tracing::info!("database reachable again: SERVING");
            } else {
                tracing::warn!("database unreachable: NOT_SERVING");
            }
            set_serving(&health, ok).await;
            serving = ok;
        }
    }
}

/// Deletes expired unlinked card tokens and destroys the numbers of cards removed past
/// their retention, every `interval`.
async fn purge_unlinked(vault: Arc<Vault>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = vault.purge(None).await {
            tracing::warn!(error = %e, "purging expired card tokens failed; will retry");
        }
        match vault.destroy_removed().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(destroyed = n, "destroyed the numbers of removed cards past their retention"),
            Err(e) => tracing::warn!(error = %e, "destroying removed cards failed; will retry"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
