//! The one place where errors become HTTP responses, per surface:
//! - the admin API: `{"error": {"code", "message"}}` with a 4xx for the caller's faults;
//! - the Lambda Invoke API: restJson1 service errors (`x-amzn-ErrorType`, `{"Type","message"}`),
//!   `TooManyRequestsException` with `Reason` and `Retry-After`;
//! - HTTP triggers: API Gateway's `{"message": …}` bodies (502 for function errors).
//!
//! Platform faults are logged in full and answered with a short 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gust_core::{ErrorClass, InvokeError, lambda};
use gust_store::StoreError;
use serde_json::json;

/// Platform faults repeat on every request while their cause lasts (a full disk): a few lines
/// per kind per 10 s, then a count.
static PLATFORM_ERRORS: gust_core::lograte::LogLimiter =
    gust_core::lograte::LogLimiter::new(10_000, 5);

fn log_platform_error(kind: &str, message: &dyn std::fmt::Display) {
    if let Some(r) = PLATFORM_ERRORS.check(kind, gust_core::now_ms()) {
        tracing::error!("{kind}: {message}{r}");
    }
}

/// An admin API error.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    Conflict(String),
    PayloadTooLarge(String),
    /// A limit the caller must wait for (a full backlog): 429 with `Retry-After`.
    TooManyRequests(String),
    /// gust cannot serve this now through no fault of the caller's (a limit of its own): 503
    /// with `Retry-After`.
    Unavailable(String),
    Platform(String),
}

/// Seconds a sender refused for a full backlog is asked to wait.
const BACKLOG_RETRY_AFTER_SECS: u64 = 1;

/// The `Reason` of the Invoke API's 429 for a full async backlog. Lambda has none for this (its
/// async queue does not refuse); a distinct reason, so that it is not read as a concurrency
/// throttle.
pub const BACKLOG_FULL_REASON: &str = "AsyncBacklogLimitExceeded";

/// The reason of a concurrency throttle, as Lambda says it.
const CONCURRENCY_REASON: &str = "ReservedFunctionConcurrentInvocationLimitExceeded";

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            other => ApiError::Platform(other.to_string()),
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "BadRequest", m),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "missing or wrong admin token: send `Authorization: Bearer <token>`; the token is in \
                 <data-dir>/admin-token (the CLI reads it there, or from GUST_TOKEN)"
                    .to_string(),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "NotFound", m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "Conflict", m),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", m),
            ApiError::TooManyRequests(m) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", m),
            ApiError::Platform(m) => {
                log_platform_error("admin API", &m);
                (StatusCode::INTERNAL_SERVER_ERROR, "Internal", "internal error; see the server log".to_string())
            }
        };
        let mut r = json_response(
            status,
            json!({ "error": { "code": code, "message": message } }),
        );
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(BACKLOG_RETRY_AFTER_SECS),
            );
        }
        r
    }
}

/// An async enqueue or queue send that was refused: the Invoke API's shape (`aws`) or the
/// admin/HTTP shape.
pub fn enqueue_error(e: &gust_events::EnqueueError, aws: bool) -> Response {
    use gust_events::EnqueueError as E;
    let (status, aws_type) = match e {
        E::NotFound(_) => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
        E::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidParameterValueException"),
        E::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException"),
        E::Full(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
        E::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceException"),
        E::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
    };
    if matches!(e, E::Store(_)) {
        log_platform_error("event store", e);
    }
    if aws && let E::Full(m) = e {
        // Lambda's throttling shape, as for a concurrency throttle.
        return throttled(m, BACKLOG_FULL_REASON, BACKLOG_RETRY_AFTER_SECS);
    }
    if aws {
        let mut r = aws_error(status, aws_type, &e.to_string());
        if let E::Busy(_) = e {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(BACKLOG_RETRY_AFTER_SECS),
            );
        }
        return r;
    }
    let api = match e {
        E::NotFound(m) => ApiError::NotFound(m.clone()),
        E::Invalid(m) => ApiError::BadRequest(m.clone()),
        E::TooLarge(_) => ApiError::PayloadTooLarge(e.to_string()),
        E::Full(m) => ApiError::TooManyRequests(m.clone()),
        E::Busy(m) => ApiError::Unavailable(m.clone()),
        E::Store(m) => ApiError::Platform(m.clone()),
    };
    api.into_response()
}

/// An Invoke API error in the AWS restJson1 shape.
pub fn aws_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    let kind = if status.is_client_error() {
        "User"
    } else {
        "Service"
    };
    let mut r = json_response(status, json!({ "Type": kind, "message": message }));
    if let Ok(v) = HeaderValue::from_str(error_type) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

