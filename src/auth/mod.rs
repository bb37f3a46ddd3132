//! Bearer-JWT authentication and scope checks.
//!
//! `Verifier` holds the configured keys and checks signature, `exp`, `nbf`, `iss` and
//! `aud`. Only algorithms that have a configured key are accepted, and a key is used only
//! with its own algorithm, so an HS256 token can never be checked against an RSA public
//! key (algorithm confusion) and `alg: none` is refused before any key is looked at.
//! Verified claims reach handlers as a `Principal` in the request extensions.
//!
//! A token must also say when it was issued (`iat`) and live no longer than
//! `DMPAY_JWT_LIFETIME_MAX`, so a leaked token cannot be good for years; and a header
//! with `crit` is refused, since dmpay understands no critical extension (RFC 7515
//! 4.1.11: a recipient must then reject the token). Public keys are read again from
//! their file every `DMPAY_JWT_KEYS_RELOAD_INTERVAL` and on SIGHUP (`reload`), so a key
//! rotated at the identity service takes effect without a restart.

mod keys;
mod mint;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::kernel::error::Error;

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
    /// The platform service that runs live streams: manages any seller's listings,
    /// marks orders delivered, refunds on a seller's behalf.
    pub const SHOPPING_ADMIN: &str = "shopping:admin";
    pub const LEDGER_WRITE: &str = "ledger:write";
    /// With `ledger:write`: `PostEntry` may debit a user's wallet.
    pub const LEDGER_WALLET_DEBIT: &str = "ledger:wallet_debit";
    pub const LEDGER_READ: &str = "ledger:read";
    pub const FINANCE: &str = "finance";
}

