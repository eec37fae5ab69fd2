//! The Lambda Runtime API (`/2018-06-01/runtime/...`) served to one instance, on its own
//! loopback port. Follows lambda-contracts.md §1: the `/next` headers, 202 `{"status":"OK"}`,
//! 400 `InvalidRequestID`, 403 `InvalidStateTransition`, 413 `RequestEntityTooLarge`.
//!
//! The instance side (`ProcessInstance::invoke`) hands an invocation over a one-slot channel;
//! `/next` takes it and remembers it as the current invocation; `/response` or `/error` for that
//! id completes it through a oneshot. Nothing here holds a lock across an await.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gust_core::{InitError, MAX_PAYLOAD, Outcome};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

/// An invocation on its way to the runtime.
pub(crate) struct Dispatch {
    pub request_id: String,
    pub payload: Bytes,
    pub content_type: Option<String>,
    pub deadline_ms: u64,
    pub client_context: Option<String>,
    pub trace_id: Option<String>,
    pub reply: oneshot::Sender<Outcome>,
}

struct Current {
    request_id: String,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    /// The first `/next` ends init; `/init/error` is refused after it.
    initialized: bool,
    current: Option<Current>,
    ready: Option<oneshot::Sender<Result<(), InitError>>>,
    config_timeout: Option<Duration>,
    /// The last invocation the runtime took through `/next` (kept after it is answered).
    taken: Option<String>,
}

pub(crate) struct RuntimeApi {
    /// The function's ARN; set at start, or at specialisation for a pre-warmed sandbox.
    arn: std::sync::OnceLock<String>,
    state: Mutex<State>,
    next: tokio::sync::Mutex<mpsc::Receiver<Dispatch>>,
    /// Pre-warmed sandboxes: told when the bootstrap waits at `/gust/specialize`, and what
    /// to answer it (the function's environment).
    parked: Mutex<Option<oneshot::Sender<()>>>,
    specialise: tokio::sync::Mutex<Option<oneshot::Receiver<Bytes>>>,
}

/// Decides whether a TCP connection (peer, local address) may use this Runtime API.
pub(crate) type Admit =
    Arc<dyn Fn(std::net::SocketAddr, std::net::SocketAddr) -> bool + Send + Sync>;

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn api_error(status: StatusCode, error_type: &str, message: &str) -> Resp {
    json(status, gust_core::lambda::error_body(error_type, message))
}

