//! Per-instance cgroups on cgroup v2 (one unified tree) or v1 (one tree per controller).
//!
//! Layout: `<our own cgroup>/gust-<pid>-<n>/<instance>` in every hierarchy gust uses. Limits:
//! memory (no swap), pids, CPU weight proportional to memory and a CPU cap of
//! `ceil(memory / 1769 MB)` vCPUs (Lambda's ratio). Stale `gust-<pid>` trees of dead gust
//! processes are removed at start.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Limits;

/// MB of memory per vCPU (Lambda: one full vCPU at 1769 MB).
pub const MB_PER_VCPU: u64 = 1769;
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub enum Layout {
    /// `base` is our `gust-<pid>` directory with memory, pids and cpu enabled for children.
    V2 { base: PathBuf },
    /// Our `gust-<pid>` directory in the memory, pids and cpu hierarchies.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

/// One instance's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    v2: bool,
    /// Every directory of this instance (one for v2, one per controller for v1).
    dirs: Vec<PathBuf>,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

/// Where each hierarchy is mounted: (controllers or "" for v2, mount point), from mountinfo.
fn mounts() -> Vec<(String, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        let point = left.split(' ').nth(4).unwrap_or("");
        match fstype {
            "cgroup2" => out.push((String::new(), PathBuf::from(point))),
            "cgroup" => {
                let ctrls: Vec<&str> = opts
                    .split(',')
                    .filter(|o| {
                        matches!(
                            *o,
                            "memory"
                                | "pids"
                                | "cpu"
                                | "cpuacct"
                                | "cpuset"
                                | "freezer"
                                | "devices"
                                | "blkio"
                        )
                    })
                    .collect();
                if !ctrls.is_empty() {
                    out.push((ctrls.join(","), PathBuf::from(point)));
                }
            }
            _ => {}
        }
    }
    out
}

/// Our own cgroup path per hierarchy ("" = v2), from /proc/self/cgroup.
fn own_paths() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let _id = p.next()?;
            let ctrls = p.next()?.to_string();
            let path = p.next()?.to_string();
            Some((ctrls, path))
        })
        .collect()
}

fn join(mount: &Path, cg: &str) -> PathBuf {
    mount.join(cg.trim_start_matches('/'))
}

impl Layout {
    /// Finds a usable layout and creates our `gust-<pid>` directories; the error says why
    /// none is usable (for `gust doctor` and the start-up warning).
    pub fn setup() -> Result<Layout, String> {
        let mounts = mounts();
        let own = own_paths();
        // Unique per executor: tests run several servers in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let me = format!(
            "gust-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let v1 = |ctrl: &str| -> Option<PathBuf> {
            let (ctrls, point) = mounts
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == ctrl))?;
            let path = own.iter().find(|(c, _)| c == ctrls)?.1.clone();
            Some(join(point, &path))
        };
        if let (Some(memory), Some(pids), Some(cpu)) = (v1("memory"), v1("pids"), v1("cpu")) {
            let mut made = Vec::new();
            for dir in [&memory, &pids, &cpu] {
                clean_stale(dir);
                let base = dir.join(&me);
                if let Err(e) = std::fs::create_dir_all(&base) {
                    return Err(format!("cgroup v1: cannot create {}: {e}", base.display()));
                }
                made.push(base);
            }
            return Ok(Layout::V1 {
                memory: made[0].clone(),
                pids: made[1].clone(),
                cpu: made[2].clone(),
            });
        }
        let Some((_, point)) = mounts.iter().find(|(c, _)| c.is_empty()) else {
            return Err("no cgroup v2 mount and no v1 memory+pids+cpu hierarchies".into());
        };
        let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) else {
            return Err("this process has no cgroup v2 path in /proc/self/cgroup".into());
        };
        let ours = join(point, path);
        let available =
            std::fs::read_to_string(ours.join("cgroup.controllers")).unwrap_or_default();
        for c in ["memory", "pids", "cpu"] {
            if !available.split_whitespace().any(|x| x == c) {
                return Err(format!(
                    "cgroup v2: controller {c} is not available in {} (controllers: {:?}); delegate it (systemd: Delegate=yes)",
                    ours.display(),
                    available.trim()
                ));
            }
        }
        clean_stale(&ours);
        let base = ours.join(&me);
        std::fs::create_dir_all(&base)
            .map_err(|e| format!("cgroup v2: cannot create {}: {e}", base.display()))?;
        // Controllers for our children must be enabled in our own cgroup first. A cgroup with
        // processes cannot hand controllers down (no internal processes), so gust moves itself
        // into a leaf of its own when it has to.
        let enable = |dir: &Path| write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
        if enable(&ours).is_err() {
            let leaf = ours.join(format!("gust-{}-supervisor", std::process::id()));
            std::fs::create_dir_all(&leaf).map_err(|e| format!("cgroup v2: {e}"))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(|e| format!("cgroup v2: cannot move gust into {}: {e}", leaf.display()))?;
            enable(&ours).map_err(|e| format!("cgroup v2: {e}"))?;
        }
        enable(&base).map_err(|e| format!("cgroup v2: {e}"))?;
        Ok(Layout::V2 { base })
    }

    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { base } => format!("cgroup v2 under {}", base.display()),
            Layout::V1 { memory, .. } => {
                format!("cgroup v1 (memory, pids, cpu) under {}", memory.display())
            }
        }
    }

    /// Creates an instance's cgroup with its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> io::Result<Cgroup> {
        let cg = match self {
            Layout::V2 { base } => {
                let d = base.join(id);
                Cgroup {
                    v2: true,
                    dirs: vec![d.clone()],
                    memory: d.clone(),
                    pids: d.clone(),
                    cpu: d,
                }
            }
            Layout::V1 { memory, pids, cpu } => Cgroup {
                v2: false,
                dirs: vec![memory.join(id), pids.join(id), cpu.join(id)],
                memory: memory.join(id),
                pids: pids.join(id),
                cpu: cpu.join(id),
            },
        };
        for d in &cg.dirs {
            std::fs::create_dir(d).map_err(|e| {
                io::Error::new(e.kind(), format!("create cgroup {}: {e}", d.display()))
            })?;
        }
        if let Err(e) = cg.set_limits(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Removes our `gust-<pid>` directories (instances must be gone).
    pub fn remove(&self) {
        let dirs: Vec<&PathBuf> = match self {
            Layout::V2 { base } => vec![base],
            Layout::V1 { memory, pids, cpu } => vec![memory, pids, cpu],
        };
        for d in dirs {
            remove_tree(d);
        }
    }
}

