//! The one mapping from domain errors to gRPC statuses. Every variant is listed (no `_`
//! arm), so adding one forces a decision here.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// `ErrorInfo.domain` of every dmpay error.
pub const ERROR_DOMAIN: &str = "dmpay.v1";

pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument(violations) => {
            let message = Error::InvalidArgument(violations.clone()).to_string();
            let details = ErrorDetails::with_bad_request(
                violations
                    .into_iter()
                    .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Error::NotFound(message) => Status::not_found(message),
        Error::AlreadyExists(message) => Status::already_exists(message),
        Error::FailedPrecondition { reason, message } => Status::with_error_details(
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
        ),
        Error::PermissionDenied(message) => Status::permission_denied(message),
        Error::Unauthenticated(message) => Status::unauthenticated(message),
        Error::ResourceExhausted { reason, message } => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
        ),
        Error::Aborted => Status::aborted(Error::Aborted.to_string()),
        Error::Unavailable(message) => Status::unavailable(message),
        Error::Internal(cause) => {
            // The whole chain is logged once, here; the caller learns nothing internal.
            tracing::error!(error = format!("{cause:#}"), "internal error");
            Status::internal("internal error")
        }
    }
}

/// Lets handlers write `domain_call().await.map_err(to_status)?` as `...?` via `ApiResult`.
pub type ApiResult<T> = Result<tonic::Response<T>, Status>;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn failed_precondition_has_error_info_reason() {
        let status =
            to_status(Error::FailedPrecondition { reason: "INSUFFICIENT_FUNDS", message: "insufficient funds".into() });
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "INSUFFICIENT_FUNDS");
    }
}
