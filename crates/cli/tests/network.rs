//! The default network of an instance, for real (root, as CI runs): from inside a sandboxed
//! function the host's loopback services, the host's own address, gust's port, the metadata
//! address, private ranges and other instances are all out of reach, while an "outside" host
//! (a server in a network namespace this test makes, standing in for the internet) answers, an
//! allowed private destination answers on its allowed port only, and gust's endpoint for
//! instances serves the Invoke API and nothing else.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const FN: &str = r#"
const net = require("net");
const fs = require("fs");
const os = require("os");
// A server in every instance, so that another instance can try to reach it.
const server = net.createServer((s) => s.end("hi")).listen(7000, "0.0.0.0");
const probe = (host, port) => new Promise((resolve) => {
  const t = Date.now();
  const s = net.connect({ host, port, timeout: 3000 });
  s.on("connect", () => { s.destroy(); resolve({ ok: true, ms: Date.now() - t }); });
  s.on("timeout", () => { s.destroy(); resolve({ ok: false, code: "TIMEOUT", ms: Date.now() - t }); });
  s.on("error", (e) => resolve({ ok: false, code: e.code, ms: Date.now() - t }));
});
// A connection made while the module loads (init), as code that opens its database at import.
const initProbe = process.env.INIT_PROBE
  ? probe(process.env.INIT_PROBE.split(":")[0], Number(process.env.INIT_PROBE.split(":")[1]))
  : null;
const call = async (method, url, body) => {
  try {
    const r = await fetch(url, { method, body, signal: AbortSignal.timeout(5000) });
    return { status: r.status, body: await r.text() };
  } catch (e) { return { error: String(e.cause || e) }; }
};
exports.handler = async (event) => {
  const out = { probes: {}, calls: {} };
  for (const [k, [h, p]] of Object.entries(event.probe || {})) out.probes[k] = await probe(h, p);
  for (const [k, [m, path, body]] of Object.entries(event.call || {}))
    out.calls[k] = await call(m, process.env.GUST_ENDPOINT_URL + path, body);
  if (initProbe) out.init = await initProbe;
  out.ip = ((os.networkInterfaces().eth0 || [])[0] || {}).address || null;
  out.endpoint = process.env.GUST_ENDPOINT_URL || null;
  out.tcp = fs.readFileSync("/proc/net/tcp", "utf8");
  return out;
};
"#;

/// Runs a command and insists it worked.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the host by a veth pair: 203.0.113.2 (a public-looking
/// address, "the internet") and 10.213.7.2 (a private one) inside, two HTTP servers in it.
struct Outside {
    ns: String,
    link: String,
    servers: Vec<KillOnDrop>,
}

impl Outside {
    fn new() -> Outside {
        let id = std::process::id() % 100_000;
        let ns = format!("gust-out-{id}");
        let link = format!("gxo{id}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        sh(&["ip", "netns", "add", &ns]);
        let out = Outside {
            ns: ns.clone(),
            link: link.clone(),
            servers: Vec::new(),
        };
        sh(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "addr", "add", "203.0.113.1/24", "dev", &link]);
        sh(&["ip", "addr", "add", "10.213.7.1/24", "dev", &link]);
        sh(&["ip", "link", "set", &link, "up"]);
        for a in ["203.0.113.2/24", "10.213.7.2/24"] {
            sh(&["ip", "-n", &ns, "addr", "add", a, "dev", "eth0"]);
        }
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        out
    }

    fn serve(&mut self, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", "0.0.0.0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a server in the outside namespace");
        self.servers.push(KillOnDrop(child));
    }

