//! `dmpay token`: development tokens signed with the configured HS256 secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::config::{Config, Environment};

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    scope: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

/// Signs a token for `sub` with `scope` (space-separated) valid for `ttl`. Refused in
/// production mode: production tokens come from the platform's identity service.
pub fn mint_dev_token(config: &Config, sub: &str, scope: &str, ttl: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(
        config.env != Environment::Production,
        "dmpay token is refused in production mode (DMPAY_ENV=production)"
    );
    anyhow::ensure!(config.hs256_enabled(), "HS256 is switched off (DMPAY_JWT_HS256_SECRET=off)");
    anyhow::ensure!(!sub.is_empty() && sub.len() <= 128, "--sub must be 1 to 128 characters");
    anyhow::ensure!(
        ttl <= config.jwt_lifetime_max,
        "--ttl {} is longer than the {} a token may live (DMPAY_JWT_LIFETIME_MAX)",
        humantime::format_duration(ttl),
        humantime::format_duration(config.jwt_lifetime_max)
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = MintClaims {
        sub,
        scope,
        iss: &config.jwt_issuer,
        aud: &config.jwt_audience,
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs().max(1),
    };
    let key = EncodingKey::from_secret(config.jwt_hs256_secret.expose_secret().as_bytes());
    Ok(jsonwebtoken::encode(&Header::default(), &claims, &key)?)
}
