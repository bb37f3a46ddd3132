//! Prometheus metrics in the text exposition format, served over plain HTTP.
//!
//! The registry is a handful of counters behind one std mutex: a call holds it for a map
//! lookup and two additions, far less than the call's own work, and a std mutex never
//! awaits while held.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::store::Db;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Largest HTTP request head read from a scraper.
const HTTP_REQUEST_LEN_MAX: usize = 8 * 1024;

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

#[derive(Default)]
struct Registry {
    calls: BTreeMap<(String, &'static str), u64>,
    latency: BTreeMap<String, Histogram>,
    counters: BTreeMap<&'static str, u64>,
}

/// Process-wide metrics. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    db: Arc<Mutex<Option<Db>>>,
    engine: Arc<Mutex<Option<Arc<crate::ledger::engine::EngineStats>>>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pool whose connections in use are reported.
    pub fn set_db(&self, db: Db) {
        if let Ok(mut slot) = self.db.lock() {
            *slot = Some(db);
        }
    }

    /// The posting engine whose batches are reported.
    pub fn set_engine(&self, stats: Arc<crate::ledger::engine::EngineStats>) {
        if let Ok(mut slot) = self.engine.lock() {
            *slot = Some(stats);
        }
    }

    pub fn record_call(&self, method: &str, code: &'static str, elapsed: Duration) {
        let Ok(mut reg) = self.registry.lock() else {
            return;
        };
        *reg.calls.entry((method.to_owned(), code)).or_default() += 1;
        let hist = reg.latency.entry(method.to_owned()).or_default();
        let secs = elapsed.as_secs_f64();
        hist.count += 1;
        hist.sum_s += secs;
        for (i, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
            if secs <= *bound {
                hist.buckets[i] += 1;
            }
        }
    }

    /// Adds to a named counter (`dmpay_<name>_total`).
    pub fn incr(&self, name: &'static str, by: u64) {
        if let Ok(mut reg) = self.registry.lock() {
            *reg.counters.entry(name).or_default() += by;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Ok(reg) = self.registry.lock() {
            out.push_str("# HELP dmpay_grpc_calls_total gRPC calls by method and status code.\n");
            out.push_str("# TYPE dmpay_grpc_calls_total counter\n");
            for ((method, code), n) in &reg.calls {
                let _ = writeln!(out, "dmpay_grpc_calls_total{{method=\"{method}\",code=\"{code}\"}} {n}");
            }
            out.push_str("# HELP dmpay_grpc_call_seconds gRPC call latency by method.\n");
            out.push_str("# TYPE dmpay_grpc_call_seconds histogram\n");
            for (method, h) in &reg.latency {
                for (i, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "dmpay_grpc_call_seconds_bucket{{method=\"{method}\",le=\"{bound}\"}} {}",
                        h.buckets[i]
                    );
                }
                let _ = writeln!(out, "dmpay_grpc_call_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "dmpay_grpc_call_seconds_sum{{method=\"{method}\"}} {}", h.sum_s);
                let _ = writeln!(out, "dmpay_grpc_call_seconds_count{{method=\"{method}\"}} {}", h.count);
            }
            for (name, n) in &reg.counters {
                let _ = writeln!(out, "# TYPE dmpay_{name}_total counter\ndmpay_{name}_total {n}");
            }
        }
        if let Ok(engine) = self.engine.lock() {
            if let Some(e) = engine.as_ref() {
                use std::sync::atomic::Ordering::Relaxed;
                out.push_str("# HELP dmpay_ledger_batches_total Posting-engine batch transactions.\n");
                out.push_str("# TYPE dmpay_ledger_batches_total counter\n");
                let _ = writeln!(out, "dmpay_ledger_batches_total {}", e.batches.load(Relaxed));
                out.push_str("# HELP dmpay_ledger_commands_total Ledger commands committed or refused in batches.\n");
                out.push_str("# TYPE dmpay_ledger_commands_total counter\n");
                let _ = writeln!(out, "dmpay_ledger_commands_total {}", e.commands.load(Relaxed));
                out.push_str("# HELP dmpay_ledger_batch_seconds_total Time spent in batch transactions.\n");
                out.push_str("# TYPE dmpay_ledger_batch_seconds_total counter\n");
                let _ = writeln!(out, "dmpay_ledger_batch_seconds_total {}", e.busy_us.load(Relaxed) as f64 / 1e6);
            }
        }
        if let Ok(db) = self.db.lock() {
            if let Some(db) = db.as_ref() {
                out.push_str("# HELP dmpay_db_connections_in_use Database connections checked out of the pool.\n");
                out.push_str("# TYPE dmpay_db_connections_in_use gauge\n");
                let _ = writeln!(out, "dmpay_db_connections_in_use {}", db.connections_in_use());
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. A deliberately tiny
/// HTTP/1.1 responder: one request per connection, bounded head, no keep-alive.
pub async fn serve_metrics(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
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
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
