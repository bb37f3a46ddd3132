//! Configuration: defaults, then an optional TOML file (`--config`), then `DMPAY_*`
//! environment variables, which win. Every setting is listed in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

mod payments;
mod security;
mod settings;

pub use security::{url_for_logs, ProcessorKind, HS256_SECRET_LEN_MIN};
use settings::Settings;
pub use settings::{ProcessEnv, Source};

use crate::kernel::money::{Currencies, Currency};
use crate::ledger::EngineConfig;
use crate::payments::PaymentsConfig;
use crate::processor::sandbox::SandboxConfig;
use crate::vault::keys::{KeyRing, DEV_FINGERPRINT_KEY, DEV_KEKS};
use crate::vault::VaultConfig;

/// The HS256 secret used when none is configured. It is public (it is in this file), so
/// production mode refuses to start with it.
pub const DEV_JWT_SECRET: &str = "dmpay-dev-secret-do-not-use-in-production";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

pub use crate::telemetry::LogFormat;

/// Fully resolved settings. Secrets are `SecretString`, whose Debug prints a mask.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    /// `None` when metrics are switched off.
    pub metrics_addr: Option<SocketAddr>,
    pub database_url: SecretString,
    pub env: Environment,
    pub jwt_hs256_secret: SecretString,
    pub jwt_public_keys: Option<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// The longest a token may live (`exp - iat`); longer ones are refused.
    pub jwt_lifetime_max: Duration,
    /// How often `DMPAY_JWT_PUBLIC_KEYS` is read again (also on SIGHUP).
    pub jwt_keys_reload_interval: Duration,
    /// The card processor; `None` when production named none (refused at start).
    pub processor: Option<ProcessorKind>,
    /// Production may run on the sandbox processor only when this says so.
    pub allow_sandbox_in_production: bool,
    pub log_format: LogFormat,
    /// Largest gRPC message accepted or sent.
    pub grpc_message_size_max: usize,
    /// Web origins (`https://chat.example.com`) whose pages may call the API from a
    /// browser (gRPC-Web or Connect); none by default.
    pub cors_origins: Vec<String>,
    /// Where outbox events are published (NATS JetStream); `None` when off (default).
    pub nats: Option<crate::api::bus::NatsSettings>,
    /// Concurrent HTTP/2 streams per connection.
    pub grpc_concurrent_streams_max: u32,
    /// Deadline for one unary call on the server side.
    pub grpc_call_timeout: Duration,
    /// HTTP/2 PING interval, and how long an unanswered PING waits before the
    /// connection is closed.
    pub grpc_keepalive_interval: Duration,
    pub grpc_keepalive_timeout: Duration,
    /// Open connections, and how long a silent one stays.
    pub connections: crate::api::connections::ConnectionLimits,
    /// Writes per second (and burst) per caller, by tier.
    pub rate_limits: crate::api::rate::RateLimits,
    /// `WatchPayments` streams open at once, in all and per caller.
    pub watch: crate::api::watch::WatchLimits,
    /// Database connections in the pool.
    pub db_pool_size: u32,
    /// How long a caller waits for a free connection before UNAVAILABLE.
    pub db_acquire_timeout: Duration,
    /// Currencies accepted anywhere in the API.
    pub currencies: Currencies,
    /// The posting engine's batching and queue bounds.
    pub engine: EngineConfig,
    /// How often pending ledger entries past their timeout are expired.
    pub ledger_expiry_interval: Duration,
    /// How long idempotency keys are kept (at least 7 days).
    pub idempotency_retention: Duration,
    /// `id:base64key,...` key-encryption keys of the card vault.
    pub vault_keks: SecretString,
    /// The KEK new records are wrapped under (default: the first).
    pub vault_active_kek: Option<String>,
    pub vault_fingerprint_key: SecretString,
    pub vault: VaultConfig,
    pub sandbox: SandboxConfig,
    pub payments: PaymentsConfig,
    /// Reconciliation: how far apart in time a report row without a processor reference
    /// and a ledger charge of the same amount may be and still match.
    pub recon_time_tolerance: Duration,
    /// How often the payments resolver wakes to finish stale pending payments and
    /// refunds and to expire open requests.
    pub payments_resolve_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {detail}")]
    Invalid { name: &'static str, detail: String },
    #[error("config file {path}: {detail}")]
    File { path: String, detail: String },
    #[error("DMPAY_ENV=production (the default; DMPAY_ENV=development for a development server) refuses {0}")]
    Production(String),
}

