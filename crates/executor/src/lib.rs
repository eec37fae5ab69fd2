//! gust-executor: creates function instances. Each instance is one runtime process (node or
//! python with a built-in bootstrap, or the function's own `bootstrap`) in a sandbox of its own
//! (gust-sandbox: namespaces, cgroup, seccomp, no privileges; plain processes with
//! `--no-sandbox` or where the host allows no isolation), served the Lambda Runtime API on an
//! endpoint only it can reach, its output captured, its invocation timeout enforced by killing
//! the whole sandbox, and START/END/REPORT lines written. Cold starts take a pre-warmed sandbox
//! when one fits.
//!
//! Depend on it through `gust_core::Executor`; the pool never knows how instances are made.

mod logs;
mod runtime_api;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gust_core::{
    BoxFuture, Executor, FunctionVersion, INIT_TIMEOUT, InitError, Instance, InstanceOutcome,
    InstanceRequest, LATEST, LogSink, Network, Outcome, Runtime, now_ms,
};
use gust_sandbox::{Bind, Host, Limits, NetMode, Sandbox, Spec};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::logs::Capture;
use crate::runtime_api::{Admit, Dispatch, RuntimeApi};

/// The built-in bootstraps, shipped inside the binary.
pub const NODE_BOOTSTRAP: &str = include_str!("../../../runtimes/node/bootstrap.js");
pub const PYTHON_BOOTSTRAP: &str = include_str!("../../../runtimes/python/bootstrap.py");

/// How long a stopping instance gets between SIGTERM and SIGKILL (Lambda's shutdown phase).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Writes the built-in bootstraps under `dir` (once per content) and returns where they are.
pub fn install_runtimes(dir: &Path) -> std::io::Result<RuntimePaths> {
    let write = |name: &str, body: &str| -> std::io::Result<PathBuf> {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(body) {
            std::fs::create_dir_all(path.parent().expect("has parent"))?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(path)
    };
    let python = interpreter(
        "GUST_PYTHON",
        "python3",
        "-c",
        "import sys; sys.stdout.write(sys.executable)",
    );
    let python_source = write("python/bootstrap.py", PYTHON_BOOTSTRAP)?;
    Ok(RuntimePaths {
        node_bootstrap: write("node/bootstrap.js", NODE_BOOTSTRAP)?,
        python_bootstrap: precompile(&python, &python_source),
        node: interpreter(
            "GUST_NODE",
            "node",
            "-e",
            "process.stdout.write(process.execPath)",
        ),
        python,
    })
}

/// Compiles the Python bootstrap to bytecode once, with the interpreter that will run it:
/// Python never caches a script's bytecode, and compiling ~1300 lines costs ~12 ms of every
/// cold start. `python file.pyc` runs it directly. Falls back to the source on any failure.
fn precompile(python: &Path, source: &Path) -> PathBuf {
    let compiled = source.with_extension("pyc");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if matches!((modified(&compiled), modified(source)), (Some(c), Some(s)) if c >= s) {
        return compiled;
    }
    let ok = std::process::Command::new(python)
        .args([
            "-S",
            "-c",
            "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
        ])
        .arg(source)
        .arg(&compiled)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok { compiled } else { source.to_path_buf() }
}

/// The interpreter's real path, resolved once at start: version-manager shims (pyenv, asdf,
/// nvm wrappers) are shell scripts that would add 50-150 ms to every cold start.
fn interpreter(var: &str, default: &str, flag: &str, print_self: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    std::process::Command::new(default)
        .args([flag, print_self])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).into_owned()))
        .unwrap_or_else(|| default.into())
}

#[derive(Debug, Clone)]
pub struct RuntimePaths {
    pub node_bootstrap: PathBuf,
    pub python_bootstrap: PathBuf,
    pub node: PathBuf,
    pub python: PathBuf,
}

/// How instances are run.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// Run every instance in a sandbox when the host allows it (false: plain processes).
    pub sandbox: bool,
    /// The binary that runs as each sandbox's PID 1 (gust itself, argv[0] = "gust-init").
    pub init_exe: PathBuf,
    /// Host paths no instance may see even inside bound system directories (the data dir).
    pub hidden: Vec<PathBuf>,
    /// Pre-warmed sandboxes kept per built-in runtime (nodejs, python).
    pub prewarm: usize,
}

