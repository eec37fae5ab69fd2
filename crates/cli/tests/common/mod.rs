//! Test harness: a real gust server in-process on 127.0.0.1:0 (the same wiring as `gust serve`),
//! real node/python processes, and helpers to deploy services written into temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gust::client::{Client, Reply};
use gust::server::{self, Server, ServerConfig};
use http::Method;
use serde_json::Value;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A child process (a real `gust serve`) killed when the test ends, even half-way, so that no
/// server outlives it (or holds its output).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gust-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestServer {
    pub server: Option<Server>,
    pub client: Client,
    pub anon: Client,
    pub data: TempDir,
    pub dirs: Vec<TempDir>,
}

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(0).await
    }

    /// A server keeping `prewarm` pre-warmed sandboxes per built-in runtime.
    pub async fn start_with(prewarm: usize) -> TestServer {
        TestServer::start_config(|c| ServerConfig { prewarm, ..c }).await
    }

    /// A server whose configuration `f` makes from the tests' default (`config`).
    pub async fn start_config(f: impl FnOnce(ServerConfig) -> ServerConfig) -> TestServer {
        // RUST_LOG=debug shows the server's log for a failing test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let data = TempDir::new("data");
        let server = server::start(f(config(data.path())))
            .await
            .expect("server starts");
        let client = Client::new(&server.url(), Some(server.token.clone()));
        let anon = Client::new(&server.url(), None);
        TestServer {
            server: Some(server),
            client,
            anon,
            data,
            dirs: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        self.server.as_ref().unwrap().url()
    }

    /// Stops the server and starts a new one on the same data dir.
    pub async fn restart(&mut self) {
        self.server.take().unwrap().stop().await;
        let server = start_on(self.data.path()).await;
        self.client = Client::new(&server.url(), Some(server.token.clone()));
        self.anon = Client::new(&server.url(), None);
        self.server = Some(server);
    }

    /// Stops the server and starts a new one on the same data dir with the configuration `f`
    /// makes from the tests' default.
    pub async fn restart_config(&mut self, f: impl FnOnce(ServerConfig) -> ServerConfig) {
        self.server.take().unwrap().stop().await;
        let server = server::start(f(config(self.data.path())))
            .await
            .expect("server starts");
        self.client = Client::new(&server.url(), Some(server.token.clone()));
        self.anon = Client::new(&server.url(), None);
        self.server = Some(server);
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// Starts the server again on the same data dir after `stop`.
    pub async fn start_again(&mut self) {
        let server = start_on(self.data.path()).await;
        self.client = Client::new(&server.url(), Some(server.token.clone()));
        self.anon = Client::new(&server.url(), None);
        self.server = Some(server);
    }

    /// A raw admin API call (JSON body) that must succeed.
    pub async fn admin_json(&self, method: Method, path: &str, body: Value) -> Value {
        let r = self.admin_raw(method, path, body.to_string()).await;
        assert!(
            r.status.is_success(),
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Log lines (text) of a function, polled until `pred` holds over them or `limit` passes.
    pub async fn wait_logs(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let lines: Vec<String> = self
                .logs(name)
                .await
                .iter()
                .filter_map(|l| l["line"].as_str().map(str::to_string))
                .collect();
            if pred(&lines) || Instant::now() >= deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes a service (gust.toml + files) into a temp dir and deploys it.
    pub async fn deploy(&mut self, manifest: &str, files: &[(&str, &str)]) -> Value {
        let dir = write_service(manifest, files);
        let r = gust::client::deploy(&self.client, dir.path(), |_| {})
            .await
            .expect("deploy");
        self.dirs.push(dir);
        r
    }

    pub async fn deploy_dir(&self, dir: &Path) -> anyhow::Result<Value> {
        gust::client::deploy(&self.client, dir, |_| {}).await
    }

    pub async fn invoke(&self, name: &str, payload: &str) -> Reply {
        self.invoke_with(name, payload, &[]).await
    }

    pub async fn invoke_with(&self, name: &str, payload: &str, headers: &[(&str, &str)]) -> Reply {
        self.anon
            .request(
                Method::POST,
                &format!("/2015-03-31/functions/{name}/invocations"),
                headers,
                Bytes::from(payload.to_string()),
            )
            .await
            .expect("invoke request")
    }

    /// Invokes and parses the JSON body, asserting success without a function error.
    pub async fn invoke_ok(&self, name: &str, payload: &str) -> Value {
        let r = self.invoke(name, payload).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            r.headers.get("x-amz-function-error").is_none(),
            "function error: {}",
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).expect("JSON body")
    }

    /// A raw admin API call with the token, whatever the status.
    pub async fn admin_raw(&self, method: Method, path: &str, body: String) -> Reply {
        self.client
            .request(method, path, &[], Bytes::from(body))
            .await
            .expect("admin request")
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.anon
            .request(Method::GET, path, &[], Bytes::new())
            .await
            .expect("GET")
    }

    pub async fn describe(&self, name: &str) -> Value {
        self.client
            .admin(Method::GET, &format!("/functions/{name}"), Bytes::new())
            .await
            .expect("describe")
    }

    /// Polls `describe` until `pred` holds or the deadline passes; returns the last snapshot.
    pub async fn wait_for(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.describe(name).await;
            if pred(&v) || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn logs(&self, name: &str) -> Vec<Value> {
        let v = self
            .client
            .admin(
                Method::GET,
                &format!("/functions/{name}/logs?limit=1000"),
                Bytes::new(),
            )
            .await
            .unwrap();
        v["logs"].as_array().cloned().unwrap_or_default()
    }
}

async fn start_on(dir: &Path) -> Server {
    server::start(config(dir)).await.expect("server starts")
}

/// The test server's configuration: sandboxed (the gust binary is each sandbox's init), no
/// pre-warmed pool unless a test asks for one, callbacks allowed to the tests' listeners on
/// 127.0.0.1.
pub fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        shutdown_grace: Duration::from_secs(10),
        init_exe: Some(env!("CARGO_BIN_EXE_gust").into()),
        prewarm: 0,
        allow_callback: vec!["127.0.0.1".into()],
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf())
    }
}

pub fn write_service(manifest: &str, files: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new("svc");
    std::fs::write(dir.path().join("gust.toml"), manifest).unwrap();
    for (name, body) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        if *name == "bootstrap" || name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    dir
}

pub fn body_json(r: &Reply) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&r.body)))
}

