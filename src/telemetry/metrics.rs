//! Prometheus metrics, encoded by the `prometheus-client` crate in the text exposition
//! format (0.0.4) and served over plain HTTP.
//!
//! Nothing a caller sends can grow them: the `method` label comes from the fixed set of
//! methods the server serves (`known_methods`, read from the API's descriptor set at
//! start), every other path counts as `unknown`, and `code` from the fixed set of gRPC
//! codes. So every series exists from the start, in fixed arrays of atomics: a call
//! adds to two or three of them without a lock and without allocating, and a scrape
//! reads them without stopping anyone. Only series that have counted something are
//! written out, which keeps `/metrics` a few kilobytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::store::Db;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Largest HTTP request head read from a scraper.
const HTTP_REQUEST_LEN_MAX: usize = 8 * 1024;

/// Scrapes served at once; more wait for the listener. A scrape is cheap, but a flood
/// of them must not take the runtime from the calls.
const SCRAPES_CONCURRENT_MAX: usize = 8;

/// The `method` label of every path that is not one the server serves.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The `code` labels: the gRPC codes by number, then a call that failed in transport.
const CODES: [&str; 18] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
    "TRANSPORT_ERROR",
];

/// The code label of a transport failure (no gRPC status).
pub const TRANSPORT_ERROR: usize = 17;

/// The label of a code index (`code_index`).
pub fn code_label(index: usize) -> &'static str {
    CODES.get(index).copied().unwrap_or("UNKNOWN")
}

/// The index of a gRPC status code's label; out-of-range numbers count as UNKNOWN.
pub fn code_index(code: i32) -> usize {
    usize::try_from(code).ok().filter(|c| *c < TRANSPORT_ERROR).unwrap_or(2)
}

#[derive(Debug, Default)]
struct Latency {
    /// Per bucket, not cumulative; the last one is above every bound (+Inf).
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Process gauges and counters other modules set, each a fixed series.
#[derive(Debug, Default)]
pub struct Counters {
    /// Open gRPC connections.
    pub connections_open: AtomicU64,
    /// Connections closed at once because `DMPAY_GRPC_CONNECTIONS_MAX` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed for saying nothing for `DMPAY_GRPC_IDLE_TIMEOUT`.
    pub connections_idle_closed: AtomicU64,
    /// `WatchPayments` streams open.
    pub watchers_open: AtomicU64,
    /// Writes refused by a caller's rate limit.
    pub rate_limited: AtomicU64,
    /// Reads of the outbox by the process's shared event feed.
    pub event_feed_reads: AtomicU64,
    /// Reads of the outbox by single watchers catching up (at the start, after lagging).
    pub watch_table_reads: AtomicU64,
    /// Events the NATS publisher had acknowledged by JetStream.
    pub nats_published: AtomicU64,
    /// Publish attempts that failed (broker out of reach, no acknowledgement): each is
    /// retried from the last acknowledged event.
    pub nats_publish_failures: AtomicU64,
    /// Events committed but not yet acknowledged by JetStream, as of the publisher's
    /// last look.
    pub nats_lag_events: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    /// Index -> path; the last one is `unknown`.
    methods: Vec<String>,
    /// Path -> index. Built once, never written again.
    index: HashMap<String, usize>,
    calls: Vec<[AtomicU64; CODES.len()]>,
    latency: Vec<Latency>,
    counters: Counters,
    db: OnceLock<Db>,
    engine: OnceLock<Arc<super::EngineStats>>,
    resolver: OnceLock<Arc<super::ResolverStats>>,
    sandbox_in_production: AtomicBool,
}

/// Process-wide metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Metrics {
    /// Metrics for a server that serves `known_methods` (gRPC paths, `/pkg.Service/Method`).
    pub fn new(known_methods: Vec<String>) -> Self {
        let mut methods = known_methods;
        methods.sort();
        methods.dedup();
        methods.retain(|m| m != UNKNOWN_METHOD);
        methods.push(UNKNOWN_METHOD.to_owned());
        let index = methods.iter().enumerate().map(|(i, m)| (m.clone(), i)).collect();
        let inner = Arc::new(Inner {
            calls: methods.iter().map(|_| Default::default()).collect(),
            latency: methods.iter().map(|_| Latency::default()).collect(),
            methods,
            index,
            counters: Counters::default(),
            db: OnceLock::new(),
            engine: OnceLock::new(),
            resolver: OnceLock::new(),
            sandbox_in_production: AtomicBool::new(false),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collect(inner.clone())));
        Metrics { inner, registry: Arc::new(registry) }
    }

