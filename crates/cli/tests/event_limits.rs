//! What an unauthenticated caller can make gust do with events, bounded: where callbacks and URL
//! destinations may go, how much an event source may store (backlog limits, queue retention),
//! that finished events are pruned and the database file shrinks, and that dead letters cannot
//! go round in a cycle. Real server, real HTTP.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gust::server::ServerConfig;
use http::Method;
use serde_json::{Value, json};

macro_rules! limits_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $body.await
        }
    };
}

/// Sleeps `sleep_ms` when asked; logs only ids (payloads here are large).
const FN: &str = r#"
exports.handler = async (event, context) => {
  if (event.Records) {
    console.log("BATCH " + JSON.stringify(event.Records.map((r) => r.messageId)));
    return {};
  }
  let e = event;
  if (typeof event.body === "string") { try { e = JSON.parse(event.body); } catch (_) {} }
  if (e.sleep_ms) await new Promise((r) => setTimeout(r, e.sleep_ms));
  return { ok: true };
};
"#;

fn manifest(extra: &str) -> String {
    format!("[service]\nname = \"lim\"\n{extra}\n")
}

/// A loopback listener that counts the connections it gets (and answers 200).
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            c.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, n)
}

async fn poll<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

limits_test!(
    callbacks_to_local_and_private_addresses_are_refused,
    async {
        let mut ts = TestServer::start_config(|c| ServerConfig {
            allow_callback: Vec::new(),
            ..c
        })
        .await;
        ts.deploy(
            &(manifest("")
                + "[functions.web]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n"),
            &[("index.js", FN)],
        )
        .await;
        let (port, hits) = counting_listener();
        let gust_port = ts.server.as_ref().unwrap().addr.port();
        let mut urls: Vec<String> = [
            "127.0.0.1",
            "localhost",
            "LocalHost",
            "0.0.0.0",
            "0",
            "2130706433",
            "127.1",
            "0x7f.1",
            "0x7f000001",
            "0177.0.0.1",
            "017700000001",
            "[::1]",
            "[::]",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "127.0.0.1.",
            "localhost.",
        ]
        .iter()
        .map(|h| format!("http://{h}:{port}/hook"))
        .collect();
        urls.extend([
            format!("http://127.0.0.1:{gust_port}/_gust/v1/services"),
            "http://127.0.0.1:5432/".into(),
            "http://127.0.0.1:6379/".into(),
            "http://169.254.169.254/latest/meta-data/".into(),
            "http://10.0.0.1/".into(),
            "http://172.16.0.1/".into(),
            "http://192.168.1.1/".into(),
            "http://100.64.0.1/".into(),
            "http://[fd00::1]/".into(),
            "http://[fe80::1]/".into(),
            "http://224.0.0.1/".into(),
        ]);
        for ip in gust_events::outbound::host_addresses() {
            match ip {
                IpAddr::V4(v4) => urls.push(format!("http://{v4}:{port}/")),
                IpAddr::V6(v6) if v6.segments()[0] != 0xfe80 => {
                    urls.push(format!("http://[{v6}]:{port}/"))
                }
                IpAddr::V6(_) => {}
            }
        }
        for url in &urls {
            let r = ts
                .anon
                .request(
                    Method::POST,
                    "/async/fn/web/x",
                    &[("x-callback-url", url)],
                    bytes::Bytes::from_static(b"{}"),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 400, "{url}: {}", String::from_utf8_lossy(&r.body));
            let v = body_json(&r);
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.starts_with("X-Callback-Url"), "{url}: {msg}");
            assert_eq!(v["error"]["code"], "BadRequest");
            // An unauthenticated caller is told the name did not resolve (some resolvers do not
            // read `127.0.0.1.`), but never where a name points.
            if !msg.contains("gust's own API") && !msg.contains("cannot resolve") {
                assert_eq!(msg, gust_events::outbound::NOT_ALLOWED, "{url}");
            }
        }
        // Nothing was stored, so nothing can be delivered: the listener got no connection.
        let d = ts.describe("web").await;
        assert_eq!(d["events"]["queued"], 0, "{d}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        // The operator allows the listener's address: the callback comes.
        ts.restart_config(|c| ServerConfig {
            allow_callback: vec!["127.0.0.0/8".into()],
            ..c
        })
        .await;
        let r = ts
            .anon
            .request(
                Method::POST,
                "/async/fn/web/x",
                &[("x-callback-url", &format!("http://127.1:{port}/hook"))],
                bytes::Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let got = poll(Duration::from_secs(10), async || {
            (hits.load(Ordering::SeqCst) > 0).then_some(())
        })
        .await;
        assert!(got.is_some(), "the allowed callback never came");
        // gust's own API stays refused, whatever the allow list says.
        let own = format!(
            "http://127.0.0.1:{}/q/x",
            ts.server.as_ref().unwrap().addr.port()
        );
        let r = ts
            .anon
            .request(
                Method::POST,
                "/async/fn/web/x",
                &[("x-callback-url", &own)],
                bytes::Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400);
        assert!(String::from_utf8_lossy(&r.body).contains("gust's own API"));
    }
);

limits_test!(
    url_destinations_are_checked_at_deploy_and_again_at_delivery,
    async {
        // The tests' default allows 127.0.0.1 only.
        let mut ts = TestServer::start().await;
        let gust = ts.url();
        for (dest, why) in [
            ("http://169.254.169.254/x", "link-local"),
            ("http://10.0.0.5/hook", "private"),
            ("http://[::1]:1/hook", "loopback"),
            (&format!("{gust}/_gust/v1/services"), "gust's own API"),
        ] {
            let m = manifest("")
                + &format!(
                    "[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.f.async]\non_success = \"{dest}\"\n"
                );
            let dir = write_service(&m, &[("index.js", FN)]);
            let e = ts.deploy_dir(dir.path()).await.unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains("on_success") && e.contains(why), "{dest}: {e}");
        }
        // Allowed at deploy; then the server restarts without the allow list: the delivery is
        // refused, logged and recorded on the event, and nothing is sent.
        let (port, hits) = counting_listener();
        let m = manifest("")
            + &format!(
                "[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.f.async]\non_success = \"http://127.0.0.1:{port}/done\"\n"
            );
        ts.deploy(&m, &[("index.js", FN)]).await;
        ts.restart_config(|c| ServerConfig {
            allow_callback: Vec::new(),
            ..c
        })
        .await;
        let r = ts
            .invoke_with("f", "{}", &[("x-amz-invocation-type", "Event")])
            .await;
        assert_eq!(r.status, 202);
        let id = r.headers["x-amzn-requestid"].to_str().unwrap().to_string();
        let ev = poll(Duration::from_secs(15), async || {
            let v = ts
                .admin_json(Method::GET, &format!("/_gust/v1/events/{id}"), Value::Null)
                .await;
            v["attributes"]["destination_error"]
                .is_string()
                .then_some(v)
        })
        .await
        .expect("the refused delivery is recorded");
        assert_eq!(ev["state"], "succeeded");
        let why = ev["attributes"]["destination_error"].as_str().unwrap();
        assert!(why.contains("loopback"), "{why}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
);

limits_test!(
    a_full_async_backlog_answers_429_and_what_was_accepted_runs,
    async {
        let mut ts = TestServer::start().await;
        let m = manifest("")
            + "[functions.slow]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.slow.scaling]\nmax_instances = 1\n[functions.slow.async]\nmax_backlog = 5\n";
        ts.deploy(&m, &[("index.js", FN)]).await;
        // 30 at once: the check and the insert are one step in the writer, so exactly 5 pass
        // (none finishes during the burst: each sleeps a second).
        let url = ts.url();
        let mut sends = Vec::new();
        for i in 0..30 {
            let c = gust::client::Client::new(&url, None);
            sends.push(tokio::spawn(async move {
                c.request(
                    Method::POST,
                    "/2015-03-31/functions/slow/invocations",
                    &[("x-amz-invocation-type", "Event")],
                    bytes::Bytes::from(json!({"sleep_ms": 1000, "i": i}).to_string()),
                )
                .await
                .unwrap()
            }));
        }
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for s in sends {
            let r = s.await.unwrap();
            match r.status.as_u16() {
                202 => accepted.push(r.headers["x-amzn-requestid"].to_str().unwrap().to_string()),
                429 => refused.push(r),
                other => panic!("{other}: {}", String::from_utf8_lossy(&r.body)),
            }
        }
        assert_eq!(accepted.len(), 5, "accepted {accepted:?}");
        // Lambda's throttling shape, naming the limit.
        let r = &refused[0];
        assert_eq!(r.headers["x-amzn-errortype"], "TooManyRequestsException");
        assert!(r.headers.contains_key("retry-after"));
        let v = body_json(r);
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("max_backlog = 5"), "{msg}");
        assert!(v["Reason"].is_string(), "{v}");
        // /async/fn: the JSON error shape.
        let r = ts
            .anon
            .request(
                Method::POST,
                "/async/fn/slow",
                &[],
                bytes::Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 429);
        let v = body_json(&r);
        assert_eq!(v["error"]["code"], "TooManyRequests");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_backlog = 5")
        );
        // Everything accepted runs.
        for id in &accepted {
            let done = poll(Duration::from_secs(30), async || {
                let v = ts
                    .admin_json(Method::GET, &format!("/_gust/v1/events/{id}"), Value::Null)
                    .await;
                (v["state"] == "succeeded").then_some(())
            })
            .await;
            assert!(done.is_some(), "{id} never ran");
        }
        // Drained: accepted again.
        let r = ts
            .invoke_with("slow", "{}", &[("x-amz-invocation-type", "Event")])
            .await;
        assert_eq!(r.status, 202);
    }
);

