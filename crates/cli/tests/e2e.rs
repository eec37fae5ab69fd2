//! End-to-end tests: the real server on 127.0.0.1:0, real node/python processes, real HTTP.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::Method;
use serde_json::{Value, json};

/// A Node function that reports its instance (the id at the end of its log stream name, which
/// names its sandbox's cgroup) and a global counter, and misbehaves on request.
const PROBE: &str = r#"
let count = 0;
const { spawn } = require("child_process");
exports.handler = async (event, context) => {
  count += 1;
  if (event.sleep_ms) await new Promise((r) => setTimeout(r, event.sleep_ms));
  if (event.spin) {
    if (event.child) spawn("sleep", ["1000"], { stdio: "ignore", detached: true });
    for (;;) {}
  }
  if (event.crash) process.exit(3);
  if (event.throw) throw new TypeError(event.throw);
  if (event.log) console.log(event.log);
  const instance = process.env.AWS_LAMBDA_LOG_STREAM_NAME.split("]")[1];
  return { instance, count, requestId: context.awsRequestId, version: process.env.VERSION || "v1" };
};
"#;

fn probe_manifest(name: &str, extra: &str) -> String {
    manifest(name, name, "nodejs", "index.handler", extra)
}

macro_rules! e2e {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $body.await
        }
    };
}

