//! gust-sandbox: one Linux sandbox per function instance.
//!
//! A sandbox is a process tree in its own mount, PID, IPC, UTS and network namespaces (the
//! network one joined to the host through [`net`] with outbound access only; user namespace
//! when gust is not root), in its own
//! cgroup, whose PID 1 is `gust-init` (the gust binary, see [`init`]). The function's runtime
//! runs as an unprivileged user with no capabilities, `no_new_privs`, a seccomp filter and
//! rlimits, on a read-only root holding only the host's system directories, its code at
//! `/var/task` and a private `/tmp`. Killing PID 1 kills the whole tree; removing the cgroup
//! leaves nothing behind.
//!
//! [`Host::probe`] finds out what this host allows (and says why not, for `gust doctor`);
//! [`Sandbox::spawn`] starts one; [`Sandbox::specialise`] turns a pre-warmed generic sandbox
//! into a function's.

mod cgroup;
pub mod init;
pub mod net;
mod netlink;
pub mod seccomp;
mod sys;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

pub use cgroup::{Cgroup, Layout, MB_PER_VCPU};

/// argv[0] under which the gust binary runs as a sandbox's PID 1.
pub const INIT_ARGV0: &str = "gust-init";
/// The Runtime API port inside a sandbox with its own network namespace.
pub const NETNS_API_PORT: u16 = 9001;
/// gust's endpoint for instances (the Invoke API for function-to-function calls), on the
/// sandbox's own loopback: the one address of gust an instance can reach.
pub const ENDPOINT_PORT: u16 = 9002;
/// Where the Runtime API socket directory is mounted inside a sandbox.
pub const SOCKET_DIR: &str = "/run/gust";
/// The unprivileged user functions run as when gust is root (nobody).
pub const SANDBOX_UID: u32 = 65534;
pub const SANDBOX_GID: u32 = 65534;
/// Processes and threads per instance (Lambda's limit).
pub const DEFAULT_PIDS: u64 = 1024;
/// Open files per process (Lambda's limit).
pub const NOFILE: u64 = 1024;

/// True when this process was started as a sandbox's PID 1: call [`init::main`] first thing.
pub fn is_init() -> bool {
    std::env::args_os().next().is_some_and(|a| a == INIT_ARGV0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_mb: u64,
    pub pids: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
}

/// What PID 1 is told to build (sent over the control socket as one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// An empty host directory to mount the new root on.
    pub root: PathBuf,
    pub hostname: String,
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    pub ro_binds: Vec<Bind>,
    pub rw_binds: Vec<Bind>,
    /// The code, bound read-only at /var/task; None leaves it empty for [`Sandbox::specialise`].
    pub task: Option<PathBuf>,
    /// Paths inside the sandbox hidden under an empty read-only mount.
    pub masks: Vec<PathBuf>,
    pub tmp_mb: u64,
    pub net: InitNet,
    pub seccomp: bool,
    /// (uid, gid) to run the runtime as; None keeps the namespace's root (rootless mode).
    pub user: Option<(u32, u32)>,
    pub nofile: u64,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// One sandbox to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The instance id (names its cgroup).
    pub id: String,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The code directory (None: a pre-warmed sandbox, specialised later).
    pub task: Option<PathBuf>,
    /// Extra read-only binds (the runtime's files, the interpreter's prefix).
    pub ro_binds: Vec<Bind>,
    /// Read-write binds (the Runtime API socket directory).
    pub rw_binds: Vec<Bind>,
    pub tmp_mb: u64,
    pub net: NetMode,
    /// Destinations the instance may reach although private (`NetMode::Isolated`), allowed
    /// before its runtime starts.
    pub allow: Vec<(std::net::Ipv4Addr, Option<u16>)>,
    pub limits: Limits,
}

/// Which network a sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// The host's (no network isolation on this host: rootless, or no nftables).
    Host,
    /// Its own namespace with only loopback (`network = "none"`).
    Loopback,
    /// Its own namespace with outbound access through the host and nothing private
    /// (`network = "default"`, [`net`]).
    Isolated,
}

