//! Per-caller write rate limits: a token bucket per `sub`, refilled at its tier's rate.
//!
//! One hostile client must not be able to slow the service for everybody, nor grow its
//! tables: every call that writes (any method that is not a read, by name: `Get*`,
//! `List*`, `Watch*`, `Export*`, `Verify*`) takes a token from its caller's bucket, after
//! authentication. An empty bucket is RESOURCE_EXHAUSTED with `ErrorInfo.reason`
//! `RATE_LIMITED` and `google.rpc.RetryInfo` saying when the next token is there; the
//! call does nothing. The buckets are per process: behind N replicas a caller gets N
//! times the rate at most.
//!
//! A caller's tier decides its rate: `service` for a token with a platform scope
//! (`accounts:admin`, `ledger:write`, `finance`, `payments:watch_all`), else the tier of
//! its platform account (unverified when it has none yet), read at most once per
//! `TIER_TTL` per caller.
//!
//! Bounds: at most `BUCKETS_MAX` callers are remembered per shard set; when full, buckets
//! that have refilled completely (idle callers, who lose nothing by being forgotten) are
//! dropped first, and if none has, the oldest are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use crate::accounts::{Accounts, Tier};
use crate::auth::{scope, Principal};
use crate::kernel::ids::UserId;

/// Callers remembered across all shards.
const BUCKETS_MAX: usize = 200_000;
/// Shards of the bucket map, so that concurrent calls rarely wait on one lock.
const SHARDS: usize = 16;
/// How long a caller's tier is trusted before it is read again.
const TIER_TTL: Duration = Duration::from_secs(30);

/// A tier's bucket: `per_second` tokens a second, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The rate of each kind of caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub unverified: Rate,
    pub verified: Rate,
    pub service: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            unverified: Rate { per_second: 10.0, burst: 50.0 },
            verified: Rate { per_second: 20.0, burst: 100.0 },
            service: Rate { per_second: 2_000.0, burst: 10_000.0 },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: Rate,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        self.at = now;
    }

    fn full(&self, now: Instant) -> bool {
        let mut b = *self;
        b.refill(now);
        b.tokens >= b.rate.burst
    }
}

/// The shared state: buckets and cached tiers.
pub struct Limiter {
    limits: RateLimits,
    /// Std mutexes: each is held for a map operation, never across an await.
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
    tiers: Mutex<HashMap<String, (Tier, Instant)>>,
    accounts: Accounts,
    metrics: crate::telemetry::Metrics,
}

impl Limiter {
    pub fn new(limits: RateLimits, accounts: Accounts, metrics: crate::telemetry::Metrics) -> Arc<Self> {
        Arc::new(Limiter {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            tiers: Mutex::new(HashMap::new()),
            accounts,
            metrics,
        })
    }

    fn shard(&self, sub: &str) -> &Mutex<HashMap<String, Bucket>> {
        let h = sub.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
        &self.shards[h % SHARDS]
    }

    /// The rate of `caller`.
    async fn rate(&self, caller: &Principal) -> Rate {
        const SERVICE: [&str; 4] =
            [scope::ACCOUNTS_ADMIN, scope::LEDGER_WRITE, scope::FINANCE, scope::PAYMENTS_WATCH_ALL];
        if SERVICE.iter().any(|s| caller.has(s)) {
            return self.limits.service;
        }
        let now = Instant::now();
        let cached = self.tiers.lock().ok().and_then(|t| t.get(&caller.sub).copied());
        let tier = match cached {
            Some((tier, at)) if now.saturating_duration_since(at) < TIER_TTL => tier,
            _ => {
                // A sub that is not a user id, or a lookup that fails, counts as the
                // lowest tier: the limit must hold when the database does not answer.
                let tier = match UserId::parse("sub", &caller.sub) {
                    // Read together with the other first callers of the moment.
                    Ok(user) => self.accounts.tier_of(&user).await.ok().flatten().unwrap_or(Tier::Unverified),
                    Err(_) => Tier::Unverified,
                };
                if let Ok(mut tiers) = self.tiers.lock() {
                    if tiers.len() >= BUCKETS_MAX {
                        tiers.retain(|_, (_, at)| now.saturating_duration_since(*at) < TIER_TTL);
                        if tiers.len() >= BUCKETS_MAX {
                            tiers.clear();
                        }
                    }
                    tiers.insert(caller.sub.clone(), (tier, now));
                }
                tier
            }
        };
        match tier {
            Tier::Unverified => self.limits.unverified,
            Tier::Verified => self.limits.verified,
        }
    }

