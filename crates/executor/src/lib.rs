//! gust-executor: creates function instances. The process executor runs one runtime process per
//! instance (node or python with a built-in bootstrap, or the function's own `bootstrap`), serves
//! it the Lambda Runtime API on a loopback port of its own, captures its output, enforces the
//! invocation timeout by killing its whole process group, and writes START/END/REPORT lines.
//!
//! Depend on it through `gust_core::Executor`; the pool never knows how instances are made.
//! Sandboxing (namespaces, cgroups, seccomp) slots in here, around `spawn`.

mod logs;
mod runtime_api;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gust_core::{
    BoxFuture, Executor, FunctionVersion, INIT_TIMEOUT, InitError, Instance, InstanceOutcome,
    InstanceRequest, LATEST, LogSink, Outcome, Runtime, now_ms,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::logs::Capture;
use crate::runtime_api::{Dispatch, RuntimeApi};

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

pub struct ProcessExecutor {
    runtimes: RuntimePaths,
    /// Where the built-in runtimes' Runtime API sockets live (mode 0700, removed on drop).
    socket_dir: PathBuf,
    sink: Arc<dyn LogSink>,
    /// The host PATH, so that `node`, `python3` and what a bootstrap calls resolve as they do
    /// for the operator.
    path: String,
    next_id: AtomicU64,
}

impl ProcessExecutor {
    pub fn new(runtimes: RuntimePaths, sink: Arc<dyn LogSink>) -> ProcessExecutor {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        // Short and private: a Unix socket path is limited to 108 bytes.
        let socket_dir =
            std::env::temp_dir().join(format!("gust-{}-{:x}", std::process::id(), now_ms()));
        let _ = std::fs::create_dir_all(&socket_dir);
        let _ = std::fs::set_permissions(
            &socket_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        );
        ProcessExecutor {
            runtimes,
            socket_dir,
            sink,
            path,
            next_id: AtomicU64::new(1),
        }
    }

    fn command(&self, f: &FunctionVersion) -> Result<tokio::process::Command, InitError> {
        let cmd = match f.spec.runtime {
            Runtime::Nodejs => {
                let mut c = tokio::process::Command::new(&self.runtimes.node);
                c.arg(&self.runtimes.node_bootstrap);
                c
            }
            Runtime::Python => {
                let mut c = tokio::process::Command::new(&self.runtimes.python);
                // -S: see _setup_sys_path in bootstrap.py (site-packages without .pth processing).
                c.arg("-S").arg("-u").arg(&self.runtimes.python_bootstrap);
                c
            }
            Runtime::Provided => {
                let bootstrap = f.code_dir.join("bootstrap");
                let meta = std::fs::metadata(&bootstrap).map_err(|_| {
                    InitError::new(
                        "Runtime.InvalidEntrypoint",
                        format!(
                            "function {}: runtime \"provided\" needs an executable file named bootstrap at the top of its code directory",
                            f.spec.name
                        ),
                    )
                })?;
                if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
                    return Err(InitError::new(
                        "Runtime.InvalidEntrypoint",
                        format!(
                            "function {}: bootstrap is not executable (chmod +x bootstrap)",
                            f.spec.name
                        ),
                    ));
                }
                tokio::process::Command::new(bootstrap)
            }
        };
        Ok(cmd)
    }