    /// Waits until the servers answer from the host.
    fn wait(&self, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in ports {
            let addr = format!("203.0.113.2:{p}").parse().unwrap();
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "outside server on {p} did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn probe<'a>(v: &'a Value, k: &str) -> &'a Value {
    &v["probes"][k]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_reach_the_internet_and_nothing_private() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network isolation needs root (CI runs as root)");
        return;
    }
    let mut outside = Outside::new();
    outside.serve(8080);
    outside.serve(8081);
    outside.wait(&[8080, 8081]);

    // A pre-warmed pool, so that `allowed` (deployed and invoked first) is specialised from it.
    let mut ts = TestServer::start_with(1).await;
    let exec = ts.server.as_ref().unwrap().executor();
    if let Err(e) = &exec.host().expect("sandboxed").net {
        panic!("instance networking is unavailable on this host: {e}");
    }
    ts.deploy(
        "[service]\nname = \"net\"\n\n\
         [functions.allowed]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\ntimeout = 20\nallow_network = [\"10.213.7.2:8080\"]\n\n\
         [functions.plain]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n\n\
         [functions.other]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n\n\
         [functions.fresh]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nallow_network = [\"10.213.7.2:8080\"]\n\
         ephemeral_storage = 1024\nenvironment = { INIT_PROBE = \"10.213.7.2:8080\" }\n\n\
         [functions.sealed]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nnetwork = \"none\"\n",
        &[("index.js", FN)],
    )
    .await;

    // Services on the host: one on loopback (PostgreSQL/Redis-like), one on every address.
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_port = lo.local_addr().unwrap().port();
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = any.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in lo.incoming() {});
    std::thread::spawn(move || for _ in any.incoming() {});
    let host = host_address();
    let gust_port = ts.url().rsplit(':').next().unwrap().parse::<u16>().unwrap();

    let other = ts.invoke_ok("other", "{}").await;
    let other_ip = other["ip"]
        .as_str()
        .expect("an instance address")
        .to_string();
    assert!(other_ip.starts_with("10.250."), "{other}");
    // Its server is up (reachable from inside its own instance).
    let me = ts
        .invoke_ok(
            "other",
            &json!({"probe": {"self": ["127.0.0.1", 7000]}}).to_string(),
        )
        .await;
    assert_eq!(probe(&me, "self")["ok"], true, "{me}");