/// `DMPAY_NATS_*`: off unless `DMPAY_NATS_URL` names a server.
fn nats_settings(s: &Settings<'_>) -> Result<Option<crate::api::bus::NatsSettings>, ConfigError> {
    let url = s.string_or("DMPAY_NATS_URL", "off");
    if url == "off" {
        return Ok(None);
    }
    let schemes = ["nats://", "tls://", "ws://", "wss://"];
    if !url.split(',').all(|u| schemes.iter().any(|p| u.trim().starts_with(p))) {
        return Err(ConfigError::Invalid {
            name: "DMPAY_NATS_URL",
            detail: format!("expected nats://host:port (comma-separated for a cluster) or off, got {url:?}"),
        });
    }
    let stream = s.string_or("DMPAY_NATS_STREAM", "DMPAY_EVENTS");
    if stream.is_empty()
        || stream.len() > 64
        || !stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ConfigError::Invalid {
            name: "DMPAY_NATS_STREAM",
            detail: "1 to 64 of A-Z, a-z, 0-9, _ and -".into(),
        });
    }
    let prefix = s.string_or("DMPAY_NATS_SUBJECT_PREFIX", "dmpay");
    let token_ok = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if prefix.len() > 64 || !prefix.split('.').all(token_ok) {
        return Err(ConfigError::Invalid {
            name: "DMPAY_NATS_SUBJECT_PREFIX",
            detail: "dot-separated tokens of A-Z, a-z, 0-9, _ and - (no wildcards), at most 64 characters".into(),
        });
    }
    Ok(Some(crate::api::bus::NatsSettings {
        url,
        stream,
        subject_prefix: prefix,
        in_flight_max: s.num("DMPAY_NATS_IN_FLIGHT_MAX", 256, 1..=10_000)?,
    }))
}

/// Browser origins allowed to call: a comma-separated list of `scheme://host[:port]`.
/// `*` is refused: any page on the web could then drive a signed-in user's client.
fn cors_origins(raw: &str) -> Result<Vec<String>, ConfigError> {
    const NAME: &str = "DMPAY_CORS_ORIGINS";
    const ORIGINS_MAX: usize = 100;
    let origins: Vec<String> = raw.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_owned).collect();
    if origins.len() > ORIGINS_MAX {
        return Err(ConfigError::Invalid { name: NAME, detail: format!("at most {ORIGINS_MAX} origins") });
    }
    for o in &origins {
        let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
        let ok = rest.is_some_and(|host| {
            !host.is_empty() && !host.contains('/') && host.bytes().all(|b| b.is_ascii_graphic() && b != b'*')
        });
        if !ok {
            return Err(ConfigError::Invalid {
                name: NAME,
                detail: format!("{o:?} is not an origin like https://chat.example.com (no path, no wildcard)"),
            });
        }
    }
    Ok(origins)
}

