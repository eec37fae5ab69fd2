//! The sandbox's PID 1 (`gust-init`): the gust binary exec'd into fresh namespaces. It builds
//! the instance's root filesystem, forks the runtime with no privileges, then reaps zombies,
//! forwards signals to the runtime, and mounts a function's code on request (pre-warmed
//! sandboxes). It exits with the runtime's status (128 + signal when it was killed); when it
//! exits, the kernel kills everything left in the PID namespace. EOF on the control socket
//! (gust went away) ends it too.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::{InitConfig, InitNet, netlink, seccomp};

const CTL: RawFd = 3;

/// Runs the init; never returns.
pub fn main() -> ! {
    // SAFETY: fd 3 is the control socket gust placed there before exec; we own it now. It
    // must not reach the runtime (dup2 cleared its close-on-exec flag).
    let ctl = unsafe {
        libc::fcntl(CTL, libc::F_SETFD, libc::FD_CLOEXEC);
        UnixStream::from_raw_fd(CTL)
    };
    let code = match run(&ctl) {
        Ok(code) => code,
        Err(msg) => {
            let _ = (&ctl).write_all(format!("error {}\n", msg.replace('\n', " ")).as_bytes());
            1
        }
    };
    std::process::exit(code)
}

fn read_line(ctl: &UnixStream, buf: &mut Vec<u8>) -> Result<(String, Option<OwnedFd>), String> {
    let mut fd = None;
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..=i);
            return Ok((line, fd));
        }
        let mut chunk = [0u8; 16384];
        let (n, f) = sys::recv_with_fd(ctl.as_raw_fd(), &mut chunk)
            .map_err(|e| format!("control socket: {e}"))?;
        if n == 0 {
            return Err("gust closed the control socket".into());
        }
        if f.is_some() {
            fd = f;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn run(ctl: &UnixStream) -> Result<i32, String> {
    let mut buf = Vec::new();
    let (line, _) = read_line(ctl, &mut buf)?;
    let cfg: InitConfig =
        serde_json::from_str(&line).map_err(|e| format!("bad sandbox config: {e}"))?;
    // SAFETY: sigset operations on a local set; blocking every signal in this single thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    setup_root(&cfg).map_err(|e| format!("sandbox setup: {e}"))?;
    if cfg.net != InitNet::Host {
        network(&cfg.net)?;
        // The two addresses of gust an instance reaches, on its own loopback: the Runtime API
        // and gust's endpoint. gust accepts on them; nothing else can connect.
        let endpoint = matches!(cfg.net, InitNet::Veth { .. });
        for (port, what) in [
            (crate::NETNS_API_PORT, "listen"),
            (crate::ENDPOINT_PORT, "endpoint"),
        ] {
            // network = "none" reaches nothing, gust's endpoint included.
            if what == "endpoint" && !endpoint {
                continue;
            }
            let l = std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("bind 127.0.0.1:{port} in the sandbox: {e}"))?;
            sys::send_with_fd(
                ctl.as_raw_fd(),
                format!("{what}\n").as_bytes(),
                Some(l.as_raw_fd()),
            )
            .map_err(|e| format!("control socket: {e}"))?;
        }
    }
    let filters = if cfg.seccomp {
        Some(seccomp::filters()?)
    } else {
        None
    };
    // gust says "go" once PID 1 is in its cgroup, so the runtime is forked into it.
    let (go, _) = read_line(ctl, &mut buf)?;
    if go != "go" {
        return Err(format!("expected go, got {go:?}"));
    }
    // Now inside its cgroup: the runtime sees that cgroup as its root, not the host's paths.
    // SAFETY: unshare of the cgroup namespace for this single-threaded process.
    unsafe {
        libc::unshare(libc::CLONE_NEWCGROUP);
    }
    // SAFETY: this process is single-threaded; the child only runs `exec_runtime`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        exec_runtime(&cfg, filters.as_deref());
    }
    (&*ctl)
        .write_all(b"ready\n")
        .map_err(|e| format!("control socket: {e}"))?;
    supervise(ctl, &mut buf, pid, &set)
}

