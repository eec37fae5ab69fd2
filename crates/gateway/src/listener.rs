//! The HTTP/1 listener: accepts TCP connections and serves the router on them, with the limits
//! that keep slow, idle or numerous clients from starving the server (docs/security.md, "HTTP
//! listener limits"). Per connection, in this order:
//!
//! 1. **Cap.** At `max_connections` open, a newcomer first closes connections that serve no
//!    request and have nothing left to write (idle between requests, or not yet done sending a
//!    request head), the ones in that state the longest first; only when every connection is serving a request is the newcomer
//!    itself closed. Either way a counter grows and a WARN line (at most one per 10 s) says so.
//!    A flood of idle sockets therefore costs real clients nothing but a reconnect of an idle
//!    keep-alive connection.
//! 2. **Header timeout.** From accept, or from the first byte of a later request, the request
//!    head must be complete within `header_timeout`, or the connection is closed. A head over
//!    [`MAX_HEAD`] bytes gets 431 and the connection closes, so each connection holds at most
//!    that much of a request head in memory.
//! 3. **Body timeout** (a wrapper around the request body, so it runs only while a handler reads):
//!    at least one read every `body_timeout`, and on average at least `body_min_rate` bytes/s
//!    after the first `body_timeout` (Apache's `mod_reqtimeout body=T,MinRate=R`, plus a stall
//!    bound): a large upload at a steady pace is never cut, a trickle or a stall is. Then the
//!    request fails with 408 and the connection closes. A malformed or truncated body (bad chunk
//!    size, EOF before `Content-Length`) fails with 400 and the connection closes.
//! 4. **Idle timeout.** Between requests on a keep-alive connection, `idle_timeout`.
//! 5. **Write timeout.** While output is pending (the socket took bytes that are not yet
//!    flushed, or refused more), the connection is busy: never idle, never evicted, no header
//!    clock. It is bounded instead by `write_timeout` without write progress (nginx's
//!    `send_timeout`): a client that stops reading is closed then.
//!
//! Nothing else bounds a request while it is served (the handler runs, the response is
//! written), so long polls and long responses are not cut. The socket is watched, not the
//! response body, because hyper drops the body once its last chunk is queued, before it is
//! written (`clear_body` in its h1 dispatcher): the idle and header clocks start at the last
//! completed write. hyper's own `header_read_timeout` is not used: it starts when the previous
//! response ends, so it would be the idle timeout as well.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};

/// The largest request head (request line and headers) read, and the most of a response hyper
/// buffers per connection. hyper's default (~400 KB) times the connection cap would be gigabytes;
/// real heads are a few KiB (AWS SDKs' SigV4 headers and a 3.5 KiB `X-Amz-Client-Context` at
/// most).
pub const MAX_HEAD: usize = 64 * 1024;

/// The listener's limits. `ServerConfig` carries them; `gust serve` flags set them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept (or a later request's first byte) to a complete request head.
    pub header_timeout: Duration,
    /// The longest gap between two reads of a request body, and the grace before
    /// `body_min_rate` applies.
    pub body_timeout: Duration,
    /// Bytes per second a request body must average after `body_timeout` (0: no rate bound).
    pub body_min_rate: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A connection with output pending and no write progress for this long is closed (a
    /// client that stopped reading).
    pub write_timeout: Duration,
    /// Open connections at most (see the module doc for what happens at the cap); None: no cap
    /// (`gust serve` sizes it from the open-file limit).
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_min_rate: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            max_connections: None,
        }
    }
}

/// Counters of the listener, for `GET /_gust/v1/status` now and `/metrics` later.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Newcomers closed at once because every connection was serving a request at the cap.
    pub refused: AtomicU64,
    /// Connections serving no request closed to make room for a newcomer at the cap.
    pub evicted: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub body_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connections closed because their client stopped reading (`write_timeout`).
    pub write_timeouts: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "open": g(&self.open),
            "accepted": g(&self.accepted),
            "refused_at_cap": g(&self.refused),
            "evicted_at_cap": g(&self.evicted),
            "header_timeouts": g(&self.header_timeouts),
            "body_timeouts": g(&self.body_timeouts),
            "idle_timeouts": g(&self.idle_timeouts),
            "write_timeouts": g(&self.write_timeouts),
        })
    }
}

