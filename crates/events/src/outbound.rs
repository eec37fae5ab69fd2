//! Where gust may send callbacks and URL destinations.
//!
//! Anyone who may call `/async/fn` chooses a callback URL, so gust must not become their way
//! into the host or its network: a URL is refused when any address its host resolves to is
//! loopback, private, link-local, shared (CGNAT), unspecified, multicast, broadcast, reserved,
//! or one of this host's own, unless the operator allows it (`--allow-callback`). Addresses are
//! checked after resolution with the system resolver (getaddrinfo, which also reads `127.1`,
//! `2130706433` and `0x7f.1`), never by looking at the spelling, and the connection goes to the
//! very address that was checked, so a name cannot resolve to something else between the check
//! and the connect (DNS rebinding). gust's own listener is refused whatever the allow list says:
//! a callback must not drive gust's own API.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

/// How long resolving a URL's host may take (and, at delivery and deploy, waiting for a free
/// resolution slot).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Name resolutions in progress at once. getaddrinfo runs on tokio's blocking pool and a timeout
/// cannot cancel it, so a caller naming slow-DNS hosts could otherwise fill that pool: a slot is
/// held until getaddrinfo returns, even after the caller stopped waiting.
const MAX_LOOKUPS: usize = 16;

/// The network instances' veths use: part of this host, whatever the allow list says.
const INSTANCE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 250, 0, 0), 16);

/// What the caller of `/async/fn` hears when a callback URL resolves somewhere gust must not
/// call: not which address, so that the answer does not reveal the operator's internal names.
pub const NOT_ALLOWED: &str = "X-Callback-Url host is not allowed: it resolves to a loopback, private, link-local or this host's address (an operator can allow it with --allow-callback)";

/// One entry of the operator's allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// A host name, lower case, without a trailing dot: every address it resolves to.
    Host(String),
    /// An address range.
    Net(IpAddr, u8),
}

/// The outbound policy: the operator's allow list and gust's own listener.
#[derive(Debug)]
pub struct Outbound {
    allow: Vec<Allowed>,
    /// The addresses gust's HTTP server listens on (set once it is bound).
    own: Mutex<Vec<SocketAddr>>,
    /// Resolution slots (`MAX_LOOKUPS`).
    lookups: Arc<Semaphore>,
}

impl Default for Outbound {
    fn default() -> Outbound {
        Outbound {
            allow: Vec::new(),
            own: Mutex::new(Vec::new()),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
        }
    }
}

/// A checked destination: connect to `addr`, send `Host: authority`, request `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

/// Why a destination was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a URL gust can call (final).
    Invalid(String),
    /// gust's own API (final).
    Own(String),
    /// An address gust must not call (final). The text names the address: for the operator and
    /// the log, not for an unauthenticated caller (`NOT_ALLOWED`).
    Forbidden(String),
    /// The host did not resolve now (no answer, no address, a timeout): it may later.
    Unresolved(String),
    /// Every resolution slot is taken (`check_now`), or none came free in time (`check`).
    Busy,
    /// gust cannot tell whether the address is this host's (getifaddrs failed): refused, fail
    /// closed; it may work later.
    Platform(String),
}

impl Refusal {
    /// Whether the same URL may pass later (a delivery retries these like a failed connection).
    pub fn temporary(&self) -> bool {
        matches!(
            self,
            Refusal::Unresolved(_) | Refusal::Busy | Refusal::Platform(_)
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(m)
            | Refusal::Own(m)
            | Refusal::Forbidden(m)
            | Refusal::Unresolved(m)
            | Refusal::Platform(m) => f.write_str(m),
            Refusal::Busy => f.write_str("too many callback host lookups in progress; retry"),
        }
    }
}

impl std::error::Error for Refusal {}

impl Outbound {
    /// Parses the allow list: host names, addresses and CIDR ranges (`10.0.0.0/8`, `fd00::/8`),
    /// each entry possibly a comma-separated list.
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<Outbound, String> {
        let mut out = Vec::new();
        for item in allow.iter().flat_map(|s| s.as_ref().split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            out.push(parse_allowed(item)?);
        }
        Ok(Outbound {
            allow: out,
            ..Outbound::default()
        })
    }

