//! The Connect protocol (<https://connectrpc.com/docs/protocol>) on the gRPC port, so a
//! browser or `curl` calls dmpay with a plain HTTP POST:
//!
//! ```sh
//! curl -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
//!   -d '{"recipient_id":"bob","amount":{"currency":"USD","amount":"12.50"}}' \
//!   http://127.0.0.1:50051/dmpay.v1.Payments/SendPayment
//! ```
//!
//! A unary call (`application/json` or `application/proto`) and a server stream
//! (`application/connect+json` or `application/connect+proto`) become the gRPC call they
//! mean, served by the same services behind the same layers (authentication, rate
//! limits, call logs, metrics), and the answer is turned back: the message (as JSON in
//! the proto3 mapping, with the fields' proto names), or Connect's error object whose
//! `details` carry the `google.rpc` error details, both encoded and decoded (`debug`).
//! Everything else passes through untouched (gRPC, and gRPC-Web after `tonic_web`).
//!
//! In development mode the same layer serves the demo page and its tokens (`demo`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use prost_reflect::MethodDescriptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

mod codec;
mod errors;
pub(crate) use codec::to_json;
use codec::{end_of_stream, envelope, from_proto, next_frame, to_proto, Codec};
use errors::error_response;

/// Bytes of request bodies this layer may hold at once, read before the services (and
/// so before authentication) see the call: a bound on what unauthenticated callers can
/// make the server buffer, whatever the number of connections.
const BODY_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// Stream messages converted ahead of a slow client: the channel between the task that
/// reads the gRPC stream and the response the client reads.
const STREAM_BUFFER_MAX: usize = 16;

/// The Connect layer: `size_max` bounds a request's body (as `DMPAY_GRPC_MESSAGE_SIZE_MAX`
/// bounds a gRPC message); `demo` (development mode only) serves the demo page and its
/// tokens, signed with these settings.
#[derive(Clone)]
pub struct ConnectLayer {
    size_max: usize,
    demo: Option<std::sync::Arc<crate::auth::JwtSettings>>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
}

impl ConnectLayer {
    pub fn new(size_max: usize, demo: Option<crate::auth::JwtSettings>) -> Self {
        ConnectLayer {
            size_max,
            demo: demo.filter(|j| j.development).map(std::sync::Arc::new),
            // Room for a few of the largest bodies (a gRPC-Web one may be twice the
            // message bound) whatever `size_max` is set to.
            budget: std::sync::Arc::new(tokio::sync::Semaphore::new(
                BODY_BUDGET_BYTES.max(size_max.saturating_mul(8)) / 1024,
            )),
        }
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = Connect<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Connect { inner, settings: self.clone() }
    }
}

#[derive(Clone)]
pub struct Connect<S> {
    inner: S,
    settings: ConnectLayer,
}

/// What a request this layer serves is, from its method, path and content type (every
/// other request passes through).
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Unary(Codec),
    Stream(Codec),
    Demo,
    DemoToken,
    /// A gRPC-Web call over HTTP/1.1, whose body is read whole before it is served.
    WebBuffered,
}

