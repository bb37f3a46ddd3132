//! Configuration: defaults, then an optional TOML file (`--config`), then `DMPAY_*`
//! environment variables, which win. Every setting is listed in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ledger::EngineConfig;
use crate::money::{Currencies, Currency};
use crate::payments::model::TierLimits;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

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
    pub log_format: LogFormat,
    /// Largest gRPC message accepted or sent.
    pub grpc_message_size_max: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub grpc_concurrent_streams_max: u32,
    /// Deadline for one unary call on the server side.
    pub grpc_call_timeout: Duration,
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
    #[error("DMPAY_ENV=production refuses {0}")]
    Production(String),
}

/// The TOML file's shape: the same names as the variables, lower case, without the
/// `DMPAY_` prefix (`grpc_addr = "0.0.0.0:50051"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    grpc_addr: Option<String>,
    metrics_addr: Option<String>,
    database_url: Option<String>,
    env: Option<String>,
    jwt_hs256_secret: Option<String>,
    jwt_public_keys: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    log_format: Option<String>,
    grpc_message_size_max: Option<String>,
    grpc_concurrent_streams_max: Option<String>,
    grpc_call_timeout: Option<String>,
    db_pool_size: Option<String>,
    db_acquire_timeout: Option<String>,
    currencies: Option<String>,
    ledger_batch_size_max: Option<String>,
    ledger_commit_wait: Option<String>,
    ledger_queue_capacity: Option<String>,
    ledger_workers: Option<String>,
    ledger_batch_timeout: Option<String>,
    ledger_expiry_interval: Option<String>,
    idempotency_retention: Option<String>,
    vault_keks: Option<String>,
    vault_active_kek: Option<String>,
    vault_fingerprint_key: Option<String>,
    vault_unlinked_ttl: Option<String>,
    vault_tokenize_per_hour_max: Option<String>,
    sandbox_latency: Option<String>,
    sandbox_timeout_rate: Option<String>,
    sandbox_error_rate: Option<String>,
    limit_unverified_payment_max: Option<String>,
    limit_unverified_daily_max: Option<String>,
    limit_verified_payment_max: Option<String>,
    limit_verified_daily_max: Option<String>,
    card_fee_bps: Option<String>,
    card_fee_fixed_minor: Option<String>,
    payments_resolve_after: Option<String>,
    recon_time_tolerance: Option<String>,
    payments_resolve_interval: Option<String>,
}

/// Where raw string settings come from, so tests can load without touching the process
/// environment.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Source for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        std::collections::HashMap::get(self, name).cloned()
    }
}