    /// Records the address gust's HTTP server listens on: never a destination.
    pub fn set_listener(&self, addr: SocketAddr) {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr);
    }

    /// Resolves `url`'s host and checks every address; Ok: the address to connect to. Waits
    /// for a resolution slot at most `RESOLVE_TIMEOUT` (deliveries, deploys).
    pub async fn check(&self, url: &str) -> Result<Target, Refusal> {
        self.check_with(url, true).await
    }

    /// As `check`, but `Refusal::Busy` at once when every resolution slot is taken: for
    /// requests, which must not queue without bound behind slow name servers.
    pub async fn check_now(&self, url: &str) -> Result<Target, Refusal> {
        self.check_with(url, false).await
    }

    async fn check_with(&self, url: &str, wait: bool) -> Result<Target, Refusal> {
        let (host, port, authority, path) = split_url(url).map_err(Refusal::Invalid)?;
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => self.resolve(&host, port, wait).await?,
        };
        let Some(first) = addrs.first().copied() else {
            return Err(Refusal::Unresolved(format!(
                "cannot resolve {host}: no address"
            )));
        };
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let locals = try_host_addresses().map_err(|e| {
            Refusal::Platform(format!(
                "cannot tell whether {host} is this host: listing this host's addresses failed ({e}); refused until it works"
            ))
        })?;
        let host_allowed = self.allow.contains(&Allowed::Host(normal_host(&host)));
        for a in &addrs {
            let ip = canonical(a.ip());
            let local = locals.contains(&ip) || classify(ip).is_some_and(|c| c.local);
            if local && own.iter().any(|o| o.port() == a.port()) {
                return Err(Refusal::Own(format!(
                    "{host}:{port} is gust's own API; a callback or destination must not call gust itself"
                )));
            }
            // This host's addresses and the instances' network come before the allow list: a
            // range that happens to cover them does not open them, only the exact address (or
            // the URL's host name) does. Loopback is left to the allow list: a loopback range
            // names the host on purpose.
            if let Some(what) = host_address(ip, &locals) {
                if host_allowed || self.allows_exactly(ip) {
                    continue;
                }
                return Err(Refusal::Forbidden(refusal(&host, ip, what)));
            }
            if host_allowed || self.allows(ip) {
                continue;
            }
            if let Some(c) = classify(ip) {
                return Err(Refusal::Forbidden(refusal(&host, ip, c.what)));
            }
        }
        Ok(Target {
            addr: first,
            authority,
            path,
        })
    }

    /// Resolves `host` with getaddrinfo, holding a resolution slot until it returns.
    async fn resolve(&self, host: &str, port: u16, wait: bool) -> Result<Vec<SocketAddr>, Refusal> {
        let permit = if wait {
            match tokio::time::timeout(RESOLVE_TIMEOUT, self.lookups.clone().acquire_owned()).await
            {
                Ok(Ok(p)) => p,
                _ => return Err(Refusal::Busy),
            }
        } else {
            self.lookups
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Busy)?
        };
        let name = host.to_string();
        // The slot goes with the lookup, not with this future: it is released when getaddrinfo
        // returns, however long after the timeout below that is.
        let lookup = tokio::spawn(async move {
            let r = tokio::net::lookup_host((name, port)).await;
            drop(permit);
            r.map(|a| a.collect::<Vec<_>>())
        });
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(Ok(Err(e))) => Err(Refusal::Unresolved(format!("cannot resolve {host}: {e}"))),
            Ok(Err(e)) => Err(Refusal::Unresolved(format!("cannot resolve {host}: {e}"))),
            Err(_) => Err(Refusal::Unresolved(format!(
                "cannot resolve {host}: no answer within {RESOLVE_TIMEOUT:?}"
            ))),
        }
    }

    fn allows(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|a| match a {
            Allowed::Net(net, bits) => in_net(ip, *net, *bits),
            Allowed::Host(_) => false,
        })
    }

    /// Whether an entry names exactly `ip` (an address, or a /32 or /128).
    fn allows_exactly(&self, ip: IpAddr) -> bool {
        let full = if ip.is_ipv4() { 32 } else { 128 };
        self.allow.contains(&Allowed::Net(ip, full))
    }
}

/// Whether `ip` is this host (one of its interfaces' addresses other than loopback, or the
/// instances' network), and how to say so.
fn host_address(ip: IpAddr, locals: &[IpAddr]) -> Option<&'static str> {
    if in_net(ip, IpAddr::V4(INSTANCE_NET.0), INSTANCE_NET.1) {
        return Some("an address of the instances' network (10.250.0.0/16)");
    }
    if locals.contains(&ip) && !ip.is_loopback() {
        return Some("an address of this host");
    }
    None
}