/// Brings up loopback and, with a veth, `eth0`, its address and the default route.
fn network(net: &InitNet) -> Result<(), String> {
    sys::loopback_up().map_err(|e| format!("bring up lo: {e}"))?;
    if let InitNet::Veth { addr, gateway } = net {
        netlink::add_address("eth0", *addr, 31).map_err(|e| format!("address eth0: {e}"))?;
        netlink::link_up("eth0").map_err(|e| format!("bring up eth0: {e}"))?;
        netlink::add_default_route("eth0", *gateway)
            .map_err(|e| format!("default route via {gateway}: {e}"))?;
    }
    Ok(())
}

/// The runtime process: drops every privilege and execs the runtime. Never returns.
fn exec_runtime(cfg: &InitConfig, filters: Option<&[seccompiler::BpfProgram]>) -> ! {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("gust: cannot start the runtime: {what}: {e}");
        // SAFETY: _exit in the forked child.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: plain syscalls in the single-threaded child.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::setsid();
        // PID 1 is exempt from the OOM killer; the runtime must not inherit that.
        let adj = c"/proc/self/oom_score_adj";
        let fd = libc::open(adj.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
            libc::close(fd);
        }
        let nofile = libc::rlimit {
            rlim_cur: cfg.nofile,
            rlim_max: cfg.nofile,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) != 0 {
            fail("setrlimit", &std::io::Error::last_os_error());
        }
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &core);
        // Empty the bounding set (needs CAP_SETPCAP, so before giving up root).
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if let Some((uid, gid)) = cfg.user {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                fail("setgroups", &std::io::Error::last_os_error());
            }
            if libc::setresgid(gid, gid, gid) != 0 {
                fail("setresgid", &std::io::Error::last_os_error());
            }
            if libc::setresuid(uid, uid, uid) != 0 {
                fail("setresuid", &std::io::Error::last_os_error());
            }
        }
        // No capabilities left in any set (as the namespace's root in rootless mode too).
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            fail("capset", &std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail("no_new_privs", &std::io::Error::last_os_error());
        }
    }
    if let Err(e) = std::env::set_current_dir(&cfg.cwd) {
        fail(&format!("chdir {}", cfg.cwd.display()), &e);
    }
    if let Some(f) = filters
        && let Err(e) = seccomp::install(f)
    {
        fail("seccomp", &e);
    }
    let mut cmd = std::process::Command::new(&cfg.argv[0]);
    cmd.args(&cfg.argv[1..])
        .env_clear()
        .envs(cfg.env.iter().map(|(k, v)| (k, v)));
    let e = cmd.exec();
    fail(&cfg.argv[0], &e)
}

/// PID 1's loop: reap, forward signals, serve control commands.
fn supervise(
    ctl: &UnixStream,
    buf: &mut Vec<u8>,
    runtime: i32,
    set: &libc::sigset_t,
) -> Result<i32, String> {
    // SAFETY: signalfd on the blocked set; poll and read on fds we own.
    let sfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if sfd < 0 {
        return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd we own.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            // SAFETY: reading one signalfd_siginfo into a zeroed struct of that size.
            let sig = unsafe {
                let mut info: libc::signalfd_siginfo = std::mem::zeroed();
                let n = libc::read(
                    sfd.as_raw_fd(),
                    &mut info as *mut _ as *mut libc::c_void,
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                );
                if n <= 0 { 0 } else { info.ssi_signo as i32 }
            };
            if sig == libc::SIGCHLD {
                if let Some(code) = reap(runtime) {
                    return Ok(code);
                }
            } else if sig > 0 {
                // SAFETY: forwarding a signal to our own child.
                unsafe {
                    libc::kill(runtime, sig);
                }
            }
        }
        if fds[1].revents != 0 {
            let (line, fd) = read_line(ctl, buf)?;
            let reply = match command(&line, fd) {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("error {}\n", e.replace('\n', " ")),
            };
            (&*ctl)
                .write_all(reply.as_bytes())
                .map_err(|e| format!("control socket: {e}"))?;
        }
    }
}

/// Reaps every exited child; the runtime's exit ends the sandbox with its status.
fn reap(runtime: i32) -> Option<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our children without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return None;
        }
        if pid == runtime {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
    }
}

/// `task HOSTNAME` with a detached mount of the function's code: specialises a pre-warmed
/// sandbox.
fn command(line: &str, fd: Option<OwnedFd>) -> Result<(), String> {
    let Some(host) = line.strip_prefix("task ") else {
        return Err(format!("unknown command {line:?}"));
    };
    let fd = fd.ok_or("task: no mount fd was passed")?;
    sys::move_mount(&fd, Path::new("/var/task"))
        .map_err(|e| format!("mount the code on /var/task: {e}"))?;
    sethostname(host)
}