/// What PID 1 sets up in its network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitNet {
    Host,
    Loopback,
    /// `eth0` (the veth peer) gets `addr/31`, and the default route goes via `gateway`.
    Veth {
        addr: std::net::Ipv4Addr,
        gateway: std::net::Ipv4Addr,
    },
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// What isolation this host gives, and why not more.
pub struct Host {
    /// Namespaces work (as root, or with a user namespace when `rootless`).
    pub namespaces: Result<(), String>,
    pub rootless: bool,
    pub cgroups: Result<Layout, String>,
    pub seccomp: Result<usize, String>,
    /// Instance networking (`network = "default"` isolated from the host's services).
    pub net: Result<net::NetHost, String>,
    init_exe: PathBuf,
    /// Empty directory used as the mount point of every sandbox's root (in its own namespace).
    root_dir: PathBuf,
    /// Host paths no sandbox may see even when they sit inside a bound system directory.
    masks: Vec<PathBuf>,
}

impl Host {
    /// Probes the host: tries the namespaces for real, sets up cgroups, compiles the filter.
    /// `work_dir` is a private directory of the executor; `masks` are host paths (the data
    /// dir) to hide inside sandboxes.
    pub fn probe(init_exe: PathBuf, work_dir: &Path, masks: Vec<PathBuf>) -> Host {
        Host::probe_with(init_exe, work_dir, masks, true)
    }

    /// [`Host::probe`]; with `install` false (`gust doctor`) the host's network configuration
    /// (nftables, forwarding) is only inspected, never changed.
    pub fn probe_with(
        init_exe: PathBuf,
        work_dir: &Path,
        masks: Vec<PathBuf>,
        install: bool,
    ) -> Host {
        // SAFETY: geteuid has no preconditions.
        let rootless = unsafe { libc::geteuid() } != 0;
        let root_dir = work_dir.join("root");
        let _ = std::fs::create_dir_all(&root_dir);
        let namespaces = if !init_exe.is_file() {
            Err(format!(
                "the init binary {} does not exist",
                init_exe.display()
            ))
        } else {
            try_namespaces(rootless)
        };
        let cgroups = if namespaces.is_err() {
            Err("no sandbox, so no cgroup".to_string())
        } else if rootless {
            Err("not root: cgroup limits need root or a delegated cgroup v2 subtree (not supported yet)".to_string())
        } else {
            Layout::setup()
        };
        let net = if namespaces.is_err() {
            Err("no sandbox, so no network namespace".to_string())
        } else if rootless {
            Err("not root: a veth pair and the nftables filter need root".to_string())
        } else {
            net::NetHost::setup(install)
        };
        Host {
            namespaces,
            rootless,
            cgroups,
            net,
            seccomp: seccomp::filters().map(|_| seccomp::denied_count()),
            init_exe,
            root_dir,
            masks,
        }
    }

    pub fn sandboxed(&self) -> bool {
        self.namespaces.is_ok()
    }

    /// Pre-warmed sandboxes need to mount code into a running sandbox (root only).
    pub fn can_prewarm(&self) -> bool {
        self.sandboxed() && !self.rootless
    }

