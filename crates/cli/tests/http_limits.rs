//! The HTTP listener's limits (docs/security.md, "HTTP listener limits"), over real TCP: slow
//! heads, slow and short bodies, idle keep-alive connections, a flood of connections beyond the
//! cap, the open-file limit of a real `gust serve`, and the error shapes of unreadable bodies.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, TempDir, TestServer, listening_url, manifest};
use gust::server::ServerConfig;
use gust_gateway::listener::Limits;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER: Duration = Duration::from_millis(1500);
const BODY: Duration = Duration::from_millis(1500);
const IDLE: Duration = Duration::from_secs(3);
const WRITE: Duration = Duration::from_secs(2);
/// How late a close may come after its timeout on a loaded test machine.
const SLACK: Duration = Duration::from_millis(1500);

async fn start(max_connections: Option<usize>) -> TestServer {
    start_limits(|l| Limits {
        max_connections,
        ..l
    })
    .await
}

/// A server with the short timeouts above, changed by `f`.
async fn start_limits(f: impl FnOnce(Limits) -> Limits) -> TestServer {
    TestServer::start_config(|c| ServerConfig {
        http: f(Limits {
            header_timeout: HEADER,
            body_timeout: BODY,
            idle_timeout: IDLE,
            write_timeout: WRITE,
            ..Limits::default()
        }),
        ..c
    })
    .await
}

fn addr(ts: &TestServer) -> SocketAddr {
    ts.server.as_ref().unwrap().addr
}

/// Reads until the peer closes (EOF or reset) or `limit` passes; returns what was read and
/// whether it closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// One response parsed from the front of `raw`: status, lower-case headers, body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "{} not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn parse(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = raw.get(end + 4..end + 4 + len)?.to_vec();
    Some(Resp {
        status,
        headers,
        body,
    })
}

