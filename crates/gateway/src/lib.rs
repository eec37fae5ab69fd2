//! gust-gateway: the HTTP front of a node (axum on hyper). It serves
//! - function routes from manifests and the default URL `/fn/NAME/...` (API Gateway v2 events),
//! - the Lambda Invoke API `POST /2015-03-31/functions/{name}/invocations`,
//! - the admin API under `/_gust/v1/` (bearer token).
//!
//! It turns requests into `Invocation`s for the `Invoker` and results into responses; it never
//! knows how instances are made. Errors become responses in `error.rs` only.

mod admin;
pub mod apigw;
pub mod endpoint;
pub mod error;
mod invoke_api;
pub mod listener;
pub mod platform;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use gust_core::{Invocation, InvokeError, Invoker, MAX_PAYLOAD, Outcome};
use gust_store::LogWriter;

pub use platform::Platform;

/// Everything the handlers share.
pub struct App {
    pub platform: Arc<Platform>,
    pub invoker: Arc<dyn Invoker>,
    pub logs: Arc<LogWriter>,
    pub token: String,
    /// The base URL printed for functions (`http://127.0.0.1:8080`).
    pub base_url: String,
    /// Async invocations, queues and schedules.
    pub events: Arc<gust_events::Events>,
    /// What `GET /_gust/v1/status` reports of the executor (isolation, pre-warmed pool).
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

pub type SharedApp = Arc<App>;

/// The whole HTTP surface. Order of concerns: the admin API sits behind the token check (a
/// middleware on its sub-router only); the Invoke API and function routes are public, as a
/// Function URL with auth type NONE is; everything else falls through to the route table.
pub fn router(app: SharedApp) -> Router {
    Router::new()
        .route("/_gust/health", get(|| async { "ok" }))
        .nest("/_gust/v1", admin::router(app.clone()))
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(invoke_api::invoke),
        )
        .route("/async/fn/{name}", post(async_url))
        .route("/async/fn/{name}/", post(async_url))
        .route("/async/fn/{name}/{*rest}", post(async_url))
        .route("/q/{name}", post(queue_ingest))
        .route("/fn/{name}", any(default_url))
        .route("/fn/{name}/", any(default_url))
        .route("/fn/{name}/{*rest}", any(default_url))
        .fallback(manifest_route)
        .with_state(app)
}

