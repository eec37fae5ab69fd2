//! Async invocations, queues and schedules through the real server: retries with backoff,
//! dead-letter queues, destinations, callbacks, batching, partial batch failures, redrive,
//! purge, schedules across a restart.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::{Value, json};

macro_rules! events_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $body.await
        }
    };
}

/// A Node function for every case here: it logs what it received and fails on request.
const FN: &str = r#"
exports.handler = async (event, context) => {
  if (event.Records) {
    console.log("BATCH " + JSON.stringify(event.Records.map((r) => ({ id: r.messageId, body: r.body, n: r.attributes.ApproximateReceiveCount, attrs: r.messageAttributes, src: r.eventSource, md5: r.md5OfBody }))));
    const failures = event.Records.filter((r) => r.body.startsWith("bad")).map((r) => ({ itemIdentifier: r.messageId }));
    return { batchItemFailures: failures };
  }
  console.log("EVENT " + context.awsRequestId + " " + JSON.stringify(event));
  if (event["detail-type"] === "Scheduled Event") console.log("SLOT " + Date.parse(event.time));
  if (event.fail) throw new Error("asked to fail: " + event.fail);
  if (event.sleep_ms) await new Promise((r) => setTimeout(r, event.sleep_ms));
  if (event.requestContext && event.rawPath) {
    return { statusCode: 201, headers: { "content-type": "text/plain" }, body: "created " + event.rawPath };
  }
  return { ok: true, got: event };
};
"#;

fn service(extra: &str) -> String {
    format!("[service]\nname = \"ev\"\n{extra}\n")
}

fn function(name: &str, extra: &str) -> String {
    format!("\n[functions.{name}]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n{extra}\n")
}

/// Lines of a function's log that start with `tag ` (after the Lambda log prefix).
fn tagged(lines: &[String], tag: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split(&format!("{tag} ")).nth(1).map(str::to_string))
        .collect()
}

async fn invoke_event(ts: &TestServer, name: &str, payload: &str) -> String {
    let r = ts
        .invoke_with(name, payload, &[("x-amz-invocation-type", "Event")])
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.headers["x-amzn-requestid"].to_str().unwrap().to_string()
}

