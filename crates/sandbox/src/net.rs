//! The network of an instance with `network = "default"` (docs/SANDBOX.md, "Network"): its own
//! network namespace, joined to the host by a veth pair, with outbound access through the
//! host (masquerade) and nothing private: not the host's loopback (another namespace), not
//! the host's own addresses, not other instances, not link-local (169.254.169.254) or private
//! ranges, unless the function's manifest allows a destination.
//!
//! The filter is one nftables table, `inet gust`, shared by every gust process on the host and
//! installed once (`nft -f`, under a lock file so that servers starting together install it
//! once): it matches instances by their host-side interface names, which all start with `gu`.
//! A function's allowed destinations are elements of two sets keyed by that interface name,
//! added before its runtime starts and removed when it ends. Each instance holds a lease on one
//! /31 of `10.250.0.0/16` (a lock file per slot, so that several gust processes never hand out
//! the same one; released only after the host end of its veth is deleted); the name of its
//! host interface also carries a per-slot generation, so a set element left behind by a killed
//! server never matches again. [`NetHost::check`] puts the table back (with every live
//! allowance) if something on the host removed it, e.g. a `flush ruleset`.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::netlink;

/// The instances' addresses: slot i is 10.250.(2i / 256).(2i % 256) on the host side and the
/// next address in the instance.
pub const INSTANCE_NET: &str = "10.250.0.0/16";
const BASE: u32 = u32::from_be_bytes([10, 250, 0, 0]);
const SLOTS: u32 = 1 << 15;
/// Bumped when the ruleset changes: a table of another version is replaced.
const VERSION: &str = "gust-net-2";
/// New connections (conntrack entries) one instance may have at once: one function cannot fill
/// the host's connection table.
pub const MAX_FLOWS: u32 = 4096;

/// Ranges an instance may not reach unless allowed (IPv4; instances have no IPv6 route).
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
    // Azure's WireServer: a public address that must stay private to the host.
    "168.63.129.16/32",
];

/// Each live instance's set elements (`allow_port { … }` / `allow_host { … }`), by host
/// interface: what [`NetHost::check`] puts back after the table was removed.
type Allowed = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The host side of instance networking: the nftables table is in place, forwarding is on.
pub struct NetHost {
    lock_dir: PathBuf,
    cursor: AtomicU32,
    /// The host's nameservers (from /etc/resolv.conf), reachable on port 53 from instances.
    pub dns: Vec<Ipv4Addr>,
    /// A note for `gust doctor` (e.g. a nameserver on the host's loopback).
    pub notes: Vec<String>,
    nft: PathBuf,
    guard: bool,
    allowed: Allowed,
    /// The nonce of the table as this process last saw it: another one means the table was
    /// put back by someone else (another gust), without this process's allowances.
    seen: Mutex<String>,
}

/// One instance's slot: its addresses and host interface, and the destinations it was allowed.
pub struct Lease {
    /// The slot's lock file, held until the host end of the veth is gone.
    lock: Option<std::fs::File>,
    pub host_if: String,
    pub host_addr: Ipv4Addr,
    pub addr: Ipv4Addr,
    allowed: Allowed,
}

