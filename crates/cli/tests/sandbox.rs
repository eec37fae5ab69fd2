//! The sandbox, for real (these tests run as root, as CI does): memory, pids and time limits,
//! what a function can see and reach, the Runtime API of other instances, `network = "none"`,
//! the pre-warmed pool, and `gust doctor`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

macro_rules! sandbox_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: the sandbox tests need root (CI runs them as root)");
                return;
            }
            $body.await
        }
    };
}

/// A Node function that looks around its sandbox and misbehaves on request.
const PROBE: &str = r#"
const fs = require("fs");
const net = require("net");
const http = require("http");
const { spawn, execSync } = require("child_process");
const tryIt = (f) => { try { return { ok: true, value: f() }; } catch (e) { return { ok: false, code: e.code || String(e) }; } };
exports.handler = async (event) => {
  if (event.hog) {
    const chunks = [];
    for (let i = 0; i < event.hog; i++) chunks.push(Buffer.alloc(1024 * 1024, 1));
    return { allocated: chunks.length };
  }
  if (event.bomb) {
    spawn("sh", ["-c", "b(){ b|b& }; b"], { stdio: "ignore", detached: true });
    // The most processes seen over 1.5 s: at the pids limit the bomb's shells die and fork
    // again, so one look may catch it between generations.
    let procs = 0;
    const until = Date.now() + 1500;
    while (Date.now() < until) {
      await new Promise((r) => setTimeout(r, 50));
      procs = Math.max(procs, fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p)).length);
    }
    console.log(JSON.stringify({ procs }));
    for (;;) {}
  }
  if (event.connect) {
    const [host, port] = event.connect.split(":");
    return await new Promise((resolve) => {
      const s = net.connect({ host, port: Number(port), timeout: 2000 });
      s.on("connect", () => { s.destroy(); resolve({ connected: true }); });
      s.on("timeout", () => { s.destroy(); resolve({ connected: false, code: "TIMEOUT" }); });
      s.on("error", (e) => resolve({ connected: false, code: e.code }));
    });
  }
  if (event.steal) {
    const t = Date.now();
    return await new Promise((resolve) => {
      const req = http.get(`http://${event.steal}/2018-06-01/runtime/invocation/next`, { timeout: 3000 }, (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ stolen: true, status: res.statusCode, body }));
      });
      req.on("timeout", () => { req.destroy(); resolve({ stolen: false, code: "TIMEOUT", ms: Date.now() - t }); });
      req.on("error", (e) => resolve({ stolen: false, code: e.code, ms: Date.now() - t }));
    });
  }
  if (event.write_tmp) fs.writeFileSync("/tmp/" + event.write_tmp, "secret");
  const procs = fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p)).map(Number);
  const comm = (p) => tryIt(() => fs.readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0")[0]).value;
  const status = fs.readFileSync("/proc/self/status", "utf8");
  const field = (k) => (status.match(new RegExp(`^${k}:\\s*(.*)$`, "m")) || [])[1];
  return {
    procs: procs.map((p) => [p, comm(p)]),
    ps: execSync("ps -e -o pid=,comm=").toString().trim().split("\n").length,
    hostname: require("os").hostname(),
    uid: process.getuid(),
    capEff: field("CapEff"),
    noNewPrivs: field("NoNewPrivs"),
    seccomp: field("Seccomp"),
    cwd: process.cwd(),
    writeTask: tryIt(() => fs.writeFileSync("/var/task/x", "x")),
    unshare: tryIt(() => execSync("unshare -U true 2>&1")),
    reads: (event.read || []).map((p) => [p, tryIt(() => fs.readdirSync(p).length ?? fs.readFileSync(p))]),
    readFiles: (event.read_files || []).map((p) => [p, tryIt(() => fs.readFileSync(p, "utf8"))]),
    tmp: event.check_tmp ? fs.existsSync("/tmp/" + event.check_tmp) : null,
    env: { GUST_PREWARM: process.env.GUST_PREWARM || null, MARK: process.env.MARK || null },
    api: process.env.AWS_LAMBDA_RUNTIME_API,
    ip: ((require("os").networkInterfaces().eth0 || [])[0] || {}).address || null,
    instance: process.env.AWS_LAMBDA_LOG_STREAM_NAME.split("]")[1],
    files: fs.readdirSync("/var/task").sort(),
  };
};
"#;

