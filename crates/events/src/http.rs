//! A small HTTP client for callbacks and URL destinations (http:// only), and the MD5 the SQS
//! record carries.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Hyper;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub(crate) struct Client {
    inner: Hyper<HttpConnector, Full<Bytes>>,
}

/// Attempts per POST, with a short backoff between them.
const ATTEMPTS: u32 = 3;

impl Client {
    pub(crate) fn new() -> Client {
        Client {
            inner: Hyper::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// POSTs `body`; retried on connection errors and 5xx. Err says why it gave up.
    pub(crate) async fn post(
        &self,
        url: &str,
        headers: Vec<(&str, String)>,
        body: Bytes,
    ) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let mut req = http::Request::post(url);
            for (k, v) in &headers {
                req = req.header(*k, v.as_str());
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| format!("bad URL {url}: {e}"))?;
            // The whole exchange, body included, within the limit.
            let exchange = async {
                let resp = self.inner.request(req).await?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                Ok::<_, hyper_util::client::legacy::Error>(status)
            };
            match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                Ok(Ok(status)) if status.is_server_error() => {
                    last = format!("{url} answered {status}");
                }
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = format!("POST {url}: {e}"),
                Err(_) => last = format!("POST {url}: no complete answer within 10 s"),
            }
        }
        Err(last)
    }
}

pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex_lower(&md5::Md5::digest(data))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