/// The error a request body yields when it does not arrive in time (see `error::BodyError`).
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// What a connection is doing, for its watchdog and the cap.
struct ConnState {
    /// Requests being served (from the parsed head until hyper drops the response body, which
    /// may be before the response is written: see `unflushed`).
    in_flight: u32,
    /// Output is pending: the socket took bytes not flushed since, or refused more. The
    /// connection is busy then, bounded by the write timeout.
    unflushed: bool,
    /// The last write refused bytes (the client is not reading); the watchdog was told.
    blocked: bool,
    /// The last write progress (accept, or bytes taken by the socket).
    last_write: Instant,
    /// When the connection last started to serve nothing (accept, the end of a response, or
    /// the last completed write).
    since: Instant,
    /// When the current request head began (accept for the first request): None while idle
    /// between requests.
    head: Option<Instant>,
    /// Closing: evicted at the cap, or the server stops. Set when.
    closing: Option<Instant>,
}

struct Conn {
    state: Mutex<ConnState>,
    wake: Notify,
}

impl Conn {
    /// The socket took bytes.
    fn wrote(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.last_write = Instant::now();
        s.unflushed = true;
        s.blocked = false;
    }

    /// The socket refused bytes: output is stuck until the client reads. The watchdog learns
    /// once per stall (not per write: it rechecks the state whenever it wakes).
    fn write_blocked(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.unflushed {
            // Nothing was pending (the kernel took all before): the stall clock starts now,
            // not at the last write, which may be long ago.
            s.last_write = Instant::now();
            s.unflushed = true;
        }
        if !s.blocked {
            s.blocked = true;
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Everything written is flushed: the idle clock, and the header clock of a request whose
    /// first bytes came while output was pending, start now. Both deadlines only move later,
    /// so the watchdog needs no wake-up.
    fn flushed(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.unflushed {
            let now = Instant::now();
            s.unflushed = false;
            s.blocked = false;
            s.since = now;
            if let Some(h) = s.head.as_mut() {
                *h = now;
            }
        }
    }

    /// Whether the cap may close this connection: it serves no request and has nothing left
    /// to write.
    fn evictable(s: &ConnState) -> bool {
        s.in_flight == 0 && !s.unflushed && s.closing.is_none()
    }

    fn update(&self, f: impl FnOnce(&mut ConnState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.wake.notify_one();
    }

    fn close(&self) {
        self.update(|s| {
            s.closing.get_or_insert_with(Instant::now);
        });
    }
}

/// Why a connection's watchdog ends it.
enum Close {
    /// Drop the connection now: nothing of a response is pending.
    Now,
    /// Let hyper finish the current response (if any), then close.
    Graceful,
}

/// Waits until the connection must be closed, and says how.
async fn watchdog(conn: &Conn, limits: &Limits, stats: &Stats, graceful_sent: bool) -> Close {
    /// A connection asked to close gets this long to flush what it has.
    const FLUSH: Duration = Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let (deadline, counter) = {
            let s = conn.state.lock().unwrap_or_else(|e| e.into_inner());
            let stalled = s.last_write + limits.write_timeout;
            if let Some(at) = s.closing {
                if s.in_flight == 0 && !s.unflushed && s.head.is_some() {
                    return Close::Now;
                }
                if !graceful_sent {
                    return Close::Graceful;
                }
                // hyper closes after the response in flight; bound the flush of the last one.
                if s.unflushed {
                    (Some(stalled), Some(&stats.write_timeouts))
                } else if s.in_flight > 0 {
                    (None, None)
                } else {
                    (Some(at.max(s.since) + FLUSH), None)
                }
            } else if s.unflushed {
                (Some(stalled), Some(&stats.write_timeouts))
            } else if s.in_flight > 0 {
                (None, None)
            } else if let Some(h) = s.head {
                (
                    Some(h + limits.header_timeout),
                    Some(&stats.header_timeouts),
                )
            } else {
                (
                    Some(s.since + limits.idle_timeout),
                    Some(&stats.idle_timeouts),
                )
            }
        };
        match deadline {
            Some(at) if at <= now => {
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                return Close::Now;
            }
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = conn.wake.notified() => {}
                }
            }
            None => conn.wake.notified().await,
        }
    }
}

/// The socket, watched: the first byte of a request head starts the header timeout.
struct WatchedIo {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut s = self.conn.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.in_flight == 0 && s.head.is_none() {
                s.head = Some(Instant::now());
                drop(s);
                self.conn.wake.notify_one();
            }
        }
        r
    }
}

impl WatchedIo {
    /// hyper writes all it holds and then flushes (`Buffered::poll_flush`), so a flush that
    /// succeeds means nothing of a response is left but what the kernel holds.
    fn watch_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.conn.wrote(),
            Poll::Pending => self.conn.write_blocked(),
            _ => {}
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.conn.flushed();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One request being served: counted from the parsed head until hyper drops the response body
/// (or the handler's future, if the connection goes first).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn begin(conn: Arc<Conn>) -> InFlight {
        conn.update(|s| {
            s.in_flight += 1;
            s.head = None;
        });
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.since = Instant::now();
            }
        });
    }
}