    /// `gust doctor`'s lines: (what, state and why).
    pub fn report(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let ok = |s: &str| s.to_string();
        out.push((
            "namespaces".into(),
            match &self.namespaces {
                Ok(()) if self.rootless => ok("mount, pid, ipc, uts (+net for network = \"none\") inside a user namespace (not root)"),
                Ok(()) if self.net.is_err() => ok("mount, pid, ipc, uts (+net for network = \"none\")"),
                Ok(()) => ok("mount, pid, ipc, uts, net"),
                Err(e) => format!("NONE: {e} -- functions run as plain processes with NO isolation"),
            },
        ));
        out.push((
            "filesystem".into(),
            if self.sandboxed() {
                ok("read-only root of /usr, /etc, /bin, /lib*, /sbin and the runtimes; code read-only at /var/task; private tmpfs /tmp (ephemeral_storage)")
            } else {
                ok("NOT isolated: functions see the host's files")
            },
        ));
        out.push((
            "cgroups".into(),
            match &self.cgroups {
                Ok(l) => format!("{}: memory (no swap), pids ({DEFAULT_PIDS}), cpu share and cap by memory ({MB_PER_VCPU} MB = 1 vCPU)", l.describe()),
                Err(e) => format!("NONE: {e} -- memory, CPU and pids limits are NOT enforced"),
            },
        ));
        out.push((
            "privileges".into(),
            if !self.sandboxed() {
                ok("NOT dropped")
            } else if self.rootless {
                ok("no capabilities, no_new_privs; runs as your uid (mapped to root in its user namespace)")
            } else {
                format!("no capabilities, no_new_privs; runs as uid {SANDBOX_UID}")
            },
        ));
        out.push((
            "seccomp".into(),
            match (&self.seccomp, self.sandboxed()) {
                (Ok(n), true) => format!("{n} syscalls refused with EPERM (mount, ptrace, bpf, keyctl, kernel modules, ...), namespace-creating clone flags refused"),
                (Ok(_), false) => ok("NOT applied (no sandbox)"),
                (Err(e), _) => format!("NONE: {e}"),
            },
        ));
        out.push((
            "rlimits".into(),
            format!("{NOFILE} open files, no core dumps"),
        ));
        out.push((
            "network".into(),
            match (&self.net, self.sandboxed()) {
                (Ok(n), _) => {
                    let mut s = format!(
                        "own namespace per instance: outbound through the host ({} veth pairs, masquerade); the host's loopback and addresses, other instances, link-local and private ranges refused unless allowed (nftables table inet gust); DNS via {}; gust's endpoint at 127.0.0.1:{ENDPOINT_PORT}; network = \"none\": loopback only",
                        net::INSTANCE_NET,
                        if n.dns.is_empty() { "nothing".to_string() } else { n.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ") }
                    );
                    for note in &n.notes {
                        s.push_str("; ");
                        s.push_str(note);
                    }
                    s
                }
                (Err(e), true) => format!("NOT ISOLATED: {e} -- network = \"default\" is the host's network (its loopback services included); network = \"none\" gives a private namespace with only loopback"),
                (Err(_), false) => ok("host network; network = \"none\" is NOT available"),
            },
        ));
        out.push((
            "pre-warmed pool".into(),
            if self.can_prewarm() {
                ok("available (nodejs, python)")
            } else {
                ok("unavailable (needs root and namespaces)")
            },
        ));
        out
    }

    /// Removes our cgroup directories (call after every sandbox is gone).
    pub fn cleanup(&self) {
        if let Ok(l) = &self.cgroups {
            l.remove();
        }
    }
}

/// Starts and reaps a child in the namespaces a sandbox uses.
fn try_namespaces(rootless: bool) -> Result<(), String> {
    let mut args = sys::CloneArgs {
        flags: ns_flags(rootless, false),
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the child only calls _exit.
    let pid = unsafe { sys::clone3(&mut args) }.map_err(|e| {
        format!(
            "creating namespaces failed: {e}{}",
            if rootless {
                " (unprivileged user namespaces are disabled on this host: kernel.unprivileged_userns_clone or user.max_user_namespaces)"
            } else {
                ""
            }
        )
    })?;
    if pid == 0 {
        // SAFETY: immediate exit of the probe child.
        unsafe { libc::_exit(0) }
    }
    let mut status = 0;
    // SAFETY: reaping the child we just made.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(())
}

fn ns_flags(rootless: bool, host_network: bool) -> u64 {
    let mut f = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !host_network {
        f |= libc::CLONE_NEWNET;
    }
    if rootless {
        f |= libc::CLONE_NEWUSER;
    }
    f as u64
}

/// System directories bound read-only (symlinks, as on merged-/usr hosts, are recreated).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// A running sandbox.
pub struct Sandbox {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    ctl: AsyncFd<OwnedFd>,
    /// Bytes read from the control socket beyond the last line.
    ctl_buf: Mutex<Vec<u8>>,
    ctl_lock: tokio::sync::Mutex<()>,
    cgroup: Option<Cgroup>,
    /// Its address and host interface (`NetMode::Isolated`).
    lease: Option<net::Lease>,
    reaped: AtomicBool,
}

/// A started sandbox with the read ends of its runtime's stdout and stderr, and (with its own
/// network namespace) the Runtime API listener made inside it.
pub struct Spawned {
    pub sandbox: Sandbox,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub listener: Option<std::net::TcpListener>,
    /// gust's endpoint for the instance ([`ENDPOINT_PORT`] on its loopback).
    pub endpoint: Option<std::net::TcpListener>,
}

impl Sandbox {
    /// Starts a sandbox and waits until its runtime process is forked.
    pub async fn spawn(host: &Host, spec: &Spec) -> Result<Spawned, String> {
        host.namespaces.clone()?;
        let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
        let (out_r, out_w) = sys::pipe().map_err(io("pipe"))?;
        let (err_r, err_w) = sys::pipe().map_err(io("pipe"))?;
        let (ctl, ctl_child) = sys::socketpair().map_err(io("socketpair"))?;
        let devnull = std::fs::File::open("/dev/null").map_err(io("open /dev/null"))?;
        let exe = sys::cstr(&host.init_exe).map_err(io("init path"))?;
        let argv0 = std::ffi::CString::new(INIT_ARGV0).expect("no NUL");
        let argv = [argv0.as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // Sources above the targets (0-3), so that no dup2 in the child clobbers another source
        // (gust's own stdio may be closed, making a new fd 0, 1 or 2).
        let high = |fd: &OwnedFd| sys::dup_above(fd, 10).map_err(io("dup"));
        let (devnull, out_w, err_w, ctl_child) = (
            high(&devnull.into())?,
            high(&out_w)?,
            high(&err_w)?,
            high(&ctl_child)?,
        );
        // In a new user namespace the child must not exec before its uid is mapped (exec as an
        // unmapped uid drops every capability): it waits for a byte on this pipe.
        let (sync_r, sync_w) = sys::pipe().map_err(io("pipe"))?;
        let lease = match spec.net {
            NetMode::Isolated => Some(host.net.as_ref().map_err(String::clone)?.lease()?),
            _ => None,
        };
        // The cgroup last: nothing fallible is left between its creation and the clone but
        // opening it, and both failures remove it.
        let cgroup = match &host.cgroups {
            Ok(l) => Some(
                l.create(&spec.id, &spec.limits)
                    .map_err(|e| e.to_string())?,
            ),
            Err(_) => None,
        };
        let cg_dir = match cgroup.as_ref().and_then(|c| c.v2_dir()) {
            Some(d) => match std::fs::File::open(d) {
                Ok(f) => Some(f),
                Err(e) => {
                    if let Some(c) = &cgroup {
                        c.remove();
                    }
                    return Err(format!("open the cgroup: {e}"));
                }
            },
            None => None,
        };
        let mut pidfd: libc::c_int = -1;
        let mut args = sys::CloneArgs {
            flags: ns_flags(host.rootless, spec.net == NetMode::Host)
                | libc::CLONE_PIDFD as u64
                | if cg_dir.is_some() {
                    sys::CLONE_INTO_CGROUP
                } else {
                    0
                },
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cg_dir.as_ref().map_or(0, |f| f.as_raw_fd() as u64),
            ..Default::default()
        };
        let fds = [
            (devnull.as_raw_fd(), 0),
            (out_w.as_raw_fd(), 1),
            (err_w.as_raw_fd(), 2),
            (ctl_child.as_raw_fd(), 3),
        ];
        // (read end, write end): the child closes its copy of the write end before it waits,
        // so that gust dying means EOF, not a wait forever.
        let wait = if host.rootless {
            (sync_r.as_raw_fd(), sync_w.as_raw_fd())
        } else {
            (-1, -1)
        };
        // SAFETY: between clone and exec the child only makes async-signal-safe syscalls on
        // memory prepared above (fds, C strings, pointer arrays).
        let pid = unsafe { sys::clone3(&mut args) };
        let pid = match pid {
            Ok(0) => unsafe { child_exec(wait, &fds, &exe, &argv, &envp) },
            Ok(pid) => pid,
            Err(e) => {
                if let Some(c) = &cgroup {
                    c.remove();
                }
                return Err(format!("clone: {e}"));
            }
        };
        // SAFETY: CLONE_PIDFD stored a new fd we own.
        let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
        drop((out_w, err_w, ctl_child, devnull, cg_dir, sync_r));
        if host.rootless {
            let mapped = map_user(pid);
            // The byte (or, on failure, EOF when sync_w closes) lets the child go on.
            // SAFETY: writing one byte from a local buffer to our pipe.
            unsafe {
                libc::write(sync_w.as_raw_fd(), b"x".as_ptr() as *const libc::c_void, 1);
            }
            if let Err(e) = mapped {
                // SAFETY: killing and reaping the child we just made.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                drop(pidfd);
                if let Some(c) = &cgroup {
                    c.remove();
                }
                return Err(e);
            }
        }
        drop(sync_w);
        set_nonblocking(&ctl);
        let sandbox = Sandbox {
            pid,
            pidfd: register(pidfd)?,
            ctl: register(ctl)?,
            ctl_buf: Mutex::new(Vec::new()),
            ctl_lock: tokio::sync::Mutex::new(()),
            cgroup,
            lease,
            reaped: AtomicBool::new(false),
        };
        let (listener, endpoint) = sandbox.configure(host, spec).await?;
        Ok(Spawned {
            sandbox,
            stdout: out_r,
            stderr: err_r,
            listener,
            endpoint,
        })
    }

    #[allow(clippy::type_complexity)]
    async fn configure(
        &self,
        host: &Host,
        spec: &Spec,
    ) -> Result<(Option<std::net::TcpListener>, Option<std::net::TcpListener>), String> {
        let t0 = std::time::Instant::now();
        // The veth pair before PID 1 reads its configuration: it brings up its end at once.
        if let Some(l) = &self.lease {
            let (h, pid) = (l.handle(), self.pid);
            tokio::task::spawn_blocking(move || h.connect(pid))
                .await
                .map_err(|e| e.to_string())??;
        }
        let connected = t0.elapsed();
        if !host.rootless {
            // The OOM killer picks the runtime, never PID 1.
            let _ = std::fs::write(format!("/proc/{}/oom_score_adj", self.pid), "-1000");
        }
        let cfg = self.init_config(host, spec);
        let mut line = serde_json::to_vec(&cfg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        sys::send_with_fd(self.ctl.get_ref().as_raw_fd(), &line, None)
            .map_err(|e| format!("control socket: {e}"))?;
        // Joining a cgroup v1 waits for an RCU grace period (milliseconds): PID 1 builds the
        // root meanwhile, and forks the runtime only after "go".
        if let Some(c) = &self.cgroup
            && c.v2_dir().is_none()
        {
            let dirs = c.clone_dirs();
            let pid = self.pid;
            tokio::task::spawn_blocking(move || cgroup::attach_dirs(&dirs, pid))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        let attached = t0.elapsed();
        // The function's allowances before its code runs (init may connect at once).
        self.allow(&spec.allow).await?;
        sys::send_with_fd(self.ctl.get_ref().as_raw_fd(), b"go\n", None)
            .map_err(|e| format!("control socket: {e}"))?;
        let (mut listener, mut endpoint) = (None, None);
        loop {
            let (msg, fd) = tokio::time::timeout(Duration::from_secs(10), self.recv_line())
                .await
                .map_err(|_| "the sandbox did not start within 10 s".to_string())??;
            match msg.as_str() {
                "ready" => {
                    tracing::debug!(
                        pid = self.pid,
                        veth_ms = connected.as_secs_f64() * 1e3,
                        attached_ms = attached.as_secs_f64() * 1e3,
                        ready_ms = t0.elapsed().as_secs_f64() * 1e3,
                        "sandbox ready"
                    );
                    return Ok((listener, endpoint));
                }
                "listen" => {
                    let fd = fd.ok_or("the sandbox sent no listener")?;
                    listener = Some(std::net::TcpListener::from(fd));
                }
                "endpoint" => {
                    let fd = fd.ok_or("the sandbox sent no listener")?;
                    endpoint = Some(std::net::TcpListener::from(fd));
                }
                m => return Err(m.strip_prefix("error ").unwrap_or(m).to_string()),
            }
        }
    }

    fn init_config(&self, host: &Host, spec: &Spec) -> InitConfig {
        let mut symlinks = Vec::new();
        let mut ro_binds = Vec::new();
        for d in SYSTEM_DIRS {
            let p = Path::new(d);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(t) = std::fs::read_link(p) {
                        symlinks.push((t, p.to_path_buf()));
                    }
                }
                Ok(m) if m.is_dir() => ro_binds.push(Bind {
                    src: p.into(),
                    dst: p.into(),
                }),
                _ => {}
            }
        }
        // /etc/resolv.conf may point outside /etc (systemd-resolved): bind where it points.
        if let Ok(real) = std::fs::canonicalize("/etc/resolv.conf")
            && let Some(dir) = real.parent()
            && !SYSTEM_DIRS.iter().any(|d| dir.starts_with(d))
        {
            ro_binds.push(Bind {
                src: dir.into(),
                dst: dir.into(),
            });
        }
        ro_binds.extend(spec.ro_binds.iter().cloned());
        let bound: Vec<&Path> = ro_binds.iter().map(|b| b.src.as_path()).collect();
        let masks = host
            .masks
            .iter()
            .filter(|m| bound.iter().any(|b| m.starts_with(b)))
            .cloned()
            .collect();
        InitConfig {
            root: host.root_dir.clone(),
            hostname: spec.hostname.clone(),
            symlinks,
            ro_binds,
            rw_binds: spec.rw_binds.clone(),
            task: spec.task.clone(),
            masks,
            tmp_mb: spec.tmp_mb,
            net: match (spec.net, &self.lease) {
                (NetMode::Host, _) => InitNet::Host,
                (NetMode::Isolated, Some(l)) => InitNet::Veth {
                    addr: l.addr,
                    gateway: l.host_addr,
                },
                _ => InitNet::Loopback,
            },
            seccomp: host.seccomp.is_ok(),
            user: (!host.rootless).then_some((SANDBOX_UID, SANDBOX_GID)),
            nofile: NOFILE,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
        }
    }

    async fn recv_line(&self) -> Result<(String, Option<OwnedFd>), String> {
        let mut fd = None;
        loop {
            {
                let mut buf = self.ctl_buf.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                    buf.drain(..=i);
                    return Ok((line, fd));
                }
            }
            let mut guard = self.ctl.readable().await.map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 4096];
            match guard.try_io(|inner| sys::recv_with_fd(inner.get_ref().as_raw_fd(), &mut chunk)) {
                Ok(Ok((0, _))) => return Err("the sandbox's init exited".into()),
                Ok(Ok((n, f))) => {
                    if f.is_some() {
                        fd = f;
                    }
                    self.ctl_buf
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => return Err(format!("control socket: {e}")),
                Err(_would_block) => continue,
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends a signal to PID 1 (it forwards SIGTERM and friends to the runtime; SIGKILL ends
    /// the whole sandbox). Safe against pid reuse: it goes through the pidfd.
    pub fn signal(&self, sig: i32) {
        if self.reaped.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: pidfd_send_signal on our own pidfd.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Waits for PID 1 to exit and reaps it; every process of the sandbox is gone after.
    pub async fn wait(&self) -> Exit {
        loop {
            if let Some(exit) = self.try_reap(libc::WNOHANG) {
                return exit;
            }
            match self.pidfd.readable().await {
                Ok(mut g) => g.clear_ready(),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn try_reap(&self, flags: i32) -> Option<Exit> {
        // SAFETY: waitid on our pidfd into a zeroed siginfo.
        let (r, info) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PIDFD,
                self.pidfd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            );
            (r, info)
        };
        // SAFETY: si_pid/si_status are valid for a CLD_* siginfo.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if r != 0 {
            // ECHILD: already reaped.
            if self.reaped.load(Ordering::Acquire) {
                return Some(Exit::Signal(libc::SIGKILL));
            }
            return None;
        }
        if pid == 0 {
            return None;
        }
        self.reaped.store(true, Ordering::Release);
        Some(match info.si_code {
            libc::CLD_EXITED if status > 128 => Exit::Signal(status - 128),
            libc::CLD_EXITED => Exit::Code(status),
            _ => Exit::Signal(status),
        })
    }

    /// Turns a pre-warmed sandbox into a function's: limits, its code at /var/task, hostname.
    pub async fn specialise(
        &self,
        task: &Path,
        hostname: &str,
        limits: &Limits,
    ) -> Result<(), String> {
        if let Some(c) = &self.cgroup {
            // The peak keeps what the runtime used while pre-warmed: it is the function's too.
            c.set_limits(limits).map_err(|e| e.to_string())?;
        }
        let tree = sys::open_tree_clone(task).map_err(|e| format!("clone the code mount: {e}"))?;
        sys::mount_setattr_fd(
            &tree,
            sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        )
        .map_err(|e| format!("make the code read-only: {e}"))?;
        let _one = self.ctl_lock.lock().await;
        sys::send_with_fd(
            self.ctl.get_ref().as_raw_fd(),
            format!("task {hostname}\n").as_bytes(),
            Some(tree.as_raw_fd()),
        )
        .map_err(|e| format!("control socket: {e}"))?;
        let (reply, _) = tokio::time::timeout(Duration::from_secs(5), self.recv_line())
            .await
            .map_err(|_| "the sandbox did not answer".to_string())??;
        match reply.as_str() {
            "ok" => Ok(()),
            m => Err(m.strip_prefix("error ").unwrap_or(m).to_string()),
        }
    }

    /// Lets the instance reach these destinations besides the internet (its manifest's
    /// `allow_network`, resolved). Only for `NetMode::Isolated`.
    pub async fn allow(&self, dests: &[(std::net::Ipv4Addr, Option<u16>)]) -> Result<(), String> {
        if dests.is_empty() {
            return Ok(());
        }
        match &self.lease {
            Some(l) => {
                let (h, dests) = (l.handle(), dests.to_vec());
                tokio::task::spawn_blocking(move || h.allow(&dests))
                    .await
                    .map_err(|e| e.to_string())?
            }
            None => Err("allowed destinations need the instance's own network".into()),
        }
    }

    /// The instance's address on its veth (`NetMode::Isolated`).
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.lease.as_ref().map(|l| l.addr)
    }

    /// Peak memory of the whole sandbox, from its cgroup.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref()?.peak_bytes()
    }

    /// Whether the OOM killer killed something in this sandbox.
    pub fn oom_killed(&self) -> bool {
        self.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0)
    }

    /// Whether a process of this sandbox holds the socket with this inode (used to refuse
    /// Runtime API connections from anything but the instance itself).
    pub fn owns_socket(&self, inode: u64) -> bool {
        let needle = format!("socket:[{inode}]");
        let pids = match &self.cgroup {
            Some(c) => c.procs(),
            None => descendants(self.pid),
        };
        pids.iter().any(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == needle.as_str())
                })
            })
        })
    }
}