limits_test!(
    a_queue_past_its_byte_limit_answers_429_and_keeps_what_it_took,
    async {
        let mut ts = TestServer::start().await;
        let queue = "[queues.big]\nmax_backlog_mb = 1\n";
        ts.deploy(
            &(manifest(queue)
                + "[functions.idle]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n"),
            &[("index.js", FN)],
        )
        .await;
        let body = "x".repeat(300_000);
        let send = || async {
            ts.anon
                .request(
                    Method::POST,
                    "/q/big",
                    &[],
                    bytes::Bytes::from(body.clone()),
                )
                .await
                .unwrap()
        };
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = send().await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            ids.push(body_json(&r)["id"].as_str().unwrap().to_string());
        }
        let r = send().await;
        assert_eq!(r.status, 429);
        assert!(r.headers.contains_key("retry-after"));
        let v = body_json(&r);
        assert_eq!(v["error"]["code"], "TooManyRequests");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("max_backlog_mb = 1") && msg.contains("[queues.big]"),
            "{msg}"
        );
        // A consumer comes: every accepted message is delivered, and the queue takes more.
        ts.deploy(
            &(manifest(queue)
                + "[functions.idle]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[[functions.idle.subscriptions]]\nqueue = \"big\"\n"),
            &[("index.js", FN)],
        )
        .await;
        let lines = ts
            .wait_logs("idle", Duration::from_secs(15), |l| {
                ids.iter().all(|id| l.iter().any(|x| x.contains(id)))
            })
            .await;
        for id in &ids {
            assert!(lines.iter().any(|l| l.contains(id)), "{id} not delivered");
        }
        let again = poll(Duration::from_secs(10), async || {
            let r = ts
                .anon
                .request(
                    Method::POST,
                    "/q/big",
                    &[],
                    bytes::Bytes::from(body.clone()),
                )
                .await
                .unwrap();
            (r.status == 200).then_some(())
        })
        .await;
        assert!(again.is_some());
    }
);

