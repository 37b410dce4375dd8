//! Every way a request can fail, as one type that turns into a status code and a JSON body
//! `{"status": 415, "error": "unsupported_media_type", "message": "..."}`. Client errors are 4xx, never 500; 503 and
//! 504 carry `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_S: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the request body is empty; send a JPEG or PNG image")]
    EmptyBody,
    #[error("cannot decode the image: {detail}")]
    BadImage { detail: String },
    #[error("Content-Type {got} is not supported; send one of {}", supported.join(", "))]
    UnsupportedMediaType {
        got: String,
        /// The request types the server takes ([`super::media::REQUEST_TYPES`]).
        supported: &'static [&'static str],
    },
    #[error("cannot answer with any type in Accept: {got}; accept one of {}", supported.join(", "))]
    NotAcceptable {
        got: String,
        /// The response types the server makes ([`super::media::RESPONSE_TYPES`]).
        supported: &'static [&'static str],
    },
    #[error("the request body is larger than the payload limit of {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("could not read the request body: {detail}")]
    BodyRead { detail: String },
    #[error(
        "the image is {width}x{height} pixels, over the limit of {max_pixels} pixels; downscale it before sending"
    )]
    ImageTooLarge { width: u32, height: u32, max_pixels: u64 },
    #[error(
        "the probabilities for this image would hold {values} values, over the limit of {max_values}; send a \
         smaller image or ask for the mask (Accept: image/png)"
    )]
    ProbabilitiesTooLarge { values: u64, max_values: u64 },
    #[error("the model is still loading; retry shortly")]
    Loading,
    #[error("the server is at capacity (all inference workers busy and the queue full); retry shortly")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference did not finish within the request timeout of {seconds} s")]
    Timeout { seconds: f64 },
    #[error("no route for {method} {path}; the routes are GET /ping, POST /invocations, GET /execution-parameters")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::EmptyBody | ServeError::BadImage { .. } | ServeError::BodyRead { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServeError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            ServeError::PayloadTooLarge { .. }
            | ServeError::ImageTooLarge { .. }
            | ServeError::ProbabilitiesTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Loading | ServeError::Overloaded | ServeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ServeError::NotFound { .. } => StatusCode::NOT_FOUND,
            ServeError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::EmptyBody => "empty_body",
            ServeError::BadImage { .. } => "bad_image",
            ServeError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ServeError::NotAcceptable { .. } => "not_acceptable",
            ServeError::PayloadTooLarge { .. } => "payload_too_large",
            ServeError::BodyRead { .. } => "body_read_failed",
            ServeError::ImageTooLarge { .. } => "image_too_large",
            ServeError::ProbabilitiesTooLarge { .. } => "probabilities_too_large",
            ServeError::Loading => "model_loading",
            ServeError::Overloaded => "overloaded",
            ServeError::ShuttingDown => "shutting_down",
            ServeError::Timeout { .. } => "timeout",
            ServeError::NotFound { .. } => "not_found",
            ServeError::MethodNotAllowed { .. } => "method_not_allowed",
            ServeError::Internal(_) => "internal_error",
        }
    }
}

/// The JSON error body.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, ServeError::Loading | ServeError::Overloaded) {
            tracing::error!(code = self.code(), "{self}");
        } else {
            tracing::debug!(code = self.code(), "{self}");
        }
        let body = ErrorBody {
            status: status.as_u16(),
            error: self.code().to_string(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::GATEWAY_TIMEOUT {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        response
    }
}