/// Serves gust's endpoint inside an instance (127.0.0.1:9002 in its sandbox): implemented by
/// the gateway, which answers only what instances may call, with its listener's limits.
pub trait Endpoint: Send + Sync {
    /// Accepts and serves the connections of an instance of `function` on `listener`, until
    /// the returned future is dropped (the instance ends).
    fn serve(
        &self,
        listener: TcpListener,
        function: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Where the built-in runtimes' files are inside a sandbox (Lambda's path).
const SANDBOX_RUNTIME_DIR: &str = "/var/runtime";
const SANDBOX_TASK_ROOT: &str = "/var/task";

pub struct ProcessExecutor {
    runtimes: RuntimePaths,
    /// The directory holding `node/` and `python/` bootstraps (bound at /var/runtime).
    runtimes_dir: PathBuf,
    /// Where the instances' Runtime API sockets live: one subdirectory per instance.
    socket_dir: PathBuf,
    sink: Arc<dyn LogSink>,
    /// The host PATH, so that `node`, `python3` and what a bootstrap calls resolve as they do
    /// for the operator (plain processes).
    path: String,
    /// PATH inside sandboxes: the interpreters' bin directories first.
    sandbox_path: String,
    /// Interpreter prefixes outside the system directories, bound read-only in sandboxes.
    interpreter_dirs: Vec<PathBuf>,
    next_id: AtomicU64,
    host: Option<Host>,
    /// Sandboxes started and not yet reaped.
    live: Arc<AtomicUsize>,
    prewarm: usize,
    warm: Mutex<Vec<(Runtime, Zygote)>>,
    refill: Arc<tokio::sync::Notify>,
    stopping: AtomicBool,
    /// Set after the gateway exists; instances started before (restore) use it once set.
    endpoint: Arc<std::sync::OnceLock<Arc<dyn Endpoint>>>,
}

impl ProcessExecutor {
    pub fn new(
        runtimes: RuntimePaths,
        sink: Arc<dyn LogSink>,
        options: ExecutorOptions,
    ) -> ProcessExecutor {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        // Short and private: a Unix socket path is limited to 108 bytes.
        remove_stale_socket_dirs();
        // A fresh directory of our own: never one that already exists (another user could have
        // planted it, or a symlink, to choose what instances get at /run/gust).
        let socket_dir = loop {
            let d = std::env::temp_dir().join(format!(
                "gust-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(&d)
            {
                Ok(()) => break d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    tracing::error!("cannot create {}: {e}", d.display());
                    break d;
                }
            }
        };
        let host = options.sandbox.then(|| {
            Host::probe(
                options.init_exe.clone(),
                &socket_dir,
                options.hidden.clone(),
            )
        });
        let host = match host {
            Some(h) if h.sandboxed() => {
                if let Err(e) = &h.cgroups {
                    tracing::warn!(
                        "SANDBOX LIMITS NOT ENFORCED: {e} (memory, CPU and pids limits are off; run `gust doctor`)"
                    );
                }
                match &h.net {
                    Err(e) => tracing::warn!(
                        "NETWORK NOT ISOLATED: {e}. Instances with network = \"default\" share this host's network, its loopback services included; run `gust doctor`"
                    ),
                    Ok(n) => {
                        for note in &n.notes {
                            tracing::warn!("instances' network: {note}");
                        }
                    }
                }
                Some(h)
            }
            Some(h) => {
                let why = h.namespaces.clone().err().unwrap_or_default();
                tracing::warn!(
                    "NO ISOLATION: {why}. Functions run as plain processes that can see this host's files and processes; run `gust doctor`"
                );
                None
            }
            None => None,
        };
        let runtimes_dir = runtimes
            .node_bootstrap
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let system = |p: &Path| {
            ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"]
                .iter()
                .any(|d| p.starts_with(d))
        };
        let mut interpreter_dirs = Vec::new();
        let mut bins: Vec<String> = Vec::new();
        // Python first: `python3` in a `provided` bootstrap should find the interpreter (and
        // its packages) the operator's python3 resolves to, not the system one next to node.
        for exe in [&runtimes.python, &runtimes.node] {
            let real = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.clone());
            if let Some(bin) = real.parent() {
                let b = bin.display().to_string();
                if !bins.contains(&b) {
                    bins.push(b);
                }
                if let Some(prefix) = bin.parent()
                    && !system(prefix)
                    && prefix != Path::new("/")
                    && !interpreter_dirs
                        .iter()
                        .any(|d: &PathBuf| prefix.starts_with(d))
                {
                    interpreter_dirs.push(prefix.to_path_buf());
                }
            }
        }
        for d in ["/usr/local/bin", "/usr/bin", "/bin"] {
            if !bins.iter().any(|b| b == d) {
                bins.push(d.into());
            }
        }
        let prewarm = if host.as_ref().is_some_and(Host::can_prewarm) {
            options.prewarm
        } else {
            0
        };
        ProcessExecutor {
            runtimes,
            runtimes_dir,
            socket_dir,
            sink,
            path,
            sandbox_path: bins.join(":"),
            interpreter_dirs,
            next_id: AtomicU64::new(1),
            host,
            live: Arc::new(AtomicUsize::new(0)),
            prewarm,
            warm: Mutex::new(Vec::new()),
            refill: Arc::new(tokio::sync::Notify::new()),
            stopping: AtomicBool::new(false),
            endpoint: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Live pre-warmed sandboxes of this runtime, ready to specialise.
    pub fn prewarmed(&self, runtime: Runtime) -> usize {
        self.warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(r, z)| *r == runtime && z.is_alive())
            .count()
    }

    /// Who answers instances at gust's endpoint (set once, after the gateway exists).
    pub fn set_endpoint(&self, endpoint: Arc<dyn Endpoint>) {
        let _ = self.endpoint.set(endpoint);
    }

    /// The network a sandbox for this function gets on this host.
    fn net_mode(&self, network: Network) -> NetMode {
        match (network, &self.host) {
            (Network::None, _) => NetMode::Loopback,
            (Network::Default, Some(h)) if h.net.is_ok() => NetMode::Isolated,
            _ => NetMode::Host,
        }
    }

    /// Every 5 s, checks that the instances' nftables table is still in place and puts it
    /// back (with every live allowance) if something on the host removed it.
    pub fn start_network_watch(self: &Arc<Self>) {
        if self.host.as_ref().is_none_or(|h| h.net.is_err()) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let warn = gust_core::lograte::LogLimiter::new(60_000, 1);
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(ex) = weak.upgrade() else { return };
                if ex.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let checked = tokio::task::spawn_blocking(move || {
                    ex.host
                        .as_ref()
                        .and_then(|h| h.net.as_ref().ok())
                        .map(|n| n.check())
                })
                .await;
                match checked {
                    Ok(Some(Ok(true))) | Ok(None) => {}
                    Ok(Some(Ok(false))) => tracing::error!(
                        "the nftables table inet gust was removed (a flush of the host's ruleset?): put back with every live instance's allowances; instances were NOT isolated until now"
                    ),
                    Ok(Some(Err(e))) => {
                        if let Some(r) = warn.check("net-check", now_ms()) {
                            tracing::error!(
                                "instances' network filter is missing and cannot be put back: {e}{r}"
                            );
                        }
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// What isolation instances get on this host (None: plain processes).
    pub fn host(&self) -> Option<&Host> {
        self.host.as_ref()
    }

    /// Keeps `prewarm` generic sandboxes per built-in runtime ready, refilling in the
    /// background after each one is taken.
    pub fn start_prewarm(self: &Arc<Self>) {
        if self.prewarm == 0 {
            return;
        }
        let weak = Arc::downgrade(self);
        let refill = self.refill.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let Some(ex) = weak.upgrade() else { return };
                if ex.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let missing = [Runtime::Nodejs, Runtime::Python].into_iter().find(|r| {
                    ex.warm
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .filter(|(wr, z)| wr == r && z.is_alive())
                        .count()
                        < ex.prewarm
                });
                let Some(runtime) = missing else {
                    let notified = refill.notified();
                    drop(ex);
                    // Re-check now and then: a pooled sandbox may have died.
                    let _ = tokio::time::timeout(Duration::from_secs(5), notified).await;
                    continue;
                };
                match ex.make_zygote(runtime).await {
                    Ok(z) => {
                        failures = 0;
                        let mut warm = ex.warm.lock().unwrap_or_else(|p| p.into_inner());
                        warm.retain(|(_, z)| z.is_alive());
                        if !ex.stopping.load(Ordering::SeqCst) {
                            warm.push((runtime, z));
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!("pre-warming a {runtime:?} sandbox failed: {}", e.message);
                        drop(ex);
                        tokio::time::sleep(Duration::from_secs(failures.min(30) as u64)).await;
                    }
                }
            }
        });
    }

    fn argv(&self, runtime: Runtime, code_dir: Option<&Path>) -> Result<Vec<String>, String> {
        let sandboxed = self.host.is_some();
        let s = |p: &Path| p.display().to_string();
        let bootstrap = |p: &Path, sub: &str| {
            if sandboxed {
                format!(
                    "{SANDBOX_RUNTIME_DIR}/{sub}/{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                )
            } else {
                s(p)
            }
        };
        Ok(match runtime {
            Runtime::Nodejs => vec![
                s(&self.runtimes.node),
                bootstrap(&self.runtimes.node_bootstrap, "node"),
            ],
            // -S: see _setup_sys_path in bootstrap.py (site-packages without .pth processing).
            Runtime::Python => vec![
                s(&self.runtimes.python),
                "-S".into(),
                "-u".into(),
                bootstrap(&self.runtimes.python_bootstrap, "python"),
            ],
            Runtime::Provided => {
                let code = code_dir.ok_or("a provided runtime has no pre-warmed form")?;
                let file = code.join("bootstrap");
                let meta = std::fs::metadata(&file).map_err(|_| {
                    "runtime \"provided\" needs an executable file named bootstrap at the top of its code directory".to_string()
                })?;
                if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
                    return Err("bootstrap is not executable (chmod +x bootstrap)".into());
                }
                if sandboxed {
                    vec![format!("{SANDBOX_TASK_ROOT}/bootstrap")]
                } else {
                    vec![s(&file)]
                }
            }
        })
    }

    /// The process environment before any function is known: what every instance gets.
    fn base_env(&self, api: &str, socket: Option<&str>, endpoint: bool) -> Vec<(String, String)> {
        let sandboxed = self.host.is_some();
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                if sandboxed {
                    self.sandbox_path.clone()
                } else {
                    self.path.clone()
                },
            ),
            ("LANG".into(), "C.UTF-8".into()),
            ("TZ".into(), "UTC".into()),
            (
                "HOME".into(),
                if sandboxed {
                    "/tmp".into()
                } else {
                    std::env::temp_dir().display().to_string()
                },
            ),
            ("AWS_LAMBDA_RUNTIME_API".into(), api.into()),
        ];
        if let Some(sock) = socket {
            env.push(("GUST_RUNTIME_API_SOCKET".into(), sock.into()));
        }
        if endpoint {
            env.push((
                "GUST_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", gust_sandbox::ENDPOINT_PORT),
            ));
        }
        env
    }