fn kind_of<B>(req: &Request<B>, demo: bool) -> Option<Kind> {
    if req.method() == Method::GET && demo {
        match req.uri().path() {
            "/demo" | "/demo/" => return Some(Kind::Demo),
            "/demo/token" => return Some(Kind::DemoToken),
            _ => {}
        }
    }
    if req.method() != Method::POST {
        return None;
    }
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    // Parameters (`; charset=utf-8`) do not change the codec.
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    Some(match essence.as_str() {
        "application/json" => Kind::Unary(Codec::Json),
        "application/proto" => Kind::Unary(Codec::Proto),
        "application/connect+json" => Kind::Stream(Codec::Json),
        "application/connect+proto" => Kind::Stream(Codec::Proto),
        // Over HTTP/1.1 a call refused from its headers alone (a bad token) is answered
        // before the client has sent its body; the connection then closes under the
        // client's next write, which reports a broken pipe instead of the refusal.
        // Reading the body first (gRPC-Web requests are one small message) avoids it.
        t if t.starts_with("application/grpc-web") && req.version() < http::Version::HTTP_2 => Kind::WebBuffered,
        _ => return None,
    })
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for Connect<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(kind) = kind_of(&req, self.settings.demo.is_some()) else {
            return Box::pin(self.inner.call(req));
        };
        // The clone is ready only if polled; the one polled ready goes with this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        Box::pin(async move {
            let (size_max, budget) = (settings.size_max, &settings.budget);
            match kind {
                Kind::Demo => Ok(respond("text/html; charset=utf-8", super::demo::page(), true)),
                Kind::DemoToken => Ok(match super::demo::token(settings.demo.as_deref(), req.uri().query()) {
                    Ok(json) => respond("application/json", Bytes::from(json), true),
                    Err(s) => error_response(&s),
                }),
                Kind::WebBuffered => web_buffered(inner, req, size_max, budget).await,
                Kind::Unary(codec) => unary(inner, req, codec, size_max, budget).await,
                Kind::Stream(codec) => stream(inner, req, codec, size_max, budget).await,
            }
        })
    }
}

/// A 200 answer with `body`; `no_store` keeps browsers from caching it (the demo's page
/// and tokens).
fn respond(content_type: &'static str, body: Bytes, no_store: bool) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(body)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if no_store {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// A gRPC-Web call with its body read first (see `Kind::WebBuffered`). The text variant
/// is base64, a third larger than the message it carries; twice the message bound
/// leaves room for that and the frames.
async fn web_buffered<S>(
    mut inner: S,
    req: Request<Body>,
    size_max: usize,
    budget: &tokio::sync::Semaphore,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    let (parts, body) = req.into_parts();
    match read_body(body, size_max.saturating_mul(2), budget).await {
        Ok(bytes) => inner.call(Request::from_parts(parts, Body::new(Full::new(bytes)))).await,
        Err(s) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = match s.code() {
                Code::ResourceExhausted if s.message().starts_with("too many") => StatusCode::SERVICE_UNAVAILABLE,
                Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            Ok(resp)
        }
    }
}

/// The method a path names (`/dmpay.v1.Payments/SendPayment`), or the status to answer.
fn method_of(path: &str) -> Result<MethodDescriptor, Status> {
    let unknown = || Status::unimplemented(format!("no method {path}"));
    let (service, method) = path.trim_start_matches('/').rsplit_once('/').ok_or_else(unknown)?;
    let service = super::descriptors::pool().get_service_by_name(service).ok_or_else(unknown)?;
    let found = service.methods().find(|m| m.name() == method).ok_or_else(unknown)?;
    Ok(found)
}

/// A request's body, up to `size_max` bytes. While it is read, its size (as announced,
/// else `size_max`) is taken from the layer's budget; when the budget is spent the call
/// is refused at once.
async fn read_body(body: Body, size_max: usize, budget: &tokio::sync::Semaphore) -> Result<Bytes, Status> {
    use http_body::Body as _;
    let expected = body.size_hint().upper().map_or(size_max, |n| usize::try_from(n).unwrap_or(size_max)).min(size_max);
    let kib = u32::try_from(expected / 1024 + 1).unwrap_or(u32::MAX);
    let _held = budget
        .try_acquire_many(kib)
        .map_err(|_| Status::resource_exhausted("too many request bodies in flight on this server; retry shortly"))?;
    let limited = http_body_util::Limited::new(body, size_max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Status::resource_exhausted(format!("the request body is over {size_max} bytes")))
        }
        Err(e) => Err(Status::invalid_argument(format!("the request body could not be read: {e}"))),
    }
}

/// The client's `connect-timeout-ms`, at most about a day.
fn timeout_of(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| ms.min(99_999_999))
}

