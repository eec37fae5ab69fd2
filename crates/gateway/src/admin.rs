//! The admin API under `/_gust/v1/` (JSON, bearer token). See docs/api.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::listener::BodyBytes;
use crate::{SharedApp, admin_not_found};

/// Largest code bundle accepted (Lambda: 250 MB unzipped).
const MAX_BUNDLE: usize = 256 * 1024 * 1024;

/// Largest JSON body of the other admin calls (a manifest, a batch of messages).
const MAX_ADMIN_BODY: usize = 2 * 1024 * 1024;

fn events_err(e: gust_events::EnqueueError) -> Response {
    crate::error::enqueue_error(&e, false)
}

/// An async call or queue message: its state, attempts and last error.
async fn event(State(app): State<SharedApp>, Path(id): Path<String>) -> Response {
    match app.events.event(&id) {
        Ok(Some(e)) => {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["payload"] = Value::String(String::from_utf8_lossy(&e.payload).into_owned());
            Json(v).into_response()
        }
        Ok(None) => ApiError::NotFound(format!(
            "no event {id}: ids are the async call id (x-amzn-RequestId, X-Call-Id) or a message id"
        ))
        .into_response(),
        Err(e) => events_err(e),
    }
}

async fn queues(State(app): State<SharedApp>) -> Response {
    match app.events.queue_stats() {
        Ok(v) => Json(json!({ "queues": v })).into_response(),
        Err(e) => events_err(e),
    }
}

async fn schedules(State(app): State<SharedApp>) -> Response {
    match app.events.schedules() {
        Ok(v) => Json(json!({ "schedules": v })).into_response(),
        Err(e) => events_err(e),
    }
}

/// `{"messages": [{"body": "...", "attributes": {...}}]}` or one `{"body": ...}`.
async fn send_messages(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
    BodyBytes(body): BodyBytes<MAX_ADMIN_BODY>,
) -> Response {
    let hint = "the body must be JSON: {\"body\": \"text\", \"attributes\": {\"k\": {\"stringValue\": \"v\", \"dataType\": \"String\"}}} or {\"messages\": [...]}";
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return ApiError::BadRequest(hint.into()).into_response();
    };
    let items: Vec<Value> = match v.get("messages") {
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return ApiError::BadRequest(hint.into()).into_response(),
        None => vec![v],
    };
    let mut msgs = Vec::new();
    for m in items {
        let Some(b) = m.get("body") else {
            return ApiError::BadRequest(hint.into()).into_response();
        };
        let text = match b {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        msgs.push(gust_events::Message {
            body: text.into(),
            attributes: m.get("attributes").cloned().unwrap_or(Value::Null),
        });
    }
    if msgs.is_empty() {
        return ApiError::BadRequest("no messages to send".into()).into_response();
    }
    match app.events.send(&name, msgs).await {
        Ok(ids) => Json(json!({ "ids": ids })).into_response(),
        Err(e) => events_err(e),
    }
}

async fn purge(State(app): State<SharedApp>, Path(name): Path<String>) -> Response {
    if let Ok(None) = app.platform.store.queue(&name) {
        return ApiError::NotFound(format!("queue {name} is not declared")).into_response();
    }
    match app.events.purge(&name).await {
        Ok(n) => Json(json!({ "queue": name, "purged": n })).into_response(),
        Err(e) => events_err(e),
    }
}

#[derive(Deserialize)]
struct RedriveQuery {
    to: Option<String>,
}

/// Moves a dead-letter queue's messages back to the queues they came from (or `?to=QUEUE`).
async fn redrive(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
    Query(q): Query<RedriveQuery>,
) -> Response {
    for queue in [Some(&name), q.to.as_ref()].into_iter().flatten() {
        if let Ok(None) = app.platform.store.queue(queue) {
            return ApiError::NotFound(format!("queue {queue} is not declared")).into_response();
        }
    }
    match app.events.redrive(&name, q.to).await {
        Ok(n) => Json(json!({ "queue": name, "moved": n })).into_response(),
        Err(e) => events_err(e),
    }
}