    /// The pool whose connections in use are reported.
    pub fn set_db(&self, db: Db) {
        let _ = self.inner.db.set(db);
    }

    /// The posting engine whose batches are reported.
    pub fn set_engine(&self, stats: Arc<super::EngineStats>) {
        let _ = self.inner.engine.set(stats);
    }

    /// The payments resolver's counters, read at each scrape.
    pub fn set_resolver(&self, stats: Arc<super::ResolverStats>) {
        let _ = self.inner.resolver.set(stats);
    }

    /// Reports that the sandbox processor serves in production.
    pub fn set_sandbox_in_production(&self, live: bool) {
        self.inner.sandbox_in_production.store(live, Relaxed);
    }

    /// The gauges and counters other modules keep.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The label index of a request path: a served method, else `unknown`.
    pub fn method_index(&self, path: &str) -> usize {
        self.inner.index.get(path).copied().unwrap_or(self.inner.methods.len() - 1)
    }

    /// The label of a method index.
    pub fn method_name(&self, index: usize) -> &str {
        self.inner.methods.get(index).map(String::as_str).unwrap_or(UNKNOWN_METHOD)
    }

    /// Counts one call of method `method` (`method_index`) that ended with `code`
    /// (`code_index`, or `TRANSPORT_ERROR`) after `elapsed`.
    pub fn record_call(&self, method: usize, code: usize, elapsed: Duration) {
        let (Some(calls), Some(latency)) = (self.inner.calls.get(method), self.inner.latency.get(method)) else {
            return;
        };
        if let Some(c) = calls.get(code) {
            c.fetch_add(1, Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_S.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS_S.len());
        latency.buckets[bucket].fetch_add(1, Relaxed);
        latency.count.fetch_add(1, Relaxed);
        latency.sum_us.fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The registry's view of `Inner`: every series that has counted something.
#[derive(Debug)]
struct Collect(Arc<Inner>);

/// A value written as a counter or gauge by the encoder.
#[derive(Debug)]
struct Value(MetricType, f64);

impl EncodeMetric for Value {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            MetricType::Counter => {
                encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(&self.1, None)
            }
            _ => encoder.encode_gauge(&self.1),
        }
    }

    fn metric_type(&self) -> MetricType {
        self.0
    }
}

impl Collect {
    fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: Value) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(name, help, None, value.metric_type())?;
        value.encode(metric)
    }
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0;
        {
            let mut family = encoder.encode_descriptor(
                "dmpay_grpc_calls",
                "gRPC calls by method and status code",
                None,
                MetricType::Counter,
            )?;
            for (m, codes) in inner.calls.iter().enumerate() {
                for (c, n) in codes.iter().enumerate() {
                    let n = n.load(Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let labels = [("method", inner.methods[m].as_str()), ("code", CODES[c])];
                    let metric = family.encode_family(&labels)?;
                    Value(MetricType::Counter, n as f64).encode(metric)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "dmpay_grpc_call_seconds",
                "gRPC call latency by method",
                None,
                MetricType::Histogram,
            )?;
            for (m, h) in inner.latency.iter().enumerate() {
                let count = h.count.load(Relaxed);
                if count == 0 {
                    continue;
                }
                let mut buckets: Vec<(f64, u64)> =
                    LATENCY_BUCKETS_S.iter().enumerate().map(|(i, b)| (*b, h.buckets[i].load(Relaxed))).collect();
                buckets.push((f64::INFINITY, h.buckets[LATENCY_BUCKETS_S.len()].load(Relaxed)));
                // The buckets and the count are read one after the other while calls
                // go on: the count is their sum, so the +Inf bucket and `_count` agree.
                let count: u64 = buckets.iter().map(|(_, n)| n).sum();
                let labels = [("method", inner.methods[m].as_str())];
                let mut metric = family.encode_family(&labels)?;
                metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum_us.load(Relaxed) as f64 / 1e6,
                    count,
                    &buckets,
                    None,
                )?;
            }
        }
        if let Some(e) = inner.engine.get() {
            let batches = Value(MetricType::Counter, e.batches.load(Relaxed) as f64);
            Self::single(&mut encoder, "dmpay_ledger_batches", "Posting-engine batch transactions", batches)?;
            let commands = Value(MetricType::Counter, e.commands.load(Relaxed) as f64);
            Self::single(
                &mut encoder,
                "dmpay_ledger_commands",
                "Ledger commands committed or refused in batches",
                commands,
            )?;
            let hot = Value(MetricType::Counter, e.hot_batches.load(Relaxed) as f64);
            Self::single(
                &mut encoder,
                "dmpay_ledger_hot_batches",
                "Batches that gathered behind a hot account's batch (a live stream's seller)",
                hot,
            )?;
            let busy = Value(MetricType::Counter, e.busy_us.load(Relaxed) as f64 / 1e6);
            Self::single(&mut encoder, "dmpay_ledger_batch_seconds", "Time spent in batch transactions", busy)?;
        }
        if let Some(r) = inner.resolver.get() {
            let passes = Value(MetricType::Counter, r.passes.load(Relaxed) as f64);
            Self::single(
                &mut encoder,
                "dmpay_payments_resolver_passes",
                "Passes of the payments' background resolver finished",
                passes,
            )?;
        }
        if let Some(db) = inner.db.get() {
            let used = Value(MetricType::Gauge, f64::from(db.connections_in_use()));
            Self::single(
                &mut encoder,
                "dmpay_db_connections_in_use",
                "Database connections checked out of the pool",
                used,
            )?;
        }
        let c = &inner.counters;
        let gauge = |a: &AtomicU64| Value(MetricType::Gauge, a.load(Relaxed) as f64);
        let counter = |a: &AtomicU64| Value(MetricType::Counter, a.load(Relaxed) as f64);
        Self::single(&mut encoder, "dmpay_grpc_connections_open", "Open gRPC connections", gauge(&c.connections_open))?;
        Self::single(
            &mut encoder,
            "dmpay_grpc_connections_refused",
            "Connections closed at once because DMPAY_GRPC_CONNECTIONS_MAX were open",
            counter(&c.connections_refused),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_grpc_connections_idle_closed",
            "Connections closed after DMPAY_GRPC_IDLE_TIMEOUT without a byte from the client",
            counter(&c.connections_idle_closed),
        )?;
        Self::single(&mut encoder, "dmpay_watchers_open", "WatchPayments streams open", gauge(&c.watchers_open))?;
        Self::single(
            &mut encoder,
            "dmpay_event_feed_reads",
            "Outbox reads by the shared event feed (one per poll or local commit, whatever the watchers)",
            counter(&c.event_feed_reads),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_watch_table_reads",
            "Outbox reads by single watchers catching up from their cursor",
            counter(&c.watch_table_reads),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_nats_published_events",
            "Outbox events JetStream acknowledged (DMPAY_NATS_URL)",
            counter(&c.nats_published),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_nats_publish_failures",
            "Failed publish attempts, each retried from the last acknowledged event",
            counter(&c.nats_publish_failures),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_nats_lag_events",
            "Committed events not yet acknowledged by JetStream",
            gauge(&c.nats_lag_events),
        )?;
        Self::single(
            &mut encoder,
            "dmpay_rate_limited",
            "Calls refused by a caller's write rate limit",
            counter(&c.rate_limited),
        )?;
        let sandbox = Value(MetricType::Gauge, if inner.sandbox_in_production.load(Relaxed) { 1.0 } else { 0.0 });
        Self::single(
            &mut encoder,
            "dmpay_sandbox_processor_in_production",
            "1 while the sandbox card processor serves in production (DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION)",
            sandbox,
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. A deliberately tiny
/// HTTP/1.1 responder: one request per connection, bounded head, no keep-alive, a few
/// scrapes at a time.
pub async fn serve_metrics(listener: TcpListener, metrics: Metrics) {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(SCRAPES_CONCURRENT_MAX));
    loop {
        let Ok(permit) = scrapes.clone().acquire_owned().await else { return };
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HTTP_REQUEST_LEN_MAX {
                    let n = socket.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let (status, body) = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found; try GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label_and_the_text_is_small() {
        let m = Metrics::new(vec!["/dmpay.v1.Payments/SendPayment".into()]);
        let send = m.method_index("/dmpay.v1.Payments/SendPayment");
        m.record_call(send, 0, Duration::from_millis(3));
        for i in 0..10_000 {
            let i = m.method_index(&format!("/made.up/{i}\"\n"));
            m.record_call(i, code_index(12), Duration::from_micros(10));
        }
        let text = m.render();
        assert!(text.contains("dmpay_grpc_calls_total{method=\"unknown\",code=\"UNIMPLEMENTED\"} 10000"), "{text}");
        assert!(text.contains("dmpay_grpc_calls_total{method=\"/dmpay.v1.Payments/SendPayment\",code=\"OK\"} 1"));
        assert!(!text.contains("made.up"));
        assert!(text.len() < 8 * 1024, "{} bytes", text.len());
        assert_eq!(code_index(99), 2);
        assert_eq!(code_index(-1), 2);
    }
}