impl NetHost {
    /// Installs (or finds) the nftables table and turns on IPv4 forwarding. Needs root and the
    /// `nft` command. With `install` false (`gust doctor`) nothing on the host is changed: it
    /// only says whether `gust serve` could.
    pub fn setup(install_now: bool) -> Result<NetHost, String> {
        let nft = which_nft().ok_or(
            "the nft command (Debian package nftables) is not installed: it is needed to filter instances' traffic",
        )?;
        let (dns, mut notes) = nameservers();
        let lock_dir = PathBuf::from("/run/gust-net");
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(&lock_dir)
            .map_err(|e| format!("create {}: {e}", lock_dir.display()))?;
        let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map_err(|e| format!("read net.ipv4.ip_forward: {e}"))?;
        let enabled_here = forwarding.trim() != "1";
        if !install_now {
            if run_nft(&nft, &["list", "tables"], None).is_err() {
                return Err("nft cannot list tables (no nf_tables in this kernel?)".into());
            }
            if enabled_here {
                notes.push("gust serve will turn on net.ipv4.ip_forward".into());
            }
            return Ok(NetHost {
                lock_dir,
                cursor: AtomicU32::new(0),
                dns,
                notes,
                nft,
                guard: enabled_here,
                allowed: Arc::default(),
                seen: Mutex::new(String::new()),
            });
        }
        let (guard, nonce) = {
            let _lock = table_lock(&lock_dir)?;
            let installed = install(&nft, &dns, enabled_here, &HashMap::new())?;
            collect_stale(&nft);
            installed
        };
        if enabled_here {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| format!("turn on net.ipv4.ip_forward: {e}"))?;
            notes.push("turned on net.ipv4.ip_forward; table inet gust drops IPv4 forwarding that does not involve an instance".into());
        }
        Ok(NetHost {
            lock_dir,
            cursor: AtomicU32::new(fastrand::u32(..SLOTS)),
            dns,
            notes,
            nft,
            guard,
            allowed: Arc::default(),
            seen: Mutex::new(nonce),
        })
    }

    /// Whether the table is still in place; if not (a `flush ruleset`, an operator's
    /// `nft delete table`), installs it again with every live instance's allowances. Blocking
    /// (runs `nft`): call it off the async workers, every few seconds.
    pub fn check(&self) -> Result<bool, String> {
        let listed = run_nft(&self.nft, &["list", "table", "inet", "gust"], None);
        let nonce = listed
            .as_ref()
            .ok()
            .filter(|t| is_current(t))
            .map(|t| nonce_of(t));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if nonce.as_deref() == Some(seen.as_str()) {
            return Ok(true);
        }
        let _lock = table_lock(&self.lock_dir)?;
        let live = self
            .allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match nonce {
            // Put back by another gust process: add this one's allowances to it.
            Some(n) => {
                let script: String = live
                    .values()
                    .flatten()
                    .map(|e| format!("add element inet gust {e}\n"))
                    .collect();
                if !script.is_empty() {
                    run_nft(&self.nft, &["-f", "-"], Some(&script))?;
                }
                *seen = n;
            }
            None => *seen = install(&self.nft, &self.dns, self.guard, &live)?.1,
        }
        Ok(false)
    }

    /// Takes a free slot (a lock file held for the lease's life).
    pub fn lease(&self) -> Result<Lease, String> {
        for _ in 0..SLOTS {
            let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % SLOTS;
            let path = self.lock_dir.join(format!("{slot}"));
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            let generation = s.trim().parse::<u32>().unwrap_or(0).wrapping_add(1) % 0x1000_0000;
            let _ = f.set_len(0);
            let _ = f.rewind();
            let _ = f.write_all(generation.to_string().as_bytes());
            let host = BASE + 2 * slot;
            let host_if = format!("gu{slot:x}-{generation:x}");
            // A link of that name (a namespace still being torn down, or a reused generation
            // after /run was wiped) goes first: the name must be this lease's alone.
            let _ = netlink::delete_link(&host_if);
            return Ok(Lease {
                lock: Some(f),
                host_if,
                host_addr: Ipv4Addr::from(host),
                addr: Ipv4Addr::from(host + 1),
                allowed: self.allowed.clone(),
            });
        }
        Err(format!(
            "no free instance address in {INSTANCE_NET} ({SLOTS} instances)"
        ))
    }
}

impl Lease {
    /// What connects and allows for this lease, movable to a blocking thread.
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            host_if: self.host_if.clone(),
            host_addr: self.host_addr,
            allowed: self.allowed.clone(),
        }
    }
}

/// A lease's interface, for the blocking work done on it (rtnetlink, `nft`).
pub struct LeaseHandle {
    host_if: String,
    host_addr: Ipv4Addr,
    allowed: Allowed,
}