impl Config {
    /// Loads from the process environment and an optional TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(&ProcessEnv, file)
    }

    pub fn load_from(source: &dyn Source, file: Option<&Path>) -> Result<Self, ConfigError> {
        let file_cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::File { path: path.display().to_string(), detail: e.to_string() })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::File { path: path.display().to_string(), detail: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        let pick =
            |var: &str, from_file: &Option<String>| -> Option<String> { source.get(var).or_else(|| from_file.clone()) };

        let grpc_addr = parse_addr(
            "DMPAY_GRPC_ADDR",
            &pick("DMPAY_GRPC_ADDR", &file_cfg.grpc_addr).unwrap_or_else(|| "127.0.0.1:50051".into()),
        )?;
        let metrics_raw = pick("DMPAY_METRICS_ADDR", &file_cfg.metrics_addr).unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr = if metrics_raw.eq_ignore_ascii_case("off") {
            None
        } else {
            Some(parse_addr("DMPAY_METRICS_ADDR", &metrics_raw)?)
        };
        let database_url =
            pick("DMPAY_DATABASE_URL", &file_cfg.database_url).unwrap_or_else(|| "sqlite://var/dmpay.db".into());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                name: "DMPAY_DATABASE_URL",
                detail: "must start with sqlite:// or postgres://".into(),
            });
        }
        let env = match pick("DMPAY_ENV", &file_cfg.env).as_deref().unwrap_or("development") {
            "development" | "dev" => Environment::Development,
            "production" | "prod" => Environment::Production,
            other => {
                return Err(ConfigError::Invalid {
                    name: "DMPAY_ENV",
                    detail: format!("expected development or production, got {other:?}"),
                })
            }
        };
        let jwt_hs256_secret =
            pick("DMPAY_JWT_HS256_SECRET", &file_cfg.jwt_hs256_secret).unwrap_or_else(|| DEV_JWT_SECRET.into());
        let log_format = match pick("DMPAY_LOG_FORMAT", &file_cfg.log_format).as_deref().unwrap_or("pretty") {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid {
                    name: "DMPAY_LOG_FORMAT",
                    detail: format!("expected pretty or json, got {other:?}"),
                })
            }
        };

        let config = Config {
            grpc_addr,
            metrics_addr,
            database_url: SecretString::from(database_url),
            env,
            jwt_hs256_secret: SecretString::from(jwt_hs256_secret),
            jwt_public_keys: pick("DMPAY_JWT_PUBLIC_KEYS", &file_cfg.jwt_public_keys).map(PathBuf::from),
            jwt_issuer: pick("DMPAY_JWT_ISSUER", &file_cfg.jwt_issuer).unwrap_or_else(|| "dmpay-dev".into()),
            jwt_audience: pick("DMPAY_JWT_AUDIENCE", &file_cfg.jwt_audience).unwrap_or_else(|| "dmpay".into()),
            log_format,
            grpc_message_size_max: parse_num(
                "DMPAY_GRPC_MESSAGE_SIZE_MAX",
                pick("DMPAY_GRPC_MESSAGE_SIZE_MAX", &file_cfg.grpc_message_size_max),
                1024 * 1024,
                1024..=64 * 1024 * 1024,
            )?,
            grpc_concurrent_streams_max: parse_num(
                "DMPAY_GRPC_CONCURRENT_STREAMS_MAX",
                pick("DMPAY_GRPC_CONCURRENT_STREAMS_MAX", &file_cfg.grpc_concurrent_streams_max),
                256,
                1..=10_000,
            )?,
            grpc_call_timeout: parse_duration(
                "DMPAY_GRPC_CALL_TIMEOUT",
                pick("DMPAY_GRPC_CALL_TIMEOUT", &file_cfg.grpc_call_timeout),
                Duration::from_secs(10),
            )?,
            db_pool_size: parse_num(
                "DMPAY_DB_POOL_SIZE",
                pick("DMPAY_DB_POOL_SIZE", &file_cfg.db_pool_size),
                16,
                1..=512,
            )?,
            db_acquire_timeout: parse_duration(
                "DMPAY_DB_ACQUIRE_TIMEOUT",
                pick("DMPAY_DB_ACQUIRE_TIMEOUT", &file_cfg.db_acquire_timeout),
                Duration::from_secs(3),
            )?,
            currencies: parse_currencies(pick("DMPAY_CURRENCIES", &file_cfg.currencies))?,
            engine: EngineConfig {
                batch_size_max: parse_num(
                    "DMPAY_LEDGER_BATCH_SIZE_MAX",
                    pick("DMPAY_LEDGER_BATCH_SIZE_MAX", &file_cfg.ledger_batch_size_max),
                    EngineConfig::default().batch_size_max,
                    1..=4096,
                )?,
                commit_wait: parse_duration(
                    "DMPAY_LEDGER_COMMIT_WAIT",
                    pick("DMPAY_LEDGER_COMMIT_WAIT", &file_cfg.ledger_commit_wait),
                    EngineConfig::default().commit_wait,
                )?,
                queue_capacity: parse_num(
                    "DMPAY_LEDGER_QUEUE_CAPACITY",
                    pick("DMPAY_LEDGER_QUEUE_CAPACITY", &file_cfg.ledger_queue_capacity),
                    EngineConfig::default().queue_capacity,
                    1..=1_000_000,
                )?,
                workers: parse_num(
                    "DMPAY_LEDGER_WORKERS",
                    pick("DMPAY_LEDGER_WORKERS", &file_cfg.ledger_workers),
                    EngineConfig::default().workers,
                    1..=64,
                )?,
                batch_timeout: parse_duration(
                    "DMPAY_LEDGER_BATCH_TIMEOUT",
                    pick("DMPAY_LEDGER_BATCH_TIMEOUT", &file_cfg.ledger_batch_timeout),
                    EngineConfig::default().batch_timeout,
                )?,
            },
            ledger_expiry_interval: parse_duration(
                "DMPAY_LEDGER_EXPIRY_INTERVAL",
                pick("DMPAY_LEDGER_EXPIRY_INTERVAL", &file_cfg.ledger_expiry_interval),
                Duration::from_secs(1),
            )?,
            idempotency_retention: parse_duration(
                "DMPAY_IDEMPOTENCY_RETENTION",
                pick("DMPAY_IDEMPOTENCY_RETENTION", &file_cfg.idempotency_retention),
                Duration::from_secs(7 * 86_400),
            )?,
            vault_keks: SecretString::from(
                pick("DMPAY_VAULT_KEKS", &file_cfg.vault_keks).unwrap_or_else(|| DEV_KEKS.into()),
            ),
            vault_active_kek: pick("DMPAY_VAULT_ACTIVE_KEK", &file_cfg.vault_active_kek),
            vault_fingerprint_key: SecretString::from(
                pick("DMPAY_VAULT_FINGERPRINT_KEY", &file_cfg.vault_fingerprint_key)
                    .unwrap_or_else(|| DEV_FINGERPRINT_KEY.into()),
            ),
            vault: VaultConfig {
                unlinked_ttl: parse_duration(
                    "DMPAY_VAULT_UNLINKED_TTL",
                    pick("DMPAY_VAULT_UNLINKED_TTL", &file_cfg.vault_unlinked_ttl),
                    VaultConfig::default().unlinked_ttl,
                )?,
                tokenize_per_hour_max: parse_num(
                    "DMPAY_VAULT_TOKENIZE_PER_HOUR_MAX",
                    pick("DMPAY_VAULT_TOKENIZE_PER_HOUR_MAX", &file_cfg.vault_tokenize_per_hour_max),
                    VaultConfig::default().tokenize_per_hour_max,
                    1..=100_000,
                )?,
            },
            sandbox: SandboxConfig {
                latency: parse_duration(
                    "DMPAY_SANDBOX_LATENCY",
                    pick("DMPAY_SANDBOX_LATENCY", &file_cfg.sandbox_latency),
                    Duration::ZERO,
                )?,
                timeout_rate: parse_rate(
                    "DMPAY_SANDBOX_TIMEOUT_RATE",
                    pick("DMPAY_SANDBOX_TIMEOUT_RATE", &file_cfg.sandbox_timeout_rate),
                )?,
                error_rate: parse_rate(
                    "DMPAY_SANDBOX_ERROR_RATE",
                    pick("DMPAY_SANDBOX_ERROR_RATE", &file_cfg.sandbox_error_rate),
                )?,
            },
            payments: {
                let d = PaymentsConfig::default();
                let limit = |name: &'static str, raw: &Option<String>, default: i64| {
                    parse_num(name, pick(name, raw), default, 1..=1_000_000_000)
                };
                PaymentsConfig {
                    unverified: TierLimits {
                        payment_max: limit(
                            "DMPAY_LIMIT_UNVERIFIED_PAYMENT_MAX",
                            &file_cfg.limit_unverified_payment_max,
                            d.unverified.payment_max,
                        )?,
                        daily_max: limit(
                            "DMPAY_LIMIT_UNVERIFIED_DAILY_MAX",
                            &file_cfg.limit_unverified_daily_max,
                            d.unverified.daily_max,
                        )?,
                    },
                    verified: TierLimits {
                        payment_max: limit(
                            "DMPAY_LIMIT_VERIFIED_PAYMENT_MAX",
                            &file_cfg.limit_verified_payment_max,
                            d.verified.payment_max,
                        )?,
                        daily_max: limit(
                            "DMPAY_LIMIT_VERIFIED_DAILY_MAX",
                            &file_cfg.limit_verified_daily_max,
                            d.verified.daily_max,
                        )?,
                    },
                    card_fee_bps: parse_num(
                        "DMPAY_CARD_FEE_BPS",
                        pick("DMPAY_CARD_FEE_BPS", &file_cfg.card_fee_bps),
                        0,
                        0..=2_000,
                    )?,
                    card_fee_fixed_minor: parse_num(
                        "DMPAY_CARD_FEE_FIXED_MINOR",
                        pick("DMPAY_CARD_FEE_FIXED_MINOR", &file_cfg.card_fee_fixed_minor),
                        0,
                        0..=100_000,
                    )?,
                    resolve_after_s: parse_duration(
                        "DMPAY_PAYMENTS_RESOLVE_AFTER",
                        pick("DMPAY_PAYMENTS_RESOLVE_AFTER", &file_cfg.payments_resolve_after),
                        Duration::from_secs(d.resolve_after_s as u64),
                    )?
                    .as_secs() as i64,
                }
            },
            recon_time_tolerance: parse_duration(
                "DMPAY_RECON_TIME_TOLERANCE",
                pick("DMPAY_RECON_TIME_TOLERANCE", &file_cfg.recon_time_tolerance),
                Duration::from_secs(3600),
            )?,
            payments_resolve_interval: parse_duration(
                "DMPAY_PAYMENTS_RESOLVE_INTERVAL",
                pick("DMPAY_PAYMENTS_RESOLVE_INTERVAL", &file_cfg.payments_resolve_interval),
                Duration::from_secs(2),
            )?,
        };
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
        config.check_production()?;
        Ok(config)
    }

    /// Production must not run on anything whose value is published in this repository.
    fn check_production(&self) -> Result<(), ConfigError> {
        if self.env != Environment::Production {
            return Ok(());
        }
        if self.jwt_public_keys.is_none() && self.jwt_hs256_secret.expose_secret() == DEV_JWT_SECRET {
            return Err(ConfigError::Production(
                "the development JWT secret: set DMPAY_JWT_HS256_SECRET or DMPAY_JWT_PUBLIC_KEYS".into(),
            ));
        }
        if self.jwt_hs256_secret.expose_secret() == DEV_JWT_SECRET && self.jwt_public_keys.is_some() {
            // Public keys are configured; the dev HS256 secret would still verify tokens
            // anyone can mint, so it must not stay enabled beside them.
            return Err(ConfigError::Production(
                "the development JWT secret beside DMPAY_JWT_PUBLIC_KEYS: set DMPAY_JWT_HS256_SECRET=off".into(),
            ));
        }
        let ring =
            self.key_ring().map_err(|e| ConfigError::Invalid { name: "DMPAY_VAULT_KEKS", detail: e.to_string() })?;
        if ring.uses_dev_keys() {
            return Err(ConfigError::Production(
                "the development vault keys: set DMPAY_VAULT_KEKS and DMPAY_VAULT_FINGERPRINT_KEY".into(),
            ));
        }
        Ok(())
    }

    /// The vault's keys, checked.
    pub fn key_ring(&self) -> Result<KeyRing, crate::vault::keys::KeyError> {
        KeyRing::new(&self.vault_keks, self.vault_active_kek.as_deref(), &self.vault_fingerprint_key)
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// HS256 verification is on unless the secret is the word `off`.
    pub fn hs256_enabled(&self) -> bool {
        self.jwt_hs256_secret.expose_secret() != "off"
    }
}