    // `other` took the pre-warmed sandbox: wait for the refill, for `allowed`.
    let exec = ts.server.as_ref().unwrap().executor();
    let deadline = Instant::now() + Duration::from_secs(15);
    while exec.prewarmed(gust_core::Runtime::Nodejs) == 0 {
        assert!(Instant::now() < deadline, "no pre-warmed sandbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The host side of `other`'s veth pair: an address of the host like any other.
    let other_gateway = {
        let ip: std::net::Ipv4Addr = other_ip.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    let probes = json!({
        "other_gateway": [other_gateway, any_port],
        "host_loopback": ["127.0.0.1", lo_port],
        "host_address": [host, any_port],
        "host_address_lo_service": [host, lo_port],
        "gust_loopback": ["127.0.0.1", gust_port],
        "gust_host_address": [host, gust_port],
        "metadata": ["169.254.169.254", 80],
        "other_instance": [other_ip, 7000],
        "private_other_port": ["10.213.7.2", 8081],
        "internet": ["203.0.113.2", 8080],
        "private_allowed": ["10.213.7.2", 8080],
    });
    let calls = json!({
        "invoke": ["POST", "/2015-03-31/functions/other/invocations", "{}"],
        "admin": ["GET", "/_gust/v1/services"],
        "route": ["GET", "/fn/other"],
    });
    let v = ts
        .invoke_ok(
            "allowed",
            &json!({"probe": probes, "call": calls}).to_string(),
        )
        .await;
    for k in [
        "host_loopback",
        "other_gateway",
        "host_address",
        "host_address_lo_service",
        "gust_loopback",
        "gust_host_address",
        "metadata",
        "other_instance",
        "private_other_port",
    ] {
        let p = probe(&v, k);
        assert_eq!(p["ok"], false, "{k} must be out of reach: {p}");
        // Refused at once, not left to time out.
        assert!(p["ms"].as_u64().unwrap() < 2500, "{k}: {p}");
    }
    assert_eq!(probe(&v, "internet")["ok"], true, "{v}");
    assert_eq!(probe(&v, "private_allowed")["ok"], true, "{v}");
    // gust's endpoint: the Invoke API (function-to-function), nothing else.
    assert_eq!(v["endpoint"], "http://127.0.0.1:9002");
    let invoke = &v["calls"]["invoke"];
    assert_eq!(invoke["status"], 200, "{invoke}");
    let inner: Value = serde_json::from_str(invoke["body"].as_str().unwrap()).unwrap();
    // It ran in an instance of `other` (the function's own output shape).
    assert!(
        inner["ip"].as_str().unwrap_or("").starts_with("10.250."),
        "{inner}"
    );
    for k in ["admin", "route"] {
        assert_eq!(v["calls"][k]["status"], 404, "{k}: {}", v["calls"][k]);
    }
    // The instance's /proc/net/tcp lists its own sockets, not the host's listeners.
    let tcp = v["tcp"].as_str().unwrap();
    for port in [lo_port, any_port, gust_port] {
        assert!(
            !tcp.contains(&format!(":{port:04X} ")),
            "the host's port {port} is listed inside the instance:\n{tcp}"
        );
    }
    // Started from the pre-warmed pool (allowances are added at specialisation).
    let lines = ts
        .wait_logs("allowed", Duration::from_secs(5), |l| {
            l.iter().any(|l| l.contains("INIT_START"))
        })
        .await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INIT_START") && l.contains("pre-warmed sandbox")),
        "{lines:?}"
    );

    // A function without the allowance reaches the internet but not the private host.
    let v = ts
        .invoke_ok(
            "plain",
            &json!({"probe": {
                "internet": ["203.0.113.2", 8080],
                "private": ["10.213.7.2", 8080],
            }})
            .to_string(),
        )
        .await;
    assert_eq!(probe(&v, "internet")["ok"], true, "{v}");
    assert_eq!(probe(&v, "private")["ok"], false, "{v}");

    // A new sandbox (not from the pool) has its allowances before its code runs: the module
    // connects while it loads.
    let v = ts.invoke_ok("fresh", "{}").await;
    assert_eq!(v["init"]["ok"], true, "{v}");
    // network = "none": no endpoint either.
    let v = ts.invoke_ok("sealed", "{}").await;
    assert_eq!(v["endpoint"], Value::Null, "{v}");

    // Something on the host removes the table (`flush ruleset`): gust puts it back, with the
    // live instances' allowances, within its 5 s check (another gust process, here the other
    // test's server, may put it back first: each adds its own allowances at its next check).
    sh(&["nft", "delete", "table", "inet", "gust"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !Command::new("nft")
        .args(["list", "table", "inet", "gust"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the table was not put back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = json!({"probe": {
        "private_allowed": ["10.213.7.2", 8080],
        "other_instance": [other_ip, 7000],
    }})
    .to_string();
    loop {
        let v = ts.invoke_ok("allowed", &again).await;
        if probe(&v, "private_allowed")["ok"] == true {
            assert_eq!(probe(&v, "other_instance")["ok"], false, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the allowance did not come back: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_allowance_is_refused_at_deploy() {
    let ts = TestServer::start().await;
    for (entry, says) in [
        ("\"10.0.0.5:0\"", "port must be 1-65535"),
        ("\"[::1]:5432\"", "IPv6"),
        ("\"db internal\"", "host name or IPv4"),
    ] {
        let dir = write_service(
            &format!(
                "[service]\nname = \"bad\"\n\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nallow_network = [{entry}]\n"
            ),
            &[("index.js", FN)],
        );
        let err = ts.deploy_dir(dir.path()).await.unwrap_err().to_string();
        assert!(
            err.contains(says) && err.contains("gust.toml:"),
            "{entry}: {err}"
        );
    }
    let dir = write_service(
        "[service]\nname = \"bad\"\n\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nnetwork = \"none\"\nallow_network = [\"10.0.0.5\"]\n",
        &[("index.js", FN)],
    );
    let err = ts.deploy_dir(dir.path()).await.unwrap_err().to_string();
    assert!(
        err.contains("network = \\\"none\\\"") || err.contains("network = \"none\""),
        "{err}"
    );
}
