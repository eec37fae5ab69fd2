//! A small HTTP client for callbacks and URL destinations (http:// only), and the MD5 the SQS
//! record carries.
//!
//! Every attempt checks the URL again (`Outbound::check`: addresses can change between the
//! request and the delivery) and connects to exactly the address that was checked: one
//! connection per attempt, no pool, no redirects.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::outbound::Outbound;

pub(crate) struct Client {
    outbound: Arc<Outbound>,
}

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
        Client { outbound }
    }

    /// POSTs `body`; retried on connection errors and 5xx.
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
            let target = self.outbound.check(url).await.map_err(PostError::Refused)?;
            let mut req = http::Request::post(target.path.as_str())
                .header(http::header::HOST, target.authority.as_str());
            for (k, v) in &headers {
                req = req.header(*k, v.as_str());
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| PostError::Failed(format!("bad URL {url}: {e}")))?;
            let exchange = async {
                let stream = tokio::net::TcpStream::connect(target.addr)
                    .await
                    .map_err(|e| format!("connect to {}: {e}", target.addr))?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                let conn = tokio::spawn(conn);
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                conn.abort();
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

pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex_lower(&md5::Md5::digest(data))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