fn sethostname(name: &str) -> Result<(), String> {
    // SAFETY: pointer and length of a live byte slice.
    if unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) } != 0 {
        return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn mkdir_p(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Binds `src` (a directory or a file) at `dst`, then sets `attrs` on it and its submounts.
fn bind(src: &Path, dst: &Path, attrs: u64) -> Result<(), String> {
    if src.is_dir() {
        mkdir_p(dst)?;
    } else {
        if let Some(parent) = dst.parent() {
            mkdir_p(parent)?;
        }
        std::fs::File::create(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    }
    let s = src
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", src.display()))?;
    sys::mount(Some(s), dst, None, libc::MS_BIND | libc::MS_REC, None)
        .map_err(|e| e.to_string())?;
    sys::mount_setattr(dst, attrs, 0, true).map_err(|e| e.to_string())
}

fn tmpfs(dst: &Path, opts: &str, flags: libc::c_ulong) -> Result<(), String> {
    mkdir_p(dst)?;
    sys::mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(opts)).map_err(|e| e.to_string())
}

/// Builds the instance's root: a tmpfs with the host's system directories read-only, the code
/// at /var/task, private /tmp, /dev and /proc, the Runtime API socket at /run/gust; then
/// pivots into it. Nothing else of the host (the data dir, other code, the token) exists.
fn setup_root(cfg: &InitConfig) -> Result<(), String> {
    let e = |e: std::io::Error| e.to_string();
    let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    // Nothing we mount may propagate back to the host.
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(e)?;
    let root = &cfg.root;
    sys::mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=1m,mode=755"),
    )
    .map_err(e)?;
    for (target, link) in &cfg.symlinks {
        let at = under(root, link);
        if let Some(parent) = at.parent() {
            mkdir_p(parent)?;
        }
        std::os::unix::fs::symlink(target, &at)
            .map_err(|e| format!("symlink {}: {e}", at.display()))?;
    }
    for b in &cfg.ro_binds {
        bind(&b.src, &under(root, &b.dst), ro)?;
    }
    let task = under(root, Path::new("/var/task"));
    match &cfg.task {
        Some(src) => bind(src, &task, ro)?,
        None => mkdir_p(&task)?,
    }
    tmpfs(
        &under(root, Path::new("/tmp")),
        &format!("size={}m,mode=1777", cfg.tmp_mb),
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    let dev = under(root, Path::new("/dev"));
    tmpfs(&dev, "size=64k,mode=755", libc::MS_NOSUID | libc::MS_NOEXEC)?;
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = Path::new("/dev").join(d);
        if src.exists() {
            bind(&src, &dev.join(d), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(e)?;
    }
    tmpfs(
        &dev.join("shm"),
        "size=64m,mode=1777",
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    let proc_dir = under(root, Path::new("/proc"));
    mkdir_p(&proc_dir)?;
    sys::mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(e)?;
    for b in &cfg.rw_binds {
        bind(
            &b.src,
            &under(root, &b.dst),
            // Read-only too: connecting to the socket needs no write access.
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
    }
    for m in &cfg.masks {
        let at = under(root, m);
        if at.is_dir() {
            sys::mount(
                Some("tmpfs"),
                &at,
                Some("tmpfs"),
                libc::MS_RDONLY,
                Some("size=0"),
            )
            .map_err(e)?;
        } else if at.exists() {
            bind(Path::new("/dev/null"), &at, ro)?;
        }
    }
    std::env::set_current_dir(root).map_err(e)?;
    sys::pivot_root(Path::new("."), Path::new(".")).map_err(e)?;
    // SAFETY: detaching the old root, now stacked under the new one.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "umount the old root: {}",
            std::io::Error::last_os_error()
        ));
    }
    std::env::set_current_dir("/").map_err(e)?;
    sys::mount_setattr(Path::new("/"), MOUNT_ATTR_RDONLY, 0, false).map_err(e)?;
    sys::mount_setattr(Path::new("/dev"), MOUNT_ATTR_RDONLY, 0, false).map_err(e)?;
    sethostname(&cfg.hostname)
}