fn refusal(host: &str, ip: IpAddr, what: &str) -> String {
    let shown = if host == ip.to_string() {
        format!("{ip}")
    } else {
        format!("{host} ({ip})")
    };
    format!(
        "{shown} is {what}: gust does not call loopback, private, link-local or its own addresses unless the operator allows them (gust serve --allow-callback HOST|CIDR)"
    )
}

fn parse_allowed(item: &str) -> Result<Allowed, String> {
    let bad = || {
        format!(
            "--allow-callback {item:?}: expected a host name, an address or a CIDR range (10.0.0.0/8, fd00::/8)"
        )
    };
    if let Some((net, bits)) = item.split_once('/') {
        let ip: IpAddr = net.trim_matches(['[', ']']).parse().map_err(|_| bad())?;
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(bad());
        }
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps: its prefix
        // counts the 96 bits of `::ffff:0:0/96` first.
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            if bits < 96 {
                return Err(format!(
                    "--allow-callback {item:?}: an IPv4-mapped range needs a prefix of at least /96 (::ffff:a.b.c.d/96+n is a.b.c.d/n); write the IPv4 range instead"
                ));
            }
            return Ok(Allowed::Net(IpAddr::V4(v4), bits - 96));
        }
        return Ok(Allowed::Net(ip, bits));
    }
    if let Ok(ip) = item.trim_matches(['[', ']']).parse::<IpAddr>() {
        let ip = canonical(ip);
        return Ok(Allowed::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
    }
    let host = normal_host(item);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(bad());
    }
    Ok(Allowed::Host(host))
}

fn normal_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// `http://host[:port]/path?query` → (host without brackets, port, authority, path and query).
fn split_url(url: &str) -> Result<(String, u16, String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{url:?}: only http:// URLs are supported (https is not yet)"
        ));
    }
    let auth = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let port = auth.port_u16().unwrap_or(80);
    // The Host header: the authority without user information.
    let authority = match auth.port() {
        Some(p) => format!("{}:{}", auth.host(), p.as_str()),
        None => auth.host().to_string(),
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok((host.to_string(), port, authority, path))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `ip` is in `net/bits`; a prefix longer than the family's matches nothing.
fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (canonical(ip), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let Some(shift) = 32u32.checked_sub(bits.into()) else {
                return false;
            };
            let mask = u32::MAX.checked_shl(shift).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let Some(shift) = 128u32.checked_sub(bits.into()) else {
                return false;
            };
            let mask = u128::MAX.checked_shl(shift).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Why an address is not a public destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub what: &'static str,
    /// The address is this host (loopback, unspecified): gust's own listener may answer there.
    pub local: bool,
}

const fn c(what: &'static str, local: bool) -> Option<Class> {
    Some(Class { what, local })
}

/// Classifies an address: None for a public unicast address, else what it is. Pure.
pub fn classify(ip: IpAddr) -> Option<Class> {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    let o = ip.octets();
    let within = |net: [u8; 4], bits: u8| in_net(IpAddr::V4(ip), IpAddr::V4(net.into()), bits);
    if o[0] == 127 {
        return c("a loopback address", true);
    }
    if o[0] == 0 {
        // 0.0.0.0 reaches the host's own listeners on Linux.
        return c("an unspecified address (0.0.0.0/8)", true);
    }
    if ip.is_broadcast() {
        return c("the broadcast address", false);
    }
    if within([10, 0, 0, 0], 8) || within([172, 16, 0, 0], 12) || within([192, 168, 0, 0], 16) {
        return c("a private address (RFC 1918)", false);
    }
    if within([100, 64, 0, 0], 10) {
        return c("a shared address (CGNAT, 100.64.0.0/10)", false);
    }
    if within([169, 254, 0, 0], 16) {
        return c(
            "a link-local address (169.254.0.0/16, cloud metadata)",
            false,
        );
    }
    if within([224, 0, 0, 0], 4) {
        return c("a multicast address", false);
    }
    if within([240, 0, 0, 0], 4) {
        return c("a reserved address (240.0.0.0/4)", false);
    }
    if within([192, 0, 0, 0], 24) {
        return c("an IETF protocol address (192.0.0.0/24)", false);
    }
    if within([198, 18, 0, 0], 15) {
        return c("a benchmarking address (198.18.0.0/15)", false);
    }
    if within([192, 0, 2, 0], 24) || within([198, 51, 100, 0], 24) || within([203, 0, 113, 0], 24) {
        return c("a documentation address", false);
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    let within = |net: &str, bits: u8| {
        let n: Ipv6Addr = net.parse().expect("a valid prefix");
        in_net(IpAddr::V6(ip), IpAddr::V6(n), bits)
    };
    let embedded_v4 = |at: usize| {
        let o = ip.octets();
        Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3])
    };
    if ip.is_loopback() {
        return c("a loopback address", true);
    }
    if ip.is_unspecified() {
        return c("an unspecified address (::)", true);
    }
    if within("::", 96) {
        // IPv4-compatible (deprecated): ::127.0.0.1 and the like.
        return c("an IPv4-compatible address (::/96)", true);
    }
    if within("fc00::", 7) {
        return c("a private address (unique local, fc00::/7)", false);
    }
    if within("fe80::", 10) || within("fec0::", 10) {
        return c("a link-local address (fe80::/10)", false);
    }
    if within("ff00::", 8) {
        return c("a multicast address", false);
    }
    if within("64:ff9b:1::", 48) {
        return c("a local-use NAT64 address (64:ff9b:1::/48)", false);
    }
    if within("64:ff9b::", 96) {
        // NAT64: the IPv4 address it reaches is what matters.
        return classify_v4(embedded_v4(12)).map(|cl| Class {
            what: "a NAT64 address of a non-public IPv4 address",
            ..cl
        });
    }
    if within("2002::", 16) {
        return classify_v4(embedded_v4(2)).map(|cl| Class {
            what: "a 6to4 address of a non-public IPv4 address",
            ..cl
        });
    }
    if within("2001::", 32) {
        return c("a Teredo address (2001::/32)", false);
    }
    if within("2001:db8::", 32) {
        return c("a documentation address (2001:db8::/32)", false);
    }
    if within("100::", 64) {
        return c("a discard-only address (100::/64)", false);
    }
    None
}