/// The gRPC request a Connect call means: the caller's headers (its token), extensions
/// (its address, for the rate limits) and the message framed.
fn grpc_request(parts: http::request::Parts, message: Bytes) -> Request<Body> {
    let timeout_ms =
        parts.headers.get("connect-timeout-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut req = Request::new(Body::new(Full::new(envelope(0, &message))));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = parts.uri;
    *req.version_mut() = http::Version::HTTP_2;
    *req.extensions_mut() = parts.extensions;
    let headers = req.headers_mut();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if n == "content-type" || n == "content-length" || n == "transfer-encoding" || n.starts_with("connect-") {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(ms) = timeout_ms {
        if let Ok(v) = HeaderValue::from_str(&format!("{}m", ms.min(99_999_999))) {
            headers.insert("grpc-timeout", v);
        }
    }
    req
}

/// The gRPC status of an answer: in its headers (a trailers-only answer) or trailers.
fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Status> {
    Status::from_header_map(headers).or_else(|| trailers.and_then(Status::from_header_map))
}

/// A unary call: the request's one message in, the answer's message (or Connect's error
/// object, with the HTTP status its code maps to) out.
async fn unary<S>(
    mut inner: S,
    req: Request<Body>,
    codec: Codec,
    size_max: usize,
    budget: &tokio::sync::Semaphore,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    let method = match method_of(req.uri().path()) {
        Ok(m) if m.is_client_streaming() || m.is_server_streaming() => {
            return Ok(error_response(&Status::unimplemented(format!(
                "{} is a stream: call it with gRPC, gRPC-Web or Connect's streaming content types \
                 (application/connect+json)",
                m.name()
            ))))
        }
        Ok(m) => m,
        Err(s) => return Ok(error_response(&s)),
    };
    let (parts, body) = req.into_parts();
    let message = match read_body(body, size_max, budget).await.and_then(|b| to_proto(&method.input(), codec, &b)) {
        Ok(m) => m,
        Err(s) => return Ok(error_response(&s)),
    };
    // The client's deadline (`connect-timeout-ms`), answered as Connect's
    // deadline_exceeded; the server's own call timeout applies besides.
    let deadline = timeout_of(&parts.headers).map(Duration::from_millis);
    let call = async {
        let answer = inner.call(grpc_request(parts, message)).await?;
        let (head, body) = answer.into_parts();
        Ok::<_, S::Error>((head, body.collect().await))
    };
    let (head, collected) = match deadline {
        Some(d) => match tokio::time::timeout(d, call).await {
            Ok(answer) => answer?,
            Err(_) => return Ok(error_response(&Status::deadline_exceeded("the call's connect-timeout-ms passed"))),
        },
        None => call.await?,
    };
    let collected = match collected {
        Ok(c) => c,
        Err(s) => return Ok(error_response(&s)),
    };
    let trailers = collected.trailers().cloned();
    let mut data = BytesMut::from(collected.to_bytes().as_ref());
    match status_of(&head.headers, trailers.as_ref()) {
        Some(s) if s.code() != Code::Ok => return Ok(error_response(&s)),
        _ => {}
    }
    let Some(message) = next_frame(&mut data) else {
        return Ok(error_response(&Status::internal("the answer had no message")));
    };
    let content_type = match codec {
        Codec::Json => "application/json",
        Codec::Proto => "application/proto",
    };
    Ok(match from_proto(&method.output(), codec, message) {
        Ok(body) => respond(content_type, body, false),
        Err(s) => error_response(&s),
    })
}

/// A server stream: the request's one envelope in, each answer as an envelope out, and
/// Connect's end-of-stream envelope (with the error, if any) last.
async fn stream<S>(
    mut inner: S,
    req: Request<Body>,
    codec: Codec,
    size_max: usize,
    budget: &tokio::sync::Semaphore,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    let content_type = match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    };
    let method = match method_of(req.uri().path()) {
        Ok(m) if m.is_client_streaming() => {
            return Ok(error_response(&Status::unimplemented(format!("{} is a client stream", m.name()))))
        }
        Ok(m) => m,
        Err(s) => return Ok(error_response(&s)),
    };
    let (parts, body) = req.into_parts();
    let message = read_body(body, size_max, budget).await.and_then(|b| {
        let mut b = BytesMut::from(b.as_ref());
        match (b.first().copied(), next_frame(&mut b)) {
            (Some(0), Some(m)) if b.is_empty() => to_proto(&method.input(), codec, &m),
            (Some(flags), Some(_)) if flags != 0 => {
                Err(Status::unimplemented("compressed or flagged request envelopes are not supported"))
            }
            _ => Err(Status::invalid_argument("the request must be exactly one envelope")),
        }
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BUFFER_MAX);
    let mut resp =
        Response::new(Body::new(StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))))));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let message = match message {
        Ok(m) => m,
        Err(s) => {
            let _ = tx.try_send(end_of_stream(Some(&s)));
            return Ok(resp);
        }
    };
    let answer = inner.call(grpc_request(parts, message)).await?;
    let output = method.output();
    tokio::spawn(async move {
        let (head, mut body) = answer.into_parts();
        let mut buf = BytesMut::new();
        let mut status = Status::from_header_map(&head.headers);
        while status.is_none() {
            // A client that went away ends the call, also while no answer comes (a quiet
            // watch): dropping `body` ends the stream behind it and frees its place.
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = tx.closed() => return,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buf.extend_from_slice(&data);
                        while let Some(m) = next_frame(&mut buf) {
                            let out = match from_proto(&output, codec, m) {
                                Ok(out) => out,
                                Err(s) => {
                                    status = Some(s);
                                    break;
                                }
                            };
                            // A client that went away ends the call (dropping `body`).
                            if tx.send(envelope(0, &out)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(frame) => {
                        status = Some(
                            frame.trailers_ref().and_then(Status::from_header_map).unwrap_or_else(|| Status::ok("")),
                        )
                    }
                },
                Some(Err(s)) => status = Some(s),
                None => status = Some(Status::ok("")),
            }
        }
        let status = status.filter(|s| s.code() != Code::Ok);
        let _ = tx.send(end_of_stream(status.as_ref())).await;
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, content_type: &str) -> Request<()> {
        let mut r = Request::new(());
        *r.method_mut() = method;
        *r.uri_mut() = path.parse().expect("uri");
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).expect("value"));
        r
    }

    #[test]
    fn content_types_choose_the_protocol() {
        let p = "/dmpay.v1.Payments/SendPayment";
        assert_eq!(
            kind_of(&req(Method::POST, p, "application/json; charset=utf-8"), false),
            Some(Kind::Unary(Codec::Json))
        );
        assert_eq!(kind_of(&req(Method::POST, p, "application/proto"), false), Some(Kind::Unary(Codec::Proto)));
        assert_eq!(kind_of(&req(Method::POST, p, "application/connect+json"), false), Some(Kind::Stream(Codec::Json)));
        assert_eq!(kind_of(&req(Method::POST, p, "application/grpc"), false), None);
        let mut web = req(Method::POST, p, "application/grpc-web+proto");
        *web.version_mut() = http::Version::HTTP_2;
        assert_eq!(kind_of(&web, false), None);
        *web.version_mut() = http::Version::HTTP_11;
        assert_eq!(kind_of(&web, false), Some(Kind::WebBuffered));
        assert_eq!(kind_of(&req(Method::GET, "/demo", ""), true), Some(Kind::Demo));
        assert_eq!(kind_of(&req(Method::GET, "/demo/token?user=a", ""), true), Some(Kind::DemoToken));
        assert_eq!(kind_of(&req(Method::GET, "/demo", ""), false), None, "no demo outside development");
    }
}
