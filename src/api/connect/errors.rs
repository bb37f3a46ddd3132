//! Connect's errors: the code names, the HTTP status of a unary error, and the error
//! object with its `google.rpc` details, sent (base64) and decoded (`debug`).

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use prost::Message as _;
use prost_reflect::DynamicMessage;
use tonic::body::Body;
use tonic::{Code, Status};

use super::to_json;

/// Connect's name of a gRPC code.
pub(super) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a unary error, as the Connect protocol maps codes.
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Connect's error object: code, message and each `google.rpc` detail, both as Connect
/// sends it (type and base64 value) and decoded (`debug`) for people reading JSON.
pub(super) fn error_json(status: &Status) -> serde_json::Value {
    let mut out = serde_json::json!({ "code": code_name(status.code()), "message": status.message() });
    let details = tonic_types::pb::Status::decode(status.details()).map(|s| s.details).unwrap_or_default();
    if !details.is_empty() {
        let pool = crate::api::descriptors::pool();
        let items: Vec<serde_json::Value> = details
            .iter()
            .map(|any| {
                let type_name = any.type_url.rsplit('/').next().unwrap_or(&any.type_url).to_owned();
                let mut item = serde_json::json!({
                    "type": type_name,
                    "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                });
                let debug = pool
                    .get_message_by_name(&type_name)
                    .and_then(|d| DynamicMessage::decode(d, any.value.as_slice()).ok())
                    .and_then(|m| to_json(&m).ok())
                    .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok());
                if let Some(debug) = debug {
                    item["debug"] = debug;
                }
                item
            })
            .collect();
        out["details"] = serde_json::Value::Array(items);
    }
    out
}

/// A unary error: its HTTP status and Connect's error object.
pub(super) fn error_response(status: &Status) -> Response<Body> {
    let body = error_json(status).to_string();
    let mut resp = Response::new(Body::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = http_status(status.code());
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_as_connect_says() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::Unimplemented), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(code_name(Code::Cancelled), "canceled");
        let j = error_json(&Status::invalid_argument("amount: must be positive"));
        assert_eq!(j, serde_json::json!({"code": "invalid_argument", "message": "amount: must be positive"}));
    }
}