    fn environment(&self, f: &FunctionVersion, api: &str, instance: &str) -> Vec<(String, String)> {
        let s = &f.spec;
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), self.path.clone()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TZ".into(), "UTC".into()),
            ("HOME".into(), std::env::temp_dir().display().to_string()),
            ("AWS_LAMBDA_RUNTIME_API".into(), api.into()),
            ("_HANDLER".into(), s.handler.clone()),
            ("LAMBDA_TASK_ROOT".into(), f.code_dir.display().to_string()),
            (
                "LAMBDA_RUNTIME_DIR".into(),
                self.runtimes
                    .node_bootstrap
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
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
        ];
        if let Some(e) = s.runtime.execution_env() {
            env.push(("AWS_EXECUTION_ENV".into(), e.into()));
        }
        env.extend(s.environment.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    async fn start_instance(
        &self,
        f: Arc<FunctionVersion>,
    ) -> Result<Arc<dyn Instance>, InitError> {
        let started = Instant::now();
        let platform = |m: String| InitError::new("Runtime.Unknown", m);
        let id = format!(
            "{:016x}",
            self.next_id.fetch_add(1, Ordering::Relaxed) ^ (now_ms() << 20)
        );
        let mut cmd = self.command(&f)?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| platform(format!("bind a Runtime API port: {e}")))?;
        let api_addr = listener.local_addr().map_err(|e| platform(e.to_string()))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (api, dispatch) = RuntimeApi::new(f.arn(), ready_tx);
        // Built-in runtimes also get a Unix socket (cheaper per request than loopback TCP);
        // `provided` runtimes speak plain AWS_LAMBDA_RUNTIME_API host:port.
        let socket_path = (f.spec.runtime != Runtime::Provided)
            .then(|| self.socket_dir.join(format!("{id}.sock")));
        let unix = match &socket_path {
            Some(p) => Some(
                tokio::net::UnixListener::bind(p)
                    .map_err(|e| platform(format!("bind {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let server = tokio::spawn(api.clone().serve(listener, unix));

        cmd.env_clear()
            .envs(self.environment(&f, &api_addr.to_string(), &id));
        if let Some(p) = &socket_path {
            cmd.env("GUST_RUNTIME_API_SOCKET", p);
        }
        cmd.current_dir(&f.code_dir)
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
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                server.abort();
                if let Some(p) = &socket_path {
                    let _ = std::fs::remove_file(p);
                }
                return Err(InitError::new(
                    "Runtime.InvalidEntrypoint",
                    format!("function {}: cannot start its runtime: {e}", f.spec.name),
                ));
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        let pipe = |fd: Option<std::os::fd::OwnedFd>| {
            fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        };
        let out = pipe(child.stdout.take().and_then(|s| s.into_owned_fd().ok()));
        let err = pipe(child.stderr.take().and_then(|s| s.into_owned_fd().ok()));
        let (Some(out), Some(err)) = (out, err) else {
            server.abort();
            // SAFETY: the child's own group; it has not been reaped (we still own `child`).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            if let Some(p) = &socket_path {
                let _ = std::fs::remove_file(p);
            }
            return Err(platform("could not capture the runtime's output".into()));
        };
        let capture = Capture::new(out, err, self.sink.clone(), f.spec.name.clone(), id.clone());
        tokio::spawn(capture.clone().run());

        let (exit_tx, exit_rx) = watch::channel(None::<String>);
        tokio::spawn(async move {
            let status = child.wait().await;
            // The leader is reaped: kill what it left in its group now, once. After this the
            // pid may be reused, so nothing signals the group again (see `signal_group`).
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
            let _ = exit_tx.send(Some(detail));
        });

        let instance = Arc::new(ProcessInstance {
            id,
            socket_path,
            function: f.clone(),
            pid,
            api,
            dispatch: Mutex::new(Some(dispatch)),
            capture,
            exited: exit_rx,
            server,
            killed: AtomicBool::new(false),
            init_duration: Mutex::new(None),
            memory: Mutex::new(MemorySample::default()),
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
                let detail = instance.exited.borrow().clone().unwrap_or_default();
                let mut message = format!("Runtime exited with error: {detail}");
                let recent = instance.capture.recent();
                if !recent.is_empty() {
                    message.push_str("\nLast output:\n");
                    message.push_str(&recent.join("\n"));
                }
                // An /init/error posted before the exit wins: fail_init only fills an empty slot.
                instance.api.fail_init(InitError::new("Runtime.ExitError", message));
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

/// Resolves when the runtime process has exited (without holding the watch's read guard).
async fn wait_exit(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(|e| e.is_some()).await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
}

pub struct ProcessInstance {
    id: String,
    socket_path: Option<PathBuf>,
    function: Arc<FunctionVersion>,
    pid: i32,
    api: Arc<RuntimeApi>,
    dispatch: Mutex<Option<mpsc::Sender<Dispatch>>>,
    capture: Arc<Capture>,
    exited: watch::Receiver<Option<String>>,
    server: tokio::task::JoinHandle<()>,
    killed: AtomicBool,
    /// Set at start; taken by the first invocation's REPORT line.
    init_duration: Mutex<Option<Duration>>,
    memory: Mutex<MemorySample>,
}

#[derive(Default)]
struct MemorySample {
    status: Option<std::fs::File>,
    read_at: Option<Instant>,
    peak_mb: u64,
}

/// How long a memory reading is reused for REPORT lines.
const MEMORY_SAMPLE: Duration = Duration::from_millis(20);

impl ProcessInstance {
    /// Signals the instance's process group while its leader is not yet reaped (so the pid,
    /// and with it the group id, cannot have been reused); after the exit the watcher task has
    /// already killed the group.
    fn signal_group(&self, sig: i32) {
        if self.pid > 0 && self.exited.borrow().is_none() {
            // SAFETY: kill(2) with a negative pid signals the instance's own process group.
            unsafe {
                libc::kill(-self.pid, sig);
            }
        }
    }

    /// Peak RSS of the runtime process (VmHWM), like Lambda's Max Memory Used a high-water
    /// mark over the instance's life. Rendering /proc/PID/status costs ~20 µs, a tenth of the
    /// platform's CPU per warm request, so a reading younger than `MEMORY_SAMPLE` is reused;
    /// the file is kept open for the same reason.
    fn max_memory_mb(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if m.read_at.is_some_and(|t| t.elapsed() < MEMORY_SAMPLE) {
            return m.peak_mb;
        }
        if m.status.is_none() {
            m.status = std::fs::File::open(format!("/proc/{}/status", self.pid)).ok();
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
                let detail = self.exited.borrow().clone().unwrap_or_default();
                let elapsed = started.elapsed();
                self.capture.drain();
                self.capture.platform(Some(&id), format!("END RequestId: {id}"));
                self.report(&id, elapsed);
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
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        // Never leave a process behind, whatever path dropped the instance.
        self.signal_group(libc::SIGKILL);
        self.server.abort();
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}