impl Config {
    /// Loads from the process environment and an optional TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(&ProcessEnv, file)
    }

    pub fn load_from(source: &dyn Source, file: Option<&Path>) -> Result<Self, ConfigError> {
        let s = Settings::new(source, file)?;
        let grpc_addr = s
            .addr_or_off("DMPAY_GRPC_ADDR", "127.0.0.1:50051")?
            .ok_or(ConfigError::Invalid { name: "DMPAY_GRPC_ADDR", detail: "the gRPC server cannot be off".into() })?;
        let database_url = s.string_or("DMPAY_DATABASE_URL", "sqlite://var/dmpay.db");
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                name: "DMPAY_DATABASE_URL",
                detail: "must start with sqlite:// or postgres://".into(),
            });
        }
        let environments = [
            ("development", Environment::Development),
            ("dev", Environment::Development),
            ("production", Environment::Production),
            ("prod", Environment::Production),
        ];
        // Production unless development is chosen: a binary started with nothing set
        // must not trust the published development secrets.
        let env = s.choice("DMPAY_ENV", "production", &environments)?;
        let jwt_hs256_secret = s.string_or("DMPAY_JWT_HS256_SECRET", DEV_JWT_SECRET);
        security::check_hs256_spelling(&jwt_hs256_secret)?;
        // Development runs on the sandbox unless told otherwise; production names its
        // processor.
        let processor = match s.raw("DMPAY_PROCESSOR") {
            None if env == Environment::Development => Some(ProcessorKind::Sandbox),
            None => None,
            Some(raw) => Some(match raw.as_str() {
                "sandbox" => ProcessorKind::Sandbox,
                other => {
                    return Err(ConfigError::Invalid {
                        name: "DMPAY_PROCESSOR",
                        detail: format!("expected one of sandbox, got {other:?}"),
                    })
                }
            }),
        };
        let engine = EngineConfig::default();
        let vault = VaultConfig::default();

        let config = Config {
            grpc_addr,
            metrics_addr: s.addr_or_off("DMPAY_METRICS_ADDR", "127.0.0.1:9464")?,
            database_url: SecretString::from(database_url),
            env,
            jwt_hs256_secret: SecretString::from(jwt_hs256_secret),
            jwt_public_keys: s.raw("DMPAY_JWT_PUBLIC_KEYS").map(PathBuf::from),
            jwt_issuer: s.string_or("DMPAY_JWT_ISSUER", "dmpay-dev"),
            jwt_audience: s.string_or("DMPAY_JWT_AUDIENCE", "dmpay"),
            jwt_lifetime_max: s.duration("DMPAY_JWT_LIFETIME_MAX", Duration::from_secs(86_400))?,
            jwt_keys_reload_interval: s.duration("DMPAY_JWT_KEYS_RELOAD_INTERVAL", Duration::from_secs(300))?,
            processor,
            allow_sandbox_in_production: s.choice(
                "DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION",
                "false",
                &[("false", false), ("true", true)],
            )?,
            log_format: s.choice(
                "DMPAY_LOG_FORMAT",
                "pretty",
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
            )?,
            grpc_message_size_max: s.num("DMPAY_GRPC_MESSAGE_SIZE_MAX", 1024 * 1024, 1024..=64 * 1024 * 1024)?,
            cors_origins: cors_origins(&s.string_or("DMPAY_CORS_ORIGINS", ""))?,
            nats: nats_settings(&s)?,
            grpc_concurrent_streams_max: s.num("DMPAY_GRPC_CONCURRENT_STREAMS_MAX", 256, 1..=10_000)?,
            grpc_call_timeout: s.duration("DMPAY_GRPC_CALL_TIMEOUT", Duration::from_secs(10))?,
            grpc_keepalive_interval: s.duration("DMPAY_GRPC_KEEPALIVE_INTERVAL", Duration::from_secs(30))?,
            grpc_keepalive_timeout: s.duration("DMPAY_GRPC_KEEPALIVE_TIMEOUT", Duration::from_secs(10))?,
            connections: crate::api::connections::ConnectionLimits {
                open_max: s.num("DMPAY_GRPC_CONNECTIONS_MAX", 10_000, 1..=1_000_000)?,
                per_ip_max: s.num("DMPAY_GRPC_CONNECTIONS_PER_IP_MAX", 1_000, 1..=1_000_000)?,
                idle_timeout: s.duration("DMPAY_GRPC_IDLE_TIMEOUT", Duration::from_secs(120))?,
            },
            rate_limits: {
                let d = crate::api::rate::RateLimits::default();
                let rate = |per_second: &'static str, burst: &'static str, default: crate::api::rate::Rate| {
                    Ok::<_, ConfigError>(crate::api::rate::Rate {
                        per_second: s.num(per_second, default.per_second, 0.001..=1_000_000.0)?,
                        burst: s.num(burst, default.burst, 1.0..=10_000_000.0)?,
                    })
                };
                crate::api::rate::RateLimits {
                    unverified: rate("DMPAY_RATE_UNVERIFIED_PER_SECOND", "DMPAY_RATE_UNVERIFIED_BURST", d.unverified)?,
                    verified: rate("DMPAY_RATE_VERIFIED_PER_SECOND", "DMPAY_RATE_VERIFIED_BURST", d.verified)?,
                    service: rate("DMPAY_RATE_SERVICE_PER_SECOND", "DMPAY_RATE_SERVICE_BURST", d.service)?,
                }
            },
            watch: crate::api::watch::WatchLimits {
                total_max: s.num("DMPAY_WATCHERS_MAX", 10_000, 1..=1_000_000)?,
                per_user_max: s.num("DMPAY_WATCHERS_PER_USER_MAX", 5, 1..=1_000)?,
            },
            db_pool_size: s.num("DMPAY_DB_POOL_SIZE", 16, 1..=512)?,
            db_acquire_timeout: s.duration("DMPAY_DB_ACQUIRE_TIMEOUT", Duration::from_secs(3))?,
            currencies: parse_currencies(s.raw("DMPAY_CURRENCIES"))?,
            engine: EngineConfig {
                batch_size_max: s.num("DMPAY_LEDGER_BATCH_SIZE_MAX", engine.batch_size_max, 1..=4096)?,
                commit_wait: s.duration("DMPAY_LEDGER_COMMIT_WAIT", engine.commit_wait)?,
                queue_capacity: s.num("DMPAY_LEDGER_QUEUE_CAPACITY", engine.queue_capacity, 1..=1_000_000)?,
                workers: s.num("DMPAY_LEDGER_WORKERS", engine.workers, 1..=64)?,
                batch_timeout: s.duration("DMPAY_LEDGER_BATCH_TIMEOUT", engine.batch_timeout)?,
            },
            ledger_expiry_interval: s.duration("DMPAY_LEDGER_EXPIRY_INTERVAL", Duration::from_secs(1))?,
            idempotency_retention: s.duration("DMPAY_IDEMPOTENCY_RETENTION", Duration::from_secs(7 * 86_400))?,
            vault_keks: SecretString::from(s.string_or("DMPAY_VAULT_KEKS", DEV_KEKS)),
            vault_active_kek: s.raw("DMPAY_VAULT_ACTIVE_KEK"),
            vault_fingerprint_key: SecretString::from(s.string_or("DMPAY_VAULT_FINGERPRINT_KEY", DEV_FINGERPRINT_KEY)),
            vault: VaultConfig {
                unlinked_ttl: s.duration("DMPAY_VAULT_UNLINKED_TTL", vault.unlinked_ttl)?,
                tokenize_per_hour_max: s.num(
                    "DMPAY_VAULT_TOKENIZE_PER_HOUR_MAX",
                    vault.tokenize_per_hour_max,
                    1..=100_000,
                )?,
                removed_retention: s.duration("DMPAY_VAULT_REMOVED_RETENTION", vault.removed_retention)?,
                purge_interval: s.duration("DMPAY_VAULT_PURGE_INTERVAL", vault.purge_interval)?,
            },
            sandbox: SandboxConfig {
                latency: s.duration("DMPAY_SANDBOX_LATENCY", Duration::ZERO)?,
                timeout_rate: s.rate("DMPAY_SANDBOX_TIMEOUT_RATE")?,
                error_rate: s.rate("DMPAY_SANDBOX_ERROR_RATE")?,
            },
            payments: payments::load(&s)?,
            recon_time_tolerance: s.duration("DMPAY_RECON_TIME_TOLERANCE", Duration::from_secs(3600))?,
            payments_resolve_interval: s.duration("DMPAY_PAYMENTS_RESOLVE_INTERVAL", Duration::from_secs(2))?,
        };
        s.finish()?;
        payments::check(&config.payments)?;
        if !(Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&config.payments_resolve_interval) {
            return Err(ConfigError::Invalid {
                name: "DMPAY_PAYMENTS_RESOLVE_INTERVAL",
                detail: "100ms to 24h".into(),
            });
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&config.engine.batch_timeout) {
            return Err(ConfigError::Invalid { name: "DMPAY_LEDGER_BATCH_TIMEOUT", detail: "100ms to 60s".into() });
        }
        if config.engine.commit_wait > Duration::from_millis(100) {
            return Err(ConfigError::Invalid { name: "DMPAY_LEDGER_COMMIT_WAIT", detail: "at most 100ms".into() });
        }
        if config.idempotency_retention < Duration::from_secs(7 * 86_400) {
            return Err(ConfigError::Invalid {
                name: "DMPAY_IDEMPOTENCY_RETENTION",
                detail: "at least 7 days: clients may retry for a week".into(),
            });
        }
        if config.vault.removed_retention > Duration::from_secs(400 * 86_400) {
            return Err(ConfigError::Invalid {
                name: "DMPAY_VAULT_REMOVED_RETENTION",
                detail: "at most 400d: a removed card's number is kept no longer than needed".into(),
            });
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&config.vault.purge_interval) {
            return Err(ConfigError::Invalid { name: "DMPAY_VAULT_PURGE_INTERVAL", detail: "100ms to 1h".into() });
        }
        if config.grpc_keepalive_interval < Duration::from_secs(1)
            || config.grpc_keepalive_timeout < Duration::from_secs(1)
        {
            return Err(ConfigError::Invalid {
                name: "DMPAY_GRPC_KEEPALIVE_INTERVAL",
                detail: "the interval and DMPAY_GRPC_KEEPALIVE_TIMEOUT are at least 1s".into(),
            });
        }
        // A live client answers every PING, so a connection is only idle this long when
        // its client is gone or silent; a timeout shorter than the PING round would close
        // healthy connections between pings.
        if config.connections.idle_timeout <= config.grpc_keepalive_interval + config.grpc_keepalive_timeout {
            return Err(ConfigError::Invalid {
                name: "DMPAY_GRPC_IDLE_TIMEOUT",
                detail: "must be longer than DMPAY_GRPC_KEEPALIVE_INTERVAL plus DMPAY_GRPC_KEEPALIVE_TIMEOUT".into(),
            });
        }
        if !(Duration::from_secs(60)..=Duration::from_secs(30 * 86_400)).contains(&config.jwt_lifetime_max) {
            return Err(ConfigError::Invalid { name: "DMPAY_JWT_LIFETIME_MAX", detail: "1m to 30d".into() });
        }
        if config.jwt_keys_reload_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid { name: "DMPAY_JWT_KEYS_RELOAD_INTERVAL", detail: "at least 1s".into() });
        }
        Ok(config)
    }

    /// The vault's keys, checked.
    pub fn key_ring(&self) -> Result<KeyRing, crate::vault::keys::KeyError> {
        KeyRing::new(&self.vault_keks, self.vault_active_kek.as_deref(), &self.vault_fingerprint_key)
    }

    /// The token verifier's (and the dev token minter's) settings.
    pub fn jwt(&self) -> crate::auth::JwtSettings {
        crate::auth::JwtSettings {
            hs256_secret: self.hs256_enabled().then(|| self.jwt_hs256_secret.clone()),
            public_keys: self.jwt_public_keys.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            lifetime_max: self.jwt_lifetime_max,
            development: self.env == Environment::Development,
        }
    }

    /// The store's settings.
    pub fn store(&self) -> crate::store::StoreSettings {
        crate::store::StoreSettings {
            url: self.database_url.clone(),
            pool_size: self.db_pool_size,
            acquire_timeout: self.db_acquire_timeout,
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// HS256 verification is on unless the secret is the word `off`.
    pub fn hs256_enabled(&self) -> bool {
        self.jwt_hs256_secret.expose_secret() != "off"
    }
}

fn parse_currencies(raw: Option<String>) -> Result<Currencies, ConfigError> {
    let Some(raw) = raw else { return Ok(Currencies::all()) };
    let mut enabled = Vec::new();
    for code in raw.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let currency = Currency::from_code(code).ok_or_else(|| ConfigError::Invalid {
            name: "DMPAY_CURRENCIES",
            detail: format!("unknown currency {code:?}"),
        })?;
        if !enabled.contains(&currency) {
            enabled.push(currency);
        }
    }
    if enabled.is_empty() {
        return Err(ConfigError::Invalid { name: "DMPAY_CURRENCIES", detail: "at least one currency".into() });
    }
    Ok(Currencies::new(enabled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn nats_and_cors_are_off_unless_set_and_checked_when_set() {
        let c = Config::load_from(&env(&[]), None).unwrap();
        assert!(c.nats.is_none() && c.cors_origins.is_empty());
        let c = Config::load_from(
            &env(&[
                ("DMPAY_NATS_URL", "nats://127.0.0.1:4222"),
                ("DMPAY_CORS_ORIGINS", "https://chat.example.com, http://localhost:5173"),
            ]),
            None,
        )
        .unwrap();
        let n = c.nats.unwrap();
        assert_eq!((n.stream.as_str(), n.subject_prefix.as_str(), n.in_flight_max), ("DMPAY_EVENTS", "dmpay", 256));
        assert_eq!(c.cors_origins, ["https://chat.example.com", "http://localhost:5173"]);
        for (name, value) in [
            ("DMPAY_NATS_URL", "127.0.0.1:4222"),
            ("DMPAY_NATS_STREAM", "a.b"),
            ("DMPAY_NATS_SUBJECT_PREFIX", "dmpay.*"),
            ("DMPAY_NATS_SUBJECT_PREFIX", "a..b"),
            ("DMPAY_CORS_ORIGINS", "*"),
            ("DMPAY_CORS_ORIGINS", "https://chat.example.com/path"),
            ("DMPAY_CORS_ORIGINS", "chat.example.com"),
        ] {
            let mut pairs = vec![(name, value)];
            if name != "DMPAY_NATS_URL" && name.starts_with("DMPAY_NATS") {
                pairs.push(("DMPAY_NATS_URL", "nats://127.0.0.1:4222"));
            }
            let e = Config::load_from(&env(&pairs), None).unwrap_err().to_string();
            assert!(e.starts_with(name), "{name}={value}: {e}");
        }
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = Config::load_from(&env(&[]), None).unwrap();
        assert_eq!(c.env, Environment::Production, "production unless development is chosen");
        assert!(c.check_for_serving().is_err(), "and production refuses the published defaults");
        assert_eq!(c.processor, None);
        assert_eq!(c.jwt_lifetime_max, Duration::from_secs(86_400));
        let c = Config::load_from(&env(&[("DMPAY_ENV", "development")]), None).unwrap();
        assert!(c.check_for_serving().is_ok());
        assert_eq!(c.processor, Some(ProcessorKind::Sandbox));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(c.database_url.expose_secret(), "sqlite://var/dmpay.db");
        assert_eq!(c.jwt_issuer, "dmpay-dev");
        assert_eq!(c.jwt_audience, "dmpay");
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert_eq!(c.payments_resolve_interval, Duration::from_secs(2));
        let err = Config::load_from(&env(&[("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "10ms")]), None).unwrap_err();
        assert!(err.to_string().contains("DMPAY_PAYMENTS_RESOLVE_INTERVAL"), "{err}");
    }

    /// Each production refusal names the setting to change.
    #[test]
    fn production_fails_closed() {
        let kek = format!("prod-1:{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
        let fp = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [8u8; 32]);
        let real_jwt = "a-real-secret-from-a-vault-32-bytes!";
        let serve = |extra: &[(&str, &str)]| {
            let mut pairs = vec![
                ("DMPAY_JWT_HS256_SECRET", real_jwt),
                ("DMPAY_VAULT_KEKS", kek.as_str()),
                ("DMPAY_VAULT_FINGERPRINT_KEY", fp.as_str()),
                ("DMPAY_PROCESSOR", "sandbox"),
                ("DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION", "true"),
            ];
            pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            pairs.extend_from_slice(extra);
            Config::load_from(&env(&pairs), None).and_then(|c| c.check_for_serving().map(|()| c))
        };
        let c = serve(&[]).expect("a complete production configuration serves");
        assert!(c.sandbox_in_production());
        let refused = |extra: &[(&str, &str)], name: &str| {
            let err = serve(extra).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains(name), "{extra:?}: {err}");
        };
        refused(&[("DMPAY_JWT_HS256_SECRET", DEV_JWT_SECRET)], "DMPAY_JWT_HS256_SECRET");
        refused(&[("DMPAY_JWT_HS256_SECRET", "short-secret")], "DMPAY_JWT_HS256_SECRET shorter than 32 bytes");
        refused(&[("DMPAY_JWT_HS256_SECRET", "")], "DMPAY_JWT_HS256_SECRET");
        refused(&[("DMPAY_JWT_HS256_SECRET", "OFF")], "DMPAY_JWT_HS256_SECRET");
        refused(&[("DMPAY_JWT_HS256_SECRET", "disabled")], "DMPAY_JWT_HS256_SECRET");
        refused(&[("DMPAY_VAULT_KEKS", DEV_KEKS)], "DMPAY_VAULT_KEKS");
        refused(
            &[("DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION", "false")],
            "DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION",
        );
        refused(
            &[("DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION", "yes")],
            "DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION",
        );
        refused(&[("DMPAY_PROCESSOR", "stripe")], "DMPAY_PROCESSOR");
        refused(&[("DMPAY_ENV", "staging")], "DMPAY_ENV");
        // No processor named at all.
        let err = Config::load_from(
            &env(&[
                ("DMPAY_JWT_HS256_SECRET", real_jwt),
                ("DMPAY_VAULT_KEKS", &kek),
                ("DMPAY_VAULT_FINGERPRINT_KEY", &fp),
            ]),
            None,
        )
        .unwrap()
        .check_for_serving()
        .unwrap_err();
        assert!(err.to_string().contains("DMPAY_PROCESSOR"), "{err}");
        // `off` switches HS256 off, so no HS256 secret is needed beside public keys.
        let c = serve(&[("DMPAY_JWT_HS256_SECRET", "off"), ("DMPAY_JWT_PUBLIC_KEYS", "/keys.pem")]).unwrap();
        assert!(!c.hs256_enabled());
    }

    #[test]
    fn metrics_can_be_switched_off_and_bad_values_name_the_variable() {
        let c = Config::load_from(&env(&[("DMPAY_METRICS_ADDR", "off")]), None).unwrap();
        assert!(c.metrics_addr.is_none());
        let err = Config::load_from(&env(&[("DMPAY_GRPC_ADDR", "nope")]), None).unwrap_err();
        assert!(err.to_string().contains("DMPAY_GRPC_ADDR"));
        let err = Config::load_from(&env(&[("DMPAY_DATABASE_URL", "mysql://x")]), None).unwrap_err();
        assert!(err.to_string().contains("DMPAY_DATABASE_URL"));
    }

    #[test]
    fn toml_file_is_read_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dmpay.toml");
        std::fs::write(&path, "grpc_addr = \"127.0.0.1:6000\"\njwt_issuer = \"from-file\"\n").unwrap();
        let c = Config::load_from(&env(&[("DMPAY_JWT_ISSUER", "from-env")]), Some(&path)).unwrap();
        assert_eq!(c.grpc_addr.port(), 6000);
        assert_eq!(c.jwt_issuer, "from-env");
        std::fs::write(&path, "grpc_adr = \"x\"\n").unwrap();
        let err = Config::load_from(&env(&[]), Some(&path)).unwrap_err();
        assert!(err.to_string().contains("unknown setting \"grpc_adr\""), "{err}");
        std::fs::write(&path, "ledger_workers = 3\n").unwrap();
        let err = Config::load_from(&env(&[]), Some(&path)).unwrap_err();
        assert!(err.to_string().contains("ledger_workers: expected a string"), "{err}");
    }

    #[test]
    fn every_kind_of_setting_is_read_from_the_file_and_named_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dmpay.toml");
        std::fs::write(
            &path,
            "ledger_workers = \"3\"\nledger_commit_wait = \"1ms\"\nsandbox_error_rate = \"0.25\"\n\
             env = \"dev\"\nlog_format = \"json\"\nmetrics_addr = \"off\"\n\
             limit_verified_daily_max = \"12345\"\ncurrencies = \"USD, EUR\"\n",
        )
        .unwrap();
        let c = Config::load_from(&env(&[]), Some(&path)).unwrap();
        assert_eq!(c.engine.workers, 3);
        assert_eq!(c.engine.commit_wait, Duration::from_millis(1));
        assert_eq!(c.sandbox.error_rate, 0.25);
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.metrics_addr.is_none());
        assert_eq!(c.payments.verified.daily_max, 12345);
        for (name, value) in [
            ("DMPAY_LEDGER_WORKERS", "0"),
            ("DMPAY_LEDGER_COMMIT_WAIT", "soon"),
            ("DMPAY_SANDBOX_ERROR_RATE", "1.5"),
            ("DMPAY_ENV", "staging"),
            ("DMPAY_LOG_FORMAT", "xml"),
            ("DMPAY_LIMIT_VERIFIED_DAILY_MAX", "-1"),
            ("DMPAY_CURRENCIES", "XXX"),
        ] {
            let err = Config::load_from(&env(&[(name, value)]), Some(&path)).unwrap_err();
            assert!(err.to_string().starts_with(name), "{name}={value}: {err}");
        }
    }
}