    fn environment(
        &self,
        f: &FunctionVersion,
        api: &str,
        socket: Option<&str>,
        instance: &str,
        endpoint: bool,
    ) -> Vec<(String, String)> {
        let s = &f.spec;
        let sandboxed = self.host.is_some();
        let mut env = self.base_env(api, socket, endpoint);
        env.extend([
            ("_HANDLER".into(), s.handler.clone()),
            (
                "LAMBDA_TASK_ROOT".into(),
                if sandboxed {
                    SANDBOX_TASK_ROOT.into()
                } else {
                    f.code_dir.display().to_string()
                },
            ),
            (
                "LAMBDA_RUNTIME_DIR".into(),
                if sandboxed {
                    SANDBOX_RUNTIME_DIR.into()
                } else {
                    self.runtimes_dir.display().to_string()
                },
            ),
            ("AWS_LAMBDA_FUNCTION_NAME".into(), s.name.clone()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
                s.memory_mb.to_string(),
            ),
            ("AWS_LAMBDA_FUNCTION_VERSION".into(), LATEST.into()),
            ("AWS_LAMBDA_INITIALIZATION_TYPE".into(), "on-demand".into()),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME".into(),
                format!("/aws/lambda/{}", s.name),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME".into(),
                format!(
                    "{}/[{LATEST}]{instance}",
                    gust_core::time::ymd_slash(now_ms())
                ),
            ),
            ("AWS_REGION".into(), gust_core::lambda::REGION.into()),
            (
                "AWS_DEFAULT_REGION".into(),
                gust_core::lambda::REGION.into(),
            ),
        ]);
        if let Some(e) = s.runtime.execution_env() {
            env.push(("AWS_EXECUTION_ENV".into(), e.into()));
        }
        env.extend(s.environment.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    fn new_id(&self) -> String {
        format!(
            "{:016x}",
            self.next_id.fetch_add(1, Ordering::Relaxed) ^ (now_ms() << 20)
        )
    }

    /// Starts a runtime process (sandboxed or plain) with its Runtime API; `f` is None for a
    /// pre-warmed sandbox.
    async fn launch(
        &self,
        f: Option<&FunctionVersion>,
        runtime: Runtime,
    ) -> Result<Launch, InitError> {
        let platform = |m: String| InitError::new("Runtime.Unknown", m);
        let name = f.map_or("(pre-warmed)", |f| f.spec.name.as_str());
        let id = self.new_id();
        let argv = self
            .argv(runtime, f.map(|f| f.code_dir.as_path()))
            .map_err(|m| {
                InitError::new("Runtime.InvalidEntrypoint", format!("function {name}: {m}"))
            })?;
        let network = f.map_or(Network::Default, |f| f.spec.network);
        if network == Network::None && self.host.is_none() {
            return Err(InitError::new(
                "Runtime.Unknown",
                format!(
                    "function {name}: network = \"none\" needs the sandbox, and this server runs functions as plain processes (see `gust doctor`; remove --no-sandbox)"
                ),
            ));
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (api, dispatch) = RuntimeApi::new(f.map(|f| f.arn()), ready_tx);
        let prewarm = f.is_none().then(|| api.prewarm());
        // One directory per instance: in a sandbox it is the only one mounted (/run/gust).
        let inst_dir = self.socket_dir.join(&id);
        std::fs::create_dir(&inst_dir)
            .and_then(|()| {
                std::fs::set_permissions(
                    &inst_dir,
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
            })
            .map_err(|e| platform(format!("create {}: {e}", inst_dir.display())))?;
        let cleanup = InstDir(inst_dir.clone());
        // Built-in runtimes get a Unix socket (cheaper per request than loopback TCP);
        // `provided` runtimes speak plain AWS_LAMBDA_RUNTIME_API host:port.
        let (unix, socket_env) = if runtime != Runtime::Provided {
            let path = inst_dir.join("rt.sock");
            let l = tokio::net::UnixListener::bind(&path)
                .map_err(|e| platform(format!("bind {}: {e}", path.display())))?;
            let _ = std::fs::set_permissions(
                &path,
                std::os::unix::fs::PermissionsExt::from_mode(0o666),
            );
            let env = if self.host.is_some() {
                format!("{}/rt.sock", gust_sandbox::SOCKET_DIR)
            } else {
                path.display().to_string()
            };
            (Some(l), Some(env))
        } else {
            (None, None)
        };
        let net = self.net_mode(network);
        let own_netns = self.host.is_some() && net != NetMode::Host;
        let allow = match f {
            Some(f) if net == NetMode::Isolated => resolve_allowances(f).await?,
            Some(f) if !f.spec.allow_network.is_empty() && net == NetMode::Host => {
                tracing::warn!(
                    "function {name}: allow_network is moot: instances share this host's network here (see `gust doctor`)"
                );
                Vec::new()
            }
            _ => Vec::new(),
        };
        let endpoint = net == NetMode::Isolated;
        let host_tcp = if own_netns {
            None
        } else {
            Some(
                TcpListener::bind(("127.0.0.1", 0))
                    .await
                    .map_err(|e| platform(format!("bind a Runtime API port: {e}")))?,
            )
        };
        let api_addr = match &host_tcp {
            Some(l) => l
                .local_addr()
                .map_err(|e| platform(e.to_string()))?
                .to_string(),
            None => format!("127.0.0.1:{}", gust_sandbox::NETNS_API_PORT),
        };
        let env = match f {
            Some(f) => self.environment(f, &api_addr, socket_env.as_deref(), &id, endpoint),
            None => {
                let mut env = self.base_env(&api_addr, socket_env.as_deref(), endpoint);
                env.push(("GUST_PREWARM".into(), "1".into()));
                env
            }
        };
        let mut endpoint = None;
        let (proc, out, err, tcp, admit) = match &self.host {
            Some(host) => {
                let limits = limits_of(f);
                let spec = Spec {
                    id: id.clone(),
                    hostname: f.map_or("gust-prewarm".into(), |f| f.spec.name.clone()),
                    argv,
                    env,
                    cwd: PathBuf::from(if f.is_some() { SANDBOX_TASK_ROOT } else { "/" }),
                    task: f.map(|f| f.code_dir.clone()),
                    ro_binds: std::iter::once(Bind {
                        src: self.runtimes_dir.clone(),
                        dst: SANDBOX_RUNTIME_DIR.into(),
                    })
                    .chain(self.interpreter_dirs.iter().map(|d| Bind {
                        src: d.clone(),
                        dst: d.clone(),
                    }))
                    .collect(),
                    rw_binds: vec![Bind {
                        src: inst_dir.clone(),
                        dst: gust_sandbox::SOCKET_DIR.into(),
                    }],
                    tmp_mb: f.map_or(gust_core::DEFAULT_EPHEMERAL_STORAGE_MB, |f| {
                        f.spec.ephemeral_storage_mb
                    }) as u64,
                    net,
                    allow,
                    limits,
                };
                let spawned = Sandbox::spawn(host, &spec).await.map_err(|m| {
                    InitError::new(
                        "Runtime.Unknown",
                        format!("function {name}: cannot start its sandbox: {m}"),
                    )
                })?;
                let sandbox = Arc::new(spawned.sandbox);
                endpoint = spawned.endpoint;
                let (tcp, admit): (Option<TcpListener>, Option<Admit>) = match spawned.listener {
                    Some(l) => {
                        let _ = l.set_nonblocking(true);
                        let l = TcpListener::from_std(l)
                            .map_err(|e| platform(format!("Runtime API listener: {e}")))?;
                        (Some(l), None)
                    }
                    None => {
                        let weak = Arc::downgrade(&sandbox);
                        let admit: Admit = Arc::new(move |peer, local| {
                            weak.upgrade().is_some_and(|sb| {
                                tcp_inode(peer, local).is_some_and(|ino| sb.owns_socket(ino))
                            })
                        });
                        (host_tcp, Some(admit))
                    }
                };
                // Counted from here: the exit watcher started below uncounts it.
                self.live.fetch_add(1, Ordering::SeqCst);
                (
                    Proc::Sandboxed(sandbox),
                    Some(spawned.stdout),
                    Some(spawned.stderr),
                    tcp,
                    admit,
                )
            }
            None => {
                let mut cmd = tokio::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .envs(env)
                    .current_dir(f.map_or(self.runtimes_dir.as_path(), |f| f.code_dir.as_path()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    // Its own process group, so that a timeout kills the runtime and everything it started.
                    .process_group(0)
                    .kill_on_drop(true);
                // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        // If gust dies without cleaning up, the runtime goes with it.
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let mut child = cmd.spawn().map_err(|e| {
                    InitError::new(
                        "Runtime.InvalidEntrypoint",
                        format!("function {name}: cannot start its runtime: {e}"),
                    )
                })?;
                let pid = child.id().unwrap_or(0) as i32;
                let out = child.stdout.take().and_then(|s| s.into_owned_fd().ok());
                let err = child.stderr.take().and_then(|s| s.into_owned_fd().ok());
                (Proc::Plain(pid, Some(child)), out, err, host_tcp, None)
            }
        };
        let pipe = |fd: Option<std::os::fd::OwnedFd>| {
            fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        };
        let (out, err) = (pipe(out), pipe(err));
        let server = tokio::spawn(api.clone().serve(tcp, unix, admit));
        let (proc, exited) = self.watch_exit(proc);
        let (Some(out), Some(err)) = (out, err) else {
            server.abort();
            proc.signal(libc::SIGKILL);
            return Err(platform("could not capture the runtime's output".into()));
        };
        Ok(Launch {
            id,
            api,
            dispatch,
            ready_rx,
            server,
            proc,
            out,
            err,
            inst_dir: cleanup,
            exited,
            prewarm,
            api_addr,
            endpoint: endpoint.and_then(|l| {
                let _ = l.set_nonblocking(true);
                TcpListener::from_std(l).ok()
            }),
        })
    }

    /// Reaps the instance when it exits and publishes how it ended.
    fn watch_exit(&self, proc: Proc) -> (Proc, watch::Receiver<Option<ExitInfo>>) {
        let (exit_tx, exit_rx) = watch::channel(None::<ExitInfo>);
        match proc {
            Proc::Plain(pid, Some(mut child)) => {
                tokio::spawn(async move {
                    let status = child.wait().await;
                    // The leader is reaped: kill what it left in its group now, once. After this the
                    // pid may be reused, so nothing signals the group again (see `Proc::signal`).
                    if pid > 0 {
                        // SAFETY: kill(2) on the instance's own process group; ESRCH if it is empty.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                        }
                    }
                    let detail = match status {
                        Ok(s) => describe_exit(s),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    let _ = exit_tx.send(Some(ExitInfo { detail, oom: false }));
                });
                (Proc::Plain(pid, None), exit_rx)
            }
            Proc::Sandboxed(sb) => {
                let watched = sb.clone();
                let live = self.live.clone();
                tokio::spawn(async move {
                    let exit = watched.wait().await;
                    let info = ExitInfo {
                        detail: describe(exit),
                        oom: watched.oom_killed(),
                    };
                    drop(watched);
                    live.fetch_sub(1, Ordering::SeqCst);
                    let _ = exit_tx.send(Some(info));
                });
                (Proc::Sandboxed(sb), exit_rx)
            }
            p @ Proc::Plain(_, None) => (p, exit_rx),
        }
    }

    /// A generic sandbox with the interpreter and bootstrap loaded, waiting for a function.
    async fn make_zygote(&self, runtime: Runtime) -> Result<Zygote, InitError> {
        let mut launch = self.launch(None, runtime).await?;
        let (parked, env_tx) = launch.prewarm.take().expect("launched without a function");
        let mut exited = launch.exited.clone();
        // On every failure below the sandbox and its Runtime API server go.
        let fail = |launch: &Launch| {
            launch.server.abort();
            launch.proc.signal(libc::SIGKILL);
        };
        tokio::select! {
            r = parked => if r.is_err() {
                fail(&launch);
                return Err(InitError::new("Runtime.Unknown", "pre-warmed sandbox vanished"));
            },
            _ = wait_exit(&mut exited) => {
                let detail = launch.exited.borrow().as_ref().map(|e| e.detail.clone()).unwrap_or_default();
                fail(&launch);
                return Err(InitError::new("Runtime.ExitError", format!("pre-warmed runtime exited: {detail}")));
            }
            _ = tokio::time::sleep(INIT_TIMEOUT) => {
                fail(&launch);
                return Err(InitError::new("Sandbox.Timedout", "pre-warmed runtime did not start"));
            }
        }
        Ok(Zygote {
            launch: Some(launch),
            env_tx: Some(env_tx),
        })
    }

    /// A pre-warmed sandbox for this function, when one fits.
    fn take_zygote(&self, f: &FunctionVersion) -> Option<Zygote> {
        if self.prewarm == 0
            || f.spec.network != Network::Default
            || f.spec.ephemeral_storage_mb != gust_core::DEFAULT_EPHEMERAL_STORAGE_MB
        {
            return None;
        }
        // Variables read only at interpreter start would not take effect after it.
        if f.spec.environment.keys().any(|k| {
            k.starts_with("NODE_")
                || k.starts_with("PYTHON")
                || k.starts_with("LD_")
                || k.starts_with("MALLOC_")
                || k.starts_with("LC_")
                || ["LANG", "GLIBC_TUNABLES", "UV_THREADPOOL_SIZE"].contains(&k.as_str())
        }) {
            return None;
        }
        let mut warm = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        warm.retain(|(_, z)| z.is_alive());
        let i = warm.iter().position(|(r, _)| *r == f.spec.runtime)?;
        let (_, z) = warm.swap_remove(i);
        drop(warm);
        self.refill.notify_one();
        Some(z)
    }

    /// Gives a pre-warmed sandbox its function: limits, code, hostname, then environment.
    async fn specialise(
        &self,
        mut z: Zygote,
        f: Arc<FunctionVersion>,
    ) -> Result<Arc<dyn Instance>, InitError> {
        let started = Instant::now();
        let (Some(launch), Some(env_tx)) = (z.launch.as_ref(), z.env_tx.take()) else {
            return Err(InitError::new(
                "Runtime.Unknown",
                "pre-warmed sandbox already used",
            ));
        };
        let Proc::Sandboxed(sb) = &launch.proc else {
            return Err(InitError::new(
                "Runtime.Unknown",
                "pre-warmed instance is not sandboxed",
            ));
        };
        sb.specialise(&f.code_dir, &f.spec.name, &limits_of(Some(&f)))
            .await
            .map_err(|m| {
                InitError::new(
                    "Runtime.Unknown",
                    format!(
                        "function {}: specialise a pre-warmed sandbox: {m}",
                        f.spec.name
                    ),
                )
            })?;
        let allow = resolve_allowances(&f).await?;
        sb.allow(&allow).await.map_err(|m| {
            InitError::new(
                "Runtime.NetworkAllowError",
                format!("function {}: allow_network: {m}", f.spec.name),
            )
        })?;
        launch.api.set_arn(f.arn());
        let api_addr = launch.api_addr.clone();
        let socket = format!("{}/rt.sock", gust_sandbox::SOCKET_DIR);
        let endpoint = launch.endpoint.is_some();
        let env: serde_json::Map<String, serde_json::Value> = self
            .environment(&f, &api_addr, Some(&socket), &launch.id, endpoint)
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let body = serde_json::json!({"env": env, "task_root": SANDBOX_TASK_ROOT});
        if env_tx.send(bytes::Bytes::from(body.to_string())).is_err() {
            return Err(InitError::new(
                "Runtime.Unknown",
                "the pre-warmed runtime went away",
            ));
        }
        let launch = z.launch.take().expect("checked above");
        self.finish(launch, f, started, true).await
    }

    async fn start_instance(
        &self,
        f: Arc<FunctionVersion>,
    ) -> Result<Arc<dyn Instance>, InitError> {
        while let Some(z) = self.take_zygote(&f) {
            match self.specialise(z, f.clone()).await {
                Ok(i) => return Ok(i),
                Err(e) if e.error_type == "Runtime.Unknown" => {
                    tracing::warn!("{}; starting a fresh sandbox", e.message);
                }
                Err(e) => return Err(e),
            }
        }
        let started = Instant::now();
        let launch = self.launch(Some(&f), f.spec.runtime).await?;
        self.finish(launch, f, started, false).await
    }

    /// Captures output and waits for init to end (the first `/next`).
    async fn finish(
        &self,
        launch: Launch,
        f: Arc<FunctionVersion>,
        started: Instant,
        prewarmed: bool,
    ) -> Result<Arc<dyn Instance>, InitError> {
        let platform = |m: String| InitError::new("Runtime.Unknown", m);
        let Launch {
            id,
            api,
            dispatch,
            ready_rx,
            server,
            proc,
            out,
            err,
            inst_dir,
            exited,
            endpoint,
            ..
        } = launch;
        let endpoint_task = endpoint.map(|l| {
            tokio::spawn(serve_endpoint(
                l,
                self.endpoint.clone(),
                f.spec.name.clone(),
            ))
        });
        let capture = Capture::new(out, err, self.sink.clone(), f.spec.name.clone(), id.clone());
        tokio::spawn(capture.clone().run());
        let start = match (&proc, prewarmed) {
            (Proc::Plain(..), _) => "process (no sandbox)",
            (Proc::Sandboxed(_), true) => "pre-warmed sandbox",
            (Proc::Sandboxed(_), false) => "new sandbox",
        };
        capture.platform(
            None,
            format!(
                "INIT_START Runtime Version: {}\tInstance: {id}\tStart: {start}",
                f.spec.runtime.as_str()
            ),
        );
        let instance = Arc::new(ProcessInstance {
            id,
            _inst_dir: inst_dir,
            function: f.clone(),
            proc,
            api,
            dispatch: Mutex::new(Some(dispatch)),
            capture,
            exited,
            server,
            killed: AtomicBool::new(false),
            init_duration: Mutex::new(None),
            memory: Mutex::new(MemorySample::default()),
            endpoint_task,
        });

        // Init ends at the first /next; it fails on /init/error, on exit, or after INIT_TIMEOUT.
        let mut exited = instance.exited.clone();
        let mut ready_rx = ready_rx;
        let vanished = || platform("instance vanished during init".into());
        let result = tokio::select! {
            r = &mut ready_rx => r.unwrap_or_else(|_| Err(vanished())),
            _ = wait_exit(&mut exited) => {
                // Output written just before the exit is still in the pipes.
                instance.capture.drain();
                let info = instance.exited.borrow().clone().unwrap_or_default();
                let (error_type, mut message) = if info.oom {
                    (gust_core::lambda::OUT_OF_MEMORY, instance.oom_message(&info.detail))
                } else {
                    ("Runtime.ExitError", format!("Runtime exited with error: {}", info.detail))
                };
                let recent = instance.capture.recent();
                if !recent.is_empty() {
                    message.push_str("\nLast output:\n");
                    message.push_str(&recent.join("\n"));
                }
                // An /init/error posted before the exit wins: fail_init only fills an empty slot.
                instance.api.fail_init(InitError::new(error_type, message));
                ready_rx.await.unwrap_or_else(|_| Err(vanished()))
            }
            _ = tokio::time::sleep(INIT_TIMEOUT) => Err(InitError::new(
                "Sandbox.Timedout",
                format!("function {}: init did not finish within {} s", f.spec.name, INIT_TIMEOUT.as_secs()),
            )),
        };
        match result {
            Ok(()) => {
                *instance
                    .init_duration
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(started.elapsed());
                Ok(instance)
            }
            Err(e) => {
                instance.capture.platform(None, format!("INIT_REPORT Init Duration: {:.2} ms\tPhase: init\tStatus: error\tError Type: {}", ms(started.elapsed()), e.error_type));
                instance.capture.platform(None, e.message.clone());
                instance.kill();
                Err(e)
            }
        }
    }
}

/// Socket directories (`$TMPDIR/gust-PID-…`) of gust processes that are gone (killed with
/// SIGKILL: nothing ran their cleanup).
fn remove_stale_socket_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("gust-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn limits_of(f: Option<&FunctionVersion>) -> Limits {
    Limits {
        // A pre-warmed sandbox gets the largest limit until it is specialised.
        memory_mb: f.map_or(10240, |f| f.spec.memory_mb as u64),
        pids: gust_sandbox::DEFAULT_PIDS,
    }
}

/// The inode of the socket at `peer` connected to `local`, from /proc/net/tcp (IPv4 loopback).
fn tcp_inode(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Option<u64> {
    let hex = |a: std::net::SocketAddr| -> Option<String> {
        match a {
            std::net::SocketAddr::V4(v4) => Some(format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            )),
            std::net::SocketAddr::V6(_) => None,
        }
    };
    let (p, l) = (hex(peer)?, hex(local)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == p && f[2] == l)
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

/// Removes an instance's socket directory when the instance goes.
struct InstDir(PathBuf);

impl Drop for InstDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started runtime, before it belongs to an instance.
struct Launch {
    id: String,
    api: Arc<RuntimeApi>,
    dispatch: mpsc::Sender<Dispatch>,
    ready_rx: oneshot::Receiver<Result<(), InitError>>,
    server: tokio::task::JoinHandle<()>,
    proc: Proc,
    out: tokio::net::unix::pipe::Receiver,
    err: tokio::net::unix::pipe::Receiver,
    inst_dir: InstDir,
    exited: watch::Receiver<Option<ExitInfo>>,
    prewarm: Option<(oneshot::Receiver<()>, oneshot::Sender<bytes::Bytes>)>,
    /// AWS_LAMBDA_RUNTIME_API as the runtime was started with.
    api_addr: String,
    /// gust's endpoint inside the sandbox (its own network namespace only).
    endpoint: Option<TcpListener>,
}

/// A pre-warmed sandbox (both fields are taken by specialisation; dropping it kills it).
struct Zygote {
    launch: Option<Launch>,
    env_tx: Option<oneshot::Sender<bytes::Bytes>>,
}

impl Zygote {
    fn is_alive(&self) -> bool {
        self.launch
            .as_ref()
            .is_some_and(|l| l.exited.borrow().is_none())
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(l) = &self.launch {
            l.server.abort();
            l.proc.signal(libc::SIGKILL);
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ExitInfo {
    detail: String,
    /// The OOM killer killed a process of the instance.
    oom: bool,
}

/// The runtime: a sandbox, or a plain process group (pid; the child until the watcher takes it).
enum Proc {
    Plain(i32, Option<tokio::process::Child>),
    Sandboxed(Arc<Sandbox>),
}

/// Resolves when the runtime process has exited (without holding the watch's read guard).
async fn wait_exit(rx: &mut watch::Receiver<Option<ExitInfo>>) {
    let _ = rx.wait_for(|e| e.is_some()).await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn describe(e: gust_sandbox::Exit) -> String {
    match e {
        gust_sandbox::Exit::Code(c) => format!("exit status {c}"),
        gust_sandbox::Exit::Signal(sig) => format!("signal: {sig} ({})", signal_name(sig)),
    }
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("signal: {sig} ({})", signal_name(sig)),
        _ => "unknown exit".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

impl Executor for ProcessExecutor {
    fn start(
        &self,
        function: Arc<FunctionVersion>,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, InitError>> {
        Box::pin(self.start_instance(function))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stopping.store(true, Ordering::SeqCst);
            self.refill.notify_one();
            let warm: Vec<_> = self
                .warm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .collect();
            drop(warm);
            // Killed sandboxes are reaped by their watchers within milliseconds.
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(h) = &self.host {
                h.cleanup();
            }
            let _ = std::fs::remove_dir_all(&self.socket_dir);
        })
    }
}

pub struct ProcessInstance {
    id: String,
    _inst_dir: InstDir,
    function: Arc<FunctionVersion>,
    proc: Proc,
    api: Arc<RuntimeApi>,
    dispatch: Mutex<Option<mpsc::Sender<Dispatch>>>,
    capture: Arc<Capture>,
    exited: watch::Receiver<Option<ExitInfo>>,
    server: tokio::task::JoinHandle<()>,
    killed: AtomicBool,
    /// Set at start; taken by the first invocation's REPORT line.
    init_duration: Mutex<Option<Duration>>,
    memory: Mutex<MemorySample>,
    /// Accepts the instance's connections to gust's endpoint.
    endpoint_task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct MemorySample {
    status: Option<std::fs::File>,
    read_at: Option<Instant>,
    peak_mb: u64,
}

/// How long a memory reading is reused for REPORT lines.
const MEMORY_SAMPLE: Duration = Duration::from_millis(20);

impl Proc {
    /// Signals the runtime: a sandbox through its PID 1 (by pidfd, so never a reused pid);
    /// a plain process group only while its leader is not reaped (so the group id cannot have
    /// been reused). After a plain exit the watcher has already killed the group.
    fn signal(&self, sig: i32) {
        match self {
            Proc::Sandboxed(sb) => sb.signal(sig),
            Proc::Plain(pid, _) => {
                if *pid > 0 {
                    // SAFETY: kill(2) with a negative pid signals the instance's own group.
                    unsafe {
                        libc::kill(-*pid, sig);
                    }
                }
            }
        }
    }
}

impl ProcessInstance {
    fn signal_group(&self, sig: i32) {
        if self.exited.borrow().is_none() {
            self.proc.signal(sig);
        }
    }

    fn oom_message(&self, detail: &str) -> String {
        format!(
            "function {} exceeded its memory limit of {} MB and was killed (Runtime exited with error: {detail})",
            self.function.spec.name, self.function.spec.memory_mb
        )
    }

    /// Max Memory Used: the sandbox's cgroup peak (processes, page cache and /tmp, like
    /// Lambda's a high-water mark over the instance's life); for a plain process its peak RSS
    /// (VmHWM). Rendering /proc/PID/status costs ~20 µs, a tenth of the platform's CPU per
    /// warm request, so a reading younger than `MEMORY_SAMPLE` is reused; the file is kept
    /// open for the same reason.
    fn max_memory_mb(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if m.read_at.is_some_and(|t| t.elapsed() < MEMORY_SAMPLE) {
            return m.peak_mb;
        }
        let pid = match &self.proc {
            Proc::Sandboxed(sb) => {
                if let Some(b) = sb.peak_memory_bytes() {
                    m.peak_mb = m.peak_mb.max(b.div_ceil(1024 * 1024));
                }
                m.read_at = Some(Instant::now());
                return m.peak_mb;
            }
            Proc::Plain(pid, _) => *pid,
        };
        if m.status.is_none() {
            m.status = std::fs::File::open(format!("/proc/{pid}/status")).ok();
        }
        let Some(f) = m.status.as_ref() else {
            return m.peak_mb;
        };
        let mut buf = [0u8; 4096];
        let n = f.read_at(&mut buf, 0).unwrap_or(0);
        let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
        if let Some(mb) = text
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.div_ceil(1024))
        {
            m.peak_mb = m.peak_mb.max(mb);
        }
        m.read_at = Some(Instant::now());
        m.peak_mb
    }

    fn report(&self, request_id: &str, elapsed: Duration) {
        let init = self
            .init_duration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut line = format!(
            "REPORT RequestId: {request_id}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\tMax Memory Used: {} MB\t",
            ms(elapsed),
            (ms(elapsed).ceil() as u64).max(1),
            self.function.spec.memory_mb,
            self.max_memory_mb(),
        );
        if let Some(init) = init {
            line.push_str(&format!("Init Duration: {:.2} ms\t", ms(init)));
        }
        self.capture.platform(Some(request_id), line);
    }

    async fn run(&self, req: InstanceRequest) -> InstanceOutcome {
        let id = req.request_id.clone();
        let (reply_tx, reply_rx) = oneshot::channel();
        let deadline_ms = now_ms() + req.timeout.as_millis() as u64;
        let inv = req.invocation;
        self.capture.begin(&id, inv.tail_log);
        self.capture.platform(
            Some(&id),
            format!("START RequestId: {id} Version: {LATEST}"),
        );
        let started = Instant::now();
        let sender = self
            .dispatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sent = sender.is_some_and(|s| {
            s.try_send(Dispatch {
                request_id: id.clone(),
                payload: inv.payload,
                content_type: inv.content_type,
                deadline_ms,
                client_context: inv.client_context,
                trace_id: inv.trace_id,
                reply: reply_tx,
            })
            .is_ok()
        });
        if !sent {
            self.capture
                .platform(Some(&id), format!("END RequestId: {id}"));
            return InstanceOutcome::Crashed {
                detail: "instance is stopping".into(),
                log_tail: self.capture.end(),
            };
        }
        let mut exited = self.exited.clone();
        let mut reply_rx = reply_rx;
        tokio::select! {
            // A reply that is already there wins over an exit noticed at the same time.
            biased;
            r = &mut reply_rx => {
                let outcome = r.unwrap_or_else(|_| Outcome::function_error("Runtime.Unknown", "the instance dropped the invocation"));
                let elapsed = started.elapsed();
                self.capture.drain();
                self.capture.platform(Some(&id), format!("END RequestId: {id}"));
                self.report(&id, elapsed);
                InstanceOutcome::Done { outcome, log_tail: self.capture.end() }
            }
            _ = tokio::time::sleep(req.timeout) => {
                self.kill();
                self.api.abandon_current();
                let elapsed = started.elapsed();
                self.capture.drain();
                self.capture.platform(Some(&id), format!("END RequestId: {id}"));
                self.report(&id, elapsed);
                self.capture.platform(Some(&id), format!(
                    "{} {id} Task timed out after {:.2} seconds",
                    gust_core::time::iso8601_ms(now_ms()),
                    elapsed.as_secs_f64()
                ));
                InstanceOutcome::TimedOut { log_tail: self.capture.end() }
            }
            _ = wait_exit(&mut exited) => {
                self.kill();
                // It died before it took the invocation (it was idle and gone): nothing ran,
                // the pool retries elsewhere. `taken` is set under the same lock as the event
                // is handed out, so this cannot misjudge an invocation that ran.
                if !self.api.was_taken(&id) {
                    self.capture.platform(Some(&id), format!(
                        "RequestId: {id} not taken: the runtime had exited; retrying on another instance"
                    ));
                    self.capture.end();
                    return InstanceOutcome::Unavailable;
                }
                // The runtime may have answered just before it exited (the reply is sent under
                // the lock that clears `current`, so it is in the channel by now).
                if let Ok(outcome) = reply_rx.try_recv() {
                    let elapsed = started.elapsed();
                    self.capture.drain();
                    self.capture.platform(Some(&id), format!("END RequestId: {id}"));
                    self.report(&id, elapsed);
                    return InstanceOutcome::Done { outcome, log_tail: self.capture.end() };
                }
                self.api.abandon_current();
                let info = self.exited.borrow().clone().unwrap_or_default();
                let elapsed = started.elapsed();
                self.capture.drain();
                self.capture.platform(Some(&id), format!("END RequestId: {id}"));
                self.report(&id, elapsed);
                if info.oom {
                    let detail = self.oom_message(&info.detail);
                    self.capture.platform(Some(&id), format!("RequestId: {id} Error: {detail}"));
                    return InstanceOutcome::OutOfMemory { detail, log_tail: self.capture.end() };
                }
                let detail = info.detail;
                self.capture.platform(Some(&id), format!("RequestId: {id} Error: Runtime exited with error: {detail}"));
                InstanceOutcome::Crashed { detail, log_tail: self.capture.end() }
            }
        }
    }
}

impl Instance for ProcessInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn invoke(&self, request: InstanceRequest) -> BoxFuture<'_, InstanceOutcome> {
        Box::pin(self.run(request))
    }

    fn is_alive(&self) -> bool {
        !self.killed.load(Ordering::Relaxed) && self.exited.borrow().is_none()
    }

    fn config_timeout(&self) -> Option<Duration> {
        self.api.config_timeout()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Closing the dispatch channel answers a pending /next with 500, which built-in
            // runtimes take as the signal to exit; SIGTERM covers the rest.
            self.dispatch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            self.signal_group(libc::SIGTERM);
            let mut exited = self.exited.clone();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, wait_exit(&mut exited)).await;
            self.kill();
        })
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        self.dispatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.signal_group(libc::SIGKILL);
        self.server.abort();
        if let Some(t) = &self.endpoint_task {
            t.abort();
        }
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        // Never leave a process behind, whatever path dropped the instance.
        self.signal_group(libc::SIGKILL);
        self.server.abort();
        if let Some(t) = &self.endpoint_task {
            t.abort();
        }
    }
}

/// Serves the instance's connections to gust's endpoint for as long as it lives (the gateway
/// is wired after instances restored at start: wait for it).
async fn serve_endpoint(
    l: TcpListener,
    endpoint: Arc<std::sync::OnceLock<Arc<dyn Endpoint>>>,
    function: String,
) {
    loop {
        if let Some(e) = endpoint.get() {
            return e.serve(l, &function).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resolves the function's `allow_network` (names through the host's resolver, IPv4 only).
async fn resolve_allowances(
    f: &FunctionVersion,
) -> Result<Vec<(std::net::Ipv4Addr, Option<u16>)>, InitError> {
    let mut dests = Vec::new();
    for a in &f.spec.allow_network {
        let addrs: Vec<std::net::Ipv4Addr> = match a.host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((a.host.as_str(), 0)),
            )
            .await
            .map_err(|_| "timed out after 5 s".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|it| {
                it.filter_map(|s| match s.ip() {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect()
            })
            .map_err(|e| {
                InitError::new(
                    "Runtime.NetworkAllowError",
                    format!(
                        "function {}: allow_network {:?}: cannot resolve it: {e}",
                        f.spec.name, a.host
                    ),
                )
            })?,
        };
        dests.extend(addrs.into_iter().map(|ip| (ip, a.port)));
    }
    Ok(dests)
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}