/// A response body that keeps its request counted as in flight until hyper is done with it.
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

const BODY_OK: u8 = 0;
const BODY_TIMED_OUT: u8 = 1;
const BODY_MALFORMED: u8 = 2;

/// A request body that must arrive in time (module doc, 3). What went wrong is also left in
/// `outcome`, so the response is 408/400 whatever the handler made of the error.
struct TimedBody {
    inner: Incoming,
    started: Instant,
    last_data: Instant,
    received: u64,
    timeout: Duration,
    min_rate: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    outcome: Arc<AtomicU8>,
}

impl TimedBody {
    fn deadline(&self) -> Instant {
        let stall = self.last_data + self.timeout;
        if self.min_rate == 0 {
            return stall;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        stall.min(self.started + self.timeout + earned)
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        match self.outcome.load(Ordering::Relaxed) {
            BODY_TIMED_OUT => return Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            BODY_MALFORMED => return Poll::Ready(None),
            _ => {}
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.received += d.len() as u64;
                    self.last_data = Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.outcome.store(BODY_MALFORMED, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = self.deadline();
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    self.outcome.store(BODY_TIMED_OUT, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets requests
/// in flight finish, closes idle connections and returns when every connection is gone.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let conns: Arc<Mutex<HashMap<u64, Arc<Conn>>>> = Arc::default();
    // Every connection task holds a receiver; `closed()` tells when the last one ended.
    let (done_tx, done_rx) = watch::channel(());
    let mut warn = CapWarning::default();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if !make_room(
            &conns,
            limits.max_connections.unwrap_or(usize::MAX),
            &stats,
            &mut warn,
        ) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let now = Instant::now();
        let conn = Arc::new(Conn {
            state: Mutex::new(ConnState {
                in_flight: 0,
                unflushed: false,
                blocked: false,
                last_write: now,
                since: now,
                head: Some(now),
                closing: None,
            }),
            wake: Notify::new(),
        });
        {
            let mut map = conns.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(id, conn.clone());
            stats.open.store(map.len() as u64, Ordering::Relaxed);
        }
        tokio::spawn(connection(
            stream,
            peer,
            id,
            conn,
            router.clone(),
            limits.clone(),
            stats.clone(),
            conns.clone(),
            done_rx.clone(),
        ));
    }
    drop(listener);
    for c in conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
        c.close();
    }
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// At the cap: closes the connections serving no request that have been so the longest (a
/// 64th of the cap at a time, so a flood does not rescan every connection per accept). False
/// when there is none: the newcomer is refused.
fn make_room(
    conns: &Mutex<HashMap<u64, Arc<Conn>>>,
    max: usize,
    stats: &Stats,
    warn: &mut CapWarning,
) -> bool {
    let mut map = conns.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() < max.max(1) {
        return true;
    }
    let mut idle: Vec<(Instant, u64)> = map
        .iter()
        .filter_map(|(id, c)| {
            let s = c.state.lock().unwrap_or_else(|e| e.into_inner());
            Conn::evictable(&s).then(|| (s.head.unwrap_or(s.since), *id))
        })
        .collect();
    if idle.is_empty() {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        warn.note(0, 1, max);
        return false;
    }
    let n = (max / 64).clamp(1, idle.len());
    idle.select_nth_unstable(n - 1);
    for (_, id) in &idle[..n] {
        if let Some(c) = map.remove(id) {
            c.close();
        }
    }
    stats.open.store(map.len() as u64, Ordering::Relaxed);
    stats.evicted.fetch_add(n as u64, Ordering::Relaxed);
    warn.note(n as u64, 0, max);
    true
}

/// One WARN line per 10 s at most about the cap, with what happened since the last one.
#[derive(Default)]
struct CapWarning {
    last: Option<Instant>,
    evicted: u64,
    refused: u64,
}

impl CapWarning {
    fn note(&mut self, evicted: u64, refused: u64, max: usize) {
        self.evicted += evicted;
        self.refused += refused;
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + Duration::from_secs(10)) {
            return;
        }
        self.last = Some(now);
        tracing::warn!(
            "connection cap reached ({max} open, --max-connections / GUST_MAX_CONNECTIONS): \
             closed {} idle connection(s) and refused {} new one(s) since the last report",
            self.evicted,
            self.refused
        );
        self.evicted = 0;
        self.refused = 0;
    }
}

/// Accept errors logged: at most 3 lines per 10 s per kind of error, with the count of the
/// others (an EMFILE storm repeats ten times a second for as long as it lasts).
static ACCEPT_ERRORS: gust_core::lograte::LogLimiter =
    gust_core::lograte::LogLimiter::new(10_000, 3);

async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    // EMFILE/ENFILE: wait for descriptors to come back rather than spin.
    if let Some(line) = accept_error_line(&e) {
        tracing::error!("{line}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The line to log for an accept error, or None when too many of its kind were logged lately.
fn accept_error_line(e: &io::Error) -> Option<String> {
    let key = match e.raw_os_error() {
        Some(n) => format!("errno {n}"),
        None => format!("{:?}", e.kind()),
    };
    ACCEPT_ERRORS
        .check(&key, gust_core::now_ms())
        .map(|r| format!("accept: {e}{r}"))
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    conn: Arc<Conn>,
    router: Router,
    limits: Arc<Limits>,
    stats: Arc<Stats>,
    conns: Arc<Mutex<HashMap<u64, Arc<Conn>>>>,
    _done: watch::Receiver<()>,
) {
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        conn: conn.clone(),
    });
    let service = {
        let conn = conn.clone();
        let limits = limits.clone();
        let stats = stats.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = InFlight::begin(conn.clone());
            let outcome = Arc::new(AtomicU8::new(BODY_OK));
            let now = Instant::now();
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            let body = Body::new(TimedBody {
                inner: body,
                started: now,
                last_data: now,
                received: 0,
                timeout: limits.body_timeout,
                min_rate: limits.body_min_rate,
                sleep: None,
                outcome: outcome.clone(),
            });
            let path = parts.uri.path().to_string();
            parts.extensions.insert(FullPath(path.clone()));
            let fut = tower::ServiceExt::oneshot(router.clone(), Request::from_parts(parts, body));
            let stats = stats.clone();
            async move {
                let resp = fut.await.unwrap_or_else(|e| match e {});
                let resp = match outcome.load(Ordering::Relaxed) {
                    BODY_OK => resp,
                    failed => {
                        let e = if failed == BODY_TIMED_OUT {
                            stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
                            crate::error::BodyError::TimedOut
                        } else {
                            crate::error::BodyError::Malformed
                        };
                        let mut r = crate::error::body_error(&path, &e);
                        r.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        r
                    }
                };
                Ok::<_, std::convert::Infallible>(resp.map(|b| Guarded {
                    inner: b,
                    _guard: guard,
                }))
            }
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // The head's bound exactly (431), and hyper's buffers near it: a read may overshoot
        // `max_buf_size` up to the buffer's capacity, so it alone lets ~2x through.
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_HEAD)
        .serve_connection(io, service);
    tokio::pin!(http);
    let mut graceful_sent = false;
    loop {
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection from {peer}: {e}");
                }
                break;
            }
            why = watchdog(&conn, &limits, &stats, graceful_sent) => match why {
                Close::Now => break,
                Close::Graceful => {
                    graceful_sent = true;
                    http.as_mut().graceful_shutdown();
                }
            },
        }
    }
    let mut map = conns.lock().unwrap_or_else(|e| e.into_inner());
    if map.get(&id).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        map.remove(&id);
        stats.open.store(map.len() as u64, Ordering::Relaxed);
    }
}

