//! Nothing acknowledged is lost: the real `gust` binary under sustained async-invocation and
//! queue load is killed with SIGKILL, started again on the same data dir, and every event that
//! was acknowledged (202 / queue send OK) is processed at least once — counted by id at an HTTP
//! sink the function reports to.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{KillOnDrop, TempDir, host_address, listening_url};
use gust::client::Client;
use http::Method;

const GUST: &str = env!("CARGO_BIN_EXE_gust");

/// The function: reports the ids it processes (its request id, or each message id of a batch).
const RECORDER: &str = r#"
const http = require("http");
const report = (ids) => new Promise((resolve, reject) => {
  const r = http.request(process.env.SINK, { method: "POST" }, (s) => { s.resume(); s.on("end", resolve); });
  r.on("error", reject);
  r.end(ids.join("\n"));
});
exports.handler = async (event, context) => {
  if (event.Records) {
    await report(event.Records.map((r) => r.messageId));
    return {};
  }
  await report([context.awsRequestId]);
  return {};
};
"#;

/// Counts ids POSTed to it (one per line). It listens on the host's own address, which an
/// instance reaches only through `allow_network` (its 127.0.0.1 is its own loopback).
fn sink() -> (String, Arc<Mutex<HashMap<String, u32>>>) {
    let l = std::net::TcpListener::bind((host_address().as_str(), 0)).unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let seen = s2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    {
                        let mut s = seen.lock().unwrap();
                        for id in String::from_utf8_lossy(&body)
                            .lines()
                            .filter(|l| !l.is_empty())
                        {
                            *s.entry(id.to_string()).or_insert(0) += 1;
                        }
                    }
                    if (&conn)
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

fn serve(data: &TempDir) -> (KillOnDrop, String) {
    let mut child = Command::new(GUST)
        .args(["serve", "--listen", "127.0.0.1:0", "--prewarm", "0"])
        .env("GUST_DATA_DIR", data.path())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = listening_url(&mut child);
    (KillOnDrop(child), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let data = TempDir::new("crash");
    let (sink_url, seen) = sink();
    let sink_addr = sink_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let svc = TempDir::new("crash-svc");
    std::fs::write(
        svc.path().join("gust.toml"),
        format!(
            "[service]\nname = \"crash\"\n[queues.load]\nvisibility_timeout = 5\n\
             [functions.rec]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nenvironment = {{ SINK = \"{sink_url}\" }}\nallow_network = [\"{sink_addr}\"]\n\
             [functions.rec.scaling]\nmax_instances = 4\n\
             [[functions.rec.subscriptions]]\nqueue = \"load\"\nbatch_size = 10\n"
        ),
    )
    .unwrap();
    std::fs::write(svc.path().join("index.js"), RECORDER).unwrap();
    let (mut server, url) = serve(&data);
    let token = std::fs::read_to_string(data.path().join("admin-token")).unwrap();
    let admin = Client::new(&url, Some(token.trim().to_string()));
    gust::client::deploy(&admin, svc.path(), |_| {})
        .await
        .unwrap();

    // Sustained load from 4 senders until the server dies under them.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut senders = Vec::new();
    for k in 0..4 {
        let acked = acked.clone();
        let c = Client::new(&url, None);
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                let r = if (k + i) % 2 == 0 {
                    c.request(
                        Method::POST,
                        "/2015-03-31/functions/rec/invocations",
                        &[("x-amz-invocation-type", "Event")],
                        bytes::Bytes::from(format!("{{\"i\":{i}}}")),
                    )
                    .await
                    .ok()
                    .filter(|r| r.status == 202)
                    .and_then(|r| {
                        Some(
                            r.headers
                                .get("x-amzn-requestid")?
                                .to_str()
                                .ok()?
                                .to_string(),
                        )
                    })
                } else {
                    c.request(
                        Method::POST,
                        "/q/load",
                        &[],
                        bytes::Bytes::from(format!("m{i}")),
                    )
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
                    .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
                    .and_then(|v| Some(v["id"].as_str()?.to_string()))
                };
                match r {
                    Some(id) => {
                        acked.lock().unwrap().insert(id);
                    }
                    None => return, // the server is gone
                }
            }
        }));
    }
    // Kill it mid-stream, with events stored, in flight and being processed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (acked.lock().unwrap().len() < 1500 || seen.lock().unwrap().len() < 50)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    for s in senders {
        let _ = s.await;
    }
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    let processed_before = seen.lock().unwrap().len();
    assert!(
        acked.len() >= 1500,
        "load ran: {} acknowledged",
        acked.len()
    );

    let (_server, _url) = serve(&data);
    let deadline = Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let missing: Vec<String> = {
            let s = seen.lock().unwrap();
            acked
                .iter()
                .filter(|id| !s.contains_key(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s = seen.lock().unwrap();
    let duplicates: u32 = s.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {} acknowledged; {} processed before the kill; {} duplicate deliveries after the restart; {} missing",
        acked.len(),
        processed_before,
        duplicates,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but never processed: {:?}",
        &missing[..missing.len().min(10)]
    );
}
