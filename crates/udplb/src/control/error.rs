//! [`Error`]: what a request to the control plane can come to when it is not done, and the one
//! place where each outcome becomes an HTTP status and a `{"error": ...}` body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request to the control plane (the admin API, a change for the publisher, a reload) is
/// not done. Each variant has one HTTP status ([`Error::status`]); the message is the body's
/// `error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value in the request that does not parse: an address that is not `ip:port`, an
    /// unknown admin state, a log filter. `400`.
    #[error("{0}")]
    Invalid(String),
    /// A change without the admin token, or with another one. `401`, with
    /// `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// A change on an endpoint that does not allow changes. `403`.
    #[error("{0}")]
    Forbidden(String),
    /// No such path, or no such listener to explain. `404`.
    #[error("{0}")]
    NotFound(String),
    /// A method the path does not take. `405` (the router adds the `Allow` header).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A request not complete and answered in time. `408`.
    #[error("{0}")]
    RequestTimeout(String),
    /// A change the running configuration cannot take: it names a pool or backend that is
    /// not there, adds one that is, or leaves a configuration that does not validate. `409`.
    #[error("{0}")]
    Conflict(String),
    /// The configuration file could not be reloaded; the running configuration stays. `422`.
    #[error("{0}")]
    ReloadFailed(String),
    /// The request could not be read as its handler takes it (its body, path or query), with
    /// the status the extractor chose: `400`, `413`, `415` or `422`.
    #[error("{message}")]
    Unreadable {
        /// The extractor's status.
        status: StatusCode,
        /// The extractor's reason.
        message: String,
    },
    /// udplb is stopping: the publisher takes no more changes. `503`.
    #[error("udplb is stopping")]
    Stopping,
    /// The change was handed to the publisher but not applied in time. `503`.
    #[error("the change was not applied in time")]
    Timeout,
}

impl Error {
    /// The HTTP status of this outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::ReloadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unreadable { status, .. } => *status,
            Error::Stopping | Error::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each outcome answers its status with `{"error": message}`; 401 says how to
    /// authenticate.
    #[tokio::test]
    async fn each_outcome_has_its_status_and_a_json_error() {
        let why = || "why".to_string();
        let cases = [
            (Error::Invalid(why()), 400),
            (Error::Unauthorized(why()), 401),
            (Error::Forbidden(why()), 403),
            (Error::NotFound(why()), 404),
            (Error::MethodNotAllowed(why()), 405),
            (Error::RequestTimeout(why()), 408),
            (Error::Conflict(why()), 409),
            (Error::ReloadFailed(why()), 422),
            (
                Error::Unreadable {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: why(),
                },
                413,
            ),
            (Error::Stopping, 503),
            (Error::Timeout, 503),
        ];
        for (error, status) in cases {
            let message = error.to_string();
            let response = error.clone().into_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(
                response.headers().contains_key(header::WWW_AUTHENTICATE),
                status == 401,
                "{error:?}"
            );
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body, json!({ "error": message }), "{error:?}");
            assert!(!message.is_empty(), "{error:?}");
        }
    }
}
