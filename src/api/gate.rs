//! While the database is unreachable, calls answer UNAVAILABLE at once, and so do the
//! calls already waiting on it.
//!
//! The posting engine bounds its own transactions (`DMPAY_LEDGER_BATCH_TIMEOUT`), but a
//! read or a non-batched write that has sent its statement when the network to
//! PostgreSQL goes silent would wait for an answer that never comes: sqlx has no
//! client-side statement timeout, and TCP gives up only after many minutes. Its caller
//! would hang until `DMPAY_GRPC_CALL_TIMEOUT` and then hear CANCELLED. This layer races
//! each call against the health probe's verdict (`ledger::DatabaseState`): once it
//! declares the database unreachable (two missed pings in a row), every call still
//! waiting, and every new one until the next good ping, is answered UNAVAILABLE, "retry
//! with the same idempotency key". A single slow batch does not count: it refuses
//! ledger writes for a moment, but cuts nothing else. Dropping the call's future is what the call timeout does as well:
//! a transaction in flight is rolled back by the database, a command already handed to
//! the posting engine still commits or not, and the retry with its key finds out which.
//!
//! Health and reflection are never gated: they must answer during an outage. A
//! streaming call is gated until its response starts; after that the gate leaves it.
//! SQLite is never gated: a file in the process does not partition, and there a missed
//! ping means a busy pool, not a database that is away.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use crate::ledger::DatabaseState;

/// What a gated call hears.
const UNREACHABLE: &str = "the database is unreachable; retry with the same idempotency key";

#[derive(Clone)]
pub struct DatabaseGateLayer {
    /// `None`: calls pass through (SQLite).
    state: Option<Arc<DatabaseState>>,
}

impl DatabaseGateLayer {
    /// Gates calls on `state` when the database is PostgreSQL.
    pub fn new(db: &crate::store::Db, state: Arc<DatabaseState>) -> Self {
        DatabaseGateLayer { state: matches!(db, crate::store::Db::Postgres(_)).then_some(state) }
    }
}

impl<S> Layer<S> for DatabaseGateLayer {
    type Service = DatabaseGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DatabaseGate { inner, state: self.state.clone() }
    }
}

#[derive(Clone)]
pub struct DatabaseGate<S> {
    inner: S,
    state: Option<Arc<DatabaseState>>,
}

/// Paths that answer without the database.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

impl<S, B, RB> Service<Request<B>> for DatabaseGate<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let state = self.state.as_ref().filter(|_| !exempt(req.uri().path()));
        let mut changes = match state {
            Some(s) => s.subscribe_outage(),
            None => return Box::pin(self.inner.call(req)),
        };
        let future = self.inner.call(req);
        Box::pin(async move {
            tokio::select! {
                // The call first: one that is ready does not lose to the state.
                biased;
                answer = future => answer,
                () = unreachable(&mut changes) => Ok(Status::unavailable(UNREACHABLE).into_http()),
            }
        })
    }
}

/// Resolves once the database is (or already was) declared unreachable.
async fn unreachable(changes: &mut tokio::sync::watch::Receiver<bool>) {
    if changes.wait_for(|outage| *outage).await.is_err() {
        // The state is gone (the server is shutting down): never cut the call.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that waits on the database forever.
    #[derive(Clone)]
    struct Never;

    impl Service<Request<()>> for Never {
        type Response = Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::pending()
        }
    }

    #[test]
    fn health_and_reflection_are_never_gated() {
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!exempt("/dmpay.v1.Payments/SendPayment"));
        assert!(!exempt("/dmpay.v1.Ledger/GetLedgerBalance"));
    }

    #[tokio::test]
    async fn a_waiting_call_is_answered_when_the_database_is_declared_unreachable() {
        let state = Arc::new(DatabaseState::default());
        let mut gate = DatabaseGateLayer { state: Some(state.clone()) }.layer(Never);
        let call = tokio::spawn(gate.call(Request::builder().uri("/dmpay.v1.Payments/GetPayment").body(()).unwrap()));
        tokio::task::yield_now().await;
        assert!(!call.is_finished());
        state.set_outage(true);
        let answer = call.await.unwrap().unwrap();
        let status = Status::from_header_map(answer.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        // While it stays unreachable, new calls are answered at once.
        let again = gate.call(Request::builder().uri("/dmpay.v1.Ledger/GetEntry").body(()).unwrap()).await.unwrap();
        assert_eq!(Status::from_header_map(again.headers()).unwrap().code(), tonic::Code::Unavailable);
    }
}