/// A file of an instance's cgroup (named after the instance, under a `gust-*` directory).
fn instance_cgroup_file(instance: &str, file: &str) -> Option<String> {
    for dir in own_cgroup_dirs() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("gust-")
                && let Ok(s) = std::fs::read_to_string(e.path().join(instance).join(file))
            {
                return Some(s);
            }
        }
    }
    None
}

fn probe(name: &str, extra: &str) -> String {
    manifest(name, name, "nodejs", "index.handler", extra)
}

/// A service of several probe functions.
fn service(functions: &[(&str, &str)]) -> String {
    let mut m = String::from("[service]\nname = \"sbx\"\n");
    for (name, extra) in functions {
        m.push_str(&format!(
            "\n[functions.{name}]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n{extra}\n"
        ));
    }
    m
}

sandbox_test!(memory_limit_kills_with_a_clear_error, async {
    let mut ts = TestServer::start().await;
    ts.deploy(&probe("hog", "memory = 128"), &[("index.js", PROBE)])
        .await;
    let r = ts.invoke("hog", r#"{"hog":500}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-amz-function-error"], "Unhandled");
    let v = body_json(&r);
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
    let msg = v["errorMessage"].as_str().unwrap();
    assert!(
        msg.contains("function hog exceeded its memory limit of 128 MB"),
        "{msg}"
    );
    // A fresh instance serves the next call; allocating within the limit works.
    let v = ts.invoke_ok("hog", r#"{"hog":20}"#).await;
    assert_eq!(v["allocated"], 20);
    let logs = ts.logs("hog").await;
    let report = logs
        .iter()
        .filter_map(|l| l["line"].as_str())
        .rfind(|l| l.starts_with("REPORT"))
        .unwrap()
        .to_string();
    let used: u64 = report
        .split("Max Memory Used: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        (20..=128).contains(&used),
        "Max Memory Used is the cgroup's peak: {report}"
    );
});

sandbox_test!(
    fork_bomb_is_contained_and_the_server_stays_responsive,
    async {
        let mut ts = TestServer::start().await;
        ts.deploy(
            &service(&[("bomb", "memory = 1024\ntimeout = 6"), ("calm", "")]),
            &[("index.js", PROBE)],
        )
        .await;
        let first = ts.invoke_ok("bomb", "{}").await;
        let instance = first["instance"].as_str().unwrap().to_string();
        ts.invoke_ok("calm", "{}").await;
        let ts = Arc::new(ts);
        let bomb = {
            let ts = ts.clone();
            tokio::spawn(async move { ts.invoke("bomb", r#"{"bomb":true}"#).await })
        };
        // While the bomb goes off, another function and the API answer promptly.
        let deadline = Instant::now() + Duration::from_millis(3000);
        let mut calls = 0;
        while Instant::now() < deadline {
            let t = Instant::now();
            ts.invoke_ok("calm", "{}").await;
            assert_eq!(ts.get("/_gust/health").await.status, 200);
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "calm took {:?} during the fork bomb",
                t.elapsed()
            );
            calls += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(calls >= 5, "{calls}");
        // The kernel refused the bomb's forks at the pids limit.
        let events =
            instance_cgroup_file(&instance, "pids.events").expect("the instance's pids cgroup");
        assert!(
            events
                .trim()
                .strip_prefix("max ")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0),
            "pids.events: {events}"
        );
        let r = bomb.await.unwrap();
        let v = body_json(&r);
        assert_eq!(v["errorType"], "Sandbox.Timedout", "{v}");
        // The bomb ran into the pids limit and no further.
        let logs = ts.logs("bomb").await;
        let procs: u64 = logs
            .iter()
            .filter_map(|l| l["line"].as_str())
            .find_map(|l| {
                let i = l.find("{\"procs\":")?;
                serde_json::from_str::<Value>(&l[i..]).ok()?["procs"].as_u64()
            })
            .expect("the bomb reported its process count");
        // A /proc walk is no snapshot while processes come and go: it only shows the bomb ran.
        assert!(procs >= 50, "{procs} processes");
        assert_eq!(
            instance_gone(&instance, Duration::from_secs(5)).await,
            Vec::<i32>::new(),
            "the bomb is gone"
        );
        let v = ts.invoke_ok("bomb", "{}").await;
        assert_ne!(v["instance"], first["instance"], "a fresh instance");
    }
);

sandbox_test!(a_function_sees_only_its_own_sandbox, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &service(&[("look", "environment = { MARK = \"look\" }"), ("other", "")]),
        &[("index.js", PROBE), ("extra.txt", "x")],
    )
    .await;
    let data = ts.data.path().canonicalize().unwrap();
    let code = ts.describe("other").await["code_sha256"]
        .as_str()
        .map(|sha| data.join("code").join(sha))
        .expect("describe names the code");
    assert!(code.is_dir(), "{}", code.display());
    let event = json!({
        "write_tmp": "secret",
        "read": [data, data.join("code"), code],
        "read_files": [data.join("admin-token"), "/etc/shadow", "/proc/1/environ"],
    });
    let v = ts.invoke_ok("look", &event.to_string()).await;
    // Its own processes only: PID 1 is gust-init, then the runtime (and `ps` while it runs).
    let procs = v["procs"].as_array().unwrap();
    assert_eq!(procs[0], json!([1, "gust-init"]), "{v}");
    assert_eq!(procs[1][0], 2, "{v}");
    assert!(procs.len() <= 4, "{procs:?}");
    assert!(v["ps"].as_u64().unwrap() <= 5, "{v}");
    assert_eq!(v["hostname"], "look");
    assert_eq!(v["uid"], 65534);
    assert_eq!(v["capEff"], "0000000000000000");
    assert_eq!(v["noNewPrivs"], "1");
    assert_eq!(v["seccomp"], "2");
    assert_eq!(v["cwd"], "/var/task");
    assert_eq!(v["files"], json!(["extra.txt", "gust.toml", "index.js"]));
    assert_eq!(v["writeTask"]["ok"], false);
    assert_eq!(v["writeTask"]["code"], "EROFS");
    assert_eq!(v["unshare"]["ok"], false, "seccomp refuses namespaces: {v}");
    for r in v["reads"].as_array().unwrap() {
        assert_eq!(r[1]["ok"], false, "{} is visible: {r}", r[0]);
    }
    for r in v["readFiles"].as_array().unwrap() {
        assert_eq!(r[1]["ok"], false, "{} is readable: {r}", r[0]);
    }
    // Another instance (of another function) has its own /tmp.
    let w = ts.invoke_ok("other", r#"{"check_tmp":"secret"}"#).await;
    assert_eq!(w["tmp"], false);
    assert_eq!(w["env"]["MARK"], Value::Null);
    let again = ts.invoke_ok("look", r#"{"check_tmp":"secret"}"#).await;
    assert_eq!(again["tmp"], true, "the same instance keeps its /tmp");
});

sandbox_test!(
    an_instance_cannot_take_another_instances_invocations,
    async {
        let mut ts = TestServer::start().await;
        ts.deploy(
            &service(&[("victim", ""), ("thief", "")]),
            &[("index.js", PROBE)],
        )
        .await;
        let victim = ts.invoke_ok("victim", "{}").await;
        // Each instance's Runtime API is on its own loopback; the thief tries the victim's
        // address on the instances' network instead.
        assert_eq!(victim["api"], "127.0.0.1:9001", "{victim}");
        let api = format!("{}:9001", victim["ip"].as_str().expect("an address"));
        let v = ts
            .invoke_ok("thief", &json!({ "steal": api }).to_string())
            .await;
        assert_eq!(v["stolen"], false, "{v}");
        assert!(
            v["ms"].as_u64().unwrap() < 2500,
            "refused at once, not left hanging: {v}"
        );
        // The victim is unharmed and keeps its instance.
        let again = ts.invoke_ok("victim", "{}").await;
        assert_eq!(again["instance"], victim["instance"]);
    }
);

sandbox_test!(no_network_reaches_the_hosts_services, async {
    let mut ts = TestServer::start().await;
    ts.deploy(
        &service(&[("open", ""), ("sealed", "network = \"none\"")]),
        &[("index.js", PROBE)],
    )
    .await;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    // A non-loopback address of this host too, when it has one.
    let mut targets = vec![format!("127.0.0.1:{port}")];
    if let Some(ip) = std::net::UdpSocket::bind("0.0.0.0:0")
        .ok()
        .and_then(|s| s.connect("10.255.255.255:9").ok().map(|_| s))
        .and_then(|s| s.local_addr().ok())
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    {
        targets.push(format!("{ip}:{port}"));
    }
    for t in &targets {
        let ev = json!({ "connect": t }).to_string();
        // The default network reaches the internet (crates/cli/tests/network.rs), not the host.
        let v = ts.invoke_ok("open", &ev).await;
        assert_eq!(v["connected"], false, "default network reaches {t}: {v}");
        let v = ts.invoke_ok("sealed", &ev).await;
        assert_eq!(v["connected"], false, "network = none reaches {t}: {v}");
    }
    // It still serves invocations (its Runtime API lives inside its namespace).
    let v = ts.invoke_ok("sealed", "{}").await;
    assert_eq!(v["api"], "127.0.0.1:9001");
});

sandbox_test!(pre_warmed_sandboxes_specialise_cleanly, async {
    let mut ts = TestServer::start_with(1).await;
    let py = "import os\ndef handler(event, context):\n    return {'mark': os.environ.get('MARK'), 'prewarm': os.environ.get('GUST_PREWARM'), 'cwd': os.getcwd(), 'files': sorted(os.listdir('/var/task')), 'host': os.uname().nodename}\n";
    ts.deploy(
        "[service]\nname = \"pw\"\n\n[functions.a]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nenvironment = { MARK = \"a\" }\n\n[functions.b]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nenvironment = { MARK = \"b\" }\n\n[functions.p]\nruntime = \"python\"\nhandler = \"app.handler\"\nenvironment = { MARK = \"p\" }\n",
        &[("index.js", PROBE), ("app.py", py)],
    )
    .await;
    let exec = || ts.server.as_ref().unwrap().executor();
    let ready = |rt| {
        let deadline = Instant::now() + Duration::from_secs(10);
        async move {
            while exec().prewarmed(rt) < 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            exec().prewarmed(rt)
        }
    };
    use gust_core::Runtime;
    assert_eq!(ready(Runtime::Nodejs).await, 1);
    assert_eq!(ready(Runtime::Python).await, 1);
    let a = ts.invoke_ok("a", r#"{"write_tmp":"from-a"}"#).await;
    assert_eq!(a["env"], json!({"GUST_PREWARM": null, "MARK": "a"}));
    assert_eq!(
        (a["hostname"].as_str(), a["cwd"].as_str()),
        (Some("a"), Some("/var/task"))
    );
    // The pool refills; b gets another sandbox, with nothing of a's.
    assert_eq!(ready(Runtime::Nodejs).await, 1);
    let b = ts.invoke_ok("b", r#"{"check_tmp":"from-a"}"#).await;
    assert_eq!(b["env"]["MARK"], "b");
    assert_eq!(b["tmp"], false);
    assert_eq!(b["hostname"], "b");
    assert_ne!(a["instance"], b["instance"]);
    let p = ts.invoke_ok("p", "{}").await;
    assert_eq!(
        p,
        json!({"mark": "p", "prewarm": null, "cwd": "/var/task", "files": ["app.py", "gust.toml", "index.js"], "host": "p"})
    );
    // All three started from the pool.
    for f in ["a", "b", "p"] {
        let logs = ts.logs(f).await;
        assert!(
            logs.iter().any(|l| l["line"]
                .as_str()
                .is_some_and(|l| l.starts_with("INIT_START") && l.contains("pre-warmed sandbox"))),
            "{f}: {logs:?}"
        );
    }
});

#[test]
fn doctor_reports_the_isolation_in_force() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running as"], "root");
    let has = |k: &str, s: &str| {
        assert!(
            v[k].as_str().is_some_and(|x| x.contains(s)),
            "{k}: {:?} lacks {s:?}",
            v[k]
        )
    };
    has("namespaces", "mount, pid, ipc, uts");
    has("cgroups", "memory (no swap), pids (1024)");
    assert!(
        v["cgroups"].as_str().unwrap().starts_with("cgroup v"),
        "{v}"
    );
    has("privileges", "uid 65534");
    has("seccomp", "syscalls refused");
    has("pre-warmed pool", "available");
    // Human output: one line per topic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gust"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("namespaces")), "{text}");
}