async fn wait_event(ts: &TestServer, id: &str, limit: Duration, state: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = ts
            .admin_json(Method::GET, &format!("/_gust/v1/events/{id}"), Value::Null)
            .await;
        if v["state"] == state || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

events_test!(async_retries_back_off_then_dead_letter, async {
    let mut ts = TestServer::start().await;
    let m = service("[queues.failed]\n")
        + &function(
            "flaky",
            "[functions.flaky.async]\nretries = 2\nretry_backoff_ms = 400\ndead_letter_queue = \"failed\"",
        )
        + &function(
            "reader",
            "[[functions.reader.subscriptions]]\nqueue = \"failed\"",
        );
    ts.deploy(&m, &[("index.js", FN)]).await;
    let id = invoke_event(&ts, "flaky", r#"{"fail":"always"}"#).await;
    let v = wait_event(&ts, &id, Duration::from_secs(15), "dead").await;
    assert_eq!(v["state"], "dead", "{v}");
    assert_eq!(v["attempts"], 3);
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("asked to fail: always"),
        "{v}"
    );
    // Three attempts with the same request id, 400 ms then 800 ms apart (±25 % jitter).
    let logs = ts.logs("flaky").await;
    let starts: Vec<u64> = logs
        .iter()
        .filter(|l| {
            l["line"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("START RequestId: {id}")))
        })
        .map(|l| l["ts_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(starts.len(), 3, "{logs:?}");
    let (g1, g2) = (starts[1] - starts[0], starts[2] - starts[1]);
    assert!((300..1500).contains(&g1), "first retry after {g1} ms");
    assert!((600..2500).contains(&g2), "second retry after {g2} ms");
    // The dead-letter queue got the event with Lambda's DLQ attributes.
    let lines = ts
        .wait_logs("reader", Duration::from_secs(10), |l| {
            !tagged(l, "BATCH").is_empty()
        })
        .await;
    let batch: Value = serde_json::from_str(&tagged(&lines, "BATCH")[0]).unwrap();
    assert_eq!(batch[0]["body"], r#"{"fail":"always"}"#);
    assert_eq!(batch[0]["attrs"]["RequestID"]["stringValue"], id.as_str());
    assert!(
        batch[0]["attrs"]["ErrorMessage"]["stringValue"]
            .as_str()
            .unwrap()
            .contains("asked to fail")
    );
    let d = ts.describe("flaky").await;
    assert_eq!(d["events"]["dead"], 1, "{d}");
    // An unknown id is a clear 404.
    let r = ts
        .admin_raw(Method::GET, "/_gust/v1/events/nope", String::new())
        .await;
    assert_eq!(r.status, 404);
});

events_test!(destinations_receive_lambdas_invocation_record, async {
    let mut ts = TestServer::start().await;
    let m = service("")
        + &function(
            "work",
            "[functions.work.async]\nretries = 0\non_success = \"function:sink\"\non_failure = \"function:sink\"",
        )
        + &function("sink", "");
    ts.deploy(&m, &[("index.js", FN)]).await;
    let ok = invoke_event(&ts, "work", r#"{"n":1}"#).await;
    let bad = invoke_event(&ts, "work", r#"{"fail":"x"}"#).await;
    let lines = ts
        .wait_logs("sink", Duration::from_secs(10), |l| {
            tagged(l, "EVENT").len() >= 2
        })
        .await;
    let records: Vec<Value> = tagged(&lines, "EVENT")
        .iter()
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .collect();
    let find = |id: &str| {
        records
            .iter()
            .find(|r| r["requestContext"]["requestId"] == id)
            .cloned()
            .unwrap()
    };
    let s = find(&ok);
    assert_eq!(s["version"], "1.0");
    assert_eq!(s["requestContext"]["condition"], "Success");
    assert_eq!(s["requestContext"]["approximateInvokeCount"], 1);
    assert!(
        s["requestContext"]["functionArn"]
            .as_str()
            .unwrap()
            .ends_with(":function:work:$LATEST")
    );
    assert_eq!(s["requestPayload"], json!({"n": 1}));
    assert_eq!(s["responseContext"]["statusCode"], 200);
    assert_eq!(s["responsePayload"]["got"], json!({"n": 1}));
    let f = find(&bad);
    assert_eq!(f["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(f["responseContext"]["functionError"], "Unhandled");
    assert!(
        f["responsePayload"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("asked to fail")
    );
});

/// A one-shot HTTP server: records every request's head and body.
/// Requests an `http_sink` received: (head, body).
type Received = Arc<Mutex<Vec<(String, String)>>>;

fn http_sink() -> (String, Received) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            g.lock()
                .unwrap()
                .push((head, String::from_utf8_lossy(&body).into_owned()));
            let _ = (&s)
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

events_test!(async_http_calls_post_their_result_to_the_callback, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&(service("") + &function("web", "")), &[("index.js", FN)])
        .await;
    let (url, got) = http_sink();
    let r = ts
        .anon
        .request(
            Method::POST,
            "/async/fn/web/orders",
            &[("x-callback-url", &format!("{url}/done"))],
            bytes::Bytes::from_static(b"hello"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let id = body_json(&r)["id"].as_str().unwrap().to_string();
    assert_eq!(r.headers["x-call-id"], id.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (head, body) = got.lock().unwrap()[0].clone();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("post /done"), "{head}");
    assert!(head.contains(&format!("x-call-id: {id}")), "{head}");
    assert!(head.contains("x-function-status: 201"), "{head}");
    assert!(head.contains("x-duration-seconds: "), "{head}");
    assert_eq!(body, "created /orders");
    // Unknown functions are refused at enqueue time; https callbacks are refused clearly.
    let r = ts
        .anon
        .request(Method::POST, "/async/fn/nope", &[], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = ts
        .anon
        .request(
            Method::POST,
            "/async/fn/web",
            &[("x-callback-url", "https://x")],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
});

events_test!(
    queues_deliver_batches_of_the_configured_size_and_window,
    async {
        let mut ts = TestServer::start().await;
        let m = service("[queues.jobs]\n")
            + &function(
                "batcher",
                "[[functions.batcher.subscriptions]]\nqueue = \"jobs\"\nbatch_size = 5\nbatch_window = 1\nmax_concurrency = 1",
            );
        ts.deploy(&m, &[("index.js", FN)]).await;
        let msgs: Vec<Value> = (0..12)
        .map(|i| json!({"body": format!("m{i}"), "attributes": {"k": {"stringValue": format!("v{i}"), "dataType": "String"}}}))
        .collect();
        let t = Instant::now();
        let sent = ts
            .admin_json(
                Method::POST,
                "/_gust/v1/queues/jobs/messages",
                json!({ "messages": msgs }),
            )
            .await;
        assert_eq!(sent["ids"].as_array().unwrap().len(), 12);
        let lines = ts
            .wait_logs("batcher", Duration::from_secs(10), |l| {
                tagged(l, "BATCH")
                    .iter()
                    .map(|b| {
                        serde_json::from_str::<Value>(b)
                            .unwrap()
                            .as_array()
                            .unwrap()
                            .len()
                    })
                    .sum::<usize>()
                    >= 12
            })
            .await;
        let done = t.elapsed();
        let batches: Vec<Value> = tagged(&lines, "BATCH")
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        let sizes: Vec<usize> = batches
            .iter()
            .map(|b| b.as_array().unwrap().len())
            .collect();
        assert_eq!(
            sizes,
            vec![5, 5, 2],
            "full batches at once, the rest after the window"
        );
        assert!(
            done >= Duration::from_millis(900),
            "the last batch waited for the window: {done:?}"
        );
        let r = &batches[0][0];
        assert_eq!(r["src"], "aws:sqs");
        assert_eq!(r["n"], "1");
        assert_eq!(r["attrs"]["k"]["stringValue"], "v0");
        assert_eq!(r["md5"], "ced6bfe1f650f6b338594d37eb7850d2"); // md5("m0")
        let mut bodies: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                b.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["body"].as_str().unwrap().to_string())
            })
            .collect();
        bodies.sort();
        assert_eq!(bodies.len(), 12);
        bodies.dedup();
        assert_eq!(bodies.len(), 12, "each message once");
        // Sending to an undeclared queue says how to declare it.
        let r = ts
            .admin_raw(
                Method::POST,
                "/_gust/v1/queues/nope/messages",
                json!({"body": "x"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 404);
        assert!(String::from_utf8_lossy(&r.body).contains("[queues.nope]"));
    }
);

events_test!(
    partial_failures_retry_only_failed_items_then_dead_letter_and_redrive,
    async {
        let mut ts = TestServer::start().await;
        let m = service(
            "[queues.work]\nvisibility_timeout = 1\ndead_letter_queue = \"work-dlq\"\n[queues.work-dlq]\n[queues.idle]\n",
        ) + &function(
            "worker",
            "[[functions.worker.subscriptions]]\nqueue = \"work\"\nbatch_size = 10\nmax_receives = 2",
        );
        ts.deploy(&m, &[("index.js", FN)]).await;
        ts.admin_json(
            Method::POST,
            "/_gust/v1/queues/work/messages",
            json!({"messages": [{"body": "good-1"}, {"body": "bad-1"}, {"body": "good-2"}]}),
        )
        .await;
        async fn stats(ts: &TestServer) -> Vec<Value> {
            let v = ts
                .admin_json(Method::GET, "/_gust/v1/queues", Value::Null)
                .await;
            v["queues"].as_array().unwrap().clone()
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let q = stats(&ts).await;
            let work = q.iter().find(|q| q["name"] == "work").unwrap().clone();
            if work["dlq_size"] == 1 || Instant::now() > deadline {
                assert_eq!(work["dlq_size"], 1, "{q:?}");
                assert_eq!(work["depth"], 0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lines = ts
            .wait_logs("worker", Duration::from_secs(1), |_| false)
            .await;
        let seen: Vec<(String, String)> = tagged(&lines, "BATCH")
            .iter()
            .flat_map(|b| {
                serde_json::from_str::<Value>(b)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .map(|r| {
                (
                    r["body"].as_str().unwrap().to_string(),
                    r["n"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let count = |b: &str| seen.iter().filter(|(x, _)| x == b).count();
        assert_eq!(
            (count("good-1"), count("good-2"), count("bad-1")),
            (1, 1, 2),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("bad-1".to_string(), "2".to_string())),
            "receive count grows: {seen:?}"
        );
        // Redrive sends it back to `work`, where it is received again.
        let v = ts
            .admin_json(
                Method::POST,
                "/_gust/v1/queues/work-dlq/redrive",
                Value::Null,
            )
            .await;
        assert_eq!(v["moved"], 1);
        let lines = ts
            .wait_logs("worker", Duration::from_secs(10), |l| {
                tagged(l, "BATCH")
                    .iter()
                    .filter(|b| b.contains("bad-1"))
                    .count()
                    >= 3
            })
            .await;
        assert!(
            tagged(&lines, "BATCH")
                .iter()
                .filter(|b| b.contains("bad-1"))
                .count()
                >= 3
        );
        // One message id through retries, the dead-letter queue and back.
        let bad_ids: std::collections::HashSet<String> = tagged(&lines, "BATCH")
            .iter()
            .flat_map(|b| {
                serde_json::from_str::<Value>(b)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .filter(|r| r["body"] == "bad-1")
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(bad_ids.len(), 1, "{bad_ids:?}");
        // Purge: a queue nobody consumes.
        ts.admin_json(
            Method::POST,
            "/_gust/v1/queues/idle/messages",
            json!({"messages": [{"body": "a"}, {"body": "b"}]}),
        )
        .await;
        let q = stats(&ts).await;
        let idle = q.iter().find(|q| q["name"] == "idle").unwrap();
        assert_eq!(idle["depth"], 2);
        assert!(idle["oldest_age_ms"].as_u64().is_some());
        let v = ts
            .admin_json(Method::POST, "/_gust/v1/queues/idle/purge", Value::Null)
            .await;
        assert_eq!(v["purged"], 2);
        // The ingest route sends one message.
        let r = ts
            .anon
            .request(
                Method::POST,
                "/q/idle",
                &[],
                bytes::Bytes::from_static(b"hook"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let q = stats(&ts).await;
        assert_eq!(q.iter().find(|q| q["name"] == "idle").unwrap()["depth"], 1);
    }
);

events_test!(a_schedule_fires_once_per_slot_across_a_restart, async {
    let mut ts = TestServer::start().await;
    let m = service("")
        + &function(
            "tick",
            "[[functions.tick.schedules]]\nname = \"every\"\nexpression = \"rate(1 second)\"",
        );
    ts.deploy(&m, &[("index.js", FN)]).await;
    let events = |lines: &[String]| -> Vec<Value> {
        tagged(lines, "EVENT")
            .iter()
            .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
            .collect()
    };
    let lines = ts
        .wait_logs("tick", Duration::from_secs(10), |l| events(l).len() >= 2)
        .await;
    let first = events(&lines);
    assert!(first.len() >= 2);
    assert_eq!(first[0]["detail-type"], "Scheduled Event");
    assert_eq!(first[0]["source"], "aws.events");
    assert!(
        first[0]["resources"][0]
            .as_str()
            .unwrap()
            .ends_with(":rule/tick.every")
    );
    ts.restart().await;
    let lines = ts
        .wait_logs("tick", Duration::from_secs(10), |l| {
            events(l).len() >= first.len() + 2
        })
        .await;
    let all = events(&lines);
    assert!(
        all.len() >= first.len() + 2,
        "it keeps firing after the restart"
    );
    let mut ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no slot fired twice: {all:?}");
    let s = ts
        .admin_json(Method::GET, "/_gust/v1/schedules", Value::Null)
        .await;
    let s = &s["schedules"][0];
    assert_eq!(s["name"], "tick.every");
    assert!(
        s["next"].as_str().is_some() && s["last"].as_str().is_some(),
        "{s}"
    );
    assert_eq!(s["last_outcome"], "succeeded", "{s}");
});

events_test!(overlap_skip_and_missed_run_policies, async {
    let mut ts = TestServer::start().await;
    let m = service("")
        + &function(
            "slow",
            "timeout = 10\n[[functions.slow.schedules]]\nexpression = \"rate(1 second)\"\noverlap = \"skip\"\ninput = { sleep_ms = 2500 }",
        )
        + &function(
            "catchup",
            "[[functions.catchup.schedules]]\nexpression = \"rate(1 second)\"\nmissed = \"run_once\"",
        )
        + &function(
            "skipper",
            "[[functions.skipper.schedules]]\nexpression = \"rate(1 second)\"\nmissed = \"skip\"",
        );
    ts.deploy(&m, &[("index.js", FN)]).await;
    // While a 2.5 s run goes on, the 1 s slots are skipped, and say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut skipped = false;
    while !skipped && Instant::now() < deadline {
        let s = ts
            .admin_json(Method::GET, "/_gust/v1/schedules", Value::Null)
            .await;
        skipped = s["schedules"].as_array().unwrap().iter().any(|s| {
            s["function"] == "slow"
                && s["last_outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("previous run is still running"))
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        skipped,
        "a slot was skipped while the previous run was running"
    );
    // Downtime: about 3 s of missed slots.
    ts.wait_logs("catchup", Duration::from_secs(5), |l| {
        !tagged(l, "SLOT").is_empty()
    })
    .await;
    ts.wait_logs("skipper", Duration::from_secs(5), |l| {
        !tagged(l, "SLOT").is_empty()
    })
    .await;
    ts.stop().await;
    let now_ms = || gust_core::now_ms();
    let stopped = now_ms();
    tokio::time::sleep(Duration::from_secs(3)).await; // the downtime under test
    let restarted = now_ms();
    ts.start_again().await;
    // Events the new server's scheduler created for slots before the restart (a redelivered
    // in-flight event was created before the stop and does not count).
    let catch_ups = |name: &'static str| {
        let ts = &ts;
        async move {
            let lines = ts
                .wait_logs(name, Duration::from_secs(10), |l| {
                    tagged(l, "SLOT")
                        .iter()
                        .any(|t| t.trim().parse::<u64>().unwrap() >= restarted)
                })
                .await;
            let mut n = 0;
            for l in &lines {
                let Some(id) = l
                    .strip_prefix("START RequestId: ")
                    .and_then(|r| r.split(' ').next())
                else {
                    continue;
                };
                let e = ts
                    .admin_json(Method::GET, &format!("/_gust/v1/events/{id}"), Value::Null)
                    .await;
                let created = e["created_ms"].as_u64().unwrap();
                let slot = e["attributes"]["slot_ms"].as_u64().unwrap();
                if created >= restarted
                    && slot < restarted.saturating_sub(100)
                    && slot + 3_000 > stopped
                {
                    n += 1;
                }
            }
            n
        }
    };
    assert_eq!(
        catch_ups("catchup").await,
        1,
        "missed = run_once runs once for the missed slots"
    );
    assert_eq!(
        catch_ups("skipper").await,
        0,
        "missed = skip runs none of them"
    );
});

events_test!(async_work_leaves_instances_for_synchronous_callers, async {
    let mut ts = TestServer::start().await;
    let m = service("")
        + &function(
            "lane",
            "timeout = 10\n[functions.lane.scaling]\nmax_instances = 2\nqueue_length = 0",
        );
    ts.deploy(&m, &[("index.js", FN)]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(invoke_event(&ts, "lane", r#"{"sleep_ms":1500}"#).await);
    }
    ts.wait_for("lane", Duration::from_secs(10), |d| {
        d["instances"]["busy"] == 1
    })
    .await;
    // Async delivery uses one of the two instances (half of max_instances); the other serves
    // synchronous callers at once, while async work is still queued.
    let t = Instant::now();
    let v = ts.invoke_ok("lane", r#"{"n":1}"#).await;
    assert_eq!(v["got"]["n"], 1);
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    let d = ts.describe("lane").await;
    assert!(d["events"]["queued"].as_u64().unwrap() >= 2, "{d}");
    for id in &ids {
        let e = wait_event(&ts, id, Duration::from_secs(15), "succeeded").await;
        assert_eq!(e["state"], "succeeded", "{e}");
    }
});

events_test!(
    throttled_async_attempts_are_retried_without_using_up_retries,
    async {
        let mut ts = TestServer::start().await;
        let m = service("")
            + &function(
                "one",
                "timeout = 10\n[functions.one.scaling]\nmax_instances = 1\nqueue_length = 0\n[functions.one.async]\nretries = 0",
            );
        ts.deploy(&m, &[("index.js", FN)]).await;
        let ts = Arc::new(ts);
        let busy = {
            let ts = ts.clone();
            tokio::spawn(async move { ts.invoke_ok("one", r#"{"sleep_ms":1500}"#).await })
        };
        ts.wait_for("one", Duration::from_secs(10), |d| {
            d["instances"]["busy"] == 1
        })
        .await;
        let id = invoke_event(&ts, "one", r#"{"n":2}"#).await;
        let e = wait_event(&ts, &id, Duration::from_secs(15), "succeeded").await;
        assert_eq!(e["state"], "succeeded", "{e}");
        assert_eq!(e["attempts"], 1, "a throttle is not an attempt: {e}");
        assert!(
            e["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("concurrency"),
            "the throttle is recorded: {e}"
        );
        busy.await.unwrap();
    }
);