e2e!(examples_deploy_and_invoke, async {
    let ts = TestServer::start().await;
    for ex in ["hello-node", "plain-node", "hello-python", "provided"] {
        ts.deploy_dir(&examples_dir().join(ex))
            .await
            .unwrap_or_else(|e| panic!("deploy {ex}: {e:#}"));
    }
    // Lambda-style Node through its manifest route: the API Gateway v2 response is mapped.
    let r = ts.get("/hello/bob").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let v = body_json(&r);
    assert_eq!(v["message"], "Hello, bob!");
    // The same function through the Invoke API returns the raw result.
    let v = ts.invoke_ok("hello", r#"{"name":"ann"}"#).await;
    assert_eq!(v["statusCode"], 200);
    assert!(v["body"].as_str().unwrap().contains("Hello, ann!"));
    // The default URL.
    let r = ts.get("/fn/hello").await;
    assert_eq!(body_json(&r)["message"], "Hello, world!");

    // Plain-module style: req/res.
    let r = ts.get("/greet/a/b?name=zed").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "Hello zed from /greet/a/b"
    );
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let r = ts
        .anon
        .request(
            Method::POST,
            "/greet/x",
            &[("content-type", "application/json")],
            Bytes::from(r#"{"a":1}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.headers["x-echo"], "yes");
    assert_eq!(body_json(&r), json!({"received": {"a": 1}}));

    // Python.
    let r = ts.get("/py/hello?name=py").await;
    assert_eq!(r.status, 200);
    let v = body_json(&r);
    assert_eq!(
        (
            v["message"].as_str(),
            v["function"].as_str(),
            v["memory"].as_i64()
        ),
        (Some("Hello, py!"), Some("hello-py"), Some(256))
    );
    assert!(v["remainingMs"].as_i64().unwrap() > 4000);

    // provided: AWS's unmodified awslambdaric.
    let v = ts.invoke_ok("ric", r#"{"k":1}"#).await;
    assert_eq!(
        (
            v["runtime"].as_str(),
            v["echo"]["k"].as_i64(),
            v["count"].as_i64()
        ),
        (Some("awslambdaric"), Some(1), Some(1))
    );
    let v = ts.invoke_ok("ric", r#"{"k":2}"#).await;
    assert_eq!(v["count"], 2, "awslambdaric instance reused");
    let r = ts.invoke("ric", r#"{"fail":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    let v = body_json(&r);
    assert_eq!(
        (v["errorType"].as_str(), v["errorMessage"].as_str()),
        (Some("ValueError"), Some("asked to fail"))
    );
    assert!(v["stackTrace"].as_array().is_some_and(|s| !s.is_empty()));
});

e2e!(warm_reuse_keeps_globals, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&probe_manifest("warm", ""), &[("index.js", PROBE)])
        .await;
    let mut pids = HashSet::new();
    for i in 1..=5 {
        let v = ts.invoke_ok("warm", "{}").await;
        assert_eq!(
            v["count"], i,
            "global counter survives between sequential calls"
        );
        pids.insert(v["instance"].as_str().unwrap().to_string());
    }
    assert_eq!(pids.len(), 1);
    let d = ts.describe("warm").await;
    assert_eq!(
        (
            d["instances"]["cold_starts"].as_u64(),
            d["instances"]["invocations"].as_u64()
        ),
        (Some(1), Some(5))
    );
});

e2e!(concurrent_calls_never_share_an_instance, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &probe_manifest("conc", "[functions.conc.scaling]\nmax_instances = 8"),
        &[("index.js", PROBE)],
    )
    .await;
    let ts = Arc::new(ts);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let ts = ts.clone();
            tokio::spawn(async move { ts.invoke_ok("conc", r#"{"sleep_ms":700}"#).await })
        })
        .collect();
    let mut pids = HashSet::new();
    for c in calls {
        let v = c.await.unwrap();
        assert_eq!(v["count"], 1, "no instance saw another call's globals");
        pids.insert(v["instance"].as_str().unwrap().to_string());
    }
    assert_eq!(
        pids.len(),
        8,
        "8 concurrent slow calls ran on 8 distinct instances"
    );
});

e2e!(queue_at_max_instances_then_429, async {
    let mut ts = TestServer::start().await;
    let extra = "timeout = 10\n[functions.q.scaling]\nmax_instances = 1\nqueue_length = 1\nqueue_timeout = 10";
    ts.deploy(&probe_manifest("q", extra), &[("index.js", PROBE)])
        .await;
    ts.invoke_ok("q", "{}").await; // warm
    let ts = Arc::new(ts);
    let slow = |ts: Arc<TestServer>| {
        tokio::spawn(async move { ts.invoke("q", r#"{"sleep_ms":800}"#).await })
    };
    let first = slow(ts.clone());
    ts.wait_for("q", Duration::from_secs(5), |d| d["instances"]["busy"] == 1)
        .await;
    let queued = slow(ts.clone());
    ts.wait_for("q", Duration::from_secs(5), |d| {
        d["instances"]["waiting"] == 1
    })
    .await;
    // Instance busy, queue full: refused at once.
    let t = Instant::now();
    let r = ts.invoke("q", "{}").await;
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["x-amzn-errortype"], "TooManyRequestsException");
    assert_eq!(r.headers["retry-after"], "1");
    let v = body_json(&r);
    assert_eq!(
        v["Reason"],
        "ReservedFunctionConcurrentInvocationLimitExceeded"
    );
    assert!(v["message"].as_str().unwrap().contains("concurrency limit"));
    // HTTP routes answer 429 too.
    let r = ts.get("/fn/q").await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    // The queued request was served after the first, by the same instance, in order.
    let a = body_json(&first.await.unwrap());
    let b = body_json(&queued.await.unwrap());
    assert_eq!(a["instance"], b["instance"]);
    assert_eq!(
        b["count"].as_i64().unwrap(),
        a["count"].as_i64().unwrap() + 1
    );

    // A bounded wait: with a 1 s queue timeout a request behind a 3 s call gives up with 429.
    let mut ts = Arc::try_unwrap(ts).ok().expect("sole owner");
    let extra = "timeout = 10\n[functions.qt.scaling]\nmax_instances = 1\nqueue_length = 5\nqueue_timeout = 1";
    ts.deploy(&probe_manifest("qt", extra), &[("index.js", PROBE)])
        .await;
    ts.invoke_ok("qt", "{}").await;
    let ts = Arc::new(ts);
    let t2 = ts.clone();
    let long = tokio::spawn(async move { t2.invoke("qt", r#"{"sleep_ms":3000}"#).await });
    ts.wait_for("qt", Duration::from_secs(5), |d| {
        d["instances"]["busy"] == 1
    })
    .await;
    let t = Instant::now();
    let r = ts.invoke("qt", "{}").await;
    let waited = t.elapsed();
    assert_eq!(r.status, 429);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "waited {waited:?}"
    );
    assert_eq!(long.await.unwrap().status, 200);
});

e2e!(timeout_kills_the_process_tree, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &probe_manifest("spin", "timeout = 1"),
        &[("index.js", PROBE)],
    )
    .await;
    let first = ts.invoke_ok("spin", "{}").await;
    let instance = first["instance"].as_str().unwrap().to_string();
    let t = Instant::now();
    let ts = Arc::new(ts);
    let call = {
        let ts = ts.clone();
        tokio::spawn(async move { ts.invoke("spin", r#"{"spin":true,"child":true}"#).await })
    };
    // PID 1, the runtime and its child all run in the instance's sandbox while it spins.
    let deadline = Instant::now() + Duration::from_millis(900);
    while instance_procs(&instance).len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        instance_procs(&instance).len() >= 3,
        "init, runtime and child run: {:?}",
        instance_procs(&instance)
    );
    let r = call.await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    let v = body_json(&r);
    assert_eq!(v["errorType"], "Sandbox.Timedout");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("Task timed out after 1.00 seconds"),
        "{v}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1800),
        "took {took:?}"
    );
    // The runtime and the child it spawned are gone.
    assert_eq!(
        instance_gone(&instance, Duration::from_secs(3)).await,
        Vec::<i32>::new(),
        "the runtime and its child were killed"
    );
    // The next call is served by a fresh instance.
    let v = ts.invoke_ok("spin", "{}").await;
    assert_ne!(v["instance"], first["instance"]);
    assert_eq!(v["count"], 1);
    let logs = ts.logs("spin").await;
    assert!(
        logs.iter()
            .any(|l| l["line"].as_str().unwrap().contains("Task timed out after"))
    );
});

e2e!(crash_and_function_errors, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&probe_manifest("crash", ""), &[("index.js", PROBE)])
        .await;
    let first = ts.invoke_ok("crash", "{}").await;
    let r = ts.invoke("crash", r#"{"crash":true}"#).await;
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    let v = body_json(&r);
    assert_eq!(v["errorType"], "Runtime.ExitError");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("exit status 3"),
        "{v}"
    );
    let v = ts.invoke_ok("crash", "{}").await;
    assert_ne!(
        v["instance"], first["instance"],
        "a crashed instance is discarded"
    );
    // A thrown error is the Lambda error body; the instance stays warm.
    let r = ts.invoke("crash", r#"{"throw":"bad input"}"#).await;
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    let e = body_json(&r);
    assert_eq!(
        (e["errorType"].as_str(), e["errorMessage"].as_str()),
        (Some("TypeError"), Some("bad input"))
    );
    assert!(e["stackTrace"].is_array());
    assert_eq!(ts.invoke_ok("crash", "{}").await["instance"], v["instance"]);
    // Over HTTP a function error is a 502.
    let r = ts
        .anon
        .request(Method::POST, "/fn/crash", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "an HTTP event is not an error");
});

e2e!(init_errors_are_reported, async {
    let mut ts = TestServer::start().await;
    let svc = "[service]\nname = \"bad\"\n\
        [functions.syntax]\nruntime = \"nodejs\"\nhandler = \"broken.handler\"\n\
        [functions.nohandler]\nruntime = \"nodejs\"\nhandler = \"ok.nope\"\n\
        [functions.pyimport]\nruntime = \"python\"\nhandler = \"imp.handler\"\n\
        [functions.exits]\nruntime = \"provided\"\n";
    ts.deploy(
        svc,
        &[
            (
                "broken.js",
                "exports.handler = async () => { return 1 +; };",
            ),
            ("ok.js", "exports.handler = async () => 1;"),
            (
                "imp.py",
                "import no_such_module_here\ndef handler(e, c):\n    return 1\n",
            ),
            (
                "bootstrap",
                "#!/bin/sh\necho 'bootstrap: cannot find my config' >&2\nexit 7\n",
            ),
        ],
    )
    .await;
    let cases = [
        ("syntax", "Runtime.UserCodeSyntaxError", "broken"),
        ("nohandler", "Runtime.HandlerNotFound", "nope"),
        (
            "pyimport",
            "Runtime.ImportModuleError",
            "no_such_module_here",
        ),
        ("exits", "Runtime.ExitError", "cannot find my config"),
    ];
    for (name, ty, needle) in cases {
        let r = ts.invoke(name, "{}").await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.headers["x-amz-function-error"], "Unhandled", "{name}");
        let v = body_json(&r);
        assert_eq!(v["errorType"], ty, "{name}: {v}");
        assert!(
            v["errorMessage"].as_str().unwrap().contains(needle),
            "{name}: {v}"
        );
        // Visible in the logs too.
        let logs = ts.logs(name).await;
        assert!(
            logs.iter()
                .any(|l| l["line"].as_str().unwrap().contains(ty)),
            "{name}: {logs:?}"
        );
        let r = ts.get(&format!("/fn/{name}")).await;
        assert_eq!(r.status, 502, "{name} over HTTP");
        assert_eq!(body_json(&r)["message"], "Internal Server Error");
    }
});

e2e!(idle_instances_are_reaped_and_min_kept, async {
    let mut ts = TestServer::start().await;
    let svc = "[service]\nname = \"idle\"\n\
        [functions.reaped]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.reaped.scaling]\nidle_timeout = 1\n\
        [functions.kept]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n[functions.kept.scaling]\nidle_timeout = 1\nmin_instances = 2\n";
    let report = ts.deploy(svc, &[("index.js", PROBE)]).await;
    let kept = report["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "kept")
        .unwrap()
        .clone();
    assert_eq!(
        kept["min_instances_started"], 2,
        "min instances start at deploy"
    );
    ts.invoke_ok("reaped", "{}").await;
    assert_eq!(ts.describe("reaped").await["instances"]["idle"], 1);
    let t = Instant::now();
    let d = ts
        .wait_for("reaped", Duration::from_secs(5), |d| {
            d["instances"]["idle"] == 0
        })
        .await;
    assert_eq!(d["instances"]["idle"], 0, "idle instance stopped");
    assert!(t.elapsed() >= Duration::from_millis(800));
    // Past its idle timeout, the minimum is still there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ts.describe("kept").await["instances"]["idle"], 2);
    // A call after reaping is a cold start.
    ts.invoke_ok("reaped", "{}").await;
    assert_eq!(ts.describe("reaped").await["instances"]["cold_starts"], 2);
});

e2e!(redeploy_under_load_fails_nothing, async {
    let mut ts = TestServer::start().await;
    let m = probe_manifest(
        "rd",
        "environment = { VERSION = \"v1\" }\n[functions.rd.scaling]\nmax_instances = 4\nmin_instances = 1",
    );
    ts.deploy(&m, &[("index.js", PROBE)]).await;
    let ts = Arc::new(tokio::sync::RwLock::new(ts));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (ts, stop) = (ts.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut versions) = (0, Vec::new(), HashSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = ts.read().await.get("/fn/rd").await;
                if r.status == 200 {
                    ok += 1;
                    versions.insert(body_json(&r)["version"].as_str().unwrap_or("").to_string());
                } else {
                    failed.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
                }
            }
            (ok, failed, versions)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for v in ["v2", "v3"] {
        let m = probe_manifest(
            "rd",
            &format!(
                "environment = {{ VERSION = \"{v}\" }}\n[functions.rd.scaling]\nmax_instances = 4\nmin_instances = 1"
            ),
        );
        let dir = write_service(&m, &[("index.js", PROBE)]);
        ts.read().await.deploy_dir(dir.path()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut total, mut seen) = (0, HashSet::new());
    for w in workers {
        let (ok, failed, versions) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during redeploy: {failed:?}"
        );
        total += ok;
        seen.extend(versions);
    }
    assert!(total > 50, "load ran ({total} requests)");
    assert!(seen.contains("v1") && seen.contains("v3"), "{seen:?}");
    let ts = ts.read().await;
    assert_eq!(
        body_json(&ts.get("/fn/rd").await)["version"],
        "v3",
        "new requests see the new code"
    );
    assert_eq!(ts.describe("rd").await["revision"], 3);
});

/// A `provided` bootstrap that exercises the Runtime API contract and reports what it saw.
const CONTRACT_BOOTSTRAP: &str = r#"#!/usr/bin/env python3
import http.client, json, os
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
seen = {"env": {k: os.environ.get(k) for k in ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION", "_HANDLER", "LAMBDA_TASK_ROOT", "AWS_REGION", "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_EXECUTION_ENV", "CUSTOM"]}}
def call(method, path, body=None, headers={}):
    c = http.client.HTTPConnection(host, int(port))
    c.request(method, "/2018-06-01" + path, body=body, headers=headers)
    r = c.getresponse()
    out = (r.status, r.read().decode(), {k.lower(): v for k, v in r.getheaders()})
    c.close()
    return out
# Before init ends, a response is refused.
seen["early_response"] = call("POST", "/runtime/invocation/x/response", b"{}")[:2]
while True:
    status, body, h = call("GET", "/runtime/invocation/next")
    rid = h["lambda-runtime-aws-request-id"]
    event = json.loads(body)
    seen["next"] = {"status": status, "deadline_ok": int(h["lambda-runtime-deadline-ms"]) > 0,
        "arn": h.get("lambda-runtime-invoked-function-arn"), "content_type": h.get("content-type"),
        "trace": h.get("lambda-runtime-trace-id"), "client_context": h.get("lambda-runtime-client-context")}
    seen["init_error_after_init"] = call("POST", "/runtime/init/error", b"{}")[:2]
    seen["wrong_id"] = call("POST", "/runtime/invocation/not-the-id/response", b"{}")[:2]
    if event.get("big"):
        seen["too_large"] = call("POST", f"/runtime/invocation/{rid}/response", b"x" * (6 * 1024 * 1024 + 101))[:2]
        continue
    if event.get("error"):
        r = call("POST", f"/runtime/invocation/{rid}/error", json.dumps({"errorMessage": "m", "errorType": "E"}),
                 {"Lambda-Runtime-Function-Error-Type": "Function.Custom"})
        continue
    r = call("POST", f"/runtime/invocation/{rid}/response", json.dumps(seen))
    seen["response"] = r[:2]
    seen["second_response"] = call("POST", f"/runtime/invocation/{rid}/response", b"{}")[:2]
"#;

e2e!(runtime_api_contract, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &manifest(
            "contract",
            "contract",
            "provided",
            "my.handler",
            "memory = 256\nenvironment = { CUSTOM = \"yes\" }",
        ),
        &[("bootstrap", CONTRACT_BOOTSTRAP)],
    )
    .await;
    let ctx = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{"a":1}}"#);
    let r = ts
        .invoke_with(
            "contract",
            r#"{"n":1}"#,
            &[
                ("x-amz-client-context", &ctx),
                ("x-amzn-trace-id", "Root=1-abc"),
            ],
        )
        .await;
    let v = body_json(&r);
    assert_eq!(
        v["early_response"],
        json!([
            403,
            r#"{"errorMessage":"State transition from Initializing to Response is not allowed","errorType":"InvalidStateTransition"}"#
        ])
    );
    assert_eq!(v["next"]["status"], 200);
    assert_eq!(v["next"]["deadline_ok"], true);
    assert_eq!(
        v["next"]["arn"],
        "arn:aws:lambda:us-east-1:000000000000:function:contract"
    );
    assert_eq!(v["next"]["content_type"], "application/json");
    assert_eq!(v["next"]["trace"], "Root=1-abc");
    assert_eq!(v["next"]["client_context"], r#"{"custom":{"a":1}}"#);
    assert_eq!(v["init_error_after_init"][0], 403);
    assert_eq!(
        v["wrong_id"],
        json!([
            400,
            r#"{"errorMessage":"Invalid request ID","errorType":"InvalidRequestID"}"#
        ])
    );
    let env = &v["env"];
    assert_eq!(env["AWS_LAMBDA_FUNCTION_NAME"], "contract");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_VERSION"], "$LATEST");
    assert_eq!(env["_HANDLER"], "my.handler");
    assert_eq!(env["AWS_REGION"], "us-east-1");
    assert_eq!(env["AWS_LAMBDA_LOG_GROUP_NAME"], "/aws/lambda/contract");
    assert!(
        env["AWS_LAMBDA_LOG_STREAM_NAME"]
            .as_str()
            .unwrap()
            .contains("[$LATEST]")
    );
    assert_eq!(
        env["AWS_EXECUTION_ENV"],
        Value::Null,
        "not set for provided runtimes"
    );
    assert_eq!(env["CUSTOM"], "yes");
    assert!(env["LAMBDA_TASK_ROOT"].as_str().is_some());
    // The next invocation sees the 202 of the previous response and the 400 of a second one.
    let v = body_json(&ts.invoke("contract", "{}").await);
    assert_eq!(v["response"], json!([202, r#"{"status":"OK"}"#]));
    assert_eq!(v["second_response"][0], 400);
    // Oversized response: 413 to the runtime, Function.ResponseSizeTooLarge to the caller.
    let r = ts.invoke("contract", r#"{"big":true}"#).await;
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    assert_eq!(body_json(&r)["errorType"], "Function.ResponseSizeTooLarge");
    let v = body_json(&ts.invoke("contract", "{}").await);
    assert_eq!(v["too_large"][0], 413);
    assert!(
        v["too_large"][1]
            .as_str()
            .unwrap()
            .contains("RequestEntityTooLarge")
    );
    // /error with an error type header.
    let r = ts.invoke("contract", r#"{"error":true}"#).await;
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    assert_eq!(
        body_json(&r),
        json!({"errorMessage": "m", "errorType": "E"})
    );
});

e2e!(invoke_api_details, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&probe_manifest("inv", ""), &[("index.js", PROBE)])
        .await;
    // Tail: the base64 log of this invocation, with START/END/REPORT and the function's output.
    let r = ts
        .invoke_with(
            "inv",
            r#"{"log":"hello from the function"}"#,
            &[("x-amz-log-type", "Tail")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-amz-executed-version"], "$LATEST");
    let log = base64::engine::general_purpose::STANDARD
        .decode(r.headers["x-amz-log-result"].as_bytes())
        .unwrap();
    let log = String::from_utf8(log).unwrap();
    let rid = body_json(&r)["requestId"].as_str().unwrap().to_string();
    assert!(
        log.contains(&format!("START RequestId: {rid} Version: $LATEST")),
        "{log}"
    );
    assert!(log.contains("hello from the function"), "{log}");
    assert!(log.contains(&format!("END RequestId: {rid}")), "{log}");
    assert!(
        log.contains("Init Duration:") && log.contains("Max Memory Used:"),
        "{log}"
    );
    let report = log.lines().find(|l| l.starts_with("REPORT")).unwrap();
    let mem: u64 = report
        .split("Max Memory Used: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The sandbox's cgroup peak: what the instance itself charged (shared interpreter pages
    // already in the page cache are not), a few MB for a small handler.
    assert!(
        (3..128).contains(&mem),
        "memory is measured, not faked: {report}"
    );
    // Stored logs carry the request id on the function's own lines.
    let logs = ts.logs("inv").await;
    assert!(
        logs.iter()
            .any(|l| l["request_id"] == rid.as_str() && l["stream"] == "stdout")
    );
    // DryRun, unknown function, Event, qualifiers, oversized and non-JSON payloads.
    let r = ts
        .invoke_with("inv", "{}", &[("x-amz-invocation-type", "DryRun")])
        .await;
    assert_eq!(r.status, 204);
    let r = ts.invoke("nope", "{}").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["x-amzn-errortype"], "ResourceNotFoundException");
    assert!(
        body_json(&r)["message"]
            .as_str()
            .unwrap()
            .contains("function:nope")
    );
    // Event: 202 with the call's id once stored; an unknown function is a 404 at once.
    let r = ts
        .invoke_with("inv", "{}", &[("x-amz-invocation-type", "Event")])
        .await;
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty());
    assert!(r.headers.contains_key("x-amzn-requestid"));
    let r = ts
        .invoke_with("nope", "{}", &[("x-amz-invocation-type", "Event")])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["x-amzn-errortype"], "ResourceNotFoundException");
    let r = ts
        .invoke(
            "arn:aws:lambda:us-east-1:000000000000:function:inv:$LATEST",
            "{}",
        )
        .await;
    assert_eq!(r.status, 200);
    let r = ts.invoke("inv:prod", "{}").await;
    assert_eq!(r.status, 404);
    let r = ts.invoke("inv", "not json").await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.headers["x-amzn-errortype"].to_str().unwrap()
        ),
        (400, "InvalidRequestContentException")
    );
    let big = format!("\"{}\"", "x".repeat(6 * 1024 * 1024 + 200));
    let r = ts.invoke("inv", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers["x-amzn-errortype"], "RequestTooLargeException");
    // An empty payload is {}.
    assert_eq!(ts.invoke("inv", "").await.status, 200);
});

e2e!(boto3_invoke, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&probe_manifest("boto", ""), &[("index.js", PROBE)])
        .await;
    let script = r#"
import base64, json, sys, boto3, botocore
c = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 0}))
out = {}
r = c.invoke(FunctionName="boto", Payload=json.dumps({"log": "via boto3"}), LogType="Tail")
out["ok"] = {"status": r["StatusCode"], "version": r["ExecutedVersion"], "payload": json.loads(r["Payload"].read()),
             "log": base64.b64decode(r["LogResult"]).decode(), "error": r.get("FunctionError")}
r = c.invoke(FunctionName="boto", Payload=json.dumps({"throw": "boom"}))
out["err"] = {"status": r["StatusCode"], "error": r.get("FunctionError"), "payload": json.loads(r["Payload"].read())}
r = c.invoke(FunctionName="boto", InvocationType="DryRun")
out["dry"] = r["StatusCode"]
try:
    c.invoke(FunctionName="missing", Payload=b"{}")
except c.exceptions.ResourceNotFoundException as e:
    out["missing"] = e.response["Error"]["Code"]
print(json.dumps(out))
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(ts.url())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"]["status"], 200);
    assert_eq!(v["ok"]["version"], "$LATEST");
    assert_eq!(v["ok"]["payload"]["count"], 1);
    assert_eq!(v["ok"]["error"], Value::Null);
    assert!(v["ok"]["log"].as_str().unwrap().contains("via boto3"));
    assert_eq!(
        (v["err"]["status"].as_i64(), v["err"]["error"].as_str()),
        (Some(200), Some("Unhandled"))
    );
    assert_eq!(v["err"]["payload"]["errorMessage"], "boom");
    assert_eq!(v["dry"], 204);
    assert_eq!(v["missing"], "ResourceNotFoundException");
});

