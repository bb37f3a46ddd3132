//! One log line and one metrics sample per gRPC call: method, caller, status code,
//! latency and request id. The request id comes from `x-request-id` (or is generated)
//! and is echoed in the response metadata.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::Metrics;

/// Longest request id taken from a client; longer or non-printable ones are replaced.
const REQUEST_ID_LEN_MAX: usize = 128;

/// Filled in by the auth interceptor with the verified `sub`, so the log line can name
/// the caller. It travels in the request extensions.
#[derive(Clone, Default)]
pub struct CallSlot {
    pub sub: Arc<OnceLock<String>>,
}

#[derive(Clone)]
pub struct CallLogLayer {
    metrics: Metrics,
}

impl CallLogLayer {
    pub fn new(metrics: Metrics) -> Self {
        CallLogLayer { metrics }
    }
}

impl<S> Layer<S> for CallLogLayer {
    type Service = CallLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallLog { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct CallLog<S> {
    inner: S,
    metrics: Metrics,
}

fn request_id(req: &Request<impl Sized>) -> HeaderValue {
    req.headers()
        .get("x-request-id")
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= REQUEST_ID_LEN_MAX && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static("unknown"))
        })
}

/// The `grpc-status` of a trailers-only response (every error from a unary handler);
/// a response that starts a body reports OK here and its final status in trailers.
fn grpc_code(resp: &Response<impl Sized>) -> i32 {
    resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<i32>().ok()).unwrap_or(0)
}

impl<S, B, RB> Service<Request<B>> for CallLog<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        // The label, never the raw path: a caller must not be able to add series (or
        // log fields of its choosing) by calling made-up paths.
        let method = self.metrics.method_index(req.uri().path());
        let rid = request_id(&req);
        let slot = CallSlot::default();
        req.extensions_mut().insert(slot.clone());
        req.headers_mut().insert("x-request-id", rid.clone());
        // Take the service that was driven to readiness and leave a fresh clone behind,
        // as tower requires.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = inner.call(req).await;
            let elapsed = started.elapsed();
            let sub = slot.sub.get().map(String::as_str).unwrap_or("-");
            let rid_str = rid.to_str().unwrap_or("-");
            let method_name = metrics.method_name(method);
            match result {
                Ok(mut resp) => {
                    let code_index = super::metrics::code_index(grpc_code(&resp));
                    let code = super::metrics::code_label(code_index);
                    resp.headers_mut().insert("x-request-id", rid.clone());
                    metrics.record_call(method, code_index, elapsed);
                    tracing::info!(
                        method = %method_name,
                        sub = %sub,
                        code,
                        latency_us = elapsed.as_micros() as u64,
                        request_id = %rid_str,
                        "grpc call"
                    );
                    Ok(resp)
                }
                Err(e) => {
                    metrics.record_call(method, super::metrics::TRANSPORT_ERROR, elapsed);
                    tracing::warn!(method = %method_name, sub = %sub, request_id = %rid_str, "grpc call failed in transport");
                    Err(e)
                }
            }
        })
    }
}