/// Reads a whole request body up to `limit` bytes, telling a body over the limit from one that
/// is malformed or late (`error::BodyError`).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, crate::error::BodyError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(crate::error::BodyError::classify(&*e, limit)),
    }
}

/// The request's path as it arrived (a nested router sees only its own part), which says
/// whose error shape a response takes.
#[derive(Clone)]
struct FullPath(String);

/// A request body read whole, up to `LIMIT` bytes, as an extractor: over the limit, malformed
/// or late, the rejection is the surface's error (`error::body_error`), never axum's plain text.
pub struct BodyBytes<const LIMIT: usize>(pub Bytes);

impl<S: Send + Sync, const LIMIT: usize> axum::extract::FromRequest<S> for BodyBytes<LIMIT> {
    type Rejection = axum::response::Response;

    async fn from_request(req: Request<Body>, _: &S) -> Result<Self, Self::Rejection> {
        let path = match req.extensions().get::<FullPath>() {
            Some(p) => p.0.clone(),
            None => req.uri().path().to_string(),
        };
        read_body(req.into_body(), LIMIT)
            .await
            .map(BodyBytes)
            .map_err(|e| crate::error::body_error(&path, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emfile_storm_logs_a_few_lines_not_one_per_accept() {
        // EMFILE and ENOBUFS on Linux (the gateway does not depend on libc).
        let emfile = || io::Error::from_raw_os_error(24);
        let logged = (0..1000)
            .filter_map(|_| accept_error_line(&emfile()))
            .count();
        assert!((1..=3).contains(&logged), "{logged} lines for 1000 EMFILEs");
        // Another kind of error has its own budget.
        assert!(accept_error_line(&io::Error::from_raw_os_error(105)).is_some());
    }
}