/// Reads one whole response (headers and a Content-Length body) or panics after `limit`.
async fn read_response(s: &mut TcpStream, limit: Duration) -> Resp {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(r) = parse(&out) {
            return r;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!(
                "no response within {limit:?}: {}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => panic!(
                "connection closed before a whole response: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `req` on a new connection and reads the response.
async fn exchange(addr: SocketAddr, req: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    read_response(&mut s, Duration::from_secs(10)).await
}

#[tokio::test]
async fn a_trickled_request_head_is_cut_at_the_header_timeout() {
    let ts = start(None).await;
    let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
    let t0 = Instant::now();
    let (mut rd, mut wr) = s.split();
    let trickle = async {
        for b in b"GET /_gust/health HTTP/1.1\r\nHost: x\r\n" {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        std::future::pending::<()>().await
    };
    let mut buf = [0u8; 1024];
    let closed = tokio::select! {
        _ = trickle => false,
        r = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)) => {
            matches!(r, Ok(Ok(0)) | Ok(Err(_)))
        }
    };
    let took = t0.elapsed();
    assert!(closed, "a trickled head was not cut (after {took:?})");
    assert!(
        took >= HEADER - Duration::from_millis(100) && took <= HEADER + SLACK,
        "closed after {took:?}; the header timeout is {HEADER:?}"
    );
    assert!(
        ts.server.as_ref().unwrap().http_stats().snapshot()["header_timeouts"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn a_half_sent_body_gets_408_and_a_closed_connection_at_the_body_timeout() {
    let ts = start(None).await;
    for (path, shape) in [
        ("/q/nosuch", "admin"),
        ("/2015-03-31/functions/nosuch/invocations", "aws"),
        ("/fn/nosuch", "http"),
    ] {
        let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"a\":")
                .as_bytes(),
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        let r = read_response(&mut s, Duration::from_secs(20)).await;
        let took = t0.elapsed();
        assert_eq!(
            r.status,
            408,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            took >= BODY - Duration::from_millis(100) && took <= BODY + SLACK,
            "{path}: 408 after {took:?}; the body timeout is {BODY:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        match shape {
            "admin" => assert_eq!(v["error"]["code"], "RequestTimeout", "{v}"),
            "aws" => assert_eq!(
                r.header("x-amzn-errortype"),
                Some("RequestTimeoutException"),
                "{v}"
            ),
            _ => assert_eq!(v["message"], "Request Timeout", "{v}"),
        }
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
        assert!(closed, "{path}: the connection stays open after the 408");
    }
}

#[tokio::test]
async fn a_slow_but_steady_body_longer_than_the_body_timeout_is_read_whole() {
    let ts = start(None).await;
    let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let n = 6;
    s.write_all(
        format!(
            "POST /q/nosuch HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            chunk.len() * n
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(&chunk).await.unwrap();
    }
    let r = read_response(&mut s, Duration::from_secs(10)).await;
    // Read whole (3 s, twice the body timeout, at 128 KiB/s): the queue is unknown, not late.
    assert!(t0.elapsed() >= 2 * BODY);
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_and_a_long_poll_is_not_cut() {
    let ts = start(None).await;
    let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
    s.write_all(b"GET /_gust/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status, 200);
    let t0 = Instant::now();
    let (_, closed) = read_until_closed(&mut s, IDLE + Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(closed, "an idle keep-alive connection was never closed");
    // Not at the header timeout: idle time between requests is not header time.
    assert!(
        took >= IDLE - Duration::from_millis(100) && took <= IDLE + SLACK,
        "closed after {took:?} idle; the idle timeout is {IDLE:?}"
    );

    // A response that takes longer than every timeout (a log long-poll) is served whole.
    let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
    let token = ts.server.as_ref().unwrap().token.clone();
    s.write_all(
        format!(
            "GET /_gust/v1/functions/nosuch/logs?wait=4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut s, Duration::from_secs(15)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_flood_of_idle_connections_beyond_the_cap_does_not_starve_real_clients() {
    const CAP: usize = 50;
    let mut ts = start(Some(CAP)).await;
    ts.deploy(
        &manifest("capsvc", "capfn", "nodejs", "index.handler", ""),
        &[(
            "index.js",
            "exports.handler = async (e) => ({ pong: e.n ?? 0 });",
        )],
    )
    .await;
    assert_eq!(ts.invoke_ok("capfn", "{}").await["pong"], 0);
    let a = addr(&ts);

    // 65 connections that never send a byte, and 5 keep-alive ones idle after a request.
    let mut flood = Vec::new();
    for _ in 0..65 {
        flood.push(TcpStream::connect(a).await.unwrap());
    }
    for _ in 0..5 {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"GET /_gust/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut s, Duration::from_secs(5)).await.status,
            200
        );
        flood.push(s);
    }

    let mut health = Vec::new();
    let mut invoke = Vec::new();
    for i in 0..3 {
        let t0 = Instant::now();
        let r = exchange(a, b"GET /_gust/health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        health.push(t0.elapsed());
        assert_eq!(r.status, 200);
        let payload = format!("{{\"n\":{}}}", i + 1);
        let t0 = Instant::now();
        let r = exchange(
            a,
            format!(
                "POST /2015-03-31/functions/capfn/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
            .as_bytes(),
        )
        .await;
        invoke.push(t0.elapsed());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["pong"], i + 1);
    }
    let fastest = |v: &[Duration]| v.iter().min().copied().unwrap();
    let slowest = |v: &[Duration]| v.iter().max().copied().unwrap();
    assert!(
        fastest(&health) < Duration::from_millis(100) && slowest(&health) < Duration::from_secs(1),
        "health: {health:?}"
    );
    assert!(
        fastest(&invoke) < Duration::from_millis(100) && slowest(&invoke) < Duration::from_secs(1),
        "invoke: {invoke:?}"
    );

    // The oldest idle connections were closed to make room; the server holds at most the cap.
    let mut closed = 0;
    for s in flood.iter_mut() {
        if read_until_closed(s, Duration::from_millis(20)).await.1 {
            closed += 1;
        }
    }
    assert!(
        closed >= 70 - CAP,
        "only {closed} of 70 idle connections closed"
    );
    let status = ts
        .client
        .admin(http::Method::GET, "/status", bytes::Bytes::new())
        .await
        .unwrap();
    let c = &status["http"]["connections"];
    assert_eq!(status["http"]["max_connections"], CAP, "{status}");
    assert!(c["evicted_at_cap"].as_u64().unwrap() >= 20, "{status}");
    assert!(c["open"].as_u64().unwrap() <= CAP as u64, "{status}");
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_newcomer_is_closed_at_once() {
    const CAP: usize = 8;
    let ts = start(Some(CAP)).await;
    let a = addr(&ts);
    let token = ts.server.as_ref().unwrap().token.clone();
    let mut busy = Vec::new();
    for _ in 0..CAP {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(
            format!(
                "GET /_gust/v1/functions/nosuch/logs?wait=3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        busy.push(s);
    }
    // Every long poll is being served once the server has seen its head.
    let stats = || ts.server.as_ref().unwrap().http_stats().snapshot();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(a).await.unwrap();
        let t0 = Instant::now();
        let (_, closed) = read_until_closed(&mut s, Duration::from_millis(500)).await;
        if closed && stats()["refused_at_cap"].as_u64().unwrap() >= 1 {
            assert!(t0.elapsed() < Duration::from_millis(500));
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {}", stats());
    }
    // The busy ones are served whole.
    for mut s in busy {
        let r = read_response(&mut s, Duration::from_secs(10)).await;
        assert_eq!(r.status, 200);
    }
}

#[test]
fn serve_raises_the_soft_open_file_limit_to_the_hard_one() {
    let data = TempDir::new("nofile");
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .expect("a numeric hard open-file limit");
    assert!(hard > 256, "the hard limit {hard} leaves nothing to raise");
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -S -n 256 && exec \"$0\" serve --listen 127.0.0.1:0 --no-sandbox --prewarm 0",
            env!("CARGO_BIN_EXE_gust"),
        ])
        .env("GUST_DATA_DIR", data.path().join("state"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    listening_url(&mut child);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[3], hard.to_string(), "{line}");
    assert_eq!(f[4], hard.to_string(), "{line}");
}

#[tokio::test]
async fn unreadable_bodies_get_400_in_each_surface_shape() {
    let ts = start(None).await;
    let a = addr(&ts);
    let token = ts.server.as_ref().unwrap().token.clone();
    let auth = format!("Authorization: Bearer {token}\r\n");
    for (path, extra) in [
        ("/q/nosuch", ""),
        ("/async/fn/nosuch", ""),
        ("/2015-03-31/functions/nosuch/invocations", ""),
        ("/fn/nosuch", ""),
        ("/_gust/v1/services", auth.as_str()),
        ("/_gust/v1/queues/nosuch/messages", auth.as_str()),
    ] {
        // A chunk size that is not hex.
        let bad_chunk = exchange(
            a,
            format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").as_bytes(),
        )
        .await;
        // Chunks that end without the last chunk, and a body shorter than its Content-Length:
        // the client stops sending (half-close) and the body can never be whole.
        let mut cut = Vec::new();
        for req in [
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            ),
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 100\r\n\r\n{{\"a\":1}}"
            ),
        ] {
            let mut s = TcpStream::connect(a).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            cut.push(read_response(&mut s, Duration::from_secs(10)).await);
        }
        for r in std::iter::once(bad_chunk).chain(cut) {
            assert_eq!(
                r.status,
                400,
                "{path}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
            let v = r.json();
            if path.starts_with("/2015-03-31/") {
                assert_eq!(
                    r.header("x-amzn-errortype"),
                    Some("InvalidRequestContentException")
                );
                assert_eq!(v["Type"], "User");
            } else if path.starts_with("/fn/") {
                assert_eq!(v["message"], "Bad Request");
            } else {
                assert_eq!(v["error"]["code"], "BadRequest", "{path}: {v}");
            }
        }
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_in_json_from_queues_and_the_admin_api() {
    let ts = start(None).await;
    let a = addr(&ts);
    let token = ts.server.as_ref().unwrap().token.clone();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let big = 3 * 1024 * 1024;
    for (path, extra) in [
        ("/q/nosuch", ""),
        ("/_gust/v1/services", auth.as_str()),
        ("/_gust/v1/queues/nosuch/messages", auth.as_str()),
    ] {
        let mut s = TcpStream::connect(a).await.unwrap();
        let (mut rd, mut wr) = s.split();
        let head =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {big}\r\n\r\n");
        let send = async {
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(&vec![b'x'; big]).await;
            std::future::pending::<()>().await
        };
        let read = async {
            let mut out = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                if let Some(r) = parse(&out) {
                    return r;
                }
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => panic!("{path}: closed: {:?}", String::from_utf8_lossy(&out)),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                _ = send => unreachable!(),
                r = read => r,
            }
        })
        .await
        .expect("a response");
        assert_eq!(r.status, 413, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "PayloadTooLarge", "{path}: {v}");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let ts = start(None).await;
    let token = ts.server.as_ref().unwrap().token.clone();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = exchange(
            addr(&ts),
            format!(
                "GET /_gust/v1/functions HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "{scheme}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    for bad in [
        format!("Basic {token}"),
        format!("Bearer{token}"),
        "bearer".to_string(),
    ] {
        let r = exchange(
            addr(&ts),
            format!("GET /_gust/v1/functions HTTP/1.1\r\nHost: x\r\nAuthorization: {bad}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(r.status, 401, "{bad}");
    }
}

/// A function whose response (a JSON string) is 5.5 MB, near the Invoke API's 6 MB limit.
const BIG: usize = 5_500_000;

async fn start_big(f: impl FnOnce(Limits) -> Limits) -> TestServer {
    let mut ts = start_limits(f).await;
    ts.deploy(
        &manifest("bigsvc", "big", "nodejs", "index.handler", ""),
        &[(
            "index.js",
            &format!("exports.handler = async () => 'x'.repeat({BIG});"),
        )],
    )
    .await;
    ts
}

/// A connection whose receive buffer is small, so the server's writes block as soon as the
/// client stops reading (the kernel's autotuning would otherwise buffer megabytes).
async fn connect_small_window(a: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.connect(a).await.unwrap()
}

const INVOKE_BIG: &[u8] =
    b"POST /2015-03-31/functions/big/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

/// The length of the first response in `raw` (head and Content-Length body), once whole.
fn response_len(raw: &[u8]) -> Option<usize> {
    let r = parse(raw)?;
    let head = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(head + r.body.len())
}

#[tokio::test]
async fn a_long_response_to_a_slow_reader_is_written_whole_and_not_cut_idle_or_evicted() {
    // Idle and header timeouts far shorter than the time the response takes to read.
    const CAP: usize = 6;
    const SHORT_IDLE: Duration = Duration::from_secs(1);
    let ts = start_big(|l| Limits {
        idle_timeout: SHORT_IDLE,
        max_connections: Some(CAP),
        // The kernel may hold megabytes of it: at this pace the socket may take seconds to
        // become writable again (the next test is about the write timeout).
        write_timeout: Duration::from_secs(20),
        ..l
    })
    .await;
    let a = addr(&ts);
    let mut s = connect_small_window(a).await;
    s.write_all(INVOKE_BIG).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("no response")
        .unwrap();
    raw.extend_from_slice(&buf[..n]);
    // hyper has the whole body queued now (and has dropped it). The first bytes of a pipelined
    // request: its header clock must not start while the response is still being written.
    s.write_all(b"GET /_gust/health HTTP/1.1\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut flood = Vec::new();
    let mut rest_sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = loop {
        if let Some(n) = response_len(&raw) {
            break n;
        }
        // Read 16 KiB per 25 ms (640 KB/s): about 8 s for the whole response.
        tokio::time::sleep(Duration::from_millis(25)).await;
        let n = s.read(&mut buf).await.unwrap_or(0);
        assert!(
            n > 0,
            "the response was cut after {} of {BIG} bytes, {:?} into reading it: {}",
            raw.len(),
            t0.elapsed(),
            ts.server.as_ref().unwrap().http_stats().snapshot()
        );
        raw.extend_from_slice(&buf[..n]);
        assert!(Instant::now() < deadline, "read only {} bytes", raw.len());
        if raw.len() > BIG / 4 && flood.is_empty() {
            // Past the cap: the newcomers evict idle connections, never this busy one.
            for _ in 0..CAP + 2 {
                flood.push(TcpStream::connect(a).await.unwrap());
            }
        }
        if raw.len() > BIG / 2 && !rest_sent {
            s.write_all(b"Host: x\r\n\r\n").await.unwrap();
            rest_sent = true;
        }
    };
    assert!(
        t0.elapsed() > SHORT_IDLE + HEADER,
        "read in {:?}: not slower than the timeouts",
        t0.elapsed()
    );
    let r = parse(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BIG + 2, "a JSON string of {BIG} bytes");
    // The pipelined request is served after it.
    let mut rest = raw.split_off(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while parse(&rest).is_none() {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("no response to the pipelined request")
            .unwrap();
        assert!(n > 0, "closed before the pipelined request's response");
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(parse(&rest).unwrap().status, 200);
    let st = ts.server.as_ref().unwrap().http_stats().snapshot();
    assert!(st["evicted_at_cap"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["write_timeouts"], 0, "{st}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_at_the_write_timeout() {
    let ts = start_big(|l| Limits {
        idle_timeout: Duration::from_secs(1),
        ..l
    })
    .await;
    let mut s = connect_small_window(addr(&ts)).await;
    s.write_all(INVOKE_BIG).await.unwrap();
    let t0 = Instant::now();
    let stats = || ts.server.as_ref().unwrap().http_stats().snapshot();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats()["write_timeouts"] == 0 {
        assert!(Instant::now() < deadline, "never closed: {}", stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    // Closed for not reading, not as idle: the last write progress was after the request.
    assert!(
        took >= WRITE,
        "closed after {took:?}; the write timeout is {WRITE:?}"
    );
    let st = stats();
    assert_eq!(st["header_timeouts"], 0, "{st}");
    let (raw, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed);
    assert!(raw.len() < BIG, "{} bytes", raw.len());
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_refused_and_one_of_32_kib_is_served() {
    let ts = start(None).await;
    let head = |size: usize| {
        format!(
            "GET /_gust/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        )
    };
    let r = exchange(addr(&ts), head(32 * 1024).as_bytes()).await;
    assert_eq!(r.status, 200);

    let mut s = TcpStream::connect(addr(&ts)).await.unwrap();
    // The server may close before it has read all of it.
    let _ = s.write_all(head(80 * 1024).as_bytes()).await;
    let (raw, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "an oversized head was not refused");
    if let Some(r) = parse(&raw) {
        assert_eq!(r.status, 431, "{}", String::from_utf8_lossy(&raw));
    }
}