fn peer(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// `/fn/NAME/rest`: the function sees `/rest` as its path, as under a Lambda Function URL.
async fn default_url(State(app): State<SharedApp>, req: Request) -> Response {
    let (name, rest) = function_path(req.uri().path(), "/fn/");
    http_invoke(&app, req, &name, rest, "$default".into(), None).await
}

/// `PREFIX NAME/rest` → (the decoded function name, `/rest`, or `/` when there is none).
fn function_path(path: &str, prefix: &str) -> (String, String) {
    let after = &path[prefix.len()..];
    let (name, rest) = match after.find('/') {
        Some(i) => (&after[..i], after[i..].to_string()),
        None => (after, "/".to_string()),
    };
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8_lossy()
        .into_owned();
    (name, rest)
}

/// `POST /async/fn/NAME/rest`: the same HTTP event as `/fn/NAME/rest`, stored and run later;
/// 202 with the call id. `X-Callback-Url` receives the result (status, headers `X-Call-Id`,
/// `X-Function-Status`, `X-Duration-Seconds`; body), as OpenFaaS's async calls do.
async fn async_url(State(app): State<SharedApp>, req: Request) -> Response {
    let (name, rest) = function_path(req.uri().path(), "/async/fn/");
    let callback = req
        .headers()
        .get("x-callback-url")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let source_ip = peer(&req);
    let (parts, body) = req.into_parts();
    let body = match listener::read_body(body, gust_events::MAX_EVENT_BYTES).await {
        Ok(b) => b,
        Err(error::BodyError::TooLarge(_)) => {
            return error::enqueue_error(
                &gust_events::EnqueueError::TooLarge(gust_events::MAX_EVENT_BYTES + 1),
                false,
            );
        }
        Err(e) => return error::body_error(parts.uri.path(), &e),
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let event = apigw::event(&apigw::HttpRequest {
        method: &parts.method,
        raw_path: &rest,
        raw_query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
        route_key: "$default",
        path_parameters: None,
        source_ip,
        request_id: &request_id,
    });
    match app
        .events
        .invoke_async(&name, event.into(), callback, true)
        .await
    {
        Ok(id) => {
            let mut r = (
                StatusCode::ACCEPTED,
                serde_json::json!({ "id": id }).to_string(),
            )
                .into_response();
            r.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
                r.headers_mut().insert("x-call-id", v);
            }
            r
        }
        Err(e) => error::enqueue_error(&e, false),
    }
}

/// `POST /q/NAME`: the body becomes one message of queue NAME (an ingest endpoint for
/// webhooks); 200 with its id once it is on disk.
async fn queue_ingest(
    State(app): State<SharedApp>,
    axum::extract::Path(name): axum::extract::Path<String>,
    listener::BodyBytes(body): listener::BodyBytes<{ gust_events::MAX_EVENT_BYTES }>,
) -> Response {
    let msg = gust_events::Message {
        body,
        attributes: serde_json::Value::Null,
    };
    match app.events.send(&name, vec![msg]).await {
        Ok(ids) => axum::Json(serde_json::json!({ "id": ids[0] })).into_response(),
        Err(e) => error::enqueue_error(&e, false),
    }
}

async fn manifest_route(State(app): State<SharedApp>, req: Request) -> Response {
    let table = app.platform.routes();
    let matched = table.find(req.method().as_str(), req.uri().path());
    let Some(m) = matched else {
        return error::http_error(&InvokeError::NotFound(req.uri().path().to_string()));
    };
    let path = req.uri().path().to_string();
    http_invoke(
        &app,
        req,
        m.function,
        path,
        m.route_key.clone(),
        Some(m.params),
    )
    .await
}

async fn http_invoke(
    app: &App,
    req: Request,
    function: &str,
    raw_path: String,
    route_key: String,
    params: Option<std::collections::BTreeMap<String, String>>,
) -> Response {
    let source_ip = peer(&req);
    let (parts, body) = req.into_parts();
    let body = match listener::read_body(body, MAX_PAYLOAD).await {
        Ok(b) => b,
        Err(error::BodyError::TooLarge(_)) => {
            return error::http_error(&InvokeError::PayloadTooLarge(MAX_PAYLOAD + 1));
        }
        Err(e) => return error::body_error(parts.uri.path(), &e),
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let event = apigw::event(&apigw::HttpRequest {
        method: &parts.method,
        raw_path: &raw_path,
        raw_query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
        route_key: &route_key,
        path_parameters: params,
        source_ip,
        request_id: &request_id,
    });
    let invocation = Invocation {
        payload: event.into(),
        content_type: None,
        ..Default::default()
    };
    let result = match app.invoker.invoke(function, invocation).await {
        Ok(r) => r,
        Err(e) => return error::http_error(&e),
    };
    let mut resp = match result.outcome {
        Outcome::Response { body, content_type } => {
            let head_only = parts.method == Method::HEAD;
            match apigw::response(body, content_type.as_deref()) {
                Some(mut r) => {
                    if head_only {
                        *r.body_mut() = Body::empty();
                    }
                    r
                }
                None => {
                    tracing::warn!(
                        function,
                        "malformed HTTP response from function (see docs/api.md)"
                    );
                    error::bad_gateway()
                }
            }
        }
        Outcome::FunctionError { .. } => error::bad_gateway(),
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(&result.request_id) {
        resp.headers_mut().insert("x-amzn-requestid", v);
    }
    resp
}

/// A 404 for unknown admin paths, in the admin error shape.
pub(crate) async fn admin_not_found(req: Request<Body>) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        error::ApiError::NotFound(format!(
            "no admin API route {} {}",
            req.method(),
            req.uri().path()
        )),
    )
}