pub fn invoke_api_error(e: &InvokeError) -> Response {
    match e {
        InvokeError::NotFound(name) => aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("Function not found: {}", lambda::function_arn(name)),
        ),
        InvokeError::Throttled {
            message,
            retry_after_secs,
        } => throttled(message, CONCURRENCY_REASON, *retry_after_secs),
        InvokeError::PayloadTooLarge(_) => aws_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            &e.to_string(),
        ),
        InvokeError::ShuttingDown => aws_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceException",
            "gust is shutting down; retry on another node",
        ),
        InvokeError::Platform(m) => {
            log_platform_error("invoke", m);
            aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                "internal error; see the server log",
            )
        }
    }
}

/// The Invoke API's `TooManyRequestsException`, with its `Reason`.
fn throttled(message: &str, reason: &str, retry_after_secs: u64) -> Response {
    let mut r = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "Type": "User",
            "message": message,
            "Reason": reason,
            "retryAfterSeconds": retry_after_secs.to_string(),
        }),
    );
    r.headers_mut().insert(
        "x-amzn-errortype",
        HeaderValue::from_static("TooManyRequestsException"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

/// An HTTP trigger error, as API Gateway answers it.
pub fn http_error(e: &InvokeError) -> Response {
    let (status, message) = match (e.class(), e) {
        (_, InvokeError::NotFound(_)) => (StatusCode::NOT_FOUND, "Not Found"),
        (_, InvokeError::Throttled { .. }) => (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests"),
        (_, InvokeError::PayloadTooLarge(_)) => {
            (StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
        }
        (_, InvokeError::ShuttingDown) => (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
        (ErrorClass::Platform, _) | (_, InvokeError::Platform(_)) => {
            log_platform_error("http trigger", e);
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    };
    let mut r = json_response(status, json!({ "message": message }));
    if let InvokeError::Throttled {
        retry_after_secs, ..
    } = e
    {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    r
}

/// A function error or malformed function response on an HTTP trigger: 502.
pub fn bad_gateway() -> Response {
    json_response(
        StatusCode::BAD_GATEWAY,
        json!({ "message": "Internal Server Error" }),
    )
}

/// Why a request body could not be read (`listener::read_body`).
#[derive(Debug)]
pub enum BodyError {
    /// Over the surface's limit (bytes): 413.
    TooLarge(usize),
    /// A malformed chunked encoding, or the connection ended before `Content-Length`: 400.
    Malformed,
    /// The body did not arrive within the listener's body timeout: 408.
    TimedOut,
}

impl BodyError {
    /// Sorts a body read error by what is in its source chain.
    pub fn classify(e: &(dyn std::error::Error + 'static), limit: usize) -> BodyError {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if e.is::<http_body_util::LengthLimitError>() {
                return BodyError::TooLarge(limit);
            }
            if e.is::<crate::listener::BodyTimeout>() {
                return BodyError::TimedOut;
            }
            cur = e.source();
        }
        BodyError::Malformed
    }
}

/// A request body that could not be read, in the shape of the surface `path` belongs to: the
/// Invoke API's restJson1 errors, the admin shape for the admin API, `/async/fn` and `/q`, and
/// API Gateway's `{"message"}` for function routes.
pub fn body_error(path: &str, e: &BodyError) -> Response {
    let (status, aws_type, code, message, http) = match e {
        BodyError::TooLarge(limit) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            "PayloadTooLarge",
            format!("the request body is larger than {limit} bytes"),
            "Request Entity Too Large",
        ),
        BodyError::Malformed => (
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "BadRequest",
            "the request body is malformed (chunked encoding) or ended before its Content-Length"
                .to_string(),
            "Bad Request",
        ),
        BodyError::TimedOut => (
            StatusCode::REQUEST_TIMEOUT,
            "RequestTimeoutException",
            "RequestTimeout",
            "the request body did not arrive in time (see the body timeout in docs/security.md)"
                .to_string(),
            "Request Timeout",
        ),
    };
    if path.starts_with("/2015-03-31/") {
        aws_error(status, aws_type, &message)
    } else if ["/_gust/", "/q/", "/async/"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        json_response(
            status,
            json!({ "error": { "code": code, "message": message } }),
        )
    } else {
        json_response(status, json!({ "message": http }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(r: Response) -> serde_json::Value {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn a_full_backlog_is_not_reported_as_a_concurrency_throttle() {
        use gust_events::EnqueueError as E;
        let r = enqueue_error(&E::Full("backlog full".into()), true);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["x-amzn-errortype"], "TooManyRequestsException");
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(json_of(r).await["Reason"], BACKLOG_FULL_REASON);
        let r = invoke_api_error(&InvokeError::Throttled {
            message: "concurrency limit".into(),
            retry_after_secs: 1,
        });
        assert_eq!(json_of(r).await["Reason"], CONCURRENCY_REASON);
    }

    #[tokio::test]
    async fn busy_lookups_are_a_503_to_retry() {
        use gust_events::EnqueueError as E;
        let e = E::Busy("too many callback host lookups in progress; retry".into());
        let r = enqueue_error(&e, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        let v = json_of(r).await;
        assert_eq!(
            v["error"]["message"],
            "too many callback host lookups in progress; retry"
        );
        let r = enqueue_error(&e, true);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
    }
}