fn parse_rate(name: &'static str, raw: Option<String>) -> Result<f64, ConfigError> {
    let Some(raw) = raw else { return Ok(0.0) };
    let rate: f64 = raw
        .trim()
        .parse()
        .map_err(|_| ConfigError::Invalid { name, detail: format!("expected 0.0 to 1.0, got {raw:?}") })?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(ConfigError::Invalid { name, detail: format!("expected 0.0 to 1.0, got {raw:?}") });
    }
    Ok(rate)
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

fn parse_addr(name: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.parse().map_err(|_| ConfigError::Invalid {
        name,
        detail: format!("expected HOST:PORT with an IP address, got {raw:?}"),
    })
}

fn parse_num<T>(
    name: &'static str,
    raw: Option<String>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = raw else { return Ok(default) };
    let value: T = raw
        .trim()
        .parse()
        .map_err(|_| ConfigError::Invalid { name, detail: format!("expected a number, got {raw:?}") })?;
    if !range.contains(&value) {
        return Err(ConfigError::Invalid {
            name,
            detail: format!("{value} is outside {}..={}", range.start(), range.end()),
        });
    }
    Ok(value)
}

fn parse_duration(name: &'static str, raw: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    humantime::parse_duration(raw.trim()).map_err(|e| ConfigError::Invalid {
        name,
        detail: format!("expected a duration like 500ms or 10s, got {raw:?}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = Config::load_from(&env(&[]), None).unwrap();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(c.database_url.expose_secret(), "sqlite://var/dmpay.db");
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.jwt_issuer, "dmpay-dev");
        assert_eq!(c.jwt_audience, "dmpay");
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert_eq!(c.payments_resolve_interval, Duration::from_secs(2));
        let err = Config::load_from(&env(&[("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "10ms")]), None).unwrap_err();
        assert!(err.to_string().contains("DMPAY_PAYMENTS_RESOLVE_INTERVAL"), "{err}");
    }

    #[test]
    fn production_refuses_the_dev_secret() {
        let err = Config::load_from(&env(&[("DMPAY_ENV", "production")]), None).unwrap_err();
        assert!(matches!(err, ConfigError::Production(_)), "{err}");
        let real_jwt = ("DMPAY_JWT_HS256_SECRET", "a-real-secret-from-a-vault");
        let err = Config::load_from(&env(&[("DMPAY_ENV", "production"), real_jwt]), None).unwrap_err();
        assert!(err.to_string().contains("vault"), "{err}");
        let kek = format!("prod-1:{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
        let fp = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [8u8; 32]);
        let ok = Config::load_from(
            &env(&[
                ("DMPAY_ENV", "production"),
                real_jwt,
                ("DMPAY_VAULT_KEKS", &kek),
                ("DMPAY_VAULT_FINGERPRINT_KEY", &fp),
            ]),
            None,
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
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
        assert!(Config::load_from(&env(&[]), Some(&path)).is_err());
    }
}
