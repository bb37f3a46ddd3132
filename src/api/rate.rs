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
    /// Made at the lowest rate before the caller's tier was known: when it is, the
    /// bucket gets the burst it would have started with.
    provisional: bool,
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

/// Tier lookups running in the background at most (`Limiter::look_up_later`); past this
/// a first caller waits for its own, as every caller did before.
const BACKGROUND_LOOKUPS_MAX: usize = 2_000;

type Tiers = Arc<Mutex<HashMap<String, (Tier, Instant)>>>;

/// The shared state: buckets and cached tiers.
pub struct Limiter {
    limits: RateLimits,
    /// Std mutexes: each is held for a map operation, never across an await.
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
    tiers: Tiers,
    accounts: Accounts,
    metrics: crate::telemetry::Metrics,
    background: Arc<std::sync::atomic::AtomicUsize>,
}

impl Limiter {
    pub fn new(limits: RateLimits, accounts: Accounts, metrics: crate::telemetry::Metrics) -> Arc<Self> {
        Arc::new(Limiter {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            tiers: Default::default(),
            accounts,
            metrics,
            background: Default::default(),
        })
    }

    fn shard(&self, sub: &str) -> &Mutex<HashMap<String, Bucket>> {
        let h = sub.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
        &self.shards[h % SHARDS]
    }

    /// The lowest rate of any user: what a caller whose tier is not known yet may do.
    fn lowest(&self) -> Rate {
        let (u, v) = (self.limits.unverified, self.limits.verified);
        Rate { per_second: u.per_second.min(v.per_second), burst: u.burst.min(v.burst) }
    }

    fn rate_of(&self, tier: Tier) -> Rate {
        match tier {
            Tier::Unverified => self.limits.unverified,
            Tier::Verified => self.limits.verified,
        }
    }

    /// The rate of `caller` when it is known without a read: a platform service's, or
    /// a user's whose tier was read less than `TIER_TTL` ago.
    fn known_rate(&self, caller: &Principal, now: Instant) -> Option<Rate> {
        const SERVICE: [&str; 4] =
            [scope::ACCOUNTS_ADMIN, scope::LEDGER_WRITE, scope::FINANCE, scope::PAYMENTS_WATCH_ALL];
        if SERVICE.iter().any(|s| caller.has(s)) {
            return Some(self.limits.service);
        }
        match self.tiers.lock().ok().and_then(|t| t.get(&caller.sub).copied()) {
            Some((tier, at)) if now.saturating_duration_since(at) < TIER_TTL => Some(self.rate_of(tier)),
            _ => None,
        }
    }

    /// Reads `caller`'s tier (with the other first callers of the moment) and remembers
    /// it. A sub that is not a user id, or a lookup that fails, counts as the lowest
    /// tier: the limit must hold when the database does not answer.
    async fn read_tier(accounts: &Accounts, tiers: &Tiers, sub: &str) -> Tier {
        let tier = match UserId::parse("sub", sub) {
            Ok(user) => accounts.tier_of(&user).await.ok().flatten().unwrap_or(Tier::Unverified),
            Err(_) => Tier::Unverified,
        };
        let now = Instant::now();
        if let Ok(mut tiers) = tiers.lock() {
            if tiers.len() >= BUCKETS_MAX {
                tiers.retain(|_, (_, at)| now.saturating_duration_since(*at) < TIER_TTL);
                if tiers.len() >= BUCKETS_MAX {
                    tiers.clear();
                }
            }
            tiers.insert(sub.to_owned(), (tier, now));
        }
        tier
    }

    /// Reads `caller`'s tier in a task of its own, unless too many such reads run.
    fn look_up_later(&self, caller: &Principal) -> bool {
        use std::sync::atomic::Ordering;
        if self.background.fetch_add(1, Ordering::Relaxed) >= BACKGROUND_LOOKUPS_MAX {
            self.background.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let (accounts, tiers, background, sub) =
            (self.accounts.clone(), self.tiers.clone(), self.background.clone(), caller.sub.clone());
        tokio::spawn(async move {
            Self::read_tier(&accounts, &tiers, &sub).await;
            background.fetch_sub(1, Ordering::Relaxed);
        });
        true
    }

    /// Takes one token from `caller`'s bucket, or says how long until there is one.
    ///
    /// A caller whose tier is not known (its first call, or the tier's `TIER_TTL` has
    /// passed) does not wait for it to be read when the call is within the lowest rate,
    /// which every tier allows: the tier is read in the background and applies from
    /// then on. Only a call the lowest rate would refuse waits for the read. So a live
    /// stream's first-time buyers spend no read before their tap, and no caller is ever
    /// let through beyond its tier's rate.
    pub async fn take(&self, caller: &Principal) -> Result<(), Duration> {
        let now = Instant::now();
        if let Some(rate) = self.known_rate(caller, now) {
            return self.take_at(caller, Some(rate), now);
        }
        if self.take_at(caller, None, now).is_ok() {
            if self.look_up_later(caller) {
                return Ok(());
            }
            // Too many reads in the background: this caller reads its own, as before;
            // the token it took stands.
            Self::read_tier(&self.accounts, &self.tiers, &caller.sub).await;
            return Ok(());
        }
        let tier = Self::read_tier(&self.accounts, &self.tiers, &caller.sub).await;
        self.take_at(caller, Some(self.rate_of(tier)), Instant::now())
    }

    /// Takes a token at `rate`, the caller's known rate; `None`: at the rate of its
    /// bucket, or the lowest rate for a new one.
    fn take_at(&self, caller: &Principal, rate: Option<Rate>, now: Instant) -> Result<(), Duration> {
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
        let start = rate.unwrap_or_else(|| self.lowest());
        let bucket = map.entry(caller.sub.clone()).or_insert(Bucket {
            tokens: start.burst,
            at: now,
            rate: start,
            provisional: rate.is_none(),
        });
        bucket.refill(now);
        if let Some(rate) = rate {
            if bucket.provisional {
                // Started at the lowest burst: the rest of this tier's burst now.
                bucket.tokens = (bucket.tokens + (rate.burst - bucket.rate.burst).max(0.0)).min(rate.burst);
                bucket.provisional = false;
            }
            // A tier change takes effect at once (the tokens kept, up to the new burst).
            bucket.rate = rate;
            bucket.tokens = bucket.tokens.min(rate.burst);
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let per_second = bucket.rate.per_second;
        let wait = (1.0 - bucket.tokens) / per_second.max(f64::MIN_POSITIVE);
        if rate.is_some() {
            self.metrics.counters().rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
        let mut b = Bucket { tokens: 0.0, at: now, rate: Rate { per_second: 10.0, burst: 5.0 }, provisional: false };
        b.refill(now + Duration::from_millis(200));
        assert!((b.tokens - 2.0).abs() < 1e-9);
        b.refill(now + Duration::from_secs(60));
        assert_eq!(b.tokens, 5.0);
        assert!(b.full(now + Duration::from_secs(60)));
    }
}