impl LeaseHandle {
    /// The host side of the veth pair whose other end (`eth0`) is in the namespace of `pid`.
    /// Blocking (rtnetlink).
    pub fn connect(&self, pid: i32) -> Result<(), String> {
        let create = || netlink::create_veth(&self.host_if, "eth0", pid);
        if let Err(e) = create() {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("create the veth pair {}: {e}", self.host_if));
            }
            let _ = netlink::delete_link(&self.host_if);
            create().map_err(|e| format!("create the veth pair {}: {e}", self.host_if))?;
        }
        netlink::add_address(&self.host_if, self.host_addr, 31)
            .map_err(|e| format!("address {}: {e}", self.host_if))?;
        netlink::link_up(&self.host_if).map_err(|e| format!("bring up {}: {e}", self.host_if))
    }

    /// Lets this instance reach these destinations (port None: every port). Blocking (runs
    /// `nft`): call it off the async workers.
    pub fn allow(&self, dests: &[(Ipv4Addr, Option<u16>)]) -> Result<(), String> {
        let mut elements: Vec<String> = dests
            .iter()
            .map(|(ip, port)| match port {
                Some(p) => format!("allow_port {{ \"{}\" . {ip} . {p} }}", self.host_if),
                None => format!("allow_host {{ \"{}\" . {ip} }}", self.host_if),
            })
            .collect();
        // Two names may resolve to one address: an element once, or its delete would fail.
        elements.sort();
        elements.dedup();
        if elements.is_empty() {
            return Ok(());
        }
        let script: String = elements
            .iter()
            .map(|e| format!("add element inet gust {e}\n"))
            .collect();
        let nft = which_nft().ok_or("the nft command is gone")?;
        // Recorded first, so that a table put back meanwhile by `check` has them too.
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(self.host_if.clone())
            .or_default()
            .extend(elements);
        run_nft(&nft, &["-f", "-"], Some(&script))?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let allowed = self
            .allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.host_if)
            .unwrap_or_default();
        let host_if = self.host_if.clone();
        let lock = self.lock.take();
        // The host end of the veth goes now (its namespace may outlive the sandbox a while:
        // the kernel tears namespaces down lazily), then the allowances, and only then is the
        // slot free for another instance. None of it may hold up whoever drops the instance.
        let go = move || {
            let _ = netlink::delete_link(&host_if);
            if !allowed.is_empty() {
                let script: String = allowed
                    .iter()
                    .map(|e| format!("delete element inet gust {e}\n"))
                    .collect();
                if let Some(nft) = which_nft()
                    && let Err(e) = run_nft(&nft, &["-f", "-"], Some(&script))
                {
                    tracing::debug!("remove an instance's allowed destinations: {e}");
                }
            }
            drop(lock);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(go);
            }
            Err(_) => go(),
        }
    }
}

/// Serialises installing the table among gust processes.
fn table_lock(dir: &Path) -> Result<std::fs::File, String> {
    let path = dir.join(".table");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own; blocks until the other holder is done.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// Removes allowances of interfaces that no longer exist (instances of a server that was
/// killed, or whose cleanup did not run): they can never match again, but they pile up.
fn collect_stale(nft: &Path) {
    let mut script = String::new();
    for set in ["allow_port", "allow_host"] {
        let Ok(text) = run_nft(nft, &["list", "set", "inet", "gust", set], None) else {
            continue;
        };
        let Some(start) = text.find("elements = {") else {
            continue;
        };
        let body = &text[start + "elements = {".len()..];
        let body = &body[..body.find('}').unwrap_or(body.len())];
        for element in body.split(',') {
            let element = element.split_whitespace().collect::<Vec<_>>().join(" ");
            let Some(name) = element.split('"').nth(1) else {
                continue;
            };
            let gone = std::ffi::CString::new(name)
                // SAFETY: a valid C string.
                .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } == 0)
                .unwrap_or(false);
            if gone {
                script.push_str(&format!("delete element inet gust {set} {{ {element} }}\n"));
            }
        }
    }
    if !script.is_empty()
        && let Err(e) = run_nft(nft, &["-f", "-"], Some(&script))
    {
        tracing::debug!("remove stale allowances: {e}");
    }
}

fn is_current(table: &str) -> bool {
    table.contains(&format!("comment \"{VERSION}:"))
}

