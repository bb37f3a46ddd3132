//! The development demo (`GET /demo`): two users' DM threads side by side, the living
//! example of a web client, built on Connect JSON and `WatchPayments`; and the
//! development tokens it acts with (`GET /demo/token?user=alice`), signed with the
//! development secret the server already trusts. The Connect layer routes both, in
//! development mode only; neither exists in production.

use bytes::Bytes;
use tonic::Status;

use crate::auth::JwtSettings;

/// The page, compiled in.
const PAGE: &str = include_str!("demo.html");

/// What the demo page's tokens may do: act as the user, and set up the story (create
/// accounts, fund a wallet) as the demo's operator.
const SCOPES: &str = "payments:read payments:write methods:write accounts:admin ledger:write";

/// How long a demo token lives (at most `DMPAY_JWT_LIFETIME_MAX`).
const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// The page's HTML.
pub fn page() -> Bytes {
    Bytes::from_static(PAGE.as_bytes())
}

/// `{"user": ..., "token": ...}` for the `user=` of `query`, or the status to answer.
pub fn token(jwt: Option<&JwtSettings>, query: Option<&str>) -> Result<String, Status> {
    let user = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("user=")).unwrap_or("");
    let valid = !user.is_empty()
        && user.len() <= 64
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(Status::invalid_argument("user: 1 to 64 of a-z, 0-9, - and _"));
    }
    let jwt = jwt.ok_or_else(|| Status::failed_precondition("the demo is off"))?;
    let token = crate::auth::mint_dev_token(jwt, user, SCOPES, TOKEN_TTL.min(jwt.lifetime_max))
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Ok(serde_json::json!({ "user": user, "token": token }).to_string())
}