/// What verifies (and, in development, mints) tokens: `DMPAY_JWT_*`.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The HS256 key; `None` when HS256 is off (`DMPAY_JWT_HS256_SECRET=off`).
    pub hs256_secret: Option<secrecy::SecretString>,
    /// A PEM or JWKS file of public keys, read again on reload.
    pub public_keys: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
    /// The longest a token may live (`exp - iat`).
    pub lifetime_max: std::time::Duration,
    /// Development mode: `dmpay token` may mint tokens.
    pub development: bool,
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
    /// Validated by jsonwebtoken as a number of seconds; read here for the lifetime.
    exp: u64,
    /// Required: a token that does not say when it was issued cannot be held to a
    /// lifetime.
    #[serde(default, deserialize_with = "present")]
    iat: Option<serde_json::Value>,
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
    /// The HS256 key (if on) and the public keys; replaced whole by `reload`. A std
    /// lock: held to clone the `Arc`, never across an await.
    keys: RwLock<Arc<Vec<keys::Key>>>,
    /// Where the public keys are read from, again on every reload.
    public_keys: Option<PathBuf>,
    hs256: Option<keys::Key>,
    issuer: String,
    audience: String,
    lifetime_max_s: u64,
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl Verifier {
    pub fn new(settings: &JwtSettings) -> Result<Self, KeyError> {
        let hs256 = settings.hs256_secret.as_ref().map(keys::Key::hs256);
        let keys = Self::load(hs256.as_ref(), settings.public_keys.as_ref())?;
        Ok(Verifier {
            inner: Arc::new(Inner {
                keys: RwLock::new(Arc::new(keys)),
                public_keys: settings.public_keys.clone(),
                hs256,
                issuer: settings.issuer.clone(),
                audience: settings.audience.clone(),
                lifetime_max_s: settings.lifetime_max.as_secs(),
            }),
        })
    }

    fn load(hs256: Option<&keys::Key>, public_keys: Option<&PathBuf>) -> Result<Vec<keys::Key>, KeyError> {
        let mut keys: Vec<keys::Key> = hs256.into_iter().cloned().collect();
        if let Some(path) = public_keys {
            keys.extend(keys::load_public_keys(path)?);
        }
        if keys.is_empty() {
            return Err(KeyError("no JWT verification key configured".into()));
        }
        Ok(keys)
    }

    /// Reads the public keys again. On any error the keys in use stay (a half-written
    /// or broken file must not lock every caller out); the error is for the log.
    /// Returns how many public keys are now in use.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let Some(path) = &self.inner.public_keys else { return Ok(0) };
        let keys = Self::load(self.inner.hs256.as_ref(), Some(path))?;
        let public = keys.len() - usize::from(self.inner.hs256.is_some());
        if let Ok(mut slot) = self.inner.keys.write() {
            *slot = Arc::new(keys);
        }
        Ok(public)
    }

    /// Reloads the public keys every `interval` and on SIGHUP, until the task is
    /// aborted. The SIGHUP handler is in place when this returns, so a signal sent after
    /// it is never missed (nor, with no handler, fatal to the process).
    pub fn spawn_reloader(self, interval: std::time::Duration) -> tokio::task::JoinHandle<()> {
        #[cfg(unix)]
        let hup = match self.inner.public_keys {
            Some(_) => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
            None => None,
        };
        #[cfg(not(unix))]
        let hup = None::<()>;
        tokio::spawn(self.run_reloader(interval, hup))
    }

    async fn run_reloader(
        self,
        interval: std::time::Duration,
        #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
        #[cfg(not(unix))] _hup: Option<()>,
    ) {
        if self.inner.public_keys.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let why = tokio::select! {
                _ = tick.tick() => "interval",
                () = hangup => "SIGHUP",
            };
            match self.reload() {
                Ok(n) => tracing::debug!(keys = n, trigger = why, "JWT public keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, trigger = why, "JWT public keys not reloaded; the previous keys stay in use")
                }
            }
        }
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
        if has_crit(token) {
            return Err(Error::Unauthenticated("token header has critical extensions (crit), none supported".into()));
        }
        let keys = self.inner.keys.read().map(|k| k.clone()).unwrap_or_default();
        let key = Self::pick_key(&keys, header.alg, header.kid.as_deref())?;

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
        let iat = match data.claims.iat.as_ref() {
            None => return Err(Error::Unauthenticated("token lacks iat (issued at)".into())),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| Error::Unauthenticated("token iat must be whole seconds since the epoch".into()))?,
        };
        let now = jsonwebtoken::get_current_timestamp();
        if iat > now.saturating_add(LEEWAY_S) {
            return Err(Error::Unauthenticated("token issued in the future (iat)".into()));
        }
        if data.claims.exp.saturating_sub(iat) > self.inner.lifetime_max_s {
            return Err(Error::Unauthenticated(format!(
                "token lifetime (exp - iat) longer than {} s (DMPAY_JWT_LIFETIME_MAX)",
                self.inner.lifetime_max_s
            )));
        }
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > 128 {
            return Err(Error::Unauthenticated("token sub must be 1 to 128 characters".into()));
        }
        Ok(Principal { sub, scopes: data.claims.scope.split_whitespace().map(str::to_owned).collect() })
    }

    fn pick_key<'k>(keys: &'k [keys::Key], alg: Algorithm, kid: Option<&str>) -> Result<&'k keys::Key, Error> {
        let mut same_alg = keys.iter().filter(|k| k.alg == alg).peekable();
        if same_alg.peek().is_none() {
            return Err(Error::Unauthenticated(format!("algorithm {alg:?} not accepted")));
        }
        match kid {
            // A kid that matches no key of that algorithm is refused rather than tried
            // against the others: a rotated-out key must stop working.
            Some(kid) if keys.iter().any(|k| k.kid.is_some()) => same_alg
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| Error::Unauthenticated("unknown key id (kid)".into())),
            _ => same_alg.next().ok_or_else(|| Error::Unauthenticated(format!("algorithm {alg:?} not accepted"))),
        }
    }
}

/// Whether the token's header names critical extensions (`crit`). jsonwebtoken's header
/// type drops unknown fields, so the header is read again as plain JSON; a header that
/// does not decode was already refused by `decode_header`.
fn has_crit(token: &str) -> bool {
    use base64::Engine;
    let Some(segment) = token.split('.').next() else { return false };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).is_ok_and(|h| h.contains_key("crit"))
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