    /// Takes one token from `caller`'s bucket, or says how long until there is one.
    pub async fn take(&self, caller: &Principal) -> Result<(), Duration> {
        let rate = self.rate(caller).await;
        let now = Instant::now();
        // A lock poisoned by a panic elsewhere still holds valid buckets: keep counting
        // (letting every write through would fail open).
        let mut map = self.shard(&caller.sub).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(&caller.sub) && map.len() >= BUCKETS_MAX / SHARDS {
            map.retain(|_, b| !b.full(now));
            if map.len() >= BUCKETS_MAX / SHARDS {
                // Everyone here is active: forget the one idle longest.
                if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        let bucket = map.entry(caller.sub.clone()).or_insert(Bucket { tokens: rate.burst, at: now, rate });
        // A tier change takes effect at once (the tokens kept, up to the new burst).
        bucket.rate = rate;
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        self.metrics.counters().rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wait = (1.0 - bucket.tokens) / rate.per_second.max(f64::MIN_POSITIVE);
        Err(Duration::from_secs_f64(wait.min(3_600.0)))
    }
}

/// Whether a method (the last segment of its path) only reads.
pub fn is_read(method: &str) -> bool {
    ["Get", "List", "Watch", "Export", "Verify"].iter().any(|p| method.starts_with(p))
}

/// The refusal of a call over its caller's rate.
pub fn limited(retry_after: Duration) -> Status {
    let millis = retry_after.as_millis().max(1);
    let details = ErrorDetails::with_error_info(
        crate::kernel::reason::Reason::RateLimited.as_str(),
        super::status::ERROR_DOMAIN,
        HashMap::from([("retry_after_ms".to_string(), millis.to_string())]),
    );
    let mut details = details;
    details.set_retry_info(Some(retry_after.max(Duration::from_millis(1))));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("too many writes from this caller; retry in {millis} ms"),
        details,
    )
}

/// Wraps one service, inside its auth interceptor (which puts the `Principal` in the
/// request's extensions).
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    pub fn new(limiter: Arc<Limiter>) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimited { inner, limiter: self.limiter.clone() }
    }
}

#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> tonic::server::NamedService for RateLimited<S>
where
    S: tonic::server::NamedService,
{
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for RateLimited<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let method = req.uri().path().rsplit('/').next().unwrap_or_default();
            if !is_read(method) {
                if let Some(caller) = req.extensions().get::<Principal>().cloned() {
                    if let Err(wait) = limiter.take(&caller).await {
                        return Ok(limited(wait).into_http());
                    }
                }
            }
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_limited_by_name() {
        for m in ["GetPayment", "ListPayments", "WatchPayments", "ExportEntries", "VerifyLedger", "GetBalance"] {
            assert!(is_read(m), "{m}");
        }
        for m in ["SendPayment", "PayBill", "PostEntry", "TokenizeCard", "UpsertAccount", "NewThing"] {
            assert!(!is_read(m), "{m}");
        }
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let now = Instant::now();
        let mut b = Bucket { tokens: 0.0, at: now, rate: Rate { per_second: 10.0, burst: 5.0 } };
        b.refill(now + Duration::from_millis(200));
        assert!((b.tokens - 2.0).abs() < 1e-9);
        b.refill(now + Duration::from_secs(60));
        assert_eq!(b.tokens, 5.0);
        assert!(b.full(now + Duration::from_secs(60)));
    }
}
