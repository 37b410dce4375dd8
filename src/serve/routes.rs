//! The router, the handlers and the cross-cutting layers (request logging, panic catching, custom attributes).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use tower_http::catch_panic::CatchPanicLayer;

use super::codec::{self, Encoded};
use super::error::ServeError;
use super::media;
use super::workers::SubmitError;
use super::AppState;
use crate::panics;

/// The header SageMaker passes through to the container and back (only if the container sets it on the response).
pub const CUSTOM_ATTRIBUTES: HeaderName = HeaderName::from_static("x-amzn-sagemaker-custom-attributes");

/// How far past the payload limit a body is still read (and discarded) so the client can receive the 413 cleanly
/// instead of a connection reset; beyond this the connection is dropped.
const DISCARD_LIMIT: usize = 64 << 20;

pub(super) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/invocations", post(invocations))
        .route("/execution-parameters", get(execution_parameters))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(echo_custom_attributes))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn ping(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.get().is_some() {
        (StatusCode::OK, Json(serde_json::json!({"status": "healthy"}))).into_response()
    } else {
        ServeError::Loading.into_response()
    }
}

async fn execution_parameters(State(state): State<Arc<AppState>>) -> Response {
    Json(state.config.execution.clone()).into_response()
}

async fn invocations(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ServeError> {
    let timeout = state.config.request_timeout;
    match tokio::time::timeout(timeout, invoke(&state, request)).await {
        Ok(result) => result,
        Err(_) => Err(ServeError::Timeout {
            seconds: timeout.as_secs_f64(),
        }),
    }
}

async fn invoke(state: &AppState, request: Request) -> Result<Response, ServeError> {
    let (parts, body) = request.into_parts();
    let body = read_body(body, state.config.max_payload_bytes).await?;
    media::check_content_type(header_str(&parts.headers, header::CONTENT_TYPE))?;
    let output = media::negotiate(header_str(&parts.headers, header::ACCEPT))?;
    if body.is_empty() {
        return Err(ServeError::EmptyBody);
    }
    let engine = state.engine.get().ok_or(ServeError::Loading)?;
    let inference = Arc::clone(&engine.inference);
    let limits = state.config.decode;
    let result = engine
        .pool
        .try_submit(move || codec::invoke(&inference, &body, output, limits))
        .map_err(|e| match e {
            SubmitError::Full => ServeError::Overloaded,
            SubmitError::Closed => ServeError::ShuttingDown,
        })?
        .await
        .map_err(|_| ServeError::ShuttingDown)?;
    let Encoded { content_type, body } = match result {
        Ok(answer) => answer?,
        Err(panic) => {
            return Err(ServeError::Internal(anyhow::anyhow!("inference panicked: {panic}")));
        }
    };
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response())
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Read the whole body, refusing more than `limit` bytes with 413. A body somewhat over the limit is read to its end
/// (and dropped) first, so that the client sees the 413 rather than a reset connection.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ServeError> {
    let mut body = body;
    let mut out = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ServeError::BodyRead { detail: e.to_string() })?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            if seen > limit.saturating_add(DISCARD_LIMIT) {
                break;
            }
            out = Vec::new();
            continue;
        }
        out.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(ServeError::PayloadTooLarge { limit_bytes: limit });
    }
    Ok(out)
}

async fn not_found(method: Method, uri: Uri) -> ServeError {
    ServeError::NotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ServeError {
    ServeError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panics::message(panic);
    ServeError::Internal(anyhow::anyhow!("a request handler panicked: {message}")).into_response()
}

/// SageMaker passes `X-Amzn-SageMaker-Custom-Attributes` (at most 1024 visible ASCII characters) back to the caller
/// only if the container sets it on its response: echo it on every response.
async fn echo_custom_attributes(request: Request, next: Next) -> Response {
    let attributes = request
        .headers()
        .get(&CUSTOM_ATTRIBUTES)
        .filter(|v| v.len() <= 1024 && v.as_bytes().iter().all(|b| (0x20..0x7f).contains(b)))
        .cloned();
    let mut response = next.run(request).await;
    if let Some(value) = attributes {
        response.headers_mut().insert(CUSTOM_ATTRIBUTES, value);
    }
    response
}

/// One log line per request: method, path, status, latency (`/ping` at debug level: SageMaker polls it constantly).
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    if path == "/ping" && status == 200 {
        tracing::debug!(%method, %path, status, latency_ms, "request");
    } else {
        tracing::info!(%method, %path, status, latency_ms, "request");
    }
    response
}