/// Removes `gust-<pid>` trees left by gust processes that no longer run.
fn clean_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("gust-")
            .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_tree(&e.path());
        }
    }
}

/// rmdir a cgroup tree bottom-up; a cgroup with processes left is killed first (v1: each
/// process; v2: cgroup.kill).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    if std::fs::remove_dir(dir).is_err() && dir.exists() {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        for pid in procs(dir) {
            // SAFETY: kill(2) on a pid read from the cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        rmdir_retry(dir);
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A cgroup whose last process just died can stay busy for a moment.
fn rmdir_retry(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == io::ErrorKind::NotFound || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Moves a process into every directory of a cgroup (v1; v2 clones straight into it).
pub fn attach_dirs(dirs: &[PathBuf], pid: i32) -> io::Result<()> {
    for d in dirs {
        write(&d.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `key N` counter of a flat-keyed cgroup file (memory.events, memory.oom_control).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Cgroup {
    /// The v2 directory to clone straight into (CLONE_INTO_CGROUP), if v2.
    pub fn v2_dir(&self) -> Option<&Path> {
        self.v2.then(|| self.dirs[0].as_path())
    }

    /// The cgroup's directories (to attach from a blocking thread).
    pub fn clone_dirs(&self) -> Vec<PathBuf> {
        self.dirs.clone()
    }

    pub fn set_limits(&self, l: &Limits) -> io::Result<()> {
        let bytes = l.memory_mb * 1024 * 1024;
        let vcpus = l.memory_mb.div_ceil(MB_PER_VCPU).max(1);
        let quota = vcpus * CFS_PERIOD_US;
        if self.v2 {
            write(&self.memory.join("memory.max"), &bytes.to_string())?;
            // Absent when the kernel has no swap accounting.
            let _ = write(&self.memory.join("memory.swap.max"), "0");
            write(&self.pids.join("pids.max"), &l.pids.to_string())?;
            let weight = (100 * l.memory_mb / MB_PER_VCPU).clamp(1, 10_000);
            write(&self.cpu.join("cpu.weight"), &weight.to_string())?;
            write(
                &self.cpu.join("cpu.max"),
                &format!("{quota} {CFS_PERIOD_US}"),
            )?;
        } else {
            // memsw must stay >= limit: lower it after, raise it before.
            let memsw = self.memory.join("memory.memsw.limit_in_bytes");
            let _ = write(
                &memsw,
                &bytes.max(read_u64(&memsw).unwrap_or(0)).to_string(),
            );
            write(
                &self.memory.join("memory.limit_in_bytes"),
                &bytes.to_string(),
            )?;
            let _ = write(&memsw, &bytes.to_string());
            let _ = write(&self.memory.join("memory.swappiness"), "0");
            write(&self.pids.join("pids.max"), &l.pids.to_string())?;
            let shares = (1024 * l.memory_mb / MB_PER_VCPU).clamp(2, 262_144);
            write(&self.cpu.join("cpu.shares"), &shares.to_string())?;
            write(
                &self.cpu.join("cpu.cfs_period_us"),
                &CFS_PERIOD_US.to_string(),
            )?;
            write(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(())
    }

    /// Peak memory of the instance (processes, page cache, tmpfs) in bytes.
    pub fn peak_bytes(&self) -> Option<u64> {
        if self.v2 {
            read_u64(&self.memory.join("memory.peak"))
                .or_else(|| read_u64(&self.memory.join("memory.current")))
        } else {
            read_u64(&self.memory.join("memory.max_usage_in_bytes"))
        }
    }

    /// How many processes the OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        if self.v2 {
            keyed(&self.memory.join("memory.events"), "oom_kill").unwrap_or(0)
        } else {
            keyed(&self.memory.join("memory.oom_control"), "oom_kill").unwrap_or(0)
        }
    }

    pub fn procs(&self) -> Vec<i32> {
        procs(&self.pids)
    }

    /// Kills everything in the cgroup.
    pub fn kill(&self) {
        if self.v2 && write(&self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            // SAFETY: kill(2) on a pid read from our instance's cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Removes the cgroup (its processes must be gone; stragglers are killed).
    pub fn remove(&self) {
        for d in &self.dirs {
            if std::fs::remove_dir(d).is_err() && d.exists() {
                self.kill();
                rmdir_retry(d);
            }
        }
    }
}
