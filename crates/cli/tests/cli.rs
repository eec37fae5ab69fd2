//! The real `gust` binary: `serve` as a child process, the client commands against it, and a
//! SIGTERM that must stop everything.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, TempDir, listening_url, pid_alive};
use serde_json::Value;

const GUST: &str = env!("CARGO_BIN_EXE_gust");

fn gust(data: &TempDir, server: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(GUST)
        .args(args)
        .env("GUST_SERVER", server)
        .env("GUST_DATA_DIR", "state")
        .env_remove("GUST_TOKEN")
        .current_dir(data.path())
        .output()
        .expect("run gust");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_round_trip_and_sigterm() {
    let data = TempDir::new("cli");
    // A relative data dir, as the default `.gust` is: runtimes run elsewhere (in their code dir).
    let mut server = Command::new(GUST)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("GUST_DATA_DIR", "state")
        .current_dir(data.path())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let mut url = None;
    let mut token_shown = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        token_shown |= line.contains("admin token (shown once");
        if let Some(u) = line.strip_prefix("gust is listening on ") {
            url = Some(u.to_string());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let url = url.expect("server printed its URL");
    assert!(token_shown, "the token is shown on first start");

    // Without the token, client commands say what to do.
    let (ok, _, err) = gust(&data, &url, &["--token", "wrong", "ls"]);
    assert!(!ok && err.contains("refused the admin token"), "{err}");

    let (ok, out, err) = gust(&data, &url, &["init", "hello", "--runtime", "python"]);
    assert!(ok, "{err}");
    assert!(out.contains("created hello/"));
    let (ok, _, err) = gust(&data, &url, &["init", "hello"]);
    assert!(!ok && err.contains("already exists"));

    let (ok, out, err) = gust(&data, &url, &["deploy", "hello"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("packing hello")
            && err.contains("uploading")
            && err.contains("deploying service hello"),
        "{err}"
    );
    assert!(out.contains(&format!("{url}/fn/hello")), "{out}");

    let (ok, out, err) = gust(
        &data,
        &url,
        &["invoke", "hello", "--data", r#"{"a":1}"#, "--log"],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["statusCode"], 200);
    assert!(
        err.contains("START RequestId:") && err.contains("REPORT RequestId:"),
        "{err}"
    );

    let (ok, _, err) = gust(&data, &url, &["invoke", "hello", "--data", "not json"]);
    assert!(!ok && err.contains("payload is not JSON"));
    let (ok, _, err) = gust(&data, &url, &["invoke", "nope"]);
    assert!(!ok && err.contains("ResourceNotFoundException"), "{err}");

    let (ok, out, _) = gust(&data, &url, &["--json", "ls"]);
    assert!(ok);
    let fs: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fs[0]["name"], "hello");
    assert_eq!(fs[0]["instances"]["idle"], 1);
    let (ok, out, _) = gust(&data, &url, &["describe", "hello"]);
    assert!(
        ok && out.contains("runtime:     python") && out.contains("1 invocations"),
        "{out}"
    );
    let (ok, out, _) = gust(&data, &url, &["logs", "hello"]);
    assert!(ok && out.contains("REPORT RequestId"), "{out}");

    let (ok, out, _) = gust(&data, &url, &["rm", "hello"]);
    assert!(ok && out.contains("removed hello"), "{out}");
    let (ok, _, err) = gust(&data, &url, &["rm", "hello"]);
    assert!(!ok && err.contains("not deployed"));
    let (ok, _, _) = gust(&data, &url, &["deploy", "hello"]);
    assert!(ok);
    let (ok, out, _) = gust(&data, &url, &["rm", "--service", "hello"]);
    assert!(ok && out.contains("removed hello"), "{out}");
    let (ok, _, _) = gust(&data, &url, &["deploy", "hello"]);
    assert!(ok);
    let (ok, _, _) = gust(&data, &url, &["invoke", "hello"]);
    assert!(ok);

    // An instance process exists now; SIGTERM must stop the server and it.
    let instance_pids: Vec<i64> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .nth(3)
                        .map(|pp| pp == server.id().to_string())
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !instance_pids.is_empty(),
        "the server has instance children"
    );
    // Its sandboxes live in cgroups named after the server.
    assert!(
        !common::leftovers(server.id()).is_empty(),
        "the server's sandboxes are visible while it runs"
    );
    // SIGTERM through the kill command.
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    for pid in instance_pids {
        assert!(!pid_alive(pid), "instance {pid} outlived the server");
    }
    // Nothing at all: no cgroup, no process in one, no socket directory, no mount.
    assert_eq!(common::leftovers(server.id()), Vec::<String>::new());
}

#[test]
fn dev_serves_and_deploys_in_one_step() {
    use std::io::{Read, Write};
    let data = TempDir::new("dev");
    // A copy of the example, to edit while `gust dev` watches it.
    let example = data.path().join("hello-node");
    std::fs::create_dir_all(&example).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-node");
    for f in ["gust.toml", "index.js"] {
        std::fs::copy(src.join(f), example.join(f)).unwrap();
    }
    let mut dev = Command::new(GUST)
        .args(["dev", example.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("GUST_DATA_DIR", data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    // Bounded: a `gust dev` that never gets to its curl line is killed after 60 s, which ends
    // its output and fails the test below instead of hanging it.
    let pid = dev.id() as i32;
    let printed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = printed.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if seen.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: kill(2) on our own child, still unreaped (KillOnDrop reaps it later).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    });
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(u) = line.trim().strip_prefix("try: curl -s ") {
            url = Some(u.to_string());
            break;
        }
    }
    printed.store(true, std::sync::atomic::Ordering::Relaxed);
    let url = url.expect("gust dev printed a curl line");
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let path = &url[url.find(&addr).unwrap() + addr.len()..];
    let get = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = get();
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    assert!(resp.contains("Hello, world!"), "{resp}");
    // An edit is picked up without a restart.
    let code = std::fs::read_to_string(example.join("index.js")).unwrap();
    std::fs::write(
        example.join("index.js"),
        code.replace("process.env.GREETING", "'Howdy'"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = get();
        if resp.contains("Howdy, world!") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the edit was not redeployed: {resp}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while dev.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "gust dev did not stop on ctrl-c");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn queue_events_and_schedules_commands() {
    let data = TempDir::new("cli-events");
    let mut server = KillOnDrop(
        Command::new(GUST)
            .args(["serve", "--listen", "127.0.0.1:0", "--prewarm", "0"])
            .env("GUST_DATA_DIR", "state")
            .current_dir(data.path())
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let url = listening_url(&mut server);
    let svc = data.path().join("svc");
    std::fs::create_dir_all(&svc).unwrap();
    std::fs::write(
        svc.join("gust.toml"),
        "[service]\nname = \"svc\"\n[queues.inbox]\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\n\
         [[functions.f.schedules]]\nname = \"nightly\"\nexpression = \"cron(0 3 * * ? *)\"\ntimezone = \"Europe/Paris\"\n",
    )
    .unwrap();
    std::fs::write(
        svc.join("index.js"),
        "exports.handler = async () => ({});\n",
    )
    .unwrap();
    let (ok, _, err) = gust(&data, &url, &["deploy", "svc"]);
    assert!(ok, "{err}");
    let (ok, out, err) = gust(
        &data,
        &url,
        &["queue", "send", "inbox", "--data", "hi", "--attr", "k=v"],
    );
    assert!(ok, "{err}");
    let id = out
        .trim()
        .strip_prefix("sent ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let (ok, out, _) = gust(&data, &url, &["events", "show", &id]);
    assert!(
        ok && out.contains("state:       queued") && out.contains("queue inbox"),
        "{out}"
    );
    let (ok, out, _) = gust(&data, &url, &["queue", "ls"]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("inbox") && l.contains(" 1 ")),
        "{out}"
    );
    let (ok, out, _) = gust(&data, &url, &["queue", "purge", "inbox"]);
    assert!(ok && out.contains("purged 1 messages from inbox"), "{out}");
    let (ok, _, err) = gust(&data, &url, &["queue", "send", "nope", "--data", "x"]);
    assert!(!ok && err.contains("[queues.nope]"), "{err}");
    let (ok, out, _) = gust(&data, &url, &["schedules"]);
    assert!(
        ok && out.contains("f.nightly") && out.contains("cron(0 3 * * ? *) Europe/Paris"),
        "{out}"
    );
    let (ok, _, err) = gust(&data, &url, &["events", "show", "nope"]);
    assert!(!ok && err.contains("no event nope"), "{err}");
}