/// This host's interface addresses (getifaddrs), IPv4-mapped ones as IPv4; empty when they
/// cannot be listed (`try_host_addresses` says why).
pub fn host_addresses() -> Vec<IpAddr> {
    try_host_addresses().unwrap_or_default()
}

/// This host's interface addresses (getifaddrs), IPv4-mapped ones as IPv4.
pub fn try_host_addresses() -> Result<Vec<IpAddr>, String> {
    #[cfg(test)]
    if tests::GETIFADDRS_FAILS.with(|f| f.get()) {
        return Err("getifaddrs: injected failure".into());
    }
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(canonical(IpAddr::V6(Ipv6Addr::from(
                    sin6.sin6_addr.s6_addr,
                ))));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Makes `try_host_addresses` fail on this thread.
        pub(super) static GETIFADDRS_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_every_non_public_range() {
        for (a, local) in [
            ("127.0.0.1", true),
            ("127.255.255.254", true),
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.168.1.1", false),
            ("100.64.0.1", false),
            ("100.127.255.255", false),
            ("169.254.169.254", false),
            ("224.0.0.1", false),
            ("239.255.255.250", false),
            ("255.255.255.255", false),
            ("240.0.0.1", false),
            ("192.0.0.8", false),
            ("198.18.0.1", false),
            ("192.0.2.1", false),
            ("::1", true),
            ("::", true),
            ("::127.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("64:ff9b::7f00:1", true),
            ("64:ff9b::a9fe:a9fe", false),
            ("2002:7f00:1::", true),
            ("2002:c0a8:101::", false),
            ("2001:db8::1", false),
            ("2001:0:4136:e378::1", false),
        ] {
            let cl = classify(ip(a));
            assert!(cl.is_some(), "{a} must be refused");
            assert_eq!(cl.unwrap().local, local, "{a}: {cl:?}");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "::ffff:1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::101:101",
            "2002:101:101::",
        ] {
            assert_eq!(classify(ip(a)), None, "{a} is public");
        }
    }

    #[test]
    fn allow_list_entries_parse_and_match() {
        let o = Outbound::new(&["10.0.0.0/8, hooks.internal.", "[::1]", "192.168.1.5"]).unwrap();
        assert!(o.allows(ip("10.9.9.9")));
        assert!(o.allows(ip("::ffff:10.9.9.9")));
        assert!(!o.allows(ip("11.0.0.1")));
        assert!(o.allows(ip("::1")));
        assert!(o.allows(ip("192.168.1.5")));
        assert!(!o.allows(ip("192.168.1.6")));
        assert!(o.allow.contains(&Allowed::Host("hooks.internal".into())));
        for bad in ["10.0.0.0/33", "::/129", "a b", "x/y", "http://x"] {
            assert!(Outbound::new(&[bad]).is_err(), "{bad}");
        }
        assert!(
            Outbound::new(&["0.0.0.0/0"])
                .unwrap()
                .allows(ip("127.0.0.1"))
        );
    }

    #[test]
    fn urls_split_into_host_port_and_origin_form() {
        assert_eq!(
            split_url("http://user:pw@Example.com:8080/a/b?c=d").unwrap(),
            (
                "Example.com".into(),
                8080,
                "Example.com:8080".into(),
                "/a/b?c=d".into()
            )
        );
        assert_eq!(
            split_url("http://[::ffff:127.0.0.1]").unwrap(),
            (
                "::ffff:127.0.0.1".into(),
                80,
                "[::ffff:127.0.0.1]".into(),
                "/".into()
            )
        );
        assert!(split_url("https://example.com/").is_err());
        assert!(split_url("ftp://example.com/").is_err());
        assert!(split_url("/relative").is_err());
    }

    /// Every spelling the resolver understands is checked as the address it means.
    #[tokio::test]
    async fn every_spelling_of_a_local_address_is_refused() {
        let o = Outbound::new::<&str>(&[]).unwrap();
        for url in [
            "http://127.0.0.1/",
            "http://127.0.0.1:5432/",
            "http://localhost:6379/",
            "http://LOCALHOST/",
            "http://0.0.0.0/",
            "http://0/",
            "http://2130706433/",
            "http://127.1/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://017700000001/",
            "http://0177.0.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://127.0.0.1./",
            "http://localhost./",
            "http://user@127.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://192.168.0.1/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://no-such-host.invalid/",
        ] {
            let r = o.check(url).await;
            assert!(r.is_err(), "{url} must be refused, got {r:?}");
        }
        for a in host_addresses() {
            let url = match a {
                IpAddr::V4(v4) => format!("http://{v4}/"),
                IpAddr::V6(v6) if v6.segments()[0] == 0xfe80 => continue, // needs a zone
                IpAddr::V6(v6) => format!("http://[{v6}]/"),
            };
            assert!(o.check(&url).await.is_err(), "{url}: this host's address");
        }
    }

    #[tokio::test]
    async fn allowed_destinations_connect_to_the_checked_address() {
        let o = Outbound::new(&["127.0.0.0/8"]).unwrap();
        let t = o.check("http://127.1:9/x?y").await.unwrap();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("127.1:9", "/x?y"));
        // gust's own listener stays refused, however it is spelt and whatever is allowed.
        o.set_listener("127.0.0.1:8080".parse().unwrap());
        for url in [
            "http://127.0.0.1:8080/_gust/v1/services",
            "http://2130706433:8080/",
        ] {
            let e = o.check(url).await.unwrap_err();
            assert!(matches!(e, Refusal::Own(_)), "{e}");
        }
        let any = Outbound::new(&["0.0.0.0/0", "::/0"]).unwrap();
        any.set_listener("0.0.0.0:8080".parse().unwrap());
        assert!(any.check("http://[::1]:8080/").await.is_err());
        assert!(any.check("http://[::1]:8081/").await.is_ok());
        // A public address is fine without any allow list.
        let none = Outbound::new::<&str>(&[]).unwrap();
        assert_eq!(
            none.check("http://1.1.1.1/").await.unwrap().addr,
            "1.1.1.1:80".parse().unwrap()
        );
    }

    #[test]
    fn ipv4_mapped_ranges_are_their_ipv4_range_and_prefixes_fit_the_family() {
        let o = Outbound::new(&["::ffff:10.0.0.0/104"]).unwrap();
        assert_eq!(o.allow, [Allowed::Net(ip("10.0.0.0"), 8)]);
        assert!(o.allows(ip("10.1.2.3")));
        assert!(!o.allows(ip("11.0.0.1")));
        assert!(!o.allows(ip("127.0.0.1")));
        let one = Outbound::new(&["[::ffff:192.168.1.5]/128"]).unwrap();
        assert_eq!(one.allow, [Allowed::Net(ip("192.168.1.5"), 32)]);
        let e = Outbound::new(&["::ffff:0.0.0.0/95"]).unwrap_err();
        assert!(e.contains("at least /96"), "{e}");
        for bad in [
            "10.0.0.0/33",
            "::ffff:10.0.0.0/129",
            "::/129",
            "1.2.3.4/200",
        ] {
            assert!(Outbound::new(&[bad]).is_err(), "{bad}");
        }
        // A prefix longer than the family's matches nothing (and never panics).
        assert!(!in_net(ip("10.0.0.1"), ip("10.0.0.0"), 104));
        assert!(!in_net(ip("::1"), ip("::1"), 200));
    }

    /// A range that covers this host's addresses or the instances' network does not open them;
    /// only the exact address does.
    #[tokio::test]
    async fn host_addresses_are_refused_before_the_allow_list() {
        let wide = Outbound::new(&["0.0.0.0/0", "::/0"]).unwrap();
        let e = wide.check("http://10.250.0.7/").await.unwrap_err();
        assert!(matches!(e, Refusal::Forbidden(_)), "{e}");
        assert!(e.to_string().contains("instances' network"), "{e}");
        let exact = Outbound::new(&["10.0.0.0/8", "10.250.0.7"]).unwrap();
        assert!(exact.check("http://10.250.0.7/").await.is_ok());
        assert!(exact.check("http://10.250.0.8/").await.is_err());
        let locals: Vec<IpAddr> = host_addresses()
            .into_iter()
            .filter(|a| !a.is_loopback())
            .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80))
            .collect();
        for a in &locals {
            let url = match a {
                IpAddr::V4(v4) => format!("http://{v4}/"),
                IpAddr::V6(v6) => format!("http://[{v6}]/"),
            };
            let e = wide.check(&url).await.unwrap_err();
            assert!(matches!(e, Refusal::Forbidden(_)), "{url}: {e}");
            let exact = Outbound::new(&["0.0.0.0/0".to_string(), a.to_string()]).unwrap();
            assert!(exact.check(&url).await.is_ok(), "{url} allowed exactly");
        }
        // Loopback stays the allow list's to open.
        assert!(wide.check("http://127.0.0.1:9/").await.is_ok());
    }

    #[tokio::test]
    async fn when_this_hosts_addresses_are_unknown_urls_are_refused() {
        let o = Outbound::new(&["0.0.0.0/0"]).unwrap();
        GETIFADDRS_FAILS.with(|f| f.set(true));
        let r = o.check("http://1.1.1.1/").await;
        GETIFADDRS_FAILS.with(|f| f.set(false));
        let e = r.unwrap_err();
        assert!(matches!(e, Refusal::Platform(_)), "{e}");
        assert!(e.to_string().contains("getifaddrs"), "{e}");
        assert!(e.temporary());
        assert!(o.check("http://1.1.1.1/").await.is_ok());
    }

    #[tokio::test]
    async fn lookups_are_bounded_and_failures_are_told_apart() {
        let o = Outbound::new::<&str>(&[]).unwrap();
        // Every slot taken: a request is told to retry at once, without resolving.
        let held = o
            .lookups
            .clone()
            .acquire_many_owned(MAX_LOOKUPS as u32)
            .await
            .unwrap();
        assert_eq!(
            o.check_now("http://example.invalid/").await,
            Err(Refusal::Busy)
        );
        // An address needs no lookup.
        assert!(o.check_now("http://1.1.1.1/").await.is_ok());
        drop(held);
        // A name that does not resolve is temporary; a forbidden address is final.
        let e = o
            .check_now("http://no-such-host.invalid/")
            .await
            .unwrap_err();
        assert!(matches!(e, Refusal::Unresolved(_)), "{e}");
        assert!(e.temporary());
        let e = o.check_now("http://localhost/").await.unwrap_err();
        assert!(matches!(e, Refusal::Forbidden(_)), "{e}");
        assert!(!e.temporary());
        assert_eq!(o.lookups.available_permits(), MAX_LOOKUPS);
    }
}
