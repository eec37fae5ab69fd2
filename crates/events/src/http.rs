//! A small HTTP client for callbacks and URL destinations (http:// only), and the MD5 the SQS
//! record carries.
//!
//! Every attempt checks the URL again (`Outbound::check`: addresses can change between the
//! request and the delivery) and connects to exactly the address that was checked: one
//! connection per attempt, no pool, no redirects. At most `MAX_POSTS` POSTs are in flight at
//! once (waiting for one counts against the attempt's time), and at most `MAX_ANSWER` bytes of
//! an answer are read: the rest is discarded with the connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::outbound::{Outbound, Refusal};

pub(crate) struct Client {
    outbound: Arc<Outbound>,
    /// POSTs in flight (`MAX_POSTS`).
    posts: Arc<tokio::sync::Semaphore>,
}

/// POSTs in flight at once, over every callback and URL destination.
const MAX_POSTS: usize = 64;
/// How much of an answer's body is read; the status is what counts.
const MAX_ANSWER: usize = 64 << 10;

/// Attempts per POST, with a short backoff between them.
const ATTEMPTS: u32 = 3;
/// The whole exchange of one attempt, connect to the end of the answer's body.
const EXCHANGE: Duration = Duration::from_secs(10);

/// Why a POST gave up.
#[derive(Debug)]
pub(crate) enum PostError {
    /// The destination is not one gust may call (nothing was sent).
    Refused(String),
    /// Every attempt failed.
    Failed(String),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::Refused(m) => write!(f, "refused: {m}"),
            PostError::Failed(m) => f.write_str(m),
        }
    }
}

impl Client {
    pub(crate) fn new(outbound: Arc<Outbound>) -> Client {
        Client {
            outbound,
            posts: Arc::new(tokio::sync::Semaphore::new(MAX_POSTS)),
        }
    }

    /// POSTs `body`; retried on connection errors, 5xx and a host that does not resolve now.
    pub(crate) async fn post(
        &self,
        url: &str,
        headers: Vec<(&str, String)>,
        body: Bytes,
    ) -> Result<(), PostError> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let target = match self.outbound.check(url).await {
                Ok(t) => t,
                Err(e @ Refusal::Forbidden(_)) => {
                    tracing::debug!("POST {url}: {e}");
                    return Err(PostError::Refused(e.to_string()));
                }
                Err(e) if e.temporary() => {
                    last = format!("POST {url}: {e}");
                    continue;
                }
                Err(e) => return Err(PostError::Refused(e.to_string())),
            };
            let mut req = http::Request::post(target.path.as_str())
                .header(http::header::HOST, target.authority.as_str());
            for (k, v) in &headers {
                req = req.header(*k, v.as_str());
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| PostError::Failed(format!("bad URL {url}: {e}")))?;
            let exchange = async {
                let _slot = self
                    .posts
                    .acquire()
                    .await
                    .map_err(|_| "the client is closed".to_string())?;
                let stream = tokio::net::TcpStream::connect(target.addr)
                    .await
                    .map_err(|e| format!("connect to {}: {e}", target.addr))?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                // Aborted however this ends (an error, the timeout dropping this future).
                let _conn = AbortOnDrop(tokio::spawn(conn));
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                drain(resp.into_body(), MAX_ANSWER).await;
                Ok::<_, String>(status)
            };
            match tokio::time::timeout(EXCHANGE, exchange).await {
                Ok(Ok(status)) if status.is_server_error() => {
                    last = format!("{url} answered {status}");
                }
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = format!("POST {url}: {e}"),
                Err(_) => last = format!("POST {url}: no complete answer within 10 s"),
            }
        }
        Err(PostError::Failed(last))
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a body until its end or `limit` bytes, whichever comes first; returns the bytes read.
async fn drain<B: hyper::body::Body<Data = Bytes> + Unpin>(mut body: B, limit: usize) -> usize {
    let mut read = 0;
    while read < limit {
        match body.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
    read
}

pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex_lower(&md5::Md5::digest(data))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A destination that answers 200 and then a body without end: gust reads 64 KiB of it,
    /// drops the connection and counts the POST delivered, long before the attempt's timeout.
    #[tokio::test]
    async fn an_endless_answer_is_read_only_up_to_its_limit() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<usize>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
            let mut sent = 0;
            // Until gust closes the connection.
            while s.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 8192;
                if sent > (256 << 20) {
                    break;
                }
            }
            let _ = gone_tx.send(sent);
        });
        let client = Client::new(Arc::new(Outbound::new(&["127.0.0.1"]).unwrap()));
        let started = Instant::now();
        let r = client
            .post(
                &format!("http://{addr}/hook"),
                vec![],
                Bytes::from_static(b"{}"),
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert!(started.elapsed() < EXCHANGE, "{:?}", started.elapsed());
        let sent = tokio::time::timeout(EXCHANGE, gone_rx)
            .await
            .expect("the connection was closed")
            .unwrap();
        assert!(sent < (256 << 20), "gust kept reading: {sent} bytes");
        assert_eq!(client.posts.available_permits(), MAX_POSTS);
    }

    #[tokio::test]
    async fn drain_reads_a_short_body_to_its_end() {
        let body = Full::new(Bytes::from(vec![0u8; 1000]));
        assert_eq!(drain(body, MAX_ANSWER).await, 1000);
    }
}
