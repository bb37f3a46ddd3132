//! The domain error shared by every domain module. It says whose fault a failure is and
//! carries what the caller may see; `api::status` is the one place that turns it into a
//! gRPC status. Domain code never builds a `tonic::Status` itself.

use super::reason::Reason;
use std::fmt;

/// One invalid field, in the shape of `google.rpc.BadRequest.FieldViolation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something malformed; nothing was changed.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The thing does not exist, or the caller may not know that it exists.
    #[error("{0}")]
    NotFound(String),
    /// An idempotency key or a unique name is already taken by a different request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the state does not allow it (insufficient funds,
    /// frozen account). `reason` is the machine-readable `ErrorInfo.reason`.
    #[error("{message}")]
    FailedPrecondition { reason: Reason, message: String },
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// A limit was reached (queue full, rate or amount limit). `reason` as above.
    #[error("{message}")]
    ResourceExhausted { reason: Reason, message: String },
    /// A concurrent request got there first; retrying with the same key resolves it.
    #[error("conflicting concurrent request; retry with the same idempotency key")]
    Aborted,
    /// A dependency (the database) is out of reach; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure. The chain is logged server-side once; the caller
    /// sees only a generic message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation { field: field.into(), description: description.into() }])
    }

    pub fn not_found(what: impl fmt::Display) -> Self {
        Error::NotFound(format!("{what} not found"))
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Error::Internal(err.into())
    }

    /// A copy for a second caller waiting on the same outcome (a duplicate request in
    /// one batch). The internal cause is carried as text.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument(v) => Error::InvalidArgument(v.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
            Error::FailedPrecondition { reason, message } => {
                Error::FailedPrecondition { reason: *reason, message: message.clone() }
            }
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::ResourceExhausted { reason, message } => {
                Error::ResourceExhausted { reason: *reason, message: message.clone() }
            }
            Error::Aborted => Error::Aborted,
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(e) => Error::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    /// Prefixes every field path, for validators reused inside a larger message
    /// (`postings[3].amount`).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument(vs) => Error::InvalidArgument(
                vs.into_iter()
                    .map(|v| FieldViolation {
                        field: if v.field.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", v.field) },
                        description: v.description,
                    })
                    .collect(),
            ),
            other => other,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        classify(err)
    }
}

/// Turns a driver error into a domain error: outages and lock contention the caller may
/// retry become UNAVAILABLE; everything else is INTERNAL (and is logged by the api layer).
pub fn classify(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            Error::Unavailable("database unavailable, retry later".into())
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: 40001 serialization failure, 40P01 deadlock, 08* connection,
            // 57P0* shutdown, 53* insufficient resources. SQLite: 5 BUSY, 6 LOCKED.
            let retryable = matches!(code.as_ref(), "40001" | "40P01" | "5" | "6" | "517" | "261")
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53");
            if retryable {
                Error::Unavailable("database busy or unavailable, retry later".into())
            } else {
                Error::Internal(err.into())
            }
        }
        _ => Error::Internal(err.into()),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