e2e!(manifest_errors_and_admin_auth, async {
    let mut ts = TestServer::start().await;
    // The CLI path: file and line.
    let dir = write_service(
        "[service]\nname = \"m\"\n\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\ntimeout = 0\n",
        &[("index.js", "exports.handler = async () => 1;")],
    );
    let err = ts.deploy_dir(dir.path()).await.unwrap_err().to_string();
    assert!(
        err.starts_with("timeout = 0 at ") && err.ends_with("gust.toml:7: must be 1..=900 seconds"),
        "{err}"
    );
    // The API path: a 400 naming the line, nothing deployed.
    let body = json!({"manifest": "[service]\nname = \"m\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\nmemroy = 1\n", "code": {}});
    let r = ts
        .admin_raw(Method::POST, "/_gust/v1/services", body.to_string())
        .await;
    assert_eq!(r.status, 400);
    let msg = body_json(&r)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("gust.toml:6: unknown field `memroy`"),
        "{msg}"
    );
    let body = json!({"manifest": "[service]\nname = \"m\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n", "code": {}});
    let r = ts
        .admin_raw(Method::POST, "/_gust/v1/services", body.to_string())
        .await;
    assert_eq!(r.status, 400);
    assert!(
        body_json(&r)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no code bundle for function f")
    );
    // A missing handler file is caught before upload.
    let dir = write_service(
        &manifest("m", "f", "nodejs", "main.handler", ""),
        &[("index.js", "")],
    );
    let err = ts.deploy_dir(dir.path()).await.unwrap_err().to_string();
    assert!(err.contains("main.js"), "{err}");

    // Admin API without, or with a wrong, token: 401 JSON.
    for client in [
        &ts.anon,
        &gust::client::Client::new(&ts.url(), Some("wrong".into())),
    ] {
        let r = client
            .request(Method::GET, "/_gust/v1/functions", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(body_json(&r)["error"]["code"], "Unauthorized");
        let r = client
            .request(
                Method::PUT,
                &format!("/_gust/v1/blobs/{}", "a".repeat(64)),
                &[],
                Bytes::from("x"),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }
    let token = std::fs::read_to_string(ts.data.path().join("admin-token")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(ts.data.path().join("admin-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(token.starts_with("gust_"));
    ts.deploy(&probe_manifest("authok", ""), &[("index.js", PROBE)])
        .await;
    let r = ts
        .client
        .request(Method::GET, "/_gust/v1/functions", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
});

e2e!(http_events_binary_bodies_and_routes, async {
    let mut ts = TestServer::start().await;
    let echo = r#"
exports.handler = async (event) => {
  if (event.rawPath === "/bin") {
    return { statusCode: 200, headers: { "content-type": "application/octet-stream" }, body: event.body, isBase64Encoded: event.isBase64Encoded };
  }
  return { statusCode: 200, cookies: ["a=1", "b=2"], headers: { "x-route": event.routeKey }, body: JSON.stringify(event) };
};"#;
    let m = manifest(
        "echo",
        "echo",
        "nodejs",
        "index.handler",
        "routes = [{ method = \"GET\", path = \"/items/{id}\" }, { path = \"/files/{rest+}\" }]",
    );
    ts.deploy(&m, &[("index.js", echo)]).await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let r = ts
        .anon
        .request(
            Method::POST,
            "/fn/echo/bin",
            &[("content-type", "application/octet-stream")],
            Bytes::from(bytes.clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_ref(), bytes.as_slice(), "binary body round-trips");
    let r = ts
        .anon
        .request(
            Method::GET,
            "/items/42?x=1&x=2",
            &[("cookie", "c=3")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-route"], "GET /items/{id}");
    assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
    let ev: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(ev["version"], "2.0");
    assert_eq!(ev["pathParameters"]["id"], "42");
    assert_eq!(ev["queryStringParameters"]["x"], "1,2");
    assert_eq!(ev["cookies"], json!(["c=3"]));
    assert_eq!(ev["requestContext"]["http"]["method"], "GET");
    let r = ts
        .anon
        .request(Method::DELETE, "/files/a/b/c", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(body_json(&r)["pathParameters"]["rest"], "a/b/c");
    assert_eq!(ts.get("/items/42/more").await.status, 404);
    assert_eq!(ts.get("/fn/nosuch").await.status, 404);
});

e2e!(plain_module_config_timeout_applies, async {
    let mut ts = TestServer::start().await;
    let code = r#"
module.exports.slow = {
  func: async (req, res) => { await new Promise((r) => setTimeout(r, Number(req.query.ms || 0))); res.send("done"); },
  config: { timeout: 1000 },
};"#;
    ts.deploy(
        &manifest("plain", "slow", "nodejs", "app.slow", ""),
        &[("app.js", code)],
    )
    .await;
    let r = ts.get("/fn/slow?ms=10").await;
    assert_eq!(
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).into_owned()
        ),
        (200, "done".to_string())
    );
    let t = Instant::now();
    let r = ts.get("/fn/slow?ms=2500").await;
    assert_eq!(r.status, 502);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1800),
        "config.timeout (1 s) applied, took {took:?}"
    );
});

e2e!(restart_keeps_functions_and_shutdown_leaves_nothing, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &probe_manifest(
            "keep",
            "[functions.keep.scaling]\nmax_instances = 2\nmin_instances = 1",
        ),
        &[("index.js", PROBE)],
    )
    .await;
    let before = ts.invoke_ok("keep", "{}").await;
    ts.restart().await;
    assert!(
        instance_procs(before["instance"].as_str().unwrap()).is_empty(),
        "instances stop with the server"
    );
    // The minimum instance is warmed again after the restart, in the background.
    let d = ts
        .wait_for("keep", Duration::from_secs(10), |d| {
            d["instances"]["idle"] == 1
        })
        .await;
    assert_eq!(
        d["instances"]["idle"], 1,
        "min_instances restored after a restart"
    );
    let after = ts.invoke_ok("keep", "{}").await;
    assert_eq!(after["count"], 1);
    // Graceful stop: an in-flight invocation finishes, then no instance process is left.
    let ts = Arc::new(tokio::sync::Mutex::new(ts));
    let t2 = ts.clone();
    let anon = gust::client::Client::new(&ts.lock().await.url(), None);
    let inflight = tokio::spawn(async move {
        anon.request(
            Method::POST,
            "/2015-03-31/functions/keep/invocations",
            &[],
            Bytes::from(r#"{"sleep_ms":800}"#),
        )
        .await
    });
    t2.lock()
        .await
        .wait_for("keep", Duration::from_secs(5), |d| {
            d["instances"]["busy"] == 1
        })
        .await;
    let pid = t2.lock().await.describe("keep").await;
    drop(pid);
    t2.lock().await.stop().await;
    let r = inflight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let id = v["instance"].as_str().unwrap();
    assert_eq!(
        instance_gone(id, Duration::from_secs(3)).await,
        Vec::<i32>::new(),
        "no orphan runtime after shutdown"
    );
});

e2e!(a_caller_that_gives_up_frees_its_queue_slot, async {
    let mut ts = TestServer::start().await;
    let extra = "timeout = 10\n[functions.gone.scaling]\nmax_instances = 1\nqueue_length = 1\nqueue_timeout = 10";
    ts.deploy(&probe_manifest("gone", extra), &[("index.js", PROBE)])
        .await;
    ts.invoke_ok("gone", "{}").await;
    let ts = Arc::new(ts);
    let t2 = ts.clone();
    let long = tokio::spawn(async move { t2.invoke("gone", r#"{"sleep_ms":4000}"#).await });
    ts.wait_for("gone", Duration::from_secs(5), |d| {
        d["instances"]["busy"] == 1
    })
    .await;
    // A caller queues, then hangs up while the long call still runs.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), ts.invoke("gone", "{}")).await;
    assert!(gave_up.is_err(), "the queued call was still waiting");
    let d = ts
        .wait_for("gone", Duration::from_secs(1), |d| {
            d["instances"]["waiting"] == 0
        })
        .await;
    assert_eq!(
        d["instances"]["waiting"], 0,
        "the abandoned waiter left the queue at once"
    );
    // Its slot is free: the next caller queues instead of getting a 429, and is served after.
    let t3 = ts.clone();
    let next = tokio::spawn(async move { t3.invoke("gone", "{}").await });
    let d = ts
        .wait_for("gone", Duration::from_secs(2), |d| {
            d["instances"]["waiting"] == 1
        })
        .await;
    assert_eq!(d["instances"]["waiting"], 1);
    assert_eq!(d["instances"]["busy"], 1, "the long call is still running");
    assert_eq!(next.await.unwrap().status, 200);
    assert_eq!(long.await.unwrap().status, 200);
    let d = ts.describe("gone").await;
    assert_eq!(
        (
            d["instances"]["busy"].as_u64(),
            d["instances"]["idle"].as_u64()
        ),
        (Some(0), Some(1))
    );
});

e2e!(node_module_formats_esm_and_callbacks, async {
    let mut ts = TestServer::start().await;
    let svc = "[service]\nname = \"formats\"\n\
        [functions.esm]\nruntime = \"nodejs\"\nhandler = \"esm.handler\"\n\
        [functions.typemodule]\nruntime = \"nodejs\"\nhandler = \"src/app.main\"\n\
        [functions.callback]\nruntime = \"nodejs\"\nhandler = \"cb.handler\"\n";
    ts.deploy(
        svc,
        &[
            ("esm.mjs", "export const handler = async (event) => ({ format: 'esm', echo: event.x });"),
            ("src/package.json", r#"{"type":"module"}"#),
            ("src/app.js", "const started = await Promise.resolve('tla');\nexport async function main() { return { format: 'type-module', started }; }"),
            ("cb.js", "exports.handler = (event, context, callback) => { setTimeout(() => callback(null, { format: 'callback', id: context.awsRequestId }), 5); };"),
        ],
    )
    .await;
    assert_eq!(
        ts.invoke_ok("esm", r#"{"x":7}"#).await,
        json!({"format": "esm", "echo": 7})
    );
    assert_eq!(
        ts.invoke_ok("typemodule", "{}").await,
        json!({"format": "type-module", "started": "tla"})
    );
    let v = ts.invoke_ok("callback", "{}").await;
    assert_eq!(v["format"], "callback");
    assert_eq!(v["id"].as_str().map(str::len), Some(36));
});

e2e!(redeploy_moves_queued_callers_to_the_new_version, async {
    let mut ts = TestServer::start().await;
    let m = |v: &str| {
        probe_manifest(
            "mv",
            &format!(
                "timeout = 10\nenvironment = {{ VERSION = \"{v}\" }}\n[functions.mv.scaling]\nmax_instances = 1\nqueue_length = 5"
            ),
        )
    };
    ts.deploy(&m("v1"), &[("index.js", PROBE)]).await;
    ts.invoke_ok("mv", "{}").await;
    let ts = Arc::new(ts);
    let t2 = ts.clone();
    let long = tokio::spawn(async move { t2.invoke("mv", r#"{"sleep_ms":3000}"#).await });
    ts.wait_for("mv", Duration::from_secs(5), |d| {
        d["instances"]["busy"] == 1
    })
    .await;
    let t3 = ts.clone();
    let queued = tokio::spawn(async move {
        let t = Instant::now();
        (t3.invoke("mv", "{}").await, t.elapsed())
    });
    ts.wait_for("mv", Duration::from_secs(5), |d| {
        d["instances"]["waiting"] == 1
    })
    .await;
    let dir = write_service(&m("v2"), &[("index.js", PROBE)]);
    ts.deploy_dir(dir.path()).await.unwrap();
    let (r, waited) = queued.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(body_json(&r)["version"], "v2", "served by the new version");
    assert!(
        waited < Duration::from_millis(2500),
        "did not wait for the old version's busy instance: {waited:?}"
    );
    let r = long.await.unwrap();
    assert_eq!(
        (r.status.as_u16(), body_json(&r)["version"].as_str()),
        (200, Some("v1")),
        "the old instance finished its call"
    );
});
