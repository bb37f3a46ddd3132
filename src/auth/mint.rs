//! `dmpay token`: development tokens signed with the configured HS256 secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::JwtSettings;

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
pub fn mint_dev_token(jwt: &JwtSettings, sub: &str, scope: &str, ttl: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(jwt.development, "dmpay token is refused in production mode (DMPAY_ENV=production)");
    let Some(secret) = &jwt.hs256_secret else {
        anyhow::bail!("HS256 is switched off (DMPAY_JWT_HS256_SECRET=off)");
    };
    anyhow::ensure!(!sub.is_empty() && sub.len() <= 128, "--sub must be 1 to 128 characters");
    anyhow::ensure!(
        ttl <= jwt.lifetime_max,
        "--ttl {} is longer than the {} a token may live (DMPAY_JWT_LIFETIME_MAX)",
        humantime::format_duration(ttl),
        humantime::format_duration(jwt.lifetime_max)
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = MintClaims {
        sub,
        scope,
        iss: &jwt.issuer,
        aud: &jwt.audience,
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs().max(1),
    };
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
    Ok(jsonwebtoken::encode(&Header::default(), &claims, &key)?)
}
