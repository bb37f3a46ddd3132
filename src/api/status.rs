//! The one mapping from domain errors to gRPC statuses. Every variant is listed (no `_`
//! arm), so adding one forces a decision here.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::kernel::error::Error;

/// `ErrorInfo.domain` of every dmpay error.
pub const ERROR_DOMAIN: &str = "dmpay.v1";

/// Longest status message (and field-violation description) sent, in characters.
/// Messages quote what the caller sent ("payment <id> not found"); without a cap a
/// hostile id of a megabyte comes back as a `grpc-message` header larger than HTTP/2
/// clients accept, which breaks the caller's whole connection.
pub const MESSAGE_CHARS_MAX: usize = 256;

/// `text` cut to `MESSAGE_CHARS_MAX` characters, marked with an ellipsis when cut.
pub fn bounded(text: String) -> String {
    match text.char_indices().nth(MESSAGE_CHARS_MAX) {
        None => text,
        Some((cut, _)) => {
            let mut out = text[..cut].to_owned();
            out.push('…');
            out
        }
    }
}

pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument(violations) => {
            let message = bounded(Error::InvalidArgument(violations.clone()).to_string());
            let details = ErrorDetails::with_bad_request(
                violations
                    .into_iter()
                    .map(|v| tonic_types::FieldViolation::new(bounded(v.field), bounded(v.description)))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Error::NotFound(message) => Status::not_found(bounded(message)),
        Error::AlreadyExists(message) => Status::already_exists(bounded(message)),
        Error::FailedPrecondition { reason, message } => Status::with_error_details(
            Code::FailedPrecondition,
            bounded(message),
            ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new()),
        ),
        Error::PermissionDenied(message) => Status::permission_denied(bounded(message)),
        Error::Unauthenticated(message) => Status::unauthenticated(bounded(message)),
        Error::ResourceExhausted { reason, message } => Status::with_error_details(
            Code::ResourceExhausted,
            bounded(message),
            ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new()),
        ),
        Error::Aborted => Status::aborted(Error::Aborted.to_string()),
        Error::Unavailable(message) => Status::unavailable(bounded(message)),
        Error::Internal(cause) if nul_in_text(&cause) => {
            to_status(Error::invalid("request", "text may not contain NUL (U+0000) characters"))
        }
        Error::Internal(cause) => {
            // The whole chain is logged once, here; the caller learns nothing internal.
            tracing::error!(error = format!("{cause:#}"), "internal error");
            Status::internal("internal error")
        }
    }
}

/// Whether the failure is PostgreSQL refusing a NUL character in a text parameter
/// (SQLSTATE 22021). Only the caller can put one there, in an id it looks something up
/// by (texts that are stored are checked for control characters before any SQL), so it
/// is the caller's INVALID_ARGUMENT, not an internal error.
fn nul_in_text(cause: &anyhow::Error) -> bool {
    cause
        .chain()
        .any(|e| e.downcast_ref::<sqlx::Error>().and_then(crate::store::db_code).is_some_and(|code| code == "22021"))
}

/// Lets handlers write `domain_call().await.map_err(to_status)?` as `...?` via `ApiResult`.
pub type ApiResult<T> = Result<tonic::Response<T>, Status>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::reason::Reason;

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = to_status(Error::invalid("amount.amount", "too many decimals for USD"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("amount.amount"));
        let details = status.get_error_details();
        let bad = details.bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "amount.amount");
    }

    #[test]
    fn internal_hides_the_cause() {
        let status = to_status(Error::internal(anyhow::anyhow!("relation \"secret_table\" does not exist")));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret_table"));
    }

    #[test]
    fn messages_quoting_the_caller_are_bounded() {
        let id = "\u{10000}".repeat(100_000);
        let status = to_status(Error::not_found(format!("payment {id}")));
        assert_eq!(status.message().chars().count(), MESSAGE_CHARS_MAX + 1);
        assert!(status.message().starts_with("payment \u{10000}") && status.message().ends_with('…'));
        let status = to_status(Error::invalid("payment_id", format!("unknown {id}")));
        assert!(status.message().chars().count() <= MESSAGE_CHARS_MAX + 1);
        let details = status.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert!(violation.description.chars().count() <= MESSAGE_CHARS_MAX + 1);
        // Short messages are untouched.
        assert_eq!(to_status(Error::not_found("payment pay_1")).message(), "payment pay_1 not found");
    }

    #[test]
    fn failed_precondition_has_error_info_reason() {
        let status = to_status(Error::FailedPrecondition {
            reason: Reason::InsufficientFunds,
            message: "insufficient funds".into(),
        });
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "INSUFFICIENT_FUNDS");
    }
}