fn accepted() -> Resp {
    json(
        StatusCode::ACCEPTED,
        Bytes::from_static(br#"{"status":"OK"}"#),
    )
}

impl RuntimeApi {
    pub(crate) fn new(
        arn: Option<String>,
        ready: oneshot::Sender<Result<(), InitError>>,
    ) -> (Arc<RuntimeApi>, mpsc::Sender<Dispatch>) {
        let (tx, rx) = mpsc::channel(1);
        let state = State {
            ready: Some(ready),
            ..State::default()
        };
        let cell = std::sync::OnceLock::new();
        if let Some(a) = arn {
            let _ = cell.set(a);
        }
        (
            Arc::new(RuntimeApi {
                arn: cell,
                state: Mutex::new(state),
                next: tokio::sync::Mutex::new(rx),
                parked: Mutex::new(None),
                specialise: tokio::sync::Mutex::new(None),
            }),
            tx,
        )
    }

    /// Arms the specialisation handshake of a pre-warmed sandbox: `parked` fires when the
    /// bootstrap waits for its function; `env` is what it then receives.
    pub(crate) fn prewarm(&self) -> (oneshot::Receiver<()>, oneshot::Sender<Bytes>) {
        let (parked_tx, parked_rx) = oneshot::channel();
        let (env_tx, env_rx) = oneshot::channel();
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(parked_tx);
        if let Ok(mut slot) = self.specialise.try_lock() {
            *slot = Some(env_rx);
        }
        (parked_rx, env_tx)
    }

    pub(crate) fn set_arn(&self, arn: String) {
        let _ = self.arn.set(arn);
    }

    async fn specialize(&self) -> Resp {
        let rx = self.specialise.lock().await.take();
        let Some(rx) = rx else {
            return api_error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "this instance is not pre-warmed or is already specialised",
            );
        };
        if let Some(p) = self.parked.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = p.send(());
        }
        match rx.await {
            Ok(body) => json(StatusCode::OK, body),
            Err(_) => api_error(
                StatusCode::GONE,
                "Gone",
                "this pre-warmed sandbox is being discarded",
            ),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn config_timeout(&self) -> Option<Duration> {
        self.state().config_timeout
    }

    /// Whether the runtime ever took this invocation through `/next` (answered or not).
    pub(crate) fn was_taken(&self, request_id: &str) -> bool {
        self.state().taken.as_deref() == Some(request_id)
    }

    /// Drops the current invocation (timeout or crash): a late reply for it gets 400.
    pub(crate) fn abandon_current(&self) {
        self.state().current = None;
    }

    /// Fails init from outside (the process exited or init timed out) unless it already ended.
    pub(crate) fn fail_init(&self, err: InitError) {
        if let Some(ready) = self.state().ready.take() {
            let _ = ready.send(Err(err));
        }
    }

    /// Accepts runtime connections on TCP (and, for the built-in runtimes, a Unix socket)
    /// until the task is aborted (when the instance stops).
    pub(crate) async fn serve(
        self: Arc<Self>,
        tcp: Option<TcpListener>,
        unix: Option<UnixListener>,
        admit: Option<Admit>,
    ) {
        loop {
            tokio::select! {
                r = async {
                    match &tcp {
                        Some(t) => t.accept().await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let Some(admit) = admit.clone() else {
                            tokio::spawn(self.clone().serve_conn(stream));
                            continue;
                        };
                        // The check reads /proc (the connection's owner): off the async workers.
                        let api = self.clone();
                        tokio::spawn(async move {
                            let Ok(local) = stream.local_addr() else { return };
                            let ok = tokio::task::spawn_blocking(move || admit(peer, local))
                                .await
                                .unwrap_or(false);
                            if ok {
                                api.serve_conn(stream).await;
                            } else {
                                // A function can make these as fast as it likes: a few
                                // lines per 10 s, then a count.
                                static REFUSED: gust_core::lograte::LogLimiter =
                                    gust_core::lograte::LogLimiter::new(10_000, 3);
                                if let Some(r) = REFUSED.check("refused", gust_core::now_ms()) {
                                    tracing::warn!(%peer, "refused a Runtime API connection that does not come from the instance{r}");
                                }
                            }
                        });
                    }
                    // EMFILE and friends: back off instead of spinning or giving up.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                r = async {
                    match &unix {
                        Some(u) => u.accept().await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Ok((stream, _)) => {
                        tokio::spawn(self.clone().serve_conn(stream));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
            }
        }
    }

    async fn serve_conn<IO>(self: Arc<Self>, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let api = self;
        let svc = hyper::service::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            // The built-in bootstraps pipeline `POST …/response` with the next
            // `GET /next`: let hyper write the 202 together with what follows.
            .pipeline_flush(true)
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path();
        let Some(rest) = path.strip_prefix("/2018-06-01/") else {
            return api_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no such Runtime API path: {path}"),
            );
        };
        match (req.method(), rest) {
            (&Method::GET, "runtime/invocation/next") => self.next().await,
            (&Method::GET, "runtime/gust/specialize") => self.specialize().await,
            (&Method::POST, "runtime/init/error") => self.init_error(req).await,
            (&Method::POST, "runtime/gust/config" | "gust/config") => self.gust_config(req).await,
            (&Method::GET, "ping") => json(StatusCode::OK, Bytes::from_static(b"{}")),
            (&Method::POST, r) if r.starts_with("runtime/invocation/") => {
                let tail = &r["runtime/invocation/".len()..];
                match tail.rsplit_once('/') {
                    Some((id, "response")) => {
                        let id = id.to_string();
                        self.complete(req, id, false).await
                    }
                    Some((id, "error")) => {
                        let id = id.to_string();
                        self.complete(req, id, true).await
                    }
                    _ => api_error(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("no such Runtime API path: {path}"),
                    ),
                }
            }
            (m, _) => api_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no such Runtime API route: {m} {path}"),
            ),
        }
    }

    async fn next(&self) -> Resp {
        {
            let mut st = self.state();
            if st.current.is_some() {
                return api_error(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    "State transition from Running to Ready is not allowed: post the current invocation's response or error first",
                );
            }
            st.initialized = true;
            if let Some(ready) = st.ready.take() {
                let _ = ready.send(Ok(()));
            }
        }
        let dispatch = self.next.lock().await.recv().await;
        let Some(d) = dispatch else {
            // The instance is stopping; the runtime should exit.
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "instance is shutting down",
            );
        };
        {
            let mut st = self.state();
            st.taken = Some(d.request_id.clone());
            st.current = Some(Current {
                request_id: d.request_id.clone(),
                reply: d.reply,
            });
        }
        let mut r = Response::new(Full::new(d.payload));
        let h = r.headers_mut();
        // from_bytes: JSON with non-ASCII text is a valid (obs-text) header value.
        let hv = |s: &str| HeaderValue::from_bytes(s.as_bytes()).ok();
        if let Some(v) = hv(&d.request_id) {
            h.insert("lambda-runtime-aws-request-id", v);
        }
        h.insert(
            "lambda-runtime-deadline-ms",
            HeaderValue::from(d.deadline_ms),
        );
        if let Some(v) = self.arn.get().and_then(|a| hv(a)) {
            h.insert("lambda-runtime-invoked-function-arn", v);
        }
        if let Some(v) = d.trace_id.as_deref().and_then(hv) {
            h.insert("lambda-runtime-trace-id", v);
        }
        if let Some(v) = d.client_context.as_deref().and_then(hv) {
            h.insert("lambda-runtime-client-context", v);
        }
        let ct = d
            .content_type
            .as_deref()
            .and_then(hv)
            .unwrap_or(HeaderValue::from_static("application/json"));
        h.insert(header::CONTENT_TYPE, ct);
        r
    }

    /// Reads a body of at most `MAX_PAYLOAD` bytes; `Err(true)` when it is larger, `Err(false)`
    /// when the connection broke mid-body. An oversized body is still read (and dropped) up to
    /// `DRAIN_LIMIT`, so that the runtime gets its 413 instead of a reset connection.
    async fn read_body(req: Request<Incoming>) -> Result<(http::HeaderMap, Bytes), bool> {
        const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
        let (parts, mut body) = req.into_parts();
        let mut buf = bytes::BytesMut::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| false)?;
            if let Ok(data) = frame.into_data() {
                total += data.len();
                if total <= MAX_PAYLOAD {
                    buf.extend_from_slice(&data);
                } else if total > DRAIN_LIMIT {
                    break;
                }
            }
        }
        if total > MAX_PAYLOAD {
            return Err(true);
        }
        Ok((parts.headers, buf.freeze()))
    }

    async fn complete(&self, req: Request<Incoming>, id: String, is_error: bool) -> Resp {
        let invalid = || {
            api_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestID",
                "Invalid request ID",
            )
        };
        {
            let st = self.state();
            if !st.initialized {
                return api_error(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    "State transition from Initializing to Response is not allowed",
                );
            }
            if st.current.as_ref().is_none_or(|c| c.request_id != id) {
                return invalid();
            }
        }
        if let Some(mode) = req.headers().get("lambda-runtime-function-response-mode")
            && mode.as_bytes() != b"streaming"
        {
            return api_error(
                StatusCode::BAD_REQUEST,
                "InvalidFunctionResponseMode",
                "Lambda-Runtime-Function-Response-Mode must be streaming when it is set",
            );
        }
        let body = Self::read_body(req).await;
        let outcome = match (&body, is_error) {
            (Err(true), _) => Outcome::function_error(
                "Function.ResponseSizeTooLarge",
                &format!(
                    "Response payload size exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."
                ),
            ),
            (Err(false), _) => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "TruncatedHTTPRequest",
                    "the request body was truncated",
                );
            }
            (Ok((headers, body)), false) => Outcome::Response {
                body: body.clone(),
                content_type: headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            },
            (Ok((headers, body)), true) => error_outcome(headers, body),
        };
        {
            // The reply is sent under the lock (a oneshot send never blocks), so that whoever
            // sees `current` gone also finds the reply in its channel.
            let mut st = self.state();
            match st.current.take_if(|c| c.request_id == id) {
                Some(current) => {
                    let _ = current.reply.send(outcome);
                }
                None => return invalid(),
            }
        }
        match body {
            Err(true) => api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."),
            ),
            _ => accepted(),
        }
    }

    async fn init_error(&self, req: Request<Incoming>) -> Resp {
        if self.state().initialized {
            return api_error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "State transition from Ready to InitError is not allowed",
            );
        }
        let (headers, body) = match Self::read_body(req).await {
            Ok(b) => b,
            Err(true) => {
                return api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    "init error body too large",
                );
            }
            Err(false) => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "TruncatedHTTPRequest",
                    "the request body was truncated",
                );
            }
        };
        let Outcome::FunctionError { error_type, body } = error_outcome(&headers, &body) else {
            unreachable!()
        };
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("errorMessage")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        self.fail_init(InitError {
            error_type,
            message,
            body,
        });
        accepted()
    }

    /// gust's own extension for the built-in bootstraps: the plain-module style's `config`
    /// (`{"timeout_ms": 10000}`), which applies where the manifest is silent.
    async fn gust_config(&self, req: Request<Incoming>) -> Resp {
        let Ok((_, body)) = Self::read_body(req).await else {
            return api_error(
                StatusCode::BAD_REQUEST,
                "InvalidConfig",
                "unreadable config body",
            );
        };
        let v: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidConfig",
                    &format!("config is not JSON: {e}"),
                );
            }
        };
        if let Some(ms) = v.get("timeout_ms").and_then(|t| t.as_f64()) {
            if !(1.0..=900_000.0).contains(&ms) {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidConfig",
                    "config.timeout must be 1..=900000 ms",
                );
            }
            self.state().config_timeout = Some(Duration::from_millis(ms as u64));
        }
        accepted()
    }
}

/// The outcome of `/error` and `/init/error`: the error type from the header, else the body's
/// `errorType`, else `Unhandled`; the body passed through, minus an X-Ray `errorCause`.
fn error_outcome(headers: &http::HeaderMap, body: &Bytes) -> Outcome {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .or_else(|| {
            parsed
                .as_ref()
                .and_then(|v| v.get("errorType")?.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| "Unhandled".to_string());
    let body = match parsed {
        Some(serde_json::Value::Object(mut m)) => {
            if m.remove("errorCause").is_some() {
                serde_json::Value::Object(m).to_string().into()
            } else {
                body.clone()
            }
        }
        // Anything else (not an object, not JSON) is passed through as the runtime sent it.
        _ => body.clone(),
    };
    Outcome::FunctionError { error_type, body }
}