pub fn pid_alive(pid: i64) -> bool {
    // Zombies are not alive; /proc/PID/stat field 3 is the state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The live (non-zombie) processes of an instance's sandbox: its cgroup is named after the
/// instance id.
pub fn instance_procs(id: &str) -> Vec<i32> {
    let needle = format!("/{id}\n");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(&needle) && pid_alive(pid as i64) {
            out.push(pid);
        }
    }
    out
}

/// What a gust process with this pid left behind after it exited: cgroup directories,
/// processes in them, its Runtime API socket directory, mounts.
pub fn leftovers(gust_pid: u32) -> Vec<String> {
    let tag = format!("gust-{gust_pid}-");
    let mut out = Vec::new();
    for dir in own_cgroup_dirs() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&tag) {
                out.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(&format!("/{tag}")) && pid_alive(pid) {
            out.push(format!("process {pid}"));
        }
    }
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&tag) {
            out.push(format!("dir {}", e.path().display()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    out.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&tag))
            .map(|l| format!("mount {l}")),
    );
    out
}

/// This process's cgroup directories in every v1 hierarchy (and the v2 one).
pub fn own_cgroup_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
    {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next(), p.next().unwrap_or(""), p.next().unwrap_or(""));
        let mount = if ctrls.is_empty() {
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .find(|m| Path::new(m).join("cgroup.controllers").exists())
                .map(PathBuf::from)
        } else {
            ctrls
                .split(',')
                .map(|c| Path::new("/sys/fs/cgroup").join(c.trim_start_matches("name=")))
                .find(|m| m.exists())
        };
        if let Some(m) = mount {
            out.push(m.join(path.trim_start_matches('/')));
        }
    }
    out
}

/// Polls until no process of the instance is left (or `limit` passes); returns what is left.
pub async fn instance_gone(id: &str, limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = instance_procs(id);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A manifest for one function with extra lines in its table.
pub fn manifest(service: &str, name: &str, runtime: &str, handler: &str, extra: &str) -> String {
    format!(
        "[service]\nname = \"{service}\"\n\n[functions.{name}]\nruntime = \"{runtime}\"\nhandler = \"{handler}\"\n{extra}\n"
    )
}

/// This host's address on its default route (what an instance must be allowed to reach, with
/// `allow_network`, to talk to a test's listener: its own 127.0.0.1 is not the host's).
pub fn host_address() -> String {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("8.8.8.8:9").unwrap();
    s.local_addr().unwrap().ip().to_string()
}

/// Reads a real `gust serve`'s stderr (piped) until it says where it listens, returns that URL,
/// and drains the rest of its output in a thread (so the server never blocks on a full pipe).
pub fn listening_url(server: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(server.stderr.take().expect("stderr piped")).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("gust is listening on ").map(str::to_string))
        .expect("server printed its URL");
    std::thread::spawn(move || for _ in lines {});
    url
}