/// The nonce in the table's comment (`… [nonce] …`), which each installation changes.
fn nonce_of(table: &str) -> String {
    table
        .split_once(" [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(n, _)| n.to_string())
        .unwrap_or_default()
}

/// Installs the table unless the current version is there (the caller holds the table lock);
/// returns whether it has the forwarding guard, and its nonce. `live` allowances are added.
fn install(
    nft: &Path,
    dns: &[Ipv4Addr],
    enabled_here: bool,
    live: &HashMap<String, Vec<String>>,
) -> Result<(bool, String), String> {
    let existing = run_nft(nft, &["list", "table", "inet", "gust"], None);
    let has_guard = existing
        .as_ref()
        .is_ok_and(|t| t.contains("gust: not an instance"));
    let guard = enabled_here || has_guard;
    let mut script = String::new();
    let nonce;
    if let Some(t) = existing.as_ref().ok().filter(|t| is_current(t)) {
        nonce = nonce_of(t);
        // The nameservers may have changed since the table was made.
        script.push_str("flush set inet gust dns\n");
        if !dns.is_empty() {
            script.push_str(&format!("add element inet gust dns {{ {} }}\n", join(dns)));
        }
    } else {
        if existing.is_ok() {
            script.push_str("delete table inet gust\n");
        }
        nonce = format!("{:016x}", fastrand::u64(..));
        script.push_str(&ruleset(dns, guard, &nonce));
    }
    for e in live.values().flatten() {
        script.push_str(&format!("add element inet gust {e}\n"));
    }
    run_nft(nft, &["-f", "-"], Some(&script))
        .map_err(|e| format!("install the nftables table inet gust: {e}"))?;
    Ok((guard, nonce))
}

fn join(ips: &[Ipv4Addr]) -> String {
    ips.iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole table. Order in each chain matters: replies first, then what the manifest
/// allows, DNS, the refusals, and everything else (the internet) last.
fn ruleset(dns: &[Ipv4Addr], guard: bool, nonce: &str) -> String {
    let dns_elements = if dns.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", join(dns))
    };
    let guard_rule = if guard {
        "    meta nfproto ipv4 iifname != \"gu*\" oifname != \"gu*\" drop comment \"gust: not an instance\"\n"
    } else {
        ""
    };
    format!(
        r#"table inet gust {{
  comment "{VERSION}: instances' network (gust serve) [{nonce}]; see docs/SANDBOX.md"
  set allow_port {{ type ifname . ipv4_addr . inet_service; }}
  set allow_host {{ type ifname . ipv4_addr; }}
  set dns {{ type ipv4_addr; {dns_elements} }}
  set blocked {{ type ipv4_addr; flags interval; elements = {{ {blocked} }} }}
  set flows {{ type ifname; flags dynamic; size 65535; }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    oifname "gu*" ct state established,related accept
    oifname "gu*" reject with icmpx admin-prohibited
    iifname "gu*" jump from_instance
{guard_rule}  }}
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname "gu*" jump allowed
    iifname "gu*" meta nfproto ipv4 ip daddr @dns th dport 53 accept
    iifname "gu*" meta l4proto tcp reject with tcp reset
    iifname "gu*" reject with icmpx admin-prohibited
  }}
  chain allowed {{
    meta nfproto ipv4 iifname . ip daddr . th dport @allow_port accept
    meta nfproto ipv4 iifname . ip daddr @allow_host accept
  }}
  chain from_instance {{
    meta nfproto ipv6 reject with icmpx admin-prohibited
    ct state new add @flows {{ iifname ct count over {MAX_FLOWS} }} reject with icmpx admin-prohibited
    jump allowed
    ip daddr @dns th dport 53 accept
    ip daddr @blocked meta l4proto tcp reject with tcp reset
    ip daddr @blocked reject with icmpx admin-prohibited
    tcp dport 25 reject with tcp reset
    accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname "gu*" oifname != "gu*" masquerade
  }}
}}
"#,
        blocked = BLOCKED.join(", ")
    )
}

/// IPv4 nameservers of /etc/resolv.conf, and a note for each one instances cannot use.
fn nameservers() -> (Vec<Ipv4Addr>, Vec<String>) {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut dns = Vec::new();
    let mut notes = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        match addr.parse::<Ipv4Addr>() {
            Ok(ip) if ip.is_loopback() => notes.push(format!(
                "nameserver {ip} is on the host's loopback, which instances cannot reach: names do not resolve inside instances (point /etc/resolv.conf at a resolver on a non-loopback address)"
            )),
            Ok(ip) => dns.push(ip),
            Err(_) => notes.push(format!(
                "nameserver {addr} is not IPv4: instances have IPv4 only"
            )),
        }
    }
    (dns, notes)
}

fn which_nft() -> Option<PathBuf> {
    [
        "/usr/sbin/nft",
        "/sbin/nft",
        "/usr/bin/nft",
        "/usr/local/sbin/nft",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

fn run_nft(nft: &Path, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(nft)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {}: {e}", nft.display()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("write to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_every_blocked_range_and_the_guard_only_when_asked() {
        let r = ruleset(&[Ipv4Addr::new(10, 255, 255, 53)], false, "n1");
        assert_eq!(nonce_of(&r), "n1");
        for b in BLOCKED {
            assert!(r.contains(b), "{b}");
        }
        assert!(r.contains("elements = { 10.255.255.53 }"));
        assert!(!r.contains("not an instance"));
        assert!(ruleset(&[], true, "n").contains("not an instance"));
    }
}