/// Maps our uid and gid to root in the user namespace of `pid` (rootless mode).
fn map_user(pid: i32) -> Result<(), String> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let w = |f: &str, v: String| {
        std::fs::write(format!("/proc/{pid}/{f}"), v).map_err(|e| format!("write {f}: {e}"))
    };
    w("setgroups", "deny".into())?;
    w("uid_map", format!("0 {uid} 1"))?;
    w("gid_map", format!("0 {gid} 1"))
}

/// `pid` and all its descendants (via /proc/PID/task/TID/children).
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<i32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, String> {
    // SAFETY: we own `fd` and it stays open as long as the AsyncFd that holds it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| format!("register an fd with the reactor: {e}"))
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// The cloned child: stdio and the control socket onto fds 0-3, then exec the init.
///
/// # Safety
/// Only async-signal-safe syscalls; called in the child right after clone3.
unsafe fn child_exec(
    (wait_fd, wait_w): (i32, i32),
    fds: &[(i32, i32)],
    exe: &std::ffi::CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    // SAFETY: read/dup2/fcntl/execve/_exit are async-signal-safe; pointers are valid.
    unsafe {
        if wait_fd >= 0 {
            libc::close(wait_w);
            let mut b = 0u8;
            if libc::read(wait_fd, &mut b as *mut u8 as *mut libc::c_void, 1) != 1 {
                libc::_exit(125);
            }
        }
        for &(from, to) in fds {
            if from == to {
                libc::fcntl(to, libc::F_SETFD, 0);
            } else if libc::dup2(from, to) < 0 {
                libc::_exit(126);
            }
        }
        libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.reaped.load(Ordering::Acquire) {
            self.kill();
            // PID 1 dies at once on SIGKILL and the kernel kills the rest of its namespace.
            let _ = self.try_reap(0);
        }
        // rmdir may have to wait for the kernel to let go of the cgroup: never on an async
        // worker thread.
        if let Some(c) = self.cgroup.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || c.remove());
                }
                Err(_) => c.remove(),
            }
        }
    }
}
