//! Bearer-JWT authentication and scope checks.
//!
//! `Verifier` holds the configured keys and checks signature, `exp`, `nbf`, `iss` and
//! `aud`. Only algorithms that have a configured key are accepted, and a key is used only
//! with its own algorithm, so an HS256 token can never be checked against an RSA public
//! key (algorithm confusion) and `alg: none` is refused before any key is looked at.
//! Verified claims reach handlers as a `Principal` in the request extensions.

mod keys;
mod mint;

use std::collections::BTreeSet;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::error::Error;

pub use keys::KeyError;
pub use mint::mint_dev_token;

/// Largest bearer token accepted. Real tokens are well under 2 KiB; anything far larger
/// is refused before it is parsed, so a hostile header cannot cost much CPU.
pub const TOKEN_LEN_MAX: usize = 8 * 1024;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_S: u64 = 5;

pub mod scope {
    pub const PAYMENTS_WRITE: &str = "payments:write";
    pub const PAYMENTS_READ: &str = "payments:read";
    pub const PAYMENTS_WATCH_ALL: &str = "payments:watch_all";
    pub const METHODS_WRITE: &str = "methods:write";
    pub const ACCOUNTS_ADMIN: &str = "accounts:admin";
    pub const LEDGER_WRITE: &str = "ledger:write";
    /// With `ledger:write`: `PostEntry` may debit a user's wallet.
    pub const LEDGER_WALLET_DEBIT: &str = "ledger:wallet_debit";
    pub const LEDGER_READ: &str = "ledger:read";
    pub const FINANCE: &str = "finance";
}

/// The verified caller: a user or a platform service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub scopes: BTreeSet<String>,
}

impl Principal {
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    pub fn require(&self, scope: &str) -> Result<(), Error> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("missing scope {scope}")))
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
    /// Checked again here for its type: jsonwebtoken accepts a list naming the issuer.
    iss: serde_json::Value,
    /// Checked again here for its type: jsonwebtoken skips an `nbf` it cannot read as
    /// whole seconds (a string, a fraction, null) as if it were absent. Present as null
    /// reads as `Some(Null)` here, not as absent, so it is refused too.
    #[serde(default, deserialize_with = "present")]
    nbf: Option<serde_json::Value>,
}

/// A claim that is there, whatever its value (null included); `#[serde(default)]` makes a
/// missing one `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

struct Inner {
    keys: Vec<keys::Key>,
    issuer: String,
    audience: String,
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl Verifier {
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if config.hs256_enabled() {
            keys.push(keys::Key::hs256(&config.jwt_hs256_secret));
        }
        if let Some(path) = &config.jwt_public_keys {
            keys.extend(keys::load_public_keys(path)?);
        }
        if keys.is_empty() {
            return Err(KeyError("no JWT verification key configured".into()));
        }
        Ok(Verifier {
            inner: Arc::new(Inner { keys, issuer: config.jwt_issuer.clone(), audience: config.jwt_audience.clone() }),
        })
    }

    /// Checks an `authorization` header value and returns the caller.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, Error> {
        let header = header.ok_or_else(|| Error::Unauthenticated("missing authorization: Bearer token".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Error::Unauthenticated("authorization must be \"Bearer <token>\"".into()))?
            .trim();
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Principal, Error> {
        if token.is_empty() {
            return Err(Error::Unauthenticated("empty bearer token".into()));
        }
        if token.len() > TOKEN_LEN_MAX {
            return Err(Error::Unauthenticated(format!("token longer than {TOKEN_LEN_MAX} bytes")));
        }
        // An `alg` that jsonwebtoken does not know, `none` included, fails here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Unauthenticated("malformed token or unsupported algorithm".into()))?;
        let key = self.pick_key(header.alg, header.kid.as_deref())?;

        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_S;

        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::ExpiredSignature => "token expired",
                K::ImmatureSignature => "token not yet valid (nbf)",
                K::InvalidIssuer => "token issuer not accepted",
                K::InvalidAudience => "token audience not accepted",
                K::InvalidSignature => "token signature invalid",
                K::MissingRequiredClaim(_) => "token lacks a required claim (exp, iss, aud, sub)",
                _ => "token invalid",
            };
            Error::Unauthenticated(why.into())
        })?;
        if !data.claims.iss.is_string() {
            return Err(Error::Unauthenticated("token iss must be a single string".into()));
        }
        if data.claims.nbf.as_ref().is_some_and(|n| !n.is_u64()) {
            return Err(Error::Unauthenticated("token nbf must be whole seconds since the epoch".into()));
        }
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > 128 {
            return Err(Error::Unauthenticated("token sub must be 1 to 128 characters".into()));
        }
        Ok(Principal { sub, scopes: data.claims.scope.split_whitespace().map(str::to_owned).collect() })
    }

    fn pick_key(&self, alg: Algorithm, kid: Option<&str>) -> Result<&keys::Key, Error> {
        let mut same_alg = self.inner.keys.iter().filter(|k| k.alg == alg).peekable();
        if same_alg.peek().is_none() {
            return Err(Error::Unauthenticated(format!("algorithm {alg:?} not accepted")));
        }
        match kid {
            // A kid that matches no key of that algorithm is refused rather than tried
            // against the others: a rotated-out key must stop working.
            Some(kid) if self.inner.keys.iter().any(|k| k.kid.is_some()) => same_alg
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| Error::Unauthenticated("unknown key id (kid)".into())),
            _ => same_alg.next().ok_or_else(|| Error::Unauthenticated(format!("algorithm {alg:?} not accepted"))),
        }
    }
}

/// The tonic interceptor for every dmpay service: verifies the token and stores the
/// `Principal` in the request extensions.
#[derive(Clone)]
pub struct AuthInterceptor {
    verifier: Verifier,
}

impl AuthInterceptor {
    pub fn new(verifier: Verifier) -> Self {
        AuthInterceptor { verifier }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = match req.metadata().get("authorization") {
            Some(v) => {
                Some(v.to_str().map_err(|_| tonic::Status::unauthenticated("authorization header is not ASCII"))?)
            }
            None => None,
        };
        let principal =
            self.verifier.verify_header(header).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
        if let Some(slot) = req.extensions().get::<crate::telemetry::CallSlot>() {
            let _ = slot.sub.set(principal.sub.clone());
        }
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}
