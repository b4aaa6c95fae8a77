//! The Connect protocol's unary form, as used by the long-poll rung and by
//! `ctl`: POST `/<package>.<Service>/<Method>` with an `application/proto`
//! or `application/json` body; success is HTTP 200 with a body of the same
//! type; an error is a non-200 status with a JSON body
//! `{"code": "...", "message": "..."}`.
//!
//! Codes are tonic's [`tonic::Code`]; this module maps them to and from
//! Connect's names and HTTP statuses.

use http::StatusCode;
use tonic::Code;

/// Content type of binary protobuf bodies.
pub const PROTO: &str = "application/proto";
/// Content type of proto3-JSON bodies.
pub const JSON: &str = "application/json";

/// The body encodings a Connect unary call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `application/proto`.
    Proto,
    /// `application/json`.
    Json,
}

impl Encoding {
    /// The encoding named by a `content-type` header value (parameters such
    /// as `; charset=utf-8` are ignored).
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(PROTO) {
            Some(Encoding::Proto)
        } else if essence.eq_ignore_ascii_case(JSON) {
            Some(Encoding::Json)
        } else {
            None
        }
    }

    /// The `content-type` header value.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Proto => PROTO,
            Encoding::Json => JSON,
        }
    }
}

/// Connect's name for a code.
pub fn code_name(code: Code) -> &'static str {
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

/// The code Connect names `name`.
pub fn code_from_name(name: &str) -> Option<Code> {
    let all = [
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];
    all.into_iter().find(|c| code_name(*c) == name)
}

/// The HTTP status Connect uses for a code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The code a client infers from an HTTP status when the body carries no
/// Connect error (e.g. a proxy answered).
pub fn code_from_http(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// The JSON body of a Connect error.
pub fn error_body(code: Code, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "code": code_name(code), "message": message }))
        .unwrap_or_default()
}

/// Reads a Connect error body; falls back to the HTTP status.
pub fn parse_error(status: StatusCode, body: &[u8]) -> tonic::Status {
    #[derive(serde::Deserialize)]
    struct Wire {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Wire>(body) {
        Ok(w) => {
            let code = code_from_name(&w.code).unwrap_or_else(|| code_from_http(status));
            tonic::Status::new(code, w.message)
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string();
            tonic::Status::new(
                code_from_http(status),
                format!("HTTP {status} without a Connect error body: {text:?}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name() {
        for n in 1..=16 {
            let c = Code::from_i32(n);
            assert_eq!(code_from_name(code_name(c)), Some(c));
        }
    }

    #[test]
    fn content_types_with_parameters_are_recognised() {
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(
            Encoding::from_content_type("application/proto"),
            Some(Encoding::Proto)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
    }

    #[test]
    fn errors_parse_or_fall_back_to_status() {
        let s = parse_error(
            StatusCode::UNAUTHORIZED,
            &error_body(Code::Unauthenticated, "bad"),
        );
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "bad"));
        let s = parse_error(StatusCode::BAD_GATEWAY, b"<html>proxy</html>");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("502"));
    }
}