async fn status(State(app): State<SharedApp>) -> Json<Value> {
    Json((app.status)())
}

pub(crate) fn router(app: SharedApp) -> Router<SharedApp> {
    Router::new()
        .route("/status", get(status))
        .route("/events/{id}", get(event))
        .route("/queues", get(queues))
        .route("/queues/{name}/messages", post(send_messages))
        .route("/queues/{name}/purge", post(purge))
        .route("/queues/{name}/redrive", post(redrive))
        .route("/schedules", get(schedules))
        .route("/functions", get(list))
        .route("/functions/{name}", get(describe).delete(remove_function))
        .route("/functions/{name}/logs", get(logs))
        .route("/functions/{name}/recycle", post(recycle))
        .route("/services", post(deploy))
        .route("/services/{name}", axum::routing::delete(remove_service))
        .route("/blobs/{sha}", put(put_blob).get(has_blob))
        .fallback(admin_not_found)
        .layer(middleware::from_fn_with_state(app, auth))
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(app): State<SharedApp>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 7235 §2.1).
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(t) if same(t.as_bytes(), app.token.as_bytes()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

fn function_json(app: &SharedApp, f: &gust_store::StoredFunction) -> Value {
    let stats = app
        .platform
        .pools
        .get(&f.spec.name)
        .map(|p| p.stats())
        .unwrap_or_default();
    json!({
        "name": f.spec.name,
        "service": f.spec.service,
        "runtime": f.spec.runtime,
        "handler": f.spec.handler,
        "memory": f.spec.memory_mb,
        "timeout": f.spec.timeout,
        "environment": f.spec.environment,
        "scaling": f.spec.scaling,
        "routes": f.spec.routes,
        "revision": f.revision,
        "code_sha256": f.code_sha256,
        "deployed_at": gust_core::time::iso8601_ms(f.deployed_at_ms),
        "url": format!("{}/fn/{}", app.base_url, f.spec.name),
        "instances": stats,
        "network": f.spec.network,
        "async": f.spec.async_config,
        "subscriptions": f.spec.subscriptions,
        "schedules": f.spec.schedules.iter().map(|s| &s.name).collect::<Vec<_>>(),
        "events": app.events.counts(&f.spec.name).ok(),
    })
}

async fn list(State(app): State<SharedApp>) -> Result<Json<Value>, ApiError> {
    let fs = app.platform.store.functions()?;
    Ok(Json(Value::Array(
        fs.iter().map(|f| function_json(&app, f)).collect(),
    )))
}

fn not_deployed(name: &str) -> ApiError {
    ApiError::NotFound(format!("function {name} is not deployed (see `gust ls`)"))
}

async fn describe(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let f = app
        .platform
        .store
        .function(&name)?
        .ok_or_else(|| not_deployed(&name))?;
    Ok(Json(function_json(&app, &f)))
}

async fn remove_function(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.platform.remove_function(&name).await?;
    app.events.refresh();
    Ok(Json(json!({ "removed": [name] })))
}

async fn remove_service(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let removed = app.platform.remove_service(&name).await?;
    app.events.refresh();
    Ok(Json(json!({ "service": name, "removed": removed })))
}

async fn recycle(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pool = app
        .platform
        .pools
        .get(&name)
        .ok_or_else(|| not_deployed(&name))?;
    let stopped = pool.recycle().await;
    Ok(Json(json!({ "stopped": stopped })))
}

#[derive(Deserialize)]
struct LogQuery {
    after: Option<i64>,
    limit: Option<usize>,
    /// Seconds to wait for new lines when there are none (for `gust logs -f`).
    wait: Option<u64>,
}

async fn logs(
    State(app): State<SharedApp>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    let deadline = Instant::now() + Duration::from_secs(q.wait.unwrap_or(0).min(60));
    loop {
        // Lines emitted before this request are visible to it.
        let writer = app.logs.clone();
        tokio::task::spawn_blocking(move || writer.flush())
            .await
            .map_err(|e| ApiError::Platform(e.to_string()))?;
        let rows = app.platform.store.logs(&name, q.after, limit)?;
        if !rows.is_empty() || Instant::now() >= deadline {
            let next = rows.last().map(|r| r.id).or(q.after);
            return Ok(Json(json!({ "logs": rows, "next": next })));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    manifest: String,
    #[serde(default = "default_file")]
    file: String,
    code: HashMap<String, String>,
}

fn default_file() -> String {
    "gust.toml".into()
}

async fn deploy(
    State(app): State<SharedApp>,
    BodyBytes(body): BodyBytes<MAX_ADMIN_BODY>,
) -> Result<Json<Value>, ApiError> {
    let body: DeployBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "deploy body must be JSON {{\"manifest\": \"<gust.toml text>\", \"file\": \"gust.toml\", \"code\": {{\"FUNCTION\": \"<sha256>\"}}}}: {e}"
        ))
    })?;
    let report = app
        .platform
        .deploy(&body.file, &body.manifest, &body.code)
        .await?;
    app.events.refresh();
    let mut v = serde_json::to_value(&report).map_err(|e| ApiError::Platform(e.to_string()))?;
    for f in v["functions"].as_array_mut().into_iter().flatten() {
        let url = format!(
            "{}/fn/{}",
            app.base_url,
            f["name"].as_str().unwrap_or_default()
        );
        f["url"] = Value::String(url);
    }
    Ok(Json(v))
}

