//! The statuses tonic answers by itself, before any handler runs, when it cannot read a
//! request: INTERNAL for a message that does not decode (garbage, bad UTF-8, truncated
//! frames, a compressed flag without an encoding, no message at all) and OUT_OF_RANGE
//! for one over DMPAY_GRPC_MESSAGE_SIZE_MAX. Both are the caller's doing, and INTERNAL
//! would page us for every fuzzing client, so this layer rewrites them to
//! INVALID_ARGUMENT and RESOURCE_EXHAUSTED (gRPC's status-code guide: a message larger
//! than the configured limit is RESOURCE_EXHAUSTED). Only trailers-only answers carrying
//! tonic's own messages are touched: a handler's INTERNAL always reads "internal error"
//! (`status::to_status`), so no real internal failure is hidden.

use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::{Code, Status};
use tower::{Layer, Service};

/// Start of the messages of tonic's request-decoding failures (tonic 0.14,
/// `codec::decode`, `server::grpc` and tonic-prost's decode error).
const DECODE_FAILURES: &[&str] = &[
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// Start of tonic's message for a request over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// The code a status tonic produced for an unreadable request should have; `None`
/// leaves the status alone.
pub fn caller_fault(code: Code, message: &str) -> Option<Code> {
    match code {
        Code::Internal if DECODE_FAILURES.iter().any(|p| message.starts_with(p)) => Some(Code::InvalidArgument),
        Code::OutOfRange if message.starts_with(TOO_LARGE) => Some(Code::ResourceExhausted),
        _ => None,
    }
}

#[derive(Clone, Copy, Default)]
pub struct UnreadableRequestLayer;

impl<S> Layer<S> for UnreadableRequestLayer {
    type Service = UnreadableRequest<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UnreadableRequest { inner }
    }
}

#[derive(Clone)]
pub struct UnreadableRequest<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for UnreadableRequest<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut resp = future.await?;
            // Trailers-only answers carry the status in the headers.
            if let Some(status) = Status::from_header_map(resp.headers()) {
                if let Some(code) = caller_fault(status.code(), status.message()) {
                    let headers = resp.headers_mut();
                    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        headers.remove(name);
                    }
                    let _ = Status::new(code, status.message()).add_header(headers);
                }
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_decoding_failures_are_rewritten() {
        let garbage = "failed to decode Protobuf message: invalid wire type value: 7";
        assert_eq!(caller_fault(Code::Internal, garbage), Some(Code::InvalidArgument));
        assert_eq!(caller_fault(Code::Internal, "Missing request message."), Some(Code::InvalidArgument));
        assert_eq!(caller_fault(Code::Internal, "Unexpected EOF decoding stream."), Some(Code::InvalidArgument));
        let flag = "protocol error: received message with compressed-flag but no grpc-encoding was specified";
        assert_eq!(caller_fault(Code::Internal, flag), Some(Code::InvalidArgument));
        let big = "Error, decoded message length too large: found 2000000 bytes, the limit is: 1048576 bytes";
        assert_eq!(caller_fault(Code::OutOfRange, big), Some(Code::ResourceExhausted));
        // A handler's own failures stay what they are.
        assert_eq!(caller_fault(Code::Internal, "internal error"), None);
        assert_eq!(caller_fault(Code::OutOfRange, "page_token out of range"), None);
        assert_eq!(caller_fault(Code::InvalidArgument, garbage), None);
    }
}