limits_test!(expired_queue_messages_are_removed, async {
    let mut ts = TestServer::start_config(|c| ServerConfig {
        prune_every: Duration::from_millis(200),
        ..c
    })
    .await;
    ts.deploy(
        &(manifest("[queues.short]\nretention = 1\n[queues.long]\n")
            + "[functions.idle]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n"),
        &[("index.js", FN)],
    )
    .await;
    let mut ids = Vec::new();
    for q in ["short", "short", "long"] {
        let r = ts
            .anon
            .request(
                Method::POST,
                &format!("/q/{q}"),
                &[],
                bytes::Bytes::from_static(b"m"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        ids.push(body_json(&r)["id"].as_str().unwrap().to_string());
    }
    let gone = poll(Duration::from_secs(10), async || {
        let mut left = 0;
        for id in &ids[..2] {
            let r = ts
                .admin_raw(
                    Method::GET,
                    &format!("/_gust/v1/events/{id}"),
                    String::new(),
                )
                .await;
            if r.status != 404 {
                left += 1;
            }
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "expired messages are still stored");
    let v = ts
        .admin_json(Method::GET, "/_gust/v1/queues", Value::Null)
        .await;
    let depth = |name: &str| {
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .unwrap()["depth"]
            .clone()
    };
    assert_eq!((depth("short"), depth("long")), (json!(0), json!(1)), "{v}");
});

limits_test!(pruning_finished_events_shrinks_the_database, async {
    let mut ts = TestServer::start_config(|c| ServerConfig {
        event_retention: Duration::ZERO,
        prune_every: Duration::from_millis(200),
        ..c
    })
    .await;
    // One instance, 100 ms per event: the backlog builds up while the events are sent.
    ts.deploy(
        &(manifest("")
            + "[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.f.scaling]\nmax_instances = 1\n"),
        &[("index.js", FN)],
    )
    .await;
    let db = ts.data.path().join("gust.db");
    let size = || {
        let f = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        f(&db) + f(&db.with_extension("db-wal"))
    };
    let payload = json!({"sleep_ms": 100, "pad": "x".repeat(256 * 1024)}).to_string();
    let mut ids = Vec::new();
    let mut peak = 0;
    for _ in 0..32 {
        let r = ts
            .invoke_with("f", &payload, &[("x-amz-invocation-type", "Event")])
            .await;
        assert_eq!(r.status, 202);
        ids.push(r.headers["x-amzn-requestid"].to_str().unwrap().to_string());
        peak = peak.max(size());
    }
    assert!(
        peak > 6 << 20,
        "32 × 256 KB sent: {peak} bytes stored at most"
    );
    // Every event runs, is pruned, and the file gives the space back.
    let small = poll(Duration::from_secs(30), async || {
        for id in &ids {
            let r = ts
                .admin_raw(
                    Method::GET,
                    &format!("/_gust/v1/events/{id}"),
                    String::new(),
                )
                .await;
            if r.status != 404 {
                return None;
            }
        }
        (size() < 3 << 20).then_some(())
    })
    .await;
    assert!(small.is_some(), "peak {peak} bytes, now {}", size());
});

limits_test!(dead_letter_queue_cycles_are_refused_at_deploy, async {
    let ts = TestServer::start().await;
    let f = "[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n";
    let refused = async |m: String| {
        let dir = write_service(&m, &[("index.js", FN)]);
        format!("{:#}", ts.deploy_dir(dir.path()).await.unwrap_err())
    };
    let e = refused(
        manifest("[queues.a]\ndead_letter_queue = \"b\"\n[queues.b]\ndead_letter_queue = \"a\"\n")
            + f,
    )
    .await;
    assert!(e.contains("a → b → a is a cycle"), "{e}");
    let e = refused(
        manifest("[queues.a]\ndead_letter_queue = \"b\"\n[queues.b]\ndead_letter_queue = \"c\"\n[queues.c]\ndead_letter_queue = \"a\"\n")
            + f,
    )
    .await;
    assert!(e.contains("a → b → c → a is a cycle"), "{e}");
    // Across services: w (other) ← x (this) ← w would close the loop.
    let other = |dlq: &str| {
        format!(
            "[service]\nname = \"other\"\n[queues.w]\n{dlq}\n{}",
            f.replace("functions.f", "functions.g")
        )
    };
    let dir = write_service(&other(""), &[("index.js", FN)]);
    ts.deploy_dir(dir.path()).await.unwrap();
    let dir = write_service(
        &(manifest("[queues.x]\ndead_letter_queue = \"w\"\n") + f),
        &[("index.js", FN)],
    );
    ts.deploy_dir(dir.path()).await.unwrap();
    let e = refused(other("dead_letter_queue = \"x\"")).await;
    assert!(e.contains("w → x → w is a cycle"), "{e}");
});

limits_test!(function_destination_cycles_are_refused_at_deploy, async {
    let ts = TestServer::start().await;
    let func = |name: &str, async_cfg: &str| {
        format!(
            "[functions.{name}]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.{name}.async]\n{async_cfg}\n"
        )
    };
    let refused = async |m: String| {
        let dir = write_service(&m, &[("index.js", FN)]);
        format!("{:#}", ts.deploy_dir(dir.path()).await.unwrap_err())
    };
    let e = refused(manifest("") + &func("a", "on_success = \"function:a\"")).await;
    assert!(e.contains("a → a is a cycle"), "{e}");
    let e = refused(
        manifest("")
            + &func("a", "on_success = \"function:b\"")
            + &func("b", "on_failure = \"function:a\""),
    )
    .await;
    assert!(e.contains("a → b → a is a cycle"), "{e}");
    // A chain that ends deploys.
    let dir = write_service(
        &(manifest("")
            + &func("a", "on_success = \"function:b\"")
            + &func("b", "on_failure = \"function:c\"")
            + &func("c", "")),
        &[("index.js", FN)],
    );
    ts.deploy_dir(dir.path()).await.unwrap();
});