async fn has_blob(State(app): State<SharedApp>, Path(sha): Path<String>) -> StatusCode {
    if app.platform.store.has_blob(&sha) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// A request body as a blocking reader, for the store's streaming upload: chunks arrive
/// through a small bounded channel, so at most a few are in memory whatever the size.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    chunk: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// Why the body stopped before its end.
enum Cut {
    TooLarge,
    Read(String),
}

/// `PUT /blobs/{sha}`: the body is streamed to a temp file in the data dir while it is hashed
/// (gust_store::Store::put_blob_from), never held whole in memory; beyond [`MAX_BUNDLE`] the
/// upload stops with a 413, and nothing of it is kept.
async fn put_blob(
    State(app): State<SharedApp>,
    Path(sha): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "code bundles are limited to {} MB",
            MAX_BUNDLE >> 20
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BUNDLE as u64) {
        return Err(too_large());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let store = app.platform.store.clone();
    let writer = tokio::task::spawn_blocking(move || {
        store.put_blob_from(
            &sha,
            ChannelReader {
                rx,
                chunk: Bytes::new(),
            },
        )
    });
    let mut body = req.into_body();
    let mut total = 0usize;
    let mut cut = None;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers
            },
            Err(e) => {
                cut = Some(Cut::Read(e.to_string()));
                break;
            }
        };
        total += data.len();
        if total > MAX_BUNDLE {
            cut = Some(Cut::TooLarge);
            break;
        }
        if tx.send(Ok(data)).await.is_err() {
            // The writer stopped (a bad hash cannot be known before the end, so this is
            // an I/O error); its result says why.
            break;
        }
    }
    if cut.is_some() {
        // The store sees a read error: it stops and removes its temp file.
        let _ = tx
            .send(Err(std::io::Error::other("the upload was cut short")))
            .await;
    }
    drop(tx);
    let stored = writer
        .await
        .map_err(|e| ApiError::Platform(e.to_string()))?;
    match cut {
        Some(Cut::TooLarge) => return Err(too_large()),
        Some(Cut::Read(e)) => {
            return Err(ApiError::BadRequest(format!(
                "the bundle upload could not be read to its end ({e}): upload it again"
            )));
        }
        None => {}
    }
    let created = stored?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "created": created }))).into_response())
}
